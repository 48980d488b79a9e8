"""The decode step's float-cache attention kernel (decode_ops_impl.h: attend_one_token) on its own,
through torch.ops.dbquant.attend_cpu, against softmax(q k^T) v written out here, on every ISA path this
CPU has. The shapes reach what the step's tests (11 positions, small heads) do not: full and partial
blocks of W key rows (W = 16 on AVX-512, 8 on AVX2) and head widths with a partial last vector, the
widest unrolled width (16 vectors) and one beyond it (the runtime-width loops)."""

from __future__ import annotations

import pytest
import torch

from dbquant.backends import registry
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
