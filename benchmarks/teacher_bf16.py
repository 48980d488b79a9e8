"""How far the cached DAD teacher moves under bf16 autocast, and what it saves (issue 14).

What it measures, on SmolLM2-135M and `--windows` wiki calibration windows of `--seq-len` tokens: the time of
`calibration.dad.teacher_cache` (top-64) in fp32 and under bf16 autocast, side by side in one process (best of
`--rounds`), and the distance between the two teachers over the full vocabulary: KL(p_fp32 || p_bf16) per token
(mean, p99, max), top-1 agreement and the mean absolute entropy difference. The pipeline runs the cached
teacher under DAD's autocast (`--dad-autocast`), so this is the teacher's cost of bf16 where it is fast.

Usage (repository root, venv active):
    python benchmarks/teacher_bf16.py --json docs/bench/teacher_bf16_amx.json
The JSON (written atomically) holds the environment (CPU model, ISA flags, threads) and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from dbquant.bench.cpu import environment
from dbquant.calibration.dad import teacher_cache
from dbquant.eval.data import calibration_batches, wiki_split
from dbquant.format.files import write_json
from dbquant.model.sources import load_fp_model


def timed_cache(model, batches, autocast, rounds: int) -> tuple[float, dict]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = teacher_cache(model, batches, 64, progress=False, autocast=autocast)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model, tok = load_fp_model("smollm2-135m")
    batches = calibration_batches(tok, wiki_split("calib"), a.windows, a.seq_len, 0)
    t32, c32 = timed_cache(model, batches, None, a.rounds)
    t16, c16 = timed_cache(model, batches, torch.bfloat16, a.rounds)
    with torch.no_grad():
        lf = model(batches).logits.float().log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lb = model(batches).logits.float().log_softmax(-1)
    kl = (lf.exp() * (lf - lb)).sum(-1).flatten()
    res = {"windows": a.windows, "seq_len": a.seq_len, "fp32_s": t32, "bf16_s": t16, "ratio": t16 / t32,
           "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(), "kl_max": kl.max().item(),
           "top1_agreement": (c32["indices"][..., 0] == c16["indices"][..., 0]).float().mean().item(),
           "entropy_abs_diff_mean": (c32["entropy"] - c16["entropy"]).abs().mean().item()}
    print(json.dumps(res, indent=1))
    if a.json:
        env = environment() | {"threads": torch.get_num_threads(), "loadavg_after": os.getloadavg()}
        write_json(a.json, {"environment": env, "command": " ".join(sys.argv), "result": res})


if __name__ == "__main__":
    main()
