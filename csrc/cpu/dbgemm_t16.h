// Torch-free CPU kernels for the dual-binary GEMM  y[M, N] = x[M, K] @ W^T (+ bias),
// reading the CPU kernel layout "t16" (docs/FORMAT.md, "Kernel layouts").
//
// The t16 layout is the canonical format (v2: k = P planes, 1..4) regrouped into tiles of 16
// output rows, so that one SIMD register holds one value for each of 16 rows
// (dbquant/backends/t16.py builds it once per weight at load time; no bit is moved, only
// whole bytes):
//   planes  uint8   [T, C8, P, 16]  planes[t, c, p, r] = qweight[p, 16t + r, c]
//   scales  float16 [T, G, P, 16]   scales[t, j, p, r] = alpha_{p+1}[16t + r, j]
//   offset  float16 [T, G, 16]      beta[16t + r, j], or absent
// with T = ceil(N / 16) (rows past N are zero), C8 = Kp / 8 bytes per row and plane,
// Kp = ceil(K / g) * g, G = Kp / g. Byte c of a row holds input channels 8c..8c+7,
// LSB first, as in the canonical format. One (c, p) "unit" is 16 bytes, one byte of each row.
//
// Dword rows (cols = 4), a second byte order of the same planes for the AVX-512 VBMI + VNNI
// integer-table kernel (dbgemm_i8lut_avx512dw.cpp), chosen at load time where that kernel runs:
//   planes  uint8   [T, C8/4, P, 16, 4]  planes[t, c / 4, p, r, c % 4] = qweight[p, 16t + r, c]
// so one 64-byte block holds 4 byte columns of one plane for 16 rows, a row's 4 bytes side by
// side (a dword: what vpdpbusd sums). Needs g % 32 == 0 (whole blocks per group). The AVX-512
// float-table, dequantization and VNNI 8-bit-activation kernels read both orders in place
// (t16_unit_avx512.h: a 64-byte load and a shift per unit); the other kernels read the unit order,
// through UnitPlanes (below).
//
// Algorithm (T-MAC style lookup tables with 4-bit indices). The planes hold {0, 1}, so
// the dot product of 4 bits of a plane with 4 activations is one of 16 partial sums.
// Per activation row and 4-channel chunk q we tabulate
//   lut[q][i] = (((0 + [i&1] x[4q]) + [i&2] x[4q+1]) + [i&4] x[4q+2]) + [i&8] x[4q+3]
// (16 floats: exactly one AVX-512 register). A byte of a plane is two indices (low
// nibble: chunk 2c, high nibble: chunk 2c+1); for 16 rows at once, the 16 bytes
// planes[t, c, p, :] widened to 16 int32 lanes are a vector of table indices, and one
// vpermps looks up all 16 partial sums. Per group j and row:
//   lo_p = sum over the group's bytes c, in order, of lut[2c][low nibble of byte c of plane p]
//   hi_p = sum over the group's bytes c, in order, of lut[2c+1][high nibble]
//   y = fma(alpha_1, lo_1 + hi_1, y); ...; y = fma(alpha_P, lo_P + hi_P, y); y = fma(beta, gsum_j, y)
// The tables are built once per activation row and read once per plane: the cost of the
// table lookups grows with P (the SIMD paths walk the planes two at a time, so P = 2 is one
// pass with four independent sums, and the adds are not one long latency chain).
// where gsum_j = sum over the group's chunks q, in order, of lut[q][15].
// The scalar and AVX-512 paths perform exactly these float operations in this order, lane
// by lane, so they agree bit for bit (tests check it). The AVX2 path tabulates 2-channel
// chunks instead (a 16-entry lookup is slow without AVX-512; see dbgemm_t16_avx2.cpp), so it
// adds the same products in another order and agrees with them to float rounding.
// Padded channels (k >= K) have x = 0, so their tables are all zero and add nothing
// whatever their bits are.

#pragma once

#include <cstddef>
#include <cstdint>

