"""A quantized KV cache for stock transformers ``generate()`` (no patched transformers).

``QuantKVCache(config, spec)`` is a :class:`transformers.Cache` of :class:`QuantKVLayer`,
one per decoder layer; pass it as ``past_key_values=`` to ``model(...)`` or
``model.generate(...)``. Each layer holds

* ``packed_keys`` / ``packed_values``: the quantized past, packed dicts (codecs.py) with
  leading dims [B, H, n_groups], appended one whole group of ``spec.group`` tokens at a time;
* ``keys`` / ``values``: full-precision states [B, H, t, D] in the model's dtype: the
  most recent ``spec.residual`` tokens plus any incomplete group;
* ``sink_keys`` / ``sink_values``: exact copies [B, H, s, D] of the first ``spec.sink``
  tokens once their group is packed (attention sinks; see ``spec.DEFAULT_SINK``). Groups
  stay aligned to multiples of ``spec.group`` tokens: the sink tokens sit in group 0, where
  their rows are replaced by the group's other tokens' mean before quantizing (an outlier
  sink would otherwise stretch every channel's range) and overwritten with the exact copy
  when dequantized.

After every ``update`` the layer moves the oldest complete groups beyond the residual
window into the packed part. The prompt is treated like any other tokens: it is never
quantized wholesale (transformers' ``QuantizedCache`` quantizes the whole first chunk).
The states a forward pass attends to are ``dequantized past + full-precision part + the
new states``, so a token is used exactly in the step that produced it.

``make_cache(model_or_config, spec)`` builds any of the harness's caches (fp, VidKV,
KIVI, transformers' HQQ); ``cache_nbytes(cache)`` measures what one really holds.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    QuantizedCache,
    QuantizedLayer,
    get_layer_types_and_kwargs,
)
from transformers.utils import is_hqq_available

from ...errors import DbquantError
from .codecs import make_codec
from .spec import KVSpec, parse_kv


def _decoder_config(config):
    config = getattr(config, "config", config)  # a model or its config
    return config.get_text_config(decoder=True)


def head_dim_of(config) -> int:
    cfg = _decoder_config(config)
    d = getattr(cfg, "head_dim", None)
    return int(d) if d else cfg.hidden_size // cfg.num_attention_heads


# Attention types the packed cache serves. A sliding-window layer keeps every token like a full
# one; transformers' sliding mask (built from positions) hides what is outside the window, so
# the result is exact, and the tokens past the window cost their packed bytes only.
SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_layer_types(config, what: str) -> int:
    """Refuse models with layers this cache cannot serve; returns the decoder layer count."""
    cfg = _decoder_config(config)
    layer_types, _ = get_layer_types_and_kwargs(cfg)
    bad = sorted(set(layer_types) - set(SERVED_LAYER_TYPES))
    if bad:
        raise DbquantError(f"the {what} serves {' and '.join(SERVED_LAYER_TYPES)} layers; this {cfg.model_type} "
                           f"model has {', '.join(bad)} layers: use --kv fp")
    return cfg.num_hidden_layers


# ------------------------------------------------------------ packed-dict helpers

def _cat(a: dict | None, b: dict, offset: int) -> dict:
    """Append the groups of b to a (dim 2); STP side entries are appended with token positions shifted."""
    if a is None:
        return b
    out = {}
    for k, v in b.items():
        if k == "stp":
            prev = a.get("stp")
            v = dict(v, pos=v["pos"] + torch.tensor([[0], [offset]], dtype=v["pos"].dtype, device=v["pos"].device))
            out[k] = v if prev is None else {kk: torch.cat([prev[kk], v[kk]], dim=1 if kk == "pos" else 0)
                                             for kk in v}
        else:
            out[k] = torch.cat([a[k], v], dim=2)
    if "stp" in a and "stp" not in b:
        out["stp"] = a["stp"]
    return out


def _select_batch(q: dict | None, index: torch.Tensor) -> dict | None:
    """Rows ``index`` (int64 [B'], repeats allowed) of every packed tensor, STP entries remapped."""
    if q is None:
        return None
    out = {k: v.index_select(0, index.to(v.device)) for k, v in q.items() if k != "stp"}
    side = q.get("stp")
    if side is not None:
        pos = side["pos"].long()
        parts = [(new_b, (pos[0] == old_b).nonzero(as_tuple=True)[0]) for new_b, old_b in enumerate(index.tolist())]
        sel = torch.cat([e for _, e in parts])
        new_rows = torch.cat([torch.full_like(e, nb) for nb, e in parts])
        out["stp"] = {k: v.index_select(1 if k == "pos" else 0, sel) for k, v in side.items()}
        out["stp"]["pos"][0] = new_rows.to(side["pos"].dtype)
    return out


def _nbytes(q: dict | None) -> int:
    if q is None:
        return 0
    return sum(_nbytes(v) if isinstance(v, dict) else v.numel() * v.element_size() for v in q.values())


# ------------------------------------------------------------ the layer

class QuantKVLayer(DynamicLayer):
    """One decoder layer's cache: packed whole groups + a full-precision tail (see module docstring)."""

    is_croppable = False  # a crop into packed groups could not restore the exact states

    def __init__(self, spec: KVSpec, head_dim: int, protected: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.head_dim = spec, head_dim
        self.codec = make_codec(spec, head_dim)
        self.protected = protected  # bool [B, T_total] (STP) or None, shared by all layers
        self.packed_keys = self.packed_values = None
        self.n_packed = 0  # tokens held in packed groups
        self.cumulative_length = 0
        self.sink_keys = self.sink_values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] != self.head_dim:
            raise DbquantError(f"cache built for head_dim {self.head_dim}, got states of head_dim "
                               f"{key_states.shape[-1]}")
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, 0, self.head_dim)
        self.values = value_states.new_zeros(b, h, 0, self.head_dim)

    def dequantized(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The packed past as states [B, H, n_packed, D] in the cache dtype (None when empty)."""
        if self.packed_keys is None:
            return None, None
        k = self.codec.dequantize_keys(self.packed_keys).to(self.dtype)
        v = self.codec.dequantize_values(self.packed_values).to(self.dtype)
        if self.sink_keys is not None:
            s = self.sink_keys.shape[-2]
            k[..., :s, :], v[..., :s, :] = self.sink_keys, self.sink_values
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dk, dv = self.dequantized()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys = self.keys if dk is None else torch.cat([dk, self.keys], dim=-2)
        values = self.values if dv is None else torch.cat([dv, self.values], dim=-2)
        self._flush()
        return keys, values

    def _flush(self) -> None:
        """Pack the oldest whole groups that lie outside the residual window."""
        g = self.spec.group
        n = (self.keys.shape[-2] - self.spec.residual) // g * g
        if n <= 0:
            return
        start = self.n_packed
        prot = None
        if self.protected is not None:
            prot = self.protected[:, start:start + n].to(self.keys.device)
            if prot.shape[1] < n:  # tokens beyond the mask are not protected
                prot = torch.nn.functional.pad(prot, (0, n - prot.shape[1]), value=False)
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        if start == 0 and self.spec.sink:
            s = self.spec.sink
            self.sink_keys, self.sink_values = k[..., :s, :].clone(), v[..., :s, :].clone()
            k, v = _neutralise(k, s, self.spec.group), _neutralise(v, s, self.spec.group)
        qk = self.codec.quantize_keys(k)
        qv = self.codec.quantize_values(v, prot)
        self.packed_keys = _cat(self.packed_keys, qk, start)
        self.packed_values = _cat(self.packed_values, qv, start)
        self.n_packed += n
        # clone so the packed tokens' full-precision memory is really released
        self.keys = self.keys[..., n:, :].clone()
        self.values = self.values[..., n:, :].clone()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> dict:
        """Bytes held: {"packed", "residual" (full-precision tail and sink), "tokens_packed",
        "tokens_residual", "tokens_sink", "packed_keys", "packed_values"}."""
        fp = [t for t in (self.keys, self.values, self.sink_keys, self.sink_values) if t is not None]
        return {"packed": _nbytes(self.packed_keys) + _nbytes(self.packed_values),
                "residual": sum(t.numel() * t.element_size() for t in fp),
                "packed_keys": _nbytes(self.packed_keys), "packed_values": _nbytes(self.packed_values),
                "tokens_packed": self.n_packed,
                "tokens_residual": 0 if not self.is_initialized else self.keys.shape[-2],
                "tokens_sink": 0 if self.sink_keys is None else self.sink_keys.shape[-2]}

    def reset(self) -> None:
        super().reset()
        self.packed_keys = self.packed_values = None
        self.sink_keys = self.sink_values = None
        self.n_packed = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = abs(tokens_to_remove)
        if n > self.keys.shape[-2]:
            raise DbquantError(f"cannot crop {n} tokens from a quantized KV cache whose full-precision tail holds "
                               f"{self.keys.shape[-2]}: packed groups cannot be cut back exactly")
        super().crop(-n)
        self.cumulative_length -= n

    def _batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.index_select(0, index)
            self.sink_values = self.sink_values.index_select(0, index)
        self.packed_keys = _select_batch(self.packed_keys, index)
        self.packed_values = _select_batch(self.packed_values, index)
        if self.protected is not None:
            self.protected = self.protected.index_select(0, index.to(self.protected.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # exact: packed rows are moved, never re-quantized (no deferred lossy round trip)
        self._batch(beam_idx.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.keys.shape[0]
            self._batch(torch.arange(b, device=self.keys.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = torch.arange(self.keys.shape[0], device=self.keys.device)[indices]
            self._batch(idx)

    def offload(self):
        super().offload()
        self.sink_keys, self.sink_values = _to(self.sink_keys, "cpu"), _to(self.sink_values, "cpu")
        self.packed_keys = _to(self.packed_keys, "cpu")
        self.packed_values = _to(self.packed_values, "cpu")

    def prefetch(self):
        super().prefetch()
        self.sink_keys, self.sink_values = _to(self.sink_keys, self.device), _to(self.sink_values, self.device)
        self.packed_keys = _to(self.packed_keys, self.device)
        self.packed_values = _to(self.packed_values, self.device)


def _neutralise(x: torch.Tensor, s: int, g: int) -> torch.Tensor:
    """x [B, H, n, D] with the first ``s`` rows replaced by the mean of rows s..g-1 (group 0's others)."""
    x = x.clone()
    x[..., :s, :] = x[..., s:g, :].mean(-2, keepdim=True)
    return x


def _to(q, device):
    if q is None:
        return None
    if torch.is_tensor(q):
        return q.to(device, non_blocking=True)
    return {k: _to(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in q.items()}


class QuantKVCache(Cache):
    """dbquant's quantized KV cache (VidKV or KIVI-2 per ``spec``) for ``generate()`` / ``forward``.

    Args:
        config: the model's config (or the model); full and sliding-window attention layers are served.
        spec: a :class:`KVSpec` or a ``--kv`` spelling such as ``"1.5/1.58"``.
        protected: optional bool [B, T] (STP): tokens whose values get a refinement bit (VidKV with
            1.58-bit values only). Positions count from the first token given to the cache.
    """

    def __init__(self, config, spec: KVSpec | str = "1.5/1.58", protected: torch.Tensor | None = None, **overrides):
        spec = parse_kv(spec, **overrides) if isinstance(spec, str) else spec.check()
        if spec.method not in ("vidkv", "kivi"):
            raise DbquantError(f"QuantKVCache builds VidKV and KIVI caches; for {spec.name!r} use make_cache")
        n_layers = check_layer_types(config, f"{spec.name} KV cache")
        d = head_dim_of(config)
        if protected is not None:
            if spec.method != "vidkv" or spec.value_bits >= 2:
                raise DbquantError("semantic token protection needs a VidKV cache with 1.58-bit values")
            if protected.dtype != torch.bool or protected.dim() != 2:
                raise DbquantError(f"protected must be a bool tensor [batch, tokens], got {protected.dtype} "
                                   f"{tuple(protected.shape)}")
        self.spec = spec
        super().__init__(layers=[QuantKVLayer(spec, d, protected) for _ in range(n_layers)])


def make_cache(model_or_config, spec: KVSpec | str, protected: torch.Tensor | None = None) -> Cache:
    """The cache ``spec`` names, ready for ``past_key_values=`` (errors at construction, not at use)."""
    spec = parse_kv(spec) if isinstance(spec, str) else spec.check()
    config = _decoder_config(model_or_config)
    if spec.method == "fp":
        return DynamicCache(config=config)
    if spec.method == "hqq":
        check_layer_types(config, f"{spec.name} KV cache")
        if not is_hqq_available():
            raise DbquantError("the HQQ cache baseline needs the hqq package: `pip install hqq`")
        return QuantizedCache("hqq", config, nbits=int(spec.key_bits), residual_length=spec.residual)
    return QuantKVCache(config, spec, protected)


def cache_nbytes(cache: Cache) -> dict:
    """Bytes a cache really holds, summed over layers.

    Returns {"total", "quantized" (codes + scales + masks), "full_precision" (residual /
    unquantized states), "tokens" (cached sequence length), "tokens_quantized"}.
    """
    q = fp = tq = 0
    for layer in cache.layers:
        if isinstance(layer, QuantKVLayer):
            n = layer.nbytes()
            q += n["packed"]
            fp += n["residual"]
            tq = n["tokens_packed"]
        elif isinstance(layer, QuantizedLayer):
            for packed in (layer._quantized_keys, layer._quantized_values):
                if packed is not None:
                    tensor, meta = packed
                    q += tensor.numel() * tensor.element_size()
                    q += sum(v.numel() * v.element_size() for v in meta.values() if torch.is_tensor(v))
            if layer.keys is not None and layer.keys.dim() == 4:
                fp += layer.keys.numel() * layer.keys.element_size() * 2
            if layer._quantized_keys is not None:
                tq = layer.cumulative_length - (layer.keys.shape[-2] if layer.keys.dim() == 4 else 0)
        elif layer.keys is not None:
            fp += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return {"total": q + fp, "quantized": q, "full_precision": fp, "tokens": cache.get_seq_length(),
            "tokens_quantized": tq}


def fp16_bytes_per_token(config) -> int:
    """The fp16 cache's bytes per token: 2 bytes x (K and V) x layers x kv heads x head_dim."""
    cfg = _decoder_config(config)
    return 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim_of(cfg)
