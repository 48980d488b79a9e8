"""Module swapping: put packed linears where the plan says. No math, no I/O."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DbquantError
from ..quant.fdb import DualBinaryWeight
from .modules import PackedLinear
from .plan import LinearPlan


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _untie_if_needed(model: nn.Module, names: set[str]) -> None:
    """A packed lm_head can no longer share the input embedding's weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and any(model.get_submodule(n) is head for n in names):
        for cfg in {id(model.config): model.config,
                    id(model.config.get_text_config()): model.config.get_text_config()}.values():
            cfg.tie_word_embeddings = False


def empty_packed_modules(model: nn.Module, plan: list[LinearPlan], backend: str = "auto",
                         device: torch.device | str | None = None) -> None:
    """Replace each planned nn.Linear by an empty :class:`PackedLinear` of the same shape (for loading)."""
    _untie_if_needed(model, {p.name for p in plan})
    for p in plan:
        old = model.get_submodule(p.name)
        if not isinstance(old, nn.Linear):
            raise DbquantError(f"{p.name} is a {type(old).__name__}, expected an nn.Linear to hold packed weights")
        if (old.out_features, old.in_features) != (p.layout.out_features, p.layout.in_features):
            raise DbquantError(f"{p.name}: model has {old.out_features}x{old.in_features}, plan says "
                               f"{p.layout.out_features}x{p.layout.in_features}")
        dev = old.weight.device if device is None else device
        replace_module(model, p.name, PackedLinear(p.layout.in_features, p.layout.out_features, p.layout.group_size,
                                             bias=p.bias, offset=p.layout.offset, device=dev,
                                             dtype=old.weight.dtype, backend=backend,
                                             planes=p.layout.planes, scale_bits=p.layout.scale_bits))


def pack_into(model: nn.Module, weights: dict[str, DualBinaryWeight], backend: str = "auto") -> None:
    """Replace each nn.Linear named in ``weights`` by a :class:`PackedLinear` holding its planes."""
    _untie_if_needed(model, set(weights))
    for name, q in weights.items():
        old = model.get_submodule(name)
        replace_module(model, name, PackedLinear.from_weight(q, old.bias, backend=backend).to(old.weight.device))
