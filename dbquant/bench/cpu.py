"""`dbquant bench`: kernel microbenchmarks and end-to-end decode speed, side by side in one run.

Kernel rows (:func:`kernel_bench`): for each shape (N out x K in), activation rows M,
thread count and mode, the time of ``y = x @ W.T`` with
  fp32  torch dense float32 weight (``F.linear``)
  bf16  torch dense bfloat16 weight and activations
  ref   dbquant's pure-PyTorch reference (dequantize + matmul on every call: the oracle)
  cpu   dbquant's C++ kernel on the load-time repacked weight (``dbquant.backends.cpu``), float tables
  cpu-i8lut, cpu-i16lut  the same kernel layout with the integer (T-MAC style) tables of 8- or 12-bit
        codes (``run_cpu(lut="int8" | "int16")``)
  cpu-i16lut-unit  cpu-i16lut on the planes' unit byte order (``t16.prepare_cpu(cols=1)``), where the
        loaders choose dword rows (``cpu_backend.plane_cols``): the two orders side by side
  cpu-gemm, cpu-gemm-bf16  the prefill path: the weight dequantized (transposed) on every call, then
        one torch GEMM in float32 or bfloat16 (``cpu_backend.dense_gemm``)
  cpu-gemm-a8  the prefill path on int8 activations and the exact bit planes (``dense_gemm(gemm="int8")``)
  cpu-gemm-w8a8  the prefill path on int8 activations and 8-bit weight levels (``dense_gemm(gemm="w8a8")``)
Modes: ``cache`` reuses one weight (resident in cache when it fits); ``stream`` cycles through
distinct copies of it, together at least the rotating set of :func:`dbquant.bench.machine.stream_set_bytes`
(4x the L3 read at run time, at most a quarter of MemAvailable), so a call comes back to a copy
only after 4 L3s of other weights have passed: every call reads its weight from DRAM. Rows say
``rotating_bytes`` and ``streamed`` (the copies span at least twice the L3).
``gbps`` counts only the bytes a kernel must read (weight in its stored width + activations +
output). The read bandwidth is measured in the same run over a buffer of the rotating set's size
(:func:`read_bandwidths`): by the native read kernel (``dbquant.backends.cpu.stream_read_cpu``:
AVX-512/AVX2 loads on every thread, a checksum) at each thread count of the run and at all cores,
and by the older ``torch.sum`` figure for reference. ``pct_bw`` relates ``gbps`` to the peak
(the best native figure over thread counts); ``pct_bw_threads`` to the native figure at the row's
thread count. The bandwidth is measured before and after the rows and each row is related to the
better figure (``bw_before_gbps``/``bw_after_gbps`` keep both). Timings are the median of repeated
calls after warm-up (``ms``; ``ms_min``/``gbps_best`` the fastest call, less sensitive to other jobs
on a shared machine, with ``pct_bw_best`` relating it to the fastest read call ``peak_bw_best_gbps``);
compare rows of one run only (the machine is shared and noisy).

End-to-end rows (:func:`e2e_bench`): prefill and decode tokens/s of the fp32 model and of
a quantized checkpoint through :class:`dbquant.runtime.decode.FastDecoder`, same prompt, same run.
``--peers`` adds llama.cpp's rows of the same shape (:mod:`dbquant.bench.peers`); :func:`plot_e2e`
draws both. Every JSON stores :func:`dbquant.bench.machine.environment` (CPU, ISA flags, caches).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import cpu as cpu_backend
from ..backends import t16
from ..backends.cpuinfo import fast_bf16_cpu
from ..backends.reference import dbgemm_ref
from ..format import files
from ..model.checkpoint import load
from ..model.embedding import int8_rows
from ..model.sources import load_fp_model
from ..runtime.decode import LM_HEAD_DTYPES, FastDecoder
from .machine import environment, stream_set_bytes

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
BACKENDS = ("fp32", "bf16", "ref", "cpu", "cpu-i8lut", "cpu-i16lut", "cpu-i16lut-unit", "cpu-gemm", "cpu-gemm-bf16",
            "cpu-gemm-a8", "cpu-gemm-w8a8")
# backend -> run_cpu's lut
NATIVE = {"cpu": "float", "cpu-i8lut": "int8", "cpu-i16lut": "int16", "cpu-i16lut-unit": "int16"}
# backend -> dense_gemm's precision
GEMM = {"cpu-gemm": "fp32", "cpu-gemm-bf16": "bf16", "cpu-gemm-a8": "int8", "cpu-gemm-w8a8": "w8a8"}
MAX_COPIES = 1 << 16  # bounds the Python objects for a tiny weight (rows say when it bound the set)
READ_CHUNK = 16 << 20  # bytes per timed call of the read kernel (a 4096x4096 fp32 weight is 64 MiB)


def _times_ms(fn: Callable[[], object], min_time: float = 0.3, min_iters: int = 5, warmup: int = 3) -> list[float]:
    """Milliseconds of each timed call of ``fn`` (after ``warmup`` calls), for at least ``min_time`` s."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 10_000:
            break
    return times


