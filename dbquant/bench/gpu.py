"""GPU benchmark of the ``triton`` and ``cuda`` dual-binary kernels against dense cuBLAS.

For each weight shape (N, K) and activation rows M it times ``y = x @ W.T`` three ways
on the same inputs: the dbquant backend (2-bit planes + fp16 scales, the backend's own
GEMV/GEMM dispatch) and torch's dense ``F.linear`` in the same dtype (cuBLAS on a GPU),
and reports ms, TFLOP/s, GB/s (bytes the kernel must move: packed weight, scales,
activations, output) and the speedup over dense.

**Not yet measured on a GPU**: this workplace has none. On a CPU the kernels run through
Triton's interpreter (``TRITON_INTERPRET=1``); those rows carry ``measured=False`` and
their timings say nothing about GPU speed - that mode (``smoke=True``) only proves the
benchmark runs. On a GPU:

    dbquant bench --backend triton     # once the CLI wires it; until then:
    python -m dbquant.bench.gpu --backend triton --dtype float16

To time the memory-bound case honestly, each timed call uses the next of several copies
of the weights, enough copies that they overflow the GPU's L2 cache (as in a real model,
where each layer's weights are read once per token).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from ..backends import registry
from ..errors import DbquantError

# (N, K) = (out_features, in_features) of the linears of each model.
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # q/k/v/o, gate/up, down
DEFAULT_SHAPES = SMOLLM2_SHAPES + LLAMA7B_SHAPES
DEFAULT_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SMOKE_SHAPES = [(48, 136)]  # K not a multiple of g: the padded path runs too
SMOKE_MS = [1, 17]  # one GEMV-path and one GEMM-path launch
# Weight bytes each timed configuration rotates through on a GPU (H100 L2: 50 MiB).
ROTATE_BYTES = 256 << 20
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROW_KEYS = ("op", "n", "k", "m", "backend", "dtype", "group_size", "ms", "tflops", "gbps",
            "dense_ms", "dense_tflops", "speedup_vs_dense", "copy_gbps", "frac_of_copy", "graph_ms",
            "dense_graph_ms", "graph_gbps", "graph_speedup_vs_dense", "device", "measured")
# Bytes of the device-to-device copy that measures the memory ceiling (far over any L2).
COPY_BYTES = 1 << 30


def run_gpu_bench(backend: str = "triton", shapes: list[tuple[int, int]] | None = None,
                  ms: list[int] | None = None, group_size: int = 64, dtype: str = "float16",
                  warmup: int = 10, iters: int = 50, smoke: bool = False) -> list[dict]:
    """Time ``backend`` against dense torch on every (shape, M).

    Args:
        backend: ``"triton"`` or ``"cuda"`` (any registered ``dbgemm`` backend works).
        shapes: (N, K) weight shapes; default SmolLM2's and Llama-7B's linears
            (``SMOKE_SHAPES`` when ``smoke``).
        ms: activation row counts M; default 1..256 in powers of 2 (``SMOKE_MS`` when
            ``smoke``).
        group_size: g of the packed weights (random planes and scales; speed does not
            depend on the values).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``: activations, output and the
            dense baseline's weight.
        warmup, iters: untimed and timed calls per measurement (warmup also autotunes).
        smoke: a tiny run that works on the CPU under ``TRITON_INTERPRET=1`` (1 warmup,
            2 iterations unless given smaller).
    Returns:
        One dict per (shape, M) with keys :data:`ROW_KEYS`: ``op`` ("dbgemm"), ``n``,
        ``k``, ``m``, ``backend``, ``dtype``, ``group_size``, ``ms`` (mean per call),
        ``tflops`` (2*M*N*K / time), ``gbps`` (packed weight + scales + x + y bytes / time),
        ``dense_ms``, ``dense_tflops``, ``speedup_vs_dense`` (dense_ms / ms), ``copy_gbps`` (the
        memory ceiling measured in the same run: a device-to-device copy, bytes read + written;
        None off a GPU), ``frac_of_copy`` (gbps / copy_gbps, None off a GPU); ``graph_ms``,
        ``dense_graph_ms``, ``graph_gbps``, ``graph_speedup_vs_dense``: the same calls replayed from
        a CUDA graph, i.e. device time without the host's launch overhead, which ``ms`` includes
        (None off a GPU, or when the capture fails: a warning says why); ``device`` (GPU name, or
        "cpu (triton interpreter)"), ``measured`` (True only on a GPU).
    Raises:
        DbquantError: ``backend`` cannot run here (the message says why).
        ValueError: an unknown dtype.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if smoke:
        shapes, ms = shapes or SMOKE_SHAPES, ms or SMOKE_MS
        warmup, iters = min(warmup, 1), min(iters, 2)
    shapes, ms = shapes or DEFAULT_SHAPES, ms or DEFAULT_MS
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernel = registry.get("dbgemm", backend, device)
    measured = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if measured else f"cpu ({_cpu_mode(backend)})"
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(0)
    ceiling = copy_gbps(device) if measured else None

    rows = []
    for n, k in shapes:
        groups = math.ceil(k / group_size)
        kb = groups * group_size // 8
        packed_bytes = 2 * n * kb + n * groups * 2 * 2  # planes + fp16 (alpha1, alpha2)
        dense_bytes = n * k * dt.itemsize
        copies = max(1, math.ceil(ROTATE_BYTES / packed_bytes)) if measured else 1
        dense_copies = max(1, math.ceil(ROTATE_BYTES / dense_bytes)) if measured else 1
        packed = [(torch.randint(0, 256, (2, n, kb), dtype=torch.uint8, generator=gen).to(device),
                   (torch.randn(n, groups, 2, generator=gen) * 0.02).half().to(device))
                  for _ in range(copies)]
        dense = [(torch.randn(n, k, generator=gen) * 0.02).to(device, dt) for _ in range(dense_copies)]
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, dt)

            def run_packed(i, x=x):
                qweight, scales = packed[i % copies]
                return kernel(x, qweight, scales, None, None, k, group_size)

            def run_dense(i, x=x):
                return F.linear(x, dense[i % dense_copies])

            t = _time(run_packed, warmup, iters, device)
            t_dense = _time(run_dense, warmup, iters, device)
            tg = _graph_time(run_packed, iters, device) if measured else None
            tg_dense = _graph_time(run_dense, iters, device) if measured else None
            flops = 2.0 * m * n * k
            io_bytes = packed_bytes + (m * k + m * n) * dt.itemsize
            rows.append({
                "op": "dbgemm", "n": n, "k": k, "m": m, "backend": backend, "dtype": dtype,
                "group_size": group_size, "ms": t * 1e3, "tflops": flops / t / 1e12,
                "gbps": io_bytes / t / 1e9, "dense_ms": t_dense * 1e3,
                "dense_tflops": flops / t_dense / 1e12, "speedup_vs_dense": t_dense / t,
                "copy_gbps": ceiling, "frac_of_copy": None if ceiling is None else io_bytes / t / 1e9 / ceiling,
                "graph_ms": _ms(tg), "dense_graph_ms": _ms(tg_dense),
                "graph_gbps": None if tg is None else io_bytes / tg / 1e9,
                "graph_speedup_vs_dense": None if tg is None or tg_dense is None else tg_dense / tg,
                "device": device_name, "measured": measured,
            })
    return rows


