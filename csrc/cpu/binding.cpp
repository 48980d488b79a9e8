// Torch binding of the CPU lookup-table kernel. Registers
//   torch.ops.dbquant.dbgemm_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset,
//                                Tensor? bias, int out_features, int in_features,
//                                int group_size, str isa="auto") -> Tensor
//   torch.ops.dbquant.dequantize_cpu(Tensor planes, Tensor scales, Tensor? offset,
//                                    int out_features, int in_features, int group_size)
//                                    -> Tensor (float32 [N, K])
//   torch.ops.dbquant.linear_int8_cpu(Tensor x, Tensor wq, Tensor s) -> Tensor
//                                    (dense int8-weight projection, gemv_int8.h)
//   torch.ops.dbquant.rms_norm_cpu(Tensor x, Tensor w, float eps) -> Tensor
//                                    (fused RMSNorm over the last dim, decode_ops.h)
//   torch.ops.dbquant.cpu_isas() -> str[]       (supported ISA paths, fastest first)
// The weight arguments are in the t16 kernel layout (dbgemm_t16.h, docs/FORMAT.md);
// dbquant/_native.py builds it from the canonical format. This is the only file that
// includes <torch/extension.h> (slow to compile); the arithmetic lives in the torch-free
// dbgemm_t16*.cpp files. Built as the extension module dbquant._C: importing it loads
// this library, whose static initialisers register the ops.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "dbgemm_t16.h"
#include "gemv_int8.h"
#include "decode_ops.h"

namespace {

using dbquant::cpu::Isa;

// Cap on the lookup tables held at once (64 bytes per 4 input channels per activation
// row); larger M is processed in slices of rows so memory stays bounded.
constexpr int64_t kMaxLutBytes = int64_t(16) << 20;

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "dbgemm_cpu: ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "dbgemm_cpu: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "dbgemm_cpu: ", name, " must be contiguous (got shape ",
              t.sizes(), ", strides ", t.strides(), "); call .contiguous()");
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> want) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(want), "dbgemm_cpu: ", name, " must have shape ",
              at::IntArrayRef(want), " for the given out_features/in_features/group_size; got ",
              t.sizes());
}

// The t16 weight view of (planes, scales, offset) after checking dtypes and shapes
// (`op` names the calling op in messages).
dbquant::cpu::T16Weight t16_weight(const char* op, const at::Tensor& planes, const at::Tensor& scales,
                                   const std::optional<at::Tensor>& offset, int64_t out_features,
                                   int64_t in_features, int64_t group_size) {
  check_input(planes, "planes", at::kByte);
  check_input(scales, "scales", at::kHalf);
  if (offset) check_input(*offset, "offset", at::kHalf);
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0, op,
              ": group_size must be a positive multiple of 8, got ", group_size);
  TORCH_CHECK(in_features >= 1 && out_features >= 1, op,
              ": in_features and out_features must be >= 1, got ", in_features, ", ", out_features);
  dbquant::cpu::T16Weight w{};
  w.N = out_features;
  w.K = in_features;
  w.group_size = group_size;
  const int64_t T = w.tiles(), G = w.groups(), C8 = w.kp() / 8, tile = dbquant::cpu::kTile;
  check_shape(planes, "planes", {T, C8, 2, tile});
  check_shape(scales, "scales", {T, G, 2, tile});
  if (offset) check_shape(*offset, "offset", {T, G, tile});
  w.planes = planes.data_ptr<uint8_t>();
  w.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  w.offset = offset ? reinterpret_cast<const uint16_t*>(offset->data_ptr<at::Half>()) : nullptr;
  return w;
}

Isa parse_isa(const std::string& isa) {
  if (isa == "auto") return dbquant::cpu::best_isa();
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Scalar}) {
    if (isa == dbquant::cpu::isa_name(i)) {
      TORCH_CHECK(dbquant::cpu::isa_supported(i), "dbgemm_cpu: isa='", isa,
                  "' is not supported by this CPU (supported: ",
                  dbquant::cpu::isa_name(dbquant::cpu::best_isa()), " and below)");
      return i;
    }
  }
  TORCH_CHECK(false, "dbgemm_cpu: unknown isa '", isa, "'; use auto, avx512, avx2 or scalar");
}

at::Tensor dbgemm_cpu(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offset,
                      const std::optional<at::Tensor>& bias, int64_t out_features,
                      int64_t in_features, int64_t group_size, const std::string& isa_arg) {
  check_input(x, "x", at::kFloat);
  if (bias) check_input(*bias, "bias", at::kFloat);
  dbquant::cpu::T16Weight w =
      t16_weight("dbgemm_cpu", planes, scales, offset, out_features, in_features, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "dbgemm_cpu: x must be [M, ",
              in_features, "] (in_features), got shape ", x.sizes());
  if (bias) check_shape(*bias, "bias", {out_features});
  const Isa isa = parse_isa(isa_arg);
  w.bias = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t T = w.tiles(), G = w.groups(), C8 = w.kp() / 8;

  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;

  const int64_t lf = dbquant::cpu::lut_floats(w);
  const int64_t m_slice = std::max<int64_t>(1, std::min<int64_t>(M, kMaxLutBytes / (lf * 4)));
  at::Tensor lut = at::empty({m_slice, lf}, x.options());
  at::Tensor gsum = offset ? at::empty({m_slice, G}, x.options()) : at::Tensor();
  float* lp = lut.data_ptr<float>();
  float* gp = offset ? gsum.data_ptr<float>() : nullptr;

  for (int64_t m0 = 0; m0 < M; m0 += m_slice) {
    const int64_t mt = std::min(m_slice, M - m0);
    const float* xt = x.data_ptr<float>() + m0 * in_features;
    // Tables: ~5 vector ops per 4 channels; only worth threads for many long rows.
    at::parallel_for(0, mt, std::max<int64_t>(1, (int64_t(1) << 16) / w.kp()),
                     [&](int64_t b, int64_t e) { dbquant::cpu::build_luts(isa, w, xt, lp, gp, b, e); });
    // Tiles: one unit is ~4 vpermps per byte of a row per activation row; hand out at
    // least ~32k of them per task (a parallel region costs a few microseconds).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / (4 * mt * C8));
    float* yt = y.data_ptr<float>() + m0 * out_features;
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      dbquant::cpu::gemm_tiles(isa, w, lp, gp, mt, yt, t0, t1);
    });
  }
  return y;
}

