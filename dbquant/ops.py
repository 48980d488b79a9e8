"""One explicit kernel registry: ``(op, backend) -> function``.

Backends: ``ref`` (pure PyTorch, the oracle; always present), ``cpu`` (the C++
extension ``dbquant._C``), ``triton`` and ``cuda`` (GPU; later). ``auto`` picks the
first available backend for the input's device in :data:`PREFERENCE`.

Every function registered for op ``dbgemm`` has the signature of
:func:`dbquant.reference.dbgemm_ref`. A backend may declare ``max_rows``: the largest
number of activation rows M it is the right choice for; ``auto`` skips it above that
(a bit-serial GEMV kernel loses to dequantize + BLAS on a long prefill).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import reference
from .errors import DbquantError

OPS = ("dbgemm",)
BACKENDS = ("ref", "cpu", "triton", "cuda")
# Best first, per device type. ``ref`` closes every list so ``auto`` always resolves.
PREFERENCE = {"cpu": ("cpu", "ref"), "cuda": ("cuda", "triton", "ref")}

_REGISTRY: dict[tuple[str, str], Callable] = {}
_MAX_ROWS: dict[tuple[str, str], int] = {}
# Backends whose registration is deferred until first use (an import may compile or warn).
_LOADERS: dict[str, Callable[[], None]] = {}


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
    from . import _native

    if _native.load_cpu():
        register("dbgemm", "cpu", max_rows=_native.CPU_MAX_ROWS)(_native.dbgemm_cpu)


_LOADERS["cpu"] = _load_cpu
register("dbgemm", "ref")(reference.dbgemm_ref)


def available(backend: str) -> bool:
    """Whether ``backend`` has a ``dbgemm`` kernel in this process (loads it on first ask)."""
    loader = _LOADERS.pop(backend, None)
    if loader is not None:
        loader()
    return ("dbgemm", backend) in _REGISTRY


def resolve(backend: str, device: torch.device | str = "cpu", rows: int | None = None,
            op: str = "dbgemm") -> str:
    """Turn ``auto`` into a concrete backend for ``device`` (and ``rows`` activation rows);
    check that an explicit one exists."""
    dev = torch.device(device).type
    if backend == "auto":
        for b in PREFERENCE.get(dev, ("ref",)):
            if available(b) and (rows is None or rows <= _MAX_ROWS.get((op, b), rows)):
                return b
    if backend not in BACKENDS:
        raise DbquantError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if not available(backend):
        raise DbquantError(
            f"backend {backend!r} is not available in this installation (built backends: "
            f"{[b for b in BACKENDS if available(b)]}); use --backend auto or build the extension "
            "with `pip install --no-build-isolation -e .`"
        )
    return backend


def get(op: str, backend: str = "auto", device: torch.device | str = "cpu", rows: int | None = None) -> Callable:
    """The ``op`` implementation for ``backend`` (``auto``: best for ``device`` and ``rows``)."""
    return _REGISTRY[(op, resolve(backend, device, rows, op))]
