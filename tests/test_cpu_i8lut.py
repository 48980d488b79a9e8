"""The integer lookup-table GEMV (csrc/cpu/dbgemm_i8lut.h, ``run_cpu(..., lut="int8" | "int16")``).

Each ISA path is forced, with each kind of integer table (8- and 12-bit codes), and checked three
ways: against a torch emulation of the tables
(``dbgemm_i8lut_ref``: the same integers, so only float32 summation order differs), against the
``ref`` oracle within the header's stated error bound (``i8lut_error_bound``), and against the
scalar path bit for bit (the header promises the same operations in the same order).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.backends.checks import KernelInputError
from dbquant.backends.reference import dbgemm_i8lut_ref, dbgemm_ref, i8lut_error_bound
from tests.test_cpu_kernel import prepared
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    HAVE_NATIVE = cpu_backend.load_cpu()

pytestmark = pytest.mark.skipif(not HAVE_NATIVE, reason="dbquant._C (C++ CPU kernel) is not built")
ISAS = list(torch.ops.dbquant.cpu_isas()) if HAVE_NATIVE else []


def _has_vbmi() -> bool:
    torch.ops.dbquant.cpu_i8lut_lookup("on")  # takes effect only where the CPU has VBMI
    got = torch.ops.dbquant.cpu_i8lut_lookup("auto")
    return got == "vbmi"


# (isa, AVX-512 lookup): every path this CPU runs; AVX-512 both with vpshufb ("bw") and, on a VBMI
# CPU, with vpermb / vpermi2b on compact tables ("vbmi")
PATHS = ([(i, "bw" if i == "avx512" else None) for i in ISAS]
         + ([("avx512", "vbmi")] if HAVE_NATIVE and _has_vbmi() else []))


KINDS = ["int8", "int16"]


def run_path(x, w, b, path, kind="int8"):
    """run_cpu with ``kind`` tables on one path (the AVX-512 lookup set for the call, then auto again)."""
    isa, lookup = path
    if lookup:
        torch.ops.dbquant.cpu_i8lut_lookup("on" if lookup == "vbmi" else "off")
    try:
        return cpu_backend.run_cpu(x, w, b, isa, lut=kind)
    finally:
        torch.ops.dbquant.cpu_i8lut_lookup("auto")


def check_all_isas(x, w, b, canon, k, g, kind="int8"):
    """Run every ISA path with ``kind`` tables; check emulation, bound and cross-ISA identity (the
    int16 tables have no VBMI lookups: that setting leaves them on vpshufb)."""
    emu = dbgemm_i8lut_ref(x, *canon, b, k, g, kind)
    ref = dbgemm_ref(x, *canon, b, k, g)
    scale = ref.abs().max().clamp_min(1.0).item()
    # the bound is on exact arithmetic; both sides also carry float32 rounding of K-term sums
    bound = i8lut_error_bound(x, canon[1], k, g, kind) + 2 * FP32_REORDER_LONG * scale
    ys = {path: run_path(x, w, b, path, kind) for path in PATHS}
    for isa, y in ys.items():
        assert y.shape == ref.shape and y.dtype == torch.float32, isa
        torch.testing.assert_close(y, emu, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG * scale, msg=isa)
        excess = ((y - ref).abs() - bound).max().item()
        assert excess <= 0, f"{isa}: |y - ref| exceeds the stated bound by {excess}"
        assert torch.equal(y, ys[("scalar", None)]), f"{isa} differs from scalar"
    return ys[("scalar", None)], ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("k,g", [(24, 8), (100, 32), (200, 64), (576, 128), (1000, 64), (72, 24)])
def test_every_isa_against_ref_within_bound(k, g, m, planes, kind):
    """Odd N and K (K not a multiple of the group: the format pads Kp = ceil(K / g) g with zero
    bits), groups that leave the SIMD loops a tail of single units, every plane count, M up to 64."""
    for n, offset, bias in itertools.product([1, 7, 33], [False, True], [False, True]):
        w, b, canon = prepared(n, k, g, offset, bias, seed=k + g + n + planes, planes=planes)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k + planes))
        check_all_isas(x, w, b, canon, k, g, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_past_the_views_computed_once(kind):
    """A call computes the table views of its first 64 rows once (kI8RowViews, dbgemm_i8lut.h) and
    those of later rows per tile: rows 64..69 give the same results on every path as the first."""
    w, b, canon = prepared(33, 200, 64, True, True, seed=9, planes=2)
    x = torch.randn(70, 200, generator=torch.Generator().manual_seed(9))
    x[64:] = x[:6]
    y, _ = check_all_isas(x, w, b, canon, 200, 64, kind)
    assert torch.equal(y[64:], y[:6])


@pytest.mark.parametrize("kind,most", [("int8", 1e-2), ("int16", 1e-3)])
def test_error_is_small_next_to_the_output(kind, most):
    """Not only within the bound: on Gaussian activations the int8 tables keep the output's
    relative error well under 1%, and the int16 tables (16x finer codes) under 0.1% (loose guards
    that the tables are not degenerate); the int16 error is also well below the int8 one."""
    w, b, canon = prepared(256, 576, 64, True, False, seed=3, planes=2)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(4))
    y, ref = check_all_isas(x, w, b, canon, 576, 64, kind)
    assert ((y - ref).norm() / ref.norm()).item() < most
    if kind == "int16":
        y8, _ = check_all_isas(x, w, b, canon, 576, 64, "int8")
        assert (y - ref).norm() < (y8 - ref).norm() / 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("planes", [1, 2, 3, 4])
@pytest.mark.parametrize("bits", [255, 0])
def test_large_group_widens_before_int16_overflows(planes, kind, bits):
    """A group of 2048 channels with every bit set (bits 255) or none (0) and equal activations: each
    lookup is +code_max or -code_max (127 or 2047), so one plane's group sum (512 lookups: +-65024 or
    +-1048064) overflows int16 unless the kernel widens every kI8SegmentCols (int8) or kI16SegmentCols
    (int16) columns as its header says. For the int16 tables these are the edges of the split codes
    (16 top + rem): +2047 = 16 * 127 + 15 fills the uint8 rem lanes to 16 * 15 = 240, and -2047 =
    16 * -128 + 1 takes 16 TOP to -2^15 at every full segment."""
    k = g = 2048
    w, b, canon = prepared(16, k, g, False, False, seed=1, planes=planes)
    canon = (torch.full_like(canon[0], bits), canon[1], None)
    w = cpu_backend.prepare_cpu(canon[0], canon[1], None, k, g)
    x = torch.ones(1, k)
    y, ref = check_all_isas(x, w, None, canon, k, g, kind)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind", ["int8", "int16"])
@pytest.mark.parametrize("threads", [2, 3])
def test_thread_count_does_not_change_result(kind, threads):
    """One row: each thread builds the tables of its share of the groups (9 here, split unevenly), then
    runs its share of the tiles; the bytes and so the outputs are those of one thread."""
    w, b, canon = prepared(1536, 520, 64, True, True, seed=6)
    x = torch.randn(1, 520)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu_backend.run_cpu(x, w, b, lut=kind)
        torch.set_num_threads(threads)
        y2 = cpu_backend.run_cpu(x, w, b, lut=kind)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)


def test_zero_and_nonfinite_rows():
    """An all-zero row gives zero scales (no division by zero); a NaN row comes out NaN as in ref."""
    w, b, canon = prepared(33, 100, 32, True, True, seed=5)
    x = torch.randn(3, 100)
    x[0] = 0
    x[2, 7] = float("nan")
    for isa in PATHS:
        y = run_path(x, w, b, isa)
        torch.testing.assert_close(y[0], b)
        assert torch.isnan(y[2]).all() and torch.isfinite(y[:2]).all(), isa


def test_unknown_lut_is_refused():
    w, b, _ = prepared(7, 24, 8, False, False)
    with pytest.raises(KernelInputError, match="lut must be one of"):
        cpu_backend.run_cpu(torch.randn(1, 24), w, b, lut="int4")
    with pytest.raises(RuntimeError, match="unknown lut 'int4'"):
        torch.ops.dbquant.dbgemm_cpu(torch.randn(1, 24), w.planes, w.scales, None, None, 7, 24, 8, "auto", "int4")


_ENV_PROBE = """
import torch
from dbquant.backends import cpu
from tests.test_cpu_kernel import prepared
w, b, _ = prepared(33, 200, 64, True, True, seed=2)
x = torch.randn(1, 200, generator=torch.Generator().manual_seed(0))
auto = cpu.run_cpu(x, w, b)
print(*(torch.equal(auto, cpu.run_cpu(x, w, b, lut=k)) for k in ("int8", "int16", "float")))
"""


@pytest.mark.parametrize("kind,expect", [("int8", "True False False"), ("int16", "False True False"),
                                         ("float", "False False True")])
def test_env_var_forces_the_auto_choice(kind, expect):
    """DBQUANT_CPU_LUT (read once per process, hence a child process) decides lut="auto" at M = 1."""
    env = dict(os.environ, DBQUANT_CPU_LUT=kind, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _ENV_PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip().splitlines()[-1] == expect


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset,bias", [(False, False), (True, True)])
def test_decode_layer_with_integer_tables_matches_the_emulated_step(monkeypatch, offset, bias, kind):
    """The fused decode op with ``kind`` tables forced computes decode_layer_ref whose
    projections are the tables' emulation (dbgemm_i8lut_ref): the same integers, so only float
    rounding differs; caches included. One allowance: a GEMV input that differs from the reference's
    by float rounding can round one table code the other way where C * inv sits at a tie (seen on
    AMD Zen 3, whose torch kernels round differently from Zen 4's). Such a code moves an output by at
    most one step s_j times its group's sum |alpha|, so the output may differ by one step per group
    and projection (i8lut_error_bound * 8 / g, a quarter of the tables' whole error bound at g = 16)
    beyond float rounding: far below what wrong tables, scales or sums would cost."""
    from dbquant.backends import reference, registry
    from dbquant.backends.t16 import canonical
    from tests.test_native_ops import make_layer

    steps = []  # per projection call: the largest output change one code per group can make

    def project_i8(p, x):
        w = p.weight
        canon = canonical(w)
        bound = i8lut_error_bound(x.reshape(-1, w.in_features), canon[1], w.in_features, w.group_size, kind)
        steps.append(bound.max().item() * 8 / w.group_size)
        return dbgemm_i8lut_ref(x, *canon, p.bias, w.in_features, w.group_size, kind)

    monkeypatch.setattr(reference, "_project", project_i8)
    h, hq, hk, d, inter, g = 40, 5, 1, 8, 23, 16
    layer = make_layer(h, hq, hk, d, inter, g, offset, bias, seed=3)
    gen = torch.Generator().manual_seed(7)
    angles = torch.rand(6, d // 2, generator=gen) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    caches = {b: [torch.zeros(1, hk, 6, d) for _ in range(2)] for b in ("ref", "cpu")}
    with cpu_backend.forced_lut(kind):
        assert cpu_backend.default_lut() == kind
        prepared_layer = cpu_backend.prepare_decode_layer(layer)
        for pos in range(4):
            x = torch.randn(1, h, generator=gen)
            xs = {b: x.clone() for b in caches}
            steps.clear()
            registry.get("decode_layer", "ref")(xs["ref"], layer, cos[pos], sin[pos], *caches["ref"], pos)
            registry.get("decode_layer", "cpu").run(xs["cpu"], prepared_layer, cos[pos], sin[pos], *caches["cpu"], pos)
            assert len(steps) >= 4  # the four projections went through the emulation
            flips = sum(steps)
            for got, want in [(xs["cpu"], xs["ref"]), *zip(caches["cpu"], caches["ref"])]:
                torch.testing.assert_close(got, want, rtol=FP32_REORDER_LONG,
                                           atol=FP32_REORDER * max(want.abs().max().item(), 1.0) + flips)


def test_vbmi_lookups_only_when_asked():
    """The AVX-512 path uses vpshufb by default (measured as fast); vpermb / vpermi2b when turned
    on on a VBMI CPU (the tests above run both)."""
    assert torch.ops.dbquant.cpu_i8lut_lookup("query") == "bw"
    torch.ops.dbquant.cpu_i8lut_lookup("on")
    want = "vbmi" if ("avx512", "vbmi") in PATHS else "bw"
    assert torch.ops.dbquant.cpu_i8lut_lookup("auto") == want
    with pytest.raises(RuntimeError, match="unknown mode 'fast'"):
        torch.ops.dbquant.cpu_i8lut_lookup("fast")


def test_forced_lut_restores_the_setting():
    before = cpu_backend.default_lut()
    with cpu_backend.forced_lut("float"):
        assert cpu_backend.default_lut() == "float"
        for kind in KINDS:
            with cpu_backend.forced_lut(kind):
                assert all(cpu_backend.default_lut(i) == kind for i in ISAS)
        assert cpu_backend.default_lut() == "float"
    assert cpu_backend.default_lut() == before
