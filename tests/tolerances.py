"""Numerical tolerances of the test suite, in one place, each with the reason for its value.

A tolerance is named for what makes two results differ: the same math evaluated in another
order (fp32 rounding), a value stored in a narrower type (fp16/bf16/int8), or a training
run whose gradients were summed in another order. Pick the constant whose cause matches
the comparison; a comparison that needs a looser value than its cause explains is a bug
to look at, not a constant to widen. Quality bounds (SQNR floors, PPL ceilings, error
ratios between methods) are not tolerances and stay next to their tests.

fp32: unit roundoff u = 2^-24 = 6e-8 (relative), so one rounding of a value of magnitude
<= 8 moves it by at most 9.5e-7. fp16: 2^-11 = 4.9e-4 relative. bf16: 2^-8 = 3.9e-3.
"""

import torch

# One fp32 rounding apart: the same formula on the same fp16-rounded scales in two code paths
# (vectorised vs loop oracle, Triton vs torch); values of magnitude <= 8 have an ulp <= 9.5e-7.
FP32_ULP = 1e-6

# fp32 sums of up to ~100 O(1) terms taken in another order (batched vs one-sample forward,
# HF's loss mean vs ours, a GPU's fused multiply-add, a level a1*b1 + a2*b2 + beta of |terms| <= 10).
FP32_REORDER = 1e-5

# Longer or chained fp32 reorderings: a K-term dot product in the AVX2/AVX-512 kernels' summation
# order (K up to ~1000), an FFT and its inverse around a quantizer on keys up to ~20, Parseval's sum.
FP32_REORDER_LONG = 1e-4

# Adam steps on a gradient accumulated over micro-batches (or 2 DDP ranks) vs the whole batch:
# reassociation costs ~1e-7 relative per step, which Adam's normalisation can amplify a little.
ACCUMULATED_GRAD_RTOL = 1e-4
ACCUMULATED_GRAD_ATOL = 1e-6

# Weights rebuilt from scales stored in fp16 (2^-11 relative each; a level adds two), or two
# reruns of a calibration whose fp16 scales land an ulp apart: relative to the largest weight.
FP16_SCALE = 1e-3

# The decoder's float16 KV cache (FastDecoder's default where its step is native): each key and value
# rounded once to 2^-11 relative. Two paths that compute the same key in another fp32 order can land
# on neighbouring float16 values (one ulp apart, 2^-10 relative at most), and attention over such a
# cache moves the outputs by about that much of their scale.
FP16_CACHE = 2e-3

# Per-dtype relative error ||y - ref|| / ||ref|| of a dual-binary GEMM: fp32 is exact up to
# summation order; fp16/bf16 round the dequantized weight once (2^-11 / 2^-8) and the output once.
KERNEL_REL_ERR = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}

# A bf16 LM head: each weight rounded to 2^-8 relative, over a 64-term dot product of mixed signs,
# so a logit moves by a few percent of the largest logit.
BF16_LM_HEAD = 0.05

# An int8 LM head (per-row scale, step 1/127 of the row's largest weight; W8A8 adds int8
# activations per block of 32): logits move by ~1% of the largest logit.
INT8_LM_HEAD = 0.02

# Float64 recomputation in the test of a float64 value the code derived in another order
# (e.g. flops / seconds vs flops / (ms * 1e-3)): a few ulps of 2^-53.
FLOAT64_RECOMPUTE = 1e-9

# The int8 prefill GEMM (csrc/cpu/gemm_a8.h) rounds activations to 8 bits per row and weight group
# (a zero point): each channel moves by up to (max - min) / 510 of its group, ~0.5% relative on
# Gaussian rows, and a decoder layer compounds a few of them.
INT8_ACT_REL_ERR = 3e-2
