"""Integer vs float lookup tables of the CPU GEMV, per ISA path, side by side in one run (issue 19).

What it measures: the time of ``y = x @ W.T`` at M = 1 through ``run_cpu(x, w, None, isa, lut)`` for
lut = "float" (csrc/cpu/dbgemm_t16.h), "int8" and "int16" (csrc/cpu/dbgemm_i8lut.h) on the same prepared
t16 weight, for every ISA path this CPU runs, each shape and thread count. The weight is reused
(resident in L2/L3: this is the kernels' compute cost, not a streaming figure). The two tables
alternate round-robin for ``--rounds`` rounds so a shared, noisy machine slows them alike; each
round is a median over repeated calls, and the reported figure is the median over rounds.
This is the measurement behind ``kI8LutDefault`` in csrc/cpu/dbgemm_i8lut.cpp.

Usage (repository root, venv active):
    OMP_NUM_THREADS=1 python benchmarks/i8lut_vs_t16.py --json docs/bench/i8lut_vs_t16.json
    python benchmarks/i8lut_vs_t16.py --shapes 576x576 --threads 1 --planes 1,2,3,4 --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/i8lut_vs_t16.py --e2e DIR --threads 1,2 --rounds 3
The JSON (written atomically) holds the environment (CPU model, ISA paths, load average) and one row
per (shape, planes, isa, threads): {float_us, int8_us, int16_us (medians), their *_rounds,
int8_speedup = float_us / int8_us, int16_speedup = float_us / int16_us} (the default vpshufb lookups);
on an AVX-512 VBMI CPU the avx512 rows add int8_vbmi_us, the vpermb / vpermi2b lookups turned on.
With ``--e2e DIR`` instead: the fast decoder on that checkpoint
(best ISA path, one C++ call per layer and token), a 128-token prompt and 64 greedy new tokens per
run, the tables forced by ``forced_lut`` and alternating run by run; one row per thread count with
the median decode tokens/s of each and whether each integer kind's greedy continuation is the float
tables' tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dbquant.backends import cpu as cpu_backend  # noqa: E402
from dbquant.bench.cpu import _median_ms, environment  # noqa: E402
from dbquant.format.files import write_json  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]


def packed(n: int, k: int, g: int, planes: int, seed: int = 0):
    """A random prepared t16 weight (random bits, float16 scales of a trained layer's size)."""
    gen = torch.Generator().manual_seed(seed)
    kp = -(-k // g) * g
    q = torch.randint(0, 256, (planes, n, kp // 8), dtype=torch.uint8, generator=gen)
    s = (torch.rand(n, kp // g, planes, generator=gen) * 0.02).half()
    return cpu_backend.prepare_cpu(q, s, None, k, g)


def _dump(path: str, rows: list[dict], env0) -> None:
    env = environment()
    env["loadavg_before"] = env0
    write_json(path, {"environment": env, "rows": rows})
    print(f"wrote {path}")


def e2e(a) -> int:
    """Decode tokens/s of the fast decoder with the float vs the integer tables (see the module doc)."""
    from dbquant.model.checkpoint import load
    from dbquant.runtime.decode import FastDecoder

    env0 = os.getloadavg()
    model = load(a.e2e)
    ids = torch.randint(100, 20000, (1, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for t in (int(v) for v in a.threads.split(",")):
        torch.set_num_threads(t)
        tok_s, seqs = {"float": [], "int8": [], "int16": []}, {}
        for _ in range(a.rounds):
            for lut in tok_s:
                with cpu_backend.forced_lut(lut), torch.no_grad():
                    dec = FastDecoder(model, max_len=256)
                    seq, st = dec.generate(ids, 64, min_new_tokens=64)
                tok_s[lut].append(st.decode_tok_s)
                seqs[lut] = seq
        med = {lut: statistics.median(v) for lut, v in tok_s.items()}
        row = dict(model=a.e2e, threads=t, prompt_tokens=128, new_tokens=64, isa=torch.ops.dbquant.cpu_isas()[0])
        for lut, v in tok_s.items():
            row[f"{lut}_tok_s"], row[f"{lut}_rounds"] = round(med[lut], 2), [round(r, 2) for r in v]
        for lut in ("int8", "int16"):
            row[f"{lut}_speedup"] = round(med[lut] / med["float"], 3)
            row[f"{lut}_same_greedy_tokens"] = bool(torch.equal(seqs["float"], seqs[lut]))
        rows.append(row)
        print(f"e2e t={t}  " + "  ".join(f"{lut} {med[lut]:6.1f} tok/s" for lut in tok_s) + "  "
              + "  ".join(f"{lut} {row[lut + '_speedup']:4.2f}x, same tokens {row[lut + '_same_greedy_tokens']}"
                          for lut in ("int8", "int16")), flush=True)
    if a.json:
        _dump(a.json, rows, env0)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,...")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--planes", default="2", help="bit planes k, comma-separated")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--e2e", default=None, help="checkpoint directory: decode tokens/s instead of the GEMV")
    a = ap.parse_args()
    if not cpu_backend.load_cpu():
        raise SystemExit("dbquant._C is not built: pip install --no-build-isolation -e .")
    if a.e2e:
        return e2e(a)
    isas = [i for i in torch.ops.dbquant.cpu_isas() if i != "scalar"]  # scalar: the fallback, not a contender
    rows = []
    env0 = os.getloadavg()
    torch.ops.dbquant.cpu_i8lut_lookup("on")  # where the CPU has VBMI
    vbmi = torch.ops.dbquant.cpu_i8lut_lookup("auto") == "vbmi"
    for spec in a.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        for planes in (int(p) for p in a.planes.split(",")):
            w = packed(n, k, a.group_size, planes)
            x = torch.randn(1, k)
            for isa in isas:
                for t in (int(v) for v in a.threads.split(",")):
                    torch.set_num_threads(t)
                    got = {"float": [], "int8": [], "int16": []}
                    if isa == "avx512" and vbmi:
                        got["int8_vbmi"] = []  # the vpermb / vpermi2b lookups, beside the default vpshufb
                    for _ in range(a.rounds):
                        for lut in got:
                            torch.ops.dbquant.cpu_i8lut_lookup("on" if lut == "int8_vbmi" else "auto")
                            fn = lambda: cpu_backend.run_cpu(x, w, None, isa,  # noqa: E731
                                                             "int8" if lut == "int8_vbmi" else lut)
                            got[lut].append(1e3 * _median_ms(fn, min_time=0.15))
                    torch.ops.dbquant.cpu_i8lut_lookup("auto")  # vpshufb, the default
                    f, i, j = (statistics.median(got[lut]) for lut in ("float", "int8", "int16"))
                    row = dict(n=n, k=k, planes=planes, group_size=a.group_size, isa=isa, threads=t, m=1,
                               float_us=round(f, 2), int8_us=round(i, 2), int16_us=round(j, 2),
                               int8_speedup=round(f / i, 3), int16_speedup=round(f / j, 3),
                               **{f"{lut}_rounds": [round(v, 2) for v in got[lut]]
                                  for lut in ("float", "int8", "int16")})
                    extra = ""
                    if "int8_vbmi" in got:
                        iv = statistics.median(got["int8_vbmi"])
                        row.update(int8_vbmi_us=round(iv, 2), int8_vbmi_rounds=[round(v, 2) for v in got["int8_vbmi"]])
                        extra = f"  (vbmi {iv:8.1f} us)"
                    rows.append(row)
                    print(f"{n:>5}x{k:<5} k={planes} {isa:<6} t={t}  float {f:8.1f} us  int8 {i:8.1f} us  "
                          f"int16 {j:8.1f} us  speedup int8 {f / i:5.2f}x int16 {f / j:5.2f}x{extra}", flush=True)
    if a.json:
        _dump(a.json, rows, env0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
