"""Which modules of a model get quantized, and what that costs in bits.

A plan is decided from the model alone (no data): it is what ``--dry-run`` prints,
what calibration fills in, and what the checkpoint's ``quantization_config.modules``
records so a loader can rebuild the same packed modules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import DbquantError
from ..format.layout import FLOAT_SCALE_BITS, LinearLayout, check_group_size
from .modules import FakeQuantLinear, PackedLinear
from .vlm import vision_linears, vlm_family

# The decoder blocks are found from the model itself (find_block_list); this table is only
# for families where that search would pick the wrong list. model_type -> dotted path.
BLOCK_OVERRIDES: dict[str, str] = {}
# Families the layer-streaming path has been checked on (it reads shards by these paths).
DECODER_BLOCKS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
}
# What counts as a linear layer when looking for blocks: before, during and after calibration.
LINEAR_TYPES = (nn.Linear, Conv1D, FakeQuantLinear, PackedLinear)
MODULE_SETS = ("decoder", "lm_head", "vision")


@dataclass(frozen=True)
class LinearPlan:
    """One linear to quantize: its module path, its packed layout, whether it has a bias."""

    name: str
    layout: LinearLayout
    bias: bool


def block_path(model: nn.Module) -> str:
    """Dotted path of the decoder block list; for a VLM, its language model's (dbquant.model.vlm)."""
    row = vlm_family(model)  # raises for an unknown VLM family
    if row is not None:
        path = row.language_model + ".layers"
        if not isinstance(getattr(model.get_submodule(row.language_model), "layers", None), nn.ModuleList):
            raise DbquantError(f"{type(model).__name__}: {row.language_model} has no `layers` list; fix its "
                               "row in dbquant/model/vlm.py VLM_FAMILIES")
        return path
    model_type = getattr(model.config, "model_type", None)
    path = BLOCK_OVERRIDES.get(model_type) or find_block_list(model)
    _refuse_unsupported_layers(model, path)
    return path


def find_block_list(model: nn.Module) -> str:
    """Dotted path of the model's repeated decoder-block ``nn.ModuleList``, found from the model.

    Candidates are ModuleLists of one block class holding linear layers. Preferred, in order:
    a list whose class transformers names in ``model._no_split_modules`` (its decoder layer) and
    whose length is ``num_hidden_layers``; then any of that length; then the largest.
    """
    n_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) and len({type(b) for b in mod}) == 1):
            continue
        if any(isinstance(m, LINEAR_TYPES) for m in mod[0].modules()):
            rank = (type(mod[0]).__name__ in no_split and len(mod) == n_layers, len(mod) == n_layers,
                    sum(p.numel() for p in mod.parameters()))
            found.append((rank, name))
    if not found:
        raise DbquantError(
            f"unsupported architecture {getattr(model.config, 'model_type', None)!r} ({type(model).__name__}): "
            "no repeated list of decoder blocks holding linear layers was found; if its blocks live "
            "elsewhere, add the path to BLOCK_OVERRIDES in dbquant/model/plan.py")
    return max(found)[1]


def _refuse_unsupported_layers(model: nn.Module, path: str) -> None:
    """GPT-2-style ``Conv1D`` (a linear with a transposed weight) is not packed: refuse it by name."""
    for name, mod in model.get_submodule(path).named_modules():
        if isinstance(mod, Conv1D):
            raise DbquantError(
                f"unsupported layer type {type(mod).__module__}.{type(mod).__name__} at {path}.{name} "
                f"({getattr(model.config, 'model_type', None)!r}): dbquant packs nn.Linear layers, and this "
                "family (GPT-2 style) stores its projections as Conv1D with a transposed weight")


