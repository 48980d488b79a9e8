"""The CPU kernel's weight layout "t16" (docs/FORMAT.md, Kernel layouts) in plain PyTorch:
the repack from the canonical format and back, and the weights of one decoder layer in it.

Torch-only (no extension needed), so the reference kernels can read what the C++ ones read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .checks import check_packed, check_tensor, fail

TILE = 16  # output rows per tile of the t16 layout (csrc/cpu/dbgemm_t16.h: kTile)
# Byte orders of the planes (csrc/cpu/dbgemm_t16.h): 1, the unit order [T, C8, k, 16]; 4, dword rows
# [T, C8/4, k, 16, 4] (a row's 4 bytes of 4 columns side by side, for the AVX-512 VBMI + VNNI kernel),
# which needs groups of a multiple of DWORD_GROUP channels.
PLANE_COLS = (1, 4)
DWORD_GROUP = 32


@dataclass(frozen=True)
class CpuWeight:
    """A packed linear in the CPU kernel's "t16" layout (docs/FORMAT.md, Kernel layouts).

    With T = ceil(N / 16) tiles of 16 output rows (rows past N are zero), C8 = Kp / 8 and
    k bit planes (1..4):
        planes: uint8 [T, C8, k, 16]; planes[t, c, p, r] = qweight[p, 16t + r, c]  (cols 1)
            or, in dword rows, uint8 [T, C8/4, k, 16, 4]; planes[t, c // 4, p, r, c % 4] = the same  (cols 4)
        scales: float16 [T, G, k, 16]; offset: float16 [T, G, 16] or None
    The bytes are the canonical ones, only regrouped so that one SIMD register holds one
    byte of each of 16 rows (cols 1) or 4 bytes of each (cols 4).
    """

    planes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int

    @property
    def planes_count(self) -> int:
        """k, the number of bit planes."""
        return self.planes.shape[2]

    @property
    def cols(self) -> int:
        """The planes' byte order: 1 (unit order) or 4 (dword rows)."""
        return 1 if self.planes.dim() == 4 else self.planes.shape[4]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scales, self.offset) if t is not None)


