// Run-time ISA dispatch of the t16 kernel. The build uses no -march flag: each ISA path
// lives in its own translation unit compiled for that ISA, and this file picks one
// after asking the CPU what it supports.

#include "dbgemm_t16.h"

#include <atomic>

namespace dbquant {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_supported(Isa isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  switch (isa) {
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    case Isa::Avx2:
      // Every AVX2 CPU also has F16C (vcvtph2ps), which the path needs.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    default: return true;
  }
#else
  return isa == Isa::Scalar;
#endif
}

Isa fastest_isa() {
  static const Isa best = isa_supported(Isa::Avx512) ? Isa::Avx512
                          : isa_supported(Isa::Avx2) ? Isa::Avx2
                                                     : Isa::Scalar;
  return best;
}

namespace {
std::atomic<int>& isa_override() {
  static std::atomic<int> forced{-1};
  return forced;
}
}  // namespace

Isa best_isa() {
  const int forced = isa_override().load(std::memory_order_relaxed);
  return forced >= 0 ? Isa(forced) : fastest_isa();
}

int force_isa(int isa) { return isa_override().exchange(isa); }

namespace {
std::atomic<int>& hidden_exts() {
  static std::atomic<int> mask{0};
  return mask;
}
}  // namespace

int hide_avx512_exts(int mask) { return hidden_exts().exchange(mask); }

bool avx512_has(Avx512Ext ext) {
  if (hidden_exts().load(std::memory_order_relaxed) >> int(ext) & 1) return false;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // __builtin_cpu_supports takes a string literal: one constant per extension
  static const bool vbmi = isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512vbmi");
  static const bool vnni = isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
  static const bool bf16 = isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512bf16");
  static const bool bitalg = isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512bitalg");
  switch (ext) {
    case Avx512Ext::Vbmi: return vbmi;
    case Avx512Ext::Vnni: return vnni;
    case Avx512Ext::Bf16: return bf16;
    default: return bitalg;
  }
#else
  return false;
#endif
}

bool dword_rows_supported() { return avx512_has(Avx512Ext::Vbmi) && avx512_has(Avx512Ext::Vnni); }

UnitPlanes::UnitPlanes(const T16Weight& w) : w_(w) {
  if (w.cols != 1) buf_ = new uint8_t[tile_plane_bytes(w)];
}

UnitPlanes::~UnitPlanes() { delete[] buf_; }

const uint8_t* UnitPlanes::tile(int64_t t) {
  const uint8_t* src = w_.planes + t * tile_plane_bytes(w_);
  if (w_.cols == 1) return src;
  // block (b, p): 16 rows x 4 columns, byte 4 r + j = column 4 b + j of row r -> unit (4 b + j, p)
  const int64_t P = w_.P, blocks = w_.kp() / kDwordGroup;
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const uint8_t* blk = src + (b * P + p) * 64;
      for (int j = 0; j < 4; ++j) {
        uint8_t* u = buf_ + ((4 * b + j) * P + p) * kTile;
        for (int r = 0; r < kTile; ++r) u[r] = blk[4 * r + j];
      }
    }
  return buf_;
}

TilePtrs UnitPlanes::ptrs(int64_t t) {
  TilePtrs p = tile_ptrs(w_, t);
  p.planes = tile(t);
  return p;
}

void build_luts(Isa isa, const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                int64_t m1) {
  switch (isa) {
    case Isa::Avx512: return build_luts_avx512(w, x, lut, gsum, m0, m1);
    case Isa::Avx2: return build_luts_avx2(w, x, lut, gsum, m0, m1);
    default: return build_luts_scalar(w, x, lut, gsum, m0, m1);
  }
}

void gemm_tiles(Isa isa, const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                float* y, int64_t t0, int64_t t1) {
  switch (isa) {
    case Isa::Avx512: return gemm_tiles_avx512(w, lut, gsum, M, y, t0, t1);
    case Isa::Avx2: return gemm_tiles_avx2(w, lut, gsum, M, y, t0, t1);
    default: return gemm_tiles_scalar(w, lut, gsum, M, y, t0, t1);
  }
}

}  // namespace cpu
}  // namespace dbquant
