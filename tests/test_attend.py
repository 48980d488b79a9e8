"""The decode step's float-cache attention kernel (decode_ops_impl.h: attend_one_token) on its own,
through torch.ops.dbquant.attend_cpu, against softmax(q k^T) v written out here, on every ISA path this
CPU has; and the prefill's causal attention (attend_causal_cpu: the same kernel per query) against
attend_causal_ref. The shapes reach what the step's tests (11 positions, small heads) do not: full and partial
blocks of W key rows (W = 16 on AVX-512, 8 on AVX2) and head widths with a partial last vector, the
widest unrolled width (16 vectors) and one beyond it (the runtime-width loops)."""

from __future__ import annotations

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import registry
from dbquant.backends.checks import KernelInputError
from dbquant.backends.reference import attend_causal_ref
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG

pytestmark = pytest.mark.skipif(not registry.available("cpu"), reason="dbquant._C is not built")


def attend_ref(q, k, v, n, scale, softcap=0.0):
    """q [Hq, D], k / v [Hk, L, D] -> [Hq, D]: each query head attends to rows 0..n-1 of its kv head."""
    group = q.shape[0] // k.shape[0]
    kk, vv = k[:, :n].repeat_interleave(group, 0), v[:, :n].repeat_interleave(group, 0)  # [Hq, n, D]
    s = torch.einsum("hd,hnd->hn", q.double(), kk.double()) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    return torch.einsum("hn,hnd->hd", s.softmax(-1), vv.double()).float()


def _case(hq, hk, d, L, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(hq, d, generator=gen), torch.randn(hk, L, d, generator=gen),
               torch.randn(hk, L, d, generator=gen))
    return q, k, v


# (query heads, kv heads, head dim): SmolLM2's 9/3/64, MHA, head widths 8, 12 and 36 (a partial last vector
# on AVX2 too: 8 + 4, 4 x 8 + 4), 24 (16 + 8), 80, 128, 256 (16 AVX-512 vectors: the widest unrolled) and 264
# (beyond: the runtime-width loops on every path).
HEADS = [(9, 3, 64), (4, 4, 24), (6, 2, 8), (3, 1, 12), (2, 2, 36), (2, 1, 80), (8, 2, 128), (2, 1, 256),
         (3, 3, 264)]


@pytest.mark.parametrize("hq,hk,d", HEADS)
@pytest.mark.parametrize("n", [1, 7, 8, 16, 17, 33, 70])
def test_attend_matches_the_definition_on_every_isa(hq, hk, d, n):
    q, k, v = _case(hq, hk, d, 72, seed=hq * 1000 + d + n)
    scale = d ** -0.5
    ref = attend_ref(q, k, v, n, scale)
    for isa in torch.ops.dbquant.cpu_isas():
        got = torch.ops.dbquant.attend_cpu(q, k, v, n, scale, 0.0, isa)
        torch.testing.assert_close(got, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER, msg=f"isa={isa}")


@pytest.mark.parametrize("d", [64, 264])
def test_attend_softcap_and_rows_past_n_unread(d):
    """Gemma-2's logit softcap on both paths; rows n.. of the cache hold NaN and must not be read."""
    q, k, v = _case(4, 2, d, 40, seed=d)
    q = q * 4  # scores large enough for the cap to matter
    k[:, 29:], v[:, 29:] = float("nan"), float("nan")
    ref = attend_ref(q, k, v, 29, d ** -0.5, softcap=5.0)
    assert not torch.allclose(ref, attend_ref(q, k, v, 29, d ** -0.5))
    for isa in torch.ops.dbquant.cpu_isas():
        got = torch.ops.dbquant.attend_cpu(q, k, v, 29, d ** -0.5, 5.0, isa)
        torch.testing.assert_close(got, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER, msg=f"isa={isa}")


