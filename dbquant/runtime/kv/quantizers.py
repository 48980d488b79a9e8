"""KV-cache quantizers: pure function pairs ``quantize_*`` -> packed dict, ``dequantize_*`` -> fp32.

Every quantizer works on a block of ``G`` consecutive tokens (a *group*, default 32)
given as ``x``: float tensor ``[..., G, C]`` (leading dims are usually batch, kv head,
group index; ``C`` channels = head_dim). It returns a dict of tensors whose leading
dims are ``[...]``: packed integer codes (``uint8``) and scales at their stored width.
Nothing else is kept, so ``packed_nbytes`` of the dict is what the cache really holds.

Formats (bit order everywhere: element ``i`` of a packed run sits in byte ``i // k``
at bits ``(i % k) * b`` .. , least significant first, ``k = 8 // b`` codes per byte):

==========  ====================================================================
asym2       2-bit asymmetric min/max codes along the token axis, per channel:
            ``codes`` uint8 [..., C, G/4], ``min``/``scale`` [..., C];
            ``x ~ min + scale * q``, ``q in {0,1,2,3}``
sign1       signed 1-bit codes with a mean-|x| scale per channel:
            ``bits`` uint8 [..., C, G/8], ``scale`` [..., C]; ``x ~ scale * (2b - 1)``
            (levels {-scale, +scale}: the authors' {0, scale} bug is not copied)
ternary     1.58-bit codes per channel, 5 trits per byte over the flattened [C, G]
            block: ``trits`` uint8 [..., ceil(C*G/5)], ``scale`` [..., C];
            code ``t = sign(x)`` where ``|x| > 0.5 * mean|x|`` else 0; ``x ~ scale * t``
            (scale stored and applied: the authors' scale-less bug is not copied)
keys_mixed  VidKV keys: per group, the ``n_anom`` channels of largest range get asym2;
            the rest are rfft'd along the channel axis (``norm="ortho"``) into exactly
            ``n`` real coefficients (real parts 0..n/2, imaginary parts 1..n/2-1: the
            always-zero ones are not stored) which get sign1 codes. ``mask`` uint8
            [..., C/8] marks the anomalous channels (stored only when both parts exist).
==========  ====================================================================

Scales are stored as fp16 (``scale_dtype="fp16"``, 16 bits each) or as fp8 e4m3 with
one fp16 factor per block (``"fp8"``, ~8 bits each). Codes are always chosen against
the *stored* (rounded) scales, so dequantization reproduces exactly what was fitted.
"""

from __future__ import annotations

import torch

from ...errors import DbquantError

SCALE_DTYPES = ("fp16", "fp8")
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


