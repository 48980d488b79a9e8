"""DAD training throughput on SmolLM2-135M: teacher signal x autocast, side by side in one process (issue 14).

What it measures: training tokens/s of the end-to-end stage (`calibration/dad.py`, `distill`), the
optimizer steps only (teacher caches and setup excluded; what `dbquant-log.jsonl` calls `tok_s`), for
each configuration in `--configs` (TEACHER/AUTOCAST/TRAIN, e.g. `topk/off/scales`). The student is the
data-free FDB init of every decoder linear (throughput does not depend on the scale values); every
configuration trains the same windows. Configurations alternate round-robin for `--rounds` rounds so a
noisy, shared machine slows them alike; the median over rounds is reported with min and max.

Usage (repository root, venv active):
    python benchmarks/dad_throughput.py --json docs/bench/dad_throughput.json
    python benchmarks/dad_throughput.py --configs topk/off/scales,topk/bf16/scales --steps 3 --rounds 2
The JSON (written atomically) holds the environment (CPU model, ISA flags, load average) and one row
per configuration: {teacher, autocast, train, seq_len, batch, steps, tok_s (per round), median, min,
max, ratio_vs_first}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dbquant.bench.cpu import environment
from dbquant.calibration.blockwise import to_fakequant
from dbquant.calibration.dad import DADConfig, distill, teacher_cache
from dbquant.calibration.init import init_weights
from dbquant.calibration.runstate import RunState, make_fingerprint
from dbquant.eval.data import calibration_batches, wiki_split
from dbquant.format.files import write_json
from dbquant.model.plan import make_plan
from dbquant.model.sources import load_fp_model


def student_and_teachers(seq_len: int, windows: int, topk: int):
    """(FakeQuant student, windows int64 [S, T], {teacher: signal}) for SmolLM2, built once."""
    model, tok = load_fp_model("smollm2-135m")
    model.eval()
    batches = calibration_batches(tok, wiki_split("calib"), windows, seq_len, seed=2)
    plan = make_plan(model, group_size=64)
    signals = {"online": {"fp_weights": {p.name: model.get_submodule(p.name).weight.detach().float().clone()
                                         for p in plan}}}
    for mode in ("topk", "sample"):
        signals[mode] = teacher_cache(model, batches, topk, progress=False, mode=mode)
    init = init_weights(model, plan, "fdb", None, iters=1, progress=False)
    to_fakequant(model, [p.name for p in plan], init)
    return model, batches, signals


def measure(model, batches, signal, teacher: str, autocast: str, train: str, steps: int, batch: int) -> float:
    """Training tokens/s of ``steps`` DAD steps (a fresh copy of the student; no work dir, no checkpoints)."""
    cfg = DADConfig(steps=steps, batch_size=batch, teacher=teacher, autocast=autocast, train=train, warmup=0)
    run = RunState(None, make_fingerprint(bench={"teacher": teacher, "autocast": autocast}))
    return distill(copy.deepcopy(model), batches, signal, cfg, run, progress=False)["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="topk/off/scales,topk/bf16/scales,online/off/scales,online/bf16/scales,"
                                         "sample/off/scales,topk/off/scales+weights,topk/bf16/scales+weights")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--json", default="docs/bench/dad_throughput.json")
    a = ap.parse_args()
    configs = [tuple(c.split("/")) for c in a.configs.split(",")]
    if any(len(c) != 3 for c in configs):
        sys.exit(f"--configs: each entry is TEACHER/AUTOCAST/TRAIN, got {a.configs!r}")
    model, batches, signals = student_and_teachers(a.seq_len, a.windows, a.topk)
    tok_s: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs:
            tok_s[c].append(measure(model, batches, signals[c[0]], *c, a.steps, a.batch))
            print(f"round {r + 1}/{a.rounds} {'/'.join(c):<28} {tok_s[c][-1]:8.1f} tok/s", flush=True)
    first = statistics.median(tok_s[configs[0]])
    rows = [{"teacher": c[0], "autocast": c[1], "train": c[2], "seq_len": a.seq_len, "batch": a.batch,
             "steps": a.steps, "tok_s": [round(v, 1) for v in tok_s[c]],
             "median": round(statistics.median(tok_s[c]), 1), "min": round(min(tok_s[c]), 1),
             "max": round(max(tok_s[c]), 1), "ratio_vs_first": round(statistics.median(tok_s[c]) / first, 3)}
            for c in configs]
    print(f"\n{'teacher/autocast/train':<28} {'median tok/s':>12} {'min':>8} {'max':>8} {'vs first':>9}")
    for row in rows:
        print(f"{row['teacher'] + '/' + row['autocast'] + '/' + row['train']:<28} {row['median']:12.1f} "
              f"{row['min']:8.1f} {row['max']:8.1f} {row['ratio_vs_first']:9.3f}")
    # environment() has the ISA flags and fast_bf16 (what --dad-autocast auto reads)
    env = environment() | {"threads": torch.get_num_threads(), "loadavg_after": os.getloadavg()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.json, {"environment": env, "command": " ".join(sys.argv), "rows": rows,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
