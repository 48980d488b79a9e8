// Torch binding of the CPU lookup-table kernel (any plane count k: planes [T, C8, k, 16]). Registers
//   torch.ops.dbquant.dbgemm_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset,
//                                Tensor? bias, int out_features, int in_features,
//                                int group_size, str isa="auto", str lut="auto") -> Tensor
//                                (lut: "float" tables (dbgemm_t16.h), "int8" or "int16" tables
//                                 (dbgemm_i8lut.h), or "auto": default_lut(isa) for M = 1, else float)
//   torch.ops.dbquant.dequantize_cpu(Tensor planes, Tensor scales, Tensor? offset,
//                                    int out_features, int in_features, int group_size)
//                                    -> Tensor (float32 [N, K])
//   torch.ops.dbquant.dequantize_t_cpu(Tensor planes, Tensor scales, Tensor? offset,
//                                    int out_features, int in_features, int group_size,
//                                    bool bf16=False, str isa="auto")
//                                    -> Tensor (the transpose, [K, N], float32 or bfloat16:
//                                       dequant_t16.h; for prefill GEMMs)
//   torch.ops.dbquant.gemm_a8_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset,
//                                Tensor? bias, int out_features, int in_features,
//                                int group_size, str isa="auto", bool int8_weights=False) -> Tensor
//                                    (prefill GEMM on 8-bit activations, exact bit planes or, with
//                                     int8_weights, 8-bit weight levels: gemm_a8.h)
//   torch.ops.dbquant.linear_int8_cpu(Tensor x, Tensor wq, Tensor s, str isa="auto") -> Tensor
//                                    (dense int8-weight projection, gemv_int8.h)
//   torch.ops.dbquant.linear_w8a8_cpu(Tensor x, Tensor wq, Tensor s, str isa="auto") -> Tensor
//                                    (the same with int8 activations per block of 32, gemv_int8.h)
//   torch.ops.dbquant.rms_norm_cpu(Tensor x, Tensor w, float eps) -> Tensor
//                                    (fused RMSNorm over the last dim, decode_ops.h)
//   torch.ops.dbquant.table_rows_cpu(Tensor codes, Tensor code_scales, Tensor ids, int dim,
//                                    float scale=1) -> Tensor
//                                    (rows of an 8-bit group-wise table, float32 [n, dim])
//   torch.ops.dbquant.argmax_cpu(Tensor x) -> Tensor (torch.argmax(x, -1) of float32 [B, V])
//   torch.ops.dbquant.attend_cpu(Tensor q, Tensor k, Tensor v, int n, float scale, float softcap=0,
//                                str isa="auto") -> Tensor
//                                    (one token's attention over a float cache: the decode step's
//                                     kernel on its own, for tests; decode_ops.h)
//   torch.ops.dbquant.gated_act_cpu(Tensor gu, str act="silu") -> Tensor
//                                    (a prompt chunk's act(gate) * up, float32 [M, 2I] -> [M, I])
//   torch.ops.dbquant.rope_heads_cpu(Tensor x, Tensor cos, Tensor sin) -> Tensor
//                                    (a prompt chunk's rotary embedding, [B, T, H, D] -> [B, H, T, D])
//   torch.ops.dbquant.attend_causal_cpu(Tensor q, Tensor k, Tensor v, int pos, float scale,
//                                       float softcap=0, int window=0, str isa="auto") -> Tensor
//                                    (a prompt chunk's causal attention over a float cache, the
//                                     same kernel per query: the prefill's; float32 [B, T, Hq, D])
//   torch.classes.dbquant.DecodeLayer(Tensor ln1, Tensor ln2, float eps, int n_heads, int n_kv,
//                                    int head_dim, int intermediate, float scale)
//                                    .set_proj(str name, Tensor planes, Tensor scales,
//                                              Tensor? offset, Tensor? bias, int group_size)
//                                    .set_extras(Tensor? q_norm, Tensor? k_norm, Tensor? post_attn,
//                                                Tensor? post_ffn, bool pre_norm, str act, int window,
//                                                float softcap, float residual_scale)
//                                    (one decoder layer's weights, built once per layer)
//   torch.ops.dbquant.decode_layer_cpu(Tensor(a!) x, DecodeLayer layer, Tensor cos, Tensor sin,
//                                    Tensor(b!) k_cache, Tensor(c!) v_cache, int pos) -> ()
//                                    (one whole decoder layer for one token, in place)
//   torch.classes.dbquant.KVPacked(Tensor[] codes, Tensor[] floats, int group, int n_anom)
//                                    (one layer's packed VidKV cache buffers, kv_attn.h)
//   torch.ops.dbquant.kv_attend_cpu(Tensor q, KVPacked kv, int n_groups, int n_tail, float scale,
//                                    str isa="auto") -> Tensor
//                                    (attention on the packed cache, kv_attn.h)
//   torch.ops.dbquant.kv_dequantize_cpu(KVPacked kv, int n_groups) -> Tensor[]
//                                    (the packed groups as float32 keys, values: prefill chunks)
//   torch.ops.dbquant.decode_layer_kv_cpu(Tensor(a!) x, DecodeLayer layer, Tensor cos, Tensor sin,
//                                    KVPacked kv, int n_groups, int n_tail) -> ()
//                                    (decode_layer_cpu with the packed cache)
//   torch.classes.dbquant.DecodeStack().add(DecodeLayer layer, Tensor cos, Tensor sin)
//                                    .set_kv(int i, KVPacked kv)
//                                    .set_final_norm(Tensor w, float eps)
//                                    (a decoder's layers with their RoPE tables [max_len, D]; with a
//                                     final norm, both step ops end with it)
//   torch.ops.dbquant.decode_step_cpu(Tensor(a!) x, DecodeStack stack, Tensor(b!) k_cache,
//                                    Tensor(c!) v_cache, int pos) -> ()
//                                    (every layer for one token, in place; caches
//                                    [n_layers, 1, Hk, max_len, D], float32 or float16)
//   torch.ops.dbquant.decode_step_kv_cpu(Tensor(a!) x, DecodeStack stack, int pos, int n_groups,
//                                    int n_tail) -> ()   (the same on the packed caches of set_kv)
//   torch.ops.dbquant.stream_read_cpu(Tensor buf, int threads, str isa="auto") -> int
//                                    (XOR checksum of a buffer read on `threads` threads: the
//                                    benchmark's read bandwidth, stream_read.h)
//   torch.ops.dbquant.cpu_isas() -> str[]       (supported ISA paths, fastest first)
//   torch.ops.dbquant.cpu_dword_rows() -> bool  (whether this CPU runs the dword-row integer-table
//                                    kernel: where the loaders repack planes in dword rows)
//   torch.ops.dbquant.cpu_avx512_has(str ext) -> bool  (whether the AVX-512 kernels may use the
//                                    extension "vbmi", "vnni", "bf16" or "bitalg": CPU and OS)
//   torch.ops.dbquant.cpu_hide_exts(str exts) -> str  (hide those extensions from the kernels,
//                                    process-wide, "" for none; returns the previous ones: tests)
//   torch.ops.dbquant.cpu_default_lut(str isa="auto") -> str  ("float", "int8" or "int16": what
//                                    lut="auto" picks for M = 1 on that path, DBQUANT_CPU_LUT included)
//   torch.ops.dbquant.cpu_force_lut(str kind) -> str  (force "float"/"int8"/"int16" or back to "auto",
//                                    process-wide; returns the previous setting)
//   torch.ops.dbquant.cpu_force_isa(str isa) -> str  (force the path "auto" runs, the decode step's
//                                    included, or back to "auto"; process-wide; returns the previous one)
//   torch.ops.dbquant.cpu_i8lut_lookup(str mode="query") -> str  ("vbmi" or "bw": the AVX-512
//                                    integer-table lookups in use before the call; mode on/off/auto sets them)
// The weight arguments are in the t16 kernel layout (dbgemm_t16.h, docs/FORMAT.md);
// dbquant/backends/cpu.py builds it from the canonical format. This is the only file that
// includes <torch/extension.h> (slow to compile); the arithmetic lives in the torch-free
// dbgemm_t16*.cpp files. Built as the extension module dbquant._C: importing it loads
// this library, whose static initialisers register the ops.

#include <torch/extension.h>
#include <torch/custom_class.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dbgemm_t16.h"
#include "dbgemm_i8lut.h"
#include "gemv_int8.h"
#include "decode_ops.h"
#include "kv_attn.h"
#include "stream_read.h"
#include "dequant_t16.h"
#include "gemm_a8.h"

namespace {

using dbquant::cpu::Isa;
using dbquant::cpu::LutKind;

// Cap on the lookup tables held at once (64 bytes per 4 input channels per activation
// row); larger M is processed in slices of rows so memory stays bounded.
constexpr int64_t kMaxLutBytes = int64_t(16) << 20;

// The first 32-byte boundary at or after p (scratch that aligned vector stores write).
inline uint8_t* align32(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 31) & ~uintptr_t(31));
}

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
  // k (the plane count) is read from the planes tensor: [T, C8, P, 16] (unit order) or [T, C8/4, P, 16, 4]
  // (dword rows, dbgemm_t16.h), P in 1..kMaxPlanes
  TORCH_CHECK((planes.dim() == 4 || planes.dim() == 5) && planes.size(2) >= 1 &&
                  planes.size(2) <= dbquant::cpu::kMaxPlanes,
              op, ": planes must be uint8 [T, C8, P, 16] or [T, C8/4, P, 16, 4] (dword rows) with P (bit planes) in 1..",
              dbquant::cpu::kMaxPlanes, ", got shape ", planes.sizes());
  w.P = planes.size(2);
  const int64_t T = w.tiles(), G = w.groups(), C8 = w.kp() / 8, tile = dbquant::cpu::kTile;
  if (planes.dim() == 5) {
    TORCH_CHECK(group_size % dbquant::cpu::kDwordGroup == 0, op, ": planes in dword rows need group_size a ",
                "multiple of ", dbquant::cpu::kDwordGroup, " (whole 4-byte blocks per group), got ", group_size);
    w.cols = 4;
    check_shape(planes, "planes", {T, C8 / 4, w.P, tile, 4});
  } else {
    check_shape(planes, "planes", {T, C8, w.P, tile});
  }
  check_shape(scales, "scales", {T, G, w.P, tile});
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
                  dbquant::cpu::isa_name(dbquant::cpu::fastest_isa()), " and below)");
      return i;
    }
  }
  TORCH_CHECK(false, "dbgemm_cpu: unknown isa '", isa, "'; use auto, avx512, avx2 or scalar");
}

// Dense float32 [N, K] weight from the t16 layout (for long prefills: one BLAS GEMM).
at::Tensor dequantize_t16(const dbquant::cpu::T16Weight& w, const at::TensorOptions& opts) {
  at::Tensor out = at::empty({w.N, w.K}, opts.dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.tiles(), std::max<int64_t>(1, (int64_t(1) << 14) / (dbquant::cpu::kTile * w.kp())),
                   [&](int64_t t0, int64_t t1) { dbquant::cpu::dequantize_tiles(w, op, t0, t1); });
  return out;
}

