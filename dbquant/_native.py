"""Loader and Python wrapper of the C++ CPU kernel (extension module ``dbquant._C``).

``dbquant._C`` has no Python functions: importing it loads the shared library, which
registers ``torch.ops.dbquant.dbgemm_cpu``. When it is missing (not built, or built
against another torch) :func:`load_cpu` returns False and warns once; dbquant then
uses the pure-PyTorch reference kernel.
"""

from __future__ import annotations

import warnings
import weakref

import torch

BUILD_HINT = "pip install --no-build-isolation -e ."
# Above this many activation rows the scalar lookup-table kernel loses to the reference's
# dequantize + BLAS (measured: 1 row 0.10 vs 3.8 ms, 16 rows 3.3 vs 4.7 ms on a
# 1536x576 g64 weight, 1 thread), so ``auto`` hands larger inputs to ``ref``.
CPU_MAX_ROWS = 16

_cpu_state: bool | None = None  # None: not tried yet
_cpu_error: str | None = None


def load_cpu() -> bool:
    """Whether ``torch.ops.dbquant.dbgemm_cpu`` is available; imports ``dbquant._C`` once.

    On failure warns once per process (``RuntimeWarning``) with the reason and the build
    command; later calls return the cached answer silently.
    """
    global _cpu_state, _cpu_error
    if _cpu_state is None:
        try:
            from . import _C  # noqa: F401 - loading the library registers the op

            torch.ops.dbquant.dbgemm_cpu  # noqa: B018 - raises if registration failed
            _cpu_state = True
        except (ImportError, OSError, AttributeError, RuntimeError) as e:
            _cpu_state, _cpu_error = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                "dbquant: the C++ CPU extension (dbquant._C) is not built or failed to load "
                f"({_cpu_error}); falling back to the slower pure-PyTorch reference kernel. "
                f"Build it from the source checkout with `{BUILD_HINT}` (needs torch and a C++ "
                "compiler).",
                RuntimeWarning,
                stacklevel=2,
            )
    return _cpu_state


# float32 copies of float16 scales/offsets/biases, so a PackedLinear that keeps its
# buffers in float16 pays the conversion once, not per call. Keyed by id() with a
# weakref to the source (tensors compare elementwise, so they cannot be dict keys); an
# entry is dropped when its source dies and ignored when the source was modified in place.
_f32_cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _as_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    if t.requires_grad or t.is_inference():
        return t.detach().float().contiguous()  # _version is unavailable: no caching
    key = id(t)
    hit = _f32_cache.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    out = t.float().contiguous()
    _f32_cache[key] = (weakref.ref(t, lambda _r, k=key: _f32_cache.pop(k, None)), t._version, out)
    return out


def dbgemm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` on CPU with the C++ lookup-table kernel.

    Same contract as :func:`dbquant.reference.dbgemm_ref`. With N = out_features,
    K = in_features, g = group_size, Kp = ceil(K / g) * g and G = Kp / g:

    Args:
        x: float [..., K] on CPU (float32 ideally; other float dtypes are computed in
            float32 and the result cast back). Leading dims are flattened; any strides.
        qweight: uint8 [2, N, Kp/8], contiguous; plane 0 = b1, plane 1 = b2, bit j of
            byte i = input channel 8*i + j (LSB first); padded channels 0.
        scales: float16 or float32 [N, G, 2]: alpha1, alpha2 per group.
        offset: float16 or float32 [N, G] (beta per group) or None.
        bias: float [N] or None.
        in_features: K; group_size: g (a multiple of 8).
    Returns:
        [..., N] in x's dtype.
    Raises:
        RuntimeError: from the op, naming the offending tensor, on a wrong device,
            dtype or shape.
    """
    if not load_cpu():
        raise RuntimeError(f"dbquant._C is not available; build it with `{BUILD_HINT}`")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    y = torch.ops.dbquant.dbgemm_cpu(x2, qweight.contiguous(), _as_f32(scales), _as_f32(offset),
                                     _as_f32(bias), int(in_features), int(group_size))
    return y.reshape(*lead, y.shape[-1]).to(x.dtype)
