"""dbquant: dual-binary ~2-bit quantization of LLMs and VLMs.

``import dbquant`` registers ``quant_method: "dbquant"`` with transformers, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads packed checkpoints; ``dbquant.load``
does the same after friendlier checks.

Layers, lowest first; a module imports only from its own layer or those below
(``docs/ARCHITECTURE.md``; enforced by ``tests/test_layers.py``):
``errors``/``_version`` -> ``format`` -> ``quant``, ``backends`` -> ``model`` -> ``runtime``
-> ``eval`` -> ``calibration`` -> ``quantize``, ``bench`` -> ``cli``.
"""

from ._version import __version__
from .errors import DbquantError
from .model.checkpoint import load, save
from .model.hf import register as _register

_register()

__all__ = ["DbquantError", "load", "save", "__version__"]
