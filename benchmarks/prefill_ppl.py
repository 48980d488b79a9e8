"""Perplexity through the prefill path: every wiki window in one forward, each packed linear as one GEMM.

A prompt of more than ``LUT_MAX_ROWS`` tokens runs each packed projection as one GEMM whose precision
is ``prefill_gemm`` (``dbquant.backends.cpu.GEMM_DTYPES``): "fp32" (the dequantized weight, exact up to
summation order; what ``dbquant eval`` computes), "bf16" (weights and activations rounded to bfloat16)
or "int8" (activations rounded to 8 bits per row and weight group with a zero point, the bit planes exact:
``csrc/cpu/gemm_a8.h``). This script scores the wiki windows through the Hugging Face forward with
every such GEMM forced to one precision, all rows in one process on the same windows, so what a
precision costs is measured where it runs (a prompt's logits, and the KV cache decoding reads).

Besides the PPL, every row after the first is compared with the first, position by position, as
``benchmarks/decode_ppl.py`` does: how often its greedy pick is the first row's, and the first row's
top-2 logit margin where they differ.

``--draws D`` (> 1) adds D - 1 more scores per precision, each with every GEMM's output multiplied by
(1 + ``--jitter`` * N(0, 1)) (seeded by the draw): a perturbation far below any rounding here (1e-6 by
default), which moves the PPL of an exact path by ~1e-5 but re-draws which activations sit next to an
8-bit rounding boundary. The rows' ``ppl_draws``, ``ppl_mean`` and ``ppl_sd`` say how much of a
precision's PPL cost is that draw (the 8-bit rows' costs differ by more than their mean difference
from one draw to the next).

Usage: python benchmarks/prefill_ppl.py CHECKPOINT [--windows 8] [--seq-len 512] [--gemms fp32,int8]
       [--draws 1] [--jitter 1e-6] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_ppl import agreement, agreement_note  # noqa: E402


def prefill_nll(model, windows: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Score int64 [n, T] ``windows`` by one forward each. Returns the sum of next-token NLL (nats), the
    greedy picks int64 [n (T - 1)] and their top-2 logit margins float32 [n (T - 1)]."""
    total, picks, margins = 0.0, [], []
    for w in windows:
        logits = model(w.view(1, -1)).logits[0, :-1].float()  # [T - 1, vocab]
        total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
        top = logits.topk(2, dim=-1)
        picks.append(top.indices[:, 0])
        margins.append(top.values[:, 0] - top.values[:, 1])
    return total, torch.cat(picks), torch.cat(margins)


def jittered(y: torch.Tensor, jitter: float, gen: torch.Generator) -> torch.Tensor:
    """y float32 [M, N] times (1 + jitter * N(0, 1)), elementwise, from ``gen``."""
    return y * (1 + jitter * torch.randn(y.shape, generator=gen))


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.backends import cpu as cpu_backend
    from dbquant.bench.machine import environment
    from dbquant.eval.data import load_text
    from dbquant.eval.wiki import wiki_windows
    from dbquant.format.files import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    kinds = [k for k in cpu_backend.GEMM_DTYPES if k != "auto"]
    ap.add_argument("--gemms", default="fp32,int8", help=f"comma list of {', '.join(kinds)}; the first is the baseline")
    ap.add_argument("--draws", type=int, default=1, help="scores per precision (> 1: the others jittered)")
    ap.add_argument("--jitter", type=float, default=1e-6, help="relative jitter of the GEMM outputs in extra draws")
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    if a.draws < 1 or not 0 < a.jitter < 1e-2:
        ap.error("--draws >= 1 and 0 < --jitter < 1e-2")
    gemms = a.gemms.split(",")
    if not set(gemms) <= set(kinds):
        ap.error(f"--gemms takes {','.join(kinds)}")
    if a.windows < 1 or a.seq_len <= cpu_backend.LUT_MAX_ROWS:
        ap.error(f"--windows >= 1 and --seq-len > {cpu_backend.LUT_MAX_ROWS} (shorter ones take the lookup tables)")
    model, tok = dbquant.load(a.checkpoint), AutoTokenizer.from_pretrained(a.checkpoint)
    windows = wiki_windows(tok, load_text("wiki", "eval"), seq_len=a.seq_len, n_windows=a.windows)
    dense = cpu_backend.dense_gemm
    rows, base = [], None
    for gemm in gemms:
        draws = []
        for d in range(a.draws):
            gen = torch.Generator().manual_seed(d)
            # run_cpu calls dense_gemm for every GEMM above LUT_MAX_ROWS rows: force its precision
            cpu_backend.dense_gemm = (lambda x, w, b, _=None, g=gemm: dense(x, w, b, g)) if d == 0 else (
                lambda x, w, b, _=None, g=gemm, r=gen: jittered(dense(x, w, b, g), a.jitter, r))
            try:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    nll, picks, margins = prefill_nll(model, windows)
            finally:
                cpu_backend.dense_gemm = dense
            draws.append((nll, picks, margins, time.perf_counter() - t0))
        nll, picks, margins, seconds = draws[0]
        n = picks.numel()
        row = {"gemm": gemm, "ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "seconds": seconds}
        if a.draws > 1:
            ppls = [math.exp(d[0] / n) for d in draws]
            row.update(ppl_draws=ppls, ppl_mean=statistics.mean(ppls), ppl_sd=statistics.stdev(ppls), jitter=a.jitter)
        if base is None:
            base = picks, margins
            note = ""
        else:
            row.update(agreement(picks, *base))
            note = "; " + agreement_note(row)
        if a.draws > 1:
            note += f"; {a.draws} draws: mean {row['ppl_mean']:.4f}, sd {row['ppl_sd']:.4f}"
        rows.append(row)
        print(f"prefill GEMM {gemm:<5} PPL {row['ppl']:.4f} ({n} tokens, {row['seconds']:.0f} s){note}", flush=True)
    out = {"checkpoint": a.checkpoint, "windows": len(windows), "seq_len": a.seq_len,
           "auto_gemm": cpu_backend.resolve_gemm("auto"), "rows": rows, "machine": environment()}
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
