"""The packed VidKV cache as the ``kv_attend`` op reads it: one layer's buffers (kernel layout).

The buffers are filled group by group by :class:`dbquant.runtime.kv.packed.PackedKVCache` (and
can be filled by hand in tests). Layout (docs/FORMAT.md, "Packed KV cache"; csrc/cpu/kv_attn.h),
with Hk kv heads of D channels, groups of G tokens, capacity NG groups, ``na`` anomalous key
channels (2-bit) and ``nn = D - na`` normal ones (1-bit, in the frequency domain with FFT):

    kmask   uint8 [Hk, NG, D/8 or 0]  bit c set: channel c is anomalous (absent when na is 0 or D)
    kcodes  uint8 [Hk, NG, na, G/4]   2-bit codes, 4 tokens per byte (LSB first)
    kmin, kscale  uint8 [Hk, NG, na]  fp8 e4m3 bits; key ~ min + scale * code
    nbits   uint8 [Hk, NG, nn, G/8]   sign bits, 8 tokens per byte; coefficient ~ scale * (2b - 1)
    nscale  uint8 [Hk, NG, nn]        fp8 bits
    vtrits  uint8 [Hk, NG, G ceil(D / 5)]  ternary values, token-major: token t's D trits in bytes
                                      t ceil(D/5) .., 5 base-3 digits (trit + 1) per byte, channel c
                                      in digit c % 5 of byte c / 5 (the codec packs channel-major)
    vscale  uint8 [Hk, NG, D]         fp8 bits; value ~ scale * trit
    factors float32 [Hk, NG, 4]       the fp16 block factors of kmin, kscale, nscale, vscale
    fmat    float32 [nn, nn]          normal keys = coefficients @ fmat (irfft_real's matrix, or I)
    sink_k, sink_v  float32 [Hk, S, D]  exact first S tokens (they replace group 0's rows)
    tail_k, tail_v  float32 [Hk, TC, D] the full-precision tail (residual window and new tokens)

Each part's channels are in ascending channel order. Fill counts are arguments of each call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_tensor, fail

CODE_FIELDS = ("kmask", "kcodes", "kmin", "kscale", "nbits", "nscale", "vtrits", "vscale")
FLOAT_FIELDS = ("factors", "fmat", "sink_k", "sink_v", "tail_k", "tail_v")


@dataclass
class PackedKVLayer:
    """One layer's packed cache (see the module docstring); ``group`` G, ``n_anom`` na."""

    kmask: torch.Tensor
    kcodes: torch.Tensor
    kmin: torch.Tensor
    kscale: torch.Tensor
    nbits: torch.Tensor
    nscale: torch.Tensor
    vtrits: torch.Tensor
    vscale: torch.Tensor
    factors: torch.Tensor
    fmat: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    group: int
    n_anom: int
    native: object = None  # the C++ object over these buffers (backends/cpu.py), built once

    @property
    def n_kv(self) -> int:
        return self.tail_k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.tail_k.shape[2]

    @property
    def capacity(self) -> tuple[int, int]:
        """(groups, tail rows) the buffers hold."""
        return self.vscale.shape[1], self.tail_k.shape[1]


def check_kv_attend(op: str, q, kv: PackedKVLayer, n_groups, n_tail) -> None:
    """q float32 [T, Hq, D] (Hq a multiple of the cache's Hk) and fill counts inside the capacities."""
    for name in CODE_FIELDS:
        check_tensor(op, name, getattr(kv, name), (torch.uint8,))
    for name in FLOAT_FIELDS:
        check_tensor(op, name, getattr(kv, name), (torch.float32,))
    hk, d = kv.n_kv, kv.head_dim
    check_tensor(op, "q", q, (torch.float32,), dim=3)
    if q.shape[2] != d or q.shape[1] % hk or q.shape[1] < hk:
        fail(op, f"q must be [T, Hq, {d}] with Hq a multiple of {hk} kv heads, got {tuple(q.shape)}")
    ng, tc = kv.capacity
    t = q.shape[0]
    for name, v, lo, hi in (("n_groups", n_groups, 0, ng), ("n_tail", n_tail, t, tc)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            fail(op, f"{name} {v!r} must be an int in [{lo}, {hi}] (queries {t}, capacity groups {ng}, tail {tc})")