def _tile_rows(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, ...] -> [T, 16, ...], zero rows appended up to 16 * T."""
    pad = tiles * TILE - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
    return t.reshape(tiles, TILE, *t.shape[1:])


def prepare_cpu(qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                in_features: int, group_size: int, cols: int = 1) -> CpuWeight:
    """Repack a canonical packed linear into the CPU kernel layout (done once per weight).

    Args: the canonical tensors (qweight uint8 [k, N, Kp/8], scales [N, G, k], offset
    [N, G] or None; float16 or float32 — the kernel reads them at the format's float16); ``cols``
    the planes' byte order (PLANE_COLS; 4 needs group_size % DWORD_GROUP == 0).
    Raises: KernelInputError (a DbquantError) when the shapes disagree with in_features and
    group_size (the repack pads rows, so a short tensor would otherwise pass unnoticed), or cols
    cannot hold them.
    """
    n = check_packed("prepare_cpu", qweight, scales, offset, None, in_features, group_size)
    tiles = -(-n // TILE)
    planes = _tile_rows(qweight.detach().permute(1, 2, 0), tiles)  # [T, 16, C8, k]
    sc = _tile_rows(scales.detach().to(torch.float16), tiles)  # [T, 16, G, k]
    off = None if offset is None else _tile_rows(offset.detach().to(torch.float16), tiles)  # [T, 16, G]
    w = CpuWeight(
        planes=planes.permute(0, 2, 3, 1).contiguous(),
        scales=sc.permute(0, 2, 3, 1).contiguous(),
        offset=None if off is None else off.permute(0, 2, 1).contiguous(),
        out_features=n, in_features=int(in_features), group_size=int(group_size),
    )
    return with_cols(w, cols)


def with_cols(w: CpuWeight, cols: int) -> CpuWeight:
    """The same weight with its planes in byte order ``cols`` (PLANE_COLS): whole bytes moved, no bit.

    Raises KernelInputError for another cols, or dword rows (4) on groups of other than a multiple of
    DWORD_GROUP channels."""
    if cols not in PLANE_COLS:
        fail("prepare_cpu", f"cols must be one of {PLANE_COLS}, got {cols!r}")
    if cols == 4 and w.group_size % DWORD_GROUP:
        fail("prepare_cpu", f"dword rows (cols=4) need group_size a multiple of {DWORD_GROUP}, got {w.group_size}")
    if cols == w.cols:
        return w
    pl = w.planes
    t, k = pl.shape[0], pl.shape[2]
    if cols == 4:  # [T, C8, k, 16] -> [T, C8/4, 4, k, 16] -> [T, C8/4, k, 16, 4]
        pl = pl.reshape(t, -1, 4, k, TILE).permute(0, 1, 3, 4, 2)
    else:  # [T, C8/4, k, 16, 4] -> [T, C8/4, 4, k, 16] -> [T, C8, k, 16]
        pl = pl.permute(0, 1, 4, 2, 3).reshape(t, -1, k, TILE)
    return replace(w, planes=pl.contiguous())


def widen(w: CpuWeight, planes: int, group_size: int, offset: bool = False) -> CpuWeight:
    """The same weight with ``planes`` >= k planes, a ``group_size`` dividing its own, and an
    offset tensor (zeros if it had none) when ``offset``.

    Extra planes are all-zero with zero scales (each adds fma(0, 0, y) = y), and each group
    splits into g / group_size groups repeating its scales and offset; padding past the new
    Kp is dropped (it was zero bits over zero activations). The dequantized weight is the
    same; outputs agree to float rounding (sums are grouped differently when g splits). Lets
    parts of unequal k, g and offset share one fused tile-wise weight (dbquant/runtime/decode.py).
    """
    k, g, cols = w.planes_count, w.group_size, w.cols
    if planes < k or g % group_size:
        fail("widen", f"cannot widen k={k}, group_size={g} to k={planes}, group_size={group_size}")
    w = with_cols(w, 1)
    kp = -(-w.in_features // group_size) * group_size
    sub = g // group_size
    pl = w.planes[:, :kp // 8]
    sc = w.scales.repeat_interleave(sub, dim=1)[:, :kp // group_size]
    off = None if w.offset is None else w.offset.repeat_interleave(sub, dim=1)[:, :kp // group_size].contiguous()
    if off is None and offset:
        off = sc.new_zeros(sc.shape[0], sc.shape[1], TILE)
    if planes > k:
        pl = torch.cat([pl, pl.new_zeros(pl.shape[0], pl.shape[1], planes - k, TILE)], dim=2)
        sc = torch.cat([sc, sc.new_zeros(sc.shape[0], sc.shape[1], planes - k, TILE)], dim=2)
    out = CpuWeight(planes=pl.contiguous(), scales=sc.contiguous(), offset=off, out_features=w.out_features,
                    in_features=w.in_features, group_size=group_size)
    return with_cols(out, cols if group_size % DWORD_GROUP == 0 else 1)  # the byte order kept where it can be


def canonical(w: CpuWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of :func:`prepare_cpu`: (qweight uint8 [k, N, Kp/8], scales float16
    [N, G, k], offset float16 [N, G] or None), the padding rows dropped."""
    w = with_cols(w, 1)
    n, k = w.out_features, w.planes_count
    t, c8 = w.planes.shape[0], w.planes.shape[1]
    qweight = w.planes.permute(2, 0, 3, 1).reshape(k, t * TILE, c8)[:, :n]
    scales = w.scales.permute(0, 3, 1, 2).reshape(t * TILE, -1, k)[:n]
    offset = None if w.offset is None else w.offset.permute(0, 2, 1).reshape(t * TILE, -1)[:n]
    return qweight, scales, offset


@dataclass(frozen=True)
class Projection:
    """One linear of a decoder layer: ``weight`` (t16, N x K) and ``bias`` float32 [N] or None."""

    weight: CpuWeight
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeLayerWeights:
    """One Llama-family decoder layer, as the ``decode_layer`` op reads it (one token, batch 1).

    With H = hidden size, Hq query heads and Hk key/value heads of D channels, I = MLP width:
        ln1, ln2: float32 [H] RMSNorm weights (before attention / before the MLP), ``eps``.
        qkv: (Hq + 2 Hk) D x H  (q, k, v rows in that order)
        o: H x Hq D;  gate_up: 2 I x H (gate rows, then up rows);  down: H x I
        (every projection's weight in the t16 layout, each with its own k and group size;
        bias float32 [N] or None)
        scale: the attention's softmax scale (usually D ** -0.5).
    Family switches (defaults: Llama's), every norm an RMSNorm with ``eps``; Gemma's (1 + w)
    norms are passed with the 1 already added:
        q_norm, k_norm: float32 [D] (per head: Qwen3, Gemma-3) or [Hq D] / [Hk D] (the whole
            projection: OLMo-2), applied before RoPE; or None.
        post_attn, post_ffn: float32 [H] norms of the attention / MLP output before the residual
            add (Gemma-2/3 sandwich, OLMo-2), or None.
        pre_norm: False skips ln1 and ln2 (OLMo-2 normalises only after each branch).
        act: "silu" or "gelu_tanh" (Gemma), the gate's activation.
        window: > 0 attends to the last ``window`` positions only (sliding-window attention).
        softcap: > 0 caps the attention logits s to softcap * tanh(s / softcap) (Gemma-2).
        residual_scale: multiplies both branch outputs before the residual add (Granite).
    """

    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    scale: float
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None
    post_ffn: torch.Tensor | None = None
    pre_norm: bool = True
    act: str = "silu"
    window: int = 0
    softcap: float = 0.0
    residual_scale: float = 1.0

    PROJECTIONS = ("qkv", "o", "gate_up", "down")

    @property
    def hidden(self) -> int:
        return self.ln1.shape[0]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) each projection must have."""
        h, hq, hk, d, i = self.hidden, self.n_heads, self.n_kv, self.head_dim, self.intermediate
        return {"qkv": ((hq + 2 * hk) * d, h), "o": (h, hq * d), "gate_up": (2 * i, h), "down": (h, i)}

    def check(self, op: str) -> None:
        """Raise KernelInputError unless the sizes and every tensor agree."""
        check_tensor(op, "ln1", self.ln1, (torch.float32,), dim=1)
        check_tensor(op, "ln2", self.ln2, (torch.float32,), tuple(self.ln1.shape))
        if not (self.n_kv >= 1 and self.n_heads % self.n_kv == 0 and self.head_dim % 2 == 0 and self.intermediate >= 1):
            fail(op, f"inconsistent sizes: n_heads={self.n_heads}, n_kv={self.n_kv}, head_dim={self.head_dim}, "
                     f"intermediate={self.intermediate}")
        for name, (n, k) in self.shapes().items():
            p = getattr(self, name)
            if (p.weight.out_features, p.weight.in_features) != (n, k):
                fail(op, f"{name} must be {n} x {k} (out x in), got "
                         f"{p.weight.out_features} x {p.weight.in_features}")
            if p.bias is not None:
                check_tensor(op, f"{name} bias", p.bias, (torch.float32,), (n,))
        self._check_extras(op)

    def _check_extras(self, op: str) -> None:
        """The family switches (see the class docstring)."""
        d, hq, hk = self.head_dim, self.n_heads, self.n_kv
        if (self.q_norm is None) != (self.k_norm is None):
            fail(op, "q_norm and k_norm come together")
        if self.q_norm is not None:
            whole = self.q_norm.shape != (d,) or hq == 1
            check_tensor(op, "q_norm", self.q_norm, (torch.float32,), (hq * d,) if whole else (d,))
            check_tensor(op, "k_norm", self.k_norm, (torch.float32,), (hk * d,) if whole else (d,))
        for name in ("post_attn", "post_ffn"):
            if getattr(self, name) is not None:
                check_tensor(op, name, getattr(self, name), (torch.float32,), tuple(self.ln1.shape))
        if self.act not in ("silu", "gelu_tanh"):
            fail(op, f"act must be 'silu' or 'gelu_tanh', got {self.act!r}")
        if self.window < 0 or self.softcap < 0:
            fail(op, f"window={self.window} and softcap={self.softcap} must be >= 0 (0: none)")
