"""A lean decoder for Llama-family models: what `dbquant generate` and `bench --e2e` run.

Hugging Face's ``generate()`` spends most of a small model's decode step in Python and
framework code (cache objects, masks, hooks, ~40 module calls per layer). For decoding,
this module rebuilds the same network from the loaded model's own tensors as a short
straight-line step (gpt-fast style): a preallocated KV cache, q/k/v and gate/up fused
into one kernel call each, a fused C++ RMSNorm and ``F.scaled_dot_product_attention``. Packed
layers call the C++ kernel directly on their load-time repacked weights. When every
projection of every layer is such a fused packed weight (a dbquant checkpoint on the CPU),
a one-token step runs each whole decoder layer as one C++ call
(the registry's ``decode_layer`` op on the ``cpu`` backend: norms, kernels, RoPE, cache append,
attention and the gated MLP), since a small model's step is otherwise mostly framework overhead. The
native ops (``decode_layer``, ``rms_norm``, ``linear_int8``, ``linear_w8a8``) are taken from
``dbquant.backends.registry`` once, at construction; per token only their ``run`` is called.

Supported (:data:`SUPPORTED`, dense or with dbquant ``PackedLinear`` layers): the Llama pattern
(pre-norm RMSNorm, rotate-half RoPE, a gated MLP) plus the switches its relatives need:
Phi-3's pre-fused qkv / gate_up projections,
Gemma's (1 + w) RMSNorm (folded into the weight here), SiLU or GELU-tanh, q/k norms per head
(Qwen3, Gemma-3) or over the whole projection (OLMo-2), Gemma-2/3 sandwich norms and OLMo-2's
post-only norms, sliding-window attention per layer, attention and final logit soft-capping
(Gemma-2), the attention module's own scaling (Gemma's query_pre_attn_scalar, Granite's
attention_multiplier), Granite's embedding / residual / logits multipliers, scaled embeddings
(done by the model's own embedding module) and per-layer-type RoPE tables (Gemma-3), with any
RoPE scaling the model's own ``rotary_emb`` implements. Anything else raises a clear error
(:func:`check_supported`) and callers fall back to ``model.generate``. Logits match the HF
forward to float32 rounding and greedy tokens equal HF ``generate()`` (``tests/test_decode.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import cpu as cpu_backend
from ..backends import registry
from ..backends.hugepages import into_huge_pages, zeros_in_huge_pages
from ..backends.t16 import CpuWeight, DecodeLayerWeights, Projection, widen
from ..errors import DbquantError
from ..model.embedding import QuantEmbedding, head_weight, int8_rows
from ..model.modules import PackedLinear
from .kv.packed import PackedKVCache, check_packable
from .kv.spec import KVSpec, parse_kv

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3")
# Where a family's decoder layer keeps its norms: "pre" (input_layernorm before attention,
# post_attention_layernorm before the MLP), "sandwich" (Gemma-2/3: also post_attention_layernorm
# after attention, pre_ / post_feedforward_layernorm around the MLP), "post" (OLMo-2:
# post_attention_layernorm and post_feedforward_layernorm after each branch, no pre-norms).
NORM_LAYOUT = {"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "post"}
ONE_PLUS_W = ("gemma", "gemma2", "gemma3_text")  # RMSNorm scales by (1 + w)
# config activation name -> the decoder's ("silu" or "gelu_tanh", the C++ op's names)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# --lm-head-dtype spellings -> FastDecoder's lm_head_dtype
LM_HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "w8a8": "w8a8"}
# The float KV cache's storage (FastDecoder's cache_dtype; "auto" picks one): float16 halves what
# attention reads a step.
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
CACHE_DTYPE_CHOICES = ("auto", *CACHE_DTYPES)


def check_cache_dtype(name: str) -> str:
    """``name`` if it is one of :data:`CACHE_DTYPE_CHOICES`, else a DbquantError naming them."""
    if name not in CACHE_DTYPE_CHOICES:
        raise DbquantError(f"unknown cache dtype {name!r}; choose from {CACHE_DTYPE_CHOICES}")
    return name


@dataclass
class DecodeStats:
    """Timings of one :meth:`FastDecoder.generate` call (seconds, tokens)."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    batch: int = 1
    per_step_s: list[float] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        """Decode throughput: tokens after the first new one (which prefill produces)."""
        return self.batch * max(self.new_tokens - 1, 0) / self.decode_s if self.decode_s else float("nan")


