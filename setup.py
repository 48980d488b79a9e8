"""Build the optional native kernels; all metadata lives in pyproject.toml.

    pip install --no-build-isolation -e .

builds ``dbquant._C`` (CPU, csrc/cpu) against the installed torch, and
``dbquant._C_cuda`` (csrc/cuda) when torch has CUDA and CUDA_HOME is set.
``DBQUANT_EXTENSIONS=cuda`` (or ``cpu``; a comma list, default both) builds only those. Without torch,
without a compiler, or when a compile fails, the pure-Python package still installs
(dbquant then uses its slower reference kernels) and a warning says why.
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext as _plain_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"dbquant setup: {msg}", file=sys.stderr)


def _native_build():
    """(ext_modules, cmdclass) for the kernels that can be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any failure means: pure-Python install
        _say(f"torch is not importable ({e}); skipping the C++ kernels (install torch first, "
             "then `pip install --no-build-isolation -e .`)")
        return [], {}
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        _say("no C++ compiler found (set CXX or install g++); skipping the C++ kernels")
        return [], {}

    wanted = {e.strip() for e in os.environ.get("DBQUANT_EXTENSIONS", "cpu,cuda").split(",") if e.strip()}
    if not wanted <= {"cpu", "cuda"}:
        raise SystemExit(f"dbquant setup: DBQUANT_EXTENSIONS must list cpu and/or cuda, got {sorted(wanted)}")
    unix = sys.platform != "win32"
    # OpenMP: at::parallel_for and `omp simd`. -fno-trapping-math: nothing here reads floating-point
    # exception flags, and without it GCC keeps a loop with a clamp (fast_exp's) scalar on AVX2 and SSE2.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"] if unix else ["/O2", "/openmp"]
    exts = [] if "cpu" not in wanted else [CppExtension(
        "dbquant._C",
        ["csrc/cpu/binding.cpp"] + sorted(f for part in ("dbgemm_t16", "dbgemm_i8lut", "gemv_int8", "kv_attn",
                                                         "stream_read", "dequant_t16", "decode_ops", "gemm_a8")
                                          for f in glob.glob(f"csrc/cpu/{part}*.cpp")),
        include_dirs=[os.path.join(HERE, "csrc", "cpu")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if unix else [],
    )]
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    if "cuda" in wanted and torch.version.cuda is not None and CUDA_HOME and cu:
        # The .cu files are torch-free (checked alone by `nvcc -c` in tests/test_gpu_compile.py);
        # only binding_cuda.cpp includes torch.
        exts.append(CUDAExtension(
            "dbquant._C_cuda",
            cu + ["csrc/cuda/binding_cuda.cpp"],
            include_dirs=[os.path.join(HERE, "csrc", "cuda")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        ))
    elif "cuda" in wanted and cu:
        _say(f"torch {torch.__version__} has no CUDA (or CUDA_HOME is unset); skipping the CUDA "
             "kernels (dbquant._C_cuda); the triton backend still serves GPUs")

    class TolerantBuild(BuildExtension):
        """A failed kernel compile warns instead of failing the install."""

        failed = set()

        def build_extensions(self):
            super().build_extensions()
            # Forget failed extensions, or the editable/inplace step tries to copy their
            # missing .so files and fails the install after all.
            self.extensions = [e for e in self.extensions if e.name not in self.failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self.failed.add(ext.name)
                _say(f"WARNING: building {ext.name} failed ({e}); dbquant installs without it and "
                     "falls back to the slower reference kernels. Fix the error above and rerun "
                     "`pip install --no-build-isolation -e .`")

    return exts, {"build_ext": TolerantBuild}


ext_modules, cmdclass = _native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass or {"build_ext": _plain_build_ext})
