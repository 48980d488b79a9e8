"""Loader and Python wrappers of the Triton kernels (``dbquant.kernels.dbgemm_triton``).

The kernels do arithmetic only; here inputs are checked (device, dtype, contiguity,
shapes, each error printing the values), outputs allocated, the kernel chosen by the
number of activation rows M, and launched:

* M <= :data:`GEMV_MAX_ROWS`: the split-K GEMV (decode), then a split-K reduction;
* larger M: the tiled GEMM (prefill), weights dequantized in registers before ``tl.dot``.

On a GPU the launches are autotuned over the kernel module's config lists. Under
``TRITON_INTERPRET=1`` (set before the kernels are imported, as ``tests/conftest.py``
does) the kernels run on the CPU through Triton's interpreter with CPU tensors and one
fixed large-block configuration: that is how this backend is tested without a GPU.
"""

from __future__ import annotations

import functools

import torch

from ..format.layout import MAX_PLANES
from .checks import KernelInputError

# Decode rows up to this many use the GEMV (weights re-read per row from L2, no tensor
# cores); more rows use the GEMM. A guess between Marlin's and BitBLAS's crossovers,
# NOT measured on a GPU: `dbquant bench --backend triton` sweeps M so it can be set.
GEMV_MAX_ROWS = 4
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_state: bool | None = None  # None: not tried yet
_error: str | None = None


def load_triton() -> bool:
    """Whether the Triton backend can run here; imports the kernels once.

    True when triton imports and either a CUDA device exists or the kernels were
    imported under ``TRITON_INTERPRET=1``. Otherwise False, with the reason in
    :func:`unavailable_reason` (no warning: CPU-only machines are the common case, and
    ``auto`` never asks for this backend on the CPU).
    """
    global _state, _error
    if _state is None:
        try:
            from ..kernels import dbgemm_triton  # noqa: F401
        except (ImportError, OSError, RuntimeError) as e:  # missing, or no usable build
            _state, _error = False, f"triton is not importable ({type(e).__name__}: {e}); pip install triton"
        else:
            if interpreted() or torch.cuda.is_available():
                _state = True
            else:
                _state, _error = False, (
                    "no CUDA device is visible to torch (torch.version.cuda="
                    f"{torch.version.cuda}); to run the Triton kernels on the CPU (slowly, for "
                    "tests) set TRITON_INTERPRET=1 before importing dbquant")
    return _state


def unavailable_reason() -> str | None:
    """Why :func:`load_triton` returned False (None when it did not, or was not asked)."""
    return _error


