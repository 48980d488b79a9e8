"""Save and load packed checkpoints: a transformers folder whose config says ``quant_method: dbquant``.

Writes are atomic: everything goes into a hidden temp folder beside the target, which is
renamed into place only when complete, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from . import formats
from .errors import DbquantError
from .plan import LinearPlan

_ST_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder; on success it replaces ``out_dir`` (refused if it exists unless ``overwrite``)."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise DbquantError(f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking the file is whole.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DbquantError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise DbquantError(f"{path} is corrupt or truncated: header claims {n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DbquantError(f"{path} has a corrupt safetensors header ({e}); re-quantize or re-copy it") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise DbquantError(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}; "
                           "re-copy or re-quantize the checkpoint")
    return header


def validate_files(files: list[str], plan: list[LinearPlan], disk_names: dict[str, str] | None = None) -> None:
    """Check that the checkpoint files hold every packed tensor the plan needs, whole and well-shaped.

    disk_names: module path -> its prefix in the files, where transformers saves under
    other (legacy) names than the module tree's (LLaVA: ``language_model.model.layers...``).
    """
    entries: dict[str, dict] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise DbquantError(f"{f}: dbquant checkpoints are safetensors files")
        header = read_header(f)
        meta = json.loads(header.get("__metadata__", {}).get("dbquant", "null") or "null")
        if meta is not None:
            formats.check_version(meta.get("format_version"))
        entries.update({k: v for k, v in header.items() if k != "__metadata__"})
    for p in plan:
        for name, (shape, dtype) in p.layout.tensor_specs().items():
            key = f"{(disk_names or {}).get(p.name, p.name)}.{name}"
            e = entries.get(key)
            if e is None:
                raise DbquantError(f"checkpoint is missing tensor {key} (needed by the packed layout "
                                   f"{p.layout}); the checkpoint is incomplete — re-quantize it")
            if tuple(e["shape"]) != shape or _ST_DTYPES.get(e["dtype"]) != dtype:
                raise DbquantError(f"checkpoint tensor {key} is {e['dtype']}{e['shape']} but the format needs "
                                   f"{dtype}{list(shape)} for {p.layout}")


def save(model, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write a packed model (and tokenizer, and ``{file_name: text}`` extras) to ``out_dir`` atomically.

    The model must carry a ``DbquantConfig`` (``dbquant.hf.attach``); ``save_pretrained``
    then writes ``quantization_config`` to config.json and the format facts into every
    safetensors header.
    """
    from .hf import DbquantConfig

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
    from . import ops
    from .vlm import auto_model_class

    path = Path(path)
    config = read_config(path)
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "dbquant":
        raise DbquantError(f"{path} is not a dbquant checkpoint (config.json has no quantization_config "
                           "with quant_method 'dbquant'); quantize it with `dbquant quantize`")
    formats.check_version(qc.get("format_version"))
    if not list(path.glob("*.safetensors")):
        raise DbquantError(f"{path} has no .safetensors weights; the checkpoint is incomplete")
    ops.resolve(backend)  # fail early on an unavailable backend
    model = auto_model_class(config).from_pretrained(path, dtype=dtype)
    if backend != "auto":
        set_backend(model, backend)
    return model.eval()


def set_backend(model, backend: str) -> None:
    """Point every packed linear of ``model`` at ``backend``."""
    from . import ops
    from .nn import PackedLinear

    ops.resolve(backend)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.backend = backend
