// Decode GEMV for dual-binary weights (format and contract: dbgemv.h). Torch-free, so
// `nvcc -arch=sm_80 -c dbgemv.cu` (and sm_90) checks it on a machine without a GPU.
//
// Design, and why:
// * Decode is memory bound: per output row the kernel must stream k planes x Kp/8 bytes
//   (k bits per weight, k = 1..4 a template parameter) and read G x k scales; the
//   arithmetic is small. So everything
//   is arranged around reading the planes at full width, once.
// * One warp per output row n, kWarpsPerBlock rows per block. A row's plane bytes are
//   contiguous, so the 32 lanes read consecutive VEC-byte chunks of it: with VEC = 16
//   each lane issues one 128-bit load per plane and the warp reads 512 contiguous bytes
//   (4096 weights) per step - fully coalesced, and the fewest load instructions.
//   VEC drops to 8/4/1 bytes only when a row's byte count (Kp/8) or the base pointer
//   is not aligned for the wider load (e.g. K = 576 at g = 64: 72 bytes per row).
// * The block's rows are consecutive, so their scales (and offsets) are one contiguous
//   run of [rows, G, 2] halves in global memory. The block copies that run to shared
//   memory once, with all 128 threads reading consecutive words (coalesced), instead of
//   every lane gathering its groups' scales from global memory in the inner loop, where
//   the pattern depends on g (for g = 8 every byte has its own group; for g = 200 the
//   groups do not line up with the lanes' chunks at all).
// * The planes hold {0, 1}: per plane byte the kernel sums the 8 activations whose bit
//   is set (selects, no multiplies), and applies alpha_1..alpha_k to those sums - k FMAs
//   per byte instead of 8k. With an offset, beta multiplies the plain sum of the 8 inputs.
// * The activations (K values per row, a few KiB) are read through the read-only data
//   cache: every warp of every block reads the same x, so after the first warp they
//   come from L1/L2, and staging them in shared memory would only add a barrier.
// * Several activation rows (M <= kMaxRows) share one pass over the weights: each lane
//   keeps one fp32 accumulator per row, so the weights are streamed once, not M times.
// * Accumulation is fp32; the warp's 32 partial sums are combined with shuffles (no
//   shared memory, no atomics: deterministic), and lane 0 adds the bias and stores.

#include "dbgemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

