"""The issue-6 KV table: kv-ppl (docs/PROTOCOLS.md) of every cache in one run, sharing each window's prefill.

Usage: python benchmarks/kv_table.py [--windows N] [--json docs/bench/kv_ppl.json] [--only NAME ...]
Prints one markdown row per cache (kv-ppl at residual 128 and 0, quantized-part bits, bytes per
token, ratio vs the fp16 cache) and writes every measured field as JSON (atomically).
Every row can be re-run alone as ``dbquant eval --protocol kv-ppl --kv ... --json`` (same numbers).
"""

import argparse
import time

from dbquant.bench.cpu import write_json
from dbquant.eval.kv_ppl import kv_perplexity, kv_windows
from dbquant.model.sources import load_fp_model
from dbquant.runtime.kv import parse_kv

# (row name, --kv spelling, spec overrides): each row is measured at residual 128 and 0.
# Defaults (spec.py): sink 1; scales fp8 for K/V, fp16 for kivi2.
ROWS = [
    ("KIVI-2", "kivi2", {}),
    ("KIVI-2 fp8-scales", "kivi2", {"scale_dtype": "fp8"}),
    ("HQQ-cache 2-bit", "hqq2", {}),
    ("HQQ-cache 1-bit", "hqq1", {}),
    ("K2/V2", "2/2", {}),
    ("K1.5/V2", "1.5/2", {}),
    ("K1.5/V1.58", "1.5/1.58", {}),
    ("K1.5/V1.58 fp16-scales", "1.5/1.58", {"scale_dtype": "fp16"}),
    ("K1.25/V1.58", "1.25/1.58", {}),
    ("K1/V1.58", "1/1.58", {}),
    ("K1.5/V1.58 no-FFT", "1.5/1.58", {"fft": False}),
    ("K1.5/V1.58 sink0", "1.5/1.58", {"sink": 0}),
    ("K1.5/V1.58 sink4", "1.5/1.58", {"sink": 4}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default="docs/bench/kv_ppl.json")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    a = ap.parse_args()
    rows = [r for r in ROWS if not a.only or r[0] in a.only]
    specs = [parse_kv("fp")] + [parse_kv(kv, residual=r, **o) for _, kv, o in rows for r in (128, 0)]
    model, tok = load_fp_model("smollm2-135m")
    t0 = time.perf_counter()
    res = kv_perplexity(model, kv_windows(tok, a.windows), specs)
    names = ["fp"] + [n for n, _, _ in rows for _ in (0, 1)]
    out = [{"row": n, **r} for n, r in zip(names, res)]
    write_json(a.json, out)
    fp = out[0]["ppl"]
    print(f"# {a.windows} windows, {time.perf_counter() - t0:.0f} s; fp kv-ppl {fp:.2f}")
    print("| cache | kv-ppl r=128 | kv-ppl r=0 | quantized-part bits | bytes/token r=128 / r=0 "
          "| ratio vs fp16 r=128 / r=0 |")
    for i in range(1, len(out), 2):
        r128, r0 = out[i], out[i + 1]
        print(f"| {r128['row']} | {r128['ppl']:.2f} ({r128['ppl'] / fp - 1:+.0%}) "
              f"| {r0['ppl']:.2f} ({r0['ppl'] / fp - 1:+.0%}) "
              f"| {r0['kv_quantized_bits']:.3f} | {r128['kv_bytes_per_token']:.0f} / {r0['kv_bytes_per_token']:.0f} "
              f"| {r128['ratio_vs_fp16']:.2f} / {r0['ratio_vs_fp16']:.2f} |")


if __name__ == "__main__":
    main()