@functools.cache
def interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (``TRITON_INTERPRET=1``
    when they were imported) rather than for a GPU. Fixed for the process once imported."""
    from triton.runtime.interpreter import InterpretedFunction

    from ..kernels import dbgemm_triton as k

    return isinstance(k.dbgemm_gemm_kernel, InterpretedFunction)


def dbgemm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
                  group_size: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the Triton kernels (registered as backend ``triton``).

    Same contract as :func:`dbquant.backends.reference.dbgemm_ref`. With N = out_features,
    K = in_features, g = group_size, Kp = ceil(K / g) * g and G = Kp / g:

    Args:
        x: float16, bfloat16 or float32 [..., K] on a CUDA device (on the CPU under the
            interpreter); any strides. Leading dims are flattened into M rows.
        qweight: uint8 [k, N, Kp/8], contiguous, k in 1..4 bit planes; bit j of byte i =
            input channel 8*i + j (LSB first).
        scales: float16 or float32 [N, G, k] contiguous: alpha_1..alpha_k per group.
        offset: float16 or float32 [N, G] contiguous (beta per group), or None.
        bias: float [N] contiguous, or None.
        in_features: K; group_size: g (a multiple of 8).
    Returns:
        [..., N] in x's dtype (fp32 accumulation).
    Raises:
        KernelInputError (a DbquantError and ValueError): a wrong device, dtype, layout or
            shape, with the values.
    """
    x2 = _check(x, qweight, scales, offset, bias, in_features, group_size)
    run = gemv if x2.shape[0] <= GEMV_MAX_ROWS else gemm
    y = run(x2, qweight, scales, offset, bias, in_features, group_size)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
         bias: torch.Tensor | None, in_features: int, group_size: int,
         config: dict | None = None) -> torch.Tensor:
    """The prefill GEMM on checked inputs: x [M, K] -> y [M, N] in x's dtype.

    ``config``: fixed ``{"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}`` (and optionally
    ``num_warps``, ``num_stages``) instead of autotuning / the interpreter default.
    """
    from ..kernels import dbgemm_triton as k

    m, kk = x.shape
    n, kb = qweight.shape[1], qweight.shape[2]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args = dict(M=m, N=n, K=kk, G=scales.shape[1], KB=kb, stride_xm=x.stride(0), stride_xk=x.stride(1),
                M_BUCKET=_next_pow2(m), GROUP_SIZE=group_size, HAS_OFFSET=offset is not None,
                HAS_BIAS=bias is not None, DOT_DTYPE=_dot_dtype(x.dtype), PLANES=qweight.shape[0])
    tensors = (x, qweight, scales, offset, bias, y)
    if config is None and not interpreted():
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

        _tuned("gemm")[grid](*tensors, **args)
        return y
    cfg = dict(config or _interpreter_gemm_config(group_size))
    meta = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
    grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)
    k.dbgemm_gemm_kernel[grid](*tensors, **args, **cfg, **meta)
    return y


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
         bias: torch.Tensor | None, in_features: int, group_size: int,
         split_k: int | None = None, config: dict | None = None) -> torch.Tensor:
    """The decode split-K GEMV on checked inputs: x [M, K] -> y [M, N] in x's dtype.

    ``split_k``: number of K slices (default: enough programs for the GPU, 1 under the
    interpreter). ``config``: fixed ``{"BLOCK_N", "BLOCK_K"}`` (and optionally
    ``num_warps``, ``num_stages``) instead of autotuning / the interpreter default.
    """
    from ..kernels import dbgemm_triton as k

    m, kk = x.shape
    n, kb = qweight.shape[1], qweight.shape[2]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    split = split_k or _default_split_k(m, n, kk, x.device)
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    args = dict(M=m, N=n, K=kk, G=scales.shape[1], KB=kb, stride_xm=x.stride(0), stride_xk=x.stride(1),
                GROUP_SIZE=group_size, HAS_OFFSET=offset is not None, HAS_BIAS=bias is not None,
                SPLIT_K=split, PLANES=qweight.shape[0])
    tensors = (x, qweight, scales, offset, bias, out)
    if config is None and not interpreted():
        def grid(meta):
            return (_cdiv(n, meta["BLOCK_N"]), split, m)

        _tuned("gemv")[grid](*tensors, **args)
    else:
        cfg = dict(config or _interpreter_gemv_config(group_size))
        meta = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
        k.dbgemv_splitk_kernel[(_cdiv(n, cfg["BLOCK_N"]), split, m)](*tensors, **args, **cfg, **meta)
    if split > 1:
        block = 1024
        k.splitk_reduce_kernel[(_cdiv(m * n, block),)](out, bias, y, m, n, SPLIT_K=split,
                                                       HAS_BIAS=bias is not None, BLOCK=block)
    return y


