"""Initialisation stage: quantize every planned linear from its weight (and optional statistics)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from dbquant.model.plan import LinearPlan
from dbquant.quant import fdb

METHODS = ("fdb", "rtn")


@torch.no_grad()
def init_weights(model: nn.Module, plan: list[LinearPlan], method: str = "fdb",
                 importance: dict[str, torch.Tensor] | None = None, iters: int = 8,
                 progress: bool = True) -> dict[str, fdb.DualBinaryWeight]:
    """Quantize each planned linear independently.

    Args:
        method: ``fdb`` (scale search + least-squares refinement) or ``rtn`` (min/max 2-bit).
        importance: optional ``{name: float32 [in_features]}`` per-channel error weights
            (``fdb`` only), e.g. from :func:`dbquant.calibration.input_second_moments`.
        iters: refinement iterations for ``fdb``.
    Returns:
        ``{name: DualBinaryWeight}`` in plan order.
    """
    if method not in METHODS:
        raise ValueError(f"unknown init method {method!r}; choose from {METHODS}")
    out = {}
    for p in tqdm(plan, desc=f"{method} init", unit="linear", disable=not progress):
        w = model.get_submodule(p.name).weight.detach().float()
        if method == "rtn":
            out[p.name] = fdb.quantize_rtn(w, p.layout.group_size, p.layout.planes, p.layout.scale_bits)
        else:
            h = None if importance is None else importance[p.name]
            out[p.name] = fdb.quantize_fdb(w, p.layout.group_size, h, p.layout.offset, iters, planes=p.layout.planes,
                                           scale_bits=p.layout.scale_bits)
    return out
