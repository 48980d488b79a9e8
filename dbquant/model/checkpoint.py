"""Save and load packed checkpoints: a transformers folder whose config says ``quant_method: dbquant``.

Writes are atomic: everything goes into a hidden temp folder beside the target, which is
renamed into place only when complete, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..backends import registry
from ..errors import DbquantError
from ..format import layout
from ..format.files import atomic_dir, file_metadata, read_header
from .embedding import StoredTable
from .hf import DbquantConfig, format_metadata
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
        out = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DbquantError(f"{cfg} is not valid JSON ({e})") from None
    if not isinstance(out, dict) or not isinstance(out.get("quantization_config", {}), (dict, type(None))):
        raise DbquantError(f"{cfg} is not a model config (a JSON object whose quantization_config is an object)")
    return out


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
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DbquantError(f"{path} has no .safetensors weights; the checkpoint is incomplete")
    registry.resolve(backend)  # fail early on an unavailable backend
    _check_files(path, files, qc)
    try:
        model = auto_model_class(config).from_pretrained(path, dtype=dtype)
    except DbquantError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, OSError,
            SafetensorError) as e:
        # transformers' own checks of config values and tensors: one line, the cause chained
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DbquantError(f"cannot load {path}: {type(e).__name__}: {msg[:300]}") from e
    if backend != "auto":
        set_backend(model, backend)
    return model.eval()


def _check_files(path: Path, files: list[Path], qc: dict) -> None:
    """Every file's header and ``dbquant`` metadata, before transformers opens them (it would raise raw errors).

    The full cross-check of config against tensors runs inside ``from_pretrained``
    (``DbquantHfQuantizer``); this catches what transformers reads first.
    """
    expect = format_metadata(DbquantConfig(**qc))  # DbquantConfig validates the config's own values
    for f in files:
        meta = file_metadata(f, read_header(f))
        if meta is not None:
            for key in ("format", "format_version", "group_size", "offset"):
                if meta.get(key) != expect[key]:
                    raise DbquantError(f"{f} says {key}={meta.get(key)!r} in its header metadata but config.json's "
                                       f"quantization_config says {key}={expect[key]!r}; the config does not belong "
                                       "to these weights")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            ok = isinstance(json.loads(index.read_text()).get("weight_map"), dict)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError):
            ok = False
        if not ok:
            raise DbquantError(f"{index} is corrupt (not JSON with a weight_map object); re-copy the checkpoint")


def set_backend(model, backend: str) -> None:
    """Point every packed linear of ``model`` at ``backend``."""
    registry.resolve(backend)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.backend = backend


def parameter_count(model) -> int:
    """All parameters of the model as stored: dense ones (a tied matrix once), every packed linear's
    N*K and every quantized table's rows*dim (a tied head reads the embedding's: counted once)."""
    dense = sum(p.numel() for p in model.parameters())
    packed = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedLinear))
    tables = sum(m.layout.rows * m.layout.dim for m in model.modules() if isinstance(m, StoredTable))
    return dense + packed + tables


def measured_bits(path: str | os.PathLike, model) -> dict:
    """Whole-checkpoint size, measured on disk: ``checkpoint_bytes`` (every byte of the folder's
    ``*.safetensors`` files, headers included; tokenizer and config files are not weights),
    ``parameters`` (:func:`parameter_count`) and ``checkpoint_bpw`` = bytes x 8 / parameters."""
    files = sorted(Path(path).glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    params = parameter_count(model)
    return {"checkpoint_bytes": nbytes, "parameters": params, "checkpoint_bpw": nbytes * 8 / params}
