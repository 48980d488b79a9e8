"""Pure-PyTorch reference kernels: the oracle every backend is tested against.

Slow on purpose (unpack, dequantize, dense matmul); fp32 math on CPU. One ``*_ref`` per
registered op (``dbquant.backends.registry.OPS``), each with the signature of that op, and
:func:`stream_read_ref` for the benchmark's read kernel (no registry entry: no model calls it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import embedding as table_format
from ..format import layout
from ..format.embedding import TableLayout
from .checks import (
    check_activations,
    check_attend_causal,
    check_decode_step,
    check_gated_act,
    check_int8_head,
    check_packed,
    check_rms_norm,
    check_rope_heads,
    check_table_rows,
    check_tensor,
)
from .kvpack import PackedKVLayer, check_kv_attend
from .t16 import DecodeLayerWeights, Projection, canonical

Q8_BLOCK = 32  # activation channels per int8 scale of the w8a8 head (csrc/cpu/gemv_int8.h: kQ8Block)


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                   in_features: int) -> torch.Tensor:
    """Dense weight of a packed linear.

    Args:
        qweight: uint8 [k, N, Kp/8] (canonical planes, see ``dbquant.format.layout``), k in 1..4.
        scales: float16/float32 [N, G, k].
        offset: float16/float32 [N, G] or None.
        in_features: K <= Kp.
    Returns:
        float32 [N, K].
    """
    return layout.dequantize(layout.unpack_bits(qweight), scales, offset, in_features)


def dbgemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with W the dequantized packed weight.

    Args:
        x: float [..., K] activations.
        qweight, scales, offset: the canonical packed tensors (see :func:`dequantize_ref`).
        bias: float [N] or None.
        in_features: K; group_size: g (implied by the shapes, checked here).
    Returns:
        [..., N] in x's dtype, computed in float32.
    Raises:
        KernelInputError (a DbquantError and ValueError): x not float16/bfloat16/float32/float64,
        0-dim, or a shape that disagrees with in_features/group_size.
    """
    check_packed("dbgemm_ref", qweight, scales, offset, bias, in_features, group_size)
    check_activations("dbgemm_ref", x, in_features)
    w = dequantize_ref(qweight, scales, offset, in_features)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def linear_int8_ref(x: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y = x @ (s * wq).T``: an int8-weight projection with float activations.

    Args: x float32 [M, K]; wq int8 [N, K] per-row codes; s float32 [N] per-row scales.
    Returns: float32 [M, N] (each row's sum scaled after the dot, as the C++ kernel does).
    """
    check_int8_head("linear_int8_ref", x, wq, s)
    return (x @ wq.float().T) * s


def quantize_act_q8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations to int8 per block of 32 channels: x float32 [M, K] (K % 32 == 0) ->
    (codes float64 [M, K/32, 32] in [-127, 127], scales float64 [M, K/32, 1] = max|x| / 127).
    Rounds half to even (C's nearbyint). A block holding a NaN or Inf has no code: its scale
    is NaN (codes 0), so every output it feeds is NaN."""
    xb = x.double().reshape(x.shape[0], -1, Q8_BLOCK)
    finite = xb.isfinite().all(-1, keepdim=True)
    d = xb.abs().amax(-1, keepdim=True) / 127
    safe = torch.where(finite & (d > 0), d, torch.ones_like(d))
    codes = torch.where(finite & (d > 0), torch.round(xb / safe), torch.zeros_like(xb))
    return codes, torch.where(finite, d, torch.full_like(d, float("nan")))


def linear_w8a8_ref(x: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y = x_q8 @ (s * wq).T`` with x quantized to int8 per block of 32 channels first.

    Args: x float32 [M, K], K a multiple of 32; wq int8 [N, K]; s float32 [N].
    Returns: float32 [M, N] = s[n] * sum over blocks b of scale[m, b] * (integer dot of the
    block's codes), the dots exact (float64), as the C++ kernel's int32 dots are.
    """
    check_int8_head("linear_w8a8_ref", x, wq, s, Q8_BLOCK)
    codes, d = quantize_act_q8_ref(x)
    dots = torch.einsum("mbk,nbk->mnb", codes, wq.double().reshape(wq.shape[0], -1, Q8_BLOCK))
    return ((dots * d[..., 0][:, None, :]).sum(-1) * s.double()).float()


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x float32 [..., D], w float32 [D] -> float32 [..., D]."""
    check_rms_norm("rms_norm_ref", x, w)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def table_rows_ref(codes: torch.Tensor, code_scales: torch.Tensor, ids: torch.Tensor, dim: int,
                   scale: float = 1.0) -> torch.Tensor:
    """Rows ``ids`` (int64 [n]) of an 8-bit group-wise table: codes int8 [R, Dp], code_scales float16
    [R, G] -> float32 [n, dim] = codes x their group's scale x ``scale`` (dbquant/format/embedding.py)."""
    check_table_rows("table_rows_ref", codes, code_scales, ids, dim)
    table = TableLayout(rows=codes.shape[0], dim=dim, bits=8, group_size=codes.shape[1] // code_scales.shape[1])
    rows = {"codes": codes.index_select(0, ids), "code_scales": code_scales.index_select(0, ids)}
    return table_format.dequantize(rows, table) * scale  # the format's own definition, as QuantEmbedding's lookup


def argmax_ref(x: torch.Tensor) -> torch.Tensor:
    """Greedy pick: float32 [B, V] -> int64 [B], torch.argmax over the last dim."""
    check_tensor("argmax_ref", "x", x, (torch.float32,), dim=2)
    return x.argmax(-1)


def _project(p: Projection, x: torch.Tensor) -> torch.Tensor:
    """x float32 [1, K] -> float32 [1, N] through a t16 projection, dequantized densely."""
    qweight, scales, offset = canonical(p.weight)
    return F.linear(x, dequantize_ref(qweight, scales, offset, p.weight.in_features), p.bias)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF apply_rotary_pos_emb) of x float32 [..., D]: [heads, D] at one position with cos,
    sin [D], or [B, H, T, D] with cos, sin [T, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _act_mul(gate_up: torch.Tensor, inter: int, act: str) -> torch.Tensor:
    """act(gate) * up of a gate/up pair side by side: float32 [M, 2 I] -> [M, I]."""
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    return (F.gelu(gate, approximate="tanh") if act == "gelu_tanh" else F.silu(gate)) * up


def _qk_norm(t: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of q or k float32 [heads, D] with w [D] (per head) or [heads D] (the whole
    projection, OLMo-2); t unchanged when w is None."""
    if w is None:
        return t
    return rms_norm_ref(t.reshape(1, -1) if w.shape[0] != t.shape[1] else t, w, eps).view_as(t)


def decode_layer_ref(x: torch.Tensor, layer: DecodeLayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> None:
    """One Llama-family decoder layer for one token, in place (``x``, and the caches at ``pos``).

    Args:
        x: float32 [1, H], the residual stream; updated in place.
        layer: the weights, sizes and family switches (:class:`dbquant.backends.t16.DecodeLayerWeights`).
        cos, sin: float32 [D], the RoPE tables at ``pos``.
        k_cache, v_cache: float32 or float16 [1, Hk, L, D] (both the same); position ``pos`` is
            written (a float16 cache rounds k, v to nearest even), 0..pos are read, widened to float32
            (``pos - window + 1``..pos with a sliding window).
        pos: the token's position, 0 <= pos < L.

    x += r * post_attn(o(attention(rope(q_norm(q)), rope(k_norm(k)) and v))), q, k, v = qkv(rms(x, ln1));
    then x += r * post_ffn(down(act(gate) * up)), gate, up = gate_up(rms(x, ln2)); each switch
    left at its default (no norm, r = 1, no window, no cap) drops out. Grouped-query attention:
    query head j reads kv head j // (Hq / Hk).
    """
    layer.check("decode_layer_ref")
    check_decode_step("decode_layer_ref", x, layer, cos, sin, k_cache, v_cache, pos)
    hq, hk, d, inter, eps = layer.n_heads, layer.n_kv, layer.head_dim, layer.intermediate, layer.eps
    h = rms_norm_ref(x, layer.ln1, eps) if layer.pre_norm else x
    qkv = _project(layer.qkv, h)[0]
    q = _rope(_qk_norm(qkv[:hq * d].view(hq, d), layer.q_norm, eps), cos, sin)
    k = _rope(_qk_norm(qkv[hq * d:(hq + hk) * d].view(hk, d), layer.k_norm, eps), cos, sin)
    k_cache[0, :, pos] = k
    v_cache[0, :, pos] = qkv[(hq + hk) * d:].view(hk, d)
    att = attend_causal_ref(q[None, :, None], k_cache, v_cache, pos, layer.scale, layer.softcap, layer.window)
    out = _project(layer.o, att.reshape(1, hq * d))  # att: [1, 1, Hq, D]
    if layer.post_attn is not None:
        out = rms_norm_ref(out, layer.post_attn, eps)
    x.add_(out * layer.residual_scale)
    h = rms_norm_ref(x, layer.ln2, eps) if layer.pre_norm else x
    out = _project(layer.down, _act_mul(_project(layer.gate_up, h), inter, layer.act))
    if layer.post_ffn is not None:
        out = rms_norm_ref(out, layer.post_ffn, eps)
    x.add_(out * layer.residual_scale)


def gated_act_ref(gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """A prompt chunk's gated activation: gu float32 [M, 2I] (gate and up halves side by side) ->
    float32 [M, I] = act(gate) * up, act "silu" or "gelu_tanh" (GELU's tanh approximation)."""
    check_gated_act("gated_act_ref", gu, act)
    return _act_mul(gu, gu.shape[1] // 2, act)


def rope_heads_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A prompt chunk's rotary embedding: x float32 [B, T, H, D], cos / sin float32 [T, D] at the chunk's
    positions -> float32 [B, H, T, D] = x * cos + rotate_half(x) * sin (HF apply_rotary_pos_emb)."""
    check_rope_heads("rope_heads_ref", x, cos, sin)
    return _rope(x.transpose(1, 2), cos, sin).contiguous()


def attend_causal_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float,
                      softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """A prompt chunk's causal attention over a float cache (the prefill's), written out.

    q: float32 [B, Hq, T, D], queries at positions pos..pos+T-1; k, v: float32 or float16 [B, Hk, L, D]
    (both the same), rows 0..pos+T-1 filled; query head j reads kv head j // (Hq / Hk). Query t attends
    to rows pos+t-window+1..pos+t (from 0; all of 0..pos+t when window is 0); scores are
    scale * q k^T, then softcap * tanh(s / softcap) where softcap > 0. Returns float32 [B, T, Hq, D].
    """
    check_attend_causal("attend_causal_ref", q, k, v, pos, window)
    hq, t = q.shape[1], q.shape[2]
    end = pos + t
    lo = max(0, pos - window + 1) if window else 0  # the first row any query attends: none before it is read
    keys = k[:, :, lo:end].float().repeat_interleave(hq // k.shape[1], dim=1)  # [B, Hq, end - lo, D]
    values = v[:, :, lo:end].float().repeat_interleave(hq // k.shape[1], dim=1)
    qpos = torch.arange(pos, end, device=q.device)[:, None]
    kpos = torch.arange(lo, end, device=q.device)[None]
    allowed = (kpos <= qpos) & ((kpos > qpos - window) if window else True)  # [T, end - lo]
    scores = (q @ keys.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    att = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values  # [B, Hq, T, D]
    return att.transpose(1, 2).contiguous()


# ---- attention on a packed VidKV cache (backends/kvpack.py) ----------------------------------


def _bits_lsb(b: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 [..., m] -> int64 [..., m * 8 / width] fields of ``width`` bits, least significant first."""
    shifts = torch.arange(0, 8, width, device=b.device)
    return ((b.long().unsqueeze(-1) >> shifts) & ((1 << width) - 1)).flatten(-2)


def _fp8(b: torch.Tensor) -> torch.Tensor:
    """uint8 fp8 e4m3 bits -> float32."""
    return b.view(torch.float8_e4m3fn).float()


def dequantize_kv_ref(kv: PackedKVLayer, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_groups`` packed groups as float32 keys, values [Hk, n_groups * G, D], the sink's
    exact rows in place of group 0's first S (straight from the layout, no kernel tricks)."""
    hk, d, g, na = kv.n_kv, kv.head_dim, kv.group, kv.n_anom
    sl = slice(0, n_groups)
    f = kv.factors[:, sl]  # [Hk, n, 4]
    if 0 < na < d:
        is_anom = _bits_lsb(kv.kmask[:, sl], 1).bool()  # [Hk, n, D]
    else:
        is_anom = torch.full((hk, n_groups, d), na > 0, dtype=torch.bool)
    # channel order: anomalous first, each part ascending (a stable sort of "normal?")
    order = torch.sort((~is_anom).to(torch.uint8), dim=-1, stable=True).indices  # [Hk, n, D]
    codes = _bits_lsb(kv.kcodes[:, sl], 2).float()  # [Hk, n, na, G]
    anom = _fp8(kv.kmin[:, sl])[..., None] * f[..., 0, None, None] + \
        (_fp8(kv.kscale[:, sl]) * f[..., 1, None])[..., None] * codes  # [Hk, n, na, G]
    signs = _bits_lsb(kv.nbits[:, sl], 1).float() * 2 - 1  # [Hk, n, D - na, G]
    coef = (_fp8(kv.nscale[:, sl]) * f[..., 2, None])[..., None] * signs
    normal = (coef.transpose(-1, -2) @ kv.fmat).transpose(-1, -2)  # [Hk, n, D - na, G]
    parts = torch.cat([anom, normal], dim=2)  # [Hk, n, D, G] in `order`
    keys = torch.empty_like(parts).scatter_(2, order[..., None].expand(-1, -1, -1, g), parts)
    digits = _trits(kv.vtrits[:, sl].unflatten(-1, (g, -1)), d)  # [Hk, n, G, D] (token-major rows)
    vals = (_fp8(kv.vscale[:, sl]) * f[..., 3, None])[..., None, :] * digits
    keys = keys.transpose(-1, -2).reshape(hk, n_groups * g, d)
    vals = vals.reshape(hk, n_groups * g, d)
    s = kv.sink_k.shape[1]
    if n_groups and s:
        keys[:, :s], vals[:, :s] = kv.sink_k, kv.sink_v
    return keys, vals


def _trits(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., m] of 5 base-3 digits each (digit 0 first, stored trit + 1) -> float32 [..., n] in {-1, 0, 1}."""
    p = torch.tensor([1, 3, 9, 27, 81])
    return ((b.long().unsqueeze(-1) // p) % 3 - 1).flatten(-2)[..., :n].float()


def kv_attend_ref(q: torch.Tensor, kv: PackedKVLayer, n_groups: int, n_tail: int, scale: float) -> torch.Tensor:
    """Attention of ``q`` float32 [T, Hq, D] over a packed VidKV cache -> float32 [T, Hq, D].

    The keys/values attended: the first ``n_groups`` packed groups dequantized (with the sink's
    exact rows), then tail rows 0..n_tail-1, whose last T are the queries' own tokens (query t
    sees tail rows < n_tail - T + t + 1). Query head h reads kv head h // (Hq / Hk).
    """
    check_kv_attend("kv_attend_ref", q, kv, n_groups, n_tail)
    t, hq, d = q.shape
    pk, pv = dequantize_kv_ref(kv, n_groups)
    keys = torch.cat([pk, kv.tail_k[:, :n_tail]], dim=1).repeat_interleave(hq // kv.n_kv, dim=0)  # [Hq, n, D]
    vals = torch.cat([pv, kv.tail_v[:, :n_tail]], dim=1).repeat_interleave(hq // kv.n_kv, dim=0)
    n = keys.shape[1]
    scores = torch.einsum("thd,hnd->thn", q, keys) * scale
    visible = torch.arange(n)[None] < (n - t + torch.arange(t) + 1)[:, None]  # [T, n]
    p = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return torch.einsum("thn,hnd->thd", p, vals)


# ---- the integer lookup tables of csrc/cpu/dbgemm_i8lut.h (an emulation, and its error bound) ----


# The largest |code| of each integer table kind (csrc/cpu/dbgemm_i8lut.h: lut_code_max).
LUT_CODE_MAX = {"int8": 127, "int16": 2047}


def i8lut_tables_ref(x: torch.Tensor, in_features: int, group_size: int, kind: str = "int8"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer tables of csrc/cpu/dbgemm_i8lut.h, in torch.

    Args: x float32 [M, K]; in_features K; group_size g (a multiple of 8); kind "int8" or "int16"
        (code_max = LUT_CODE_MAX[kind]: 127 or 2047).
    Returns: (t int16 [M, Kp/4, 16], scale float32 [M, G], gsum float32 [M, G]) with
        T[m, q, i] = (((0 + [i&1] x[4q]) + [i&2] x[4q+1]) + [i&4] x[4q+2]) + [i&8] x[4q+3],
        the centred C = T - T[..., 15] / 2, scale = max_{q in group, i} |C| / code_max,
        t = round_half_even(C * (code_max / max)) (0 for a zero group), gsum = the group's sum of x
        (the tables leave out gsum / 2 per plane and group). Kp = ceil(K / g) g; channels past K are 0.
    """
    top = LUT_CODE_MAX[kind]
    m, k = x.shape
    kp = -(-k // group_size) * group_size
    xp = torch.zeros(m, kp, dtype=torch.float32)
    xp[:, :k] = x.float()
    xs = xp.reshape(m, kp // 4, 4)
    bits = (torch.arange(16)[:, None] >> torch.arange(4)) & 1  # [16, 4]
    tab = torch.zeros(m, kp // 4, 16)
    for j in range(4):  # the kernel's order of additions
        tab = tab + torch.where(bits[:, j].bool(), xs[..., j:j + 1], torch.zeros(()))
    tab = tab - tab[..., 15:] * 0.5  # centred: T[15] is the chunk's sum in the same order
    mx = tab.abs().reshape(m, kp // group_size, -1).amax(-1)  # [M, G]
    inv = torch.where(mx > 0, torch.tensor(float(top)) / mx.clamp_min(torch.finfo(torch.float32).tiny),
                      torch.zeros(()))
    inv_q = inv.repeat_interleave(group_size // 4, dim=1)[..., None]
    t = torch.round(tab * inv_q).to(torch.int16)
    gsum = xp.reshape(m, kp // group_size, group_size).sum(-1)
    return t, mx / float(top), gsum


def dbgemm_i8lut_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
                     group_size: int, kind: str = "int8") -> torch.Tensor:
    """What the integer-table kernel computes with ``kind`` tables ("int8" or "int16"; otherwise
    dbgemm_ref's signature; x float32 [M, K]):
    y[m, n] = sum_j (sum_p alpha[n, j, p] (S[m, p, n, j] scale[m, j] + gsum[m, j] / 2)
                     + beta[n, j] gsum[m, j]) + bias[n]
    with S the exact integer sum of the centred tables t looked up by the weight's 4-bit indices
    (i8lut_tables_ref). Equal to the kernel up to float32 summation order. Returns float32 [M, N]."""
    check_packed("dbgemm_i8lut_ref", qweight, scales, offset, bias, in_features, group_size)
    t, sc, gsum = i8lut_tables_ref(x, in_features, group_size, kind)
    p, n, c8 = qweight.shape
    q = 2 * c8
    nib = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(p, n, q).long()  # chunk 2c: low nibble
    m = x.shape[0]
    vals = t.long()[:, None, None].expand(m, p, n, q, 16).gather(-1, nib[None, ..., None].expand(m, p, n, q, 1))
    s = vals[..., 0].reshape(m, p, n, q // (group_size // 4), group_size // 4).sum(-1)  # [M, P, N, G] exact
    y = torch.einsum("mpng,ngp,mg->mn", s.double(), scales.double(), sc.double()) \
        + torch.einsum("mg,ngp->mn", gsum.double() / 2, scales.double())
    if offset is not None:
        y = y + gsum.double() @ offset.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def i8lut_error_bound(x: torch.Tensor, scales: torch.Tensor, in_features: int, group_size: int,
                      kind: str = "int8") -> torch.Tensor:
    """The header's bound on |y_i8lut - y_ref| before float32 rounding (csrc/cpu/dbgemm_i8lut.h):
    sum_j (scale[m, j] / 2) (g / 4) sum_p |alpha[n, j, p]|, scale that of ``kind`` tables. x float32
    [M, K], scales [N, G, k]; returns float32 [M, N]."""
    _, sc, _ = i8lut_tables_ref(x, in_features, group_size, kind)
    return (sc / 2 * (group_size / 4)) @ scales.float().abs().sum(-1).T


def quantize_a8_ref(x: torch.Tensor, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The activation codes of the 8-bit prefill GEMM (csrc/cpu/gemm_a8.h: quantize_a8), in torch.

    Args: x float32 [M, K]; group_size g. Returns (u uint8 [M, Kp], z int32 [M, G], sx float32 [M, G],
    xs float32 [M, G]): per group lo = min(0, min x), hi = max(0, max x), inv = 255 / (hi - lo) (0 where
    hi - lo < 2^-120, where it would overflow), z = round_half_even(-lo inv),
    u = clamp(round_half_even(x inv) + z, 0, 255) (z past K), sx = (hi - lo) / 255, xs the group's sum of
    x (in torch's order; the kernels' is gemm_a8.h's); x ~ sx (u - z). A group holding a NaN or an Inf gets
    codes 0, z = 0 and sx = xs = NaN.
    """
    m, k = x.shape
    kp = -(-k // group_size) * group_size
    xp = torch.zeros(m, kp, dtype=torch.float32)
    xp[:, :k] = x.float()
    xg = xp.view(m, kp // group_size, group_size)
    bad = ~torch.isfinite(xg).all(-1)  # [M, G]
    lo, hi = xg.amin(-1).clamp_max(0), xg.amax(-1).clamp_min(0)
    inv = torch.where(hi - lo >= 2.0 ** -120, torch.tensor(255.0) / (hi - lo), torch.zeros(()))
    z = torch.round(-lo * inv)
    u = (torch.round(xg * inv[..., None]) + z[..., None]).clamp(0, 255)
    u = u.view(m, kp)
    u[:, k:] = z.repeat_interleave(group_size, 1)[:, k:]  # padded channels: x = 0
    u = torch.where(bad.repeat_interleave(group_size, 1), torch.zeros(()), u).to(torch.uint8)
    z = torch.where(bad, torch.zeros(()), z).to(torch.int32)
    nan = torch.tensor(float("nan"))
    return u, z, torch.where(bad, nan, (hi - lo) / 255.0), torch.where(bad, nan, xg.sum(-1))


def w8_levels_ref(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit weight levels of the prefill GEMM's "w8a8" mode (csrc/cpu/gemm_a8.h, w8_levels), in torch.

    Args: scales float16 or float32 [N, G, P] (alpha). Returns (r int8 [N, G, P], s float32 [N, G]): with
    L = max(sum_p max(alpha_p, 0), sum_p max(-alpha_p, 0)) (p in order), s = L / (127 - P / 2) and
    r_p = round_half_even(alpha_p / s), so that alpha_p ~ s r_p and every sum of a subset of the r_p is
    within +-127 (one int8 weight per channel: q = sum_p r_p b_p). A group with a non-finite alpha gets
    s = NaN and r = 0; one with L = 0 gets s = 0 and r = 0.
    """
    a = scales.float()
    P = a.shape[-1]
    pos, neg = torch.zeros_like(a[..., 0]), torch.zeros_like(a[..., 0])
    for p in range(P):  # the kernels' order of the float sums
        pos = pos + a[..., p].clamp_min(0)
        neg = neg + (-a[..., p]).clamp_min(0)
    ok = torch.isfinite(a).all(-1)
    s = torch.where(ok, torch.maximum(pos, neg) / torch.tensor(127.0 - 0.5 * P), torch.tensor(float("nan")))
    use = (ok & (s > 0))[..., None]
    r = torch.where(use, torch.round(a / torch.where(use, s[..., None], torch.ones(()))), torch.zeros(()))
    return r.to(torch.int8), s


def gemm_a8_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                bias: torch.Tensor | None, in_features: int, group_size: int,
                int8_weights: bool = False) -> torch.Tensor:
    """What the 8-bit prefill GEMM computes (csrc/cpu/gemm_a8.h; otherwise dbgemm_ref's signature, x float32
    [M, K]): y[m, n] = sum_j (sx[m, j] sum_p alpha[n, j, p] D[m, p, n, j] + beta[n, j] xs[m, j]) + bias[n],
    with D the exact integer dot of the group's codes less their zero point (quantize_a8_ref) with the
    bit plane's bits. With ``int8_weights`` alpha_p is s r_p (w8_levels_ref): the "w8a8" mode. Equal to
    the kernel up to float32 summation order. Returns float32 [M, N]."""
    check_packed("gemm_a8_ref", qweight, scales, offset, bias, in_features, group_size)
    u, z, sx, xs = quantize_a8_ref(x, group_size)
    bits = layout.unpack_bits(qweight).double()  # [P, N, Kp] of {0, 1}
    m, kp = u.shape
    q = u.double().view(m, kp // group_size, group_size) - z.double()[..., None]
    d = torch.einsum("mgk,pngk->mpng", q, bits.view(*bits.shape[:2], kp // group_size, group_size))  # exact
    if int8_weights:
        r, s = w8_levels_ref(scales)
        alpha = s.double()[..., None] * r.double()  # NaN where s is: NaN * 0 on the kernels too
    else:
        alpha = scales.double()
    y = torch.einsum("mpng,ngp,mg->mn", d, alpha, sx.double())
    if offset is not None:
        y = y + xs.double() @ offset.double().T
    if bias is not None:
        y = y + bias.double()
    return y.float()


def stream_read_ref(buf: torch.Tensor) -> int:
    """The checksum of ``torch.ops.dbquant.stream_read_cpu`` (csrc/cpu/stream_read.h): XOR of the
    buffer's bytes taken as 8-byte little-endian words, the last partial word zero-padded.

    Args: buf: any dtype and shape, contiguous, on CPU (its raw bytes are read).
    Returns: the uint64 checksum bit-cast to a signed int64, as a Python int (0 for no bytes).
    """
    raw = buf.detach().contiguous().reshape(-1).view(torch.uint8)
    words = F.pad(raw, (0, -raw.numel() % 8)).view(torch.int64)
    while words.numel() > 1:  # fold halves: XOR is associative and commutative, so exact
        if words.numel() % 2:
            words = F.pad(words, (0, 1))
        half = words.numel() // 2
        words = words[:half] ^ words[half:]
    return int(words[0]) if words.numel() else 0
