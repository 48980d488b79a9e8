"""Decode and prefill tokens/s of two builds of dbquant side by side: alternating processes, one build each.

A kernel change is judged against the build before it, on the same machine in the same minutes: the
VMs this project runs on are shared, and their speed moves by 10-20% within minutes, so two separate
benchmark runs cannot rank builds a few percent apart. Each round starts one process per build
(``PYTHONPATH`` = that tree, whose ``dbquant/_C*.so`` must be built: ``python setup.py build_ext
--inplace`` in a ``git worktree`` of the older commit), which loads CHECKPOINT, prefills a prompt of
``--prompt-tokens`` (128) and decodes ``--tokens`` greedy tokens ``--gens`` times through ``FastDecoder``;
the median of all but the first generation is the round's figure, for decode and for prefill. Reported
per build: every round's tok/s, the median, and the median of the per-round ratios (B over A); plus the
greedy tokens, so a change of output shows.

Usage: python benchmarks/ab_builds.py TREE_A TREE_B CHECKPOINT [--threads 1,2] [--rounds 4]
       [--prompt-tokens 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(checkpoint: str, threads: int, tokens: int, gens: int, prompt: int) -> dict:
    import torch

    import dbquant
    from dbquant.runtime.decode import FastDecoder

    torch.set_num_threads(threads)
    model = dbquant.load(checkpoint)
    ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(0))
    dec = FastDecoder(model, max_len=prompt + tokens + 8)
    rates, prefill = [], []
    for _ in range(gens):
        out, st = dec.generate(ids, tokens, min_new_tokens=tokens)
        rates.append(st.decode_tok_s)
        prefill.append(st.prefill_tok_s)
    return {"dbquant": dbquant.__file__, "tok_s": statistics.median(rates[1:]),
            "prefill_tok_s": statistics.median(prefill[1:]), "tokens": out[0, prompt:].tolist()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # One measurement, in the build on PYTHONPATH: --child CHECKPOINT THREADS TOKENS GENS PROMPT
    if argv[:1] == ["--child"]:
        checkpoint, threads, tokens, gens, prompt = argv[1:6]
        print(json.dumps(child(checkpoint, int(threads), int(tokens), int(gens), int(prompt))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="source tree of build A (the baseline)")
    ap.add_argument("b", help="source tree of build B")
    ap.add_argument("checkpoint")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gens", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    trees = {"a": os.path.abspath(a.a), "b": os.path.abspath(a.b)}
    checkpoint = os.path.abspath(a.checkpoint)
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        got = {"a": [], "b": []}
        for _ in range(a.rounds):
            for side, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads))
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", checkpoint, str(threads),
                                    str(a.tokens), str(a.gens), str(a.prompt_tokens)],
                                   env=env, cwd="/", capture_output=True, text=True, check=True)
                r = json.loads(p.stdout.strip().splitlines()[-1])
                if not r["dbquant"].startswith(tree):
                    raise RuntimeError(f"build {side} imported {r['dbquant']}, not from {tree}")
                got[side].append(r)
        row = {"threads": threads, "rounds": a.rounds,
               **{f"{s}_tok_s": [round(r["tok_s"], 2) for r in got[s]] for s in got},
               **{f"{s}_median": round(statistics.median(r["tok_s"] for r in got[s]), 2) for s in got},
               "b_over_a_rounds": [round(rb["tok_s"] / ra["tok_s"], 3) for ra, rb in zip(got["a"], got["b"])],
               **{f"{s}_prefill_median": round(statistics.median(r["prefill_tok_s"] for r in got[s]), 2) for s in got},
               "prefill_b_over_a_rounds": [round(rb["prefill_tok_s"] / ra["prefill_tok_s"], 3)
                                           for ra, rb in zip(got["a"], got["b"])],
               "same_tokens": got["a"][0]["tokens"] == got["b"][0]["tokens"]}
        row["b_over_a"] = round(statistics.median(row["b_over_a_rounds"]), 3)
        row["prefill_b_over_a"] = round(statistics.median(row["prefill_b_over_a_rounds"]), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        sys.path.insert(0, trees["b"])
        from dbquant.bench.cpu import environment
        from dbquant.format.files import write_json

        write_json(a.json, {"benchmark": "ab_builds", "a": trees["a"], "b": trees["b"], "checkpoint": checkpoint,
                            "tokens": a.tokens, "prompt_tokens": a.prompt_tokens, "environment": environment(),
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
