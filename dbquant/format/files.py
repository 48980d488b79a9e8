"""Files on disk: atomic output folders and JSON files, and safetensors header checks.

Torch-only and model-free: what is checked here is the bytes (a whole file, a sane header,
every tensor a packed layout needs, at its shape and dtype), not what the tensors mean.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch

from .. import faults
from ..errors import DbquantError
from . import layout
from .embedding import TableLayout

_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
# Bytes per element of every safetensors dtype (a header entry's data_offsets must span shape x width).
_ST_WIDTH = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


PACKED_SUFFIXES = ("qweight", "scales", "offset", "scale_max")  # tensor names of a packed linear (layout.tensor_specs)
METADATA_KEY = "dbquant"  # safetensors header metadata key holding the format facts (JSON)
# Facts of the header metadata that must agree with config.json's quantization_config.
_META_FACTS = ("format", "format_version", "group_size", "offset", "bit_order")


def _output_parent(out: Path) -> Path:
    """Create the parent of an output folder; ``DbquantError`` (not a traceback) when that is impossible."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DbquantError(f"cannot create the output directory {out}: {e.strerror or e} ({out.parent}); "
                           "choose another -o") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DbquantError(f"cannot write the output directory {out}: {out.parent} is not writable; choose another -o")
    return out.parent


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (one owned by another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-PID`` left in ``parent`` by killed saves of ``NAME``.

    A temp folder made by :func:`atomic_dir` is named ``.NAME.tmp-PID-XXXX``; one whose PID is no
    longer running belongs to a dead save. Names without a PID (older dbquant) are removed when
    older than a day. Returns what was removed.
    """
    gone = []
    for kind in ("tmp", "old"):
        for f in parent.glob(f".{name}.{kind}-*"):
            pid = f.name[len(name) + len(kind) + 3:].split("-")[0]
            dead = not pid_alive(int(pid)) if pid.isdigit() else time.time() - f.lstat().st_mtime > 86400
            if not dead or (pid.isdigit() and int(pid) == os.getpid()):
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a reader never sees half a file, and a run
    killed mid-write leaves the previous file whole.

    The temp file sits beside ``path`` (same file system, so the rename is atomic) under a unique
    name, so two writers of one path never write into each other's temp file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder; on success it replaces ``out_dir`` (refused if it exists unless ``overwrite``).

    The temp folder ``.NAME.tmp-PID-XXXX`` sits beside the target (same file system, so the final
    rename is atomic) and gets the usual permissions (0777 less the umask; mkdtemp makes 0700).
    Stale temp folders of killed saves into the same target are removed first. With
    ``overwrite``, an existing folder *or file* at ``out_dir`` is moved aside and removed only
    after the new one is in place.
    """
    out = Path(out_dir).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DbquantError(f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = _output_parent(out)
    remove_stale(parent, out.name)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise DbquantError(f"cannot create a folder beside {out}: {e.strerror or e}; choose another -o") from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        faults.point("output:before-rename")
        if out.exists() or out.is_symlink():
            old = parent / f".{out.name}.old-{os.getpid()}"
            _remove(old)
            os.replace(out, old)  # a folder or a file: either is removed below, once replaced
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_entry(path: Path, name, entry, data_len: int) -> None:
    """One header entry: ``{"dtype": str, "shape": [int...], "data_offsets": [begin, end]}`` inside the data."""
    if not isinstance(entry, dict):
        raise DbquantError(f"{path} has a corrupt safetensors header: entry {name!r} is a "
                           f"{type(entry).__name__}, not an object; re-quantize or re-copy it")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    ok_shape = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    ok_offs = (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
               and 0 <= offs[0] <= offs[1])
    if not isinstance(dtype, str) or not ok_shape or not ok_offs:
        raise DbquantError(f"{path} has a corrupt safetensors header: tensor {name!r} has dtype={dtype!r}, "
                           f"shape={shape!r}, data_offsets={offs!r}; re-quantize or re-copy it")
    if offs[1] > data_len:
        raise DbquantError(f"{path} is truncated: tensor {name!r} needs bytes up to {offs[1]} of the data, "
                           f"the file holds {data_len}; re-copy or re-quantize the checkpoint")
    width = _ST_WIDTH.get(dtype)
    if width is not None and offs[1] - offs[0] != width * math.prod(shape):
        raise DbquantError(f"{path} has a corrupt safetensors header: tensor {name!r} is {dtype}{shape} "
                           f"({width * math.prod(shape)} bytes) but data_offsets {offs} span {offs[1] - offs[0]}")


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking the file is whole and the header well-formed.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``.
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DbquantError(f"{path} has a corrupt safetensors header ({e}); re-quantize or re-copy it") from None
    if not isinstance(header, dict):
        raise DbquantError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, "
                           "not an object); re-quantize or re-copy it")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DbquantError(f"{path} has a corrupt safetensors header: __metadata__ must map strings to strings, "
                           f"got {str(meta)[:120]}")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, data_len)
    _check_coverage(path, header, data_len)
    return header


