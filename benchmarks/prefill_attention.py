"""The prefill's attention: torch's SDPA on the cache's rows widened to float32 (what FastDecoder ran before)
against the native ``attend_causal_cpu`` (the decode step's kernel per query), side by side.

One layer of SmolLM2's shape (9 query heads, 3 kv heads of 64) over a float16 cache holding a T-token
prompt, causal from position 0; for each thread count and T, ``--rounds`` alternating rounds of
``--calls`` calls each, the median per-call time of each. The outputs are compared too (largest absolute
difference). Rows: {threads, tokens, sdpa_us, native_us, speedup (median of the rounds' ratios),
speedup_rounds, max_abs_diff}.

Usage: python benchmarks/prefill_attention.py [--tokens 128,512] [--threads 1,2] [--rounds 9] [--calls 10]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dbquant.backends import cpu as cpu_backend
from dbquant.bench.cpu import write_json

HQ, HK, D = 9, 3, 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not cpu_backend.load_cpu():
        raise SystemExit(f"the C++ extension is not built: {cpu_backend._cpu_error}")
    rows = []
    for t in (int(x) for x in a.tokens.split(",")):
        gen = torch.Generator().manual_seed(t)
        qk = torch.randn(1, HQ + HK, t, D, generator=gen)  # the rotated q and k heads, as the decoder holds them
        q = qk[:, :HQ]
        k = torch.zeros(1, HK, t + 8, D, dtype=torch.float16)
        v = torch.zeros_like(k)
        k[:, :, :t] = qk[:, HQ:]
        v[:, :, :t] = torch.randn(1, HK, t, D, generator=gen)
        scale = D ** -0.5

        def sdpa():
            return F.scaled_dot_product_attention(q, k[:, :, :t].float(), v[:, :, :t].float(), is_causal=True,
                                                  scale=scale, enable_gqa=True).transpose(1, 2)

        def native():
            return torch.ops.dbquant.attend_causal_cpu(q, k, v, 0, scale)

        diff = (sdpa() - native()).abs().max().item()
        for th in (int(x) for x in a.threads.split(",")):
            torch.set_num_threads(th)
            times = {"sdpa": [], "native": []}
            for r in range(a.rounds + 1):
                for name, fn in (("sdpa", sdpa), ("native", native)):
                    s = time.perf_counter()
                    for _ in range(a.calls):
                        fn()
                    if r:  # round 0 warms both up
                        times[name].append((time.perf_counter() - s) / a.calls * 1e6)
            ratios = [x / y for x, y in zip(times["sdpa"], times["native"])]
            row = dict(threads=th, tokens=t, sdpa_us=round(statistics.median(times["sdpa"]), 1),
                       native_us=round(statistics.median(times["native"]), 1),
                       speedup=round(statistics.median(ratios), 3), speedup_rounds=[round(x, 3) for x in ratios],
                       max_abs_diff=diff)
            print(row, flush=True)
            rows.append(row)
    if a.json:
        write_json(a.json, rows, benchmark="prefill_attention", heads=[HQ, HK, D], cache="float16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
