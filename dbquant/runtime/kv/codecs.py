"""Codecs: how a cache layer turns whole token groups of K and V into packed dicts and back.

A codec sees cache states ``x``: float ``[B, H, n*G, D]`` (batch, kv heads, tokens,
head_dim) whose token count is a multiple of the group ``G``, and returns packed dicts
whose tensors all have leading dims ``[B, H, n]``, so a layer can append groups with
``torch.cat(dim=2)`` and select beams with ``index_select(0)`` without unpacking.
"""

from __future__ import annotations

import torch

from ...errors import DbquantError
from . import quantizers as Q
from .spec import KVSpec


def _groups(x: torch.Tensor, g: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.reshape(b, h, t // g, g, d)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    b, h, n, g, d = x.shape
    return x.reshape(b, h, n * g, d)


class VidKVCodec:
    """VidKV: mixed-precision (FFT) keys, ternary or 2-bit per-channel values, optional STP."""

    def __init__(self, spec: KVSpec, head_dim: int):
        self.spec, self.g, self.d = spec, spec.group, head_dim
        self.n_anom = Q.n_anomalous(spec.key_bits, head_dim)
        if head_dim % 8 or (head_dim - self.n_anom) % 2:
            raise DbquantError(f"head_dim {head_dim} cannot be packed by the VidKV cache: it must be a multiple "
                               f"of 8 (channel masks are byte-packed, the rfft needs an even channel count)")
        self.ternary = spec.value_bits < 2
        # STP's refinement bits see the head dim Hadamard-rotated: the rotation spreads a token's
        # residual evenly over D, where one sign bit and one scale fit it best (no rotation when D is not 2^k)
        self.rot = Q.hadamard(head_dim)

    def quantize_keys(self, x: torch.Tensor) -> dict:
        return Q.quantize_keys_mixed(_groups(x, self.g), self.n_anom, self.spec.fft, self.spec.scale_dtype)

    def dequantize_keys(self, q: dict) -> torch.Tensor:
        return _tokens(Q.dequantize_keys_mixed(q, self.g, self.d, self.n_anom, self.spec.fft))

    def quantize_values(self, x: torch.Tensor, protected: torch.Tensor | None = None) -> dict:
        """x [B, H, T, D]; protected: bool [B, T] (STP: tokens whose values get a refinement bit) or None.

        STP: every token keeps its ternary code (so unprotected tokens decode exactly as
        without STP); a protected token also stores, per head, the sign of its ternary
        residual over the rotated head dim and one fp16 mean-|residual| scale (1 bit + 16 bits per
        D values: ~2.85 bits per protected value with the trits at D = 64). With that least-squares scale
        the refinement never increases a token's error; for a Gaussian-like residual it
        removes ~64% (1 - 2/pi) of it.
        """
        if not self.ternary:
            return Q.quantize_asym2(_groups(x, self.g), self.spec.scale_dtype)
        q = Q.quantize_ternary(_groups(x, self.g), self.spec.scale_dtype, self.spec.fit)
        if protected is None or not protected.any():
            return q
        b_idx, t_idx = protected.nonzero(as_tuple=True)
        approx = _tokens(Q.dequantize_ternary(q, self.g))[b_idx, :, t_idx, :]  # [P, H, D] as decoded
        res = x[b_idx, :, t_idx, :].float() - approx
        if self.rot is not None:
            res = res @ self.rot.to(res.device)
        # per (token, head) over D; fp16 scales (fp8 would add an fp16 factor per scale here)
        side = Q.quantize_sign1(res.unsqueeze(-1), "fp16")
        return {**q, "stp": {"pos": torch.stack([b_idx, t_idx]).to(torch.int32), **side}}

    def dequantize_values(self, q: dict) -> torch.Tensor:
        if not self.ternary:
            return _tokens(Q.dequantize_asym2(q))
        x = _tokens(Q.dequantize_ternary({k: v for k, v in q.items() if k != "stp"}, self.g))
        side = q.get("stp")
        if side is not None:
            pos = side["pos"].long()
            res = Q.dequantize_sign1({k: v for k, v in side.items() if k != "pos"}).squeeze(-1)  # [P, H, D]
            if self.rot is not None:
                res = res @ self.rot.to(res.device)
            x[pos[0], :, pos[1], :] += res
        return x


class KIVICodec:
    """KIVI-style 2-bit: keys per channel (groups of G tokens), values per token (over the head dim)."""

    def __init__(self, spec: KVSpec, head_dim: int):
        if head_dim % 4:
            raise DbquantError(f"head_dim {head_dim} cannot be packed by the KIVI cache: values are 2-bit "
                               "packed along the head dim, which must be a multiple of 4")
        self.spec, self.g, self.d = spec, spec.group, head_dim

    def quantize_keys(self, x):
        return Q.quantize_asym2(_groups(x, self.g), self.spec.scale_dtype)

    def dequantize_keys(self, q):
        return _tokens(Q.dequantize_asym2(q))

    def quantize_values(self, x, protected=None):
        # per token: the "token" axis of asym2 is the head dim, its "channels" the G tokens
        return Q.quantize_asym2(_groups(x, self.g).transpose(-1, -2), self.spec.scale_dtype)

    def dequantize_values(self, q):
        return _tokens(Q.dequantize_asym2(q).transpose(-1, -2))


CODECS = {"vidkv": VidKVCodec, "kivi": KIVICodec}


def make_codec(spec: KVSpec, head_dim: int):
    if spec.method not in CODECS:
        raise DbquantError(f"KV method {spec.method!r} has no dbquant codec (available: {', '.join(CODECS)})")
    return CODECS[spec.method](spec, head_dim)