@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (10, 2, 64), (14, 2, 24), (16, 2, 80), (8, 1, 264)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 16, 33, 70])
def test_grouped_heads_are_each_head_alone_bit_for_bit(hq, hk, d, dtype, n):
    """The query heads of one kv head are done together (grouped-query attention: groups of 3, 5, 7 and 8
    here), yet each head's output is, bit for bit, what that head gives attending alone (a group of one):
    nothing one head computes depends on its neighbours, on any ISA path, float32 or float16 cache."""
    q, k, v = _case(hq, hk, d, 72, seed=hq * 100 + d + n)
    k, v = k.to(dtype), v.to(dtype)
    group = hq // hk
    for isa in torch.ops.dbquant.cpu_isas():
        got = torch.ops.dbquant.attend_cpu(q, k, v, n, d ** -0.5, 0.0, isa)
        for h in range(hq):
            j = h // group
            alone = torch.ops.dbquant.attend_cpu(q[h:h + 1].contiguous(), k[j:j + 1].contiguous(),
                                                 v[j:j + 1].contiguous(), n, d ** -0.5, 0.0, isa)
            assert torch.equal(got[h], alone[0]), f"isa={isa} head {h}: {(got[h] - alone[0]).abs().max().item()}"


@pytest.mark.parametrize("hq,hk,d", HEADS)
@pytest.mark.parametrize("n", [1, 17, 70])
def test_attend_float16_cache_is_its_widened_copy_on_every_isa(hq, hk, d, n):
    """A float16 cache (the decoder's default) gives, bit for bit, what the same kernel gives on its rows
    widened to float32 by torch: each path widens the rows exactly as it reads them (vcvtph2ps on AVX2 and
    AVX-512, its own conversion on the portable path), partial last vectors included. The first kv head's
    values are all float16 subnormals, so its heads' outputs are made of them and any error in their
    widening shows; the others hold signed zeros and float16's largest magnitudes."""
    q, k, v = _case(hq, hk, d, 72, seed=hq * 1000 + d + n + 1)
    gen = torch.Generator().manual_seed(n)
    k16, v16 = k.half(), v.half()
    tiny = torch.randint(1, 1024, (72, d), generator=gen) * (torch.randint(0, 2, (72, d), generator=gen) * 2 - 1)
    v16[0] = (tiny * 2.0 ** -24).half()  # subnormals: m 2^-24, m < 2^10
    assert (v16[0].float().abs() < 2.0 ** -14).all() and torch.equal(v16[0].float(), tiny * 2.0 ** -24)
    if hk > 1:
        v16[1, :, :3] = torch.tensor([-0.0, 65504.0, -65504.0], dtype=torch.float16)
        k16[1, :, 0] = -0.0
    for isa in torch.ops.dbquant.cpu_isas():
        got = torch.ops.dbquant.attend_cpu(q, k16, v16, n, d ** -0.5, 0.0, isa)
        want = torch.ops.dbquant.attend_cpu(q, k16.float(), v16.float(), n, d ** -0.5, 0.0, isa)
        assert torch.equal(got, want), f"isa={isa}: {(got - want).abs().max().item()}"
        assert (got[:hq // hk] != 0).any()  # the subnormal head's outputs are not flushed to zero
    with pytest.raises(RuntimeError, match="v_cache must be Half, got Float"):
        torch.ops.dbquant.attend_cpu(q, k16, v, n, d ** -0.5)


def test_attend_refuses_bad_input():
    q, k, v = _case(4, 2, 16, 8, seed=0)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hk"):
        torch.ops.dbquant.attend_cpu(q[:3], k, v, 4, 0.25)
    with pytest.raises(RuntimeError, match="n must be in 1..8"):
        torch.ops.dbquant.attend_cpu(q, k, v, 9, 0.25)
    with pytest.raises(RuntimeError, match="n must be in 1..8"):
        torch.ops.dbquant.attend_cpu(q, k, v, 0, 0.25)


def _chunk(b, hq, hk, d, t, pos, seed, dtype=torch.float32):
    """A prompt chunk as the decoder holds it: q a view [B, Hq, T, D] of the rotated q and k heads
    [B, Hq + Hk, T, D]; caches [B, Hk, L, D] holding rows 0..pos+T-1 and NaN after them (never read)."""
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, hq + hk, t, d, generator=gen)
    L = pos + t + 3
    k, v = torch.randn(b, hk, L, d, generator=gen), torch.randn(b, hk, L, d, generator=gen)
    k[:, :, pos:pos + t] = qk[:, hq:]
    k[:, :, pos + t:], v[:, :, pos + t:] = float("nan"), float("nan")
    return qk[:, :hq], k.to(dtype), v.to(dtype)


# (B, Hq, Hk, D, T, pos, window, softcap): SmolLM2's heads over a 37-token prompt; a chunk after cached rows;
# a sliding window shorter than the chunk; Gemma-2's cap; MHA, a head width with a partial last vector, two
# sequences, one query, and a width beyond the unrolled kernels
CAUSAL = [(1, 9, 3, 64, 37, 0, 0, 0.0), (1, 9, 3, 64, 11, 20, 0, 0.0), (1, 4, 2, 24, 19, 5, 7, 0.0),
          (2, 4, 2, 36, 9, 3, 0, 5.0), (1, 3, 3, 8, 1, 12, 4, 0.0), (1, 2, 1, 264, 6, 2, 0, 0.0)]


@pytest.mark.parametrize("b,hq,hk,d,t,pos,window,softcap", CAUSAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attend_causal_matches_the_definition_on_every_isa(b, hq, hk, d, t, pos, window, softcap, dtype):
    q, k, v = _chunk(b, hq, hk, d, t, pos, seed=b + hq + d + t + pos, dtype=dtype)
    q = q * 3 if softcap else q  # scores large enough for the cap to matter
    ref = attend_causal_ref(q, k, v, pos, d ** -0.5, softcap, window)
    assert ref.shape == (b, t, hq, d) and not ref.isnan().any()
    for isa in torch.ops.dbquant.cpu_isas():
        got = torch.ops.dbquant.attend_causal_cpu(q, k, v, pos, d ** -0.5, softcap, window, isa)
        torch.testing.assert_close(got, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER, msg=f"isa={isa}")


def test_attend_causal_is_the_decode_steps_attention_per_query():
    """Each query's output is, bit for bit, what attend_cpu (the decode step's kernel) gives for that position
    alone: a prompt's attention and a decoded token's agree, on any thread count; q is read through its
    strides (a transposed view gives what its contiguous copy gives)."""
    q, k, v = _chunk(2, 9, 3, 64, 13, 6, seed=1, dtype=torch.float16)
    got = torch.ops.dbquant.attend_causal_cpu(q, k, v, 6, 0.125)
    for b in range(2):
        for t in range(13):
            one = torch.ops.dbquant.attend_cpu(q[b, :, t].contiguous(), k[b], v[b], 6 + t + 1, 0.125)
            assert torch.equal(got[b, t], one), (b, t)
    assert torch.equal(torch.ops.dbquant.attend_causal_cpu(q.contiguous(), k, v, 6, 0.125), got)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, T, D] with the heads innermost but D
    assert torch.equal(torch.ops.dbquant.attend_causal_cpu(qt, k, v, 6, 0.125), got)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.dbquant.attend_causal_cpu(q, k, v, 6, 0.125), got)
    finally:
        torch.set_num_threads(before)


