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


# (query heads, kv heads, head dim): SmolLM2's 9/3/64, MHA, head widths 8, 24 (16 + 8), 80, 128, 256
# (16 AVX-512 vectors: the widest unrolled) and 264 (beyond: the runtime-width loops on every path).
HEADS = [(9, 3, 64), (4, 4, 24), (6, 2, 8), (2, 1, 80), (8, 2, 128), (2, 1, 256), (3, 3, 264)]


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


def test_attend_refuses_bad_input():
    q, k, v = _case(4, 2, 16, 8, seed=0)
    with pytest.raises(RuntimeError, match="Hq a multiple of Hk"):
        torch.ops.dbquant.attend_cpu(q[:3], k, v, 4, 0.25)
    with pytest.raises(RuntimeError, match="n must be in 1..8"):
        torch.ops.dbquant.attend_cpu(q, k, v, 9, 0.25)
    with pytest.raises(RuntimeError, match="n must be in 1..8"):
        torch.ops.dbquant.attend_cpu(q, k, v, 0, 0.25)
