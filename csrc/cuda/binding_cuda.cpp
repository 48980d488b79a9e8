// Torch binding of the CUDA decode GEMV: registers
//   torch.ops.dbquant.dbgemm_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? offset,
//                                 Tensor? bias, int in_features, int group_size) -> Tensor
// Thin on purpose: it checks tensors (errors print the values), allocates y, and calls the
// torch-free launcher in dbgemv.cu on torch's current stream. Built as the extension
// module dbquant._C_cuda only when the installed torch has CUDA (setup.py); importing it
// loads this library, whose static initialisers register the op.

#include <torch/extension.h>

// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "dbgemv.h"

namespace {

namespace dc = dbquant::cuda;

void check_on(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "dbgemm_cuda: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "dbgemm_cuda: ", name, " must be contiguous (got shape ",
              t.sizes(), ", strides ", t.strides(), "); call .contiguous() once when loading");
}

at::Tensor dbgemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offset,
                       const std::optional<at::Tensor>& bias, int64_t in_features,
                       int64_t group_size) {
  TORCH_CHECK(x.is_cuda(), "dbgemm_cuda: x must be a CUDA tensor, got device ", x.device());
  dc::DType dtype;
  switch (x.scalar_type()) {
    case at::kFloat: dtype = dc::DType::kFloat32; break;
    case at::kHalf: dtype = dc::DType::kFloat16; break;
    case at::kBFloat16: dtype = dc::DType::kBFloat16; break;
    default:
      TORCH_CHECK(false, "dbgemm_cuda: x must be float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0,
              "dbgemm_cuda: group_size must be a positive multiple of 8, got ", group_size);
  TORCH_CHECK(in_features >= 1, "dbgemm_cuda: in_features must be >= 1, got ", in_features);
  const int64_t K = in_features;
  const int64_t G = (K + group_size - 1) / group_size;
  const int64_t KB = G * group_size / 8;

  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "dbgemm_cuda: x must be [M, ", K,
              "] for in_features=", K, ", got shape ", x.sizes());
  // One row's stride is meaningless (and may be anything for a [1, K] view): use K.
  const int64_t ldx = x.size(0) > 1 ? x.stride(0) : K;
  TORCH_CHECK(x.stride(1) == 1 && ldx >= K,
              "dbgemm_cuda: x needs unit column stride and row stride >= K (got shape ",
              x.sizes(), ", strides ", x.strides(), ")");
  check_on(qweight, "qweight", x);
  check_contiguous(qweight, "qweight");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(0) >= 1 &&
                  qweight.size(0) <= dc::kMaxPlanes && qweight.size(2) == KB,
              "dbgemm_cuda: qweight must be uint8 [k, N, ", KB, "] (k in 1..", dc::kMaxPlanes,
              ") for in_features=", K,
              ", group_size=", group_size, "; got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t N = qweight.size(1), P = qweight.size(0);
  TORCH_CHECK(N >= 1, "dbgemm_cuda: qweight has N=0 output rows");
  check_on(scales, "scales", x);
  check_contiguous(scales, "scales");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.size(0) == N &&
                  scales.size(1) == G && scales.size(2) == P,
              "dbgemm_cuda: scales must be float16 [", N, ", ", G, ", ", P, "] for N=", N,
              ", in_features=", K, ", group_size=", group_size, "; got ", scales.scalar_type(),
              " ", scales.sizes());
  if (offset) {
    check_on(*offset, "offset", x);
    check_contiguous(*offset, "offset");
    TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->dim() == 2 &&
                    offset->size(0) == N && offset->size(1) == G,
                "dbgemm_cuda: offset must be float16 [", N, ", ", G, "], got ",
                offset->scalar_type(), " ", offset->sizes());
  }
  if (bias) {
    check_on(*bias, "bias", x);
    check_contiguous(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == N,
                "dbgemm_cuda: bias must be ", x.scalar_type(), " [", N, "], got ",
                bias->scalar_type(), " ", bias->sizes());
  }
  const size_t smem = dc::dbgemv_smem_bytes(G, offset.has_value(), P);
  TORCH_CHECK(smem <= dc::kMaxSharedBytes, "dbgemm_cuda: G=", G, " groups (in_features=", K,
              ", group_size=", group_size, ") need ", smem, " bytes of shared memory per block, over ",
              dc::kMaxSharedBytes, "; use a larger group size or the triton backend");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  const cudaError_t err = dc::dbgemv_launch(
      dtype, x.data_ptr(), ldx, x.size(0), K, qweight.data_ptr<uint8_t>(),
      scales.data_ptr(), offset ? offset->data_ptr() : nullptr,
      bias ? bias->data_ptr() : nullptr, y.data_ptr(), N, group_size, P,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "dbgemm_cuda: kernel launch failed: ",
              cudaGetErrorString(err), " (M=", x.size(0), ", N=", N, ", K=", K,
              ", group_size=", group_size, ")");
  return y;
}

}  // namespace

// FRAGMENT: the CPU extension (dbquant._C) opens the `dbquant` namespace too.
TORCH_LIBRARY_FRAGMENT(dbquant, m) {
  m.def(
      "dbgemm_cuda(Tensor x, Tensor qweight, Tensor scales, Tensor? offset, Tensor? bias, "
      "int in_features, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(dbquant, CUDA, m) { m.impl("dbgemm_cuda", &dbgemm_cuda); }

// No Python functions: `import dbquant._C_cuda` exists only to load this library.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbquant CUDA kernels; registers torch.ops.dbquant.dbgemm_cuda on import";
}
