// Integer lookup-table (T-MAC style) GEMV for the dual-binary linear, on the same t16 weight
// layout as the float-table kernel (dbgemm_t16.h; no repack, no second copy of the weight). Two
// kinds of integer tables (LutKind): int8 (codes of +-127, one byte per entry) and int16 (codes of
// +-2047, two bytes per entry: 16x finer, for two more lookups per weight byte; see "int16 tables").
//
// Tables. As in dbgemm_t16.h, the 4 bits of one plane over a 4-channel chunk q index one of 16
// partial sums T_q[i] = (((0 + [i&1] x[4q]) + [i&2] x[4q+1]) + [i&4] x[4q+2]) + [i&8] x[4q+3]
// (float32, the float path's table). Here the tables are centred first: with h_q = 0.5 T_q[15]
// (half the chunk's sum),
//   C_q[i] = T_q[i] - h_q = sum_k ([i has bit k] - 1/2) x[4q+k]        (C_q[15 - i] = -C_q[i])
// so |C_q[i]| <= (1/2) sum_k |x[4q+k]|: half the range of T_q when one channel dominates the chunk
// (an outlier), which halves the rounding step below. Each group j (g channels, g/4 chunks) of an
// activation row gets one fp32 scale and the centred tables are rounded to int8 with it:
//   m_j = max over the group's chunks q and i of |C_q[i]|       (0 for an all-zero group)
//   s_j = m_j / 127            inv_j = 127 / m_j (0 when m_j = 0)
//   t_q[i] = int8(nearbyint(C_q[i] * inv_j))  in [-127, 127], round half to even
// so the tables are what is quantized to int8, with one scale per group: the activations enter
// only through their 4-channel partial sums (whose range is what the int8 code must cover). What
// the centring takes out comes back per group: a plane's lookups over group j add up to
// sum_q T_q = sum_q C_q + sum_q h_q, and sum_q h_q = gsum_j / 2 (gsum_j = sum over the group's
// chunks q, in order, of T_q[15]: the float path's group sum, dbgemm_t16.h), kept in float32.
// The tables are stored expanded to the weight's byte order, so that one vector load of weight
// bytes and one of table bytes line up lane for lane with no shuffling of tables:
//   lo[(c P + p) 16 + i] = t_{2c}[i]      hi[(c P + p) 16 + i] = t_{2c+1}[i]
// for every byte column c (channels 8c..8c+7) and plane p: (lo, hi) are the tables of the low
// and high nibble of weight byte planes[t, c, p, r]. Per activation row (I8LutRow): the G scales
// s_j and the G sums gsum_j, then 2 Kp P bytes of tables (P planes).
//
// Lookup and accumulation. For 16 output rows at once, a nibble of each weight byte indexes
// its unit's 16-byte table: pshufb (SSSE3 / AVX2 vpshufb ymm / AVX-512BW vpshufb zmm) does 16
// such lookups per 128-bit lane, one (c, p) unit per lane. On AVX-512 VBMI CPUs the AVX-512 path
// can keep the tables compact instead (cpt: 32 bytes per byte column c, t_{2c} then t_{2c+1}, 2 Kp
// bytes per row whatever P) and look them up across lanes with vpermb / vpermi2b, the lane's
// column offset added to the nibble (dbgemm_i8lut_avx512_impl.h); the lookups give the same bytes.
// It measured no faster than vpshufb here, so it is off unless asked for (force_i8lut_vbmi).
// On weights in dword rows (dbgemm_t16.h, cols 4) and AVX-512 VBMI + VNNI CPUs, the AVX-512 path
// instead looks up compact tables by vpermb and adds a row's 4 bytes into int32 by vpdpbusd
// (dbgemm_i8lut_avx512_impl.h, "Dword rows"): the same integers S_pj below, with no int16 stage.
// The low- and high-nibble results of a row are interleaved (punpcklbw / punpckhbw) and pmaddubsw
// with a vector of ones adds each pair into int16: per row, column and plane t_{2c}[lo] + t_{2c+1}[hi]
// (|.| <= 254). These add into int16 accumulators, which are reduced per plane and widened to int32 after at most
// kI8SegmentCols byte columns (2 lookups of |t| <= 127 each: 128 * 254 = 32512 < 2^15, so no
// int16 sum can overflow); the int32 sum S_pj over group j is exact:
//   S_pj = sum over the group's columns c of t_{2c}[b & 15] + t_{2c+1}[b >> 4],  b = byte (c, p)
// and the same integer on every path. Then, per group j, in this order (float32):
//   h = 0.5 gsum_j
//   y = fma(alpha_{1j}, fma(float(S_1j), s_j, h), y); ...; y = fma(alpha_{Pj}, fma(float(S_Pj), s_j, h), y)
//   y = fma(beta_j, gsum_j, y)      (only with an offset: the offset's term is not quantized)
//   and y + bias at the end. Scalar, AVX2 and AVX-512 perform exactly these operations, so they
// agree bit for bit (tests/test_cpu_i8lut.py checks it).
//
// Error bound against ref (x @ W^T with W dequantized). Each lookup replaces C_q[i] by
// s_j t_q[i] with |s_j t_q[i] - C_q[i]| <= s_j / 2 (a rounding to the nearest multiple of s_j),
// and a group holds g / 4 chunks per plane, so per output element
//   |y - y_ref| <= sum_j (s_j / 2) (g / 4) sum_p |alpha_pj|  +  float32 rounding,
// with s_j <= 2 max_{k in j} |x_k| / 127 (4 max |x_k| / 127 for uncentred tables). The float32
// rounding is that of a K-term dot product (FP32_REORDER_LONG in tests/tolerances.py).
// tests/test_cpu_i8lut.py checks this bound, per element, against dbgemm_ref, and the integer
// result against a torch emulation of the tables.
//
// int16 tables. The same centred tables, rounded with code_max = 2047 instead of 127:
//   s_j = m_j / 2047,  t_q[i] = nearbyint(C_q[i] * 2047 / m_j)  in [-2047, 2047]
// so the step, and with it the error bound above, is 16x smaller (the 127 of the bound becomes
// 2047). The reason is greedy text: int8 tables move SmolLM2's logits by ~0.15 rms, enough to flip
// a near-tie pick; 12-bit codes move them by ~0.01 (docs/RESULTS.md, "int16 tables"). Each code is
// held in two byte tables in the int8 layout, (lo, hi) and (lo2, hi2) (4 Kp P bytes of tables per
// row), split in one of two ways (I16Split), each path building and reading its own:
//   Bytes  (AVX-512): lo = t & 255, lo2 = t >> 8. The int8 lookup is done on both and the two results
//          interleaved (punpcklbw / punpckhbw of low, high), which rebuilds the int16 codes lane for
//          lane (little-endian); a row's low- and high-nibble codes add into its int16 accumulator.
//   TopRem (AVX2, scalar): lo = t >> 4 (arithmetic: -128..127), lo2 = t & 15 (0..15), t = 16 lo + lo2.
//          The top parts are looked up and summed exactly as int8 codes (pmaddubsw into int16); the rem
//          lookups add in uint8 lanes with no widening (a lane sees at most 16 lookups per segment:
//          16 * 15 = 240 < 2^8), and at the end of each segment a row's sum is rebuilt as 16 TOP + REM
//          (REM widened by punpck with zero): one punpck per 32 lookups instead of two per lookup.
//          16 TOP >= 16 * 16 * -128 = -2^15 is representable.
// Measured per path (docs/RESULTS.md): TopRem takes 5-8% off the Bytes kernel on the AVX2 path of an AMD Zen 3;
// an equivalent 6-shuffle scheme measured 3-6% slower than Bytes on the AVX-512 path of a Zen 4.
// Segments are kI16SegmentCols = 8 columns: per plane and row at most 16 codes, 16 * 2047 = 32752 < 2^15.
// Everything after the int32 sums S_pj is the int8 tables' code, and the codes, integers and floats are
// the same on every path (scalar, AVX2, AVX-512 without the VBMI lookups); only the split of the bytes
// differs.
//
// Padded channels (k >= K) have x = 0, so their table entries are 0 whatever the bits are.
// NaN / Inf activations: the binding recomputes such rows densely, as for the float path.

