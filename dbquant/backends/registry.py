"""One explicit kernel registry: ``(op, backend) -> function``.

Backends: ``ref`` (pure PyTorch, the oracle; always present), ``cpu`` (the C++
extension ``dbquant._C``), ``triton`` (``dbquant.backends.triton``: GEMV + GEMM; on the CPU only
under ``TRITON_INTERPRET=1``, for tests) and ``cuda`` (the decode GEMV of the extension
``dbquant._C_cuda``, built only with a CUDA torch). ``auto`` picks the first available
backend for the input's device in :data:`PREFERENCE`.

Ops (:data:`OPS`); every function registered for an op has the signature of its reference
``dbquant.backends.reference.<op>_ref``, the oracle it is tested against:

* ``dbgemm``: the packed dual-binary linear (every backend);
* ``decode_layer``: one whole Llama-family decoder layer for one token (``ref``, ``cpu``);
* ``linear_int8``, ``linear_w8a8``: the int8-weight output projection, with float or int8
  activations (``ref``, ``cpu``);
* ``rms_norm``: RMSNorm over the last dim (``ref``, ``cpu``);
* ``table_rows``: rows of an 8-bit group-wise table, the decoder's embedding lookup (``ref``, ``cpu``);
* ``argmax``: the greedy pick from float32 logits (``ref``, ``cpu``);
* ``kv_attend``: attention of a few query tokens on a packed VidKV cache, read as codes
  (``ref``, ``cpu``; layout in ``dbquant.backends.kvpack``).

Each has a ``ref`` entry, so ``auto`` always resolves. A kernel with a layout of its own (the ``cpu``
kernel's "t16", docs/FORMAT.md) also carries ``fn.prepare(qweight, scales, offset,
in_features, group_size) -> prepared`` and ``fn.run(x, prepared, bias)``:
:class:`dbquant.model.modules.PackedLinear` repacks once and calls ``run``; calling ``fn`` itself
repacks every time (fine for tests, slow for inference). A backend may declare ``max_rows``: the largest
number of activation rows M it is the right choice for; ``auto`` skips it above that
(a bit-serial GEMV kernel loses to dequantize + BLAS on a long prefill).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import DbquantError
from . import cpu, cuda, reference, triton

OPS = ("dbgemm", "decode_layer", "kv_attend", "linear_int8", "linear_w8a8", "rms_norm", "table_rows", "argmax",
       "attend_causal", "gated_act", "rope_heads")
BACKENDS = ("ref", "cpu", "triton", "cuda")
# Best first, per device type. ``ref`` closes every list so ``auto`` always resolves.
PREFERENCE = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

_REGISTRY: dict[tuple[str, str], Callable] = {}
_MAX_ROWS: dict[tuple[str, str], int] = {}
# Backends whose registration is deferred until first use (an import may compile or warn).
_LOADERS: dict[str, Callable[[], None]] = {}
# Why a backend whose loader ran is not available (for the error message).
_UNAVAILABLE: dict[str, str] = {}


def register(op: str, backend: str, max_rows: int | None = None):
    """Decorator: register ``fn`` as the implementation of ``op`` on ``backend``.

    ``max_rows``: ``auto`` uses this backend only for inputs of at most that many rows.
    """
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"unknown op/backend {(op, backend)}; ops {OPS}, backends {BACKENDS}")

    def deco(fn):
        _REGISTRY[(op, backend)] = fn
        if max_rows is not None:
            _MAX_ROWS[(op, backend)] = max_rows
        return fn

    return deco


def _load_cpu() -> None:
    if cpu.load_cpu():
        register("dbgemm", "cpu")(cpu.dbgemm_cpu)
        register("decode_layer", "cpu")(cpu.decode_layer_cpu)
        register("linear_int8", "cpu")(cpu.linear_int8_cpu)
        register("linear_w8a8", "cpu")(cpu.linear_w8a8_cpu)
        register("rms_norm", "cpu")(cpu.rms_norm_cpu)
        register("kv_attend", "cpu")(cpu.kv_attend_cpu)
        register("table_rows", "cpu")(cpu.table_rows_cpu)
        register("argmax", "cpu")(cpu.argmax_cpu)
        register("attend_causal", "cpu")(cpu.attend_causal_cpu)
        register("gated_act", "cpu")(cpu.gated_act_cpu)
        register("rope_heads", "cpu")(cpu.rope_heads_cpu)
    else:
        _UNAVAILABLE["cpu"] = cpu._cpu_error


def _load_triton() -> None:
    if triton.load_triton():
        register("dbgemm", "triton")(triton.dbgemm_triton)
    else:
        _UNAVAILABLE["triton"] = triton.unavailable_reason()


def _load_cuda() -> None:
    if cuda.load_cuda():
        register("dbgemm", "cuda", max_rows=cuda.CUDA_MAX_ROWS)(cuda.dbgemm_cuda)
    else:
        _UNAVAILABLE["cuda"] = cuda._cuda_error


_LOADERS["cpu"] = _load_cpu
_LOADERS["triton"] = _load_triton
_LOADERS["cuda"] = _load_cuda
register("dbgemm", "ref")(reference.dbgemm_ref)
register("decode_layer", "ref")(reference.decode_layer_ref)
register("linear_int8", "ref")(reference.linear_int8_ref)
register("linear_w8a8", "ref")(reference.linear_w8a8_ref)
register("rms_norm", "ref")(reference.rms_norm_ref)
register("kv_attend", "ref")(reference.kv_attend_ref)
register("table_rows", "ref")(reference.table_rows_ref)
register("argmax", "ref")(reference.argmax_ref)
register("attend_causal", "ref")(reference.attend_causal_ref)
register("gated_act", "ref")(reference.gated_act_ref)
register("rope_heads", "ref")(reference.rope_heads_ref)


def available(backend: str, op: str = "dbgemm") -> bool:
    """Whether ``backend`` has an ``op`` kernel in this process (loads the backend on first ask)."""
    loader = _LOADERS.pop(backend, None)
    if loader is not None:
        loader()
    return (op, backend) in _REGISTRY


def resolve(backend: str, device: torch.device | str = "cpu", rows: int | None = None,
            op: str = "dbgemm") -> str:
    """Turn ``auto`` into a concrete backend for ``device`` (and ``rows`` activation rows);
    check that an explicit one exists and has ``op``."""
    if op not in OPS:
        raise DbquantError(f"unknown op {op!r}; the registry has {OPS}")
    dev = torch.device(device).type
    if backend == "auto":
        for b in PREFERENCE.get(dev, ("ref",)):
            if available(b, op) and (rows is None or rows <= _MAX_ROWS.get((op, b), rows)):
                return b
    if backend not in BACKENDS:
        raise DbquantError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if not available(backend):
        why = f" ({_UNAVAILABLE[backend]})" if backend in _UNAVAILABLE else ""
        raise DbquantError(
            f"backend {backend!r} is not available in this installation{why} (built backends: "
            f"{[b for b in BACKENDS if available(b)]}); use --backend auto or build the extension "
            "with `pip install --no-build-isolation -e .`"
        )
    if not available(backend, op):
        raise DbquantError(f"backend {backend!r} has no {op!r} kernel (backends with one: "
                           f"{[b for b in BACKENDS if available(b, op)]})")
    return backend


def get(op: str, backend: str = "auto", device: torch.device | str = "cpu", rows: int | None = None) -> Callable:
    """The ``op`` implementation for ``backend`` (``auto``: best for ``device`` and ``rows``).

    Raises DbquantError for an unknown op or backend, or one not available here."""
    return _REGISTRY[(op, resolve(backend, device, rows, op))]


def rows_of(x: torch.Tensor) -> int | None:
    """Activation rows M of x [..., K] for ``get``'s ``rows`` (None when x has no last dim or
    K = 0: then the kernel's own input check reports the problem)."""
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else None
