"""The prefill's glue ops (csrc/cpu/binding.cpp: gated_act_cpu, rope_heads_cpu): the decode step's row loops
(decode_ops.h silu_mul / gelu_tanh_mul, rope_rows) over a prompt chunk's rows, against their torch
definitions (gated_act_ref, rope_heads_ref)."""

from __future__ import annotations

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import registry
from dbquant.backends.checks import KernelInputError
from dbquant.backends.reference import gated_act_ref, rope_heads_ref
from tests.tolerances import FP32_REORDER

pytestmark = pytest.mark.skipif(not registry.available("cpu"), reason="dbquant._C is not built")


# (rows, I): one row, rows not a multiple of a thread's share, and widths with a partial last vector on AVX2
# and AVX-512 (13, 21), SmolLM2's 1536
@pytest.mark.parametrize("m,inter", [(1, 13), (7, 21), (33, 1536), (5, 1)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_act_matches_the_definition(m, inter, act):
    gen = torch.Generator().manual_seed(m * 100 + inter)
    gu = torch.randn(m, 2 * inter, generator=gen) * 4  # gates into both tails of the activation
    gu[0, 0], gu[-1, inter - 1] = -100.0, 60.0  # exp's clamped ends: silu -> -0, gate * up
    want = gated_act_ref(gu, act)
    got = cpu_backend.gated_act_cpu(gu, act)
    assert got.shape == (m, inter)
    torch.testing.assert_close(got, want, rtol=FP32_REORDER, atol=FP32_REORDER)
    assert not torch.allclose(got, gated_act_ref(gu, "gelu_tanh" if act == "silu" else "silu"))  # act is honoured


def test_gated_act_refuses_bad_input():
    gu = torch.randn(3, 8)
    for op, err in ((torch.ops.dbquant.gated_act_cpu, RuntimeError), (cpu_backend.gated_act_cpu, KernelInputError)):
        with pytest.raises(err, match="act must be"):
            op(gu, "relu")
        with pytest.raises(err, match=r"\[M, 2I\]"):
            op(torch.randn(3, 7), "silu")
        with pytest.raises(err, match="float32"):
            op(gu.double(), "silu")


@pytest.mark.parametrize("b,t,h,d", [(1, 37, 12, 64), (2, 5, 3, 8), (1, 1, 2, 36), (1, 9, 4, 264)])
def test_rope_heads_matches_the_definition(b, t, h, d):
    """x is read through its strides (the q and k heads of the decoder's qkv rows as they lie): a view, its
    contiguous copy and a copy with other strides give the same bits."""
    gen = torch.Generator().manual_seed(b + t + h + d)
    qkv = torch.randn(b, t, h + 2, d, generator=gen)  # two more heads (the v heads) after the rotated ones
    x = qkv[:, :, :h]
    ang = torch.rand(t, d // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2, 1), torch.cat([ang.sin()] * 2, 1)
    want = rope_heads_ref(x, cos, sin)
    got = cpu_backend.rope_heads_cpu(x, cos, sin)
    assert got.shape == (b, h, t, d) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=FP32_REORDER, atol=FP32_REORDER)
    assert torch.equal(cpu_backend.rope_heads_cpu(x.contiguous(), cos, sin), got)
    assert torch.equal(cpu_backend.rope_heads_cpu(x.transpose(2, 3).contiguous().transpose(2, 3), cos, sin), got)


def test_rope_heads_refuses_bad_input():
    x, cs = torch.randn(1, 4, 2, 8), torch.randn(4, 8)
    for op, err in ((torch.ops.dbquant.rope_heads_cpu, RuntimeError), (cpu_backend.rope_heads_cpu, KernelInputError)):
        with pytest.raises(err, match="cos"):
            op(x, cs[:3], cs)
        with pytest.raises(err, match="even"):
            op(torch.randn(1, 4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
        with pytest.raises(err, match="float32"):
            op(x.double(), cs, cs)
