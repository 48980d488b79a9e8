"""The GPU kernels compile for real GPU targets, checked here without a GPU.

* Every ``@triton.jit`` kernel of ``kernels/dbgemm_triton.py`` is compiled to PTX and a
  cubin for ``GPUTarget("cuda", 80, 32)`` (Ampere) and ``("cuda", 90, 32)`` (Hopper) with
  ``triton.compile``, in variants that reach every ``constexpr`` branch (both scale
  paths, offset/bias on and off, split-K on and off, fp16/bf16/fp32) and the largest
  autotune configurations, whose shared memory must fit the target.
* Every ``csrc/cuda/*.cu`` is compiled with ``nvcc -arch=sm_80 -c`` and ``-arch=sm_90``
  (skipped, saying so, only when nvcc is not installed).

The compilers run as subprocesses started together (two cores: they overlap), Triton's
outside the interpreter (``TRITON_INTERPRET`` removed) and with an empty cache, so a
kernel is really compiled each run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
KERNEL_FILE = ROOT / "kernels" / "dbgemm_triton.py"
TARGETS = (80, 90)
# Largest shared memory one block may use (opt-in maximum): A100 163 KiB, H100 227 KiB.
MAX_SHARED = {80: 166912, 90: 232448}

_F16 = {"x_ptr": "*fp16", "qweight_ptr": "*u8", "scales_ptr": "*fp16", "offset_ptr": "*fp16",
        "bias_ptr": "*fp16", "y_ptr": "*fp16"}
_BF16 = {**_F16, "x_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16"}
_F32_NONE = {"x_ptr": "*fp32", "qweight_ptr": "*u8", "scales_ptr": "*fp32", "offset_ptr": None,
             "bias_ptr": None, "y_ptr": "*fp32"}


def _gemv_ptrs(ptrs, partials):
    p = {k: v for k, v in ptrs.items() if k != "y_ptr"}
    return {**p, "out_ptr": "*fp32" if partials else ptrs["y_ptr"]}


# name -> (kernel, pointer types (None: absent, passed as None like the wrapper does),
#          constexprs (DOT_DTYPE by name), compile options)
VARIANTS = {
    # PLANES (k bit planes, format v2) varies over the variants: 1, 2, 3 and 4 each compile.
    # Largest autotune config; K tile inside a group (g % BLOCK_K == 0): one scale per column.
    "gemm-fp16-tile-in-group-128x256x64": (
        "dbgemm_gemm_kernel", _F16,
        dict(GROUP_SIZE=64, HAS_OFFSET=True, HAS_BIAS=True, DOT_DTYPE="fp16", PLANES=2,
             BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), dict(num_warps=8, num_stages=3)),
    # g = 8 < BLOCK_K: tiles span groups, one scale per element; bf16 tensor-core dot.
    "gemm-bf16-tile-spans-groups": (
        "dbgemm_gemm_kernel", _BF16,
        dict(GROUP_SIZE=8, HAS_OFFSET=True, HAS_BIAS=True, DOT_DTYPE="bf16", PLANES=3,
             BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), dict(num_warps=4, num_stages=4)),
    # fp32 activations (ieee dot), no offset, no bias (None pointers).
    "gemm-fp32-no-offset-no-bias": (
        "dbgemm_gemm_kernel", _F32_NONE,
        dict(GROUP_SIZE=64, HAS_OFFSET=False, HAS_BIAS=False, DOT_DTYPE="fp32", PLANES=1,
             BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), dict(num_warps=4, num_stages=3)),
    "gemv-fp16-split1-tile-in-group": (
        "dbgemv_splitk_kernel", _gemv_ptrs(_F16, partials=False),
        dict(GROUP_SIZE=128, HAS_OFFSET=True, HAS_BIAS=True, SPLIT_K=1, BLOCK_N=32, BLOCK_K=128, PLANES=4),
        dict(num_warps=4, num_stages=3)),
    # Largest GEMV config, split-K partials, tiles spanning groups.
    "gemv-bf16-split4-tile-spans-groups": (
        "dbgemv_splitk_kernel", _gemv_ptrs(_BF16, partials=True),
        dict(GROUP_SIZE=8, HAS_OFFSET=True, HAS_BIAS=False, SPLIT_K=4, BLOCK_N=128, BLOCK_K=128, PLANES=2),
        dict(num_warps=8, num_stages=2)),
    "splitk-reduce-bf16-bias": (
        "splitk_reduce_kernel", {"part_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"},
        dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=1024), dict(num_warps=4)),
}

# Runs in a fresh interpreter without TRITON_INTERPRET: argv[1] = capability, argv[2] =
# JSON variants, argv[3] = the kernel file (loaded by path: importing the dbquant package
# would pull in transformers, seconds per process). Prints one JSON line per variant,
# then the list of @triton.jit kernels.
_TRITON_SCRIPT = r"""
import importlib.util, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

