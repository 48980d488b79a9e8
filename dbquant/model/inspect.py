"""Per-layer statistics of a loaded dbquant checkpoint (what ``dbquant inspect`` prints)."""

from __future__ import annotations

from torch import nn

from dbquant.format.layout import unpack_bits
from dbquant.model.modules import PackedLinear
from dbquant.model.plan import LinearPlan, bits_summary


def layer_stats(model: nn.Module, source: nn.Module | None = None) -> list[dict]:
    """One row per :class:`PackedLinear` of ``model``, in module order.

    Each row: ``module`` (path), ``shape`` ([out, in]), ``group`` (group size), ``bpw`` (bits
    per weight of its layout), ``density_b1`` / ``density_b2`` (fraction of ones in each
    binary plane, over the real weights: padded channels hold 0 bits), and, when the
    full-precision ``source`` model is given, ``rel_error`` = ||W - W_q||^2 / ||W||^2 of the
    dequantized weight against the source's float32 weight.
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        # padded channels hold 0 bits, so ones per real weight = total ones / (N * K)
        ones = unpack_bits(m.qweight).sum(dim=(1, 2)).double() / (m.out_features * m.in_features)
        row = {"module": name, "shape": [m.out_features, m.in_features], "group": m.group_size,
               "bpw": m.layout.bits_per_weight(), "density_b1": ones[0].item(), "density_b2": ones[1].item()}
        if source is not None:
            w = source.get_submodule(name).weight.float()
            row["rel_error"] = ((w - m.dequantize()).square().sum() / w.square().sum()).item()
        rows.append(row)
    return rows


def stats_summary(model: nn.Module, rows: list[dict]) -> dict:
    """The effective-bits summary (:func:`dbquant.model.plan.bits_summary`) of the rows' linears."""
    plan = [LinearPlan(r["module"], model.get_submodule(r["module"]).layout, False) for r in rows]
    return bits_summary(plan, model)
