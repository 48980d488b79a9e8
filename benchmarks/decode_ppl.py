"""Perplexity through the decode path: every token scored by the fast decoder's one-token step.

The wiki protocol (``dbquant eval``) runs the Hugging Face forward over whole windows, where a
packed linear multiplies many rows at once (dequantize + GEMM). Generation instead runs one token
at a time through ``FastDecoder``'s native step, whose GEMVs use lookup tables: float tables, or
integer ones (T-MAC style, int8 activations per group) where ``DBQUANT_CPU_LUT`` / the per-ISA
default chooses them. This script teacher-forces the wiki windows through that step, token by token
(the cache refilled from position 0 for each window), so what a table kind or an output head costs
is measured where it runs. All rows run in one process on the same windows.

Usage: python benchmarks/decode_ppl.py CHECKPOINT [--windows 8] [--seq-len 512]
       [--luts float,int8] [--heads int8,w8a8] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F


def decode_nll(decoder, windows: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (nats, float64) and token count over int64 [n, T] ``windows``, each token
    fed alone through ``decoder.forward`` at its position (the first of a window is not predicted)."""
    total, count = 0.0, 0
    decoder._alloc(1)  # the cache generate() would allocate (batch 1)
    for w in windows:
        for t in range(w.numel() - 1):
            logits = decoder.forward(w[t].view(1, 1), t)  # float32 [1, vocab]
            total += float(F.cross_entropy(logits.float(), w[t + 1].view(1), reduction="sum"))
            count += 1
    return total, count


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.backends import cpu as cpu_backend
    from dbquant.bench.machine import environment
    from dbquant.eval.data import load_text
    from dbquant.eval.wiki import wiki_windows
    from dbquant.format.files import write_json
    from dbquant.runtime.decode import FastDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--luts", default="float,int8", help="comma list of float, int8 (the one-row GEMV's tables)")
    ap.add_argument("--heads", default="int8", help="comma list of --lm-head-dtype values: float32, int8, w8a8")
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    luts, heads = a.luts.split(","), a.heads.split(",")
    if not set(luts) <= {"float", "int8"} or not set(heads) <= {"float32", "int8", "w8a8"}:
        ap.error("--luts takes float,int8; --heads takes float32,int8,w8a8")
    if a.windows < 1 or a.seq_len < 2:
        ap.error("--windows >= 1 and --seq-len >= 2")
    model, tok = dbquant.load(a.checkpoint), AutoTokenizer.from_pretrained(a.checkpoint)
    windows = wiki_windows(tok, load_text("wiki", "eval"), seq_len=a.seq_len, n_windows=a.windows)
    rows = []
    for head in heads:
        dec = FastDecoder(model, max_len=a.seq_len, lm_head_dtype=torch.float32 if head == "float32" else
                          (torch.int8 if head == "int8" else head))
        for lut in luts:
            t0 = time.perf_counter()
            with torch.inference_mode(), cpu_backend.forced_lut(lut):
                nll, n = decode_nll(dec, windows)
            row = {"lut": lut, "head": head, "ppl": math.exp(nll / n), "nll": nll / n, "tokens": n,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"tables {lut:<5} head {head:<7} PPL {row['ppl']:.4f} ({n} tokens, {row['seconds']:.0f} s)",
                  flush=True)
    out = {"checkpoint": a.checkpoint, "windows": len(windows), "seq_len": a.seq_len,
           "default_lut": cpu_backend.default_lut(), "rows": rows, "machine": environment()}
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
