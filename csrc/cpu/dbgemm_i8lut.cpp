// The integer lookup-table kernel's shared parts (dbgemm_i8lut.h): table layout and the portable
// build (the scalar path's; the SIMD builds write the same codes), the run-time ISA dispatch,
// and the measured default choice between the float and the integer tables.

#include "dbgemm_i8lut.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace dbquant {
namespace cpu {

namespace {

int64_t round_up64(int64_t n) { return (n + 63) / 64 * 64; }

// The 16 float partial sums of chunk q (channels 4q..4q+3, zero past K), in the float path's order.
void chunk_table(const float* xr, int64_t K, int64_t q, float* t) {
  float xs[4];
  for (int j = 0; j < 4; ++j) xs[j] = 4 * q + j < K ? xr[4 * q + j] : 0.0f;
  for (int i = 0; i < 16; ++i) {
    float v = 0.0f;
    for (int j = 0; j < 4; ++j)
      if (i >> j & 1) v += xs[j];
    t[i] = v;
  }
}

// C_q[i] = T_q[i] - h_q (dbgemm_i8lut.h): the table centred on half the chunk's sum.
void centred_table(const float* xr, int64_t K, int64_t q, float* t) {
  chunk_table(xr, K, q, t);
  const float h = chunk_centre(xr, K, q);
  for (int i = 0; i < 16; ++i) t[i] -= h;
}

// Default table per ISA path (index: Isa) for the decode GEMV. History: on the 2-core Xeon (Sapphire
// Rapids class) of docs/RESULTS.md, "Integer lookup tables", the int8 tables were faster than the float
// ones on every shape (benchmarks/i8lut_vs_t16.py: 1.10-1.18x on the AVX-512 path, 1.7-2.9x on AVX2)
// and, centred, cost +0.06 PPL through the decode path, so every SIMD path took them. But they move
// SmolLM2's logits by ~0.15 rms, which flips greedy picks at near-ties (2.7% of wiki positions,
// margins up to 0.32) and changed the main job's answer. The int16 tables (12-bit codes) keep the
// float tables' picks to 99.8% (only ties under 0.01 differ), cost no PPL, and are still faster than
// the float tables on both paths (1.07-1.30x on AVX-512, 1.2-1.5x on AVX2, Zen 4), so they are the
// default; int8 stays for whoever wants the last ~10% of decode speed (DBQUANT_CPU_LUT=int8).
// docs/RESULTS.md, "int16 tables"; on the AVX2-only AMD Zen 3 the int16 tables (split 16 top + rem
// there) are 1.17-1.34x the float ones too ("AMD Zen 3 (AVX2 only) again"). The scalar path (a
// fallback, not measured as a contender) keeps the float tables.
constexpr LutKind kI8LutDefault[3] = {
    /* scalar */ LutKind::Float,
    /* avx2   */ LutKind::Int16,
    /* avx512 */ LutKind::Int16,
};

}  // namespace

const char* lut_name(LutKind k) { return k == LutKind::Int16 ? "int16" : k == LutKind::Int8 ? "int8" : "float"; }

bool parse_lut(const char* name, LutKind& kind) {
  for (LutKind k : {LutKind::Float, LutKind::Int8, LutKind::Int16})
    if (std::strcmp(name, lut_name(k)) == 0) {
      kind = k;
      return true;
    }
  return false;
}

float group_sum(const float* xr, int64_t K, int64_t j, int64_t g) {
  // chunk by chunk: the chunk sums are independent, so the dependent adds are g / 4, not g
  float s = 0.0f;
  for (int64_t q = j * g / 4; q < (j + 1) * g / 4; ++q) s += chunk_sum(xr, K, q);
  return s;
}

int64_t i8lut_row_bytes(const T16Weight& w, LutKind kind) {
  // expanded (lo, hi [, lo2, hi2]) or compact tables (+ 64 bytes: a VBMI zmm may read one column
  // past the end)
  const int64_t c8 = w.kp() / 8, bytes = kind == LutKind::Int16 ? 2 : 1;
  return round_up64(2 * w.groups() * int64_t(sizeof(float))) +
         round_up64(std::max(2 * bytes * c8 * w.P * 16, c8 * 32 + 64));
}

I8LutRow i8lut_row(const T16Weight& w, uint8_t* buf, int64_t m, LutKind kind) {
  uint8_t* base = buf + m * i8lut_row_bytes(w, kind);
  const int64_t G = w.groups(), units = (w.kp() / 8) * w.P;
  I8LutRow r;
  r.scale = reinterpret_cast<float*>(base);
  r.gsum = r.scale + G;
  r.lo = reinterpret_cast<int8_t*>(base + round_up64(2 * G * int64_t(sizeof(float))));
  r.hi = r.lo + units * 16;
  r.cpt = r.lo;
  r.dw = r.lo;
  r.lo2 = kind == LutKind::Int16 ? r.hi + units * 16 : nullptr;
  r.hi2 = kind == LutKind::Int16 ? r.lo2 + units * 16 : nullptr;
  return r;
}

void i8lut_rows(const T16Weight& w, const uint8_t* buf, int64_t M, LutKind kind, I8LutRow* views) {
  for (int64_t m = 0; m < std::min(M, kI8RowViews); ++m) views[m] = i8lut_row(w, const_cast<uint8_t*>(buf), m, kind);
}

void build_i8luts_scalar(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                         int64_t j0, int64_t j1) {
  const int64_t K = w.K, g = w.group_size, P = w.P;
  const float top = float(lut_code_max(kind));
  const bool split = kind == LutKind::Int16;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    const I8LutRow row = i8lut_row(w, buf, m, kind);
    for (int64_t j = j0; j < j1; ++j) {
      float t[16];
      // pass 1: the group's largest |centred partial sum|, which the codes' +-code_max must cover
      float mx = 0.0f;
      for (int64_t q = j * g / 4; q < (j + 1) * g / 4; ++q) {
        centred_table(xr, K, q, t);
        for (int i = 0; i < 16; ++i) mx = std::max(mx, std::fabs(t[i]));
      }
      const float inv = mx > 0.0f ? top / mx : 0.0f;
      row.scale[j] = mx / top;
      row.gsum[j] = group_sum(xr, K, j, g);
      // pass 2: round, and write each byte column's (lo, hi) tables once per plane (int16: the
      // codes' top parts there, their rem parts in (lo2, hi2): I16Split::TopRem, as the scalar reads them)
      for (int64_t c = j * g / 8; c < (j + 1) * g / 8; ++c) {
        int8_t code_top[2][16], code_rem[2][16];  // int8 tables: code_top holds the codes, code_rem is unused
        for (int h = 0; h < 2; ++h) {
          centred_table(xr, K, 2 * c + h, t);
          for (int i = 0; i < 16; ++i) {
            const int code = int(std::nearbyint(t[i] * inv));
            code_top[h][i] = int8_t(split ? code >> 4 : code);  // >> is arithmetic: floor(code / 16)
            code_rem[h][i] = int8_t(code & 15);
          }
        }
        for (int64_t p = 0; p < P; ++p) {
          std::memcpy(row.lo + (c * P + p) * 16, code_top[0], 16);
          std::memcpy(row.hi + (c * P + p) * 16, code_top[1], 16);
          if (split) {
            std::memcpy(row.lo2 + (c * P + p) * 16, code_rem[0], 16);
            std::memcpy(row.hi2 + (c * P + p) * 16, code_rem[1], 16);
          }
        }
      }
    }
  }
}