// Whether row r of x float32 [M, K] holds a NaN or an Inf (x * 0 is NaN exactly then; the
// sum vectorises, ~K / 16 cycles: nothing next to building the row's tables).
bool row_nonfinite(const float* xr, int64_t K) {
  float probe = 0.0f;
#pragma omp simd reduction(+ : probe)
  for (int64_t i = 0; i < K; ++i) probe += xr[i] * 0.0f;
  return probe != 0.0f;
}

// The lookup tables tabulate partial sums of activations, so a NaN or Inf activation never
// meets a weight of 0 (where x @ W.T gives NaN * 0 = NaN): such rows would come out finite.
// Rows with a non-finite input are recomputed densely (W dequantized, one BLAS GEMV), which
// propagates NaN/Inf exactly as the reference does. Finite inputs pay only the scan.
void recompute_nonfinite_rows(const at::Tensor& x, const dbquant::cpu::T16Weight& w, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1);
  const float* xp = x.data_ptr<float>();
  at::Tensor dense;
  for (int64_t m = 0; m < M; ++m) {
    if (!row_nonfinite(xp + m * K, K)) continue;
    if (!dense.defined()) dense = dequantize_t16(w, x.options());
    at::Tensor row = at::mv(dense, x[m]);
    if (w.bias) row.add_(at::from_blob(const_cast<float*>(w.bias), {w.N}, x.options()));
    y[m].copy_(row);
  }
}

// Thread i's share of T tiles as chunks [lo, hi) of `chunk` tiles, packed in one atomic word (lo in the
// low 32 bits, hi in the high ones): the owner takes chunks from the front, a thread that has finished
// its own share takes them from the back (one compare-and-swap per chunk either way), so each thread
// streams its contiguous share forwards (its prefetch pattern) and only the tail moves to the faster
// core. Every tile is computed by exactly one thread whichever took it: the results do not depend on it.
struct TileShares {
  static constexpr int kMax = 64;  // threads
  struct alignas(64) Range {  // a cache line each: an owner's takes do not touch the others' lines
    std::atomic<uint64_t> v;
  };
  Range range[kMax];
  int n;
  TileShares(int64_t chunks, int threads) : n(std::min(threads, kMax)) {
    for (int i = 0; i < n; ++i)
      range[i].v.store(uint64_t(chunks * i / n) | uint64_t(chunks * (i + 1) / n) << 32, std::memory_order_relaxed);
  }
  // The next chunk of share i from the front (own) or the back (stolen); -1 when the share is empty.
  int64_t take(int i, bool front) {
    uint64_t r = range[i].v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = r & 0xffffffffu, hi = r >> 32;
      if (lo >= hi) return -1;
      const uint64_t next = front ? (lo + 1) | hi << 32 : lo | (hi - 1) << 32;
      if (range[i].v.compare_exchange_weak(r, next, std::memory_order_relaxed)) return int64_t(front ? lo : hi - 1);
    }
  }
};

// One parallel region of nth threads over `chunks` chunks of tiles: each thread first runs
// prologue(i, n) (its share of some preparation every tile needs, e.g. tables or activation codes),
// then, after one barrier, chunk(c) for its own share of the chunks (TileShares) and then what is left
// of the others' shares from their ends. With fixed halves the two cores of a shared 2-core VM finished
// ~20% of a region apart (docs/RESULTS.md); one region instead of two also saves a fork and a join.
template <class Prologue, class Chunk>
void shared_tile_region(int nth, int64_t chunks, Prologue&& prologue, Chunk&& chunk) {
  TileShares shares(chunks, nth);  // at most TileShares::kMax threads
#pragma omp parallel num_threads(shares.n)
  {
    const int n = omp_get_num_threads(), i = omp_get_thread_num();
    prologue(i, n);
#pragma omp barrier
    // own share first, then the others' from their ends (all shares.n of them: the runtime may have
    // started fewer threads than asked for)
    for (int k = 0; k < shares.n; ++k) {
      const int s = (i + k) % shares.n;
      for (int64_t c; (c = shares.take(s, k == 0)) >= 0;) chunk(c);
    }
  }
}

// y[N] = W x[K] for one activation row through the integer-table kernel (dbgemm_i8lut.h), tables in
// buf (i8lut_row_bytes(w, kind) bytes): each thread builds the tables of its share of the groups,
// then the tiles are shared (shared_tile_region). Built by one thread before the region, the tables
// were ~8% of a 2-thread decode step on an AMD Zen 3 with the other core waiting.
void gemv_i8(Isa isa, const dbquant::cpu::T16Weight& w, const float* x, uint8_t* buf, float* y, LutKind kind) {
  const int64_t G = w.groups(), T = w.tiles();
  // tiles per thread at least (as the float path's grain): below it one thread does everything
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / (4 * (w.kp() / 8) * w.P));
  const int nth = at::in_parallel_region() ? 1 : int(std::min<int64_t>(at::get_num_threads(), (T + grain - 1) / grain));
  if (nth <= 1) {
    dbquant::cpu::build_i8luts(isa, w, x, buf, 0, 1, kind, 0, G);
    dbquant::cpu::gemm_tiles_i8(isa, w, buf, 1, y, 0, T, kind);
    return;
  }
  const int64_t chunk = std::max<int64_t>(1, T / (8 * int64_t(nth))), chunks = (T + chunk - 1) / chunk;
  shared_tile_region(
      nth, chunks,
      [&](int i, int n) { dbquant::cpu::build_i8luts(isa, w, x, buf, 0, 1, kind, G * i / n, G * (i + 1) / n); },
      [&](int64_t c) { dbquant::cpu::gemm_tiles_i8(isa, w, buf, 1, y, c * chunk, std::min(T, (c + 1) * chunk), kind); });
}

// y = x @ W^T (+ bias) through the integer-table kernel (dbgemm_i8lut.h): tables of at most
// kMaxLutBytes at a time, tiles split over threads as in the float path.
void dbgemm_i8(const at::Tensor& x, const dbquant::cpu::T16Weight& w, Isa isa, LutKind kind, at::Tensor& y) {
  const int64_t M = x.size(0), rb = dbquant::cpu::i8lut_row_bytes(w, kind), C8 = w.kp() / 8;
  const int64_t m_slice = std::max<int64_t>(1, std::min<int64_t>(M, kMaxLutBytes / rb));
  at::Tensor buf = at::empty({m_slice * rb}, x.options().dtype(at::kByte));
  uint8_t* bp = buf.data_ptr<uint8_t>();
  if (M == 1) return gemv_i8(isa, w, x.data_ptr<float>(), bp, y.data_ptr<float>(), kind);
  for (int64_t m0 = 0; m0 < M; m0 += m_slice) {
    const int64_t mt = std::min(m_slice, M - m0);
    const float* xt = x.data_ptr<float>() + m0 * w.K;
    at::parallel_for(0, mt, std::max<int64_t>(1, (int64_t(1) << 16) / w.kp()),
                     [&](int64_t b, int64_t e) { dbquant::cpu::build_i8luts(isa, w, xt, bp, b, e, kind, 0, w.groups()); });
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / (4 * mt * C8 * w.P));
    float* yt = y.data_ptr<float>() + m0 * w.N;
    at::parallel_for(0, w.tiles(), grain, [&](int64_t t0, int64_t t1) {
      dbquant::cpu::gemm_tiles_i8(isa, w, bp, mt, yt, t0, t1, kind);
    });
  }
}

at::Tensor dbgemm_cpu(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                      const std::optional<at::Tensor>& offset,
                      const std::optional<at::Tensor>& bias, int64_t out_features,
                      int64_t in_features, int64_t group_size, const std::string& isa_arg,
                      const std::string& lut_arg) {
  check_input(x, "x", at::kFloat);
  if (bias) check_input(*bias, "bias", at::kFloat);
  dbquant::cpu::T16Weight w =
      t16_weight("dbgemm_cpu", planes, scales, offset, out_features, in_features, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "dbgemm_cpu: x must be [M, ",
              in_features, "] (in_features), got shape ", x.sizes());
  if (bias) check_shape(*bias, "bias", {out_features});
  const Isa isa = parse_isa(isa_arg);
  LutKind kind = LutKind::Float;
  TORCH_CHECK(lut_arg == "auto" || dbquant::cpu::parse_lut(lut_arg.c_str(), kind), "dbgemm_cpu: unknown lut '",
              lut_arg, "'; use auto, float, int8 or int16");
  w.bias = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t T = w.tiles(), G = w.groups(), C8 = w.kp() / 8;

  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;
  // auto: the integer tables only for the decode GEMV (M = 1), where they were measured
  if (lut_arg == "auto" && M == 1) kind = dbquant::cpu::default_lut(isa);
  if (kind != LutKind::Float) {
    dbgemm_i8(x, w, isa, kind, y);
    recompute_nonfinite_rows(x, w, y);
    return y;
  }

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
    // Tiles: one unit is a byte of a row per activation row (~1-4 ns); hand out at least
    // ~8k of them per task (a parallel region costs a few microseconds): a decode GEMV of
    // SmolLM2's shapes then splits over 2 threads.
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / (4 * mt * C8));
    float* yt = y.data_ptr<float>() + m0 * out_features;
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      dbquant::cpu::gemm_tiles(isa, w, lp, gp, mt, yt, t0, t1);
    });
  }
  recompute_nonfinite_rows(x, w, y);
  return y;
}

// The op form of dequantize_t16, from the layout's tensors.
at::Tensor dequantize_cpu(const at::Tensor& planes, const at::Tensor& scales,
                          const std::optional<at::Tensor>& offset, int64_t out_features,
                          int64_t in_features, int64_t group_size) {
  const dbquant::cpu::T16Weight w =
      t16_weight("dequantize_cpu", planes, scales, offset, out_features, in_features, group_size);
  return dequantize_t16(w, planes.options());
}

