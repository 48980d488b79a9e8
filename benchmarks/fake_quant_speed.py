"""Calibration step time: the fused fake-quant op against the unfused formula, side by side (issue 14).

The training-time weight of every FakeQuantLinear is ``w_hat = sum_i alpha_i * b_i`` with the bits of
the nearest level. Written out (``unfused``: bits under no_grad, a float sum, a straight-through add)
it was most of a DAD step's time; ``dbquant.quant.fdb.fake_quant`` does it in one autograd op that
saves one uint8 code per weight. Both give the same values and gradients bit for bit
(tests/test_modules.py), so this measures time only.

Rows, each the median of ``--rounds`` alternating rounds (a shared machine slows both alike):
- ``weights``: forward + backward of the fake-quant weight of all 210 SmolLM2 decoder linears
  (k = 2, g64; gradients for the scales);
- ``step``: one DAD-shaped training step of the whole FakeQuant student (``--batch`` x ``--seq-len``
  tokens, forward, a full-vocabulary log-softmax loss, backward; scales trainable).

Usage: python benchmarks/fake_quant_speed.py [--rounds 3] [--batch 2] [--seq-len 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dbquant.bench.cpu import environment
from dbquant.calibration.blockwise import to_fakequant
from dbquant.calibration.init import init_weights
from dbquant.format.files import write_json
from dbquant.model.modules import FakeQuantLinear
from dbquant.model.plan import make_plan
from dbquant.model.sources import load_fp_model
from dbquant.quant import fdb


def unfused(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """The fake-quant weight as it was written before the fused op (float32 [N, G, g])."""
    with torch.no_grad():
        planes = fdb.assign_bits(wg, alpha, offset)
    return fdb.reconstruct(planes, alpha, offset) + (wg - wg.detach())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", default="docs/bench/fake_quant_speed.json")
    a = ap.parse_args()

    model, _ = load_fp_model("smollm2-135m")
    model.eval()
    plan = make_plan(model, group_size=64)
    to_fakequant(model, [p.name for p in plan], init_weights(model, plan, "fdb", None, iters=0, progress=False))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("alpha"))
    mods = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq_len), generator=torch.Generator().manual_seed(0))

    def weights(f):
        for m in mods:
            wg = m.weight.view(m.out_features, -1, m.group_size)
            f(wg, m.alpha, m.offset).sum().backward()

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        torch.log_softmax(logits.float(), -1).mean().backward()

    fused_op = fdb.fake_quant
    rows: dict[str, list[float]] = {k: [] for k in ("weights/unfused", "weights/fused", "step/unfused", "step/fused")}
    timed(lambda: weights(fused_op))  # warm-up
    for r in range(a.rounds):
        for variant, f in (("unfused", unfused), ("fused", fused_op)):
            fdb.fake_quant = f  # what FakeQuantLinear.quantized_weight calls
            try:
                rows[f"weights/{variant}"].append(timed(lambda: weights(f)))
                rows[f"step/{variant}"].append(timed(step))
            finally:
                fdb.fake_quant = fused_op
            model.zero_grad(set_to_none=True)
            print(f"round {r + 1}/{a.rounds} {variant:<8} weights {rows[f'weights/{variant}'][-1]:7.2f} s  "
                  f"step {rows[f'step/{variant}'][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {"environment": environment() | {"threads": torch.get_num_threads(), "loadavg_after": os.getloadavg()},
           "command": " ".join(sys.argv), "batch": a.batch, "seq_len": a.seq_len,
           "seconds": {k: [round(x, 3) for x in v] for k, v in rows.items()},
           "median_s": {k: round(v, 3) for k, v in med.items()},
           "speedup": {"weights": round(med["weights/unfused"] / med["weights/fused"], 3),
                       "step": round(med["step/unfused"] / med["step/fused"], 3)},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out["median_s"]), "speedup", out["speedup"])
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.json, out)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