// Dense float32 [N, K] weight from the t16 layout (for long prefills: one BLAS GEMM).
at::Tensor dequantize_cpu(const at::Tensor& planes, const at::Tensor& scales,
                          const std::optional<at::Tensor>& offset, int64_t out_features,
                          int64_t in_features, int64_t group_size) {
  const dbquant::cpu::T16Weight w =
      t16_weight("dequantize_cpu", planes, scales, offset, out_features, in_features, group_size);
  const int64_t T = w.tiles(), tile = dbquant::cpu::kTile;
  at::Tensor out = at::empty({out_features, in_features}, planes.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, (int64_t(1) << 14) / (tile * w.kp())),
                   [&](int64_t t0, int64_t t1) { dbquant::cpu::dequantize_tiles(w, op, t0, t1); });
  return out;
}

// y = x @ (s * wq)^T for a dense int8-weight projection (gemv_int8.h).
at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& s) {
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && s.device().is_cpu(),
              "linear_int8_cpu: all tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "linear_int8_cpu: x must be a contiguous float32 [M, K] tensor, got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(wq.scalar_type() == at::kChar && wq.is_contiguous() && wq.dim() == 2,
              "linear_int8_cpu: wq must be a contiguous int8 [N, K] tensor, got ", wq.scalar_type(),
              " ", wq.sizes());
  TORCH_CHECK(wq.size(1) == x.size(1), "linear_int8_cpu: x has K=", x.size(1), " but wq is ",
              wq.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 1 &&
                  s.size(0) == wq.size(0),
              "linear_int8_cpu: s must be a contiguous float32 [N] = [", wq.size(0), "], got ",
              s.scalar_type(), " ", s.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool simd = dbquant::cpu::isa_supported(Isa::Avx512);
  at::parallel_for(0, N / 4, std::max<int64_t>(1, (int64_t(1) << 14) / (M * K)), [&](int64_t b, int64_t e) {
    const int64_t n0 = 4 * b, n1 = e == N / 4 ? N : 4 * e;  // the last task takes the N % 4 rows
    if (simd) dbquant::cpu::gemv_int8_rows_avx512(xp, wp, sp, M, N, K, yp, n0, n1);
    else dbquant::cpu::gemv_int8_rows_scalar(xp, wp, sp, M, N, K, yp, n0, n1);
  });
  if (N < 4) dbquant::cpu::gemv_int8_rows_scalar(xp, wp, sp, M, N, K, yp, 0, N);
  return y;
}

// Fused RMSNorm over the last dim of a contiguous float32 tensor (decode_ops.h).
at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "rms_norm_cpu: x must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1 && w.size(0) == D,
              "rms_norm_cpu: w must be a contiguous float32 [", D, "], got ", w.scalar_type(), " ",
              w.sizes());
  at::Tensor y = at::empty_like(x);
  const int64_t R = D ? x.numel() / D : 0;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    dbquant::cpu::rms_norm_rows(xp, w.data_ptr<float>(), float(eps), D, yp, b, e);
  });
  return y;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
    if (dbquant::cpu::isa_supported(i)) out.emplace_back(dbquant::cpu::isa_name(i));
  return out;
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: a namespace may be opened by TORCH_LIBRARY only once
// per process, and the CUDA extension (dbquant._C_cuda) adds its ops to `dbquant` too.
TORCH_LIBRARY_FRAGMENT(dbquant, m) {
  m.def(
      "dbgemm_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset, Tensor? bias, "
      "int out_features, int in_features, int group_size, str isa=\"auto\") -> Tensor");
  m.def(
      "dequantize_cpu(Tensor planes, Tensor scales, Tensor? offset, int out_features, "
      "int in_features, int group_size) -> Tensor");
  m.def("linear_int8_cpu(Tensor x, Tensor wq, Tensor s) -> Tensor");
  m.def("rms_norm_cpu(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("cpu_isas() -> str[]", &cpu_isas);  // no tensor arguments: a catch-all kernel
}

TORCH_LIBRARY_IMPL(dbquant, CPU, m) {
  m.impl("dbgemm_cpu", &dbgemm_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
  m.impl("linear_int8_cpu", &linear_int8_cpu);
  m.impl("rms_norm_cpu", &rms_norm_cpu);
}

// No Python functions: `import dbquant._C` exists only to load this library.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbquant CPU kernels; registers the torch.ops.dbquant.* ops listed at the top on import";
}