namespace dbquant {
namespace cpu {

constexpr int kTile = 16;  // output rows per tile
constexpr int kMaxPlanes = 4;  // k of the packed format (dbquant/format/layout.py: MAX_PLANES)
// Input channels per 64-byte block of dword rows (4 byte columns of 8): the group size must be a multiple
// (dbquant/backends/t16.py: DWORD_GROUP).
constexpr int64_t kDwordGroup = 32;

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Name of an ISA path ("scalar", "avx2", "avx512").
const char* isa_name(Isa isa);
// Whether this CPU can run `isa` (checked at run time: the build has no -march).
bool isa_supported(Isa isa);
// The fastest supported path.
Isa fastest_isa();
// The path "auto" runs (every kernel and decode-step op asked for "auto"): the one forced by
// force_isa, else fastest_isa().
Isa best_isa();
// Force "auto" to `isa` (int(Isa), supported by this CPU) process-wide, or back to the fastest path
// with -1; returns the previous setting (-1 or int(Isa)). For tests and benchmarks (the CLI never
// sets it): the ops of a decode step take no ISA argument.
int force_isa(int isa);

// A t16 weight (pointers into caller-owned memory; see the layout above).
struct T16Weight {
  const uint8_t* planes;    // [T, C8, P, 16] (cols 1) or [T, C8/4, P, 16, 4] (cols 4: dword rows)
  const uint16_t* scales;   // [T, G, P, 16] IEEE float16 bits
  const uint16_t* offset;   // [T, G, 16] or nullptr
  const float* bias;        // [N] float32 or nullptr
  int64_t N, K, group_size; // K = in_features (unpadded); group_size a multiple of 8
  int64_t P = 2;            // bit planes (k), 1..kMaxPlanes
  int64_t cols = 1;         // byte columns side by side per row: 1 (unit order) or 4 (dword rows)
  int64_t kp() const { return (K + group_size - 1) / group_size * group_size; }
  int64_t groups() const { return kp() / group_size; }
  int64_t tiles() const { return (N + kTile - 1) / kTile; }
};

// Where tile t's planes, scales and offset (nullptr when absent) start in the t16 layout.
struct TilePtrs {
  const uint8_t* planes;
  const uint16_t* scales;
  const uint16_t* offset;
};
// Bytes of one tile's planes (the same in both orders).
inline int64_t tile_plane_bytes(const T16Weight& w) { return w.kp() / 8 * w.P * kTile; }

inline TilePtrs tile_ptrs(const T16Weight& w, int64_t t) {
  const int64_t G = w.groups();
  return {w.planes + t * tile_plane_bytes(w), w.scales + t * G * w.P * kTile,
          w.offset ? w.offset + t * G * kTile : nullptr};
}

// Tile t's planes in the unit order [C8, P, 16], for the kernels that read only that order: in place
// for cols 1; for dword rows regrouped into a buffer this object owns (one per thread: each call's tile
// range is one thread's), valid until the next call. Those kernels meet dword rows only where the
// loaders did not choose them (DBQUANT_CPU_COLS=4, or a path forced off the default): the AVX-512
// float-table, dequantization and VNNI 8-bit-activation kernels read both orders in place
// (t16_unit_avx512.h), and the integer-table kernel has its own dword-row path.
// (Defined out of line in dbgemm_t16.cpp, which has no target pragma: an inline copy built for AVX-512
// in one translation unit could be the one the linker keeps for all.)
class UnitPlanes {
 public:
  explicit UnitPlanes(const T16Weight& w);
  ~UnitPlanes();
  UnitPlanes(const UnitPlanes&) = delete;
  UnitPlanes& operator=(const UnitPlanes&) = delete;
  const uint8_t* tile(int64_t t);
  TilePtrs ptrs(int64_t t);  // tile_ptrs(w, t) with the planes in the unit order

 private:
  const T16Weight& w_;
  uint8_t* buf_ = nullptr;
};

// AVX-512 extensions some kernels need beyond the AVX-512 path's F/BW/VL.
enum class Avx512Ext : int { Vbmi, Vnni, Bf16, Bitalg };
// Whether this CPU runs the AVX-512 path and has `ext` (asked once per extension, then cached), and the
// extension is not hidden by hide_avx512_exts.
bool avx512_has(Avx512Ext ext);
// For tests: avx512_has answers false for the extensions whose bit (1 << int(ext)) is set in `mask`,
// process-wide, so a CPU that has them runs the kernels of CPUs that lack them (every kernel reads both
// byte orders). Returns the previous mask.
int hide_avx512_exts(int mask);

// Whether this CPU runs the dword-row kernel (AVX-512 F/BW/VL + VBMI + VNNI): where the loaders
// choose cols 4 for groups of a multiple of 32 channels.
bool dword_rows_supported();

// Floats of lookup table per activation row: 16 per 4-channel chunk of Kp.
inline int64_t lut_floats(const T16Weight& w) { return w.kp() / 4 * 16; }

// Tables of activation rows [m0, m1) of x (float32 [M, K], row stride K):
// lut float32 [M, Kp/4, 16] (the AVX2 path fills the first 2 Kp floats of each row with its
// own [Kp/2, 4] tables; only the same path's gemm_tiles reads them); and, when gsum is not
// null, gsum float32 [M, G].
void build_luts(Isa isa, const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                int64_t m1);

// y[m, n] for all M rows and the output rows of tiles [t0, t1) (y: float32 [M, N],
// row-major). Tiles are independent: callers run disjoint ranges in parallel.
void gemm_tiles(Isa isa, const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                float* y, int64_t t0, int64_t t1);

// Dense weight rows of tiles [t0, t1): out float32 [N, K] row-major (only rows < N and
// columns < K are written). For long prefills: dequantize once, then one BLAS GEMM.
// w = (((b1 ? alpha1 : 0) + (b2 ? alpha2 : 0)) + ...) + beta, as the reference computes it.
void dequantize_tiles(const T16Weight& w, float* out, int64_t t0, int64_t t1);

// gsum_row[j] = sum over group j's 4-channel chunks q, in order, of lut_row[q][15] (the
// chunk's activation sum): what an offset multiplies. Shared by the scalar and AVX-512 paths.
void group_sums(const T16Weight& w, const float* lut_row, float* gsum_row);

// Per-ISA entry points (one translation unit each, compiled for that ISA only).
void build_luts_scalar(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                       int64_t m1);
void gemm_tiles_scalar(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                       float* y, int64_t t0, int64_t t1);
void build_luts_avx2(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                     int64_t m1);
void gemm_tiles_avx2(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                     float* y, int64_t t0, int64_t t1);
void build_luts_avx512(const T16Weight& w, const float* x, float* lut, float* gsum, int64_t m0,
                       int64_t m1);
void gemm_tiles_avx512(const T16Weight& w, const float* lut, const float* gsum, int64_t M,
                       float* y, int64_t t0, int64_t t1);

// Exact IEEE float16 -> float32 (scalar path; the SIMD paths use vcvtph2ps).
float half_to_float(uint16_t h);

}  // namespace cpu
}  // namespace dbquant
