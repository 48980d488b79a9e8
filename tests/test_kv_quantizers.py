"""KV quantizers (dbquant/runtime/kv/quantizers.py): packing round trips, exact agreement with the loop
oracles of dbquant/runtime/kv/reference.py, error bounds, and the bytes the packed dicts really hold."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbquant.errors import DbquantError
from dbquant.runtime.kv import quantizers as Q
from dbquant.runtime.kv import reference as R
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG, FP32_ULP

G = 32


def data(*shape, seed=0, spread=True):
    """Deterministic test states: Gaussian with per-channel scales from 0.1 to 5 (keys-like outliers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.linspace(0.1, 5, shape[-1]) if spread else x


def rel_err(y, x):
    return ((y - x).square().sum() / x.square().sum()).item()


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [8, 40, 96])
def test_pack_bits_round_trip_and_size(bits, n):
    codes = torch.randint(0, 2 ** bits, (3, 5, n), dtype=torch.uint8)
    packed = Q.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, n * bits // 8)
    assert torch.equal(Q.unpack_bits(packed, bits), codes)


def test_pack_bits_order_is_lsb_first():
    # element i of a byte sits at bits (i % 4) * 2: codes 1, 2, 3, 0 -> 0b00_11_10_01
    assert Q.pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).item() == 0b00111001
    assert Q.pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).item() == 0b10000001


def test_pack_bits_refuses_partial_bytes():
    with pytest.raises(DbquantError, match="whole bytes"):
        Q.pack_bits(torch.zeros(7, dtype=torch.uint8), 2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 83), seed=st.integers(0, 2 ** 16))
