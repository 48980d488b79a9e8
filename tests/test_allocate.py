"""--target-bpw: the knapsack allocation never exceeds its budget, and it spends bits where they help."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dbquant.calibration.sensitivity import (
    allocate_plan,
    candidates,
    kfac_factors,
    option_errors,
    parse_planes,
    resolve_planes,
)
from dbquant.errors import DbquantError
from dbquant.format.layout import LinearLayout
from dbquant.model.plan import make_plan
from dbquant.quant import fdb
from dbquant.quant.allocate import allocate, hull
from dbquant.quantize import QuantizeOptions
from tests.conftest import make_tiny_model

option = st.tuples(st.integers(1, 400), st.floats(0.0, 1e3, allow_nan=False))
linears = st.lists(st.lists(option, min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(linears, st.floats(0.0, 1.0))
def test_allocation_never_exceeds_the_budget(opts, frac):
    costs = [[c for c, _ in o] for o in opts]
    errors = [[e for _, e in o] for o in opts]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(lo + frac * (hi - lo))
    choice = allocate(costs, errors, budget)
    assert choice.bits == sum(c[p] for c, p in zip(costs, choice.picks)) <= budget
    assert choice.error == pytest.approx(sum(e[p] for e, p in zip(errors, choice.picks)))
    # never worse than the cheapest options, and with the largest budget as good as every best option
    assert choice.error <= sum(e[min(range(len(c)), key=lambda o: (c[o], e[o]))] for c, e in zip(costs, errors)) + 1e-6
    if budget >= hi:
        assert choice.error == pytest.approx(sum(min(e) for e in errors))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=4), st.floats(0.0, 1.0))
def test_greedy_is_close_to_the_exhaustive_optimum_on_convex_problems(opts, frac):
    """On each linear's convex hull the greedy answer is optimal up to the last upgrade that did
    not fit: its error is at most the exhaustive optimum's plus one upgrade's error drop."""
    costs = [[c for c, _ in o] for o in opts]
    errors = [[e for _, e in o] for o in opts]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = int(lo + frac * (hi - lo))
    best = min(sum(e[p] for e, p in zip(errors, picks)) for picks in itertools.product(*[range(len(c)) for c in costs])
               if sum(c[p] for c, p in zip(costs, picks)) <= budget)
    slack = max(max(e) - min(e) for e in errors)
    assert allocate(costs, errors, budget).error <= best + slack + 1e-6


def test_hull_drops_dominated_and_concave_points():
    costs, errors = [10, 20, 30, 40, 25], [8.0, 4.0, 3.5, 0.5, 9.0]
    # (25, 9) is dominated; (30, 3.5) lies above the segment (20, 4) -> (40, 0.5)
    assert hull(costs, errors) == [0, 1, 3]


def test_budget_below_the_cheapest_is_refused():
    with pytest.raises(DbquantError, match="below the cheapest allocation"):
        allocate([[100, 200]], [[1.0, 0.5]], 99)


def test_sensitive_linear_gets_the_bits():
    """Two equal-shape linears, one with 100x the error score: at a budget of one upgrade, the
    sensitive one is upgraded; the measured bpw is the layouts' own storage bits."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    lays = candidates(LinearLayout(64, 128, 64), False)
    assert {(lay.planes, lay.group_size) for lay in lays} == set(itertools.product((1, 2, 3, 4), (32, 64, 128)))
    assert all(lay.offset for lay in lays if lay.planes == 1)
    e = option_errors(w, lays, None, None)
    costs = [[lay.storage_bits() for lay in lays]] * 2
    errors = [e, [100 * v for v in e]]
    budget = int(2.5 * 2 * 64 * 128)
    picks = allocate(costs, errors, budget).picks
    assert lays[picks[1]].bits_per_weight() > lays[picks[0]].bits_per_weight()
    assert sum(costs[0][p] for p in picks) <= budget


# rows of 256 and 512 inputs: whole groups of 128, so k = 2 at g128 costs 2.25 bpw as on a real model
WIDE = dict(hidden_size=256, intermediate_size=512)