def _check_coverage(path: Path, header: dict, data_len: int) -> None:
    """Tensors tile the data exactly (no gap, no overlap, nothing after), as safetensors itself requires."""
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise DbquantError(f"{path} has a corrupt safetensors header: tensor {name!r} starts at byte {begin} "
                               f"of the data, expected {pos} (tensors must tile the data); re-copy the checkpoint")
        pos = end
    if pos != data_len:
        raise DbquantError(f"{path} is corrupt: its tensors cover {pos} bytes of data but the file holds {data_len}; "
                           "re-copy or re-quantize the checkpoint")


def file_metadata(path, header: dict) -> dict | None:
    """The ``dbquant`` JSON object of a file's header metadata (None when the key is absent)."""
    raw = header.get("__metadata__", {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DbquantError(f"{path}: header metadata {METADATA_KEY!r} is not valid JSON ({e}): {raw[:80]!r}; "
                           "re-quantize or re-copy the checkpoint") from None
    if not isinstance(meta, dict):
        raise DbquantError(f"{path}: header metadata {METADATA_KEY!r} is a JSON {type(meta).__name__}, "
                           f"not an object: {raw[:80]!r}")
    return meta


def _check_metadata(path, meta: dict, expect: dict | None) -> None:
    """The file's format facts: a supported version, and the same facts as config.json says."""
    layout.check_version(meta.get("format_version"))
    for key in _META_FACTS if expect else ():
        if key in expect and meta.get(key) != expect[key]:
            raise DbquantError(f"{path} says {key}={meta.get(key)!r} in its header metadata but config.json's "
                               f"quantization_config says {key}={expect[key]!r}; the config does not belong to "
                               "these weights")


def validate_files(files: list[str], layouts: dict[str, layout.LinearLayout | TableLayout],
                   expect_meta: dict | None = None) -> dict[str, dict]:
    """Check that the checkpoint files hold every packed tensor of ``layouts``, whole and well-shaped.

    layouts: tensor-name prefix in the files (a module path, or the legacy name transformers
    saves it under, e.g. LLaVA's ``language_model.model.layers...``) -> its packed layout
    (a linear's, or a quantized table's).
    expect_meta: the format facts config.json states (``format``, ``format_version``,
    ``group_size``, ``offset``); every file's header metadata must agree.
    Returns every tensor's header entry by name (all files together).
    """
    entries: dict[str, dict] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise DbquantError(f"{f}: dbquant checkpoints are safetensors files")
        header = read_header(f)
        meta = file_metadata(f, header)
        if meta is not None:
            _check_metadata(f, meta, expect_meta)
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
    return entries


def check_claims(entries: dict[str, dict], layouts: dict[str, layout.LinearLayout],
                 native: set[str] = frozenset()) -> None:
    """The other direction: every packed tensor in the files belongs to a planned layout.

    Refuses a ``qweight``/``scales``/``offset`` tensor whose module the config does not list
    (its dense ``weight`` would be missing and initialised at random) and an ``offset`` the
    layout does not have (the config says ``offset: false``: it would be dropped). ``native``:
    leaf names the unquantized architecture itself has (e.g. a norm's ``offset``); those count
    as packed only next to a ``qweight``.
    """
    packed_prefixes = {k.rpartition(".")[0] for k in entries if k.endswith(".qweight")}
    for key in sorted(entries):
        prefix, _, leaf = key.rpartition(".")
        if leaf not in PACKED_SUFFIXES or (leaf in native and prefix not in packed_prefixes):
            continue
        lay = layouts.get(prefix)
        if lay is None:
            raise DbquantError(f"checkpoint tensor {key} is packed, but quantization_config.modules does not list "
                               f"{prefix}; the config does not match the weights (module removed from `modules`, "
                               "or `modules` empty) — restore config.json from the quantized output")
        if leaf not in lay.tensor_specs():
            raise DbquantError(f"checkpoint tensor {key} is a packed {leaf}, but config.json says offset: "
                               f"{str(lay.offset).lower()}; the config does not match the weights — "
                               "restore config.json from the quantized output")