cap, variants = int(sys.argv[1]), json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("dbgemm_triton", sys.argv[3])
mod = importlib.util.module_from_spec(spec)
sys.modules["dbgemm_triton"] = mod
spec.loader.exec_module(mod)
dtypes = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
for name, (kernel, ptrs, consts, options) in variants.items():
    fn = getattr(mod, kernel)
    consts = {k: dtypes[v] if k == "DOT_DTYPE" else v for k, v in consts.items()}
    consts.update({k: None for k, v in ptrs.items() if v is None})
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", cap, 32), options=options)
        out = {"name": name, "ok": True, "ptx": len(c.asm["ptx"]), "cubin": len(c.asm["cubin"]),
               "shared": c.metadata.shared, "target": c.asm["ptx"].count(f".target sm_{cap}")}
    except Exception as e:  # reported to the test, which fails with the message
        out = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)
kernels = sorted(k for k, v in vars(mod).items() if isinstance(v, JITFunction))
print(json.dumps({"kernels": kernels}))
"""


class _Job:
    """A compiler subprocess, started at once and waited for on first use."""

    def __init__(self, cmd, env, log: Path):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in result()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True)
        self._rc = None

    def result(self) -> tuple[int, str]:
        if self._rc is None:
            self._rc = self.proc.wait(timeout=600)
            self._out.close()
        return self._rc, self.log.read_text()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start every compile at once: Triton per target, nvcc per (.cu file, target)."""
    tmp = tmp_path_factory.mktemp("gpu-compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # empty: compile for real
    started = {}
    for cap in TARGETS:
        cmd = [sys.executable, "-c", _TRITON_SCRIPT, str(cap), json.dumps(VARIANTS), str(KERNEL_FILE)]
        started[("triton", cap)] = _Job(cmd, env, tmp / f"triton-{cap}.log")
    nvcc = shutil.which("nvcc")
    if nvcc:
        for cu in CU_FILES:
            for cap in TARGETS:
                # The flags setup.py gives nvcc for dbquant._C_cuda.
                cmd = [nvcc, f"-arch=sm_{cap}", "-O3", "--use_fast_math", "-c", str(cu),
                       "-o", str(tmp / f"{cu.stem}-sm{cap}.o")]
                started[(cu.name, cap)] = _Job(cmd, os.environ.copy(), tmp / f"{cu.stem}-{cap}.log")
    yield started
    for job in started.values():
        if job.proc.poll() is None:
            job.proc.kill()
        job.result()


def _triton_results(jobs, cap) -> dict:
    rc, log = jobs[("triton", cap)].result()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert rc == 0 and lines, f"the Triton compile script failed (rc={rc}):\n{log[-4000:]}"
    return {line.get("name", "kernels"): line for line in lines}


@pytest.mark.parametrize("cap", TARGETS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_triton_kernel_compiles(jobs, cap, variant):
    res = _triton_results(jobs, cap)[variant]
    assert res["ok"], res.get("error")
    assert res["ptx"] > 0 and res["cubin"] > 0
    assert res["target"] == 1, f"PTX not built for sm_{cap}"
    assert res["shared"] <= MAX_SHARED[cap], (
        f"{variant} needs {res['shared']} bytes of shared memory, over sm_{cap}'s {MAX_SHARED[cap]}")


@pytest.mark.parametrize("cap", TARGETS)
def test_every_triton_kernel_is_compiled(jobs, cap):
    res = _triton_results(jobs, cap)
    kernels = res["kernels"]["kernels"]
    covered = {VARIANTS[name][0] for name in VARIANTS}
    assert kernels and set(kernels) == covered, f"kernels {kernels}, compiled here {sorted(covered)}"


def test_cuda_sources_exist():
    assert "dbgemv.cu" in [p.name for p in CU_FILES]
    assert (ROOT / "csrc" / "cuda" / "binding_cuda.cpp").exists()


@pytest.mark.parametrize("cap", TARGETS)
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_cuda_source_compiles(jobs, cu, cap):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed (on PATH): the CUDA sources cannot be compile-checked here")
    rc, log = jobs[(cu, cap)].result()
    assert rc == 0, f"nvcc -arch=sm_{cap} -c {cu} failed:\n{log[-4000:]}"
    assert "warning" not in log.lower(), f"nvcc warned on {cu} (sm_{cap}):\n{log[-4000:]}"
