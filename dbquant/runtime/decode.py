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
attention and SiLU), since a small model's step is otherwise mostly framework overhead. The
native ops (``decode_layer``, ``rms_norm``, ``linear_int8``, ``linear_w8a8``) are taken from
``dbquant.backends.registry`` once, at construction; per token only their ``run`` is called.

Supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` decoders (dense or with dbquant
``PackedLinear`` layers) without sliding-window attention, SiLU MLPs, any RoPE scaling
the model's own ``rotary_emb`` implements. Anything else raises a clear error and callers
fall back to ``model.generate``. Logits match the HF forward to float32 rounding
(``tests/test_decode.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import cpu as cpu_backend
from ..backends import registry
from ..backends.t16 import CpuWeight, DecodeLayerWeights, Projection
from ..errors import DbquantError
from ..model.modules import PackedLinear

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
# --lm-head-dtype spellings -> FastDecoder's lm_head_dtype
LM_HEAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8, "w8a8": "w8a8"}


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
    tile-wise (every part's out_features a multiple of 16, same group size and offset use);
    anything else is called module by module.
    """

    def __init__(self, parts: list[nn.Module], backend: str = "auto"):
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

            ws = [cpu_backend.prepare_cpu(m.qweight, m.scales, m.offset, m.in_features, m.group_size) for m in parts]
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
        first = parts[0]  # tiles concatenate only when no part ends in a partial tile
        return all(p.out_features % cpu_backend.TILE == 0 and p.group_size == first.group_size
                   and (p.offset is None) == (first.offset is None) for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, K] contiguous -> float32 [M, sum N_i] (the parts side by side)."""
        if self.dense is not None:
            return F.linear(x, self.dense, self.bias)
        if self.packed is not None:

            w = self.packed
            if x.shape[0] <= cpu_backend.LUT_MAX_ROWS:  # decode: straight to the op (checked at build)
                return torch.ops.dbquant.dbgemm_cpu(x, w.planes, w.scales, w.offset, self.bias,
                                                    w.out_features, w.in_features, w.group_size, "auto")
            return cpu_backend.run_cpu(x, w, self.bias)
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

        ln1, ln2: :class:`Norm` over [H] (before attention / before the MLP).
        qkv: [M, H] -> [M, (Hq + 2 Hk) D] (q, k, v side by side); o: [M, Hq D] -> [M, H].
        gate_up: [M, H] -> [M, 2 I] (gate, then up); down: [M, I] -> [M, H].
        q_norm, k_norm: :class:`Norm` over [D] per head (Qwen3), or None.
        native: the ``decode_layer`` op's prepared form of this layer (built once), or None
            when the layer cannot run as one native call.
    """

    ln1: Norm
    ln2: Norm
    qkv: _Proj
    o: _Proj
    gate_up: _Proj
    down: _Proj
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    native: torch.ScriptObject | None = None


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
        backend: dbquant kernel backend for packed layers (``auto``/``cpu`` fuse and call the
            C++ kernel directly).
    """

    def __init__(self, model, max_len: int = 2048, lm_head_dtype: torch.dtype | str = torch.float32,
                 backend: str = "auto"):
        cfg = model.config
        check_supported(model)
        self.model = model
        inner = model.model
        self.device = next(model.parameters()).device
        self.embed = inner.embed_tokens
        self.layers: list[DecoderLayer] = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append(DecoderLayer(
                ln1=_norm(layer.input_layernorm),
                ln2=_norm(layer.post_attention_layernorm),
                qkv=_Proj([att.q_proj, att.k_proj, att.v_proj], backend),
                o=_Proj([att.o_proj], backend),
                gate_up=_Proj([mlp.gate_proj, mlp.up_proj], backend),
                down=_Proj([mlp.down_proj], backend),
                q_norm=_norm(getattr(att, "q_norm", None)),
                k_norm=_norm(getattr(att, "k_norm", None)),
            ))
        self.norm = _norm(inner.norm)
        head = model.lm_head
        self.lm_head = self.lm_head_scale = self.lm_head_bias = self.lm_head_proj = None
        self.lm_head_op = None  # the native op of an int8 output projection (its unchecked `run`)
        if not isinstance(head, nn.Linear):  # a packed lm_head
            self.lm_head_proj = _Proj([head], backend)
        elif lm_head_dtype in (torch.int8, "w8a8"):
            if not (registry.available("cpu") and self.device.type == "cpu"):
                raise DbquantError(f"lm_head_dtype={lm_head_dtype} needs the C++ CPU extension and a CPU model")
            if lm_head_dtype == "w8a8" and head.in_features % 32:
                raise DbquantError(f"lm_head_dtype=w8a8 quantizes activations per block of 32; hidden size "
                                   f"{head.in_features} is not a multiple of 32 (use int8)")
            op = "linear_w8a8" if lm_head_dtype == "w8a8" else "linear_int8"
            self.lm_head_op = registry.get(op, "cpu").run
            self.lm_head, self.lm_head_scale = quantize_rows_int8(head.weight.detach())
            self.lm_head_bias = None if head.bias is None else head.bias.detach().float()
        else:
            self.lm_head = head.weight.detach().to(lm_head_dtype)
            self.lm_head_bias = None if head.bias is None else head.bias.detach().to(lm_head_dtype)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scaling = self.head_dim ** -0.5
        self.max_len = max_len
        # RoPE tables from the model's own rotary module (covers every rope_scaling it knows).
        pos = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0].float(), sin[0].float()  # [max_len, head_dim]
        self.k_cache = self.v_cache = None

        # The fused C++ RMSNorm on the CPU (one call instead of ~8 framework ops per norm).
        native = self.device.type == "cpu" and registry.available("cpu")
        self.rms_norm = registry.get("rms_norm", "cpu").run if native else None
        self.decode_layer = registry.get("decode_layer", "cpu") if native else None
        self.native = self._native_layers() if native else None

    def _native_layers(self) -> list | None:
        """Per layer, the ``decode_layer`` op's prepared form (built once here), or None when
        some layer cannot run natively (a dense or unfused projection, q/k norms, a
        gate/up pair of unequal halves, mixed group sizes or norm eps)."""
        weights, groups, eps = [], set(), set()
        inter = self.layers[0].gate_up.sizes[0]
        for L in self.layers:
            projs = (L.qkv, L.o, L.gate_up, L.down)
            if any(p.packed is None for p in projs) or L.q_norm is not None or L.gate_up.sizes != [inter, inter]:
                return None
            groups |= {p.packed.group_size for p in projs}
            eps |= {L.ln1.eps, L.ln2.eps}
            weights.append(DecodeLayerWeights(
                ln1=L.ln1.weight, ln2=L.ln2.weight, eps=L.ln1.eps,
                qkv=Projection(L.qkv.packed, L.qkv.bias), o=Projection(L.o.packed, L.o.bias),
                gate_up=Projection(L.gate_up.packed, L.gate_up.bias), down=Projection(L.down.packed, L.down.bias),
                n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim, intermediate=inter,
                scale=self.scaling))
        if len(groups) != 1 or len(eps) != 1:
            return None
        for L, w in zip(self.layers, weights):
            L.native = self.decode_layer.prepare(w)
        return [L.native for L in self.layers]

    # -- the network -----------------------------------------------------------------

    def _alloc(self, batch: int) -> None:
        shape = (len(self.layers), batch, self.n_kv, self.max_len, self.head_dim)
        if self.k_cache is None or self.k_cache.shape != shape:
            self.k_cache = torch.zeros(shape, device=self.device)
            self.v_cache = torch.zeros(shape, device=self.device)

    def _rms(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        """RMSNorm of x (float32 [..., D]) with ``norm``: the registry's fused ``rms_norm`` on
        the CPU, else torch's rms_norm."""
        if self.rms_norm is not None:
            return self.rms_norm(x.contiguous(), norm.weight, norm.eps)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """x: [B, H, T, D] at positions pos..pos+T-1."""
        t = x.shape[2]
        cos, sin = self.cos[pos:pos + t], self.sin[pos:pos + t]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Run ``tokens`` (int64 [B, T]) at positions pos..pos+T-1 through the model,
        appending their keys/values to the cache. Returns float32 logits [B, vocab] of the
        last position."""
        b, t = tokens.shape
        if pos + t > self.max_len:
            raise DbquantError(f"sequence of {pos + t} tokens exceeds the decoder's max_len={self.max_len}")
        x = self.embed(tokens).float().reshape(b * t, -1)  # [B*T, hidden]
        # A causal mask is needed only when a multi-token chunk is appended after earlier tokens.
        mask = None
        if t > 1 and pos > 0:
            mask = torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        if self.native is not None and b == 1 and t == 1:  # one token: one native call per layer
            run, cos, sin = self.decode_layer.run, self.cos[pos], self.sin[pos]
            for i, L in enumerate(self.layers):
                run(x, L.native, cos, sin, self.k_cache[i], self.v_cache[i], pos)
        else:
            for i, L in enumerate(self.layers):
                x = self._layer(x, i, L, b, t, pos, mask)
        last = x.view(b, t, -1)[:, -1]
        last = self._rms(last, self.norm)
        if self.lm_head_proj is not None:
            return self.lm_head_proj(last)
        if self.lm_head_scale is not None:
            y = self.lm_head_op(last.contiguous(), self.lm_head, self.lm_head_scale)
            return y if self.lm_head_bias is None else y + self.lm_head_bias
        return F.linear(last.to(self.lm_head.dtype), self.lm_head, self.lm_head_bias).float()

    def _layer(self, x: torch.Tensor, i: int, L: DecoderLayer, b: int, t: int, pos: int,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Layer ``i`` on x float32 [B*T, H] at positions pos..pos+T-1 in framework ops (any
        batch, any chunk); returns the new residual stream, float32 [B*T, H]."""
        hq, hk, d = self.n_heads, self.n_kv, self.head_dim
        end = pos + t
        inter = L.gate_up.sizes[0]
        h = self._rms(x, L.ln1)
        qkv = L.qkv(h).view(b, t, hq + 2 * hk, d)
        qk, v = qkv[:, :, :hq + hk], qkv[:, :, hq + hk:]
        if L.q_norm is not None:
            qk = torch.cat([self._rms(qk[:, :, :hq], L.q_norm), self._rms(qk[:, :, hq:], L.k_norm)], dim=2)
        qk = self._rope(qk.transpose(1, 2), pos)  # q and k heads rotated together: [B, Hq+Hk, T, D]
        self.k_cache[i, :, :, pos:end] = qk[:, hq:]
        self.v_cache[i, :, :, pos:end] = v.transpose(1, 2)
        att = F.scaled_dot_product_attention(
            qk[:, :hq], self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end], attn_mask=mask,
            is_causal=t > 1 and pos == 0, scale=self.scaling, enable_gqa=hq != hk)
        x = x + L.o(att.transpose(1, 2).reshape(b * t, hq * d))
        gate_up = L.gate_up(self._rms(x, L.ln2))
        return x + L.down(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])

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
        done = torch.tensor([int(v) in eos for v in nxt.tolist()])
        steps = []
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if i >= min_new_tokens and bool(done.all()):
                break
            s = time.perf_counter()
            logits = self.forward(nxt[:, None], t + i - 1)
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, generator)
            steps.append(time.perf_counter() - s)
            out.append(nxt)
            done |= torch.tensor([int(v) in eos for v in nxt.tolist()])
        decode_s = time.perf_counter() - t1
        seq = torch.cat([ids, torch.stack(out, dim=1)], dim=1)
        return seq, DecodeStats(t, len(out), prefill_s, decode_s, b, steps)

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        """Next token per row from float32 logits [B, vocab]."""
        if not do_sample:
            return logits.argmax(-1)
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


def _norm(mod) -> Norm | None:
    return None if mod is None else Norm(mod.weight.detach().float().contiguous(), float(mod.variance_epsilon))


def check_supported(model) -> None:
    """Raise DbquantError naming the reason when :class:`FastDecoder` cannot run ``model``."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED:
        raise DbquantError(f"the fast decoder supports {SUPPORTED}, not model_type={mt!r}; "
                           "use the Hugging Face generate() path (--engine hf)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise DbquantError(f"the fast decoder needs a SiLU MLP, got hidden_act={cfg.hidden_act!r}")
    sliding = getattr(cfg, "sliding_window", None)
    if sliding is not None and (mt != "qwen2" or getattr(cfg, "use_sliding_window", False)) and \
            sliding < getattr(cfg, "max_position_embeddings", sliding + 1):
        raise DbquantError(f"the fast decoder has no sliding-window attention (sliding_window={sliding})")
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers):
        raise DbquantError("the fast decoder has no sliding-window attention (a layer uses one)")
    if next(model.parameters()).dtype != torch.float32:
        raise DbquantError(f"the fast decoder runs float32 models, got {next(model.parameters()).dtype}")
