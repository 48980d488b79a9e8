"""dbquant: dual-binary ~2-bit quantization of LLMs and VLMs.

``import dbquant`` registers ``quant_method: "dbquant"`` with transformers, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads packed checkpoints; ``dbquant.load``
does the same after friendlier checks.
"""

__version__ = "0.1.0"

from .errors import DbquantError  # noqa: E402
from .hf import register as _register  # noqa: E402

_register()

from .checkpoint import load, save  # noqa: E402

__all__ = ["DbquantError", "load", "save", "__version__"]
