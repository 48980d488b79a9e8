"""Checkpoint files on disk: atomic output folders and safetensors header checks.

Torch-only and model-free: what is checked here is the bytes (a whole file, a sane header,
every tensor a packed layout needs, at its shape and dtype), not what the tensors mean.
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

from ..errors import DbquantError
from . import layout

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


def validate_files(files: list[str], layouts: dict[str, layout.LinearLayout]) -> None:
    """Check that the checkpoint files hold every packed tensor of ``layouts``, whole and well-shaped.

    layouts: tensor-name prefix in the files (a module path, or the legacy name transformers
    saves it under, e.g. LLaVA's ``language_model.model.layers...``) -> its packed layout.
    """
    entries: dict[str, dict] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise DbquantError(f"{f}: dbquant checkpoints are safetensors files")
        header = read_header(f)
        meta = json.loads(header.get("__metadata__", {}).get("dbquant", "null") or "null")
        if meta is not None:
            layout.check_version(meta.get("format_version"))
        entries.update({k: v for k, v in header.items() if k != "__metadata__"})
    for prefix, lay in layouts.items():
        for name, (shape, dtype) in lay.tensor_specs().items():
            key = f"{prefix}.{name}"
            e = entries.get(key)
            if e is None:
                raise DbquantError(f"checkpoint is missing tensor {key} (needed by the packed layout "
                                   f"{lay}); the checkpoint is incomplete — re-quantize it")
            if tuple(e["shape"]) != shape or _ST_DTYPES.get(e["dtype"]) != dtype:
                raise DbquantError(f"checkpoint tensor {key} is {e['dtype']}{e['shape']} but the format needs "
                                   f"{dtype}{list(shape)} for {lay}")
