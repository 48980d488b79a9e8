"""Data-parallel DAD, 1 process vs N (torchrun, gloo on CPU), on SmolLM2-135M (issue 8).

Same options and the same global batch in both runs; compares the exported checkpoints
(planes, scales), their wiki PPL, and the time per DAD step read from each run's
``dbquant-log.jsonl``. On a machine with fewer cores than processes x threads the N-process
run cannot be faster: this measures equivalence first, speed second.

Usage: python benchmarks/ddp_dad.py [--nproc 2] [--steps 4] [--batch 4] [--seq-len 128] [--windows 32]
           [--json docs/bench/ddp_dad.json]
The JSON is written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def dad_step_times(log: Path) -> list[float]:
    """Seconds between consecutive logged DAD steps (the first step, which follows setup, is skipped)."""
    ts = [r["t"] for r in map(json.loads, log.read_text().splitlines()) if r.get("stage") == "dad" and "step" in r]
    return [b - a for a, b in zip(ts, ts[1:])]


def run(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def ppl(folder: Path, windows: int) -> float:
    out = subprocess.run([sys.executable, "-m", "dbquant", "eval", str(folder), "--windows", str(windows), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--windows", type=int, default=32, help="wiki PPL windows (0: skip the evaluation)")
    ap.add_argument("--json", default="docs/bench/ddp_dad.json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dbquant-ddp-"))
    # a cheap FDB init (it runs replicated on every rank): the comparison is about DAD
    opts = ["smollm2-135m", "--no-blockwise", "--calib", "wiki", "--calib-samples", "4", "--calib-seq-len", "128",
            "--iters", "1", "--dad-samples", "16", "--dad-seq-len", str(a.seq_len), "--dad-steps", str(a.steps),
            "--dad-batch", str(a.batch), "--device", "cpu", "--json"]
    runs = {}
    cmds = {1: [sys.executable, "-m", "dbquant", "quantize", *opts[:1], "--output", str(work / "p1"), *opts[1:]],
            a.nproc: [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc), "-m", "dbquant",
                      "quantize", *opts[:1], "--output", str(work / f"p{a.nproc}"), *opts[1:]]}
    for n, cmd in cmds.items():
        wall = run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"} if n > 1 else None)
        steps = dad_step_times(work / f"p{n}" / "dbquant-log.jsonl")
        runs[n] = {"command": " ".join(["torchrun", *cmd[3:]] if n > 1 else ["dbquant", *cmd[3:]]),
                   "processes": n, "threads_per_process": 1 if n > 1 else None, "wall_s": round(wall, 1),
                   "dad_step_s_mean": round(sum(steps) / len(steps), 2), "dad_step_s": [round(s, 2) for s in steps]}
        print(json.dumps(runs[n]), flush=True)

    import torch
    from safetensors.torch import load_file

    one, many = load_file(work / "p1" / "model.safetensors"), load_file(work / f"p{a.nproc}" / "model.safetensors")
    planes = [k for k in one if k.endswith("qweight")]
    scales = [k for k in one if k.endswith("scales")]
    cmp = {"same_tensor_names": sorted(one) == sorted(many),
           "plane_bytes_differing": int(sum((one[k] != many[k]).sum() for k in planes)),
           "plane_bytes": int(sum(one[k].numel() for k in planes)),
           "scales_max_abs_diff": max(float((one[k].float() - many[k].float()).abs().max()) for k in scales),
           "scales_max_rel_diff": max(float(((one[k].float() - many[k].float()).abs()
                                             / one[k].float().abs().clamp_min(1e-8)).max()) for k in scales),
           "scales_equal_tensors": sum(torch.equal(one[k], many[k]) for k in scales), "scales_tensors": len(scales)}
    if a.windows:
        cmp["wiki_ppl"] = {1: ppl(work / "p1", a.windows), a.nproc: ppl(work / f"p{a.nproc}", a.windows)}
        cmp["wiki_windows"] = a.windows
    print(json.dumps(cmp), flush=True)
    out = {"runs": runs, "comparison": cmp, "machine": {"cpus": os.cpu_count(),
                                                        "note": "2-core development VM, shared with other jobs"}}
    from dbquant.format.files import write_json

    write_json(a.json, out)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