def describe_blocks(model: nn.Module) -> str:
    """One line for ``--dry-run``: where the decoder blocks are and what they hold."""
    path = block_path(model)
    blocks = model.get_submodule(path)
    linears = [n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)]
    return (f"decoder blocks: {path} ({len(blocks)} x {type(blocks[0]).__name__}; linears per block: "
            f"{', '.join(linears)})")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks; ``DbquantError`` for an unknown architecture."""
    return model.get_submodule(block_path(model))


def make_plan(model: nn.Module, group_size: int = 64, offset: bool = False,
              modules: tuple[str, ...] = ("decoder",), scale_bits: int = FLOAT_SCALE_BITS) -> list[LinearPlan]:
    """List the linears to quantize, in model order.

    Args:
        modules: any of ``decoder`` (every nn.Linear in the decoder blocks; a VLM's language
            model's), ``lm_head`` (the output projection; unties it from the input embeddings
            if tied) and ``vision`` (a VLM's vision tower and projector linears).
    """
    check_group_size(group_size)
    unknown = set(modules) - set(MODULE_SETS)
    if unknown or not modules:
        raise DbquantError(f"unknown module set(s) {sorted(unknown) or modules}; choose from {MODULE_SETS}")
    blocks_path = block_path(model)  # raises for unknown architectures
    wanted: set[str] = set()
    if "decoder" in modules:
        wanted |= {n for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.startswith(blocks_path + ".")}
    if "lm_head" in modules:
        head = model.get_output_embeddings()
        wanted |= {n for n, m in model.named_modules() if m is head}
    if "vision" in modules:
        wanted |= set(vision_linears(model))
    plan = []
    for name, mod in model.named_modules():
        if name in wanted:
            if not isinstance(mod, nn.Linear):
                raise DbquantError(f"{name} is a {type(mod).__name__}, not an nn.Linear; it cannot be quantized")
            lay = LinearLayout(mod.out_features, mod.in_features, group_size, offset, scale_bits=scale_bits)
            plan.append(LinearPlan(name, lay, mod.bias is not None))
    return plan


def bits_summary(plan: list[LinearPlan], model: nn.Module, tables: tuple = ()) -> dict:
    """Effective bits per weight over the quantized matrices and over the whole checkpoint.

    ``bpw`` counts planes (padding included) and every scale/offset of the planned
    linears over their weight count. ``checkpoint_bpw`` adds the stored ``tables``
    (:class:`dbquant.model.embedding.TablePlan`: a quantized embedding / output projection, at
    their layout's bits) and every other parameter at its dtype's width (tied weights once)
    over all weights. Works on the full-precision model (planned weights are skipped) and on
    the packed one (their buffers are not parameters).
    """
    qbits = sum(p.layout.storage_bits() for p in plan)
    qweights = sum(p.layout.in_features * p.layout.out_features for p in plan)
    stored = [t.layout for t in tables if t.layout is not None]
    tbits = sum(lay.storage_bits() for lay in stored)
    tweights = sum(lay.rows * lay.dim for lay in stored)
    planned = {p.name + ".weight" for p in plan} | {t.name + ".weight" for t in tables if t.layout is not None}
    dense = [t for n, t in model.named_parameters() if n not in planned]
    dense_bits = sum(t.numel() * t.element_size() * 8 for t in dense)
    all_weights = qweights + tweights + sum(t.numel() for t in dense)
    return {
        "bpw": qbits / qweights if qweights else None,
        "quantized_weights": qweights,
        "checkpoint_bpw": (qbits + tbits + dense_bits) / all_weights,
        "checkpoint_bytes": (qbits + tbits + dense_bits) // 8,
    }


def layer_rows(plan: list[LinearPlan]) -> dict[str, dict]:
    """``quantization_config.layers`` (format version 3) of a plan: each module's own k, group
    size, offset and scale width, ``{name: {"planes": k, "group_size": g, "offset": bool, "scale_bits": b}}``."""
    return {p.name: {"planes": p.layout.planes, "group_size": p.layout.group_size, "offset": p.layout.offset,
                     "scale_bits": p.layout.scale_bits} for p in plan}
