#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run, on a machine whose python3 already has a CUDA
# torch and Triton (no network needed: nothing is downloaded; optional wheels in .whl/ are
# installed with --no-index, e.g. the transformers version requirements.txt pins).
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./gpu-out
#
# 1. environment (GPU, driver, versions)   -> OUT/env.txt
# 2. build dbquant._C_cuda for this GPU     -> OUT/build.log
# 3. the GPU tests (CUDA GEMV, Triton GEMM/GEMV and KV dequant, a quantized model on every GPU
#    backend), compiled kernels (TRITON_INTERPRET=0)  -> OUT/tests.log, OUT/tests.xml
# 4. kernel benchmarks against cuBLAS fp16, with the copy ceiling of the same run
#    -> OUT/gpu_cuda_fp16.json, OUT/gpu_triton_fp16.json
# 5. compute-sanitizer memcheck of the CUDA GEMV on odd shapes -> OUT/memcheck.log
# Each step has its own time limit and the next step runs even when one fails; the exit status
# is the number of failed steps. On an H100 (2026-12-06, 16 cores) the build took 53 s, the
# benchmarks 2.5 min and memcheck 12 s; the tests did not finish in 240 s (about 256 of 281 ran).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
PY=${PYTHON:-python3}
failed=0
step() { echo "== $1 ($(date +%T))"; }
fail() { echo "!! FAILED: $1"; failed=$((failed + 1)); }

step environment
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dbquant-site \
    .whl/*.whl && export PYTHONPATH=/tmp/dbquant-site || fail "wheels"
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton, transformers; p = torch.cuda.get_device_properties(0); \
print('torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, \
'| transformers', transformers.__version__, '|', p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs')"
  nvcc --version | tail -n 2
  lscpu | grep -E "Model name|^CPU\(s\)"
} 2>&1 | tee "$out/env.txt"

step "build dbquant._C_cuda"
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
if DBQUANT_EXTENSIONS=cuda TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} timeout 240 \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$out/build.log" 2>&1; then
  grep -iE "warning|error" "$out/build.log" | grep -v "^  *warnings.warn" | tail -n 5
else
  tail -n 30 "$out/build.log"; fail build
fi
"$PY" -c "from dbquant.backends import cuda, triton; print('cuda backend:', cuda.load_cuda(), cuda._cuda_error or ''); \
print('triton backend:', triton.load_triton(), triton.unavailable_reason() or '')" || fail "backends"

step "GPU tests (compiled kernels)"
# -v: each test's outcome is logged as it ends, so a step cut off by its limit still says which ran.
TRITON_INTERPRET=0 timeout 330 "$PY" -m pytest -v -n 16 -p no:cacheprovider -p no:benchmark --junitxml "$out/tests.xml" \
  tests/test_cuda_kernel.py tests/test_gpu_model.py tests/test_triton_kernels.py tests/test_bench_gpu.py \
  "tests/test_kv_quantizers.py::test_triton_dequant_kernels_match_pytorch" >"$out/tests.log" 2>&1 || fail tests
grep -cE " PASSED " "$out/tests.log" | sed 's/^/tests passed: /'
grep -E "FAILED|ERROR|crashed|node down|[0-9]+ passed|[0-9]+ failed" "$out/tests.log" | tail -n 25

step "benchmarks vs cuBLAS (float16)"
timeout 60 "$PY" -m dbquant bench --backend cuda --m 1,2,4 --dtype float16 --json "$out/gpu_cuda_fp16.json" \
  || fail "bench cuda"
timeout 200 "$PY" -m dbquant bench --backend triton --m 1,4,16,64,256 --dtype float16 \
  --json "$out/gpu_triton_fp16.json" || fail "bench triton"

step "compute-sanitizer memcheck (CUDA GEMV, odd shapes)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" - >"$out/memcheck.log" 2>&1 <<'EOF' || fail memcheck
import torch
from dbquant.backends.cuda import dbgemm_cuda
from tests.packed_case import make_layer, make_x
for n, k, g, m, planes in [(37, 137, 8, 3, 2), (19, 200, 24, 5, 3), (33, 72, 8, 1, 1), (21, 400, 200, 4, 4)]:
    layer = make_layer(n, k, g, True, True, "cuda", planes=planes)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        dbgemm_cuda(make_x(m, k + 3, dt, "cuda")[:, :k], *layer, k, g)
torch.cuda.synchronize()
print("memcheck script done")
EOF
tail -n 4 "$out/memcheck.log"

step "done: $failed failed step(s)"
exit "$failed"
