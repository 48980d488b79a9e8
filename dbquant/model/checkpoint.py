"""Save and load packed checkpoints: a transformers folder whose config says ``quant_method: dbquant``.

Writes are atomic: everything goes into a hidden temp folder beside the target, which is
renamed into place only when complete, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..backends import registry
from ..errors import DbquantError
from ..format import layout
from ..format.files import atomic_dir
from .hf import DbquantConfig
from .modules import PackedLinear
from .vlm import auto_model_class


def save(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write a packed model (and tokenizer, and ``{file_name: text}`` extras) to ``out_dir`` atomically.

    The model must carry a ``DbquantConfig`` (``dbquant.model.hf.attach``); ``save_pretrained``
    then writes ``quantization_config`` to config.json and the format facts into every
    safetensors header.
    """
    if not isinstance(getattr(model.config, "quantization_config", None), DbquantConfig):
        raise DbquantError("dbquant.save needs a dbquant-packed model (from `dbquant quantize` or dbquant.load)")
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model folder, with clear errors for a missing or corrupt one."""
    path = Path(path)
    if not path.is_dir():
        raise DbquantError(f"{path} is not a directory; pass a folder made by `dbquant quantize`")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise DbquantError(f"{path} has no config.json; it is not a model folder")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise DbquantError(f"{cfg} is not valid JSON ({e})") from None


def is_dbquant_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model folder whose config says ``quant_method: dbquant``."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    qc = read_config(p).get("quantization_config") or {}
    return qc.get("quant_method") == "dbquant"


def load(path: str | os.PathLike, backend: str = "auto", dtype: torch.dtype = torch.float32):
    """Load a dbquant checkpoint as a transformers model with packed linears.

    Same result as ``AutoModelForCausalLM.from_pretrained(path)`` after ``import dbquant``
    (it *is* that call, after the checks that give clear errors; for a VLM it is
    ``AutoModelForImageTextToText``, i.e. the VLM class's ``from_pretrained``).

    Args:
        backend: kernel backend of every packed linear (``auto``, ``ref``, ``cpu``, ...).
        dtype: dtype of the dense parts (embeddings, norms); float32 on CPU.
    """
    path = Path(path)
    config = read_config(path)
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "dbquant":
        raise DbquantError(f"{path} is not a dbquant checkpoint (config.json has no quantization_config "
                           "with quant_method 'dbquant'); quantize it with `dbquant quantize`")
    layout.check_version(qc.get("format_version"))
    if not list(path.glob("*.safetensors")):
        raise DbquantError(f"{path} has no .safetensors weights; the checkpoint is incomplete")
    registry.resolve(backend)  # fail early on an unavailable backend
    model = auto_model_class(config).from_pretrained(path, dtype=dtype)
    if backend != "auto":
        set_backend(model, backend)
    return model.eval()


def set_backend(model, backend: str) -> None:
    """Point every packed linear of ``model`` at ``backend``."""
    registry.resolve(backend)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.backend = backend
