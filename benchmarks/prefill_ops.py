"""The prefill's attention, RoPE and gated activation: torch's ops (what FastDecoder ran before) against the
native ops that replaced them (the decode step's loops over a prompt chunk's rows), side by side.

One layer of SmolLM2's shape (9 query heads and 3 kv heads of 64, an MLP of 1536) for a T-token prompt:
- ``attention``: SDPA on the float16 cache's rows widened to float32, against ``attend_causal_cpu``;
- ``rope``: the rotate-half formula on the q and k heads of the qkv rows, into [B, H, T, D], against
  ``rope_heads_cpu``;
- ``gated_act``: ``silu(gate) * up``, against ``gated_act_cpu``.
For each op, thread count and T, ``--rounds`` alternating rounds of ``--calls`` calls each; rows {op, threads,
tokens, torch_us, native_us (medians), speedup (median of the rounds' ratios), speedup_rounds, max_abs_diff}.

Usage: python benchmarks/prefill_ops.py [--tokens 128,512] [--threads 1,2] [--rounds 9] [--calls 10]
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

HQ, HK, D, INTER = 9, 3, 64, 1536


def cases(t: int) -> dict:
    """op -> (torch's version, the native op): callables of one layer's tensors for a t-token prompt."""
    gen = torch.Generator().manual_seed(t)
    qkv = torch.randn(1, t, HQ + 2 * HK, D, generator=gen)
    qk = qkv[:, :, :HQ + HK]
    rot = qk.transpose(1, 2).contiguous()  # rotated q and k heads, as attention reads them
    q = rot[:, :HQ]
    k = torch.zeros(1, HK, t + 8, D, dtype=torch.float16)
    v = torch.zeros_like(k)
    k[:, :, :t] = rot[:, HQ:]
    v[:, :, :t] = torch.randn(1, HK, t, D, generator=gen)
    ang = torch.rand(t, D // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, 1), torch.cat([ang.sin()] * 2, 1)
    gu = torch.randn(t, 2 * INTER, generator=gen)
    scale, half = D ** -0.5, D // 2

    def rope_torch():
        x = qk.transpose(1, 2)
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    return {
        "attention": (lambda: F.scaled_dot_product_attention(q, k[:, :, :t].float(), v[:, :, :t].float(),
                                                             is_causal=True, scale=scale,
                                                             enable_gqa=True).transpose(1, 2),
                      lambda: torch.ops.dbquant.attend_causal_cpu(q, k, v, 0, scale)),
        "rope": (rope_torch, lambda: torch.ops.dbquant.rope_heads_cpu(qk, cos, sin)),
        "gated_act": (lambda: F.silu(gu[:, :INTER]) * gu[:, INTER:], lambda: torch.ops.dbquant.gated_act_cpu(gu)),
    }


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
        for op, (ref, native) in cases(t).items():
            diff = (ref() - native()).abs().max().item()
            for th in (int(x) for x in a.threads.split(",")):
                torch.set_num_threads(th)
                times = {"torch": [], "native": []}
                for r in range(a.rounds + 1):
                    for name, fn in (("torch", ref), ("native", native)):
                        s = time.perf_counter()
                        for _ in range(a.calls):
                            fn()
                        if r:  # round 0 warms both up
                            times[name].append((time.perf_counter() - s) / a.calls * 1e6)
                ratios = [x / y for x, y in zip(times["torch"], times["native"])]
                row = dict(op=op, threads=th, tokens=t, torch_us=round(statistics.median(times["torch"]), 1),
                           native_us=round(statistics.median(times["native"]), 1),
                           speedup=round(statistics.median(ratios), 3),
                           speedup_rounds=[round(x, 3) for x in ratios], max_abs_diff=diff)
                print(row, flush=True)
                rows.append(row)
    if a.json:
        write_json(a.json, rows, benchmark="prefill_ops", heads=[HQ, HK, D], intermediate=INTER, cache="float16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
