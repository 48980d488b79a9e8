"""The decoder's native ops through the registry: every ``cpu`` kernel against its ``ref``
oracle (dbquant/backends/reference.py) on odd shapes, and the oracles against definitions
written out here.

Tolerances: the C++ kernels and the references both compute in float32 but add in different
orders (lookup-table partial sums, SIMD reductions, BLAS), and the C++ softmax/SiLU use a
polynomial exp good to a few float32 ulps. Over the few hundred terms these tests sum, that is
~1e-6 relative; rtol 1e-4 with atol 1e-5 x the output's scale leaves margin for that and still
fails on any indexing, scale or ordering bug (those move outputs by O(1)).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbquant.backends import cpu as cpu_backend
from dbquant.backends import reference, registry
from dbquant.backends.t16 import DecodeLayerWeights, Projection, canonical, prepare_cpu
from dbquant.errors import DbquantError
from dbquant.runtime.decode import quantize_rows_int8
from tests.tolerances import FP16_CACHE, FP32_REORDER, FP32_REORDER_LONG

pytestmark = pytest.mark.skipif(not registry.available("cpu"), reason="dbquant._C is not built")
OPS = ("decode_layer", "kv_attend", "linear_int8", "linear_w8a8", "rms_norm", "table_rows", "argmax", "attend_causal",
       "gated_act", "rope_heads")


def close(a, b):
    torch.testing.assert_close(a, b, rtol=FP32_REORDER_LONG, atol=FP32_REORDER * max(b.abs().max().item(), 1.0))


def test_every_native_op_has_ref_and_cpu():
    for op in OPS:
        assert registry.get(op, "ref") is getattr(reference, f"{op}_ref")
        assert registry.get(op, "cpu") is getattr(cpu_backend, f"{op}_cpu")
        assert registry.resolve("auto", "cpu", op=op) == "cpu"
        assert registry.resolve("auto", "cuda", op=op) == "ref"  # no GPU kernel for these ops
    with pytest.raises(DbquantError, match=r"backend 'triton' has no 'rms_norm' kernel"):
        registry.get("rms_norm", "triton")


def _packed(n, k, g, offset, gen, planes=2):
    """A random packed linear in the t16 layout, n x k with group size g and ``planes`` bit planes."""
    groups = -(-k // g)
    bits = torch.randint(0, 2, (planes, n, groups * g), generator=gen)
    bits[..., k:] = 0
    qweight = (bits.reshape(planes, n, -1, 8) * (1 << torch.arange(8))).sum(-1).to(torch.uint8)
    scales = (0.3 * torch.randn(n, groups, planes, generator=gen)).half()
    off = (0.1 * torch.randn(n, groups, generator=gen)).half() if offset else None
    return prepare_cpu(qweight, scales, off, k, g)


def make_layer(h, hq, hk, d, inter, g, offset, bias, seed=0, mix=None) -> DecodeLayerWeights:
    """mix: per projection (qkv, o, gate_up, down) its (planes, group size); default (2, g) each."""
    gen = torch.Generator().manual_seed(seed)
    mix = iter(mix or [(2, g)] * 4)

    def proj(n, k):
        planes, gs = next(mix)
        return Projection(_packed(n, k, gs, offset, gen, planes), torch.randn(n, generator=gen) if bias else None)

    return DecodeLayerWeights(
        ln1=1 + 0.1 * torch.randn(h, generator=gen), ln2=1 + 0.1 * torch.randn(h, generator=gen), eps=1e-5,
        qkv=proj((hq + 2 * hk) * d, h), o=proj(h, hq * d), gate_up=proj(2 * inter, h), down=proj(h, inter),
        n_heads=hq, n_kv=hk, head_dim=d, intermediate=inter, scale=d ** -0.5)


def test_t16_round_trip():
    w = _packed(21, 100, 32, True, torch.Generator().manual_seed(1))
    q, s, o = canonical(w)
    assert q.shape == (2, 21, 16) and s.shape == (21, 4, 2) and o.shape == (21, 4)
    again = prepare_cpu(q, s, o, 100, 32)
    assert all(torch.equal(a, b) for a, b in zip((w.planes, w.scales, w.offset),
                                                 (again.planes, again.scales, again.offset)))


# (hidden, query heads, kv heads, head dim, MLP width, group size): odd sizes, partial tiles
# (qkv 56 rows, gate_up 2 x 23 rows), K not a multiple of the group (40 / 16, 23 / 16), MHA and GQA.
SHAPES = [(40, 5, 1, 8, 23, 16), (24, 2, 2, 12, 40, 8), (64, 4, 2, 16, 96, 32)]


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("h,hq,hk,d,inter,g", SHAPES)
@pytest.mark.parametrize("offset,bias", [(False, False), (True, True)])
def test_decode_layer_cpu_matches_ref(h, hq, hk, d, inter, g, offset, bias):
    layer = make_layer(h, hq, hk, d, inter, g, offset, bias, seed=h + inter)
    gen = torch.Generator().manual_seed(7)
    max_len, angles = 6, torch.rand(6, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [L, D], HF's layout
    caches = {b: [torch.zeros(1, hk, max_len, d) for _ in range(2)] for b in ("ref", "cpu")}
    prepared = cpu_backend.prepare_decode_layer(layer)
    for pos in range(4):  # each step attends to all earlier positions
        x = torch.randn(1, h, generator=gen)
        xs = {b: x.clone() for b in caches}
        registry.get("decode_layer", "ref")(xs["ref"], layer, cos[pos], sin[pos], *caches["ref"], pos)
        registry.get("decode_layer", "cpu").run(xs["cpu"], prepared, cos[pos], sin[pos], *caches["cpu"], pos)
        assert not torch.equal(xs["ref"], x)  # computed in place
        close(xs["cpu"], xs["ref"])
        for c, r in zip(caches["cpu"], caches["ref"]):
            close(c, r)
    # the unprepared entry builds the C++ layer per call and gives the same result
    x = torch.randn(1, h, generator=gen)
    a, b = x.clone(), x.clone()
    cpu_backend.decode_layer_cpu(a, layer, cos[4], sin[4], *[c.clone() for c in caches["cpu"]], 4)
    registry.get("decode_layer", "cpu").run(b, prepared, cos[4], sin[4], *caches["cpu"], 4)
    assert torch.equal(a, b)


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("mix", [[(1, 8), (3, 16), (4, 32), (2, 8)], [(4, 16), (1, 16), (2, 8), (3, 8)]])
def test_decode_layer_cpu_mixed_planes_and_groups(mix):
    """One layer whose projections differ in k and group size: the fused op matches the reference."""
    h, hq, hk, d, inter = 40, 5, 1, 8, 23
    layer = make_layer(h, hq, hk, d, inter, 16, True, True, seed=11, mix=mix)
    assert [getattr(layer, n).weight.planes_count for n in layer.PROJECTIONS] == [k for k, _ in mix]
    gen = torch.Generator().manual_seed(5)
    angles = torch.rand(4, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    caches = {b: [torch.zeros(1, hk, 4, d) for _ in range(2)] for b in ("ref", "cpu")}
    prepared = cpu_backend.prepare_decode_layer(layer)
    for pos in range(3):
        x = torch.randn(1, h, generator=gen)
        xs = {b: x.clone() for b in caches}
        registry.get("decode_layer", "ref")(xs["ref"], layer, cos[pos], sin[pos], *caches["ref"], pos)
        registry.get("decode_layer", "cpu").run(xs["cpu"], prepared, cos[pos], sin[pos], *caches["cpu"], pos)
        close(xs["cpu"], xs["ref"])


def _extras(name, h, hq, hk, d, gen) -> dict:
    """DecodeLayerWeights switches of one family pattern, with random (not identity) norm weights."""
    def w(n):
        return 1 + 0.3 * torch.randn(n, generator=gen)

    return {
        "qk_norm_per_head": dict(q_norm=w(d), k_norm=w(d)),  # Qwen3, Gemma-3
        "qk_norm_whole": dict(q_norm=w(hq * d), k_norm=w(hk * d)),  # OLMo-2
        "post_norms_only": dict(post_attn=w(h), post_ffn=w(h), pre_norm=False),  # OLMo-2
        "gelu_tanh": dict(act="gelu_tanh"),  # Gemma
        "window": dict(window=2),  # Mistral, Gemma-2/3 local layers
        "softcap": dict(softcap=0.5),  # Gemma-2
        "residual_scale": dict(residual_scale=0.4),  # Granite
        "gemma2": dict(post_attn=w(h), post_ffn=w(h), act="gelu_tanh", window=3, softcap=0.7),
    }[name]


EXTRAS = ["qk_norm_per_head", "qk_norm_whole", "post_norms_only", "gelu_tanh", "window", "softcap",
          "residual_scale", "gemma2"]


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("h,hq,hk,d,inter,g", SHAPES[:2])
@pytest.mark.parametrize("extra", EXTRAS)
def test_decode_layer_switches_cpu_match_ref(h, hq, hk, d, inter, g, extra):
    """Each family switch in the C++ op against the oracle, past the window (positions 0..5)."""
    gen = torch.Generator().manual_seed(11)
    base = make_layer(h, hq, hk, d, inter, g, True, True, seed=h)
    layer = DecodeLayerWeights(**{**base.__dict__, **_extras(extra, h, hq, hk, d, gen)})
    max_len, angles = 6, torch.rand(6, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    caches = {b: [torch.zeros(1, hk, max_len, d) for _ in range(2)] for b in ("ref", "cpu", "base")}
    prepared = cpu_backend.prepare_decode_layer(layer)
    differs = False
    for pos in range(max_len):
        x = torch.randn(1, h, generator=gen)
        xs = {b: x.clone() for b in caches}
        registry.get("decode_layer", "ref")(xs["ref"], layer, cos[pos], sin[pos], *caches["ref"], pos)
        registry.get("decode_layer", "cpu").run(xs["cpu"], prepared, cos[pos], sin[pos], *caches["cpu"], pos)
        reference.decode_layer_ref(xs["base"], base, cos[pos], sin[pos], *caches["base"], pos)
        close(xs["cpu"], xs["ref"])
        for c, r in zip(caches["cpu"], caches["ref"]):
            close(c, r)
        differs |= not torch.allclose(xs["ref"], xs["base"], atol=1e-4)
    assert differs  # the switch changed the layer (so the parity above tested it)


def test_decode_layer_refuses_bad_switches():
    layer = make_layer(40, 5, 1, 8, 23, 16, False, False)
    for bad, match in [(dict(q_norm=torch.ones(8)), "q_norm and k_norm come together"),
                       (dict(q_norm=torch.ones(7), k_norm=torch.ones(7)), r"q_norm must have shape \(40,\)"),
                       (dict(act="relu"), "act must be 'silu' or 'gelu_tanh', got 'relu'"),
                       (dict(window=-1), "window=-1 and softcap=0.0 must be >= 0"),
                       (dict(post_ffn=torch.ones(39)), r"post_ffn must have shape \(40,\)")]:
        with pytest.raises(DbquantError, match=match):
            cpu_backend.prepare_decode_layer(DecodeLayerWeights(**{**layer.__dict__, **bad}))
    obj = torch.classes.dbquant.DecodeLayer(layer.ln1, layer.ln2, 1e-5, 5, 1, 8, 23, 8 ** -0.5)
    with pytest.raises(RuntimeError, match=r"q_norm, k_norm must be \[8\] \(per head\) or \[40\], \[8\]"):
        obj.set_extras(torch.ones(7), torch.ones(7), None, None, True, "silu", 0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="act must be silu or gelu_tanh, got 'relu'"):
        obj.set_extras(None, None, None, None, True, "relu", 0, 0.0, 1.0)


def test_decode_layer_ref_is_the_layer():
    """The oracle itself against the step written out with dense weights and torch's attention."""
    h, hq, hk, d, inter = 32, 4, 2, 8, 24
    layer = make_layer(h, hq, hk, d, inter, 8, True, True, seed=3)
    dense = {n: reference.dequantize_ref(*canonical(getattr(layer, n).weight), getattr(layer, n).weight.in_features)
             for n in DecodeLayerWeights.PROJECTIONS}
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(1, hk, 5, d, generator=gen), torch.randn(1, hk, 5, d, generator=gen)
    cos, sin = torch.rand(d, generator=gen), torch.rand(d, generator=gen)
    x = torch.randn(1, h, generator=gen)
    want = x.clone()
    hn = F.rms_norm(want, (h,), layer.ln1, 1e-5)
    qkv = F.linear(hn, dense["qkv"], layer.qkv.bias).view(hq + 2 * hk, d)

    def rope(t):
        return t * cos + torch.cat((-t[:, d // 2:], t[:, :d // 2]), -1) * sin

    q, k, v = rope(qkv[:hq]), rope(qkv[hq:hq + hk]), qkv[hq + hk:]
    keys, vals = k_cache.clone(), v_cache.clone()
    keys[0, :, 3], vals[0, :, 3] = k, v
    att = F.scaled_dot_product_attention(q[None, :, None], keys[:, :, :4], vals[:, :, :4], scale=layer.scale,
                                         enable_gqa=True)[0, :, 0]
    want = want + F.linear(att.reshape(1, -1), dense["o"], layer.o.bias)
    gu = F.linear(F.rms_norm(want, (h,), layer.ln2, 1e-5), dense["gate_up"], layer.gate_up.bias)
    want = want + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], dense["down"], layer.down.bias)
    reference.decode_layer_ref(x, layer, cos, sin, k_cache, v_cache, 3)
    close(x, want)
    close(k_cache, keys)


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("h,hq,hk,d,inter,g", SHAPES)  # head dims 8, 12 (AVX2: 8 + 4 halves), 16
def test_decode_layer_cpu_float16_cache_matches_ref(h, hq, hk, d, inter, g):
    """Float16 caches on every ISA path: the C++ layer widens the rows it reads exactly (vcvtph2ps, or
    the portable path's own conversion), as the reference's ``.float()`` does, subnormal, signed-zero and
    large values included; the token's row is written rounded to nearest even, as torch rounds it, and
    no other row is touched. The layer's float32 arithmetic is the same as with float32 caches, so its
    outputs agree to fp32 rounding unless a key lands one float16 ulp from the reference's."""
    layer = make_layer(h, hq, hk, d, inter, g, True, True, seed=h + d)
    prepared = cpu_backend.prepare_decode_layer(layer)
    run = registry.get("decode_layer", "cpu").run
    gen = torch.Generator().manual_seed(11)
    max_len, angles = 7, torch.rand(7, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    start = [torch.randn(1, hk, max_len, d, generator=gen) for _ in range(2)]
    start[0][0, 0, 1, :3] = torch.tensor([3e-7, -2e-5, -0.0])  # float16 subnormals and a signed zero
    start[1][0, 0, 0, :3] = torch.tensor([6e4, -6e4, 1e-6])  # near float16's largest, and a subnormal
    start = [c.half() for c in start]
    assert ((start[0].float().abs() < 6.1e-5) & (start[0] != 0)).any()  # subnormals survived the rounding
    for isa in torch.ops.dbquant.cpu_isas():
        with cpu_backend.forced_isa(isa):
            caches = {b: [c.clone() for c in start] for b in ("ref", "cpu")}
            for pos in range(3, 6):
                x = torch.randn(1, h, generator=gen)
                xs = {b: x.clone() for b in caches}
                registry.get("decode_layer", "ref")(xs["ref"], layer, cos[pos], sin[pos], *caches["ref"], pos)
                run(xs["cpu"], prepared, cos[pos], sin[pos], *caches["cpu"], pos)
                scale = xs["ref"].abs().max().item()
                torch.testing.assert_close(xs["cpu"], xs["ref"], rtol=0, atol=FP16_CACHE * scale,
                                           msg=lambda m: f"isa={isa} pos={pos}: {m}")
                for c, r, s0 in zip(caches["cpu"], caches["ref"], start):
                    assert c.dtype == torch.float16
                    torch.testing.assert_close(c.float(), r.float(), rtol=2 ** -10, atol=2 ** -24)  # an ulp at most
                    rest = torch.ones(max_len, dtype=torch.bool)
                    rest[3:pos + 1] = False
                    assert torch.equal(c[:, :, rest], s0[:, :, rest])  # rows never written are untouched
    with pytest.raises(RuntimeError, match="k_cache must be float32 or float16, got BFloat16"):
        run(torch.zeros(1, h), prepared, cos[0], sin[0], *[c.bfloat16() for c in start], 0)
    with pytest.raises(RuntimeError, match="v_cache must be Half, got Float"):
        run(torch.zeros(1, h), prepared, cos[0], sin[0], start[0].clone(), start[1].float(), 0)


def test_decode_layer_refuses_bad_input():
    layer = make_layer(40, 5, 1, 8, 23, 16, False, False)
    cache = torch.zeros(1, 1, 4, 8)
    for fn in (reference.decode_layer_ref, cpu_backend.decode_layer_cpu):
        with pytest.raises(DbquantError, match=r"x must have shape \(1, 40\), got \(1, 39\)"):
            fn(torch.zeros(1, 39), layer, torch.ones(8), torch.ones(8), cache, cache.clone(), 0)
        with pytest.raises(DbquantError, match=r"pos 4 is outside the cache \(max_len 4\)"):
            fn(torch.zeros(1, 40), layer, torch.ones(8), torch.ones(8), cache, cache.clone(), 4)
        with pytest.raises(DbquantError, match=r"k_cache must be \[1, 1, max_len, 8\], got \(1, 2, 4, 8\)"):
            fn(torch.zeros(1, 40), layer, torch.ones(8), torch.ones(8), torch.zeros(1, 2, 4, 8), cache, 0)
    wrong = DecodeLayerWeights(**{**layer.__dict__, "intermediate": 24})
    with pytest.raises(DbquantError, match=r"gate_up must be 48 x 40 \(out x in\), got 46 x 40"):
        cpu_backend.prepare_decode_layer(wrong)
    # the C++ class checks what it is given too
    obj = torch.classes.dbquant.DecodeLayer(layer.ln1, layer.ln2, 1e-5, 5, 1, 8, 23, 8 ** -0.5)
    with pytest.raises(RuntimeError, match=r"planes must have shape \[3, 6, 2, 16\]"):
        obj.set_proj("o", layer.qkv.weight.planes, layer.qkv.weight.scales, None, None, 16)
    with pytest.raises(RuntimeError, match="unknown projection 'up'"):
        obj.set_proj("up", layer.o.weight.planes, layer.o.weight.scales, None, None, 16)
    with pytest.raises(RuntimeError, match="'qkv' projection was never set"):
        torch.ops.dbquant.decode_layer_cpu(torch.zeros(1, 40), obj, torch.ones(8), torch.ones(8), cache,
                                           cache.clone(), 0)


@pytest.mark.parametrize("n,k,m", [(37, 17, 3), (3, 200, 1), (1001, 576, 2), (5, 8, 33)])
def test_linear_int8_cpu_matches_ref(n, k, m):
    gen = torch.Generator().manual_seed(n + k)
    codes, scale = quantize_rows_int8(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    ref = registry.get("linear_int8", "ref")(x, codes, scale)
    close(ref, (x.double() @ (codes.double() * scale.double()[:, None]).T).float())  # the definition
    close(registry.get("linear_int8", "cpu")(x, codes, scale), ref)
    for isa in torch.ops.dbquant.cpu_isas():
        close(torch.ops.dbquant.linear_int8_cpu(x, codes, scale, isa), ref)


@pytest.mark.parametrize("n,k,m", [(37, 64, 3), (3, 96, 1), (1001, 576, 2)])
def test_linear_w8a8_cpu_matches_ref(n, k, m):
    gen = torch.Generator().manual_seed(n + k)
    codes, scale = quantize_rows_int8(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    x[0, 32:64] = 0  # an all-zero block: scale 0, codes 0
    ref = registry.get("linear_w8a8", "ref")(x, codes, scale)
    exact = x @ (codes.float() * scale[:, None]).T
    # the activations' rounding: present, and a few % at most (each code is off by <= 1/254 of
    # its block's max; a 3-output row can cancel, so the bound is loose)
    assert 0 < (ref - exact).norm() < 0.05 * exact.norm()
    close(registry.get("linear_w8a8", "cpu")(x, codes, scale), ref)
    for isa in torch.ops.dbquant.cpu_isas():
        close(torch.ops.dbquant.linear_w8a8_cpu(x, codes, scale, isa), ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_linear_w8a8_non_finite_propagates(bad):
    """std::max drops a NaN, so the int8 quantization used to turn a NaN block into finite codes."""
    codes, scale = quantize_rows_int8(torch.randn(7, 64))
    x = torch.randn(2, 64)
    x[0, 40] = bad
    ref = reference.linear_w8a8_ref(x, codes, scale)
    assert ref[0].isnan().all() and ref[1].isfinite().all()
    for isa in torch.ops.dbquant.cpu_isas():
        y = torch.ops.dbquant.linear_w8a8_cpu(x, codes, scale, isa)
        torch.testing.assert_close(y, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG, equal_nan=True, msg=isa)


@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 65), (2, 1)])
def test_rms_norm_cpu_matches_ref(shape):
    x, w = torch.randn(*shape), torch.randn(shape[-1])
    ref = registry.get("rms_norm", "ref")(x, w, 1e-5)
    close(ref, F.rms_norm(x, (shape[-1],), w, 1e-5))
    close(registry.get("rms_norm", "cpu")(x, w, 1e-5), ref)


@pytest.mark.parametrize("rows,dp,groups,dim", [(49, 576, 1, 576), (30, 96, 3, 90), (7, 64, 8, 61)])
def test_table_rows_cpu_matches_ref_and_the_table(rows, dp, groups, dim):
    """The decoder's embedding lookup: rows of an 8-bit table (one or several groups a row, a padded
    last group) equal the table module's own dequantized rows, exactly."""
    from dbquant.format.embedding import TableLayout, dequantize, pack
    from dbquant.quant.table import quantize_table

    layout = TableLayout(rows=rows, dim=dim, bits=8, group_size=dp // groups)
    t = pack(*quantize_table(torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows)), layout), layout)
    assert t["codes"].shape == (rows, dp) and t["code_scales"].shape == (rows, groups)
    ids = torch.tensor([0, rows - 1, 3, 3])
    ref = registry.get("table_rows", "ref")(t["codes"], t["code_scales"], ids, dim, 1.5)
    torch.testing.assert_close(ref, dequantize(t, layout)[ids] * 1.5, rtol=0, atol=0)
    assert torch.equal(registry.get("table_rows", "cpu")(t["codes"], t["code_scales"], ids, dim, 1.5), ref)
    with pytest.raises(DbquantError, match=rf"ids must be in 0..{rows - 1}"):
        registry.get("table_rows", "cpu")(t["codes"], t["code_scales"], torch.tensor([rows]), dim)
    with pytest.raises(DbquantError, match=r"dim must be in \d+\.\.\d+ \(codes of"):  # more than a group of padding
        registry.get("table_rows", "ref")(t["codes"], t["code_scales"], ids, dp - dp // groups, 1.0)
    with pytest.raises(RuntimeError, match="outside the table"):  # the unchecked .run checks too
        cpu_backend.table_rows_cpu.run(t["codes"], t["code_scales"], torch.tensor([-1]), dim, 1.0)


def test_argmax_cpu_is_torch_argmax():
    """First maximum on ties (within and across the kernel's 512-wide blocks), -inf rows, the first
    NaN where a row has one, odd widths."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 49153, generator=gen)
    x[1, 100] = x[1, 3000] = x[1, 40000] = 50.0  # tie across blocks: the first
    x[2, 700] = x[2, 701] = 50.0  # tie inside a block
    x[3] = float("-inf")
    x[4, 9000], x[4, 20000], x[4, 5] = float("nan"), float("nan"), 99.0  # NaN wins, the first one
    x[5, -1] = 60.0  # the last element
    want = x.argmax(-1)
    assert want.tolist()[1:] == [100, 700, 0, 9000, 49152]
    assert torch.equal(registry.get("argmax", "cpu")(x), want)
    assert torch.equal(registry.get("argmax", "ref")(x), want)
    for v in (1, 7, 513):
        y = torch.randn(3, v, generator=gen)
        assert torch.equal(registry.get("argmax", "cpu")(y), y.argmax(-1))
    with pytest.raises(DbquantError, match="x must be float32"):
        registry.get("argmax", "cpu")(x.double())


@pytest.mark.parametrize("op", ["linear_int8", "linear_w8a8", "rms_norm"])
def test_native_op_wrappers_refuse_bad_input(op):
    codes, scale = quantize_rows_int8(torch.randn(4, 64))
    bad = {  # (args, message) per op
        "linear_int8": [((torch.randn(2, 63), codes, scale), r"x has K=63 but wq is \(4, 64\)"),
                        ((torch.randn(2, 64).double(), codes, scale), r"x must be float32, got torch.float64"),
                        ((torch.randn(2, 64), codes, scale[:3]), r"s must have shape \(4,\), got \(3,\)")],
        "linear_w8a8": [((torch.randn(2, 40), codes[:, :40], scale), r"K=40 must be a multiple of 32"),
                        ((torch.randn(64), codes, scale), r"x must have 2 dims, got shape \(64,\)")],
        "rms_norm": [((torch.tensor(1.0), torch.ones(1), 1e-5), r"x must have at least 1 dim"),
                     ((torch.ones(2, 3, dtype=torch.int32), torch.ones(3), 1e-5),
                      r"x must be float32, got torch.int32"),
                     ((torch.ones(2, 3), torch.ones(4), 1e-5), r"w must have shape \(3,\), got \(4,\)")],
    }[op]
    for backend in ("ref", "cpu"):
        for args, msg in bad:
            with pytest.raises(DbquantError, match=f"{op}_{backend}: {msg}"):
                registry.get(op, backend)(*args)


def test_decoder_uses_registry_ops():
    from dbquant.runtime.decode import DecoderLayer, FastDecoder, Norm
    from tests.conftest import make_tiny_model

    dec = FastDecoder(make_tiny_model(), max_len=8, lm_head_dtype="w8a8")
    assert dec.decode_layer is registry.get("decode_layer", "cpu")
    assert dec.lm_head_op is registry.get("linear_w8a8", "cpu").run
    assert dec.rms_norm is registry.get("rms_norm", "cpu").run
    model = dec.model.model.layers[0]
    assert isinstance(dec.layers[0], DecoderLayer) and isinstance(dec.layers[0].ln1, Norm)
    assert dec.layers[0].ln1.eps == model.input_layernorm.variance_epsilon
    assert torch.equal(dec.layers[0].ln2.weight, model.post_attention_layernorm.weight)