bool i8lut_dword(Isa isa, const T16Weight& w) { return isa == Isa::Avx512 && w.cols == 4 && dword_rows_supported(); }

void build_i8luts(Isa isa, const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1,
                  LutKind kind, int64_t j0, int64_t j1) {
  if (i8lut_dword(isa, w)) return build_i8luts_avx512dw(w, x, buf, m0, m1, kind, j0, j1);
  switch (isa) {
    case Isa::Avx512:
      return i8lut_vbmi() && kind == LutKind::Int8 ? build_i8luts_avx512vbmi(w, x, buf, m0, m1, j0, j1)
                                                   : build_i8luts_avx512(w, x, buf, m0, m1, kind, j0, j1);
    case Isa::Avx2: return build_i8luts_avx2(w, x, buf, m0, m1, kind, j0, j1);
    default: return build_i8luts_scalar(w, x, buf, m0, m1, kind, j0, j1);
  }
}

void gemm_tiles_i8(Isa isa, const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0,
                   int64_t t1, LutKind kind) {
  if (i8lut_dword(isa, w)) return gemm_tiles_i8_avx512dw(w, buf, M, y, t0, t1, kind);
  switch (isa) {
    case Isa::Avx512:
      return i8lut_vbmi() && kind == LutKind::Int8 ? gemm_tiles_i8_avx512vbmi(w, buf, M, y, t0, t1)
                                                   : gemm_tiles_i8_avx512(w, buf, M, y, t0, t1, kind);
    case Isa::Avx2: return gemm_tiles_i8_avx2(w, buf, M, y, t0, t1, kind);
    default: return gemm_tiles_i8_scalar(w, buf, M, y, t0, t1, kind);
  }
}

namespace {
// -1: the measured table decides; 0 / 1 / 2: LutKind forced (DBQUANT_CPU_LUT at start-up, force_lut later).
std::atomic<int>& lut_override() {
  static std::atomic<int> v{[] {
    const char* e = std::getenv("DBQUANT_CPU_LUT");
    LutKind k;
    return e && parse_lut(e, k) ? int(k) : -1;
  }()};
  return v;
}
}  // namespace

LutKind default_lut(Isa isa) {
  const int forced = lut_override().load(std::memory_order_relaxed);
  return forced >= 0 ? LutKind(forced) : kI8LutDefault[int(isa)];
}

int force_lut(int kind) { return lut_override().exchange(kind); }

namespace {
// -1 auto, 0 off, 1 on (where supported). Auto is off: on the Xeon of docs/RESULTS.md the VBMI
// lookups measured no faster than vpshufb (within noise at SmolLM2's shapes, 5-15% slower at
// 4096x4096), so they stay an option (cpu_i8lut_lookup("on")), tested but not the default.
std::atomic<int> vbmi_mode{-1};
}  // namespace

bool i8lut_vbmi() { return avx512_has(Avx512Ext::Vbmi) && vbmi_mode.load(std::memory_order_relaxed) == 1; }

int force_i8lut_vbmi(int mode) { return vbmi_mode.exchange(mode); }

}  // namespace cpu
}  // namespace dbquant