// The transposed dense weight Wt [K, N], float32 or bfloat16 (dequant_t16.h): what a prefill
// GEMM y = x @ Wt reads. Columns of one tile are written by one thread.
at::Tensor dequantize_t_cpu(const at::Tensor& planes, const at::Tensor& scales,
                            const std::optional<at::Tensor>& offset, int64_t out_features,
                            int64_t in_features, int64_t group_size, bool bf16, const std::string& isa_arg) {
  const dbquant::cpu::T16Weight w =
      t16_weight("dequantize_t_cpu", planes, scales, offset, out_features, in_features, group_size);
  const Isa isa = parse_isa(isa_arg);
  at::Tensor out = at::empty({w.K, w.N}, planes.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  void* op = out.data_ptr();
  // ~16k weights a chunk, as dequantize_t16: enough work to amortise a task, many tasks a weight
  at::parallel_for(0, w.tiles(), std::max<int64_t>(1, (int64_t(1) << 14) / (dbquant::cpu::kTile * w.kp())),
                   [&](int64_t t0, int64_t t1) { dbquant::cpu::dequantize_t(isa, w, op, bf16, t0, t1); });
  return out;
}

// y = x @ W^T (+ bias) with the activations rounded to 8 bits per row and group (gemm_a8.h), and with
// int8_weights the weight to its 8-bit levels: the codes once (rows split over threads), then the tiles shared by the threads (shared_tile_region),
// each thread with its own panel.
at::Tensor gemm_a8_cpu(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                       int64_t out_features, int64_t in_features, int64_t group_size, const std::string& isa_arg,
                       bool int8_weights) {
  check_input(x, "x", at::kFloat);
  if (bias) check_input(*bias, "bias", at::kFloat);
  dbquant::cpu::T16Weight w =
      t16_weight("gemm_a8_cpu", planes, scales, offset, out_features, in_features, group_size);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "gemm_a8_cpu: x must be [M, ", in_features,
              "] (in_features), got shape ", x.sizes());
  TORCH_CHECK(group_size <= dbquant::cpu::kA8MaxGroup, "gemm_a8_cpu: group_size must be <= ",
              dbquant::cpu::kA8MaxGroup, " (a group's int16 sums), got ", group_size);
  if (bias) check_shape(*bias, "bias", {out_features});
  const Isa isa = parse_isa(isa_arg);
  w.bias = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t M = x.size(0), G = w.groups();
  at::Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;
  at::Tensor xu = at::empty({M, w.kp()}, x.options().dtype(at::kByte));
  at::Tensor sx = at::empty({M, G}, x.options()), xs = at::empty({M, G}, x.options());
  at::Tensor xz = at::empty({M, G}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  uint8_t* up = xu.data_ptr<uint8_t>();
  float *sp = sx.data_ptr<float>(), *ssp = xs.data_ptr<float>();
  int32_t* zp = xz.data_ptr<int32_t>();
  const int64_t T = w.tiles(), scratch = (dbquant::cpu::a8_scratch_bytes(w) + 63) / 64 * 64;
  float* yp = y.data_ptr<float>();
  auto tiles = [&](uint8_t* buf, int64_t t0, int64_t t1) {
    dbquant::cpu::gemm_a8_tiles(isa, w, up, zp, sp, ssp, M, yp, buf, t0, t1, int8_weights);
  };
  // a tile is M * Kp * P * 16 multiply-adds: one per chunk already amortises taking it
  const int nth = at::in_parallel_region() ? 1 : int(std::min<int64_t>(at::get_num_threads(), T));
  if (nth <= 1) {
    dbquant::cpu::quantize_a8(isa, w, xp, up, zp, sp, ssp, 0, M);
    std::vector<uint8_t> buf(size_t(scratch + 32));
    tiles(align32(buf.data()), 0, T);
    return y;
  }
  // the rows' codes split over the threads, then the tiles shared (each thread with its own panel)
  std::vector<uint8_t> bufs(size_t((scratch + 32) * nth));
  shared_tile_region(
      nth, T, [&](int i, int n) { dbquant::cpu::quantize_a8(isa, w, xp, up, zp, sp, ssp, M * i / n, M * (i + 1) / n); },
      [&](int64_t t) { tiles(align32(bufs.data() + (scratch + 32) * omp_get_thread_num()), t, t + 1); });
  return y;
}

// y = x @ (s * wq)^T for a dense int8-weight projection (gemv_int8.h).
at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& s,
                           const std::string& isa_arg) {
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
  const Isa isa = parse_isa(isa_arg);
  at::parallel_for(0, N / 4, std::max<int64_t>(1, (int64_t(1) << 14) / (M * K)), [&](int64_t b, int64_t e) {
    const int64_t n0 = 4 * b, n1 = e == N / 4 ? N : 4 * e;  // the last task takes the N % 4 rows
    switch (isa) {
      case Isa::Avx512: return dbquant::cpu::gemv_int8_rows_avx512(xp, wp, sp, M, N, K, yp, n0, n1);
      case Isa::Avx2: return dbquant::cpu::gemv_int8_rows_avx2(xp, wp, sp, M, N, K, yp, n0, n1);
      default: return dbquant::cpu::gemv_int8_rows_scalar(xp, wp, sp, M, N, K, yp, n0, n1);
    }
  });
  if (N < 4) dbquant::cpu::gemv_int8_rows_scalar(xp, wp, sp, M, N, K, yp, 0, N);
  return y;
}

// y = x @ (s * wq)^T with x quantized per block of 32 channels to int8 first (W8A8,
// gemv_int8.h): integer dot products, ~2x faster than linear_int8_cpu.
at::Tensor linear_w8a8_cpu(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& s,
                           const std::string& isa_arg) {
  TORCH_CHECK(x.device().is_cpu() && wq.device().is_cpu() && s.device().is_cpu(),
              "linear_w8a8_cpu: all tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "linear_w8a8_cpu: x must be a contiguous float32 [M, K] tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(wq.scalar_type() == at::kChar && wq.is_contiguous() && wq.dim() == 2 && wq.size(1) == x.size(1),
              "linear_w8a8_cpu: wq must be a contiguous int8 [N, ", x.size(1), "] tensor, got ",
              wq.scalar_type(), " ", wq.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 1 && s.size(0) == wq.size(0),
              "linear_w8a8_cpu: s must be a contiguous float32 [", wq.size(0), "]");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(0);
  TORCH_CHECK(K % dbquant::cpu::kQ8Block == 0, "linear_w8a8_cpu: K=", K, " must be a multiple of ",
              dbquant::cpu::kQ8Block, " (activations are quantized per block); use linear_int8_cpu");
  const Isa isa = parse_isa(isa_arg);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({M, K / dbquant::cpu::kQ8Block}, x.options());
  dbquant::cpu::quantize_act_q8(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xs.data_ptr<float>());
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* xsp = xs.data_ptr<float>();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 14) / (M * K)), [&](int64_t b, int64_t e) {
    if (isa == Isa::Scalar) dbquant::cpu::gemv_w8a8_rows_scalar(xqp, xsp, wp, sp, M, N, K, yp, b, e);
    else dbquant::cpu::gemv_w8a8_rows_avx2(xqp, xsp, wp, sp, M, N, K, yp, b, e);  // AVX-512 CPUs have AVX2
  });
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
  const Isa isa = dbquant::cpu::best_isa();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    dbquant::cpu::rms_norm_rows(isa, xp, w.data_ptr<float>(), float(eps), D, yp, b, e);
  });
  return y;
}

// A prompt chunk's gated activation (the prefill's MLP between gate_up and down): gu float32 [M, 2I], each
// row a gate and an up half side by side -> float32 [M, I] = act(gate) * up, act "silu" or "gelu_tanh"; the
// decode step's row loop (decode_ops.h silu_mul / gelu_tanh_mul) over rows in parallel.
at::Tensor gated_act_cpu(const at::Tensor& gu, const std::string& act) {
  TORCH_CHECK(gu.device().is_cpu() && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.dim() == 2 &&
                  gu.size(1) % 2 == 0,
              "gated_act_cpu: gu must be a contiguous float32 CPU tensor [M, 2I], got ", gu.scalar_type(), " ",
              gu.sizes());
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "gated_act_cpu: act must be silu or gelu_tanh, got '", act, "'");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  at::Tensor y = at::empty({M, I}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Isa isa = dbquant::cpu::best_isa();
  const bool silu = act == "silu";
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      if (silu) dbquant::cpu::silu_mul(isa, gp + m * 2 * I, I, yp + m * I);
      else dbquant::cpu::gelu_tanh_mul(isa, gp + m * 2 * I, I, yp + m * I);
    }
  });
  return y;
}

// A prompt chunk's rotary embedding (the prefill's): x float32 [B, T, H, D] (any strides but a contiguous last
// dim: the decoder passes the q and k heads of its qkv rows as they lie), cos, sin float32 [T, D] (the tables'
// rows at the chunk's positions) -> float32 [B, H, T, D], each row rotated as the decode step rotates it
// (decode_ops.h rope_rows: the rotate-half convention) and laid out as attention reads it.
at::Tensor rope_heads_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1 &&
                  x.size(3) % 2 == 0,
              "rope_heads_cpu: x must be a float32 CPU tensor [B, T, H, D] with a contiguous last dim of even "
              "size, got ", x.scalar_type(), " ", x.sizes(), " strides ", x.strides());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  check_input(cos, "cos", at::kFloat);
  check_input(sin, "sin", at::kFloat);
  check_shape(cos, "cos", {T, D});
  check_shape(sin, "sin", {T, D});
  at::Tensor y = at::empty({B, H, T, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1), sh = x.stride(2);
  const Isa isa = dbquant::cpu::best_isa();
  at::parallel_for(0, B * H * T, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {  // row i of y: (b, h, t)
      const int64_t t = i % T, h = i / T % H, b = i / (T * H);
      float* row = yp + i * D;
      std::copy(xp + b * sb + t * st + h * sh, xp + b * sb + t * st + h * sh + D, row);
      dbquant::cpu::rope_rows(isa, row, cp + t * D, snp + t * D, 1, D);
    }
  });
  return y;
}

// y[N] = W x[K] for one activation row through the t16 kernel (W's bias included), with
// caller-provided table scratch (lut: lut_scratch_floats(w) floats; gsum: groups() floats), the
// float or the integer tables as default_lut(isa) says (dbgemm_i8lut.h).
void gemv_t16(Isa isa, const dbquant::cpu::T16Weight& w, const float* x, float* y, float* lut,
              float* gsum) {
  const LutKind kind = dbquant::cpu::default_lut(isa);
  if (kind != LutKind::Float) return gemv_i8(isa, w, x, reinterpret_cast<uint8_t*>(lut), y, kind);
  dbquant::cpu::build_luts(isa, w, x, lut, w.offset ? gsum : nullptr, 0, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / (4 * (w.kp() / 8)));
  at::parallel_for(0, w.tiles(), grain, [&](int64_t t0, int64_t t1) {
    dbquant::cpu::gemm_tiles(isa, w, lut, w.offset ? gsum : nullptr, 1, y, t0, t1);
  });
}

// Floats of table scratch gemv_t16 needs for w: the float tables or the integer ones.
int64_t lut_scratch_floats(const dbquant::cpu::T16Weight& w) {
  return std::max(dbquant::cpu::lut_floats(w), (dbquant::cpu::i8lut_row_bytes(w, LutKind::Int16) + 3) / 4);
}

