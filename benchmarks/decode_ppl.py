"""Perplexity through the decode path: every token scored by the fast decoder's one-token step.

The wiki protocol (``dbquant eval``) runs the Hugging Face forward over whole windows, where a
packed linear multiplies many rows at once (dequantize + GEMM). Generation instead runs one token
at a time through ``FastDecoder``'s native step, whose GEMVs use lookup tables: float tables, or
integer ones (T-MAC style: 8- or 12-bit codes per group, "int8" / "int16") where ``DBQUANT_CPU_LUT`` / the per-ISA
default chooses them. This script teacher-forces the wiki windows through that step, token by token
(the cache refilled from position 0 for each window), so what a table kind or an output head costs
is measured where it runs. All rows run in one process on the same windows.

Besides the PPL, every row after the first is compared with the first, position by position: how
often its greedy pick (teacher-forced, so every position sees the same context) is the first row's,
and the first row's top-2 logit margin where they differ. Free-running greedy text diverges for good
at the first such flip, so this says how close to a tie a changed kernel changes an answer.

Usage: python benchmarks/decode_ppl.py CHECKPOINT [--windows 8] [--seq-len 512]
       [--luts float,int8,int16] [--heads int8,w8a8] [--caches float16,float32] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F


def decode_nll(decoder, windows: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Teacher-force int64 [n, T] ``windows`` through ``decoder.forward``, one token at a time at its
    position (the first of a window is not predicted). Returns the sum of next-token NLL (nats,
    float64), the greedy picks int64 [n (T - 1)] and their top-2 logit margins float32 [n (T - 1)]."""
    total, picks, margins = 0.0, [], []
    decoder._alloc(1)  # the cache generate() would allocate (batch 1)
    for w in windows:
        for t in range(w.numel() - 1):
            logits = decoder.forward(w[t].view(1, 1), t).float()  # [1, vocab]
            total += float(F.cross_entropy(logits, w[t + 1].view(1), reduction="sum"))
            top = logits[0].topk(2)
            picks.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
    return total, torch.tensor(picks), torch.tensor(margins)


def agreement(picks: torch.Tensor, base_picks: torch.Tensor, base_margins: torch.Tensor) -> dict:
    """How a row's greedy picks (int64 [n]) compare with the baseline's (int64 [n], top-2 margins
    float32 [n]): the share that agree, the count that differ and the largest baseline margin among them."""
    differ = picks != base_picks
    return {"top1_agree": float((~differ).double().mean()), "top1_differ": int(differ.sum()),
            "max_base_margin_where_differ": float(base_margins[differ].max()) if differ.any() else None}


def agreement_note(row: dict) -> str:
    """A row's agreement fields (:func:`agreement`) in words, for the printed line."""
    note = f"greedy picks: {row['top1_agree']:.2%} as the first row's ({row['top1_differ']} differ"
    if row["top1_differ"]:
        note += f", where its top-2 margin is <= {row['max_base_margin_where_differ']:.3f}"
    return note + ")"


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.backends import cpu as cpu_backend
    from dbquant.bench.machine import environment
    from dbquant.eval.data import load_text
    from dbquant.eval.wiki import wiki_windows
    from dbquant.format.files import write_json
    from dbquant.runtime.decode import CACHE_DTYPES, FastDecoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    kinds = [k for k in cpu_backend.LUT_KINDS if k != "auto"]
    ap.add_argument("--luts", default=",".join(kinds),
                    help=f"comma list of {', '.join(kinds)} (the one-row GEMV's tables)")
    ap.add_argument("--heads", default="int8", help="comma list of --lm-head-dtype values: float32, int8, w8a8")
    ap.add_argument("--caches", default="float16", help=f"comma list of KV cache dtypes: {', '.join(CACHE_DTYPES)}")
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    luts, heads, caches = a.luts.split(","), a.heads.split(","), a.caches.split(",")
    if (not set(luts) <= set(kinds) or not set(heads) <= {"float32", "int8", "w8a8"}
            or not set(caches) <= set(CACHE_DTYPES)):
        ap.error(f"--luts takes {','.join(kinds)}; --heads takes float32,int8,w8a8; --caches {','.join(CACHE_DTYPES)}")
    if a.windows < 1 or a.seq_len < 2:
        ap.error("--windows >= 1 and --seq-len >= 2")
    model, tok = dbquant.load(a.checkpoint), AutoTokenizer.from_pretrained(a.checkpoint)
    windows = wiki_windows(tok, load_text("wiki", "eval"), seq_len=a.seq_len, n_windows=a.windows)
    rows, base = [], None
    for cache, head in ((c, h) for c in caches for h in heads):
        dec = FastDecoder(model, max_len=a.seq_len, lm_head_dtype=torch.float32 if head == "float32" else
                          (torch.int8 if head == "int8" else head), cache_dtype=cache)
        for lut in luts:
            t0 = time.perf_counter()
            with torch.inference_mode(), cpu_backend.forced_lut(lut):
                nll, picks, margins = decode_nll(dec, windows)
            n = picks.numel()
            row = {"lut": lut, "head": head, "cache": cache, "ppl": math.exp(nll / n), "nll": nll / n, "tokens": n,
                   "seconds": time.perf_counter() - t0}
            if base is None:
                base = picks, margins
                row["share_margin_below"] = {str(m): float((margins < m).double().mean()) for m in (0.1, 0.2, 0.5)}
                note = ", ".join(f"{v:.1%} of top-2 margins < {k}" for k, v in row["share_margin_below"].items())
            else:
                row.update(agreement(picks, *base))
                note = agreement_note(row)
            rows.append(row)
            print(f"tables {lut:<5} head {head:<7} cache {cache:<7} PPL {row['ppl']:.4f} ({n} tokens, "
                  f"{row['seconds']:.0f} s); {note}", flush=True)
    out = {"checkpoint": a.checkpoint, "windows": len(windows), "seq_len": a.seq_len,
           "default_lut": cpu_backend.default_lut(), "rows": rows, "machine": environment()}
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
