"""Codecs: how a cache layer turns whole token groups of K and V into packed dicts and back.

A codec sees cache states ``x``: float ``[B, H, n*G, D]`` (batch, kv heads, tokens,
head_dim) whose token count is a multiple of the group ``G``, and returns packed dicts
whose tensors all have leading dims ``[B, H, n]``, so a layer can append groups with
``torch.cat(dim=2)`` and select beams with ``index_select(0)`` without unpacking.
"""

from __future__ import annotations

import torch

from ..errors import DbquantError
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
        # STP's per-token 2-bit side codes see the head dim Hadamard-rotated: a token's few outlier
        # channels would otherwise set its whole min/max range (no rotation when D is not 2^k)
        self.rot = Q.hadamard(head_dim)

    def quantize_keys(self, x: torch.Tensor) -> dict:
        return Q.quantize_keys_mixed(_groups(x, self.g), self.n_anom, self.spec.fft, self.spec.scale_dtype)

    def dequantize_keys(self, q: dict) -> torch.Tensor:
        return _tokens(Q.dequantize_keys_mixed(q, self.g, self.d, self.n_anom, self.spec.fft))

    def quantize_values(self, x: torch.Tensor, protected: torch.Tensor | None = None) -> dict:
        """x [B, H, T, D]; protected: bool [B, T] (STP: tokens whose values are stored at 2 bits) or None."""
        if not self.ternary:
            return Q.quantize_asym2(_groups(x, self.g), self.spec.scale_dtype)
        if protected is None or not protected.any():
            return Q.quantize_ternary(_groups(x, self.g), self.spec.scale_dtype, self.spec.fit)
        # STP: protected tokens leave the ternary statistics (zeroed there) and are stored
        # per token at 2 bits in a side part: positions + asym2 codes over the (Hadamard-rotated) head dim
        keep = (~protected)[:, None, :, None].to(x.dtype)
        q = Q.quantize_ternary(_groups(x * keep, self.g), self.spec.scale_dtype, self.spec.fit)
        b_idx, t_idx = protected.nonzero(as_tuple=True)
        side = x[b_idx, :, t_idx, :].float()  # [P, H, D]
        if self.rot is not None:
            side = side @ self.rot.to(side.device)
        q2 = Q.quantize_asym2(side.transpose(-1, -2).unsqueeze(-3), self.spec.scale_dtype)  # per token over D
        return {**q, "stp": {"pos": torch.stack([b_idx, t_idx]).to(torch.int32), **q2}}

    def dequantize_values(self, q: dict) -> torch.Tensor:
        if not self.ternary:
            return _tokens(Q.dequantize_asym2(q))
        x = _tokens(Q.dequantize_ternary({k: v for k, v in q.items() if k != "stp"}, self.g))
        side = q.get("stp")
        if side is not None:
            pos = side["pos"].long()
            v2 = Q.dequantize_asym2({k: v for k, v in side.items() if k != "pos"}).squeeze(-3)  # [P, D, H]
            v2 = v2.transpose(-1, -2)  # [P, H, D]
            if self.rot is not None:
                v2 = v2 @ self.rot.to(v2.device)
            x[pos[0], :, pos[1], :] = v2
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