def test_attend_causal_refuses_bad_input():
    q, k, v = _chunk(1, 4, 2, 16, 5, 2, seed=0)
    for op in (torch.ops.dbquant.attend_causal_cpu, cpu_backend.attend_causal_cpu):
        err = RuntimeError if op is torch.ops.dbquant.attend_causal_cpu else KernelInputError
        with pytest.raises(err, match="outside the cache"):
            op(q, k, v, 6, 0.25)  # rows 6..10 of 10
        with pytest.raises(err, match="outside the cache"):
            op(q, k, v, -1, 0.25)
        with pytest.raises(err, match="Hk dividing|Hq a multiple of Hk"):
            op(q[:, :3], k, v, 2, 0.25)
        with pytest.raises(err, match="window must be"):
            op(q, k, v, 2, 0.25, 0.0, -1)
        with pytest.raises(err, match="v_cache must be|v must be"):
            op(q, k, v.half(), 2, 0.25)
        with pytest.raises(err, match="q must be"):
            op(q.double(), k, v, 2, 0.25)
    with pytest.raises(RuntimeError, match="contiguous last dim"):
        torch.ops.dbquant.attend_causal_cpu(q.transpose(2, 3), k, v, 2, 0.25)  # D strided: the op refuses ...
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # ... the wrapper copies it
    want = attend_causal_ref(q, k, v, 2, 0.25)
    torch.testing.assert_close(cpu_backend.attend_causal_cpu(strided, k, v, 2, 0.25), want)