def _next_pow2(v: int) -> int:
    """Smallest power of 2 >= v (v >= 1): the autotune bucket of M, so a new prompt length
    does not trigger a new tuning run."""
    return 1 << (int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_dtype(dtype: torch.dtype):
    """The dtype ``tl.dot`` computes in: the activations' own, except bf16 under the
    interpreter, whose bf16 dot is wrong (exact fp32 instead: bf16 -> fp32 is lossless)."""
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreted():
        return tl.bfloat16
    return tl.float32


def _largest_block_dividing(group_size: int, candidates: tuple[int, ...], fallback: int) -> int:
    """The first of ``candidates`` (largest first) that divides g: then a K tile lies in one
    group and the kernels load one scale pair per row per tile. ``fallback`` otherwise."""
    return next((b for b in candidates if group_size % b == 0), fallback)


# Under the interpreter the cost is per program and per op, not per element: big blocks,
# and a K tile of at least 64 even when that means one scale pair per element.
def _interpreter_gemm_config(group_size: int) -> dict:
    return {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8,
            "BLOCK_K": _largest_block_dividing(group_size, (128, 64), 128)}


def _interpreter_gemv_config(group_size: int) -> dict:
    return {"BLOCK_N": 64, "BLOCK_K": _largest_block_dividing(group_size, (512, 256, 128, 64), 256)}


def _default_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """K slices for the GEMV: double until the launch has ~2 programs per SM (taking
    BLOCK_N ~ 32), keeping >= 512 channels per slice. A heuristic, unmeasured on a GPU."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while split < 16 and m * _cdiv(n, 32) * split < 2 * sms and k // (2 * split) >= 512:
        split *= 2
    return split


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _prune_block_k(configs, named_args, **kwargs):
    """Keep the configs whose BLOCK_K divides g (one scale load per tile) when any do."""
    g = {**named_args, **kwargs}["GROUP_SIZE"]
    aligned = [c for c in configs if g % c.kwargs["BLOCK_K"] == 0]
    return aligned or configs


@functools.cache
def _tuned(name: str):
    """The autotuned launcher of kernel ``name`` ("gemm" or "gemv"); GPU only."""
    import triton

    from ..kernels import dbgemm_triton as k

    prune = {"early_config_prune": _prune_block_k}
    if name == "gemm":
        return triton.autotune(k.GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE", "HAS_OFFSET", "PLANES"],
                               prune_configs_by=prune)(k.dbgemm_gemm_kernel)
    return triton.autotune(k.GEMV_CONFIGS, key=["M", "N", "K", "GROUP_SIZE", "HAS_OFFSET", "SPLIT_K", "PLANES"],
                           prune_configs_by=prune)(k.dbgemv_splitk_kernel)


def _check(x, qweight, scales, offset, bias, in_features, group_size) -> torch.Tensor:
    """Validate the inputs of :func:`dbgemm_triton`; returns x as a 2-D [M, K] view/copy."""
    if not load_triton():
        raise RuntimeError(f"the triton backend is unavailable: {_error}")
    if x.dtype not in ACT_DTYPES:
        raise KernelInputError(f"dbgemm_triton: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not interpreted() and x.device.type != "cuda":
        raise KernelInputError(f"dbgemm_triton: x must be a CUDA tensor, got device {x.device}")
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise KernelInputError(f"dbgemm_triton: group_size must be a positive multiple of 8, got {group_size!r}")
    if not isinstance(in_features, int) or in_features < 1:
        raise KernelInputError(f"dbgemm_triton: in_features must be a positive int, got {in_features!r}")
    k = in_features
    groups = _cdiv(k, group_size)
    kb = groups * group_size // 8
    if x.dim() < 1 or x.shape[-1] != k:
        raise KernelInputError(f"dbgemm_triton: x has shape {tuple(x.shape)} but in_features={k}")
    if (qweight.dtype != torch.uint8 or qweight.dim() != 3 or not 1 <= qweight.shape[0] <= MAX_PLANES
            or qweight.shape[2] != kb):
        raise KernelInputError(
            f"dbgemm_triton: qweight must be uint8 [k, N, {kb}] (k in 1..{MAX_PLANES}) for in_features={k}, "
            f"group_size={group_size}; got {qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1]
    named = {"qweight": qweight, "scales": scales, "offset": offset, "bias": bias}
    want = {"scales": (n, groups, qweight.shape[0]), "offset": (n, groups), "bias": (n,)}
    for name, t in named.items():
        if t is None:
            continue
        if t.device != x.device:
            raise KernelInputError(f"dbgemm_triton: {name} is on {t.device} but x is on {x.device}")
        if name in want and tuple(t.shape) != want[name]:
            raise KernelInputError(
                f"dbgemm_triton: {name} must have shape {want[name]} for N={n}, in_features={k}, "
                f"group_size={group_size}; got {tuple(t.shape)}")
        if name in want and t.dtype not in ACT_DTYPES:
            raise KernelInputError(f"dbgemm_triton: {name} must be a float16/bfloat16/float32 tensor, got {t.dtype}")
        if not t.is_contiguous():
            raise KernelInputError(
                f"dbgemm_triton: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                "call .contiguous() once when loading, not per call")
    return x.reshape(-1, k)
