"""`dbquant bench`: kernel microbenchmarks and end-to-end decode speed, side by side in one run.

Kernel rows (:func:`kernel_bench`): for each shape (N out x K in), activation rows M,
thread count and mode, the time of ``y = x @ W.T`` with
  fp32  torch dense float32 weight (``F.linear``)
  bf16  torch dense bfloat16 weight and activations
  ref   dbquant's pure-PyTorch reference (dequantize + matmul on every call: the oracle)
  cpu   dbquant's C++ kernel on the load-time repacked weight (``dbquant.backends.cpu``), float tables
  cpu-i8lut  the same kernel layout with the integer (T-MAC style) tables (``run_cpu(lut="int8")``)
Modes: ``cache`` reuses one weight (resident in cache when it fits); ``stream`` rotates
through enough copies that every call reads its weight from DRAM (``STREAM_BYTES`` in
all, several times the L3, or ``MAX_COPIES`` copies of a tiny weight). ``gbps`` counts only the bytes a kernel
must read (weight in its stored width + activations + output); ``pct_bw`` relates it to
the streaming read bandwidth measured in the same run (:func:`stream_bandwidth`).
Timings are the median of repeated calls after warm-up; compare rows of one run only
(the machine is shared and noisy).

End-to-end rows (:func:`e2e_bench`): prefill and decode tokens/s of the fp32 model and of
a quantized checkpoint through :class:`dbquant.runtime.decode.FastDecoder`, same prompt, same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends import cpu as cpu_backend
from ..backends.reference import dbgemm_ref
from ..model.checkpoint import load
from ..model.embedding import int8_rows
from ..model.sources import load_fp_model
from ..runtime.decode import LM_HEAD_DTYPES, FastDecoder

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
STREAM_BYTES = 256 << 20  # rotate copies until this many bytes: ~8x a 32 MiB L3
BACKENDS = ("fp32", "bf16", "ref", "cpu", "cpu-i8lut")
NATIVE = {"cpu": "float", "cpu-i8lut": "int8"}  # backend -> run_cpu's lut


def _median_ms(fn: Callable[[], object], min_time: float = 0.3, min_iters: int = 5, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 10_000:
            break
    return statistics.median(times) * 1e3


def stream_bandwidth(threads: int, nbytes: int = STREAM_BYTES) -> float:
    """Streaming read bandwidth in GB/s: sum over a float32 buffer of ``nbytes`` (> L3)."""
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4)
    ms = _median_ms(lambda: buf.sum(), min_time=0.5)
    return nbytes / ms / 1e6


def _packed_layer(n: int, k: int, group_size: int, seed: int):
    """A random canonical packed layer (qweight, scales fp16) of the format's shapes."""
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // group_size) * group_size
    qweight = torch.randint(0, 256, (2, n, kp // 8), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, kp // group_size, 2, generator=gen) * 0.02).half()
    return qweight, scales


MAX_COPIES = 2048  # SmolLM2's smallest packed weight (192x576, 35 KB) x 2048 = 72 MB > L3


def _copies(bytes_each: int, mode: str) -> int:
    return 1 if mode == "cache" else min(MAX_COPIES, max(2, -(-STREAM_BYTES // max(bytes_each, 1))))


def kernel_bench(shapes: list[tuple[int, int]], ms: list[int], threads: list[int], modes: list[str],
                 backends: list[str], group_size: int = 64, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time every (shape, M, threads, mode, backend); returns one dict per row (see module doc).

    ``ref`` is skipped in ``stream`` mode (it dequantizes on every call, so it is compute-bound
    either way) and for weights over 16M elements (seconds per call).
    """
    if set(NATIVE) & set(backends) and not cpu_backend.load_cpu():
        raise RuntimeError("the cpu backend is not built; run `pip install --no-build-isolation -e .`")
    rows = []
    bw = {t: stream_bandwidth(t) for t in threads}
    isa = torch.ops.dbquant.cpu_isas()[0] if set(NATIVE) & set(backends) else None
    for n, k in shapes:
        for mode in modes:
            weights = {}  # backend -> list of weights to rotate through
            for b in backends:
                if b == "ref" and (mode == "stream" or n * k > 16 << 20):
                    continue
                if b in ("fp32", "bf16"):
                    dt = torch.float32 if b == "fp32" else torch.bfloat16
                    each = n * k * (4 if b == "fp32" else 2)
                    weights[b] = [torch.randn(n, k, generator=torch.Generator().manual_seed(i)).to(dt) * 0.02
                                  for i in range(_copies(each, mode))]
                else:
                    kp = -(-k // group_size) * group_size
                    each = 2 * n * kp // 8 + n * (kp // group_size) * 2 * 2
                    layers = [_packed_layer(n, k, group_size, i) for i in range(_copies(each, mode))]
                    weights[b] = layers if b == "ref" else [
                        cpu_backend.prepare_cpu(q, s, None, k, group_size) for q, s in layers]
            for m in ms:
                x = torch.randn(m, k)
                for t in threads:
                    torch.set_num_threads(t)
                    base = None
                    for b, ws in weights.items():
                        i = [0]

                        def nxt():
                            i[0] = (i[0] + 1) % len(ws)
                            return ws[i[0]]

                        if b == "fp32":
                            fn, wbytes = (lambda: F.linear(x, nxt())), n * k * 4
                        elif b == "bf16":
                            xb = x.bfloat16()
                            fn, wbytes = (lambda: F.linear(xb, nxt())), n * k * 2
                        elif b == "ref":
                            fn = lambda: dbgemm_ref(x, *nxt(), None, None, k, group_size)  # noqa: E731
                            wbytes = ws[0][0].numel() + ws[0][1].numel() * 2
                        else:
                            fn = lambda: cpu_backend.run_cpu(x, nxt(), None, lut=NATIVE[b])  # noqa: E731
                            wbytes = ws[0].nbytes
                        t_ms = _median_ms(fn)
                        moved = wbytes + m * k * 4 + m * n * 4
                        row = dict(op="linear" if b in ("fp32", "bf16") else "dbgemm", n=n, k=k, m=m, mode=mode,
                                   threads=t, backend=b, ms=round(t_ms, 5), gbps=round(moved / t_ms / 1e6, 3),
                                   bandwidth_gbps=round(bw[t], 3), pct_bw=round(100 * moved / t_ms / 1e6 / bw[t], 1),
                                   weight_bytes=wbytes, group_size=None if b in ("fp32", "bf16") else group_size,
                                   copies=len(ws), isa=isa if b in NATIVE else None)
                        if b == "fp32":
                            base = t_ms
                        row["speedup_vs_fp32"] = round(base / t_ms, 3) if base else None
                        rows.append(row)
                        if progress:
                            progress(format_row(row))
    return rows


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
    step it takes.
    """
    torch.set_num_threads(threads)
    qmodel = load(model_dir)
    fpmodel = load_fp_model(fp_model)[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(qmodel.config.vocab_size, 20000), (1, prompt_tokens), generator=gen)
    rows = []
    configs = [("fp32", fpmodel, "float32")] + [("dbquant", qmodel, d) for d in lm_head_dtypes]
    configs.append(("fp32-hf-generate", fpmodel, "float32"))
    configs.append(("dbquant-hf-generate", qmodel, "float32"))
    for name, model, head in configs:
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
                              lm_head_dtype=LM_HEAD_DTYPES[head])
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
                   lm_head=head, threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                   prefill_tok_s=round(statistics.median(s[0] for s in stats), 2),
                   decode_tok_s=round(statistics.median(s[1] for s in stats), 2),
                   decode_tok_s_all=[round(s[1], 2) for s in stats])
        if not name.endswith("hf-generate"):
            row["step_ms"] = round(statistics.median(s[2] for s in stats), 3)
            row["lm_head_ms"] = None if head_ms is None else round(head_ms, 3)
            # an int8 table in the checkpoint runs as stored, whatever lm_head_dtype asked (but w8a8)
            row["lm_head_stored_int8"] = dec.lm_head_op is not None and int8_rows(model.lm_head) is not None
        rows.append(row)
    base = next(r["decode_tok_s"] for r in rows if r["model"] == "fp32" and r["engine"] == "dbquant.runtime.decode")
    for r in rows:
        r["decode_speedup_vs_fp32"] = round(r["decode_tok_s"] / base, 3)
    return rows


def environment() -> dict:
    """Machine facts stored with every result file."""
    isas = []
    try:

        if cpu_backend.load_cpu():
            isas = list(torch.ops.dbquant.cpu_isas())
    except Exception:  # noqa: BLE001 - informational only
        pass
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the model name says more than the architecture
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(torch=torch.__version__, cpu=cpu, cores=os.cpu_count(),
                isas=isas, loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def write_json(path: str, rows: list[dict]) -> None:
    """Atomic write of ``{"environment": ..., "rows": [...]}``."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def plot(rows: list[dict], path: str) -> None:
    """PNG: time per call by backend for each (shape, M, mode) at the highest thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (`pip install matplotlib`)") from e
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
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
