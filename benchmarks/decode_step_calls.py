"""Decode step time: every layer in one native call (``decode_step_cpu``) against one call per layer.

Both run the same C++ layer body (``layer_step`` in csrc/cpu/binding.cpp) and give the same logits
and caches bit for bit (tests/test_decode.py), so this measures only what the Python loop over
layers cost: per layer, a call through the dispatcher and two RoPE-row views.

Rows, the median of ``--rounds`` alternating rounds of ``--tokens`` one-token steps each (a shared
machine slows both alike), from a 128-token prefill, for each thread count:
- ``per_layer``: ``decode_layer_cpu`` once per layer, as FastDecoder did before;
- ``one_call``: ``decode_step_cpu`` once per token.
Each step ends with the final norm and the output head, as a real decode step does.

Usage: python benchmarks/decode_step_calls.py DIR [--threads 1,2] [--rounds 5] [--tokens 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dbquant import load
from dbquant.backends import cpu as cpu_backend
from dbquant.bench.cpu import environment
from dbquant.runtime.decode import FastDecoder


def per_layer_step(dec: FastDecoder, token: torch.Tensor, pos: int) -> torch.Tensor:
    x = dec.embed(token).float().reshape(1, -1)
    for i, L in enumerate(dec.layers):
        dec.decode_layer.run(x, L.native, L.cos[pos], L.sin[pos], dec.k_cache[i], dec.v_cache[i], pos)
    return dec._logits(dec._rms(x, dec.norm))


def one_call_step(dec: FastDecoder, token: torch.Tensor, pos: int) -> torch.Tensor:
    x = dec.embed(token).float().reshape(1, -1)
    cpu_backend.decode_step_cpu.run(x, dec.stack, dec.k_cache, dec.v_cache, pos)
    return dec._logits(dec._rms(x, dec.norm))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a dbquant checkpoint folder")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = load(a.model)
    dec = FastDecoder(model, max_len=256)
    if dec.stack is None:
        print("this checkpoint's layers do not run natively (dense or unfusable projections)", file=sys.stderr)
        return 1
    prompt = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    steps = {"per_layer": per_layer_step, "one_call": one_call_step}
    rows = []
    with torch.inference_mode():
        for threads in [int(t) for t in a.threads.split(",")]:
            torch.set_num_threads(threads)
            times = {k: [] for k in steps}
            for _ in range(a.rounds):
                for name, fn in steps.items():
                    dec._alloc(1)
                    logits = dec.forward(prompt, 0)
                    tok = logits.argmax(-1, keepdim=True)
                    t0 = time.perf_counter()
                    for p in range(128, 128 + a.tokens):
                        tok = fn(dec, tok, p).argmax(-1, keepdim=True)
                    times[name].append((time.perf_counter() - t0) / a.tokens)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"threads": threads, **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
                   **{f"{k}_tok_s": round(1 / v, 1) for k, v in med.items()},
                   "speedup": round(med["per_layer"] / med["one_call"], 3)}
            rows.append(row)
            print(json.dumps(row))
    if a.json:
        out = {"model": a.model, "tokens": a.tokens, "rounds": a.rounds, "prompt": 128,
               "environment": environment(), "rows": rows}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
