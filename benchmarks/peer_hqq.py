"""Peer row: HQQ 2-bit g64 (calibration-free) on SmolLM2's decoder linears, scored by dbquant's wiki protocol.

Needs hqq (pinned in requirements.txt for the tests and peer rows; not a dependency of the dbquant
package). Usage: python benchmarks/peer_hqq.py [N_WINDOWS]
Prints one JSON object. HQQ keeps its scale and zero in the compute dtype; bpw is counted as
peers report it, with both at 16 bits: 2 + 32/64 = 2.5.
"""

import json
import sys
import time

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from torch import nn

from dbquant.eval.protocols import evaluate
from dbquant.model.sources import load_fp_model

model, tok = load_fp_model("smollm2-135m")
cfg = BaseQuantizeConfig(nbits=2, group_size=64)
t, n = time.perf_counter(), 0
for name, m in list(model.model.layers.named_modules()):
    if isinstance(m, nn.Linear):
        parent, _, child = name.rpartition(".")
        setattr(model.model.layers.get_submodule(parent), child,
                HQQLinear(m, cfg, compute_dtype=torch.float32, device="cpu"))
        n += 1
quant_s = time.perf_counter() - t
res = evaluate(model, tok, "wiki", n_windows=int(sys.argv[1]) if len(sys.argv) > 1 else 32)
print(json.dumps({"method": "hqq 2-bit g64", "linears": n, "quant_s": quant_s, "bpw": 2.5, **res}))
