"""What KV cache to build: a frozen spec and its one-string spelling (``--kv``).

Spellings (case-insensitive):

=============  ==============================================================
``fp``         transformers' ``DynamicCache`` (model dtype, nothing quantized)
``K/V``        VidKV: key bits K in {1, 1.25, 1.5, 1.75, 2}, value bits V in {1.58, 2},
               e.g. ``1.5/1.58`` (the paper's default), ``2/2``
``kivi2``      KIVI-style 2-bit: keys per channel, values per token (same grouping/residual)
``hqq2``       transformers' own ``QuantizedCache(backend="hqq", nbits=2)``
``hqq1``       the same at 1 bit
=============  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ...errors import DbquantError
from .quantizers import check_scale_dtype

KEY_BITS = (1.0, 1.25, 1.5, 1.75, 2.0)
VALUE_BITS = (1.58, 2.0)
METHODS = ("fp", "vidkv", "kivi", "hqq")
DEFAULT_RESIDUAL = 128
DEFAULT_GROUP = 32
# Tokens at the start of the sequence kept in full precision. Position 0 is an attention
# sink (it draws a large share of every head's attention), so its quantization error is
# multiplied into every output: keeping one token exact takes K1.5/V1.58's kv-ppl from
# +20% to +4% over the fp cache on SmolLM2 (docs/RESULTS.md) for 1/T of the fp bytes.
DEFAULT_SINK = 1
# Stored scale width by method: VidKV's fp8 scales (e4m3 + one fp16 factor per block) cost
# 0.3 bits per value less than fp16 at the same kv-ppl (docs/RESULTS.md), which is what puts
# K1.5/V1.58 under 1/8 of the fp16 cache; the KIVI baseline keeps its paper's fp16.
DEFAULT_SCALES = {"vidkv": "fp8", "kivi": "fp16"}
SPELLINGS = "fp, K/V (K in 1,1.25,1.5,1.75,2; V in 1.58,2; e.g. 1.5/1.58), kivi2, hqq2, hqq1"


@dataclass(frozen=True)
class KVSpec:
    """A KV-cache configuration.

    method: fp | vidkv | kivi | hqq. key_bits/value_bits: VidKV's nominal bits (kivi: 2/2;
    hqq: both = nbits). residual: most recent tokens kept in full precision. sink: first
    tokens kept in full precision (attention sinks; vidkv/kivi only). group: tokens
    per quantization group. fft: VidKV's FFT on normal key channels (the ablation switch).
    scale_dtype: fp16 or fp8 (e4m3 + an fp16 factor per block; default per DEFAULT_SCALES). fit: ternary values use
    the least-squares scale of their codes instead of mean |x|.
    """

    method: str = "vidkv"
    key_bits: float = 1.5
    value_bits: float = 1.58
    residual: int = DEFAULT_RESIDUAL
    sink: int = DEFAULT_SINK
    group: int = DEFAULT_GROUP
    fft: bool = True
    scale_dtype: str = "fp8"
    fit: bool = True

    def check(self) -> "KVSpec":
        if self.method not in METHODS:
            raise DbquantError(f"unknown KV method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "vidkv":
            if not any(math.isclose(self.key_bits, b) for b in KEY_BITS):
                raise DbquantError(f"VidKV key bits {self.key_bits:g} unsupported; use one of "
                                   f"{', '.join(f'{b:g}' for b in KEY_BITS)}")
            if not any(math.isclose(self.value_bits, b) for b in VALUE_BITS):
                raise DbquantError(f"VidKV value bits {self.value_bits:g} unsupported; use one of "
                                   f"{', '.join(f'{b:g}' for b in VALUE_BITS)}")
        if self.method == "hqq" and int(self.key_bits) not in (1, 2, 3, 4, 8):
            raise DbquantError(f"HQQ cache bits {self.key_bits:g} unsupported; use 1, 2, 3, 4 or 8")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise DbquantError(f"KV residual window must be an integer >= 0, got {self.residual!r}")
        if not isinstance(self.group, int) or self.group < 8 or self.group % 8:
            raise DbquantError(f"KV group size must be a multiple of 8 (1-bit codes are byte-packed "
                               f"along tokens), got {self.group!r}")
        if not isinstance(self.sink, int) or not 0 <= self.sink < self.group:
            raise DbquantError(f"KV sink (first tokens kept in full precision, inside group 0) must be an integer "
                               f"in [0, group {self.group}), got {self.sink!r}")
        check_scale_dtype(self.scale_dtype)
        return self

    @property
    def name(self) -> str:
        if self.method == "vidkv":
            s = f"K{self.key_bits:g}/V{self.value_bits:g}"
            if not self.fft and self.key_bits < 2:
                s += " no-FFT"
            return s + self._suffix
        if self.method == "kivi":
            return "KIVI-2" + self._suffix
        if self.method == "hqq":
            return f"HQQ-cache {int(self.key_bits)}-bit"
        return "fp"

    @property
    def _suffix(self) -> str:
        return ((f" {self.scale_dtype}-scales" if self.scale_dtype != DEFAULT_SCALES.get(self.method) else "")
                + (f" sink{self.sink}" if self.sink != DEFAULT_SINK else ""))

    @property
    def bits_label(self) -> str:
        """``kv_bits`` in JSON: ``"K/V"`` nominal bits, or ``"fp"``."""
        if self.method == "fp":
            return "fp"
        return f"{self.key_bits:g}/{self.value_bits:g}"


def parse_kv(text: str, **overrides) -> KVSpec:
    """A ``--kv`` spelling (see the module docstring) -> a checked :class:`KVSpec`.

    ``overrides`` (residual, sink, group, fft, scale_dtype, fit) replace the defaults; ``None``
    values are ignored.
    """
    t = text.strip().lower()
    opts = {k: v for k, v in overrides.items() if v is not None}
    if t == "fp":
        spec = KVSpec(method="fp")
    elif t == "kivi2":
        spec = KVSpec(method="kivi", key_bits=2.0, value_bits=2.0, scale_dtype=DEFAULT_SCALES["kivi"])
    elif t.startswith("hqq") and t[3:].isdigit():
        spec = KVSpec(method="hqq", key_bits=float(t[3:]), value_bits=float(t[3:]))
    elif "/" in t:
        k, _, v = t.partition("/")
        try:
            spec = KVSpec(method="vidkv", key_bits=float(k.lstrip("k")), value_bits=float(v.lstrip("v")))
        except ValueError:
            raise DbquantError(f"cannot read KV bits {text!r}; spellings: {SPELLINGS}") from None
    else:
        raise DbquantError(f"unknown KV cache {text!r}; spellings: {SPELLINGS}")
    return replace(spec, **opts).check()