def test_pack_trits_round_trip_odd_lengths(n, seed):
    t = torch.randint(-1, 2, (2, n), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    packed = Q.pack_trits(t)
    assert packed.dtype == torch.uint8 and packed.shape == (2, math.ceil(n / 5))  # 1.6 bits per trit
    assert torch.equal(Q.unpack_trits(packed, n), t)


def test_pack_trits_worked_example():
    # base 3, digit 0 first, digit = code + 1: (-1, 0, 1, 1, 0) -> 0 + 1*3 + 2*9 + 2*27 + 1*81 = 156
    assert Q.pack_trits(torch.tensor([-1, 0, 1, 1, 0])).item() == 156


def test_rfft_real_is_invertible_and_keeps_n_values():
    x = data(4, 7, 48)
    y = Q.rfft_real(x)
    assert y.shape == x.shape  # n real channels -> exactly n real coefficients (not 2n: the authors' bug)
    assert torch.allclose(Q.irfft_real(y), x, atol=FP32_REORDER)
    # orthonormal: the energy of the stored coefficients (non-edge ones counted twice) equals the input's
    n = x.shape[-1]
    w = torch.ones(n)
    w[1:n // 2] = 2
    w[n // 2 + 1:] = 2
    assert torch.allclose((y.square() * w).sum(-1), x.square().sum(-1), rtol=FP32_REORDER_LONG)


# ---------------------------------------------------------------- against the loop oracles

def test_asym2_matches_reference():
    x = data(G, 16, seed=1)
    y = Q.dequantize_asym2(Q.quantize_asym2(x))
    assert torch.allclose(y, R.asym2_ref(x), atol=FP32_ULP)


def test_sign1_is_signed_and_matches_reference():
    x = data(G, 16, seed=2)
    q = Q.quantize_sign1(x)
    y = Q.dequantize_sign1(q)
    assert torch.allclose(y, R.sign1_ref(x), atol=FP32_ULP)
    a = q["scale"].float()
    # levels are exactly {-a, +a} per channel, never {0, a}; the sign is the input's
    assert torch.equal(y.abs(), a.expand_as(y)) and torch.equal(y >= 0, x >= 0)


@pytest.mark.parametrize("fit", [True, False])
def test_ternary_is_scaled_and_matches_reference(fit):
    x = data(G, 16, seed=3)
    q = Q.quantize_ternary(x, fit=fit)
    y = Q.dequantize_ternary(q, G)
    assert torch.allclose(y, R.ternary_ref(x, fit=fit), atol=FP32_ULP)
    s = q["scale"].float()
    levels = torch.stack([-s, torch.zeros_like(s), s])  # [3, C]
    assert all(set(y[:, j].tolist()) <= set(levels[:, j].tolist()) for j in range(16))
    assert (y != 0).any() and not torch.equal(y, torch.sign(y))  # the scale is applied (authors' bug avoided)


def test_fitted_ternary_scale_is_never_worse():
    x = data(2, 3, G, 64, seed=4)
    e_fit = rel_err(Q.dequantize_ternary(Q.quantize_ternary(x, fit=True), G), x)
    e_mean = rel_err(Q.dequantize_ternary(Q.quantize_ternary(x, fit=False), G), x)
    assert e_fit <= e_mean


@pytest.mark.parametrize("key_bits", [1.0, 1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("fft", [True, False])
def test_keys_mixed_matches_reference(key_bits, fft):
    c = 32
    x = data(G, c, seed=5)
    n = Q.n_anomalous(key_bits, c)
    y = Q.dequantize_keys_mixed(Q.quantize_keys_mixed(x, n, fft), G, c, n, fft)
    assert torch.allclose(y, R.keys_mixed_ref(x, n, fft), atol=FP32_REORDER_LONG)


def test_keys_mixed_picks_the_widest_channels():
    x = data(G, 16, seed=6, spread=False)
    x[:, [3, 11]] *= 50  # two anomalous channels
    q = Q.quantize_keys_mixed(x, 2)
    assert Q.unpack_bits(q["mask"], 1).nonzero().flatten().tolist() == [3, 11]


# ---------------------------------------------------------------- error bounds and bits

# tolerances by format, one place: relative squared error on spread Gaussian groups
ERROR_BOUNDS = {"asym2": 0.2, "ternary": 0.25, "K1.5": 0.25, "K1": 0.4}


def test_round_trip_error_bounds_and_effective_bits():
    x = data(2, 3, 4, G, 64, seed=7)  # [B, H, n_groups, G, D]
    n = x.numel()
    cases = {
        "asym2": (Q.quantize_asym2(x), lambda q: Q.dequantize_asym2(q), 2 + 32 / G),
        "ternary": (Q.quantize_ternary(x), lambda q: Q.dequantize_ternary(q, G), 8 * math.ceil(G * 64 / 5) / (G * 64)
                    + 16 / G),
        "K1.5": (Q.quantize_keys_mixed(x, 32), lambda q: Q.dequantize_keys_mixed(q, G, 64, 32),
                 0.5 * (2 + 32 / G) + 0.5 * (1 + 16 / G) + 1 / G),
        "K1": (Q.quantize_keys_mixed(x, 0), lambda q: Q.dequantize_keys_mixed(q, G, 64, 0), 1 + 16 / G),
    }
    for name, (q, deq, bits) in cases.items():
        assert rel_err(deq(q), x) < ERROR_BOUNDS[name], name
        assert Q.effective_bits(q, n) == pytest.approx(bits), name  # codes + every scale/min/mask
        assert all(t.dtype in (torch.uint8, torch.float16) for t in q.values()), name


def test_more_key_bits_less_error():
    x = data(2, 3, 4, G, 64, seed=8)
    errs = [rel_err(Q.dequantize_keys_mixed(Q.quantize_keys_mixed(x, Q.n_anomalous(b, 64)), G, 64,
                                            Q.n_anomalous(b, 64)), x) for b in (1.0, 1.25, 1.5, 1.75, 2.0)]
    assert errs == sorted(errs, reverse=True)


def test_fp8_scales_halve_the_scale_bytes():
    x = data(2, 3, 4, G, 64, seed=9)
    q16, q8 = Q.quantize_ternary(x), Q.quantize_ternary(x, "fp8")
    assert q8["scale"].dtype == torch.float8_e4m3fn and q8["scale_f"].shape[-1] == 1
    assert Q.packed_nbytes(q8) < Q.packed_nbytes(q16)
    # the e4m3 mantissa costs a little accuracy, not the method
    e16 = rel_err(Q.dequantize_ternary(q16, G), x)
    assert rel_err(Q.dequantize_ternary(q8, G), x) < e16 * 1.1


def test_constant_and_zero_groups_are_exact():
    x = torch.zeros(G, 8)
    x[:, 2] = 3.0
    assert torch.equal(Q.dequantize_asym2(Q.quantize_asym2(x)), x)
    assert torch.equal(Q.dequantize_sign1(Q.quantize_sign1(x)), x)  # all-zero channel: scale 0; constant 3: +3
    assert torch.equal(Q.dequantize_ternary(Q.quantize_ternary(x), G), x)


def test_unknown_scale_dtype_is_refused():
    with pytest.raises(DbquantError, match="scale dtype"):
        Q.quantize_ternary(torch.randn(G, 8), "int4")


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)

@pytest.mark.parametrize("scale_dtype", ["fp16", "fp8"])
def test_triton_dequant_kernels_match_pytorch(scale_dtype):
    pytest.importorskip("triton")
    from dbquant.backends import triton as _triton
    from dbquant.runtime.kv import triton_dequant as T

    # The interpreter (TRITON_INTERPRET=1, conftest) runs on CPU tensors; compiled kernels on a GPU.
    dev = "cpu" if _triton.interpreted() else "cuda"
    x = data(2, 3, 2, G, 24, seed=10)  # C = 24: not a power of two
    qt, qa, qs = (Q.quantize_ternary(x, scale_dtype), Q.quantize_asym2(x, scale_dtype),
                  Q.quantize_sign1(x, scale_dtype))

    def on(q):
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in q.items()}

    assert torch.allclose(T.dequantize_ternary(on(qt), G).cpu(), Q.dequantize_ternary(qt, G), atol=FP32_ULP, rtol=0)
    # FMA on GPUs
    assert torch.allclose(T.dequantize_asym2(on(qa)).cpu(), Q.dequantize_asym2(qa), atol=FP32_REORDER,
                          rtol=FP32_ULP)
    assert torch.allclose(T.dequantize_sign1(on(qs)).cpu(), Q.dequantize_sign1(qs), atol=FP32_ULP, rtol=0)


def test_hadamard_is_orthonormal_and_stp_refinement_lowers_protected_error_only():
    """STP keeps every token's ternary code and adds, for protected tokens, one sign bit per value of
    the residual over the Hadamard-rotated head dim (one scale per token and head). Unprotected
    tokens decode bit for bit as without STP; protected ones lose well over half their error,
    also with an outlier channel 20x the others."""
    from dbquant.runtime.kv.codecs import VidKVCodec
    from dbquant.runtime.kv.spec import parse_kv

    h = Q.hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=FP32_ULP) and Q.hadamard(48) is None
    codec = VidKVCodec(parse_kv("1.5/1.58"), 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 64, 64, generator=g)
    x[..., 5] *= 20
    prot = torch.zeros(1, 64, dtype=torch.bool)
    prot[0, ::4] = True
    plain = codec.dequantize_values(codec.quantize_values(x, None))
    stp = codec.dequantize_values(codec.quantize_values(x, prot))
    assert torch.equal(stp[:, :, ~prot[0]], plain[:, :, ~prot[0]])

    def err(y):  # relative error per protected token, [3 heads x 16 tokens]
        return ((y - x)[:, :, prot[0]].square().sum(-1) / x[:, :, prot[0]].square().sum(-1)).flatten()

    assert (err(stp) < err(plain)).all()  # the least-squares scale never adds error
    assert err(stp).sum() < 0.5 * err(plain).sum()
    codec.rot = None
    unrotated = codec.dequantize_values(codec.quantize_values(x, prot))
    assert err(stp).sum() < err(unrotated).sum()  # rotation spreads the outlier's residual over D
