"""transformers integration: ``quant_method: "dbquant"`` in a model's config.

Registered on ``import dbquant``. Without the registration transformers would only log
an unknown ``quant_method`` and load the model *unquantized* (random weights in place
of the packed ones), so registration is not optional and happens at import.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._version import __version__
from ..backends.registry import BACKENDS
from ..errors import DbquantError
from ..format import layout
from ..format.embedding import TABLE_VERSION
from ..format.files import METADATA_KEY, check_claims, validate_files
from ..format.layout import LinearLayout
from .convert import empty_packed_modules
from .embedding import TablePlan, empty_table_modules
from .plan import LinearPlan
from .vlm import is_vlm

QUANT_METHOD = "dbquant"


class DbquantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a dbquant checkpoint (``config.json``).

    Args:
        modules: module paths of the packed linears.
        group_size: g; offset: whether each group stores a beta (the defaults of every module).
        layers: format version 2: module path -> ``{"planes": k, "group_size": g, "offset": bool}``,
            that module's own layout (any key left out takes the default above; k defaults to 2);
            version 3 adds ``"scale_bits"`` (16 or 8; 16 when left out). Version 1 has none: every
            module is k = 2 at ``group_size``.
        method: how the weights were obtained (``fdb``, ``rtn``, ...); informational.
        format / format_version: the packed format (``dbquant.format.layout``).
        bpw: effective-bits summary recorded at quantize time; informational.
        backend: kernel backend for the packed linears (``auto`` by default).
        tables: quantized input embedding / output projection (:class:`dbquant.model.embedding.TablePlan`
            dicts: ``module``, ``kind``, ``bits``, ``group_size``); they need ``format_version`` 2.
    """

    def __init__(self, modules: list[str] | None = None, group_size: int = 64, offset: bool = False,
                 method: str = "fdb", format: str = layout.FORMAT_NAME,
                 format_version: int = layout.FORMAT_VERSION, bpw: dict | None = None,
                 dbquant_version: str = __version__, backend: str = "auto", tables: list[dict] | None = None,
                 layers: dict | None = None,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        if modules is not None and (not isinstance(modules, (list, tuple))
                                    or not all(isinstance(m, str) for m in modules)):
            raise DbquantError(f"quantization_config.modules must be a list of module paths, got {str(modules)[:120]}")
        if not isinstance(offset, bool):
            raise DbquantError(f"quantization_config.offset must be true or false, got {offset!r}")
        self.modules = list(modules or [])
        self.group_size = group_size
        self.offset = bool(offset)
        self.method = method
        self.format = format
        self.format_version = format_version
        self.bpw = bpw
        self.dbquant_version = dbquant_version
        self.backend = backend
        if tables is not None and not isinstance(tables, (list, tuple)):
            raise DbquantError(f"quantization_config.tables must be a list, got {str(tables)[:120]}")
        self.tables = list(tables or [])
        if layers is not None and not isinstance(layers, dict):
            raise DbquantError(f"quantization_config.layers must be an object, got {str(layers)[:120]}")
        self.layers = dict(layers or {})
        self.post_init()
        if backend != "auto" and backend not in BACKENDS:
            raise DbquantError(f"quantization_config.backend {backend!r} is unknown; choose auto or one of {BACKENDS}")

    def post_init(self):
        if self.format != layout.FORMAT_NAME:
            raise DbquantError(f"checkpoint format {self.format!r} is not {layout.FORMAT_NAME!r}")
        layout.check_version(self.format_version)
        layout.check_group_size(self.group_size)
        if self.tables and int(self.format_version) < TABLE_VERSION:
            raise DbquantError(f"quantization_config lists quantized tables {[t.get('module') for t in self.tables]} "
                               f"but says format_version {self.format_version}; tables need version {TABLE_VERSION}")
        self._check_layers()

    def _check_layers(self) -> None:
        """``layers`` is version 2's: an object of listed modules, each with valid k, g and offset."""
        if not isinstance(self.layers, dict):
            raise DbquantError(f"quantization_config.layers must be an object, got {str(self.layers)[:120]}")
        if self.layers and int(self.format_version) < 2:
            raise DbquantError(f"quantization_config.layers needs format_version >= 2, the config says "
                               f"{self.format_version!r}; the config is inconsistent — re-quantize")
        listed = set(self.modules)
        for name, row in self.layers.items():
            if name not in listed:
                raise DbquantError(f"quantization_config.layers names {name!r}, which quantization_config.modules "
                                   "does not list; the config is inconsistent — re-quantize")
            if not isinstance(row, dict) or set(row) - {"planes", "group_size", "offset", "scale_bits"}:
                raise DbquantError(f"quantization_config.layers[{name!r}] = {str(row)[:120]} is not an object of "
                                   "planes/group_size/offset/scale_bits")
            if "scale_bits" in row and int(self.format_version) < layout.SCALE_BITS_VERSION:
                raise DbquantError(f"quantization_config.layers[{name!r}] gives scale_bits, which needs "
                                   f"format_version >= {layout.SCALE_BITS_VERSION}; the config says "
                                   f"{self.format_version!r} — re-quantize")
            layout.check_scale_bits(row.get("scale_bits", layout.FLOAT_SCALE_BITS))
            layout.check_planes(row.get("planes", layout.PLANES))
            layout.check_group_size(row.get("group_size", self.group_size))
            if not isinstance(row.get("offset", False), bool):
                raise DbquantError(f"quantization_config.layers[{name!r}].offset must be true or false, "
                                   f"got {row['offset']!r}")

    def layout_of(self, name: str, out_features: int, in_features: int) -> LinearLayout:
        """The packed layout of module ``name`` (its ``layers`` row over the defaults)."""
        row = self.layers.get(name, {})
        return LinearLayout(out_features, in_features, row.get("group_size", self.group_size),
                            row.get("offset", self.offset), row.get("planes", layout.PLANES),
                            row.get("scale_bits", layout.FLOAT_SCALE_BITS))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["quant_method"] = QUANT_METHOD
        return d

    def plan(self, model: torch.nn.Module) -> list[LinearPlan]:
        """Rebuild the quantization plan against a (meta) model skeleton."""
        out = []
        for name in self.modules:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise DbquantError(f"checkpoint lists module {name!r} that the model class "
                                   f"{type(model).__name__} does not have") from None
            if not isinstance(mod, torch.nn.Linear):
                raise DbquantError(f"checkpoint lists {name!r} but it is a {type(mod).__name__}, not a linear")
            lay = self.layout_of(name, mod.out_features, mod.in_features)
            out.append(LinearPlan(name, lay, mod.bias is not None))
        return out

    def table_plan(self, model: torch.nn.Module) -> list[TablePlan]:
        """The stored tables, checked against a (meta) model skeleton."""
        return [TablePlan.from_dict(d, model) for d in self.tables]


class DbquantHfQuantizer(HfQuantizer):
    """Builds :class:`dbquant.model.modules.PackedLinear` modules before transformers loads the weights."""

    requires_calibration = True  # only pre-quantized checkpoints: quantizing is `dbquant quantize`
    quantization_config: DbquantConfig

    def update_dtype(self, dtype):
        # fp32 by default: half-precision math is ~100x slower on CPUs without native fp16.
        return torch.float32 if dtype is None else dtype

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs):
        """Swap in the packed modules, after checking config and files agree both ways.

        transformers would otherwise load a disagreeing checkpoint silently: an unlisted packed
        module's ``weight`` initialised at random, an offset dropped, a dense tensor missing.
        """
        plan = self.quantization_config.plan(model)
        tables = self.quantization_config.table_plan(model)
        entries = None
        if checkpoint_files:
            names = disk_names(model, [p.name for p in plan] + [t.name for t in tables])
            layouts = {names.get(p.name, p.name): p.layout for p in plan}
            stored = {names.get(t.name, t.name): t.layout for t in tables if t.layout is not None}
            # files -> config: missing/truncated/mis-shaped packed tensors and tables, header facts that differ
            entries = validate_files(checkpoint_files, {**layouts, **stored}, format_metadata(self.quantization_config))
            # config -> files: packed tensors nobody claims, offsets the config does not expect
            check_claims(entries, layouts, native={k.rpartition(".")[2] for k in model.state_dict()})
        empty_packed_modules(model, plan, backend=self.quantization_config.backend)
        empty_table_modules(model, tables)
        if entries is not None:
            check_dense_present(model, entries)
        return model

    def get_state_dict_and_metadata(self, model):
        return None, {METADATA_KEY: json.dumps(format_metadata(self.quantization_config))}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def disk_names(model: PreTrainedModel, names: list[str]) -> dict[str, str]:
    """Module path -> the name prefix ``save_pretrained`` writes its tensors under.

    transformers 5 renames some families' keys on save back to their legacy layout (and
    forward again on load); only VLMs are affected among the families dbquant supports.
    """
    if not is_vlm(model.config):
        return {}
    out = {}
    for n in names:  # one key at a time: the reverted dict does not keep key order
        (saved,) = revert_weight_conversion(model, {n + ".weight": torch.empty(0, device="meta")})
        out[n] = saved.removesuffix(".weight")
    return out


