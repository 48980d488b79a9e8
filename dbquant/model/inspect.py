"""Per-layer statistics of a loaded dbquant checkpoint (what ``dbquant inspect`` prints)."""

from __future__ import annotations

import json

import torch
from torch import nn

from dbquant.errors import DbquantError
from dbquant.format.layout import unpack_bits
from dbquant.model.checkpoint import is_dbquant_dir
from dbquant.model.modules import PackedLinear
from dbquant.model.plan import LinearPlan, bits_summary
from dbquant.model.sources import resolve_model
from dbquant.model.vlm import auto_model_class


def load_source(name: str) -> nn.Module:
    """The full-precision model ``inspect --source`` compares against (float32, no tokenizer needed).

    Refuses a dbquant checkpoint (its linears hold no dense weight to compare with).
    """
    folder = resolve_model(name)
    if is_dbquant_dir(folder):
        raise DbquantError(f"--source {name} is a dbquant checkpoint; pass the full-precision model it was "
                           "quantized from")
    config = json.loads((folder / "config.json").read_text())
    try:
        model = auto_model_class(config).from_pretrained(folder, dtype=torch.float32)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DbquantError(f"cannot load --source {name}: {type(e).__name__}: {first[:300]}") from None
    return model.eval()


def _source_weight(source: nn.Module, name: str, m: PackedLinear) -> torch.Tensor:
    """float32 [out, in]: the dense weight of ``name`` in ``source``; DbquantError when it has none that fits."""
    try:
        w = source.get_submodule(name).weight
    except AttributeError:
        raise DbquantError(f"--source has no linear {name} (a different model than the checkpoint's?)") from None
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (m.out_features, m.in_features):
        shape = list(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise DbquantError(f"--source {name}.weight is {shape}, the checkpoint's is "
                           f"{[m.out_features, m.in_features]}: not the model this checkpoint was quantized from")
    return w.detach().float()


def layer_stats(model: nn.Module, source: nn.Module | None = None) -> list[dict]:
    """One row per :class:`PackedLinear` of ``model``, in module order.

    Each row: ``module`` (path), ``shape`` ([out, in]), ``group`` (group size), ``planes`` (k),
    ``bpw`` (bits per weight of its layout), ``density`` (per plane, the fraction of ones over
    the real weights: padded channels hold 0 bits; ``density_b1`` / ``density_b2`` are its
    first two entries, None past k), and, when the
    full-precision ``source`` model is given, ``rel_error`` = ||W - W_q||^2 / ||W||^2 of the
    dequantized weight against the source's float32 weight.
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        # padded channels hold 0 bits, so ones per real weight = total ones / (N * K)
        ones = unpack_bits(m.qweight).sum(dim=(1, 2)).double() / (m.out_features * m.in_features)
        dens = ones.tolist()
        row = {"module": name, "shape": [m.out_features, m.in_features], "group": m.group_size,
               "planes": m.planes, "scale_bits": m.scale_bits, "offset": m.offset is not None,
               "bpw": m.layout.bits_per_weight(),
               "density": dens, "density_b1": dens[0], "density_b2": dens[1] if len(dens) > 1 else None}
        if source is not None:
            w = _source_weight(source, name, m)
            row["rel_error"] = ((w - m.dequantize().float()).square().sum() / w.square().sum().clamp_min(1e-30)).item()
        rows.append(row)
    return rows


def table_stats(model: nn.Module) -> list[dict]:
    """One row per quantized table (input embedding, output projection) of a loaded checkpoint:
    ``module``, ``kind``, ``shape`` ([rows, dim]), ``bits``, ``group``, ``bpw`` (None for a tied head)."""
    out = []
    for t in model.config.quantization_config.table_plan(model):
        lay = t.layout
        out.append({"module": t.name, "kind": t.kind, "shape": None if lay is None else [lay.rows, lay.dim],
                    "bits": None if lay is None else lay.bits, "group": None if lay is None else lay.group_size,
                    "bpw": None if lay is None else lay.bits_per_weight()})
    return out


def stats_summary(model: nn.Module, rows: list[dict]) -> dict:
    """The effective-bits summary (:func:`dbquant.model.plan.bits_summary`) of the rows' linears
    and the checkpoint's quantized tables."""
    plan = [LinearPlan(r["module"], model.get_submodule(r["module"]).layout, False) for r in rows]
    return bits_summary(plan, model, tuple(model.config.quantization_config.table_plan(model)))