// One Llama-family decoder layer's weights for decode_layer_cpu, built once per layer
// (torch.classes.dbquant.DecodeLayer, dbquant/backends/cpu.py: prepare_decode_layer) so that
// each token's call passes one object instead of ~16 tensors, and the weights' dtypes and
// shapes are checked once here rather than per token. Holds references to its tensors.
//   ln1, ln2: float32 [H] (RMSNorm weights, shared eps); Hq query heads, Hk kv heads of D
//   channels; I: MLP width; scale: attention scale (usually D^-0.5).
//   Projections (set_proj, t16 layout of dbgemm_t16.h, each with its own group_size and plane
//   count, bias float32 [N] or None), N x K: "qkv" (Hq + 2 Hk) D x H, "o" H x Hq D, "gate_up" 2 I x H, "down" H x I.
//   Family switches (set_extras; the defaults are Llama's), every norm an RMSNorm with eps:
//   q_norm / k_norm float32 [D] (per head: Qwen3, Gemma-3) or [Hq D] / [Hk D] (the whole
//   projection: OLMo-2), before RoPE; post_attn / post_ffn float32 [H] on the attention / MLP
//   output before the residual add (Gemma-2/3 sandwich, OLMo-2); pre_norm false skips ln1, ln2
//   (OLMo-2); act "silu" or "gelu_tanh"; window > 0 attends to the last `window` positions only;
//   softcap > 0 caps the attention logits; residual_scale multiplies both branch outputs (Granite).
//   Gemma's (1 + w) norms arrive with the 1 already added (exact in float32).
struct DecodeLayer : torch::CustomClassHolder {
  static constexpr const char* kNames[4] = {"qkv", "o", "gate_up", "down"};

  DecodeLayer(at::Tensor ln1, at::Tensor ln2, double eps, int64_t n_heads, int64_t n_kv, int64_t head_dim,
              int64_t intermediate, double scale)
      : ln1(std::move(ln1)), ln2(std::move(ln2)), eps(eps), Hq(n_heads), Hk(n_kv), D(head_dim),
        I(intermediate), scale(scale) {
    check_input(this->ln1, "ln1", at::kFloat);
    check_input(this->ln2, "ln2", at::kFloat);
    TORCH_CHECK(this->ln1.dim() == 1 && this->ln2.sizes() == this->ln1.sizes(),
                "DecodeLayer: ln1 and ln2 must be float32 [hidden] alike, got ", this->ln1.sizes(), " and ",
                this->ln2.sizes());
    H = this->ln1.size(0);
    TORCH_CHECK(H >= 1 && Hk >= 1 && Hq >= Hk && Hq % Hk == 0 && D >= 2 && D % 2 == 0 && I >= 1,
                "DecodeLayer: inconsistent sizes (hidden ", H, ", n_heads ", Hq, ", n_kv ", Hk, ", head_dim ", D,
                ", intermediate ", I, "): need n_heads a multiple of n_kv, an even head_dim, all >= 1");
  }

  // out_features, in_features of projection i (kNames order).
  std::pair<int64_t, int64_t> shape_of(int i) const {
    const int64_t n[4] = {(Hq + 2 * Hk) * D, H, 2 * I, H}, k[4] = {H, Hq * D, H, I};
    return {n[i], k[i]};
  }

  void set_proj(const std::string& name, at::Tensor planes, at::Tensor scales, std::optional<at::Tensor> offset,
                std::optional<at::Tensor> bias, int64_t group_size) {
    const int i = int(std::find_if(kNames, kNames + 4, [&](const char* s) { return name == s; }) - kNames);
    TORCH_CHECK(i < 4, "DecodeLayer.set_proj: unknown projection '", name, "'; use qkv, o, gate_up or down");
    const auto [N, K] = shape_of(i);
    dbquant::cpu::T16Weight w = t16_weight("DecodeLayer.set_proj", planes, scales, offset, N, K, group_size);
    if (bias) {
      check_input(*bias, "bias", at::kFloat);
      check_shape(*bias, "bias", {N});
    }
    w.bias = bias ? bias->data_ptr<float>() : nullptr;
    weights[i] = w;
    held[i] = {planes, scales, offset.value_or(at::Tensor()), bias.value_or(at::Tensor())};
    set[i] = true;
  }

  void set_extras(std::optional<at::Tensor> q_norm, std::optional<at::Tensor> k_norm,
                  std::optional<at::Tensor> post_attn, std::optional<at::Tensor> post_ffn, bool pre_norm,
                  const std::string& act, int64_t window, double softcap, double residual_scale) {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "DecodeLayer.set_extras: q_norm and k_norm come together");
    if (q_norm) {
      check_input(*q_norm, "q_norm", at::kFloat);
      check_input(*k_norm, "k_norm", at::kFloat);
      const bool per_head = q_norm->dim() == 1 && q_norm->size(0) == D && k_norm->sizes() == q_norm->sizes();
      const bool whole = q_norm->dim() == 1 && q_norm->size(0) == Hq * D && k_norm->dim() == 1 &&
                         k_norm->size(0) == Hk * D;
      TORCH_CHECK(per_head || whole, "DecodeLayer.set_extras: q_norm, k_norm must be [", D, "] (per head) or [",
                  Hq * D, "], [", Hk * D, "] (whole projection), got ", q_norm->sizes(), " and ", k_norm->sizes());
      qk_whole = !per_head;
    }
    for (const auto* t : {&post_attn, &post_ffn})
      if (*t) {
        check_input(**t, "post norm", at::kFloat);
        check_shape(**t, "post norm", {H});
      }
    TORCH_CHECK(act == "silu" || act == "gelu_tanh", "DecodeLayer.set_extras: act must be silu or gelu_tanh, got '",
                act, "'");
    TORCH_CHECK(window >= 0 && softcap >= 0, "DecodeLayer.set_extras: window ", window, " and softcap ", softcap,
                " must be >= 0 (0: none)");
    this->q_norm = q_norm.value_or(at::Tensor());
    this->k_norm = k_norm.value_or(at::Tensor());
    this->post_attn = post_attn.value_or(at::Tensor());
    this->post_ffn = post_ffn.value_or(at::Tensor());
    this->pre_norm = pre_norm;
    gelu = act == "gelu_tanh";
    this->window = window;
    this->softcap = softcap;
    this->residual_scale = residual_scale;
  }

  void check_complete() const {
    for (int i = 0; i < 4; ++i)
      TORCH_CHECK(set[i], "decode_layer_cpu: the layer's '", kNames[i], "' projection was never set (set_proj)");
  }

  at::Tensor ln1, ln2;
  double eps;
  int64_t H = 0, Hq, Hk, D, I;
  double scale;
  dbquant::cpu::T16Weight weights[4] = {};
  std::vector<at::Tensor> held[4];  // keeps the tensors behind weights[i] alive
  bool set[4] = {false, false, false, false};
  // set_extras (undefined tensors: no such norm)
  at::Tensor q_norm, k_norm, post_attn, post_ffn;
  bool qk_whole = false, pre_norm = true, gelu = false;
  int64_t window = 0;
  double softcap = 0.0, residual_scale = 1.0;
};

// One Llama-family decoder layer for one token (batch 1), in place on xp float32 [H]:
//   x += o(attn(rope(q), rope(k), v)) with q, k, v = qkv(rms(x, ln1)); then
//   x += down(silu(gate) * up) with gate, up = gate_up(rms(x, ln2)),
//   with the family switches of set_extras (DecodeLayer above). cos, sin: float32 [D] at the
// token's position. attend(q, k, v, att): stores the token's k, v (float32 [Hk, D] each) in the
// layer's cache and writes the attention of q (float32 [Hq, D]) into att (float32 [Hq, D]); the
// one part that differs between the float32 cache and the packed VidKV cache.
// Every piece computes what decode_layer_ref (dbquant/backends/reference.py) computes, up to
// float rounding order; the gain is one call instead of ~20 framework ops.
// layer_step's scratch: the tables (lf floats) and group sums (G) of the layer's largest GEMV, then
// h [H], qkv [N_qkv], att [Hq D], gate_up [2 I], act [I], tmp [H].
struct StepScratch {
  int64_t lf, G, total;
  explicit StepScratch(const DecodeLayer& ly) {
    const auto& w = ly.weights;
    lf = std::max({lut_scratch_floats(w[0]), lut_scratch_floats(w[1]), lut_scratch_floats(w[2]),
                   lut_scratch_floats(w[3])});
    G = std::max({w[0].groups(), w[1].groups(), w[2].groups(), w[3].groups()});
    total = lf + G + ly.H + w[0].N + ly.Hq * ly.D + 3 * ly.I + ly.H;
  }
};

// scratch: StepScratch(ly).total floats, owned by the caller (one allocation serves a whole step).
template <typename Attend>
void layer_step(const DecodeLayer& ly, float* xp, const float* cos, const float* sin, float* scratch, Attend&& attend) {
  const int64_t H = ly.H, Hq = ly.Hq, Hk = ly.Hk, D = ly.D, I = ly.I;
  const dbquant::cpu::T16Weight &wqkv = ly.weights[0], &wo = ly.weights[1], &wgu = ly.weights[2], &wd = ly.weights[3];
  const Isa isa = dbquant::cpu::best_isa();
  const StepScratch sz(ly);
  float* lut = scratch;
  float* gsum = lut + sz.lf;
  float* h = gsum + sz.G;
  float* qkv = h + H;
  float* att = qkv + wqkv.N;
  float* gu = att + Hq * D;
  float* act = gu + 2 * I;
  float* tmp = act + I;
  const float eps = float(ly.eps), rs = float(ly.residual_scale);
  // attention half
  if (ly.pre_norm) dbquant::cpu::rms_norm_rows(isa, xp, ly.ln1.data_ptr<float>(), eps, H, h, 0, 1);
  else std::copy(xp, xp + H, h);
  gemv_t16(isa, wqkv, h, qkv, lut, gsum);
  float* q = qkv;
  float* k = qkv + Hq * D;
  float* v = k + Hk * D;
  if (ly.q_norm.defined()) {  // in place: per head rows of D, or the whole projection as one row
    const int64_t qd = ly.qk_whole ? Hq * D : D, kd = ly.qk_whole ? Hk * D : D;
    dbquant::cpu::rms_norm_rows(isa, q, ly.q_norm.data_ptr<float>(), eps, qd, q, 0, Hq * D / qd);
    dbquant::cpu::rms_norm_rows(isa, k, ly.k_norm.data_ptr<float>(), eps, kd, k, 0, Hk * D / kd);
  }
  dbquant::cpu::rope_rows(isa, q, cos, sin, Hq, D);
  dbquant::cpu::rope_rows(isa, k, cos, sin, Hk, D);
  attend(q, k, v, att, isa);
  gemv_t16(isa, wo, att, tmp, lut, gsum);
  if (ly.post_attn.defined()) dbquant::cpu::rms_norm_rows(isa, tmp, ly.post_attn.data_ptr<float>(), eps, H, tmp, 0, 1);
  dbquant::cpu::add_scaled(isa, xp, tmp, rs, H);
  // MLP half
  if (ly.pre_norm) dbquant::cpu::rms_norm_rows(isa, xp, ly.ln2.data_ptr<float>(), eps, H, h, 0, 1);
  else std::copy(xp, xp + H, h);
  gemv_t16(isa, wgu, h, gu, lut, gsum);
  if (ly.gelu) dbquant::cpu::gelu_tanh_mul(isa, gu, I, act);
  else dbquant::cpu::silu_mul(isa, gu, I, act);
  gemv_t16(isa, wd, act, tmp, lut, gsum);
  if (ly.post_ffn.defined()) dbquant::cpu::rms_norm_rows(isa, tmp, ly.post_ffn.data_ptr<float>(), eps, H, tmp, 0, 1);
  dbquant::cpu::add_scaled(isa, xp, tmp, rs, H);
}

