"""Triton kernels for the dual-binary GEMM ``y = x @ W.T (+ bias)``: kernels only.

The wrappers that check inputs, allocate, pick a kernel and launch are in
``dbquant/backends/triton.py``. Both kernels read the canonical packed format v2
(``dbquant/format/layout.py``, ``docs/FORMAT.md``) as it is stored, with no repacking,
for any plane count PLANES = k (1..4; a constexpr, so each k compiles its own kernel):

    qweight  uint8    [k, N, Kp/8]  plane p = b_{p+1}; bit j (LSB = 0) of byte i of a row
                                    is input channel 8*i + j
    scales   fp16/32  [N, G, k]     alpha_1..alpha_k of each group of g input channels
    offset   fp16/32  [N, G]        beta of each group (only when HAS_OFFSET)
    W[n, k] = sum_p alpha_{p+1}[n, k // g] * b_{p+1}[n, k] (+ beta[n, k // g])

with Kp = ceil(K / g) * g, G = Kp / g and g a multiple of 8, so every byte of a plane
lies inside one group. Channels k >= K (the padding) are never used: the activations
are loaded as 0 there, so whatever bits a file holds in the padding cannot leak in.

* :func:`dbgemm_gemm_kernel` (prefill, many rows): tiles [BLOCK_M, BLOCK_K] of x times
  [BLOCK_K, BLOCK_N] of W.T. The weight tile is dequantized in registers (fp32 math,
  rounded once to the activation dtype, as a dense fp16/bf16 weight would be) and fed
  to ``tl.dot`` with fp32 accumulation.
* :func:`dbgemv_splitk_kernel` (decode, few rows): each program owns BLOCK_N output
  rows of one activation row and one slice of K (split-K, so short-and-wide and
  narrow layers still fill the GPU). It never builds the weight: per plane byte it
  sums the activations whose bit is set and applies the group's scales to those sums.
* :func:`splitk_reduce_kernel`: sums the split-K partials, adds the bias, casts.

Autotune configurations for Ampere/Hopper are plain lists here (``GEMM_CONFIGS``,
``GEMV_CONFIGS``); the wrapper applies ``triton.autotune`` only on a real GPU (the
interpreter has no ``do_bench``) and launches one fixed large-block configuration
under ``TRITON_INTERPRET=1``, where big blocks are what keeps tests fast.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _gemm_config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# Prefill GEMM on Ampere (A100: 164 KiB shared memory per SM) and Hopper (H100: 228 KiB).
# BLOCK_K in {32, 64, 128}: these divide the usual group sizes (64, 128), so a K tile lies
# inside one group and needs one scale pair per column (the wrapper prunes configs whose
# BLOCK_K does not divide g when others do). Not yet tuned on a GPU.
GEMM_CONFIGS = [
    _gemm_config(16, 64, 64, 4, 4),
    _gemm_config(16, 128, 64, 4, 4),
    _gemm_config(32, 64, 64, 4, 4),
    _gemm_config(32, 128, 64, 4, 4),
    _gemm_config(64, 64, 64, 4, 4),
    _gemm_config(64, 128, 32, 4, 4),
    _gemm_config(64, 128, 64, 8, 3),
    _gemm_config(128, 64, 64, 4, 4),
    _gemm_config(128, 128, 32, 8, 3),
    _gemm_config(128, 128, 64, 8, 3),
    _gemm_config(128, 256, 64, 8, 3),
]

# Decode GEMV: memory bound, so the knobs are how many rows and bytes each program
# streams; few warps, since the per-program work is a short reduction.
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [
        (8, 256, 2, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3),
        (32, 512, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 2),
    ]
]


@triton.jit
def dbgemm_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, offset_ptr, bias_ptr, y_ptr,
    M, N, K, G, KB,
    stride_xm, stride_xk,
    M_BUCKET,  # unused by the code: the wrapper's power-of-2 bucket of M, an autotune key
    GROUP_SIZE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W.T (+ bias), W dequantized tile by tile in registers.

    Args:
        x_ptr: fp16/bf16/fp32 [M, K] with strides (stride_xm, stride_xk).
        qweight_ptr: uint8 [PLANES, N, KB] contiguous, KB = Kp / 8.
        scales_ptr: fp16/fp32 [N, G, PLANES] contiguous. offset_ptr: [N, G] (if HAS_OFFSET).
        bias_ptr: [N] (if HAS_BIAS). y_ptr: [M, N] contiguous, x's dtype.
        GROUP_SIZE: g. DOT_DTYPE: the dtype ``tl.dot`` sees (x's dtype on a GPU; the
            wrapper passes fp32 for bf16 under the interpreter, whose bf16 dot is wrong).
    Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    """
    # Grouped launch order: GROUP_M consecutive programs share a column block of W, so
    # the packed weight tiles they read are still in L2 for the next row block.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Every byte of a row is loaded once per k it holds (8 times per tile): the repeats
    # hit L1, and a [BLOCK_K, BLOCK_N] tile of bytes needs no reshape before tl.dot.
    q_cols = qweight_ptr + offs_n[None, :] * KB
    plane_stride = N * KB
    s_rows = scales_ptr + offs_n[None, :] * (PLANES * G)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # Activations beyond K load as 0: padded channels contribute nothing.
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)

        w_mask = k_mask[:, None] & n_mask[None, :]
        q_ptrs = q_cols + (offs_k[:, None] // 8)
        shift = (offs_k[:, None] % 8).to(tl.uint8)  # LSB first: channel 8*i + j is bit j
        # The tile lies inside one group when g is a multiple of BLOCK_K: one scale per plane
        # and column, [1, BLOCK_N]; otherwise one per element, [BLOCK_K, BLOCK_N] (the repeats
        # within a group hit L1).
        if GROUP_SIZE % BLOCK_K == 0:  # a constexpr test: only the taken branch is compiled
            grp = k0 // GROUP_SIZE
            s_mask = n_mask[None, :]
        else:
            grp = offs_k[:, None] // GROUP_SIZE
            s_mask = w_mask
        w = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for p in tl.static_range(PLANES):  # w = sum_p alpha_p * b_p, plane by plane
            b = ((tl.load(q_ptrs + p * plane_stride, mask=w_mask, other=0) >> shift) & 1).to(tl.float32)
            a = tl.load(s_rows + grp * PLANES + p, mask=s_mask, other=0.0).to(tl.float32)
            w += a * b
        if HAS_OFFSET:
            w += tl.load(offset_ptr + offs_n[None, :] * G + grp, mask=s_mask, other=0.0).to(tl.float32)
        # Round the dequantized weight once to the activation dtype (what a dense
        # fp16/bf16 weight would hold), then let tl.dot accumulate in fp32. "ieee" keeps
        # fp32 activations exact instead of TF32 (it does not affect fp16/bf16).
        w = w.to(x_ptr.dtype.element_ty)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def dbgemv_splitk_kernel(
    x_ptr, qweight_ptr, scales_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, G, KB,
    stride_xm, stride_xk,
    GROUP_SIZE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Decode GEMV: out = x[m] @ W.T for BLOCK_N rows of W and one K slice.

    Args:
        x_ptr: fp16/bf16/fp32 [M, K] with strides (stride_xm, stride_xk).
        qweight_ptr, scales_ptr, offset_ptr: as in :func:`dbgemm_gemm_kernel`.
        bias_ptr: [N] (if HAS_BIAS; added only when SPLIT_K == 1).
        out_ptr: SPLIT_K == 1: y [M, N] contiguous in x's dtype (bias added here);
            SPLIT_K > 1: fp32 partials [SPLIT_K, M, N], summed by
            :func:`splitk_reduce_kernel` (a fixed order, so results are deterministic,
            unlike atomics).
        BLOCK_K: a multiple of 8 (whole plane bytes).
    Grid: (cdiv(N, BLOCK_N), SPLIT_K, M).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    m = tl.program_id(2)
    BYTES: tl.constexpr = BLOCK_K // 8

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    bit = tl.arange(0, 8)
    # Slices are whole BLOCK_K tiles, so no tile straddles two slices.
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_s * k_per_split
    k_end = min(K, k_begin + k_per_split)

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_b = k0 // 8 + tl.arange(0, BYTES)  # plane byte index within a row
        offs_k = offs_b[:, None] * 8 + bit[None, :]  # [BYTES, 8]: channel of each bit
        x = tl.load(x_ptr + m * stride_xm + offs_k * stride_xk, mask=offs_k < K,
                    other=0.0).to(tl.float32)

        # The planes are read as [BLOCK_N, BYTES] tiles of whole bytes (each byte once,
        # consecutive bytes of a row adjacent in memory) and expanded to bits in registers.
        q_mask = n_mask[:, None] & (offs_b[None, :] < KB)
        q_ptrs = qweight_ptr + offs_n[:, None] * KB + offs_b[None, :]
        shift = bit[None, None, :].to(tl.uint8)
        s_rows = scales_ptr + offs_n * (PLANES * G)
        if GROUP_SIZE % BLOCK_K == 0:
            # The tile lies inside one group: reduce the bytes first, scale once per row.
            grp = k0 // GROUP_SIZE
            part = tl.zeros([BLOCK_N], dtype=tl.float32)
            for p in tl.static_range(PLANES):
                # Bits are {0, 1}: per byte, sum the activations whose bit is set; the scales
                # multiply these sums, not every weight.
                b = (tl.load(q_ptrs + p * N * KB, mask=q_mask, other=0)[:, :, None] >> shift) & 1
                sp = tl.sum(b.to(tl.float32) * x[None, :, :], axis=2)  # [BLOCK_N, BYTES]
                a = tl.load(s_rows + grp * PLANES + p, mask=n_mask, other=0.0).to(tl.float32)
                part += a * tl.sum(sp, axis=1)
            if HAS_OFFSET:
                beta = tl.load(offset_ptr + offs_n * G + grp, mask=n_mask, other=0.0).to(tl.float32)
                part += beta * tl.sum(tl.sum(x, axis=1), axis=0)
        else:
            # Several groups per tile: each byte looks up its own group (g is a
            # multiple of 8, so a byte never straddles two groups).
            grp = (offs_b * 8) // GROUP_SIZE
            contrib = tl.zeros([BLOCK_N, BYTES], dtype=tl.float32)
            for p in tl.static_range(PLANES):
                b = (tl.load(q_ptrs + p * N * KB, mask=q_mask, other=0)[:, :, None] >> shift) & 1
                sp = tl.sum(b.to(tl.float32) * x[None, :, :], axis=2)
                a = tl.load(s_rows[:, None] + grp[None, :] * PLANES + p, mask=q_mask, other=0.0).to(tl.float32)
                contrib += a * sp
            if HAS_OFFSET:
                beta = tl.load(offset_ptr + offs_n[:, None] * G + grp[None, :], mask=q_mask,
                           other=0.0).to(tl.float32)
                contrib += beta * tl.sum(x, axis=1)[None, :]
            part = tl.sum(contrib, axis=1)
        acc += part

    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * N + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(out_ptr + (pid_s * M + m) * N + offs_n, acc, mask=n_mask)


@triton.jit
def splitk_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, SPLIT_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[M, N] = sum_s part[s] (+ bias), cast to y's dtype.

    Args:
        part_ptr: fp32 [SPLIT_K, M, N] contiguous. bias_ptr: [N] (if HAS_BIAS).
        y_ptr: [M, N] contiguous (fp16/bf16/fp32).
    Grid: (cdiv(M * N, BLOCK),).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
