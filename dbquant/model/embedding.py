"""Quantized tables in a model: the input embedding and the output projection.

Three inference modules over ``dbquant.format.embedding`` tables:

- :class:`QuantEmbedding` replaces the input embedding; a lookup dequantizes only the rows it
  gathers, so the dense table never exists in memory.
- :class:`QuantHead` replaces an output projection stored as its own table (int8 with one scale
  per row: the fast decoder's ``linear_int8`` / ``linear_w8a8`` input as stored; or float16).
- :class:`TiedHead` is the output projection of a tied model whose embedding is quantized: it
  holds no tensor of its own and projects with the embedding's table.

:class:`TablePlan` is one stored table (what ``quantization_config`` records, so a loader can
rebuild the same modules); :func:`quantize_tables` swaps them into a full-precision model and
:func:`empty_table_modules` into a skeleton before transformers loads the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DbquantError
from ..format import embedding as fmt
from ..format.embedding import TableLayout
from ..quant.table import quantize_table

KINDS = ("embedding", "head", "tied_head")


class StoredTable(nn.Module):
    """Buffers of one stored table (the state-dict names are the on-disk names)."""

    def __init__(self, layout: TableLayout, device=None):
        super().__init__()
        self.layout = layout
        for name, (shape, dt) in layout.tensor_specs().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self._buffers.items() if b is not None}

    def load_table(self, tensors: dict[str, torch.Tensor]) -> None:
        fmt.check_tensors(tensors, self.layout)
        for name, t in tensors.items():
            getattr(self, name).copy_(t)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, dim]: the dense table."""
        return fmt.dequantize(self.tensors(), self.layout)

    def dense(self) -> torch.Tensor:
        """The dense table, kept in memory and rebuilt only when a buffer changes (a projection
        reads every row each call; a plain attribute, not in the state dict)."""
        key = tuple((t.data_ptr(), getattr(t, "_version", 0)) for t in self.tensors().values())
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.dequantize())
            self.__dict__["_dense_cache"] = cached
        return cached[1]


class QuantEmbedding(StoredTable):
    """Input embedding over a stored table.

    Buffers: ``codes`` / ``code_scales`` (``dbquant.format.embedding``). Forward: int64 ids
    [...] -> float32 [..., dim], times ``embed_scale`` (Gemma's scaled embedding, kept as the
    float the replaced module had).
    """

    def __init__(self, layout: TableLayout, padding_idx: int | None = None, embed_scale: float = 1.0, device=None):
        super().__init__(layout, device)
        self.num_embeddings, self.embedding_dim = layout.rows, layout.dim
        self.padding_idx = padding_idx
        self.embed_scale = float(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = {n: t.index_select(0, flat) for n, t in self.tensors().items()}
        out = fmt.dequantize(rows, self.layout).reshape(*ids.shape, self.layout.dim)
        return out * self.embed_scale if self.embed_scale != 1.0 else out

    def extra_repr(self) -> str:
        return f"{self.layout.rows}, {self.layout.dim}, bits={self.layout.bits}, group_size={self.layout.group_size}"


class QuantHead(StoredTable):
    """Output projection over its own stored table: float [..., dim] -> float32 [..., rows]."""

    def __init__(self, layout: TableLayout, device=None):
        super().__init__(layout, device)
        self.in_features, self.out_features = layout.dim, layout.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dense())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.layout.bits}"


