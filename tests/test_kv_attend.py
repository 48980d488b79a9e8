"""Attention on the packed VidKV cache (registry op ``kv_attend``): the PyTorch oracle against
HF's reference cache (QuantKVLayer's dequantized states), and the C++ kernel against the oracle on
odd lengths (group boundaries, the residual window, the sink, 1/2/3 query heads per kv head)."""

import pytest
import torch

from dbquant.backends import registry
from dbquant.backends.checks import KernelInputError
from dbquant.backends.reference import kv_attend_ref
from dbquant.runtime.kv.cache import QuantKVLayer
from dbquant.runtime.kv.packed import PackedKVCache, fmat_of
from dbquant.runtime.kv.quantizers import irfft_real, rfft_real
from dbquant.runtime.kv.spec import parse_kv
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG

needs_cpu = pytest.mark.skipif(not registry.available("cpu", "kv_attend"), reason="C++ extension not built")


def _states(hk: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few large-range channels (what VidKV's 2-bit part is for) and a loud first
    token (a sink), values Gaussian: float32 [Hk, n, D] each."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(hk, n, d, generator=g)
    k[:, :, :: max(1, d // 6)] *= 6.0
    k[:, :1] *= 4.0
    return k, torch.randn(hk, n, d, generator=g)


def _filled(spec, hk, d, n, t, seed=0):
    """A one-layer PackedKVCache holding n tokens the decoder's way: the first n - t appended and
    flushed chunk by chunk, the last t appended (the queries' own tokens, not yet counted).
    Returns (cache, k, v)."""
    k, v = _states(hk, n, d, seed)
    c = PackedKVCache(spec, 1, hk, d, max_len=n + spec.group, chunk=spec.group)
    for s in range(0, n - t, spec.group):
        e = min(s + spec.group, n - t)
        c.append(k[:, s:e], v[:, s:e], 0)
        c.n_tail += e - s
        c.flush()
    c.append(k[:, n - t:], v[:, n - t:], 0)
    return c, k, v


def _plain_attention(q, keys, values, scale):
    """q [T, Hq, D] over keys/values [Hk, n, D], the last T rows being the queries' (causal)."""
    t, hq, _ = q.shape
    keys = keys.repeat_interleave(hq // keys.shape[0], 0)
    values = values.repeat_interleave(hq // values.shape[0], 0)
    n = keys.shape[1]
    s = torch.einsum("thd,hnd->thn", q, keys) * scale
    vis = torch.arange(n)[None] < (n - t + torch.arange(t) + 1)[:, None]
    return torch.einsum("thn,hnd->thd", s.masked_fill(~vis[:, None], float("-inf")).softmax(-1), values)


SPECS = [("1.5/1.58", {}), ("1/1.58", {}), ("2/1.58", {}), ("1.25/1.58", {"fft": False}),
         ("1.5/1.58", {"sink": 0}), ("1.5/1.58", {"sink": 3, "residual": 0}), ("1.75/1.58", {"residual": 5})]


@pytest.mark.parametrize("kv,opts", SPECS)
@pytest.mark.parametrize("n,t", [(3, 1), (16, 1), (17, 1), (45, 1), (61, 3), (80, 8)])
def test_oracle_equals_the_reference_cache(kv, opts, n, t):
    """kv_attend_ref on the kernel layout == plain attention over QuantKVLayer's states (the same
    codec, sink and residual handling), fed the same tokens in the same chunks."""
    spec = parse_kv(kv, group=8, **{"residual": 4, **opts})
    hk, d = 2, 16
    c, k, v = _filled(spec, hk, d, n, t)
    ref_layer = QuantKVLayer(spec, d)
    for s in range(0, n - t, spec.group):
        e = min(s + spec.group, n - t)
        ref_layer.update(k[None, :, s:e], v[None, :, s:e])
    assert c.n_groups * spec.group == ref_layer.n_packed  # the same tokens were packed
    keys, values = ref_layer.update(k[None, :, n - t:], v[None, :, n - t:])
    q = torch.randn(t, 2 * hk, d, generator=torch.Generator().manual_seed(1))
    got = kv_attend_ref(q, c.layers[0], c.n_groups, c.n_tail + t, d ** -0.5)
    want = _plain_attention(q, keys[0], values[0], d ** -0.5)
    torch.testing.assert_close(got, want, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG)


def _isas():
    return list(torch.ops.dbquant.cpu_isas()) if registry.available("cpu", "kv_attend") else []


@needs_cpu
@pytest.mark.parametrize("kv,opts", SPECS)
@pytest.mark.parametrize("gqa", [1, 2, 3])
@pytest.mark.parametrize("n,t", [(1, 1), (12, 1), (13, 1), (40, 1), (41, 1), (99, 1), (70, 5), (71, 8)])
def test_cpu_kernel_matches_the_oracle(kv, opts, gqa, n, t):
    """Group boundaries (n a multiple of G, one past it), a tail inside the residual window only
    (nothing packed), the sink, and a prefill chunk of t causal queries."""
    spec = parse_kv(kv, group=8, **{"residual": 4, **opts})
    hk, d = 3, 24
    c, _, _ = _filled(spec, hk, d, n, t, seed=n)
    q = torch.randn(t, gqa * hk, d, generator=torch.Generator().manual_seed(2)) * 2
    args = (q, c.layers[0], c.n_groups, c.n_tail + t, 0.3)
    want = kv_attend_ref(*args)
    for isa in ["auto"] + _isas():  # every path this CPU can run (AVX-512, AVX2, scalar; auto: SDPA above 4 queries)
        got = registry.get("kv_attend", "cpu")(*args, isa=isa)
        torch.testing.assert_close(got, want, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG,
                                   msg=lambda m, isa=isa: f"{isa}: {m}")


@needs_cpu
def test_cpu_kernel_long_context_group32():
    """The default group (32) and SmolLM2's head shape (D = 64, 9 query heads on 3 kv heads)."""
    spec = parse_kv("1.5/1.58")
    c, _, _ = _filled(spec, 3, 64, 1000, 1, seed=5)
    q = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    args = (q, c.layers[0], c.n_groups, c.n_tail + 1, 0.125)
    assert c.n_groups == (1000 - 1 - spec.residual) // 32
    torch.testing.assert_close(registry.get("kv_attend", "cpu")(*args), kv_attend_ref(*args),
                               rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG)


@pytest.mark.parametrize("n", [2, 8, 30])
def test_frequency_domain_query_is_parseval(n):
    """fmat @ q (the kernel's per-group query transform) equals q's rfft coefficients weighted by
    Parseval's multiplicities (1 for the DC and Nyquist terms, 2 for the rest, real and imaginary)."""
    q = torch.randn(n, generator=torch.Generator().manual_seed(n))
    w = torch.full((n,), 2.0)
    w[0] = w[n // 2] = 1.0
    spec = parse_kv("1.5/1.58")
    torch.testing.assert_close(fmat_of(spec, n) @ q, w * rfft_real(q), rtol=FP32_REORDER, atol=FP32_REORDER)
    y = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))  # and y @ fmat is the inverse transform
    torch.testing.assert_close(y @ fmat_of(spec, n), irfft_real(y), rtol=FP32_REORDER, atol=FP32_REORDER)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=needs_cpu)])
def test_bad_inputs_are_refused(backend):
    spec = parse_kv("1.5/1.58", group=8, residual=4)
    c, _, _ = _filled(spec, 2, 16, 20, 1)
    op = registry.get("kv_attend", backend)
    q = torch.zeros(1, 4, 16)
    with pytest.raises(KernelInputError, match=r"q must be \[T, Hq, 16\] with Hq a multiple of 2 kv heads"):
        op(torch.zeros(1, 3, 16), c.layers[0], c.n_groups, c.n_tail + 1, 1.0)
    with pytest.raises(KernelInputError, match=r"n_tail 99 must be an int in \[1, 20\]"):
        op(q, c.layers[0], c.n_groups, 99, 1.0)
    with pytest.raises(KernelInputError, match=r"q must be float32, got torch.float64"):
        op(q.double(), c.layers[0], c.n_groups, c.n_tail + 1, 1.0)