// A float cache's rows: float32, or float16 (its bits; the decoder's default, half the bytes to read
// a step). A token's k or v is stored as computed (float16: rounded to nearest even, as torch's own
// conversion rounds it, so the Python prefill and this step write the same bits).
inline void store_row(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]).x;
}

// The float cache's attention of layer_step: the token's k, v go to row `pos` of kc, vc
// ([Hk, L, D], T: float or float16 bits), then q attends to rows first..pos (a sliding window starts late).
// scores: at least Hq * (pos + 1) floats of scratch.
template <typename T>
void attend_float_cache(Isa isa, const DecodeLayer& ly, T* kc, T* vc, int64_t L, int64_t pos,
                        const float* q, const float* k, const float* v, float* att, float* scores) {
  const int64_t Hq = ly.Hq, Hk = ly.Hk, D = ly.D;
  for (int64_t j = 0; j < Hk; ++j) {
    store_row(kc + (j * L + pos) * D, k + j * D, D);
    store_row(vc + (j * L + pos) * D, v + j * D, D);
  }
  const int64_t first = ly.window > 0 ? std::max<int64_t>(0, pos - ly.window + 1) : 0;
  const int64_t seen = pos + 1 - first;
  at::parallel_for(0, Hq, std::max<int64_t>(1, (int64_t(1) << 14) / (seen * D)), [&](int64_t h0, int64_t h1) {
    dbquant::cpu::attend_one_token(isa, q, kc + first * D, vc + first * D, Hq, Hk, L, D, seen, float(ly.scale),
                                   float(ly.softcap), scores, att, h0, h1);
  });
}

// The caches of decode_layer_cpu / decode_step_cpu: CPU, contiguous, both float32 or both float16.
void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf, op,
              ": k_cache must be float32 or float16, got ", k_cache.scalar_type());
  check_input(k_cache, "k_cache", k_cache.scalar_type());
  check_input(v_cache, "v_cache", k_cache.scalar_type());
}

// f(kc, vc) with the caches' data as float* or (float16) uint16_t*.
template <typename F>
void with_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, F&& f) {
  if (k_cache.scalar_type() == at::kHalf)
    f(reinterpret_cast<uint16_t*>(k_cache.data_ptr<at::Half>()), reinterpret_cast<uint16_t*>(v_cache.data_ptr<at::Half>()));
  else
    f(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
}

// Rows `ids` of an 8-bit group-wise table (dbquant/format/embedding.py): codes int8 [R, Dp], code_scales
// float16 [R, G] (G groups of Dp / G channels), ids int64 [n] in 0..R-1 -> float32 [n, dim] (dim <= Dp) =
// codes * their group's scale * `scale`. One call for the decoder's per-token lookup, where the
// torch ops of QuantEmbedding.forward cost ~0.2 ms (each one runs cold after a step's weight stream).
at::Tensor table_rows_cpu(const at::Tensor& codes, const at::Tensor& code_scales, const at::Tensor& ids,
                          int64_t dim, double scale) {
  check_input(codes, "codes", at::kChar);
  check_input(code_scales, "code_scales", at::kHalf);
  check_input(ids, "ids", at::kLong);
  TORCH_CHECK(codes.dim() == 2 && code_scales.dim() == 2 && code_scales.size(0) == codes.size(0) &&
                  code_scales.size(1) > 0 && codes.size(1) % code_scales.size(1) == 0 && ids.dim() == 1 &&
                  0 < dim && dim <= codes.size(1),
              "table_rows_cpu: codes must be int8 [R, Dp], code_scales float16 [R, G] with G dividing Dp, ids int64 "
              "[n] and 0 < dim <= Dp; got ", codes.sizes(), ", ", code_scales.sizes(), ", ", ids.sizes(), ", dim ",
              dim);
  const int64_t R = codes.size(0), Dp = codes.size(1), G = code_scales.size(1), g = Dp / G, n = ids.size(0);
  at::Tensor out = at::empty({n, dim}, codes.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  const int8_t* c = codes.data_ptr<int8_t>();
  const at::Half* sc = code_scales.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(0 <= id[r] && id[r] < R, "table_rows_cpu: id ", id[r], " is outside the table's ", R, " rows");
    const int8_t* cr = c + id[r] * Dp;
    for (int64_t j = 0; j < G && j * g < dim; ++j) {
      const float s = float(sc[id[r] * G + j]) * float(scale);
      const int64_t e = std::min(dim, (j + 1) * g);
#pragma omp simd
      for (int64_t i = j * g; i < e; ++i) o[r * dim + i] = float(cr[i]) * s;
    }
  }
  return out;
}

// torch.argmax(x, -1) of float32 [B, V] (V >= 1) -> int64 [B]: the first maximum of each row, or its
// first NaN (decode_ops.h: argmax_row).
at::Tensor argmax_cpu(const at::Tensor& x) {
  check_input(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "argmax_cpu: x must be float32 [B, V] with V >= 1, got ", x.sizes());
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const Isa isa = dbquant::cpu::best_isa();
  for (int64_t b = 0; b < B; ++b)
    out.data_ptr<int64_t>()[b] = dbquant::cpu::argmax_row(isa, x.data_ptr<float>() + b * V, V);
  return out;
}

// One token's attention over a float cache, the kernel of attend_float_cache on its own (for tests and
// benchmarks): q float32 [Hq, D]; k, v float32 or float16 (both the same) [Hk, L, D] with rows 0..n-1
// filled; Hq a multiple of Hk. Returns float32 [Hq, D]: softmax(scale q k^T (softcap tanh(. / softcap)
// where softcap > 0)) v, a float16 cache's rows widened exactly as they are read.
at::Tensor attend_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t n, double scale,
                      double softcap, const std::string& isa_arg) {
  const Isa isa = parse_isa(isa_arg);
  check_input(q, "q", at::kFloat);
  check_caches("attend_cpu", k, v);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(2) == q.size(1) && k.size(0) > 0 &&
                  q.size(0) % k.size(0) == 0,
              "attend_cpu: q must be [Hq, D] and k, v [Hk, L, D] with Hq a multiple of Hk, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(1 <= n && n <= k.size(1), "attend_cpu: n must be in 1..", k.size(1), ", got ", n);
  const int64_t Hq = q.size(0), Hk = k.size(0), L = k.size(1), D = q.size(1);
  at::Tensor out = at::empty_like(q);
  at::Tensor scores = at::empty({Hq * n}, q.options());
  with_caches(k, v, [&](auto* kc, auto* vc) {
    dbquant::cpu::attend_one_token(isa, q.data_ptr<float>(), kc, vc, Hq, Hk, L, D, n, float(scale), float(softcap),
                                   scores.data_ptr<float>(), out.data_ptr<float>(), 0, Hq);
  });
  return out;
}

// A prompt chunk's causal attention over a float cache (the prefill's): q float32 [B, Hq, T, D] (any strides
// but a contiguous last dim: the decoder passes its rotated heads as they lie) at positions pos..pos+T-1;
// k, v float32 or float16 (both the same) [B, Hk, L, D], contiguous, rows 0..pos+T-1 filled (the chunk's own
// keys and values written first). Query t attends to rows first..pos+t, first = pos+t-window+1 (not below 0)
// where window > 0, else 0: attend_one_token per query and kv head, what a decode step computes for the
// same position. Returns float32 [B, T, Hq, D] (the o-projection's rows as they are). Queries are handed to
// threads in folded order (t = 0, T-1, 1, T-2, ...): their costs grow with t, and contiguous shares of that
// order cost about the same.
at::Tensor attend_causal_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t pos,
                             double scale, double softcap, int64_t window, const std::string& isa_arg) {
  const Isa isa = parse_isa(isa_arg);
  check_caches("attend_causal_cpu", k, v);
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 4 && q.stride(3) == 1,
              "attend_causal_cpu: q must be a float32 CPU tensor [B, Hq, T, D] with a contiguous last dim, got ",
              q.scalar_type(), " ", q.sizes(), " strides ", q.strides());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) &&
                  k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "attend_causal_cpu: k, v must be [B, Hk, L, D] with q's B and D and Hq a multiple of Hk, got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hk = k.size(1), L = k.size(2);
  TORCH_CHECK(pos >= 0 && pos + T <= L, "attend_causal_cpu: positions ", pos, "..", pos + T - 1,
              " are outside the cache (", L, " rows)");
  TORCH_CHECK(window >= 0, "attend_causal_cpu: window must be >= 0 (0: none), got ", window);
  at::Tensor out = at::empty({B, T, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * T == 0) return out;
  const int64_t group = Hq / Hk, sb = q.stride(0), sh = q.stride(1), st = q.stride(2);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_caches(k, v, [&](auto* kc, auto* vc) {
    at::parallel_for(0, B * T * Hk, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(size_t(Hq * D + Hq * (pos + T)));  // one query's rows [Hq, D], then its scores
      float* qrow = buf.data();
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j = i % Hk, f = i / Hk % T, b = i / (Hk * T);
        const int64_t t = f % 2 ? T - 1 - f / 2 : f / 2;  // folded order
        const int64_t qpos = pos + t, first = window > 0 ? std::max<int64_t>(0, qpos - window + 1) : 0;
        for (int64_t h = j * group; h < (j + 1) * group; ++h)
          std::copy(qp + b * sb + h * sh + t * st, qp + b * sb + h * sh + t * st + D, qrow + h * D);
        const int64_t off = (b * Hk * L + first) * D;
        dbquant::cpu::attend_one_token(isa, qrow, kc + off, vc + off, Hq, Hk, L, D, qpos + 1 - first, float(scale),
                                       float(softcap), qrow + Hq * D, op + (b * T + t) * Hq * D, j * group,
                                       (j + 1) * group);
      }
    });
  });
  return out;
}

void check_token_args(const char* op, const DecodeLayer& ly, const at::Tensor& x, const at::Tensor& cos,
                      const at::Tensor& sin) {
  ly.check_complete();
  check_input(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == ly.H, op, ": x must be [1, ", ly.H, "] (hidden), got ",
              x.sizes());
  check_input(cos, "cos", at::kFloat);
  check_input(sin, "sin", at::kFloat);
  check_shape(cos, "cos", {ly.D});
  check_shape(sin, "sin", {ly.D});
}

