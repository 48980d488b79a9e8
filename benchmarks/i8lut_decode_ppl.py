"""Decode-path perplexity with the float vs the integer lookup tables (issue 19, csrc/cpu/dbgemm_i8lut.h).

The wiki protocol's perplexity runs 512-token windows (dequantize + BLAS), so it never meets the
one-row GEMV whose tables this compares. Here the kv-ppl text windows (dbquant/eval/kv_ppl.py) are
decoded token by token, teacher-forced, through the fast decoder (float32 cache): a prefix prefilled,
then one token per step, every step's linears through the one-row GEMV with the tables forced by
``forced_lut``. Both runs see the same tokens; the perplexity over the stepped tokens and the largest
logit difference between the two are reported.

Usage (repository root, venv active):
    OMP_NUM_THREADS=1 python benchmarks/i8lut_decode_ppl.py DIR [DIR ...] --windows 2 --prefix 256 --seq-len 512
Prints one JSON row per checkpoint: {model, windows, tokens, ppl_float, ppl_int8, max_abs_logit_diff, loadavg}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dbquant.backends import cpu as cpu_backend  # noqa: E402
from dbquant.eval import kv_ppl  # noqa: E402
from dbquant.model.checkpoint import load  # noqa: E402
from dbquant.model.sources import resolve_model  # noqa: E402
from dbquant.runtime.decode import FastDecoder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(1)
    windows = kv_ppl.kv_windows(AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")), a.windows, a.seq_len)
    for d in a.models:
        model = load(d)
        nll, logits = {}, {}
        for lut in ("float", "int8"):
            nll[lut], logits[lut] = 0.0, []
            with cpu_backend.forced_lut(lut), torch.no_grad():
                for w in windows:
                    w = w[None]
                    dec = FastDecoder(model, max_len=a.seq_len)
                    dec._alloc(1)
                    dec.forward(w[:, :a.prefix], 0)
                    lg = torch.stack([dec.forward(w[:, p:p + 1], p)[0] for p in range(a.prefix, a.seq_len - 1)])
                    nll[lut] += torch.nn.functional.cross_entropy(lg.float(), w[0, a.prefix + 1:], reduction="sum").item()
                    logits[lut].append(lg)
        n = windows.shape[0] * (a.seq_len - a.prefix - 1)
        diff = max((x - y).abs().max().item() for x, y in zip(logits["float"], logits["int8"]))
        print(json.dumps(dict(model=d, windows=windows.shape[0], tokens=n, ppl_float=round(math.exp(nll["float"] / n), 4),
                              ppl_int8=round(math.exp(nll["int8"] / n), 4), max_abs_logit_diff=round(diff, 4),
                              loadavg=os.getloadavg())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