class _Proj:
    """One or more linears of the same input, run as one kernel call when possible.

    ``parts``: nn.Linear or PackedLinear modules (same in_features). Dense parts are
    concatenated into one float32 weight; packed parts using the CPU kernel are concatenated
    tile-wise (every part's out_features a multiple of 16; parts of unequal k, group size or
    offset use are first widened to the largest k, the smallest group size and an offset if any
    has one — ``t16.widen``, the same weights — which needs the smallest g to divide the others);
    anything else is called module by module.
    """

    def __init__(self, parts: list[nn.Module], backend: str = "auto", gemm: str = "fp32"):
        self.gemm = gemm  # packed parts above LUT_MAX_ROWS rows: cpu_backend.GEMM_DTYPES, resolved
        self.sizes = [m.out_features for m in parts]
        self.dense = None
        self.packed = None
        self.modules = None
        # The fused call's bias: float32 [sum N], zeros for parts without one (None if none has one).
        biases = [m.bias for m in parts]
        known = next((b for b in biases if b is not None), None)
        self.bias = None if known is None else torch.cat(
            [b.detach().float() if b is not None else known.new_zeros(n, dtype=torch.float32)
             for b, n in zip(biases, self.sizes)])
        if all(isinstance(m, nn.Linear) for m in parts):
            self.dense = torch.cat([m.weight.detach().float() for m in parts])  # [sum N, K]
            return
        if all(isinstance(m, PackedLinear) for m in parts) and self._cpu_fusable(parts, backend):

            ws = [cpu_backend.prepare_cpu(m.qweight, m.float_scales(), m.offset, m.in_features, m.group_size)
                  for m in parts]
            k, g = max(w.planes_count for w in ws), min(w.group_size for w in ws)
            off = any(w.offset is not None for w in ws)
            if any((w.planes_count, w.group_size, w.offset is not None) != (k, g, off) for w in ws):
                ws = [widen(w, k, g, off) for w in ws]
            offs = [w.offset for w in ws]
            self.packed = CpuWeight(
                planes=torch.cat([w.planes for w in ws]), scales=torch.cat([w.scales for w in ws]),
                offset=None if offs[0] is None else torch.cat(offs), out_features=sum(self.sizes),
                in_features=ws[0].in_features, group_size=ws[0].group_size)
            return
        self.modules = parts

    @staticmethod
    def _cpu_fusable(parts, backend: str) -> bool:

        if backend not in ("auto", "cpu") or not registry.available("cpu"):
            return False
        if any(p.qweight.device.type != "cpu" for p in parts):
            return False
        g = min(p.group_size for p in parts)  # tiles concatenate only when no part ends in a partial tile
        return all(p.out_features % cpu_backend.TILE == 0 and p.group_size % g == 0 for p in parts)

    def __call__(self, x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """x: float32 [M, K] contiguous -> float32 [M, sum N_i] (the parts side by side). ``rows``: take
        the path of that many rows (a prefill's last layer, trimmed to its last position, keeps the
        prefill's GEMM and its numerics); M by default."""
        if self.dense is not None:
            return F.linear(x, self.dense, self.bias)
        if self.packed is not None:

            w = self.packed
            if (rows or x.shape[0]) <= cpu_backend.LUT_MAX_ROWS:  # decode: straight to the op (checked at build)
                return torch.ops.dbquant.dbgemm_cpu(x, w.planes, w.scales, w.offset, self.bias,
                                                    w.out_features, w.in_features, w.group_size, "auto")
            return cpu_backend.dense_gemm(x, w, self.bias, self.gemm)
        return torch.cat([m(x) for m in self.modules], dim=-1)


@dataclass(frozen=True)
class Norm:
    """An RMSNorm's parameters: ``weight`` float32 [D] (contiguous), ``eps``."""

    weight: torch.Tensor
    eps: float


@dataclass
class DecoderLayer:
    """One decoder layer of :class:`FastDecoder`, H = hidden size, Hq / Hk query / key-value
    heads of D channels, I = MLP width (every activation float32):

        ln1, ln2: :class:`Norm` over [H] (before attention / before the MLP), or None (OLMo-2).
        qkv: [M, H] -> [M, (Hq + 2 Hk) D] (q, k, v side by side); o: [M, Hq D] -> [M, H].
        gate_up: [M, H] -> [M, 2 I] (gate, then up); down: [M, I] -> [M, H].
        q_norm, k_norm: :class:`Norm` over [D] per head (Qwen3, Gemma-3) or over the whole
            [Hq D] / [Hk D] projection (OLMo-2, ``qk_whole``), or None.
        post_attn, post_ffn: :class:`Norm` over [H] of each branch's output, or None.
        act: "silu" or "gelu_tanh"; window: sliding window (attends to the last ``window``
            positions; 0: all); softcap: attention logit cap (0: none); scale: softmax scale;
        residual_scale: multiplies each branch output (Granite's residual_multiplier).
        cos, sin: float32 [max_len, D], this layer's RoPE tables (Gemma-3: local or global).
        native: the ``decode_layer`` op's prepared form of this layer (built once), or None
            when the layer cannot run as one native call.
    """

    ln1: Norm | None
    ln2: Norm | None
    qkv: _Proj
    o: _Proj
    gate_up: _Proj
    down: _Proj
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    qk_whole: bool = False
    post_attn: Norm | None = None
    post_ffn: Norm | None = None
    act: str = "silu"
    window: int = 0
    softcap: float = 0.0
    scale: float = 1.0
    residual_scale: float = 1.0
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    native: torch.ScriptObject | None = None

    def norms(self) -> list[Norm]:
        return [n for n in (self.ln1, self.ln2, self.q_norm, self.k_norm, self.post_attn, self.post_ffn) if n]


class FastDecoder:
    """Greedy/sampled decoding of a loaded HF causal LM with a static KV cache.

    Args:
        model: a ``LlamaForCausalLM``-style model (see :data:`SUPPORTED`), float32, on CPU or
            one device; dense or with dbquant ``PackedLinear`` layers.
        max_len: cache capacity in tokens (prompt + new tokens).
        lm_head_dtype: how a dense output projection is computed. It is the largest weight
            of a small model (SmolLM2: 113 MB in float32, most of a 2-bit model's decode
            step). ``torch.float32`` (default, exact), ``torch.bfloat16`` (half the bytes) or
            ``torch.int8`` (per-row symmetric int8 codes + float32 scales, a quarter of the
            bytes, float32 activations; the C++ kernel ``linear_int8_cpu``) or ``"w8a8"``
            (the same codes, and the activations quantized to int8 per block of 32 so the
            kernel ``linear_w8a8_cpu`` multiplies integers: ~2x faster, as llama.cpp's Q8_0).
            The checkpoint is not changed: the copy is made here. See :data:`LM_HEAD_DTYPES`.
            A checkpoint that stores the head as an int8 table with one scale per row
            (``--head-bits 8``, or a tied ``--embed-bits 8`` embedding) runs it as stored through
            ``linear_int8`` (``linear_w8a8`` when asked), whatever else is asked; a head over
            another table is dequantized to float32 first.
        backend: dbquant kernel backend for packed layers (``auto``/``cpu`` fuse and call the
            C++ kernel directly).
        kv: a packed VidKV cache (a :class:`KVSpec` or ``--kv`` spelling such as ``"1.5/1.58"``;
            None or ``"fp"``: the float32 cache). Attention then reads the past as codes (the
            registry's ``kv_attend`` op; one ``decode_step_kv`` call per token when the
            layers run natively), no float copy of it is kept, and a prompt is prefilled group by
            group (:class:`dbquant.runtime.kv.packed.PackedKVCache`). Batch 1 only.
        prefill_gemm: the precision of a packed projection's GEMM on a prompt chunk of more than
            ``cpu_backend.LUT_MAX_ROWS`` tokens (``cpu_backend.GEMM_DTYPES``): ``"auto"`` (default)
            rounds activations to 8 bits per row and group and each group's weight to 8-bit levels
            (``"w8a8"``, integer products) where AVX-512 VNNI runs it, weights and activations to
            bfloat16 on AMX CPUs and where bf16 is otherwise fast (``dbquant.backends.cpuinfo``), only
            the activations (``"int8"``: exact bit planes) where AVX2 is the fastest path, else float32
            (``cpu_backend.resolve_gemm``); ``"fp32"`` always exact. Decoding a token never uses it.
        cache_dtype: the storage of the float KV cache (without ``kv``): ``"float16"`` (keys and
            values rounded to nearest even as they are written: half the bytes that attention reads
            every step, as llama.cpp's default cache), ``"float32"`` (exact), or ``"auto"`` (default):
            float16 where one native call runs a token's layers (its attention widens the rows as it
            reads them), float32 elsewhere (the framework path would widen the whole cache every
            step). Attention itself runs in float32 either way. docs/RESULTS.md has the PPL and speed.
    """

    def __init__(self, model, max_len: int = 2048, lm_head_dtype: torch.dtype | str = torch.float32,
                 backend: str = "auto", kv: KVSpec | str | None = None, prefill_gemm: str = "auto",
                 cache_dtype: str = "auto"):
        cfg = model.config
        check_supported(model)
        self.model = model
        inner = model.model
        mt = cfg.model_type
        self.device = next(model.parameters()).device
        self.embed = inner.embed_tokens  # Gemma's scaled embedding module scales by itself
        self.embed_scale = float(getattr(inner, "embedding_multiplier", 1.0)) if mt == "granite" else 1.0
        self.logits_scaling = float(cfg.logits_scaling) if mt == "granite" else 1.0
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = max_len
        check_cache_dtype(cache_dtype)
        tables = _rope_tables(inner, max_len, self.device)
        self.cos, self.sin = next(iter(tables.values()))  # [max_len, head_dim] (Gemma-3: the first type's)
        self.prefill_gemm = cpu_backend.resolve_gemm(prefill_gemm)  # "fp32", "bf16", "int8" or "w8a8"
        self.layers: list[DecoderLayer] = [
            _build_layer(layer, i, mt, cfg, tables, backend, self.prefill_gemm) for i, layer in enumerate(inner.layers)]
        self.norm = _norm(inner.norm, mt in ONE_PLUS_W)
        self.lm_head = self.lm_head_scale = self.lm_head_bias = self.lm_head_proj = None
        self.lm_head_op = None  # the native op of an int8 output projection (its unchecked `run`)
        self._build_head(model.lm_head, lm_head_dtype, backend)
        if self.device.type == "cpu":
            self._into_huge_pages()
        self.k_cache = self.v_cache = None

        # The fused C++ RMSNorm on the CPU (one call instead of ~8 framework ops per norm).
        native = self.device.type == "cpu" and registry.available("cpu")
        self.rms_norm = registry.get("rms_norm", "cpu").run if native else None
        self.decode_layer = registry.get("decode_layer", "cpu") if native else None
        # A token's embedding lookup and greedy pick in one native call each: their torch ops cost
        # ~0.2 ms apiece per token, every one running cold after the step's weight stream.
        self.embed_rows = self._native_embed_rows() if native else None
        self.argmax = registry.get("argmax", "cpu").run if native else None
        # a prompt's attention: the step's kernel per query (1.2-1.3x torch's SDPA on its widened rows)
        self.attend_causal = registry.get("attend_causal", "cpu").run if native else None
        # and its rotary embedding and gated activation: one pass each instead of ~5 and 2 framework ops
        # (off the CPU, the reference ops: the same formulas in torch)
        self.rope_heads = registry.get("rope_heads", "cpu").run if native else registry.get("rope_heads", "ref")
        self.gated_act = registry.get("gated_act", "cpu").run if native else registry.get("gated_act", "ref")
        self.native = self._native_layers() if native else None
        # every layer of a one-token step in one native call (the Python loop cost ~15 us a layer)
        # (the final norm inside it too: one framework op less a token)
        self.stack = None if self.native is None else cpu_backend.prepare_decode_stack(
            [(L.native, L.cos, L.sin) for L in self.layers], final_norm=(self.norm.weight, self.norm.eps))
        if cache_dtype == "auto":
            cache_dtype = "float16" if self.stack is not None else "float32"
        self.cache_dtype = CACHE_DTYPES[cache_dtype]
        self._init_kv(kv, native)

    def _build_head(self, head: nn.Module, lm_head_dtype, backend: str) -> None:
        """The output projection: a packed one through its kernel; a checkpoint's int8 table (its own,
        or a tied 8-bit embedding with one scale per row) through the int8 op as stored; any other
        weight dense, or requantized to int8 here when ``lm_head_dtype`` asks for it."""
        if isinstance(head, PackedLinear):
            self.lm_head_proj = _Proj([head], backend)
            return
        native = registry.available("cpu") and self.device.type == "cpu"
        stored = int8_rows(head)
        if stored is not None and native and (lm_head_dtype != "w8a8" or stored[0].shape[1] % 32 == 0):
            self.lm_head_op = registry.get("linear_w8a8" if lm_head_dtype == "w8a8" else "linear_int8", "cpu").run
            self.lm_head, self.lm_head_scale = stored  # as the checkpoint holds them: no requantization
            return
        weight = head_weight(head)
        bias = getattr(head, "bias", None)
        if lm_head_dtype in (torch.int8, "w8a8"):
            if not native:
                raise DbquantError(f"lm_head_dtype={lm_head_dtype} needs the C++ CPU extension and a CPU model")
            if lm_head_dtype == "w8a8" and weight.shape[1] % 32:
                raise DbquantError(f"lm_head_dtype=w8a8 quantizes activations per block of 32; hidden size "
                                   f"{weight.shape[1]} is not a multiple of 32 (use int8)")
            op = "linear_w8a8" if lm_head_dtype == "w8a8" else "linear_int8"
            self.lm_head_op = registry.get(op, "cpu").run
            self.lm_head, self.lm_head_scale = quantize_rows_int8(weight)
            self.lm_head_bias = None if bias is None else bias.detach().float()
        else:
            self.lm_head = weight.to(lm_head_dtype)
            self.lm_head_bias = None if bias is None else bias.detach().to(lm_head_dtype)

    def _into_huge_pages(self) -> None:
        """Every fused packed projection's t16 tensors and an int8 head's codes, copied side by side into
        one mapping advised for transparent huge pages (backends/hugepages.py): a decode step streams them
        all once per token, and in 4 KiB pages each page would cost a TLB miss."""
        projs = [p for L in self.layers for p in (L.qkv, L.o, L.gate_up, L.down) if p.packed is not None]
        head = [self.lm_head] if self.lm_head_op is not None else []
        moved = iter(into_huge_pages(
            [t for p in projs for t in (p.packed.planes, p.packed.scales, p.packed.offset) if t is not None] + head))
        for p in projs:
            w = p.packed
            p.packed = replace(w, planes=next(moved), scales=next(moved),
                               offset=None if w.offset is None else next(moved))
        if head:
            self.lm_head = next(moved)

    def _native_layers(self) -> list | None:
        """Per layer, the ``decode_layer`` op's prepared form (built once here), or None when
        some layer cannot run natively (a dense or unfused projection, a gate/up pair of
        unequal halves, or mixed norm eps). Projections may differ in k and group size."""
        weights, eps = [], set()
        inter = self.layers[0].gate_up.sizes[0]
        hidden = self.layers[0].o.sizes[0]
        for L in self.layers:
            projs = (L.qkv, L.o, L.gate_up, L.down)
            if any(p.packed is None for p in projs) or L.gate_up.sizes != [inter, inter]:
                return None
            eps |= {n.eps for n in L.norms()}
            ones = torch.ones(hidden)  # the op's ln1/ln2 when the layer has no pre-norms (pre_norm=False)
            weights.append(DecodeLayerWeights(
                ln1=L.ln1.weight if L.ln1 else ones, ln2=L.ln2.weight if L.ln2 else ones,
                eps=next(iter(L.norms())).eps if L.norms() else 1e-6,
                qkv=Projection(L.qkv.packed, L.qkv.bias), o=Projection(L.o.packed, L.o.bias),
                gate_up=Projection(L.gate_up.packed, L.gate_up.bias), down=Projection(L.down.packed, L.down.bias),
                n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim, intermediate=inter,
                scale=L.scale, q_norm=L.q_norm.weight if L.q_norm else None,
                k_norm=L.k_norm.weight if L.k_norm else None,
                post_attn=L.post_attn.weight if L.post_attn else None,
                post_ffn=L.post_ffn.weight if L.post_ffn else None, pre_norm=L.ln1 is not None, act=L.act,
                window=L.window, softcap=L.softcap, residual_scale=L.residual_scale))
        if len(eps) != 1:
            return None
        for L, w in zip(self.layers, weights):
            L.native = self.decode_layer.prepare(w)
        return [L.native for L in self.layers]

    # -- the network -----------------------------------------------------------------

    def _alloc(self, batch: int) -> None:
        if self.kv_spec is not None:
            self._alloc_kv(batch)
            return
        shape = (len(self.layers), batch, self.n_kv, self.max_len, self.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            dt = self.cache_dtype
            if self.device.type == "cpu":  # read every step, as the weights are (_into_huge_pages)
                self.k_cache, self.v_cache = zeros_in_huge_pages(shape, dt), zeros_in_huge_pages(shape, dt)
            else:
                self.k_cache = torch.zeros(shape, dtype=dt, device=self.device)
                self.v_cache = torch.zeros(shape, dtype=dt, device=self.device)

    def _native_embed_rows(self):
        """ids int64 [n] -> float32 [n, hidden] through the registry's ``table_rows`` when the input
        embedding is an 8-bit table (the default), else None (the module's own forward)."""
        emb = self.embed
        if not isinstance(emb, QuantEmbedding) or emb.layout.bits != 8:
            return None
        t, dim, scale = emb.tensors(), emb.layout.dim, emb.embed_scale
        rows = registry.get("table_rows", "cpu").run
        return lambda ids: rows(t["codes"], t["code_scales"], ids, dim, scale)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, T] -> float32 [B*T, hidden] (Granite's multiplier included)."""
        if self.embed_rows is not None and tokens.dtype == torch.int64:
            x = self.embed_rows(tokens.reshape(-1).contiguous())
        else:
            x = self.embed(tokens).float().reshape(tokens.numel(), -1)
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def _rms(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        """RMSNorm of x (float32 [..., D]) with ``norm``: the registry's fused ``rms_norm`` on
        the CPU, else torch's rms_norm."""
        if self.rms_norm is not None:
            return self.rms_norm(x.contiguous(), norm.weight, norm.eps)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Run ``tokens`` (int64 [B, T]) at positions pos..pos+T-1 through the model,
        appending their keys/values to the cache. Returns float32 logits [B, vocab] of the
        last position."""
        b, t = tokens.shape
        if pos + t > self.max_len:
            raise DbquantError(f"sequence of {pos + t} tokens exceeds the decoder's max_len={self.max_len}")
        if self.kv_cache is not None:
            return self._logits(self._forward_kv(tokens, pos))
        x = self._embed(tokens)  # [B*T, hidden]
        if self.stack is not None and b == 1 and t == 1:  # one token: one native call, every layer and the final norm
            cpu_backend.decode_step_cpu.run(x, self.stack, self.k_cache, self.v_cache, pos)
            return self._logits(x)
        for i, L in enumerate(self.layers):
            x = self._layer(x, i, L, b, t, pos, last_only=i == len(self.layers) - 1)
        last = x.view(b, -1, x.shape[-1])[:, -1]  # x: [B*T, H], or [B, H] where the last layer was trimmed
        return self._logits(self._rms(last, self.norm))

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """The output projection of the final hidden states, float32 [B, H] -> float32 [B, vocab],
        with Granite's logits_scaling and Gemma-2's final soft-capping as HF applies them."""
        if self.lm_head_proj is not None:
            y = self.lm_head_proj(last)
        elif self.lm_head_scale is not None:
            y = self.lm_head_op(last.contiguous(), self.lm_head, self.lm_head_scale)
            y = y if self.lm_head_bias is None else y + self.lm_head_bias
        else:
            y = F.linear(last.to(self.lm_head.dtype), self.lm_head, self.lm_head_bias).float()
        if self.logits_scaling != 1.0:
            y = y / self.logits_scaling
        if self.final_softcap:
            y = torch.tanh(y / self.final_softcap) * self.final_softcap
        return y

    def _layer(self, x: torch.Tensor, i: int, L: DecoderLayer, b: int, t: int, pos: int,
               last_only: bool = False) -> torch.Tensor:
        """Layer ``i`` on x float32 [B*T, H] at positions pos..pos+T-1 in framework ops (any
        batch, any chunk); returns the new residual stream, float32 [B*T, H]. ``last_only``
        (the last layer) and a chunk of more than ``LUT_MAX_ROWS`` tokens: every position's keys and
        values go to the cache, but o-projection and MLP (and, on the float cache, attention) run for
        each sequence's last position alone, returned as float32 [B, H] (no later layer reads the
        others; llama.cpp skips them the same way). On the packed cache attention still runs for every
        new row (its op is called as before) and only the last row is kept."""
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        end = pos + t
        qkv = L.qkv(self._rms(x, L.ln1) if L.ln1 else x)
        if L.q_norm is not None and L.qk_whole:  # OLMo-2: over the whole q and k projections
            qkv = torch.cat([self._rms(qkv[:, :hq * d], L.q_norm), self._rms(qkv[:, hq * d:(hq + hk) * d], L.k_norm),
                             qkv[:, (hq + hk) * d:]], dim=1)
        qkv = qkv.view(b, t, hq + 2 * hk, d)
        qk, v = qkv[:, :, :hq + hk], qkv[:, :, hq + hk:]
        if L.q_norm is not None and not L.qk_whole:
            qk = torch.cat([self._rms(qk[:, :, :hq], L.q_norm), self._rms(qk[:, :, hq:], L.k_norm)], dim=2)
        qk = self.rope_heads(qk, L.cos[pos:end], L.sin[pos:end])  # q and k heads rotated together: [B, Hq+Hk, T, D]
        # A chunk of at most LUT_MAX_ROWS rows runs the lookup-table kernel, whose table kind depends on the
        # row count: it is left whole, so a short prompt's last row is computed as before, bit for bit.
        trim = last_only and t > cpu_backend.LUT_MAX_ROWS
        if self.kv_cache is not None:
            att = self._kv_attend(i, qk[:, :hq], qk[:, hq:], v.transpose(1, 2), L)
            att = (att[:, :, -1:] if trim else att).transpose(1, 2)  # [B, T, Hq, D]
        else:
            self.k_cache[i, :, :, pos:end] = qk[:, hq:]  # rounded here to a float16 cache's precision
            self.v_cache[i, :, :, pos:end] = v.transpose(1, 2)
            q, qpos = (qk[:, :hq, -1:], end - 1) if trim else (qk[:, :hq], pos)
            if self.attend_causal is not None:  # [B, T, Hq, D], float32 attention on the cache's rows
                att = self.attend_causal(q, self.k_cache[i], self.v_cache[i], qpos, L.scale, L.softcap, L.window)
            else:
                att = self._attend(q, self.k_cache[i], self.v_cache[i], L, qpos)
        rows = b * t  # the projections below take the path of the whole chunk's rows
        if trim:
            x, t = x.view(b, t, -1)[:, -1].contiguous(), 1
        out = L.o(att.reshape(b * t, hq * d), rows)
        x = x + self._branch(out, L.post_attn, L.residual_scale)
        gate_up = L.gate_up(self._rms(x, L.ln2) if L.ln2 else x, rows)
        act = self.gated_act(gate_up.contiguous(), L.act)
        return x + self._branch(L.down(act, rows), L.post_ffn, L.residual_scale)

    def _branch(self, out: torch.Tensor, post: Norm | None, scale: float) -> torch.Tensor:
        """A branch's output float32 [M, H] as it joins the residual: post-normed, scaled."""
        if post is not None:
            out = self._rms(out, post)
        return out if scale == 1.0 else out * scale

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, L: DecoderLayer,
                pos: int) -> torch.Tensor:
        """Causal (optionally windowed, soft-capped) float32 attention of q float32 [B, Hq, T, D] at positions
        pos..pos+T-1 over a layer's cache k_cache, v_cache [B, Hk, max_len, D] (rows up to pos+T-1 written),
        off the CPU's native op; -> [B, T, Hq, D]. SDPA's own causal path where no mask is needed (the chunk
        starts the sequence or is one token, and neither a softcap nor a window applies), else the
        registry's reference op, which writes the mask out."""
        t, end = q.shape[2], pos + q.shape[2]
        if not L.softcap and (not L.window or end <= L.window) and (t == 1 or pos == 0):
            keys, values = k_cache[:, :, :end].float(), v_cache[:, :, :end].float()
            return F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=L.scale,
                                                  enable_gqa=q.shape[1] != keys.shape[1]).transpose(1, 2)
        return registry.get("attend_causal", "ref")(q, k_cache, v_cache, pos, L.scale, L.softcap, L.window)

    # -- the packed VidKV cache (kv=...) ----------------------------------------------

    def _init_kv(self, kv: KVSpec | str | None, native: bool) -> None:
        """Check and keep the packed-cache spec (None: the float32 cache) and its ops."""
        spec = parse_kv(kv) if isinstance(kv, str) else kv
        self.kv_spec = None if spec is None or spec.method == "fp" else spec.check()
        self.kv_cache = None
        if self.kv_spec is None:
            return
        check_kv_supported(self.model, self.kv_spec)
        self.kv_attend_op = registry.get("kv_attend", "auto", self.device)
        self.decode_step_kv = cpu_backend.decode_step_kv_cpu.run if native and self.stack is not None else None

    def _alloc_kv(self, batch: int) -> None:
        if batch != 1:
            raise DbquantError(f"the packed KV cache decodes one sequence at a time, got batch {batch}")
        if self.device.type != "cpu":
            raise DbquantError(f"the packed KV cache runs on the CPU, the model is on {self.device}")
        self.kv_cache = PackedKVCache(self.kv_spec, len(self.layers), self.n_kv, self.head_dim, self.max_len,
                                      chunk=self.kv_spec.group)
        if self.decode_step_kv is not None:
            for i, layer in enumerate(self.kv_cache.layers):
                self.stack.set_kv(i, cpu_backend.prepare_kv_packed(layer))

    def _forward_kv(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Run tokens (int64 [1, T]) at pos.. through the layers on the packed cache, one group of
        tokens at a time (a long prompt is quantized as it goes: the tail never holds more than
        residual + 2 groups); returns the last position's hidden state after the final norm, float32 [1, H]."""
        c = self.kv_cache
        if pos != c.n_groups * c.spec.group + c.n_tail:
            raise DbquantError(f"the packed KV cache holds {c.n_groups * c.spec.group + c.n_tail} tokens; "
                               f"it can only be extended at that position, not at {pos}")
        g = c.spec.group
        for s in range(0, tokens.shape[1], g):
            chunk = tokens[:, s:s + g]
            t, p = chunk.shape[1], pos + s
            x = self._embed(chunk)
            normed = self.decode_step_kv is not None and t == 1  # the native step ends with the final norm
            if normed:
                self.decode_step_kv(x, self.stack, p, c.n_groups, c.n_tail)
            else:
                for i, L in enumerate(self.layers):
                    x = self._layer(x, i, L, 1, t, p, last_only=i == len(self.layers) - 1)
            c.n_tail += t
            c.flush()
        return x[-1:] if normed else self._rms(x[-1:], self.norm)

    def _kv_attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: DecoderLayer) -> torch.Tensor:
        """Layer i's attention on the packed cache: k, v float32 [1, Hk, T, D] appended to its tail,
        q float32 [1, Hq, T, D] -> float32 [1, Hq, T, D]."""
        c = self.kv_cache
        t = q.shape[2]
        c.append(k[0], v[0], i)
        att = self.kv_attend_op(q[0].transpose(0, 1).contiguous(), c.layers[i], c.n_groups, c.n_tail + t, L.scale)
        return att.transpose(0, 1)[None]

    # -- generation ------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, min_new_tokens: int = 0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, DecodeStats]:
        """Prefill ``input_ids`` (int64 [B, T]) and decode up to ``max_new_tokens``.

        Returns (int64 [B, T + n] sequences, :class:`DecodeStats`). Stops early when every
        row has produced an EOS (after ``min_new_tokens``).
        """
        if max_new_tokens < 1:
            raise DbquantError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, t = input_ids.shape
        if t + max_new_tokens > self.max_len:
            raise DbquantError(f"prompt {t} + {max_new_tokens} new tokens exceed max_len={self.max_len}")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self._alloc(b)
        ids = input_ids.to(self.device)
        t0 = time.perf_counter()
        logits = self.forward(ids, 0)
        nxt = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
        prefill_s = time.perf_counter() - t0
        out = [nxt]
        # plain Python bools: a torch op per token costs tens of us here (it runs cold after a step)
        done = [v in eos for v in nxt.tolist()]
        steps = []
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if i >= min_new_tokens and all(done):
                break
            s = time.perf_counter()
            logits = self.forward(nxt[:, None], t + i - 1)
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
            steps.append(time.perf_counter() - s)
            out.append(nxt)
            if eos:
                done = [d or v in eos for d, v in zip(done, nxt.tolist())]
        decode_s = time.perf_counter() - t1
        seq = torch.cat([ids, torch.stack(out, dim=1)], dim=1)
        return seq, DecodeStats(t, len(out), prefill_s, decode_s, b, steps)

    def _pick(self, logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        """Next token per row from float32 logits [B, vocab]."""
        if not do_sample:
            return logits.argmax(-1) if self.argmax is None else self.argmax(logits.contiguous())
        logits = logits / max(temperature, 1e-5)
        if top_k and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: float [N, K] -> (int8 [N, K] codes in [-127, 127], float32 [N] scales)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


def _norm(mod, one_plus_w: bool = False) -> Norm | None:
    """An HF RMSNorm module's :class:`Norm` (None for None); Gemma's (1 + w) is added here, in
    float32 as Gemma's forward adds it, so every norm below is x * rsqrt(mean(x^2) + eps) * w."""
    if mod is None:
        return None
    w = mod.weight.detach().float()
    eps = getattr(mod, "variance_epsilon", None)
    return Norm((1.0 + w if one_plus_w else w).contiguous(), float(mod.eps if eps is None else eps))


def _rope_tables(inner, max_len: int, device) -> dict:
    """RoPE tables from the model's own rotary module (covers every rope_scaling it knows):
    {layer type (None when the module has one table) -> (cos, sin) float32 [max_len, D]}.
    Gemma-3's module holds one table per layer type (local and global bases)."""
    rotary = inner.rotary_emb
    pos = torch.arange(max_len, device=device)[None]
    probe = torch.zeros(1, device=device, dtype=torch.float32)
    types = getattr(rotary, "layer_types", None)
    out = {}
    with torch.no_grad():
        for typ in (types or [None]):
            cos, sin = rotary(probe, pos) if typ is None else rotary(probe, pos, typ)
            out[typ] = (cos[0].float(), sin[0].float())
    return out


def _activation(cfg) -> str:
    """The MLP gate's activation as the config names it (Gemma-2/3: hidden_activation)."""
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def _window(att, cfg) -> int:
    """A layer's sliding window (0: none): the attention module's own per-layer attribute
    (Gemma-2/3, Qwen2/3), else Mistral's config-wide one."""
    w = att.sliding_window if hasattr(att, "sliding_window") else getattr(cfg, "sliding_window", None)
    return int(w or 0)


def _build_layer(layer, i: int, mt: str, cfg, tables: dict, backend: str, gemm: str) -> DecoderLayer:
    """One HF decoder layer's :class:`DecoderLayer`: norms placed by :data:`NORM_LAYOUT`, the
    switches read from the modules themselves where they carry them."""
    att, mlp = layer.self_attn, layer.mlp
    one = mt in ONE_PLUS_W
    layout = NORM_LAYOUT.get(mt, "pre")
    ln1 = None if layout == "post" else _norm(layer.input_layernorm, one)
    ln2 = {"pre": layer.post_attention_layernorm, "sandwich": getattr(layer, "pre_feedforward_layernorm", None),
           "post": None}[layout]
    q_norm = _norm(getattr(att, "q_norm", None), one)
    head_dim = att.head_dim
    types = getattr(cfg, "layer_types", None)
    cos, sin = tables[types[i]] if None not in tables else tables[None]
    if hasattr(att, "qkv_proj"):  # Phi-3: q, k, v and gate, up already fused, in the same order
        qkv, gate_up = _Proj([att.qkv_proj], backend, gemm), _Proj([mlp.gate_up_proj], backend, gemm)
        gate_up.sizes = [gate_up.sizes[0] // 2] * 2
    else:
        qkv = _Proj([att.q_proj, att.k_proj, att.v_proj], backend, gemm)
        gate_up = _Proj([mlp.gate_proj, mlp.up_proj], backend, gemm)
    return DecoderLayer(
        ln1=ln1, ln2=_norm(ln2, one), qkv=qkv, o=_Proj([att.o_proj], backend, gemm), gate_up=gate_up,
        down=_Proj([mlp.down_proj], backend, gemm),
        q_norm=q_norm, k_norm=_norm(getattr(att, "k_norm", None), one),
        qk_whole=q_norm is not None and q_norm.weight.shape[0] != head_dim,
        post_attn=_norm(layer.post_attention_layernorm, one) if layout != "pre" else None,
        post_ffn=_norm(layer.post_feedforward_layernorm, one) if layout != "pre" else None,
        act=ACTIVATIONS[_activation(cfg)], window=_window(att, cfg),
        softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
        scale=float(att.scaling), residual_scale=float(getattr(layer, "residual_multiplier", 1.0)),
        cos=cos, sin=sin)


def check_kv_supported(model, spec: KVSpec) -> None:
    """Raise DbquantError naming the reason when the packed KV cache cannot serve ``model`` with ``spec``
    (cheap: reads the config and attention modules, builds nothing)."""
    check_packable(spec)
    cfg = model.config
    bad = [i for i, layer in enumerate(model.model.layers) if _window(layer.self_attn, cfg)]
    if bad or getattr(cfg, "attn_logit_softcapping", None):
        raise DbquantError(f"the packed KV cache serves neither sliding windows nor soft-capping (layers "
                           f"{bad[:4] or 'all'}); use --engine hf for --kv {spec.name}")


def check_supported(model) -> None:
    """Raise DbquantError naming the reason when :class:`FastDecoder` cannot run ``model``."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise DbquantError(f"the fast decoder supports {SUPPORTED}, not model_type={mt!r}; "
                           "use the Hugging Face generate() path (--engine hf)")
    act = _activation(cfg)
    if act not in ACTIVATIONS:
        raise DbquantError(f"the fast decoder needs a SiLU or GELU-tanh gated MLP, got activation {act!r}")
    rope = getattr(cfg, "rope_parameters", None) or {}
    partial = (rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
               if isinstance(rope, dict) else 1.0)
    if partial != 1.0:
        raise DbquantError(f"the fast decoder rotates whole heads; {mt} has partial_rotary_factor={partial}")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise DbquantError(f"the fast decoder is causal; {mt} has use_bidirectional_attention=True")
    for i, layer in enumerate(model.model.layers):
        w = _window(layer.self_attn, cfg)
        if w < 0:
            raise DbquantError(f"layer {i} has sliding_window={w}; the fast decoder needs a window >= 1")
    if next(model.parameters()).dtype != torch.float32:
        raise DbquantError(f"the fast decoder runs float32 models, got {next(model.parameters()).dtype}")