// One decoder layer for one token, in place on x float32 [1, H] (layer_step above), its k, v
// appended at `pos` to k_cache, v_cache: float32 or float16 [1, Hk, L, D] (this layer's); cos, sin: float32
// [D] at `pos`.
void decode_layer_cpu(const at::Tensor& x, const c10::intrusive_ptr<DecodeLayer>& layer, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos) {
  const DecodeLayer& ly = *layer;
  check_token_args("decode_layer_cpu", ly, x, cos, sin);
  check_caches("decode_layer_cpu", k_cache, v_cache);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.size(1) == ly.Hk && k_cache.size(3) == ly.D &&
                  v_cache.sizes() == k_cache.sizes(),
              "decode_layer_cpu: caches must be [1, ", ly.Hk, ", max_len, ", ly.D, "], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  const int64_t L = k_cache.size(2);
  TORCH_CHECK(pos >= 0 && pos < L, "decode_layer_cpu: pos ", pos, " is outside the cache (max_len ", L, ")");
  const int64_t own = StepScratch(ly).total;
  at::Tensor scratch = at::empty({own + ly.Hq * (pos + 1)}, x.options());
  float* sp = scratch.data_ptr<float>();
  with_caches(k_cache, v_cache, [&](auto* kc, auto* vc) {
    layer_step(ly, x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), sp,
               [&](const float* q, const float* k, const float* v, float* att, Isa isa) {
                 attend_float_cache(isa, ly, kc, vc, L, pos, q, k, v, att, sp + own);
               });
  });
}

// ---- attention on a packed VidKV cache (kv_attn.h; dbquant/runtime/kv/packed.py) -------------

// One layer's packed VidKV cache for kv_attend_cpu / decode_layer_kv_cpu, built once per layer
// (torch.classes.dbquant.KVPacked, dbquant/backends/cpu.py: prepare_kv_packed) over the caller's
// buffers, which it keeps alive and reads (the tail it also writes): shapes as KVPackedView in
// kv_attn.h, checked here once. The fill counts (groups packed, tail rows) are per-call arguments.
struct KVPacked : torch::CustomClassHolder {
  KVPacked(std::vector<at::Tensor> codes, std::vector<at::Tensor> floats, int64_t group, int64_t n_anom)
      : codes(std::move(codes)), floats(std::move(floats)) {
    TORCH_CHECK(this->codes.size() == 8 && this->floats.size() == 6,
                "KVPacked: expected 8 code tensors (kmask, kcodes, kmin, kscale, nbits, nscale, vtrits, vscale) "
                "and 6 float tensors (factors, fmat, sink_k, sink_v, tail_k, tail_v), got ",
                this->codes.size(), " and ", this->floats.size());
    const char* cn[8] = {"kmask", "kcodes", "kmin", "kscale", "nbits", "nscale", "vtrits", "vscale"};
    const char* fn[6] = {"factors", "fmat", "sink_k", "sink_v", "tail_k", "tail_v"};
    for (int i = 0; i < 8; ++i) check_input(this->codes[i], cn[i], at::kByte);
    for (int i = 0; i < 6; ++i) check_input(this->floats[i], fn[i], at::kFloat);
    const at::Tensor& tk = this->floats[4];
    TORCH_CHECK(tk.dim() == 3, "KVPacked: tail_k must be [Hk, capacity, D], got ", tk.sizes());
    auto& v = view;
    v.Hk = tk.size(0);
    v.TC = tk.size(1);
    v.D = tk.size(2);
    v.G = group;
    v.na = n_anom;
    v.nn = v.D - n_anom;
    v.NG = this->codes[7].dim() == 3 ? this->codes[7].size(1) : 0;
    v.TB = v.G * ((v.D + 4) / 5);
    v.S = this->floats[2].dim() == 3 ? this->floats[2].size(1) : -1;
    TORCH_CHECK(v.D >= 8 && v.D % 8 == 0 && v.D <= dbquant::cpu::kKvMaxD && v.G >= 8 && v.G % 8 == 0 &&
                    v.G <= dbquant::cpu::kKvMaxG && n_anom >= 0 && n_anom <= v.D && v.S >= 0 && v.S < v.G,
                "KVPacked: unsupported sizes head_dim ", v.D, ", group ", v.G, ", anomalous channels ", n_anom,
                ", sink ", v.S, " (head_dim and group multiples of 8 up to 256, 0 <= sink < group)");
    const int64_t Hk = v.Hk, NG = v.NG, D = v.D, G = v.G, na = v.na, nn = v.nn;
    check_shape(this->codes[0], "kmask", {Hk, NG, (na > 0 && nn > 0) ? D / 8 : 0});
    check_shape(this->codes[1], "kcodes", {Hk, NG, na, G / 4});
    check_shape(this->codes[2], "kmin", {Hk, NG, na});
    check_shape(this->codes[3], "kscale", {Hk, NG, na});
    check_shape(this->codes[4], "nbits", {Hk, NG, nn, G / 8});
    check_shape(this->codes[5], "nscale", {Hk, NG, nn});
    check_shape(this->codes[6], "vtrits", {Hk, NG, v.TB});
    check_shape(this->codes[7], "vscale", {Hk, NG, D});
    check_shape(this->floats[0], "factors", {Hk, NG, 4});
    check_shape(this->floats[1], "fmat", {nn, nn});
    check_shape(this->floats[2], "sink_k", {Hk, v.S, D});
    check_shape(this->floats[3], "sink_v", {Hk, v.S, D});
    check_shape(this->floats[5], "tail_v", {Hk, v.TC, D});
    v.kmask = this->codes[0].data_ptr<uint8_t>();
    v.kcodes = this->codes[1].data_ptr<uint8_t>();
    v.kmin = this->codes[2].data_ptr<uint8_t>();
    v.kscale = this->codes[3].data_ptr<uint8_t>();
    v.nbits = this->codes[4].data_ptr<uint8_t>();
    v.nscale = this->codes[5].data_ptr<uint8_t>();
    v.vtrits = this->codes[6].data_ptr<uint8_t>();
    v.vscale = this->codes[7].data_ptr<uint8_t>();
    v.factors = this->floats[0].data_ptr<float>();
    v.fmat = this->floats[1].data_ptr<float>();
    v.sink_k = this->floats[2].data_ptr<float>();
    v.sink_v = this->floats[3].data_ptr<float>();
    v.tail_k = this->floats[4].data_ptr<float>();
    v.tail_v = this->floats[5].data_ptr<float>();
  }

  std::vector<at::Tensor> codes, floats;
  dbquant::cpu::KVPackedView view{};
};

void check_kv_counts(const char* op, const dbquant::cpu::KVPackedView& kv, int64_t n_groups, int64_t n_tail,
                     int64_t T) {
  TORCH_CHECK(n_groups >= 0 && n_groups <= kv.NG && n_tail >= T && n_tail <= kv.TC, op, ": n_groups ", n_groups,
              " and n_tail ", n_tail, " must lie in [0, ", kv.NG, "] and [", T, " (queries), ", kv.TC,
              "] (the cache's capacities)");
}

// out float32 [T, Hq, D] = attention of q float32 [T, Hq, D] over the packed groups, the sink
// and the tail's visible rows (kv_attn.h), split over threads by kv head x group, then by query
// head, then by kv head x channel block.
void kv_attend_into(const dbquant::cpu::KVPackedView& kv, const float* q, int64_t T, int64_t Hq, int64_t n_groups,
                    int64_t n_tail, float scale, float* out, const at::TensorOptions& opts, Isa isa) {
  const int64_t ld = n_groups * kv.G + n_tail, D = kv.D, Hk = kv.Hk;
  at::Tensor sc = at::empty({T * Hq * ld}, opts.dtype(at::kFloat));
  float* s = sc.data_ptr<float>();
  std::fill(out, out + T * Hq * D, 0.0f);
  // items: (kv head, group) pairs, handed out as runs of groups of one kv head
  at::parallel_for(0, Hk * n_groups, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t kh = i / n_groups, g0 = i % n_groups, g1 = std::min(n_groups, g0 + (e - i));
      dbquant::cpu::kv_scores_packed(isa, kv, q, T, Hq, scale, s, ld, kh, g0, g1);
      i += g1 - g0;
    }
  });
  // the tail (at most residual + 2 groups of rows) and the softmax: too little work to share
  dbquant::cpu::kv_scores_tail_softmax(isa, kv, q, T, Hq, scale, s, ld, n_groups, n_tail, 0, Hq);
  // values: (kv head, run of groups) items, each into its own partial output (few kv heads would
  // leave threads idle), summed afterwards
  const int64_t runs = std::min<int64_t>(n_groups, 4), items = Hk * runs;
  if (n_groups > 0) {
    at::Tensor part = at::zeros({items, T * Hq * D}, opts.dtype(at::kFloat));
    float* pp = part.data_ptr<float>();
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t kh = i / runs, r = i % runs;
        dbquant::cpu::kv_values_packed(isa, kv, s, T, Hq, ld, pp + i * T * Hq * D, kh, n_groups * r / runs,
                                       n_groups * (r + 1) / runs);
      }
    });
    for (int64_t i = 0; i < items; ++i)
      for (int64_t j = 0; j < T * Hq * D; ++j) out[j] += pp[i * T * Hq * D + j];
  }
  dbquant::cpu::kv_values_tail(isa, kv, s, T, Hq, ld, n_groups, n_tail, out, 0, Hq);
}

// The first n_groups packed groups of a layer as float32 keys, values [Hk, n_groups * G, D] (for a
// prefill chunk's attention; a transient copy of one layer's past, dropped after the chunk).
std::vector<at::Tensor> kv_dequantize_cpu(const c10::intrusive_ptr<KVPacked>& kvp, int64_t n_groups) {
  const auto& kv = kvp->view;
  check_kv_counts("kv_dequantize_cpu", kv, n_groups, 0, 0);
  at::Tensor k = at::empty({kv.Hk, n_groups * kv.G, kv.D}, at::kFloat), v = at::empty_like(k);
  const Isa isa = dbquant::cpu::best_isa();
  at::parallel_for(0, kv.Hk * n_groups, 4, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e;) {
      const int64_t kh = i / n_groups, g0 = i % n_groups, g1 = std::min(n_groups, g0 + (e - i));
      dbquant::cpu::kv_dequantize(isa, kv, n_groups, k.data_ptr<float>(), v.data_ptr<float>(), kh, g0, g1);
      i += g1 - g0;
    }
  });
  return {k, v};
}

// Attention of q float32 [T, Hq, D] over a packed VidKV cache (its first n_groups groups, sink,
// and tail rows 0 .. n_tail - 1, of which the last T are the queries' own tokens, attended causally).
at::Tensor kv_attend_cpu(const at::Tensor& q, const c10::intrusive_ptr<KVPacked>& kv, int64_t n_groups,
                         int64_t n_tail, double scale, const std::string& isa_arg) {
  const Isa isa = parse_isa(isa_arg);
  const auto& v = kv->view;
  check_input(q, "q", at::kFloat);
  TORCH_CHECK(q.dim() == 3 && q.size(2) == v.D && q.size(1) % v.Hk == 0 && q.size(1) >= v.Hk,
              "kv_attend_cpu: q must be [T, Hq, ", v.D, "] with Hq a multiple of ", v.Hk, " kv heads, got ",
              q.sizes());
  const int64_t T = q.size(0), Hq = q.size(1);
  check_kv_counts("kv_attend_cpu", v, n_groups, n_tail, T);
  at::Tensor out = at::empty_like(q);
  if (T > 0) kv_attend_into(v, q.data_ptr<float>(), T, Hq, n_groups, n_tail, float(scale), out.data_ptr<float>(),
                            q.options(), isa);
  return out;
}

