"""Loader and Python wrapper of the CUDA decode GEMV (extension module ``dbquant._C_cuda``).

Built only when the installed torch has CUDA (setup.py); importing the extension registers
``torch.ops.dbquant.dbgemm_cuda``. Without a GPU :func:`load_cuda` returns False with the
reason and no warning (most installs have no GPU).
"""

from __future__ import annotations

import torch

from .checks import check_activations, check_packed, fail
from .cpu import BUILD_HINT

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Activation rows the CUDA kernel is the right choice for (it streams the weights once for
# up to 4 rows, csrc/cuda/dbgemv.h kMaxRows); ``auto`` hands larger M to the Triton GEMM.
# Larger M still works when asked for explicitly (launches of 4 rows). Unmeasured on a GPU.
CUDA_MAX_ROWS = 4
# Each block stages the scales (and offsets) of its 4 output rows in the 48 KiB of shared memory
# every GPU grants without opting in (csrc/cuda/dbgemv.h: kWarpsPerBlock, kMaxSharedBytes).
WARPS_PER_BLOCK = 4
MAX_SHARED_BYTES = 48 * 1024

_cuda_state: bool | None = None  # None: not tried yet
_cuda_error: str | None = None


def load_cuda() -> bool:
    """Whether ``torch.ops.dbquant.dbgemm_cuda`` can run here; imports ``dbquant._C_cuda`` once.

    False (with the reason in ``_cuda_error``, no warning: most installs have no GPU) when
    torch has no CUDA device or the extension was not built (it is built only when the
    installed torch has CUDA).
    """
    global _cuda_state, _cuda_error
    if _cuda_state is None:
        if not torch.cuda.is_available():
            _cuda_state, _cuda_error = False, (
                f"no CUDA device is visible to torch (torch.version.cuda={torch.version.cuda})")
        else:
            try:
                from .. import _C_cuda  # noqa: F401 - loading the library registers the op

                torch.ops.dbquant.dbgemm_cuda  # noqa: B018 - raises if registration failed
                _cuda_state = True
            except (ImportError, OSError, AttributeError, RuntimeError) as e:
                _cuda_state, _cuda_error = False, (
                    f"dbquant._C_cuda is not built or failed to load ({type(e).__name__}: {e}); "
                    f"build it with `{BUILD_HINT}` under a CUDA build of torch")
    return _cuda_state


def dbgemm_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
                group_size: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the CUDA decode GEMV (``csrc/cuda/dbgemv.cu``).

    Same contract as :func:`dbquant.backends.reference.dbgemm_ref`. With N = out_features,
    K = in_features, g = group_size, Kp = ceil(K / g) * g and G = Kp / g:

    Args:
        x: float16, bfloat16 or float32 [..., K] on a CUDA device. Leading dims are
            flattened into M rows (copied only when a row's elements are not adjacent).
        qweight: uint8 [k, N, Kp/8] (k in 1..4 planes), contiguous, on x's device (canonical planes).
        scales: float16 [N, G, k] contiguous (float32 is converted per call).
        offset: float16 [N, G] contiguous (float32 converted per call), or None.
        bias: [N] or None (cast to x's dtype).
        in_features: K; group_size: g (a multiple of 8). G <= 2048 with an offset,
            <= 3072 without (the block stages its rows' scales in 48 KiB of shared memory).
    Returns:
        [..., N] in x's dtype (fp32 accumulation).
    Raises:
        KernelInputError (a DbquantError): a dtype, rank or shape the op must refuse (an integer
            x would come back truncated), or more groups than shared memory holds;
            RuntimeError: from the op (device, layout).
    """
    if not load_cuda():
        raise RuntimeError(f"the cuda backend is unavailable: {_cuda_error}")
    check_packed("dbgemm_cuda", qweight, scales, offset, bias, in_features, group_size)
    check_activations("dbgemm_cuda", x, in_features, ACT_DTYPES)
    check_shared_memory(scales.shape[1], offset is not None, qweight.shape[0], in_features, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]):
        x2 = x2.contiguous()  # the kernel reads rows with unit stride
    half = lambda t: None if t is None else t.to(torch.float16)  # noqa: E731 - no-op when fp16
    y = torch.ops.dbquant.dbgemm_cuda(x2, qweight, half(scales), half(offset),
                                      None if bias is None else bias.to(x.dtype),
                                      int(in_features), int(group_size))
    return y.reshape(*lead, y.shape[-1])


def shared_memory_bytes(groups: int, has_offset: bool, planes: int) -> int:
    """Shared memory one block of the GEMV needs: float16 scales [4 rows, G, k] and offsets
    [4 rows, G] (csrc/cuda/dbgemv.h ``dbgemv_smem_bytes``)."""
    return WARPS_PER_BLOCK * groups * 2 * (planes + (1 if has_offset else 0))


def check_shared_memory(groups: int, has_offset: bool, planes: int, in_features: int, group_size: int) -> None:
    """Refuse, before the op, a layer whose scales do not fit a block's shared memory.

    The binding checks the same limit, but on the H100 run of 2026-12-06 its refusal crashed the
    process (a segfault inside the op, cause not established: docs/RESULTS.md, GPU kernels), so the
    wrapper says it first, with the way out."""
    need = shared_memory_bytes(groups, has_offset, planes)
    if need > MAX_SHARED_BYTES:
        fail("dbgemm_cuda", f"G={groups} groups (in_features={in_features}, group_size={group_size}, {planes} planes"
                            f"{', offset' if has_offset else ''}) need {need} bytes of shared memory per block, over "
                            f"{MAX_SHARED_BYTES}; use a larger group size or the triton backend")
