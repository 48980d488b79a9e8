"""Experiment: does a Hadamard rotation of each 64-channel input group help FDB's data-aware init?

Incoherence processing (QuIP#, QuaRot) rotates weights so their groups look Gaussian before
rounding. Here: for every decoder linear of SmolLM2, W -> W H (H = the orthonormal 64x64
Hadamard matrix, applied within each group of 64 input channels, so y = (x H)(W H)^T is
unchanged), quantize with dbquant's activation-weighted FDB init (importance = E[(x H)^2] per
rotated channel, from the same 32 x 512 calibration tokens), rotate back, and measure wiki PPL
against the same init without rotation. No block-wise or DAD: this isolates the init.

Usage: python benchmarks/rotation_init.py [--json PATH]    (~3 min on 2 quiet cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    from dbquant.eval.data import load_text, sample_windows, token_stream
    from dbquant.eval.protocols import evaluate
    from dbquant.model.sources import load_fp_model
    from dbquant.quant import fdb
    from dbquant.runtime.kv.quantizers import hadamard

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    model, tok = load_fp_model("smollm2-135m")
    windows = sample_windows(token_stream(tok, load_text("wiki", "calibration")), 32, 512, 0)
    h = hadamard(64)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    sums: dict[str, list] = {}

    def hook(name):
        def fn(_m, inp, _o):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            xr = (x.view(len(x), -1, 64) @ h).reshape(x.shape)
            s = sums.setdefault(name, [0, 0, 0])
            s[0], s[1], s[2] = s[0] + x.square().sum(0), s[1] + xr.square().sum(0), s[2] + len(x)
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(windows[i:i + 4])
    for hd in handles:
        hd.remove()
    orig = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    rows = []
    for variant in ("plain", "hadamard64"):
        t = time.perf_counter()
        for n in names:
            w, (s_x, s_xr, count) = orig[n], sums[n]
            if variant == "plain":
                w_hat = fdb.quantize_fdb(w, 64, s_x / count).dequantize()
            else:
                wr = (w.view(w.shape[0], -1, 64) @ h).reshape(w.shape)
                q = fdb.quantize_fdb(wr, 64, s_xr / count).dequantize()
                w_hat = (q.view(w.shape[0], -1, 64) @ h).reshape(w.shape)
            model.get_submodule(n).weight.data.copy_(w_hat)
        ppl = evaluate(model, tok, n_windows=32, progress=False)["ppl"]
        rows.append({"init": variant, "wiki_ppl": ppl, "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        from dbquant.format.files import write_json

        write_json(a.json, {"benchmark": "rotation_init", "model": "smollm2-135m", "group": 64, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