#pragma once

#include <cstddef>
#include <cstdint>

#include "dbgemm_t16.h"

namespace dbquant {
namespace cpu {

// Which table the decode GEMV uses (dbgemm_t16.h's float tables, or the integer ones above).
enum class LutKind : int { Float = 0, Int8 = 1, Int16 = 2 };

// "float", "int8" or "int16": the names DBQUANT_CPU_LUT and the binding's lut arguments use.
const char* lut_name(LutKind k);
// The kind named `name` into `kind`; false (kind untouched) for any other name, "auto" included.
bool parse_lut(const char* name, LutKind& kind);

// The integer kind whose codes take `entry_bytes` bytes (1: int8, 2: int16): the kernels' template
// parameter E.
constexpr LutKind lut_kind_for(int entry_bytes) { return entry_bytes == 2 ? LutKind::Int16 : LutKind::Int8; }
// The largest |code| of an integer table kind: the step is s_j = m_j / code_max.
constexpr int lut_code_max(LutKind k) { return k == LutKind::Int16 ? 2047 : 127; }
// Byte columns per int16 accumulation segment (see the overflow arguments above): a plane's
// int16 sum over a segment adds 2 entries per column, so 2 cols code_max < 2^15 (and for int16,
// 2 cols 15 < 2^8: the uint8 rem lanes).
constexpr int64_t kI8SegmentCols = 128;
constexpr int64_t kI16SegmentCols = 8;
constexpr int64_t lut_segment_cols(LutKind k) { return k == LutKind::Int16 ? kI16SegmentCols : kI8SegmentCols; }

// How a path splits each int16 code over its two byte tables (see "int16 tables" above).
enum class I16Split : int { Bytes, TopRem };

// Byte offsets of one activation row's integer tables inside its buffer of i8lut_row_bytes(w).
struct I8LutRow {
  float* scale;  // [G] s_j
  float* gsum;   // [G] gsum_j, the sum of the group's chunk sums T_q[15] (the centring's term, and the offset's)
  int8_t* lo;    // [C8, P, 16] low-nibble tables, expanded to the weight's byte order
  int8_t* hi;    // [C8, P, 16] high-nibble tables
  int8_t* cpt;   // [C8, 2, 16] compact tables (the VBMI path only; shares lo's bytes)
  int8_t* dw;    // [C8 / 4, 2, E, 64] dword tables (the dword-row path only, E bytes per code; shares
                 // lo's bytes; dbgemm_i8lut_avx512_impl.h, "Dword rows")
  int8_t* lo2;   // [C8, P, 16] int16 tables only (else nullptr): the codes' second byte tables; which
  int8_t* hi2;   //              part of a code lo / hi and lo2 / hi2 hold is the path's I16Split
};

// Bytes of one activation row's tables of `kind` (Int8 or Int16; a multiple of 64, so rows stay
// 64-byte aligned).
int64_t i8lut_row_bytes(const T16Weight& w, LutKind kind);
// The views of row m inside buf (buf: m rows of i8lut_row_bytes(w, kind) bytes).
I8LutRow i8lut_row(const T16Weight& w, uint8_t* buf, int64_t m, LutKind kind);
// Rows whose views a GEMM call computes once, before its tile loop (decode: M = 1); rows past
// these take i8lut_row per tile. Once per tile and row, i8lut_row took ~2% of a decode step.
constexpr int64_t kI8RowViews = 64;
// views[m] = i8lut_row(w, buf, m, kind) for m < min(M, kI8RowViews).
void i8lut_rows(const T16Weight& w, const uint8_t* buf, int64_t M, LutKind kind, I8LutRow* views);

// Tables of groups [j0, j1) of activation rows [m0, m1) of x (float32 [M, K], row stride K) into buf
// (the groups' scales, sums and byte columns only: threads may build disjoint group ranges of one row
// side by side). Every path
// performs the same float operations (the adds in the order above, an exact max, one multiply,
// round half to even), so the tables hold the same codes whichever path built them (int16 codes
// split as that path's I16Split; a path's lookups read only tables its own build wrote).
// kind: Int8 or Int16 (the int16 tables never take the VBMI lookups).
void build_i8luts(Isa isa, const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1,
                  LutKind kind, int64_t j0, int64_t j1);
void build_i8luts_scalar(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                         int64_t j0, int64_t j1);
void build_i8luts_avx2(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                       int64_t j0, int64_t j1);
void build_i8luts_avx512(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                         int64_t j0, int64_t j1);
void build_i8luts_avx512vbmi(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, int64_t j0,
                             int64_t j1);
void build_i8luts_avx512dw(const T16Weight& w, const float* x, uint8_t* buf, int64_t m0, int64_t m1, LutKind kind,
                           int64_t j0, int64_t j1);

// y[m, n] (float32 [M, N]) for all M rows and the output rows of tiles [t0, t1), from the tables
// in buf. Tiles are independent: callers run disjoint ranges in parallel.
void gemm_tiles_i8(Isa isa, const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0,
                   int64_t t1, LutKind kind);

void gemm_tiles_i8_scalar(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                          LutKind kind);
void gemm_tiles_i8_avx2(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                        LutKind kind);
void gemm_tiles_i8_avx512(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                          LutKind kind);
void gemm_tiles_i8_avx512vbmi(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1);
void gemm_tiles_i8_avx512dw(const T16Weight& w, const uint8_t* buf, int64_t M, float* y, int64_t t0, int64_t t1,
                            LutKind kind);

// Whether `isa`'s integer tables on w take the dword-row kernel: the AVX-512 path, weights in dword rows
// (w.cols 4) and a CPU with VBMI + VNNI (elsewhere dword rows are read through UnitPlanes). Build and
// lookups both ask, so they agree on the tables' layout.
bool i8lut_dword(Isa isa, const T16Weight& w);

// Whether the AVX-512 path uses the VBMI lookups (compact tables): only when turned on and the CPU
// has AVX-512 VBMI (auto = off, as measured). force_i8lut_vbmi(0 / 1 / -1: off / on where supported /
// back to auto) returns the previous setting; build and lookups must see the same setting (tests
// switch it between calls, never during one).
bool i8lut_vbmi();
int force_i8lut_vbmi(int mode);

// Chunks whose centred tables the SIMD builds keep between their two passes over a group (g <= 256
// channels: 4 KiB of floats); a longer group computes them again in the second pass (the same bytes).
constexpr int64_t kBuildChunks = 64;

// gsum_j = sum over group j's chunks q, in order, of T_q[15] (chunk_sum below).
float group_sum(const float* xr, int64_t K, int64_t j, int64_t g);

// T_q[15] = (((0 + x[4q]) + x[4q+1]) + x[4q+2]) + x[4q+3] (zero past K): chunk q's sum, in the order
// every path adds it (the same float operations, so the same tables and group sums).
inline float chunk_sum(const float* xr, int64_t K, int64_t q) {
  float s = 0.0f;
  if (4 * q + 4 <= K) {
    for (int64_t k = 4 * q; k < 4 * q + 4; ++k) s += xr[k];
  } else {
    for (int64_t k = 4 * q; k < 4 * q + 4; ++k) s += k < K ? xr[k] : 0.0f;
  }
  return s;
}

// h_q = 0.5 T_q[15]: the centre every path subtracts from chunk q's 16 partial sums.
inline float chunk_centre(const float* xr, int64_t K, int64_t q) { return 0.5f * chunk_sum(xr, K, q); }

// The measured choice of table per ISA path (kI8LutDefault in dbgemm_i8lut.cpp, docs/RESULTS.md),
// unless one is forced: by the environment variable DBQUANT_CPU_LUT=float|int8|int16 (read at first
// use), or later by force_lut.
LutKind default_lut(Isa isa);
// Force kind (int(LutKind)), or -1 to go back to the measured choice, for the whole process;
// returns the previous setting (-1 or int(LutKind)). For tests and benchmarks.
int force_lut(int kind);

}  // namespace cpu
}  // namespace dbquant