def test_kfac_factors_are_the_per_token_second_moments():
    """G is the mean over tokens of (dLoss/dy)^2 and C the mean of x x^T, checked against autograd on
    the linear's output computed one window at a time."""
    model = make_tiny_model(vocab_size=50)
    name = "model.layers.1.mlp.down_proj"
    batches = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    g2, cov = kfac_factors(model, [name], batches, progress=False)[name]
    lin = model.get_submodule(name)
    want_g, want_c = torch.zeros(lin.out_features), torch.zeros(lin.in_features, lin.in_features)
    seen = {}
    h = lin.register_forward_hook(lambda _m, i, o: seen.update(x=i[0].detach(), y=o))
    try:
        for ids in batches:
            logits = model(ids[None]).logits
            loss = F.cross_entropy(logits[0, :-1], ids[1:])
            (gy,) = torch.autograd.grad(loss, seen["y"])
            want_g += gy.reshape(-1, gy.shape[-1]).square().sum(0)
            x = seen["x"].reshape(-1, seen["x"].shape[-1])
            want_c += x.T @ x
    finally:
        h.remove()
    assert torch.allclose(g2, want_g / batches.numel(), rtol=1e-5, atol=1e-12)
    assert torch.allclose(cov, want_c / batches.numel(), rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # grads taken, none stored


def test_kfac_score_is_the_output_error():
    """With unit output weights, a layout's k-fac score is the mean over tokens of ||(W - W_q) x||^2,
    every row kept (rows = N)."""
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(24, 128, generator=gen) * 0.02, torch.randn(300, 128, generator=gen)
    lays = candidates(LinearLayout(24, 128, 64), False)[:4]
    cov = x.T @ x / len(x)
    got = option_errors(w, lays, None, torch.ones(24), rows=24, cov=cov)
    for lay, g in zip(lays, got):
        q = fdb.quantize_fdb(w, lay.group_size, None, lay.offset, iters=2, grid=8, planes=lay.planes).dequantize()
        assert g == pytest.approx(float(((w - q) @ x.T).square().sum(0).mean()), rel=1e-4)


@pytest.mark.parametrize("sensitivity,scale_bits", [("fisher", 16), ("kfac", 16), ("fisher", 8)])
def test_allocate_plan_on_a_model_stays_within_the_target(sensitivity, scale_bits):
    model = make_tiny_model(vocab_size=50, **WIDE)
    plan = make_plan(model, group_size=64, scale_bits=scale_bits)
    batches = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    new, info = allocate_plan(model, plan, 2.5, sensitivity, batches, progress=False)
    weights = sum(p.layout.out_features * p.layout.in_features for p in new)
    assert info["bpw"] <= 2.5 and sum(p.layout.storage_bits() for p in new) / weights == pytest.approx(info["bpw"])
    assert [p.name for p in new] == [p.name for p in plan] and sum(info["layouts"].values()) == len(plan)
    assert info["planes"] == [2, 3, 4] and all(p.layout.planes >= 2 for p in new)  # auto at 2.5: no k = 1
    assert all(p.layout.scale_bits == scale_bits for p in new)  # every candidate keeps the plan's scale width


def test_scale_bits_auto_is_eight_where_bits_are_allocated():
    assert QuantizeOptions(method="fdb").stored_scale_bits == 16  # uniform k = 2 g64: 2.5 bits per weight
    assert QuantizeOptions(method="fdb", target_bpw=2.5).stored_scale_bits == 8
    assert QuantizeOptions(method="fdb", scale_bits="16", target_bpw=2.5).stored_scale_bits == 16
    assert QuantizeOptions(method="fdb", scale_bits="8").stored_scale_bits == 8
    model = make_tiny_model(vocab_size=50, **WIDE)
    # 8-bit scales leave k = 2 at g64 with bits to spare under 2.5: the allocation upgrades more linears
    rich = allocate_plan(model, make_plan(model, group_size=64, scale_bits=8), 2.5, "weight", None, progress=False)[0]
    lean = allocate_plan(model, make_plan(model, group_size=64), 2.5, "weight", None, progress=False)[0]
    assert sum(p.layout.planes for p in rich) > sum(p.layout.planes for p in lean)


def test_alloc_planes_auto_keeps_k1_only_where_the_target_needs_it():
    plan = make_plan(make_tiny_model(vocab_size=50, **WIDE), group_size=64)
    assert resolve_planes("auto", plan, 2.5, False) == (2, 3, 4)
    assert resolve_planes("auto", plan, 2.3, False) == (2, 3, 4)  # k = 2 at g128 is 2.25 bpw
    assert resolve_planes("auto", plan, 2.2, False) == (1, 2, 3, 4)
    assert resolve_planes("auto", plan, 2.3, True) == (1, 2, 3, 4)  # offsets cost 16 more bits a group
    assert resolve_planes("3,1", plan, 2.5, False) == (1, 3)
    for bad in ("0,2", "5", "two", "", "2,,3"):
        with pytest.raises(DbquantError, match="--alloc-planes"):
            parse_planes(bad)
    with pytest.raises(DbquantError, match="--alloc-planes"):
        QuantizeOptions(method="fdb", target_bpw=2.5, alloc_planes="1,8").check()


def test_allocation_with_only_k1_and_k4_picks_from_them():
    model = make_tiny_model(vocab_size=50)
    new, info = allocate_plan(model, make_plan(model, group_size=64), 2.0, "weight", None, progress=False,
                              planes="1,4")
    assert info["planes"] == [1, 4] and {p.layout.planes for p in new} <= {1, 4} and info["bpw"] <= 2.0