namespace dbquant {
namespace cuda {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive plane bytes in one load instruction (128/64/32/8 bits), as words of
// up to 4 bytes (byte 0 in the low bits: CUDA GPUs are little-endian). The caller
// guarantees p is VEC-aligned.
template <int VEC>
struct PlaneChunk {
  static constexpr int kBytesPerWord = VEC < 4 ? VEC : 4;
  static constexpr int kWords = VEC / kBytesPerWord;
  uint32_t word[kWords];
};

template <int VEC>
__device__ __forceinline__ PlaneChunk<VEC> load_chunk(const uint8_t* p) {
  PlaneChunk<VEC> c;
  if constexpr (VEC == 16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    c.word[0] = v.x, c.word[1] = v.y, c.word[2] = v.z, c.word[3] = v.w;
  } else if constexpr (VEC == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    c.word[0] = v.x, c.word[1] = v.y;
  } else if constexpr (VEC == 4) {
    c.word[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
    static_assert(VEC == 1, "VEC must be 16, 8, 4 or 1");
    c.word[0] = __ldg(p);
  }
  return c;
}

// The 8 activations x[k .. k+8) of one row as floats; channels >= K read as 0 (the
// padding of the last group). `vec`: the row is 16-byte aligned and K % 8 == 0, so the
// 8 values are one (fp16/bf16) or two (fp32) 128-bit loads.
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ p, bool vec, int valid,
                                        float (&out)[8]) {
  if (vec) {
    constexpr int kChunks = 8 * sizeof(T) / 16;
    uint4 raw[kChunks];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) raw[c] = __ldg(reinterpret_cast<const uint4*>(p) + c);
    T v[8];
    memcpy(v, raw, sizeof(v));
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = to_float(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = j < valid ? to_float(p[j]) : 0.f;
  }
}

template <typename T, int VEC, int P>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    dbgemv_kernel(const T* __restrict__ x, int64_t ldx, int M, int K,
                  const uint8_t* __restrict__ qweight, const __half* __restrict__ scales,
                  const __half* __restrict__ offset, const T* __restrict__ bias,
                  T* __restrict__ y, int N, int G, int KB, int group_size, bool x_vec) {
  extern __shared__ __align__(16) unsigned char smem[];
  __half* s_scales = reinterpret_cast<__half*>(smem);       // [rows, G, P]
  __half* s_offset = s_scales + kWarpsPerBlock * G * P;     // [rows, G]
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int n0 = blockIdx.x * kWarpsPerBlock;
  const int rows = min(kWarpsPerBlock, N - n0);

  // Stage this block's scales/offsets: one coalesced copy of a contiguous run.
  const int64_t first = static_cast<int64_t>(n0) * G;
  for (int i = threadIdx.x; i < rows * G * P; i += blockDim.x) s_scales[i] = scales[first * P + i];
  if (offset != nullptr) {
    for (int i = threadIdx.x; i < rows * G; i += blockDim.x) s_offset[i] = offset[first + i];
  }
  __syncthreads();
  if (warp >= rows) return;  // only after the barrier: every thread helped to stage

  const int n = n0 + warp;
  const uint8_t* q[P];
#pragma unroll
  for (int p = 0; p < P; ++p) q[p] = qweight + (static_cast<int64_t>(p) * N + n) * KB;
  const __half* row_scales = s_scales + warp * G * P;
  const __half* row_offset = s_offset + warp * G;

  float acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = 0.f;

  // KB % VEC == 0 (the launcher picks VEC so), so no chunk runs past the row.
  using Chunk = PlaneChunk<VEC>;
  for (int b0 = lane * VEC; b0 < KB; b0 += kWarp * VEC) {
    Chunk c[P];
#pragma unroll
    for (int p = 0; p < P; ++p) c[p] = load_chunk<VEC>(q[p] + b0);
#pragma unroll
    for (int w = 0; w < Chunk::kWords; ++w) {
      uint32_t wp[P];
#pragma unroll
      for (int p = 0; p < P; ++p) wp[p] = c[p].word[w];
      // Not unrolled: a word's bytes are peeled off by shifting, so the body exists
      // once per word (rows x 8 bits of code), keeping the kernel small.
#pragma unroll 1
      for (int i = 0; i < Chunk::kBytesPerWord; ++i) {
        const int k = (b0 + w * Chunk::kBytesPerWord + i) * 8;
        if (k >= K) break;  // only padding bytes are left in this row
        const int grp = k / group_size;
        float a[P];
#pragma unroll
        for (int p = 0; p < P; ++p) a[p] = __half2float(row_scales[grp * P + p]);
        const float beta = offset != nullptr ? __half2float(row_offset[grp]) : 0.f;
#pragma unroll
        for (int m = 0; m < kMaxRows; ++m) {
          if (m >= M) break;
          float xv[8];
          load_x8(x + m * ldx + k, x_vec, K - k, xv);
          float sp[P], xs = 0.f;
#pragma unroll
          for (int p = 0; p < P; ++p) sp[p] = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int p = 0; p < P; ++p) sp[p] += (wp[p] >> j) & 1u ? xv[j] : 0.f;
            xs += xv[j];
          }
          float part = a[0] * sp[0];
#pragma unroll
          for (int p = 1; p < P; ++p) part += a[p] * sp[p];
          acc[m] += part + beta * xs;
        }
#pragma unroll
        for (int p = 0; p < P; ++p) wp[p] >>= 8;
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (lane == 0) {
      if (bias != nullptr) v += to_float(bias[n]);
      y[static_cast<int64_t>(m) * N + n] = from_float<T>(v);
    }
  }
}

bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T, int VEC, int P>
cudaError_t launch_vec(const T* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* qweight,
                       const __half* scales, const __half* offset, const T* bias, T* y,
                       int64_t N, int64_t G, int64_t KB, int64_t group_size, bool x_vec,
                       cudaStream_t stream) {
  const dim3 block(kWarpsPerBlock * kWarp);
  const dim3 grid(static_cast<unsigned int>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const size_t smem = dbgemv_smem_bytes(G, offset != nullptr, P);
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int rows = static_cast<int>(M - m0 < kMaxRows ? M - m0 : kMaxRows);
    dbgemv_kernel<T, VEC, P><<<grid, block, smem, stream>>>(
        x + m0 * ldx, ldx, rows, static_cast<int>(K), qweight, scales, offset, bias,
        y + m0 * N, static_cast<int>(N), static_cast<int>(G), static_cast<int>(KB),
        static_cast<int>(group_size), x_vec);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, int P>
cudaError_t launch_typed(const void* x, int64_t ldx, int64_t M, int64_t K,
                         const uint8_t* qweight, const void* scales, const void* offset,
                         const void* bias, void* y, int64_t N, int64_t G, int64_t KB,
                         int64_t group_size, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  const auto* st = static_cast<const __half*>(scales);
  const auto* ot = static_cast<const __half*>(offset);
  const T* bt = static_cast<const T*>(bias);
  T* yt = static_cast<T*>(y);
  // Vector loads of x need every row's start 16-byte aligned: K % 8 == 0 makes each
  // 8-channel chunk start on a multiple of 8 elements, and so must the row stride.
  const bool x_vec = K % 8 == 0 && ldx % 8 == 0 && aligned(x, 16);
  // Widest plane load that every row start (n * KB bytes past the base) allows.
  if (KB % 16 == 0 && aligned(qweight, 16))
    return launch_vec<T, 16, P>(xt, ldx, M, K, qweight, st, ot, bt, yt, N, G, KB, group_size,
                                x_vec, stream);
  if (KB % 8 == 0 && aligned(qweight, 8))
    return launch_vec<T, 8, P>(xt, ldx, M, K, qweight, st, ot, bt, yt, N, G, KB, group_size,
                               x_vec, stream);
  if (KB % 4 == 0 && aligned(qweight, 4))
    return launch_vec<T, 4, P>(xt, ldx, M, K, qweight, st, ot, bt, yt, N, G, KB, group_size,
                               x_vec, stream);
  return launch_vec<T, 1, P>(xt, ldx, M, K, qweight, st, ot, bt, yt, N, G, KB, group_size, x_vec,
                             stream);
}

// The plane count is a template parameter (the per-byte sums live in registers).
template <typename T>
cudaError_t launch_planes(int64_t planes, const void* x, int64_t ldx, int64_t M, int64_t K,
                          const uint8_t* qweight, const void* scales, const void* offset,
                          const void* bias, void* y, int64_t N, int64_t G, int64_t KB,
                          int64_t group_size, cudaStream_t stream) {
  switch (planes) {
    case 1: return launch_typed<T, 1>(x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB, group_size, stream);
    case 2: return launch_typed<T, 2>(x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB, group_size, stream);
    case 3: return launch_typed<T, 3>(x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB, group_size, stream);
    case 4: return launch_typed<T, 4>(x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB, group_size, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t dbgemv_launch(DType dtype, const void* x, int64_t ldx, int64_t M, int64_t K,
                          const uint8_t* qweight, const void* scales, const void* offset,
                          const void* bias, void* y, int64_t N, int64_t group_size,
                          int64_t planes, cudaStream_t stream) {
  if (M < 0 || K < 1 || N < 1 || ldx < K || group_size < 8 || group_size % 8 != 0 ||
      planes < 1 || planes > kMaxPlanes ||
      N > (int64_t(1) << 31) - 1 || K > (int64_t(1) << 30)) {
    return cudaErrorInvalidValue;
  }
  const int64_t G = (K + group_size - 1) / group_size;
  const int64_t KB = G * group_size / 8;
  if (dbgemv_smem_bytes(G, offset != nullptr, planes) > kMaxSharedBytes) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return launch_planes<float>(planes, x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB,
                                  group_size, stream);
    case DType::kFloat16:
      return launch_planes<__half>(planes, x, ldx, M, K, qweight, scales, offset, bias, y, N, G, KB,
                                   group_size, stream);
    case DType::kBFloat16:
      return launch_planes<__nv_bfloat16>(planes, x, ldx, M, K, qweight, scales, offset, bias, y, N,
                                          G, KB, group_size, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dbquant
