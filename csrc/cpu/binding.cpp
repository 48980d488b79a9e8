// Torch binding of the CPU lookup-table kernel: registers
//   torch.ops.dbquant.dbgemm_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? offset,
//                                Tensor? bias, int in_features, int group_size) -> Tensor
// The only file that includes <torch/extension.h> (slow to compile); the arithmetic lives
// in dbgemm_lut.cpp. Built as the extension module dbquant._C: importing it loads this
// library, whose static initialisers register the op.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "dbgemm_lut.h"

namespace {

// Cap on the lookup tables held at once (1 KiB per 8 input channels per activation row);
// larger M is processed in tiles of rows so memory stays bounded.
constexpr int64_t kMaxLutBytes = int64_t(16) << 20;

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "dbgemm_cpu: ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "dbgemm_cpu: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "dbgemm_cpu: ", name, " must be contiguous (got shape ",
              t.sizes(), ", strides ", t.strides(), "); call .contiguous()");
}

at::Tensor dbgemm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offset,
                      const std::optional<at::Tensor>& bias, int64_t in_features,
                      int64_t group_size) {
  check_input(x, "x", at::kFloat);
  check_input(qweight, "qweight", at::kByte);
  check_input(scales, "scales", at::kFloat);
  if (offset) check_input(*offset, "offset", at::kFloat);
  if (bias) check_input(*bias, "bias", at::kFloat);

  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0,
              "dbgemm_cpu: group_size must be a positive multiple of 8, got ", group_size);
  TORCH_CHECK(in_features >= 1, "dbgemm_cpu: in_features must be >= 1, got ", in_features);
  const int64_t K = in_features;
  const int64_t G = (K + group_size - 1) / group_size;
  const int64_t row_bytes = G * group_size / 8;  // Kp / 8

  TORCH_CHECK(x.dim() == 2, "dbgemm_cpu: x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) == K, "dbgemm_cpu: x has ", x.size(1),
              " channels (shape ", x.sizes(), ") but in_features=", K);
  TORCH_CHECK(qweight.dim() == 3 && qweight.size(0) == 2,
              "dbgemm_cpu: qweight must be [2, N, Kp/8], got shape ", qweight.sizes());
  const int64_t N = qweight.size(1);
  TORCH_CHECK(N >= 1, "dbgemm_cpu: qweight has N=0 output rows");
  TORCH_CHECK(qweight.size(2) == row_bytes, "dbgemm_cpu: qweight has ", qweight.size(2),
              " bytes per row but in_features=", K, ", group_size=", group_size, " needs ",
              row_bytes);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == N && scales.size(1) == G &&
                  scales.size(2) == 2,
              "dbgemm_cpu: scales must be [N, G, 2] = [", N, ", ", G, ", 2] for N=", N,
              ", in_features=", K, ", group_size=", group_size, "; got shape ", scales.sizes());
  if (offset) {
    TORCH_CHECK(offset->dim() == 2 && offset->size(0) == N && offset->size(1) == G,
                "dbgemm_cpu: offset must be [N, G] = [", N, ", ", G, "], got shape ",
                offset->sizes());
  }
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "dbgemm_cpu: bias must be [N] = [", N,
                "], got shape ", bias->sizes());
  }

  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;

  const int64_t kc = dbquant::cpu::num_chunks(K);
  const int64_t lf = dbquant::cpu::lut_floats(K);
  const int64_t m_tile = std::max<int64_t>(1, std::min<int64_t>(M, kMaxLutBytes / (lf * 4)));
  at::Tensor lut = at::empty({m_tile, lf}, x.options());
  at::Tensor gsum = offset ? at::empty({m_tile, G}, x.options()) : at::Tensor();

  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offset ? offset->data_ptr<float>() : nullptr;
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* lp = lut.data_ptr<float>();
  float* gp = offset ? gsum.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  for (int64_t m0 = 0; m0 < M; m0 += m_tile) {
    const int64_t mt = std::min(m_tile, M - m0);
    const float* xt = xp + m0 * K;
    // Tables: independent per (row, chunk); ~256 adds each (~0.1 us), so hand out 64+ at a
    // time: a parallel region costs microseconds.
    at::parallel_for(0, mt * kc, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e;) {
        const int64_t m = i / kc, c = i % kc;
        const int64_t ce = std::min(kc, c + (e - i));
        dbquant::cpu::build_luts(xt, K, lp, m, m + 1, c, ce);
        i += ce - c;
      }
    });
    if (offset) dbquant::cpu::group_sums(lp, K, group_size, gp, 0, mt);
    // Output rows: ~2 * mt * kc table loads per row; aim for >= ~16k loads per task.
    const int64_t grain = std::max<int64_t>(1, 16384 / (2 * mt * kc));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      dbquant::cpu::dbgemm_lut_rows(lp, gp, mt, qp, sp, op, bp, N, K, group_size, yp + m0 * N,
                                    n0, n1);
    });
  }
  return y;
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: a namespace may be opened by TORCH_LIBRARY only once
// per process, and the CUDA extension (dbquant._C_cuda) will add its ops to `dbquant` too.
TORCH_LIBRARY_FRAGMENT(dbquant, m) {
  m.def(
      "dbgemm_cpu(Tensor x, Tensor qweight, Tensor scales, Tensor? offset, Tensor? bias, "
      "int in_features, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(dbquant, CPU, m) { m.impl("dbgemm_cpu", &dbgemm_cpu); }

// No Python functions: `import dbquant._C` exists only to load this library.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbquant CPU kernels; registers torch.ops.dbquant.dbgemm_cpu on import";
}
