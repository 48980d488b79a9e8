"""Calibration stages (installed as ``dbquant.calibration``).

Stages turn a full-precision model plus (optional) data into
``{module_name: DualBinaryWeight}``; packing and module swapping happen elsewhere
(``dbquant.formats``, ``dbquant.convert``).

- ``stats``: per-input-channel activation statistics (E[x^2]) of the planned linears.
- ``init``: the data-free or activation-weighted FDB / RTN initialisation.
"""

from .init import METHODS, init_weights
from .stats import input_second_moments

__all__ = ["METHODS", "init_weights", "input_second_moments"]