def check_dense_present(model: PreTrainedModel, entries: dict[str, dict]) -> None:
    """Refuse files whose tensors are not exactly the ones the (packed) model holds.

    A missing tensor would be initialised at random by transformers, an extra one dropped
    with a log line; both mean config and files disagree. ``model``: the skeleton with packed
    modules in place; ``entries``: tensor name -> header entry of every checkpoint file.
    Tied weights may be absent; keys the model class lets go missing/unexpected are exempt.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    keys = list(model.state_dict())
    saved = _saved_names(model, keys)
    ignore_missing = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    ignore_extra = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    wanted = _saved_names(model, [k for k in keys if k not in tied and not any(p.search(k) for p in ignore_missing)])
    missing = sorted(wanted - set(entries))
    if missing:
        raise DbquantError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:4]}; "
                           "transformers would initialise them at random. The files are incomplete or "
                           "config.json does not belong to them — re-copy or re-quantize the checkpoint")
    if not is_vlm(model.config):  # names are the state-dict names: shapes must agree too (else random init)
        sd = model.state_dict()
        for k in sorted(wanted):
            if tuple(entries[k]["shape"]) != tuple(sd[k].shape):
                raise DbquantError(f"checkpoint tensor {k} has shape {entries[k]['shape']} but the model built from "
                                   f"config.json needs {list(sd[k].shape)}; the config does not belong to these files")
    extra = sorted(k for k in set(entries) - saved if not any(p.search(k) for p in ignore_extra))
    if extra:
        raise DbquantError(f"checkpoint holds {len(extra)} tensor(s) the model has no place for, e.g. {extra[:4]}; "
                           "transformers would drop them. config.json does not belong to these files")


def _saved_names(model: PreTrainedModel, keys: list[str]) -> set[str]:
    """The names ``save_pretrained`` writes ``keys`` under (VLMs: their legacy layout)."""
    if not is_vlm(model.config):
        return set(keys)
    return set(revert_weight_conversion(model, {k: torch.empty(0, device="meta") for k in keys}))


def format_metadata(cfg: DbquantConfig) -> dict:
    """The facts written into every safetensors header (a file describes itself)."""
    return {"format": cfg.format, "format_version": cfg.format_version, "group_size": cfg.group_size,
            "offset": cfg.offset, "bit_order": layout.BIT_ORDER, "dbquant_version": __version__}


def register() -> None:
    """Register ``quant_method: "dbquant"`` with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DbquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DbquantHfQuantizer)


def attach(model: PreTrainedModel, cfg: DbquantConfig) -> None:
    """Mark a freshly packed model as a dbquant model so ``save_pretrained`` writes our metadata."""
    model.config.quantization_config = cfg
    model.hf_quantizer = DbquantHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
