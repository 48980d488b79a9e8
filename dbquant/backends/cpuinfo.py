"""Which CPUs compute bf16 matmuls fast enough to be worth the rounding.

One rule, used by ``--dad-autocast auto``, ``--bw-autocast auto`` and the CPU backend's bf16 prefill
GEMM. It is a fixed reading of ``/proc/cpuinfo`` (vendor, family, flags), never a timing, so the
choice, and with it every number a calibration produces, is the same on every run of one machine.

What was measured (docs/RESULTS.md, ``benchmarks/dad_throughput.py``):
- AMD Zen 5 (family 26) with AVX512-BF16: DAD under bf16 autocast at 2.15x the fp32 tokens/s, and
  torch's bf16 GEMM at ~4x its fp32 one (full-width ``vdpbf16ps``);
- Intel Sapphire-Rapids class with AVX512-BF16 but no AMX: 0.82x, slower; it does not count;
- an Intel Xeon with AMX-BF16 (oneDNN's tile GEMM; 2026-12-02): DAD 1.60x, a block-wise training step
  1.62x, the fp32 teacher's forward 2.07x under bf16;
- AMD Zen 4 (family 25 with AVX512-BF16, 512-bit ops on a 256-bit datapath; 2026-12-04): DAD 1.53x
  with the latent weights, 1.54x scales only, and the decoder's 128-token prefill 1.9-2.0x by the bf16
  GEMM (``bench --e2e``). Zen 3 is family 25 too, but has no AVX512-BF16, so the flag tells them apart.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ZEN4_FAMILY = 25  # AMD "cpu family" 0x19: Zen 3 and Zen 4 (only Zen 4 has AVX512-BF16)
ZEN5_FAMILY = 26  # AMD "cpu family" 0x1A


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """``{"vendor": str, "family": int | None, "flags": set[str]}`` of the first CPU in
    /proc/cpuinfo (empty vendor and flags where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"vendor": "", "family": None, "flags": set()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough: every core of a VM is the same model
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    family = fields.get("cpu family", "")
    return {"vendor": fields.get("vendor_id", ""), "family": int(family) if family.isdigit() else None,
            "flags": set(fields.get("flags", "").split())}


def bf16_kind(info: dict | None = None) -> str | None:
    """Which kind of fast bf16 this CPU has: ``"amx"`` (AMX-BF16 tiles), ``"zen5"`` (AMD family >= 26
    with AVX512-BF16), ``"zen4"`` (AMD family 25 with AVX512-BF16), or None where bf16 matmuls do not
    pay (the rule above). The time model (calibration/budget.py) keeps one measured cost factor per kind.

    info: a :func:`cpu_info` dict (default: this machine's). AMX is asked of torch's own probe where
    the build has it and no ``info`` is given, else read from the flags.
    """
    if info is None:
        probe = getattr(torch._C._cpu, "_is_amx_tile_supported", None)
        if probe is not None and probe():
            return "amx"
        info = cpu_info()
    flags = info["flags"]
    if "amx_bf16" in flags:
        return "amx"
    if info["vendor"] == "AuthenticAMD" and "avx512_bf16" in flags:
        family = info["family"] or 0
        if family >= ZEN5_FAMILY:
            return "zen5"
        if family == ZEN4_FAMILY:
            return "zen4"
    return None


def fast_bf16_cpu(info: dict | None = None) -> bool:
    """Whether this CPU's bf16 matmuls beat fp32 ones by enough to use them (:func:`bf16_kind`)."""
    return bf16_kind(info) is not None