// The packed cache's attention of layer_step: the token's k, v go to tail row n_tail, then q
// attends to the n_groups packed groups, the sink and tail rows 0..n_tail.
void attend_packed_cache(const DecodeLayer& ly, const dbquant::cpu::KVPackedView& kv, int64_t n_groups,
                         int64_t n_tail, const float* q, const float* k, const float* v, float* att,
                         const at::TensorOptions& opts, Isa isa) {
  const int64_t Hk = ly.Hk, D = ly.D;
  for (int64_t j = 0; j < Hk; ++j) {
    std::copy(k + j * D, k + (j + 1) * D, kv.tail_k + (j * kv.TC + n_tail) * D);
    std::copy(v + j * D, v + (j + 1) * D, kv.tail_v + (j * kv.TC + n_tail) * D);
  }
  kv_attend_into(kv, q, 1, ly.Hq, n_groups, n_tail + 1, float(ly.scale), att, opts, isa);
}

void check_packed_layer(const char* op, const DecodeLayer& ly, const dbquant::cpu::KVPackedView& kv, int64_t n_groups,
                        int64_t n_tail) {
  TORCH_CHECK(kv.Hk == ly.Hk && kv.D == ly.D, op, ": the cache holds ", kv.Hk, " kv heads of ", kv.D,
              " channels; the layer has ", ly.Hk, " of ", ly.D);
  TORCH_CHECK(ly.window == 0 && ly.softcap == 0.0, op, ": sliding windows and soft-capping are not served by the "
              "packed cache (window ", ly.window, ", softcap ", ly.softcap, ")");
  check_kv_counts(op, kv, n_groups, n_tail + 1, 1);
}

// decode_layer_cpu with the attention on a packed VidKV cache (attend_packed_cache).
void decode_layer_kv_cpu(const at::Tensor& x, const c10::intrusive_ptr<DecodeLayer>& layer, const at::Tensor& cos,
                         const at::Tensor& sin, const c10::intrusive_ptr<KVPacked>& kvp, int64_t n_groups,
                         int64_t n_tail) {
  const DecodeLayer& ly = *layer;
  const auto& kv = kvp->view;
  check_token_args("decode_layer_kv_cpu", ly, x, cos, sin);
  check_packed_layer("decode_layer_kv_cpu", ly, kv, n_groups, n_tail);
  at::Tensor scratch = at::empty({StepScratch(ly).total}, x.options());
  layer_step(ly, x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), scratch.data_ptr<float>(),
             [&](const float* q, const float* k, const float* v, float* att, Isa isa) {
               attend_packed_cache(ly, kv, n_groups, n_tail, q, k, v, att, x.options(), isa);
             });
}

// ---- the whole one-token step: every layer in one call ------------------------------------------

// A decoder's layers in order, each with its RoPE tables (float32 [max_len, D]; Gemma-3's local
// and global layers differ) and, for the packed cache, its KVPacked (set once per sequence).
// Built once per decoder (dbquant/backends/cpu.py: prepare_decode_stack).
struct DecodeStack : torch::CustomClassHolder {
  void add(const c10::intrusive_ptr<DecodeLayer>& layer, at::Tensor cos, at::Tensor sin) {
    layer->check_complete();
    check_input(cos, "cos", at::kFloat);
    check_input(sin, "sin", at::kFloat);
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == layer->D && sin.sizes() == cos.sizes(),
                "DecodeStack.add: cos, sin must be float32 [max_len, ", layer->D, "] alike, got ", cos.sizes(), " and ",
                sin.sizes());
    TORCH_CHECK(layers.empty() || layer->H == layers[0]->H, "DecodeStack.add: hidden size ", layer->H,
                " differs from the first layer's ", layers[0]->H);
    // checked once here, not per step: decode_step_cpu's one cache tensor holds every layer alike
    TORCH_CHECK(layers.empty() || (layer->Hk == layers[0]->Hk && layer->D == layers[0]->D),
                "DecodeStack.add: every layer must have the first layer's ", layers[0]->Hk, " kv heads of ",
                layers[0]->D, " channels, got ", layer->Hk, " of ", layer->D);
    layers.push_back(layer);
    tables.emplace_back(std::move(cos), std::move(sin));
    packed.emplace_back();
    scratch_floats = std::max(scratch_floats, StepScratch(*layer).total);
    max_hq = std::max(max_hq, layer->Hq);
  }

  void set_kv(int64_t i, const c10::intrusive_ptr<KVPacked>& kv) {
    TORCH_CHECK(i >= 0 && i < int64_t(layers.size()), "DecodeStack.set_kv: layer ", i, " of ", layers.size());
    check_packed_layer("DecodeStack.set_kv", *layers[i], kv->view, 0, 0);
    packed[i] = kv;
  }

  // The model's final RMSNorm (float32 [H], folded into the norm's weight as dbquant/runtime/decode.py
  // folds Gemma's 1 + w), applied in place after the last layer by both step ops once set: a token's
  // separate norm op cost ~0.09-0.15 ms in the framework, cold after the step's weight stream.
  void set_final_norm(at::Tensor w, double eps) {
    check_input(w, "final_norm", at::kFloat);
    TORCH_CHECK(!layers.empty() && w.dim() == 1 && w.size(0) == layers[0]->H,
                "DecodeStack.set_final_norm: w must be float32 [", layers.empty() ? 0 : layers[0]->H,
                "] after the layers are added, got ", w.sizes());
    final_norm = std::move(w);
    final_eps = eps;
  }

  // x float32 [1, H] through the final norm, in place, if one is set.
  void apply_final_norm(float* xp) const {
    if (final_norm.defined())
      dbquant::cpu::rms_norm_rows(dbquant::cpu::best_isa(), xp, final_norm.data_ptr<float>(), float(final_eps),
                                  layers[0]->H, xp, 0, 1);
  }

  int64_t size() const { return int64_t(layers.size()); }

  // x float32 [1, H] and a position every table reaches.
  void check_step(const char* op, const at::Tensor& x, int64_t pos) const {
    TORCH_CHECK(!layers.empty(), op, ": the stack has no layers");
    check_input(x, "x", at::kFloat);
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.size(1) == layers[0]->H, op, ": x must be [1, ", layers[0]->H,
                "] (hidden), got ", x.sizes());
    for (const auto& t : tables)
      TORCH_CHECK(pos >= 0 && pos < t.first.size(0), op, ": pos ", pos, " is outside the RoPE tables (max_len ",
                  t.first.size(0), ")");
  }

  std::vector<c10::intrusive_ptr<DecodeLayer>> layers;
  std::vector<std::pair<at::Tensor, at::Tensor>> tables;
  std::vector<c10::intrusive_ptr<KVPacked>> packed;  // empty until set_kv
  // sized once here, not per step: the largest layer's layer_step scratch, and the most query heads
  int64_t scratch_floats = 0, max_hq = 0;
  at::Tensor final_norm;  // undefined until set_final_norm
  double final_eps = 0.0;
};

// Every layer of `stack` for one token at `pos`, in place on x float32 [1, H]; layer i's k, v
// go to k_cache[i], v_cache[i] (float32 or float16 [n_layers, 1, Hk, L, D]: the decoder's caches as one
// tensor). The same arithmetic as one decode_layer_cpu call per layer, in one call.
void decode_step_cpu(const at::Tensor& x, const c10::intrusive_ptr<DecodeStack>& stack, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, int64_t pos) {
  const DecodeStack& st = *stack;
  st.check_step("decode_step_cpu", x, pos);
  const int64_t n = st.size();
  const DecodeLayer& l0 = *st.layers[0];
  check_caches("decode_step_cpu", k_cache, v_cache);
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == n && k_cache.size(1) == 1 && k_cache.size(2) == l0.Hk &&
                  k_cache.size(4) == l0.D && v_cache.sizes() == k_cache.sizes(),
              "decode_step_cpu: caches must be [", n, ", 1, ", l0.Hk, ", max_len, ", l0.D, "], got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t L = k_cache.size(3), per = l0.Hk * L * l0.D;
  TORCH_CHECK(pos < L, "decode_step_cpu: pos ", pos, " is outside the cache (max_len ", L, ")");
  float* xp = x.data_ptr<float>();
  // one scratch for the whole step: the largest layer's, then the attention scores
  const int64_t own = st.scratch_floats;
  at::Tensor scratch = at::empty({own + st.max_hq * (pos + 1)}, x.options());
  float* sp = scratch.data_ptr<float>();
  with_caches(k_cache, v_cache, [&](auto* kc, auto* vc) {
    for (int64_t i = 0; i < n; ++i) {
      const DecodeLayer& ly = *st.layers[i];
      const int64_t D = ly.D;
      layer_step(ly, xp, st.tables[i].first.data_ptr<float>() + pos * D,
                 st.tables[i].second.data_ptr<float>() + pos * D, sp,
                 [&](const float* q, const float* k, const float* v, float* att, Isa isa) {
                   attend_float_cache(isa, ly, kc + i * per, vc + i * per, L, pos, q, k, v, att, sp + own);
                 });
    }
  });
  st.apply_final_norm(xp);
}

// decode_step_cpu on the packed VidKV caches given with DecodeStack.set_kv: every layer's token
// goes to tail row n_tail and attends to n_groups packed groups, the sink and tail rows 0..n_tail.
void decode_step_kv_cpu(const at::Tensor& x, const c10::intrusive_ptr<DecodeStack>& stack, int64_t pos,
                        int64_t n_groups, int64_t n_tail) {
  const DecodeStack& st = *stack;
  st.check_step("decode_step_kv_cpu", x, pos);
  for (int64_t i = 0; i < st.size(); ++i) {
    TORCH_CHECK(st.packed[i], "decode_step_kv_cpu: layer ", i, " has no packed cache (DecodeStack.set_kv)");
    check_packed_layer("decode_step_kv_cpu", *st.layers[i], st.packed[i]->view, n_groups, n_tail);
  }
  float* xp = x.data_ptr<float>();
  at::Tensor scratch = at::empty({st.scratch_floats}, x.options());
  for (int64_t i = 0; i < st.size(); ++i) {
    const DecodeLayer& ly = *st.layers[i];
    const auto& kv = st.packed[i]->view;
    const int64_t D = ly.D;
    layer_step(ly, xp, st.tables[i].first.data_ptr<float>() + pos * D, st.tables[i].second.data_ptr<float>() + pos * D,
               scratch.data_ptr<float>(), [&](const float* q, const float* k, const float* v, float* att, Isa isa) {
                 attend_packed_cache(ly, kv, n_groups, n_tail, q, k, v, att, x.options(), isa);
               });
  }
  st.apply_final_norm(xp);
}

// "float", "int8" or "int16": the tables lut="auto" uses for the decode GEMV on an ISA path
// (dbgemm_i8lut.h).
std::string cpu_default_lut(const std::string& isa) {
  return dbquant::cpu::lut_name(dbquant::cpu::default_lut(parse_isa(isa)));
}