def _median_ms(fn: Callable[[], object], min_time: float = 0.3, min_iters: int = 5, warmup: int = 3) -> float:
    return statistics.median(_times_ms(fn, min_time, min_iters, warmup))


def stream_bandwidth(threads: int, nbytes: int | None = None, buf: torch.Tensor | None = None) -> float:
    """The older read figure, GB/s: ``torch.sum`` over a float32 buffer (``buf``, or ``nbytes`` of ones;
    default the rotating set). Kept beside the native figure: it stays below the memory's peak
    (one reduction's loads, torch's own threading)."""
    torch.set_num_threads(threads)
    if buf is None:
        buf = torch.ones((nbytes or stream_set_bytes()["bytes"]) // 4)
    ms = _median_ms(lambda: buf.sum(), min_time=0.5)
    return buf.numel() * buf.element_size() / ms / 1e6


def read_bandwidths(threads: list[int], nbytes: int) -> dict:
    """Read bandwidth in GB/s over one buffer of ``nbytes`` (make it larger than the L3), the native
    kernel timed per call of ``READ_CHUNK`` bytes, round robin over the buffer.

    Returns ``{"native": {t: GB/s}, "native_best": {t: GB/s}, "torch": {t: GB/s}, "peak": GB/s,
    "peak_best": GB/s, "source": "native"|"torch", "buffer_bytes": int, "isa": str|None}``. ``native``
    (median call) and ``native_best`` (fastest call) cover the run's thread counts and all cores
    (``os.cpu_count()``); ``peak``/``peak_best`` are their best figures. Without the C++ extension
    they hold the torch figures and ``source`` says "torch".
    """
    buf = torch.ones(max(nbytes // 4, 1))  # written once: every page is backed by its own memory
    counts = sorted(set(threads) | {os.cpu_count() or 1})
    out = {"torch": {t: stream_bandwidth(t, buf=buf) for t in threads}, "buffer_bytes": buf.numel() * 4}
    if cpu_backend.load_cpu() and hasattr(torch.ops.dbquant, "stream_read_cpu"):
        # calls of READ_CHUNK bytes cycling through the whole buffer: still read from DRAM, and timed
        # at the granularity of a large GEMV call, so median and fastest call compare like for like
        chunks = list(torch.split(buf, max(READ_CHUNK // 4, 1)))
        nxt = _rotation(chunks)
        times = {t: _times_ms(lambda t=t: cpu_backend.stream_read_cpu(nxt(), t), min_time=0.5) for t in counts}
        each = chunks[0].numel() * 4
        out["native"] = {t: each / statistics.median(v) / 1e6 for t, v in times.items()}
        out["native_best"] = {t: each / min(v) / 1e6 for t, v in times.items()}
        out["chunk_bytes"] = each
        out["source"], out["isa"] = "native", torch.ops.dbquant.cpu_isas()[0]
    else:
        out["native"], out["source"], out["isa"] = dict(out["torch"]), "torch", None
        out["native_best"] = dict(out["torch"])
    out["peak"], out["peak_best"] = max(out["native"].values()), max(out["native_best"].values())
    return out


def _packed_layer(n: int, k: int, group_size: int, seed: int):
    """A random canonical packed layer (qweight, scales fp16) of the format's shapes."""
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // group_size) * group_size
    qweight = torch.randint(0, 256, (2, n, kp // 8), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, kp // group_size, 2, generator=gen) * 0.02).half()
    return qweight, scales


def _copies(bytes_each: int, mode: str, set_bytes: int) -> int:
    """How many distinct copies of a weight of ``bytes_each`` a call rotates through."""
    return 1 if mode == "cache" else min(MAX_COPIES, max(2, -(-set_bytes // max(bytes_each, 1))))


def _weights(b: str, n: int, k: int, group_size: int, mode: str, set_bytes: int) -> tuple[list, int]:
    """(the weights backend ``b`` rotates through, bytes one call reads of one of them).

    Copies are clones of one random weight (a memcpy each; their contents do not matter to the
    timing), each in memory of its own.
    """
    if b in ("fp32", "bf16"):
        dt = torch.float32 if b == "fp32" else torch.bfloat16
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).to(dt)
        each = w.numel() * w.element_size()
        return [w] + [w.clone() for _ in range(_copies(each, mode, set_bytes) - 1)], each
    q, sc = _packed_layer(n, k, group_size, 0)
    if b == "ref":  # one copy: it dequantizes on every call, compute-bound either way
        return [(q, sc)], q.numel() + sc.numel() * 2
    if b.endswith("-unit"):
        w = t16.prepare_cpu(q, sc, None, k, group_size, cols=1)
    else:
        w = cpu_backend.prepare_cpu(q, sc, None, k, group_size)  # the byte order this CPU's loaders choose
    clones = [dataclasses.replace(w, planes=w.planes.clone(), scales=w.scales.clone(),
                                  offset=None if w.offset is None else w.offset.clone())
              for _ in range(_copies(w.nbytes, mode, set_bytes) - 1)]
    return [w] + clones, w.nbytes


def _rotation(ws: list) -> Callable[[], object]:
    """A function returning the next of ``ws`` on each call, round robin over the distinct copies."""
    i = [0]

    def nxt():
        i[0] = (i[0] + 1) % len(ws)
        return ws[i[0]]

    return nxt


def _timed_call(b: str, x: torch.Tensor, nxt: Callable[[], object], k: int, group_size: int) -> Callable[[], object]:
    """The call timed for backend ``b``: ``x @ W.T`` with x float32 [M, K] and W = ``nxt()``."""
    if b == "fp32":
        return lambda: F.linear(x, nxt())
    if b == "bf16":
        xb = x.bfloat16()
        return lambda: F.linear(xb, nxt())
    if b == "ref":
        return lambda: dbgemm_ref(x, *nxt(), None, None, k, group_size)
    if b in GEMM:
        return lambda: cpu_backend.dense_gemm(x, nxt(), None, GEMM[b])
    return lambda: cpu_backend.run_cpu(x, nxt(), None, lut=NATIVE[b])


def kernel_bench(shapes: list[tuple[int, int]], ms: list[int], threads: list[int], modes: list[str],
                 backends: list[str], group_size: int = 64, progress: Callable[[str], None] | None = None,
                 stream_bytes: int | None = None) -> list[dict]:
    """Time every (shape, M, threads, mode, backend); returns one dict per row (see module doc).

    ``stream_bytes``: the rotating set (and bandwidth buffer) in bytes; default
    :func:`dbquant.bench.machine.stream_set_bytes` (4x L3, capped by memory). Only one backend's
    copies are held at a time. ``ref`` is skipped in ``stream`` mode (it dequantizes on every
    call, so it is compute-bound either way) and for weights over 16M elements (seconds per call).
    """
    packed = {*NATIVE, *GEMM}  # the backends on dbquant's packed weight
    if packed & set(backends) and not cpu_backend.load_cpu():
        raise RuntimeError("the cpu backend is not built; run `pip install --no-build-isolation -e .`")
    sizing = stream_set_bytes()
    if stream_bytes is not None:
        sizing.update(bytes=stream_bytes, capped_by_memory=False, given=True)
    set_bytes = sizing["bytes"]
    bw = read_bandwidths(threads, set_bytes)
    if progress:
        progress(f"read bandwidth ({bw['source']}, {bw['buffer_bytes'] >> 20} MiB buffer, L3 "
                 f"{sizing['l3_bytes'] >> 20} MiB): "
                 + ", ".join(f"{t} thr {g:.1f} GB/s" for t, g in bw["native"].items())
                 + "; torch.sum: " + ", ".join(f"{t} thr {g:.1f} GB/s" for t, g in bw["torch"].items()))
    isa = torch.ops.dbquant.cpu_isas()[0] if packed & set(backends) else None
    rows, order, raw_gbps = [], [], []
    for si, (n, k) in enumerate(shapes):
        xs = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(m)) for m in ms}
        for mi, mode in enumerate(modes):
            base = {}  # (m, threads) -> fp32 ms
            for b in [b for b in BACKENDS if b in backends]:  # fp32 first: the speedups' base
                if b == "ref" and (mode == "stream" or n * k > 16 << 20):
                    continue
                ws, wbytes = _weights(b, n, k, group_size, mode, set_bytes)
                nxt = _rotation(ws)
                for xi, m in enumerate(ms):
                    for ti, t in enumerate(threads):
                        torch.set_num_threads(t)
                        fn = _timed_call(b, xs[m], nxt, k, group_size)
                        times = _times_ms(fn)
                        t_ms = statistics.median(times)
                        moved = wbytes + m * k * 4 + m * n * 4
                        rotating = wbytes * len(ws)
                        row = dict(op="dbgemm" if b in ("ref", *packed) else "linear", n=n, k=k, m=m, mode=mode,
                                   threads=t, backend=b, ms=round(t_ms, 5), ms_min=round(min(times), 5),
                                   gbps=round(moved / t_ms / 1e6, 3), gbps_best=round(moved / min(times) / 1e6, 3),
                                   moved_bytes=moved, **_bw_fields(moved / t_ms / 1e6, t, bw),
                                   weight_bytes=wbytes, group_size=group_size if b in ("ref", *packed) else None,
                                   copies=len(ws), rotating_bytes=rotating,
                                   streamed=len(ws) > 1 and rotating >= 2 * sizing["l3_bytes"],
                                   stream_set_bytes=set_bytes, stream_set_capped_by_memory=sizing["capped_by_memory"],
                                   l3_bytes=sizing["l3_bytes"], isa=isa if b in packed else None)
                        if b == "fp32":
                            base[m, t] = t_ms
                        row["speedup_vs_fp32"] = round(base[m, t] / t_ms, 3) if (m, t) in base else None
                        rows.append(row)
                        raw_gbps.append(moved / t_ms / 1e6)  # unrounded, for the bandwidth fields below
                        order.append((si, mi, xi, ti, BACKENDS.index(b)))
                        if progress:
                            progress(format_row(row))
                ws = nxt = fn = None  # free this backend's copies before the next one's are made
    # On a shared machine the bandwidth moves during the run: measure it again after the rows and
    # relate every row to the better of the two figures (the stricter percentage).
    after = read_bandwidths(threads, set_bytes)
    best = {key: {t: max(bw[key][t], after[key][t]) for t in bw[key]} for key in ("native", "torch")}
    best.update(peak=max(bw["peak"], after["peak"]), peak_best=max(bw["peak_best"], after["peak_best"]),
                source=bw["source"])
    for r, gbps in zip(rows, raw_gbps):
        r.update(_bw_fields(gbps, r["threads"], best), peak_bw_best_gbps=round(best["peak_best"], 3),
                 pct_bw_best=round(100 * r["gbps_best"] / best["peak_best"], 1),
                 bw_before_gbps=round(bw["native"][r["threads"]], 3),
                 bw_after_gbps=round(after["native"][r["threads"]], 3))
    if progress:
        progress("read bandwidth after the rows: "
                 + ", ".join(f"{t} thr {g:.1f} GB/s" for t, g in after["native"].items())
                 + f"; pct_bw in the JSON is of the best figure before/after: {best['peak']:.1f} GB/s")
    return [r for _, r in sorted(zip(order, rows), key=lambda p: p[0])]


def _bw_fields(gbps: float, threads: int, bw: dict) -> dict:
    """A row's bandwidth fields from :func:`read_bandwidths`' dict (GB/s)."""
    return dict(bandwidth_gbps=round(bw["native"][threads], 3), torch_bw_gbps=round(bw["torch"][threads], 3),
                peak_bw_gbps=round(bw["peak"], 3), bw_source=bw["source"], pct_bw=round(100 * gbps / bw["peak"], 1),
                pct_bw_threads=round(100 * gbps / bw["native"][threads], 1))


def format_row(r: dict) -> str:
    sp = f"{r['speedup_vs_fp32']:7.2f}x" if r.get("speedup_vs_fp32") else "       -"
    return (f"{r['n']:>6}x{r['k']:<6} M={r['m']:<3} {r['mode']:<6} t={r['threads']} {r['backend']:<9} "
            f"{r['ms']:9.4f} ms {r['gbps']:8.2f} GB/s {r['pct_bw']:6.1f}% bw {sp}")


def e2e_bench(model_dir: str, fp_model: str = "smollm2-135m", prompt_tokens: int = 128, new_tokens: int = 64,
              threads: int = 2, lm_head_dtypes: tuple[str, ...] = ("float32", "bfloat16", "int8", "w8a8"),
              repeats: int = 3) -> list[dict]:
    """Prefill/decode tokens/s of the fp32 model and the quantized checkpoint, same run.

    Each configuration: one warm-up generation, then ``repeats`` timed ones (median reported).
    Also times the dense output projection alone (one token), to say how much of a decode
    step it takes. The quantized rows prefill with ``prefill_gemm="auto"`` (``cpu_backend.resolve_gemm``:
    w8a8 on AVX-512 VNNI, bf16 on AMX, int8 activations on AVX2-only CPUs); there one more row, with the
    first head type, prefills in exact fp32, so both are in one run, and where "auto" is w8a8 on a CPU
    whose bf16 is fast, one more prefills in bf16. Where "auto" is fp32 on a CPU with AVX2 (AVX-512
    without fast bf16 or VNNI), the extra row prefills with the int8 GEMM instead.
    Each row records its ``prefill_gemm`` as resolved, and ``kv_cache``, the float KV cache's dtype
    (FastDecoder's "auto": float16 where the native step runs); one more row, with the first head type,
    keeps a float32 cache, so the two are in one run. A checkpoint that stores its output projection
    as an int8 table runs that table whatever ``lm_head_dtype`` asks but w8a8 (:class:`FastDecoder`),
    so it gets two rows, ``int8`` (stored) and ``w8a8``, instead of several labels for one configuration.
    """
    torch.set_num_threads(threads)
    qmodel = load(model_dir)
    fpmodel = load_fp_model(fp_model)[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(qmodel.config.vocab_size, 20000), (1, prompt_tokens), generator=gen)
    rows = []
    stored_int8 = int8_rows(qmodel.lm_head) is not None  # (unpacks the table: once, not per row)
    if stored_int8 and cpu_backend.load_cpu():
        lm_head_dtypes = ("int8", "w8a8")
    configs = [("fp32", fpmodel, "float32", "fp32", "auto")] + [
        ("dbquant", qmodel, d, "auto", "auto") for d in lm_head_dtypes]
    auto_gemm = cpu_backend.resolve_gemm("auto")
    if auto_gemm != "fp32":
        configs.append(("dbquant", qmodel, lm_head_dtypes[0], "fp32", "auto"))
    if auto_gemm == "w8a8" and fast_bf16_cpu():  # the bf16 GEMM that "auto" passed over, beside it
        configs.append(("dbquant", qmodel, lm_head_dtypes[0], "bf16", "auto"))
    elif auto_gemm == "fp32" and cpu_backend.load_cpu() and "avx2" in torch.ops.dbquant.cpu_isas():
        # the int8 prefill beside it
        configs.append(("dbquant", qmodel, lm_head_dtypes[0], "int8", "auto"))
    configs.append(("dbquant", qmodel, lm_head_dtypes[0], "auto", "float32"))  # the exact cache beside "auto"
    configs.append(("fp32-hf-generate", fpmodel, "float32", "fp32", "auto"))
    configs.append(("dbquant-hf-generate", qmodel, "float32", "fp32", "auto"))
    for name, model, head, prefill, cache in configs:
        stats = []
        if name.endswith("hf-generate"):
            for _ in range(1 + repeats):
                with torch.inference_mode():
                    t = time.perf_counter()
                    model(ids, use_cache=True)
                    pre = time.perf_counter() - t
                    t = time.perf_counter()
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)
                    total = time.perf_counter() - t
                # generate() includes its own prefill: decode time = total - one prefill
                stats.append((prompt_tokens / pre, (new_tokens - 1) / max(total - pre, 1e-9), None))
        else:
            dec = FastDecoder(model, max_len=prompt_tokens + new_tokens + 8,
                              lm_head_dtype=LM_HEAD_DTYPES[head], prefill_gemm=prefill, cache_dtype=cache)
            for _ in range(1 + repeats):
                _, st = dec.generate(ids, new_tokens, min_new_tokens=new_tokens)
                stats.append((st.prefill_tok_s, st.decode_tok_s, statistics.median(st.per_step_s) * 1e3))
            head_ms = None
            if dec.lm_head is not None:  # the dense output projection alone, one token
                xh = torch.randn(1, dec.lm_head.shape[1])
                with torch.inference_mode():
                    if dec.lm_head_scale is not None:
                        head_ms = _median_ms(lambda: dec.lm_head_op(xh, dec.lm_head, dec.lm_head_scale))
                    else:
                        xh = xh.to(dec.lm_head.dtype)
                        head_ms = _median_ms(lambda: F.linear(xh, dec.lm_head))
        stats = stats[1:]
        row = dict(engine=name if "hf" in name else "dbquant.runtime.decode", model=name.split("-")[0],
                   lm_head=head, prefill_gemm=cpu_backend.resolve_gemm(prefill), threads=threads,
                   prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                   prefill_tok_s=round(statistics.median(s[0] for s in stats), 2),
                   decode_tok_s=round(statistics.median(s[1] for s in stats), 2),
                   decode_tok_s_all=[round(s[1], 2) for s in stats])
        if not name.endswith("hf-generate"):
            row["step_ms"] = round(statistics.median(s[2] for s in stats), 3)
            row["lm_head_ms"] = None if head_ms is None else round(head_ms, 3)
            # an int8 table in the checkpoint runs as stored, whatever lm_head_dtype asked (but w8a8)
            row["lm_head_stored_int8"] = dec.lm_head_op is not None and model is qmodel and stored_int8
            row["kv_cache"] = str(dec.cache_dtype).removeprefix("torch.")
        rows.append(row)
    base = next(r["decode_tok_s"] for r in rows if r["model"] == "fp32" and r["engine"] == "dbquant.runtime.decode")
    for r in rows:
        r["decode_speedup_vs_fp32"] = round(r["decode_tok_s"] / base, 3)
    return rows


# the figures of an end-to-end row that merge_rounds takes the median of, over rounds
ROUND_MEDIANS = ("prefill_tok_s", "decode_tok_s", "decode_tok_s_empty", "step_ms", "lm_head_ms",
                 "decode_speedup_vs_fp32", "decode_vs_llamacpp_best", "decode_vs_llamacpp_empty",
                 "prefill_vs_llamacpp_best")


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per configuration (engine, model, head, prefill GEMM, KV cache, threads, prompt) from end-to-end rows
    tagged with their ``round``: each figure of ROUND_MEDIANS is the median over the rounds (a ratio the
    median of each round's own ratio, both engines measured minutes apart at most), ``decode_tok_s_all``
    every sample, ``rounds`` their count, and ``decode_vs_llamacpp_best_rounds`` each round's ratio."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["engine"], r["model"], r.get("lm_head"), r.get("prefill_gemm"), r.get("kv_cache"), r["threads"],
               r["prompt_tokens"])
        groups.setdefault(key, []).append(r)
    out = []
    for rs in groups.values():
        m = {k: v for k, v in rs[0].items() if k != "round"}
        m["rounds"] = len(rs)
        for k in ROUND_MEDIANS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                m[k] = round(statistics.median(vals), 3)
        m["decode_tok_s_all"] = [x for r in rs for x in r.get("decode_tok_s_all", [r["decode_tok_s"]])]
        if any("decode_vs_llamacpp_best" in r for r in rs):
            m["decode_vs_llamacpp_best_rounds"] = [r.get("decode_vs_llamacpp_best") for r in rs]
        out.append(m)
    return out


def write_json(path: str, rows: list[dict], **extra) -> None:
    """Atomic write of ``{"environment": ..., "rows": [...], **extra}``."""
    files.write_json(path, {"environment": environment(), "rows": rows, **extra})


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (`pip install matplotlib`)") from e
    return plt


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"  # atomic: a reader never sees half a PNG
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def plot(rows: list[dict], path: str) -> None:
    """PNG: time per call by backend for each (shape, M, mode) at the highest thread count."""
    plt = _pyplot()
    tmax = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["threads"] == tmax]
    keys = list(dict.fromkeys((r["n"], r["k"], r["m"], r["mode"]) for r in rows))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(keys)), 5))
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        xs, ys = [], []
        for i, key in enumerate(keys):
            hit = [r for r in rows if (r["n"], r["k"], r["m"], r["mode"]) == key and r["backend"] == b]
            if hit:
                xs.append(i + j * width)
                ys.append(hit[0]["ms"])
        ax.bar(xs, ys, width, label=b)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{n}x{k}\nM={m} {mode}" for n, k, m, mode in keys], fontsize=7)
    ax.set_title(f"dbquant bench: y = x W^T, {tmax} threads (lower is better)")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def e2e_label(r: dict) -> str:
    """The series name of an end-to-end row: ``llama.cpp Q4_0``, ``dbquant w8a8 head``, ``fp32-hf-generate``."""
    if r["engine"] == "llama.cpp":
        return f"llama.cpp {r['model']}"
    if r["engine"] == "dbquant.runtime.decode":
        # every quantized row names its prefill GEMM: since `auto` is w8a8 here and bf16 or int8 elsewhere,
        # an unnamed one read as the default
        gemm = r.get("prefill_gemm")
        head = f"{r['lm_head']} (stored)" if r.get("lm_head_stored_int8") and r["lm_head"] == "int8" else r["lm_head"]
        label = f"{r['model']} {head} head" + ("" if r["model"] == "fp32" or not gemm else f", {gemm} prefill")
        return label + (", float32 cache" if r["model"] != "fp32" and r.get("kv_cache") == "float32" else "")
    return r["engine"]


def plot_e2e(rows: list[dict], path: str) -> None:
    """PNG of end-to-end rows (dbquant's and, with --peers, llama.cpp's): decode and prefill tokens/s,
    one bar per engine/type, grouped by thread count (and prompt length when several); higher is better."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("decode_tok_s") and r.get("prefill_tok_s")]
    if not rows:
        raise RuntimeError("no end-to-end rows with decode_tok_s and prefill_tok_s to plot")
    groups = sorted({(r["threads"], r["prompt_tokens"]) for r in rows})
    several_p = len({p for _, p in groups}) > 1
    series = list(dict.fromkeys(e2e_label(r) for r in rows))
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(groups) * len(series) / 2), 5))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for j, name in enumerate(series):
            xs, ys = [], []
            for i, (t, p) in enumerate(groups):
                hit = [r[key] for r in rows if e2e_label(r) == name and r["threads"] == t and r["prompt_tokens"] == p]
                if hit:
                    xs.append(i + j * width)
                    ys.append(hit[0])
            # tab20's ten dark shades (even indices), then its ten light ones: the default cycle of ten
            # repeated a colour
            ax.bar(xs, ys, width, label=name, color=plt.get_cmap("tab20")(j % 10 * 2 + j // 10 % 2))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" + (f"\n{p}-token prompt" if several_p else "")
                            for t, p in groups])
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"{title} tokens/s")
    new_tokens = rows[0].get("new_tokens")
    fig.suptitle(f"dbquant bench --e2e: {new_tokens} new tokens"
                 + ("" if several_p else f", {groups[0][1]}-token prompt"))
    # below both panels, not inside one: with a dozen series a legend inside covered the bars
    ncol = min(len(series), 4)
    fig.tight_layout(rect=(0, 0.04 * ((len(series) + ncol - 1) // ncol + 1), 1, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    _save(fig, path)
    plt.close(fig)
