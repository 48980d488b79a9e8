"""Machine facts for benchmark files, and the size of a working set that cannot stay in cache.

:func:`environment` is what every ``dbquant bench`` JSON stores under ``"environment"``: CPU
model, core count, the ISA flags that decide which kernel paths exist (a fixed subset of
``/proc/cpuinfo``), cache sizes per level and the load average. :func:`stream_set_bytes` sizes
the rotating set of the streaming benchmarks from the last-level cache read at run time.

Everything here reads Linux files (``/proc``, ``/sys``) or ``lscpu``; elsewhere the fields are
``None`` or empty and the callers fall back to stated defaults.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from ..backends import cpu as cpu_backend
from ..backends.cpuinfo import cpu_info, fast_bf16_cpu

SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"
# The flags that decide which paths dbquant's and llama.cpp's CPU kernels can take.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx512_vpopcntdq", "amx_tile", "amx_int8", "amx_bf16")
STREAM_L3_MULTIPLE = 4  # the rotating set is this many last-level caches...
STREAM_MEM_FRACTION = 0.25  # ...but at most this share of MemAvailable (a shared machine)
DEFAULT_L3 = 32 << 20  # when no cache size can be read (stated in the result as "default")


def _size_bytes(text: str) -> int:
    """``"48K"``, ``"2048K"``, ``"260M"``, ``"272629760"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a cache size: {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]


def cache_sizes(sysfs: str = SYSFS_CACHE) -> dict:
    """Per-core (L1d, L2) and per-instance (L3) cache sizes in bytes, and where they were read.

    Returns ``{"l1d": int|None, "l2": int|None, "l3": int|None, "source": "sysfs"|"lscpu"|None}``.
    sysfs (``index*/level``, ``type``, ``size`` of cpu0) first; then ``lscpu -B``, whose figures are
    totals over instances (divided back here).
    """
    out = {"l1d": None, "l2": None, "l3": None, "source": None}
    for idx in sorted(Path(sysfs).glob("index*")):
        try:
            level = int((idx / "level").read_text())
            kind = (idx / "type").read_text().strip()
            size = _size_bytes((idx / "size").read_text())
        except (OSError, ValueError):
            continue
        key = {1: "l1d" if kind == "Data" else None, 2: "l2", 3: "l3"}.get(level)
        if key:
            out[key] = size
            out["source"] = "sysfs"
    if out["source"]:
        return out
    try:
        text = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    for key, name in (("l1d", "L1d"), ("l2", "L2"), ("l3", "L3")):
        m = re.search(rf"^{name} cache:\s*(\d+)(?:\s*\((\d+) instances?\))?", text, re.MULTILINE)
        if m:
            out[key] = int(m.group(1)) // int(m.group(2) or 1)
            out["source"] = "lscpu"
    return out


def mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (None where there is no /proc/meminfo)."""
    try:
        with open(meminfo) as f:
            return next((int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None


def stream_set_bytes(l3: int | None = None, available: int | None = None) -> dict:
    """How many bytes a streaming benchmark rotates through (or reads) so that no call finds its
    data in cache: ``STREAM_L3_MULTIPLE`` x the L3, capped at ``STREAM_MEM_FRACTION`` of MemAvailable.

    Args: ``l3`` and ``available`` in bytes; read from this machine when None.
    Returns ``{"bytes", "l3_bytes", "l3_source", "mem_available", "capped_by_memory"}``:
    ``capped_by_memory`` says the set is smaller than the multiple asked (then the JSON says so).
    """
    source = "given"
    if l3 is None:
        sizes = cache_sizes()
        l3, source = sizes["l3"] or sizes["l2"], sizes["source"]
        if l3 is None:
            l3, source = DEFAULT_L3, "default"
    if available is None:
        available = mem_available()
    want = STREAM_L3_MULTIPLE * l3
    cap = int(available * STREAM_MEM_FRACTION) if available else want
    return {"bytes": min(want, cap), "l3_bytes": l3, "l3_source": source, "mem_available": available,
            "capped_by_memory": cap < want}


def cpu_model_and_flags(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(model name, the ISA_FLAGS this CPU has, in ISA_FLAGS order); the platform's name and [] off Linux."""
    model, flags, found = platform.processor() or platform.machine(), set(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:  # the first processor's "model name" and "flags" lines
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and key not in found:
                    model = value.strip()
                elif key == "flags" and key not in found:
                    flags = set(value.split())
                else:
                    continue
                found.add(key)
                if len(found) == 2:
                    break
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def environment() -> dict:
    """Machine facts stored with every result file: torch version, CPU model, vendor and family, cores,
    ISA flags, dbquant's built kernel paths (``isas``, fastest first) and the decode GEMV's tables on the
    fastest (``default_lut``: float, int8 or int16, DBQUANT_CPU_LUT included), whether bf16 GEMMs count as
    fast here (``fast_bf16``: backends/cpuinfo.py), cache sizes (bytes), load average, time."""
    isas, lut = [], None
    try:
        if cpu_backend.load_cpu():
            isas = list(torch.ops.dbquant.cpu_isas())
            lut = cpu_backend.default_lut()
    except Exception:  # noqa: BLE001 - informational only
        pass
    model, flags = cpu_model_and_flags()
    caches = cache_sizes()
    info = cpu_info()
    return dict(torch=torch.__version__, cpu=model, cpu_vendor=info["vendor"], cpu_family=info["family"],
                cores=os.cpu_count(), isa_flags=flags, isas=isas, default_lut=lut, fast_bf16=fast_bf16_cpu(),
                l1d_bytes=caches["l1d"], l2_bytes=caches["l2"], l3_bytes=caches["l3"], cache_source=caches["source"],
                mem_available=mem_available(),
                loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"), **gpu_info())


def gpu_info() -> dict:
    """The GPU facts of a result file: ``gpu`` (name, or None without a CUDA device), and with one
    ``gpu_capability`` ("9.0"), ``gpu_sms``, ``gpu_memory_bytes``, ``cuda`` (torch's CUDA version)
    and ``triton`` (its version, or None when it does not import)."""
    if not torch.cuda.is_available():
        return {"gpu": None}
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_sms=p.multi_processor_count,
                gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda, triton=triton_version)