// Force the ISA path "auto" runs ("avx512", "avx2", "scalar" where this CPU has it, or "auto": the fastest
// again), process-wide, the decode-step ops included; returns the previous setting. For tests and benchmarks.
std::string cpu_force_isa(const std::string& isa) {
  const int prev = dbquant::cpu::force_isa(isa == "auto" ? -1 : int(parse_isa(isa)));
  return prev < 0 ? "auto" : dbquant::cpu::isa_name(Isa(prev));
}

// Force the tables lut="auto" and the decode ops use ("float", "int8", "int16", or "auto": the
// measured choice again), process-wide; returns the previous setting. For tests and benchmarks.
std::string cpu_force_lut(const std::string& kind) {
  LutKind k = LutKind::Float;
  TORCH_CHECK(kind == "auto" || dbquant::cpu::parse_lut(kind.c_str(), k), "cpu_force_lut: unknown lut '", kind,
              "'; use auto, float, int8 or int16");
  const int prev = dbquant::cpu::force_lut(kind == "auto" ? -1 : int(k));
  return prev < 0 ? "auto" : dbquant::cpu::lut_name(LutKind(prev));
}

// The AVX-512 integer-table lookups: "vbmi" (vpermb / vpermi2b, compact tables) or "bw" (vpshufb, the
// default); mode "on" (where the CPU has VBMI) / "off" / "auto" sets it (process-wide, for tests and
// benchmarks), "query" only reads. Returns the lookups in use before the call.
std::string cpu_i8lut_lookup(const std::string& mode) {
  TORCH_CHECK(mode == "query" || mode == "auto" || mode == "on" || mode == "off", "cpu_i8lut_lookup: unknown mode '",
              mode, "'; use query, auto, on or off");
  const std::string now = dbquant::cpu::i8lut_vbmi() ? "vbmi" : "bw";
  if (mode != "query") dbquant::cpu::force_i8lut_vbmi(mode == "auto" ? -1 : mode == "on" ? 1 : 0);
  return now;
}

// XOR of buf's 8-byte words (stream_read.h), read by `threads` threads; the uint64 checksum
// comes back bit-cast to int64 (a Python int).
int64_t stream_read_cpu(const at::Tensor& buf, int64_t threads, const std::string& isa_arg) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(),
              "stream_read_cpu: buf must be a contiguous CPU tensor, got device ", buf.device(),
              ", strides ", buf.strides());
  TORCH_CHECK(threads >= 1 && threads <= 4096, "stream_read_cpu: threads must be in 1..4096, got ", threads);
  const Isa isa = parse_isa(isa_arg);
  const uint64_t sum = dbquant::cpu::stream_read(isa, static_cast<const uint8_t*>(buf.data_ptr()),
                                                 int64_t(buf.nbytes()), int(threads));
  return static_cast<int64_t>(sum);
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (Isa i : {Isa::Avx512, Isa::Avx2, Isa::Scalar})
    if (dbquant::cpu::isa_supported(i)) out.emplace_back(dbquant::cpu::isa_name(i));
  return out;
}

bool cpu_dword_rows() { return dbquant::cpu::dword_rows_supported(); }

// The AVX-512 extensions avx512_has answers for, by name.
constexpr std::pair<const char*, dbquant::cpu::Avx512Ext> kAvx512Exts[] = {
    {"vbmi", dbquant::cpu::Avx512Ext::Vbmi},
    {"vnni", dbquant::cpu::Avx512Ext::Vnni},
    {"bf16", dbquant::cpu::Avx512Ext::Bf16},
    {"bitalg", dbquant::cpu::Avx512Ext::Bitalg}};

dbquant::cpu::Avx512Ext parse_avx512_ext(const std::string& ext, const char* op) {
  for (const auto& [name, e] : kAvx512Exts)
    if (ext == name) return e;
  TORCH_CHECK(false, op, ": unknown AVX-512 extension \"", ext, "\"; use vbmi, vnni, bf16 or bitalg");
}

bool cpu_avx512_has(const std::string& ext) {
  return dbquant::cpu::avx512_has(parse_avx512_ext(ext, "cpu_avx512_has"));
}

// Hide the comma-separated AVX-512 extensions from the kernels ("" for none), process-wide; returns the
// previously hidden ones. For tests: the fallbacks of CPUs without them run on one that has them.
std::string cpu_hide_exts(const std::string& exts) {
  int mask = 0;
  for (size_t b = 0; b < exts.size();) {
    const size_t e = std::min(exts.find(',', b), exts.size());
    mask |= 1 << int(parse_avx512_ext(exts.substr(b, e - b), "cpu_hide_exts"));
    b = e + 1;
  }
  const int prev = dbquant::cpu::hide_avx512_exts(mask);
  std::string out;
  for (const auto& [name, e] : kAvx512Exts)
    if (prev >> int(e) & 1) out += (out.empty() ? "" : ",") + std::string(name);
  return out;
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: a namespace may be opened by TORCH_LIBRARY only once
// per process, and the CUDA extension (dbquant._C_cuda) adds its ops to `dbquant` too.
TORCH_LIBRARY_FRAGMENT(dbquant, m) {
  m.def(
      "dbgemm_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset, Tensor? bias, "
      "int out_features, int in_features, int group_size, str isa=\"auto\", str lut=\"auto\") -> Tensor");
  m.def(
      "dequantize_cpu(Tensor planes, Tensor scales, Tensor? offset, int out_features, "
      "int in_features, int group_size) -> Tensor");
  m.def(
      "dequantize_t_cpu(Tensor planes, Tensor scales, Tensor? offset, int out_features, "
      "int in_features, int group_size, bool bf16=False, str isa=\"auto\") -> Tensor");
  m.def(
      "gemm_a8_cpu(Tensor x, Tensor planes, Tensor scales, Tensor? offset, Tensor? bias, int out_features, "
      "int in_features, int group_size, str isa=\"auto\", bool int8_weights=False) -> Tensor");
  m.def("linear_int8_cpu(Tensor x, Tensor wq, Tensor s, str isa=\"auto\") -> Tensor");
  m.def("rms_norm_cpu(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("gated_act_cpu(Tensor gu, str act=\"silu\") -> Tensor");
  m.def("rope_heads_cpu(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("table_rows_cpu(Tensor codes, Tensor code_scales, Tensor ids, int dim, float scale=1.) -> Tensor");
  m.def("argmax_cpu(Tensor x) -> Tensor");
  m.def("attend_cpu(Tensor q, Tensor k, Tensor v, int n, float scale, float softcap=0., str isa=\"auto\") -> Tensor");
  m.def(
      "attend_causal_cpu(Tensor q, Tensor k, Tensor v, int pos, float scale, float softcap=0., int window=0, "
      "str isa=\"auto\") -> Tensor");
  m.def("linear_w8a8_cpu(Tensor x, Tensor wq, Tensor s, str isa=\"auto\") -> Tensor");
  // The class comes before the op whose schema names it.
  m.class_<DecodeLayer>("DecodeLayer")
      .def(torch::init<at::Tensor, at::Tensor, double, int64_t, int64_t, int64_t, int64_t, double>())
      .def("set_proj", &DecodeLayer::set_proj)
      .def("set_extras", &DecodeLayer::set_extras)
      .def("hidden", [](const c10::intrusive_ptr<DecodeLayer>& self) { return self->H; });
  m.def(
      "decode_layer_cpu(Tensor(a!) x, __torch__.torch.classes.dbquant.DecodeLayer layer, Tensor cos, "
      "Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, int pos) -> ()");
  m.class_<KVPacked>("KVPacked").def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t>());
  m.def("kv_attend_cpu(Tensor q, __torch__.torch.classes.dbquant.KVPacked kv, int n_groups, int n_tail, "
        "float scale, str isa=\"auto\") -> Tensor");
  // no tensor argument to dispatch on: a catch-all kernel
  m.def("kv_dequantize_cpu(__torch__.torch.classes.dbquant.KVPacked kv, int n_groups) -> Tensor[]",
        &kv_dequantize_cpu);
  m.def(
      "decode_layer_kv_cpu(Tensor(a!) x, __torch__.torch.classes.dbquant.DecodeLayer layer, Tensor cos, "
      "Tensor sin, __torch__.torch.classes.dbquant.KVPacked kv, int n_groups, int n_tail) -> ()");
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<>())
      .def("add", &DecodeStack::add)
      .def("set_kv", &DecodeStack::set_kv)
      .def("set_final_norm", &DecodeStack::set_final_norm)
      .def("size", &DecodeStack::size);
  m.def(
      "decode_step_cpu(Tensor(a!) x, __torch__.torch.classes.dbquant.DecodeStack stack, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, int pos) -> ()");
  m.def(
      "decode_step_kv_cpu(Tensor(a!) x, __torch__.torch.classes.dbquant.DecodeStack stack, int pos, int n_groups, "
      "int n_tail) -> ()");
  m.def("stream_read_cpu(Tensor buf, int threads, str isa=\"auto\") -> int");
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("cpu_dword_rows() -> bool", &cpu_dword_rows);
  m.def("cpu_avx512_has(str ext) -> bool", &cpu_avx512_has);
  m.def("cpu_hide_exts(str exts) -> str", &cpu_hide_exts);
  m.def("cpu_default_lut(str isa=\"auto\") -> str", &cpu_default_lut);
  m.def("cpu_force_lut(str kind) -> str", &cpu_force_lut);
  m.def("cpu_force_isa(str isa) -> str", &cpu_force_isa);
  m.def("cpu_i8lut_lookup(str mode=\"query\") -> str", &cpu_i8lut_lookup);  // no tensor arguments: a catch-all kernel
}

TORCH_LIBRARY_IMPL(dbquant, CPU, m) {
  m.impl("dbgemm_cpu", &dbgemm_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
  m.impl("dequantize_t_cpu", &dequantize_t_cpu);
  m.impl("gemm_a8_cpu", &gemm_a8_cpu);
  m.impl("linear_int8_cpu", &linear_int8_cpu);
  m.impl("rms_norm_cpu", &rms_norm_cpu);
  m.impl("attend_cpu", &attend_cpu);
  m.impl("attend_causal_cpu", &attend_causal_cpu);
  m.impl("gated_act_cpu", &gated_act_cpu);
  m.impl("rope_heads_cpu", &rope_heads_cpu);
  m.impl("table_rows_cpu", &table_rows_cpu);
  m.impl("argmax_cpu", &argmax_cpu);
  m.impl("linear_w8a8_cpu", &linear_w8a8_cpu);
  m.impl("decode_layer_cpu", &decode_layer_cpu);
  m.impl("kv_attend_cpu", &kv_attend_cpu);
  m.impl("decode_layer_kv_cpu", &decode_layer_kv_cpu);
  m.impl("decode_step_cpu", &decode_step_cpu);
  m.impl("decode_step_kv_cpu", &decode_step_kv_cpu);
  m.impl("stream_read_cpu", &stream_read_cpu);
}

// No Python functions: `import dbquant._C` exists only to load this library.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dbquant CPU kernels; registers the torch.ops.dbquant.* ops listed at the top on import";
}