class TiedHead(nn.Module):
    """Output projection that reads the (quantized) input embedding's table; stores nothing."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # not a submodule: its buffers are saved once, under the embedding
        self.in_features, self.out_features = embedding.layout.dim, embedding.layout.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.embedding.dense())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the embedding"


def head_weight(head: nn.Module) -> torch.Tensor:
    """The dense weight an output projection computes with: float [out, in] (a table's, dequantized)."""
    if isinstance(head, TiedHead):
        return head.embedding.dense()
    if isinstance(head, StoredTable):
        return head.dense()
    return head.weight.detach()


def int8_rows(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(int8 [out, in] codes, float32 [out] scales)`` of an output projection stored as an 8- or 6-bit
    table with one scale per row (the ``linear_int8`` op's operands: the stored codes, 6-bit ones widened
    to int8 without changing a value); None for anything else."""
    table = head.embedding if isinstance(head, TiedHead) else head
    if not isinstance(table, StoredTable) or table.layout.bits not in (8, 6) or table.layout.groups != 1:
        return None
    codes = fmt.unpack_codes(table.tensors(), table.layout)[:, :table.layout.dim]  # 6-bit: widened, same values
    return codes.contiguous(), table.code_scales[:, 0].float().contiguous()


@dataclass(frozen=True)
class TablePlan:
    """One quantized table: module path, kind (``embedding``, ``head``, ``tied_head``), layout
    (None for a tied head, which stores nothing)."""

    name: str
    kind: str
    layout: TableLayout | None
    # An embedding's output multiplier (Gemma scales by sqrt(hidden)). Recorded at quantize time:
    # a loading skeleton's own buffer is on the meta device and cannot be read.
    embed_scale: float = 1.0

    def to_dict(self) -> dict:
        d = {"module": self.name, "kind": self.kind}
        if self.layout is not None:
            d.update(bits=self.layout.bits, group_size=self.layout.group_size)
        if self.embed_scale != 1.0:
            d["embed_scale"] = self.embed_scale
        return d

    @classmethod
    def from_dict(cls, d, model: nn.Module) -> "TablePlan":
        """A config entry checked against the model skeleton (sizes come from the model)."""
        if not isinstance(d, dict) or d.get("kind") not in KINDS or not isinstance(d.get("module"), str):
            raise DbquantError(f"quantization_config.tables entry {str(d)[:120]} is not "
                               f"{{module: str, kind: one of {list(KINDS)}, bits, group_size}}")
        try:
            mod = model.get_submodule(d["module"])
        except AttributeError:
            raise DbquantError(f"quantization_config.tables lists {d['module']!r}, which the model class "
                               f"{type(model).__name__} does not have") from None
        if d["kind"] == "tied_head":
            return cls(d["module"], "tied_head", None)
        rows, dim = _table_shape(mod, d["module"])
        scale = d.get("embed_scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise DbquantError(f"quantization_config.tables entry {d['module']!r}: embed_scale {scale!r} is not a "
                               "finite number")
        return cls(d["module"], d["kind"], TableLayout(rows, dim, d.get("bits"), d.get("group_size")), float(scale))


def _table_shape(mod: nn.Module, name: str) -> tuple[int, int]:
    """(rows, dim) of the table that replaces (or replaced) ``mod``."""
    if isinstance(mod, StoredTable):
        return mod.layout.rows, mod.layout.dim
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings, mod.embedding_dim
    if isinstance(mod, nn.Linear):
        if mod.bias is not None:
            raise DbquantError(f"{name} has a bias; a quantized output projection is stored without one")
        return mod.out_features, mod.in_features
    raise DbquantError(f"{name} is a {type(mod).__name__}; a stored table replaces an nn.Embedding or nn.Linear")


def table_modules(model: nn.Module) -> tuple[str | None, str | None]:
    """Module paths of the input embedding and the output projection (None where absent)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    return names.get(id(emb)), None if head is None else names.get(id(head))


def make_table_plan(model: nn.Module, embed_bits: int | None, embed_group: int | None,
                    head: str, head_packed: bool = False) -> list[TablePlan]:
    """The tables to store for ``--embed-bits`` / ``--head-bits``.

    Args:
        embed_bits: 8, 4, 16 or None (the embedding stays a dense float32 parameter).
        embed_group: channels per scale (None: a whole row for 8 and 6 bits, so a tied head feeds the
            int8 kernel as stored; 32 for 4 bits).
        head: ``auto`` (tied model with a quantized embedding: ``tied``; otherwise dense), ``tied``,
            ``8`` (int8, one scale per row), ``fp16`` or ``fp32`` (dense float32).
        head_packed: the output projection is a packed dual-binary linear (``--modules lm_head``);
            ``head`` must then be ``auto`` and stores nothing here.
    """
    emb_name, head_name = table_modules(model)
    tied = _is_tied(model)
    plan = []
    if embed_bits is not None:
        emb = model.get_submodule(emb_name)
        group = embed_group or (emb.embedding_dim if embed_bits in (8, 6) else 32)
        scale = getattr(emb, "embed_scale", 1.0)
        plan.append(TablePlan(emb_name, "embedding", TableLayout(emb.num_embeddings, emb.embedding_dim,
                                                                 embed_bits, min(group, emb.embedding_dim)),
                              float(scale.item() if isinstance(scale, torch.Tensor) else scale)))
    if head_packed:
        if head != "auto":
            raise DbquantError(f"--head-bits {head} and --modules lm_head both choose how the output projection is "
                               "stored; give one of them")
        return plan
    if head == "auto":
        head = "tied" if tied and embed_bits is not None else "fp32"
    if head == "tied":
        if not tied:
            raise DbquantError("--head-bits tied needs a model whose output projection is tied to its input "
                               "embedding (tie_word_embeddings: true); this one is untied")
        if embed_bits is not None:
            plan.append(TablePlan(head_name, "tied_head", None))
    elif head in ("8", "fp16"):
        rows, dim = _table_shape(model.get_submodule(head_name), head_name)
        plan.append(TablePlan(head_name, "head", TableLayout(rows, dim, 8 if head == "8" else 16, dim)))
    return plan


def _is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight


def untie(model: nn.Module) -> None:
    """Give the output projection its own weight and say so in the config (a stored table replaces the
    embedding's ``weight``, so the two can no longer share one)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    for cfg in {id(model.config): model.config,
                id(model.config.get_text_config()): model.config.get_text_config()}.values():
        cfg.tie_word_embeddings = False


def quantize_tables(model: nn.Module, plan: list[TablePlan]) -> None:
    """Replace the planned modules of a full-precision model by their quantized tables."""
    if not plan:
        return
    dense = {p.name: _dense_weight(model, p.name) for p in plan if p.layout is not None}
    untie(model)
    for p in plan:
        if p.layout is None:
            continue
        mod = _new_module(model, p, dense[p.name].device)
        mod.load_table(fmt.pack(*quantize_table(dense[p.name], p.layout), p.layout))
        _replace(model, p.name, mod)
    _link_tied(model, plan)


def empty_table_modules(model: nn.Module, plan: list[TablePlan]) -> None:
    """Replace the planned modules of a skeleton by empty tables (transformers then fills them)."""
    for p in plan:
        if p.layout is not None:
            old = model.get_submodule(p.name)
            dev = next(iter(old.parameters()), torch.empty(0)).device
            _replace(model, p.name, _new_module(model, p, dev))
    _link_tied(model, plan)


def _dense_weight(model: nn.Module, name: str) -> torch.Tensor:
    w = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(w, torch.Tensor):
        raise DbquantError(f"{name} holds no dense weight to quantize")
    return w.detach().float()


def _new_module(model: nn.Module, p: TablePlan, device) -> nn.Module:
    old = model.get_submodule(p.name)
    if p.kind == "embedding":
        return QuantEmbedding(p.layout, getattr(old, "padding_idx", None), p.embed_scale, device=device)
    return QuantHead(p.layout, device=device)


def _link_tied(model: nn.Module, plan: list[TablePlan]) -> None:
    for p in plan:
        if p.kind == "tied_head":
            emb = next((model.get_submodule(q.name) for q in plan if q.kind == "embedding"), None)
            if not isinstance(emb, QuantEmbedding):
                raise DbquantError(f"{p.name} is a tied head, but no quantized embedding is stored for it to read")
            _replace(model, p.name, TiedHead(emb))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