def copy_gbps(device: torch.device, nbytes: int = COPY_BYTES, iters: int = 10) -> float:
    """The GPU's memory ceiling in GB/s: the median of ``iters`` timed device-to-device copies of
    ``nbytes`` (after 3 warm-ups), counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / sorted(times)[len(times) // 2] / 1e9


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of :func:`run_gpu_bench` rows (per call from Python, then replayed
    from a CUDA graph), with a warning line when any row was not measured on a GPU."""
    head = (f"{'N x K':>13} {'M':>4} {'backend':>7} {'dtype':>8} {'ms':>9} {'TFLOP/s':>8} "
            f"{'GB/s':>8} {'of copy':>7} {'dense ms':>9} {'speedup':>8} | {'graph ms':>9} {'GB/s':>7} "
            f"{'dense':>9} {'speedup':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        graph = (f"{_num(r['graph_ms'], '.4g'):>9} {_num(r['graph_gbps'], '.4g'):>7} "
                 f"{_num(r['dense_graph_ms'], '.4g'):>9} {_num(r['graph_speedup_vs_dense'], '.2f'):>7}x")
        lines.append(f"{r['n']:>6} x {r['k']:<6}{r['m']:>4} {r['backend']:>7} {r['dtype']:>8} "
                     f"{r['ms']:>9.4g} {r['tflops']:>8.3g} {r['gbps']:>8.4g} "
                     f"{_percent(r['frac_of_copy']):>7} {r['dense_ms']:>9.4g} "
                     f"{r['speedup_vs_dense']:>7.2f}x | {graph}")
    devices = sorted({r["device"] for r in rows})
    ceilings = sorted({round(r["copy_gbps"]) for r in rows if r["copy_gbps"]})
    lines.append(f"device: {', '.join(devices)}; group size {sorted({r['group_size'] for r in rows})}"
                 + (f"; copy ceiling {ceilings} GB/s (read + write)" if ceilings else ""))
    if any(not r["measured"] for r in rows):
        lines.append("NOT MEASURED ON A GPU: these timings come from the CPU (Triton interpreter) and "
                     "say nothing about GPU speed; they only show that the benchmark runs.")
    return "\n".join(lines)


def _graph_time(fn, iters: int, device: torch.device, replays: int = 5) -> float | None:
    """Median seconds per call of ``fn(0..iters-1)`` captured once into a CUDA graph and replayed
    ``replays`` times: the device's time, without Python and launch overhead. The calls must have
    run before (autotuning done). None, with a warning, when the capture fails."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # a capture needs its calls warmed on a side stream first
            fn(0)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                fn(i)
    except RuntimeError as e:
        warnings.warn(f"CUDA graph capture failed, graph columns left empty: {e}", stacklevel=2)
        return None
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3 / iters)
    return sorted(times)[len(times) // 2]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _percent(frac: float | None) -> str:
    return "-" if frac is None else f"{frac:.0%}"


def _cpu_mode(backend: str) -> str:
    return "triton interpreter" if backend == "triton" else f"{backend} backend"


def _time(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn(i)``, i = the call's index (selects the weight copy)."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fn(warmup + i)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for i in range(iters):
        fn(warmup + i)
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> None:
    """``python -m dbquant.bench.gpu``: the benchmark until ``dbquant bench`` wires it."""
    p = argparse.ArgumentParser(prog="python -m dbquant.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--m", type=int, nargs="+", default=None, help=f"activation rows (default {DEFAULT_MS})")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="tiny shape; runs on the CPU under TRITON_INTERPRET=1")
    a = p.parse_args(argv)
    try:
        rows = run_gpu_bench(a.backend, None, a.m, a.group_size, a.dtype, a.warmup, a.iters, a.smoke)
    except DbquantError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(rows))


if __name__ == "__main__":
    main()
