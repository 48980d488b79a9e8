"""Calibration stages (installed as ``dbquant.calibration``).

Stages turn a full-precision model plus (optional) data into
``{module_name: DualBinaryWeight}``; packing and module swapping happen elsewhere
(``dbquant.format.layout``, ``dbquant.model.convert``).

- ``stats``: per-input-channel activation statistics (E[x^2]) of the planned linears.
- ``init``: the data-free or activation-weighted FDB / RTN initialisation.
- ``blockwise``: block-wise reconstruction (MSE to the fp block output, STE training).
- ``dad``: Deviation-Aware Distillation (entropy-weighted per-token KL to the fp teacher).
- ``runstate``: work dir, fingerprint, atomic checkpoints / resume, JSON-lines log, NaN guard.
- ``presets``: ``fast`` / ``default`` / ``best`` budgets for the ``fdb-dad`` method.
- ``pipeline``: the ``fdb-dad`` method wiring the stages together.

May import: ``dbquant.eval`` (text and windows), ``dbquant.model``, ``dbquant.quant``,
``dbquant.format``, ``dbquant.errors``; never ``dbquant.quantize`` or the CLI above it.
"""

from dbquant.calibration.init import init_weights
from dbquant.calibration.stats import input_second_moments

# Methods of ``dbquant quantize --method``: the full pipeline, FDB init only, RTN.
METHODS = ("fdb-dad", "fdb", "rtn")

__all__ = ["METHODS", "init_weights", "input_second_moments"]
