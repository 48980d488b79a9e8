"""Activation statistics of the linears to quantize, gathered with forward hooks."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def input_second_moments(model: nn.Module, names: list[str], batches: torch.Tensor,
                         batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """E[x_k^2] over all calibration tokens of each named linear's input.

    Args:
        names: module paths of nn.Linear layers.
        batches: int64 [S, T] token ids.
    Returns:
        ``{name: float32 [in_features]}``. A channel's mean square is its weight in the
        output-error proxy sum_k E[x_k^2] (w_k - w_hat_k)^2 (the diagonal of X^T X / n).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, inp, _out):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for i in tqdm(range(0, len(batches), batch_size), desc="activation stats", disable=not progress):
            model(batches[i:i + batch_size].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}
