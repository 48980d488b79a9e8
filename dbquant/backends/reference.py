"""Pure-PyTorch reference kernels: the oracle every backend is tested against.

Slow on purpose (unpack, dequantize, dense matmul); fp32 math on CPU.
"""

from __future__ import annotations

import torch

from ..format import layout


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                   in_features: int) -> torch.Tensor:
    """Dense weight of a packed linear.

    Args:
        qweight: uint8 [2, N, Kp/8] (canonical planes, see ``dbquant.format.layout``).
        scales: float16/float32 [N, G, 2].
        offset: float16/float32 [N, G] or None.
        in_features: K <= Kp.
    Returns:
        float32 [N, K].
    """
    planes = layout.unpack_bits(qweight)
    return layout.dequantize(planes[0], planes[1], scales, offset, in_features)


def dbgemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with W the dequantized packed weight.

    Args:
        x: float [..., K] activations.
        qweight, scales, offset: the canonical packed tensors (see :func:`dequantize_ref`).
        bias: float [N] or None.
        in_features: K; group_size: g (implied by the shapes, checked here).
    Returns:
        [..., N] in x's dtype, computed in float32.
    """
    kp = qweight.shape[-1] * 8
    if kp != scales.shape[1] * group_size or x.shape[-1] != in_features or in_features > kp:
        raise ValueError(
            f"dbgemm_ref: x has K={x.shape[-1]}, in_features={in_features}, qweight holds {kp} "
            f"channels, scales {tuple(scales.shape)} with group_size={group_size}: inconsistent"
        )
    w = dequantize_ref(qweight, scales, offset, in_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