# ---------------------------------------------------------------- bit packing

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` with values < 2**bits -> uint8 ``[..., n * bits / 8]`` (LSB first).

    ``bits`` in {1, 2, 4}; ``n`` must be a multiple of ``8 // bits``.
    """
    per = 8 // bits
    if bits not in (1, 2, 4) or codes.shape[-1] % per:
        raise DbquantError(f"cannot pack {codes.shape[-1]} codes of {bits} bits into whole bytes")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., m]`` -> uint8 codes ``[..., m * 8 / bits]``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``[..., n]`` in {-1, 0, 1} -> uint8 ``[..., ceil(n / 5)]``, base 3, digit 0 first."""
    n = t.shape[-1]
    pad = (-n) % TRITS_PER_BYTE
    d = (t.to(torch.int32) + 1)
    if pad:
        d = torch.nn.functional.pad(d, (0, pad), value=1)  # pads decode to 0 and are cut by n
    d = d.reshape(*t.shape[:-1], -1, TRITS_PER_BYTE)
    return (d * _POW3.to(t.device)).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: uint8 ``[..., m]`` -> int8 ``[..., n]`` in {-1, 0, 1}."""
    p = packed.to(torch.int32).unsqueeze(-1)
    d = torch.div(p, _POW3.to(packed.device), rounding_mode="floor") % 3
    return (d.flatten(-2)[..., :n] - 1).to(torch.int8)


# ---------------------------------------------------------------- scale storage

def check_scale_dtype(scale_dtype: str) -> str:
    if scale_dtype not in SCALE_DTYPES:
        raise DbquantError(f"scale dtype {scale_dtype!r} is not supported; use one of {', '.join(SCALE_DTYPES)}")
    return scale_dtype


def store_scales(s: torch.Tensor, scale_dtype: str, name: str) -> dict[str, torch.Tensor]:
    """fp32 ``[..., C]`` -> the stored tensors (``name`` and, for fp8, ``name + "_f"`` [..., 1])."""
    if scale_dtype == "fp16":
        return {name: s.to(torch.float16)}
    check_scale_dtype(scale_dtype)
    # one fp16 factor per block maps its largest |scale| onto e4m3's top (448), so the
    # 3-bit mantissa keeps ~6% relative precision whatever the magnitude of the block
    f = (s.abs().amax(-1, keepdim=True) / _FP8_MAX).to(torch.float16).float()
    f = torch.where(f > 0, f, torch.ones_like(f))
    return {name: (s / f).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8), name + "_f": f.to(torch.float16)}


def load_scales(q: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The fp32 scales a packed dict stores under ``name``."""
    s = q[name].float()
    f = q.get(name + "_f")
    return s if f is None else s * f.float()


def _roundtrip_scales(s: torch.Tensor, scale_dtype: str, name: str):
    stored = store_scales(s, scale_dtype, name)
    return stored, load_scales(stored, name)


# ---------------------------------------------------------------- asym2

def quantize_asym2(x: torch.Tensor, scale_dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """2-bit asymmetric min/max codes along the token axis, one (min, scale) per channel.

    x: float [..., G, C] with G % 4 == 0. Returns {"codes": uint8 [..., C, G/4],
    "min": [..., C], "scale": [..., C]} (plus fp8 factors).
    """
    xf = x.float().transpose(-1, -2)  # [..., C, G]: tokens last, so a channel's codes are contiguous
    mn, mx = xf.amin(-1), xf.amax(-1)
    smin, mn_q = _roundtrip_scales(mn, scale_dtype, "min")
    ssc, sc_q = _roundtrip_scales((mx - mn) / 3, scale_dtype, "scale")
    inv = torch.where(sc_q > 0, 1.0 / sc_q, torch.zeros_like(sc_q))
    q = torch.round((xf - mn_q.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 3).to(torch.uint8)
    return {"codes": pack_bits(q, 2), **smin, **ssc}


def dequantize_asym2(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> fp32 [..., G, C]."""
    codes = unpack_bits(q["codes"], 2).float()  # [..., C, G]
    x = load_scales(q, "min").unsqueeze(-1) + load_scales(q, "scale").unsqueeze(-1) * codes
    return x.transpose(-1, -2)


# ---------------------------------------------------------------- sign1

def quantize_sign1(x: torch.Tensor, scale_dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """Signed 1-bit codes along the token axis with a mean-|x| scale per channel.

    x: float [..., G, C] with G % 8 == 0. ``b = x >= 0``; dequantized ``scale * (2b - 1)``.
    Returns {"bits": uint8 [..., C, G/8], "scale": [..., C]}.
    """
    xf = x.float().transpose(-1, -2)
    return {"bits": pack_bits((xf >= 0).to(torch.uint8), 1), **store_scales(xf.abs().mean(-1), scale_dtype, "scale")}


def dequantize_sign1(q: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> fp32 [..., G, C]."""
    signs = unpack_bits(q["bits"], 1).float() * 2 - 1  # [..., C, G]
    return (load_scales(q, "scale").unsqueeze(-1) * signs).transpose(-1, -2)


# ---------------------------------------------------------------- ternary

def ternary_codes(x: torch.Tensor) -> torch.Tensor:
    """VidKV's ternary codes of x [..., G, C] per channel: sign(x) where |x| > 0.5 mean|x| else 0 (int8)."""
    a = x.float().abs()
    gamma = a.mean(-2, keepdim=True)
    return torch.where(a > 0.5 * gamma, torch.sign(x.float()), torch.zeros_like(a)).to(torch.int8)


def quantize_ternary(x: torch.Tensor, scale_dtype: str = "fp16", fit: bool = True) -> dict[str, torch.Tensor]:
    """1.58-bit ternary codes per channel (see :func:`ternary_codes`) with one scale per channel.

    ``fit=True`` stores the least-squares scale for the chosen codes (mean |x| over the
    nonzero codes, never worse than gamma); ``fit=False`` stores gamma = mean |x| (the paper).
    x: float [..., G, C]. Returns {"trits": uint8 [..., ceil(G*C/5)], "scale": [..., C]}.
    """
    t = ternary_codes(x)  # [..., G, C]
    a = x.float().abs()
    if fit:
        nz = (t != 0).float()
        scale = (a * nz).sum(-2) / nz.sum(-2).clamp(min=1)
    else:
        scale = a.mean(-2)
    return {"trits": pack_trits(t.transpose(-1, -2).flatten(-2)), **store_scales(scale, scale_dtype, "scale")}


def dequantize_ternary(q: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """-> fp32 [..., G, C] (G = ``group``, C from the scales)."""
    s = load_scales(q, "scale")  # [..., C]
    c = s.shape[-1]
    t = unpack_trits(q["trits"], c * group).reshape(*s.shape, group).float()  # [..., C, G]
    return (s.unsqueeze(-1) * t).transpose(-1, -2)


# ---------------------------------------------------------------- real <-> rfft coefficients

def rfft_real(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] (n even) -> its n real rfft degrees of freedom [..., n] (orthonormal scaling).

    Layout: Re c_0 .. Re c_{n/2}, then Im c_1 .. Im c_{n/2-1} (Im c_0 and Im c_{n/2} are 0
    for real input and are not stored, so n channels cost exactly n coefficients).
    """
    n = x.shape[-1]
    c = torch.fft.rfft(x.float(), dim=-1, norm="ortho")
    return torch.cat([c.real, c.imag[..., 1:n // 2]], dim=-1)


def irfft_real(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rfft_real`: [..., n] -> [..., n]."""
    n = y.shape[-1]
    h = n // 2 + 1
    imag = torch.zeros_like(y[..., :h])
    imag[..., 1:n // 2] = y[..., h:]
    return torch.fft.irfft(torch.complex(y[..., :h], imag), n=n, dim=-1, norm="ortho")


# ---------------------------------------------------------------- rotation

def hadamard(n: int, device=None) -> torch.Tensor | None:
    """The orthonormal Sylvester Hadamard matrix fp32 [n, n] (symmetric, its own inverse), or None
    when n is not a power of two."""
    if n < 1 or n & (n - 1):
        return None
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


# ---------------------------------------------------------------- VidKV keys

def n_anomalous(key_bits: float, channels: int) -> int:
    """Channels given 2-bit codes for a nominal ``key_bits`` in [1, 2]: round((key_bits - 1) * C)."""
    return int(round((key_bits - 1) * channels))


def quantize_keys_mixed(x: torch.Tensor, n_anom: int, fft: bool = True,
                        scale_dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """VidKV keys for one or more groups: anomalous channels -> asym2, normal -> 1-bit (FFT'd) sign1.

    x: float [..., G, C]; ``0 <= n_anom <= C``; C % 8 == 0 and the normal count even.
    Returns {"mask": uint8 [..., C/8], "anom.*": asym2 of [..., G, n_anom], "norm.*": sign1 of
    [..., G, C - n_anom]} (a part is absent when it has no channels).
    """
    c = x.shape[-1]
    xf = x.float()
    rng = xf.amax(-2) - xf.amin(-2)  # [..., C]
    # stable order so ties (e.g. constant channels) resolve the same way every time
    order = torch.argsort(rng, dim=-1, descending=True, stable=True)
    is_anom = torch.zeros_like(rng, dtype=torch.bool).scatter(-1, order[..., :n_anom], True)
    # the mask is only needed when both parts exist (K1 and K2 spend no bits on it)
    out = {"mask": pack_bits(is_anom.to(torch.uint8), 1)} if 0 < n_anom < c else {}
    anom_idx, norm_idx = _split_channels(is_anom, n_anom)
    if n_anom:
        out.update({"anom." + k: v for k, v in quantize_asym2(_gather(xf, anom_idx), scale_dtype).items()})
    if n_anom < c:
        normal = _gather(xf, norm_idx)
        if fft:
            normal = rfft_real(normal)
        out.update({"norm." + k: v for k, v in quantize_sign1(normal, scale_dtype).items()})
    return out


def dequantize_keys_mixed(q: dict[str, torch.Tensor], group: int, channels: int, n_anom: int,
                          fft: bool = True) -> torch.Tensor:
    """-> fp32 [..., G, C]."""
    some = next(iter(q.values()))
    if "mask" in q:
        is_anom = unpack_bits(q["mask"], 1).bool()  # [..., C]
    else:  # all channels in one part; leading dims from any stored tensor
        lead = some.shape[:-2]  # "anom.codes" [..., C, G/4] or "norm.bits" [..., C, G/8]
        is_anom = torch.full((*lead, channels), n_anom > 0, dtype=torch.bool, device=some.device)
    anom_idx, norm_idx = _split_channels(is_anom, n_anom)
    lead = is_anom.shape[:-1]
    out = torch.empty(*lead, group, channels, dtype=torch.float32, device=some.device)
    if n_anom:
        a = dequantize_asym2({k[5:]: v for k, v in q.items() if k.startswith("anom.")})
        out.scatter_(-1, anom_idx.unsqueeze(-2).expand(*lead, group, n_anom), a)
    if n_anom < channels:
        y = dequantize_sign1({k[5:]: v for k, v in q.items() if k.startswith("norm.")})
        if fft:
            y = irfft_real(y)
        out.scatter_(-1, norm_idx.unsqueeze(-2).expand(*lead, group, channels - n_anom), y)
    return out


def _split_channels(is_anom: torch.Tensor, n_anom: int):
    """Sorted channel indices (anomalous [..., n_anom], normal [..., C - n_anom]) from a bool mask."""
    # argsort of (not anomalous, channel) puts anomalous channels first, each part in channel order
    c = is_anom.shape[-1]
    key = (~is_anom).long() * c + torch.arange(c, device=is_anom.device)
    idx = torch.argsort(key, dim=-1)
    return idx[..., :n_anom], idx[..., n_anom:]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., G, C], idx [..., n] -> x[..., :, idx] [..., G, n]."""
    return x.gather(-1, idx.unsqueeze(-2).expand(*idx.shape[:-1], x.shape[-2], idx.shape[-1]))


# ---------------------------------------------------------------- accounting

def packed_nbytes(q: dict[str, torch.Tensor]) -> int:
    """Bytes actually held by a packed dict's tensors."""
    return sum(t.numel() * t.element_size() for t in q.values())


def effective_bits(q: dict[str, torch.Tensor], n_values: int) -> float:
    """Stored bits per quantized value: every code, scale, min, factor and mask counted."""
    return 8 * packed_nbytes(q) / n_values

