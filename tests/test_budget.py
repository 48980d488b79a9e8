"""--time-budget: the cost model's fit is deterministic, fits, keeps given options, refuses the impossible."""

import pytest

from dbquant.calibration import budget
from dbquant.errors import DbquantError
from dbquant.quantize import AUTO_CHAT_MIX, QuantizeOptions, budgeted, make_plan, quantize

from .conftest import make_tiny_model

# SmolLM2-135M: 30 blocks of 7 planned linears (3,538,944 weights each) and a 49152 x 576 head
SMOLLM2 = budget.Shapes(block_params=(3_538_944,) * 30, compute_params=30 * 3_538_944 + 49152 * 576)


@pytest.fixture(autouse=True)
def fp32_cpu(monkeypatch):
    """The reference CPU's answers (no fast bf16) whatever this machine is; tests of bf16 set their own."""
    monkeypatch.setattr(budget, "bf16_kind", lambda: None)


def test_constants_reproduce_the_measured_fast_run():
    """The stage times of the quiet fast run the constants were measured on (teacher 32.9 s,
    block-wise 104.9 s, DAD 144.7 s, total 289.7 s; docs/CALIBRATION.md), within 5%: the preset
    then had 34 DAD steps and wiki text only."""
    pred = budget.predict(QuantizeOptions(preset="fast", dad_steps=34, calib="wiki").resolved(), SMOLLM2)
    for stage, seconds in (("teacher", 32.9), ("blockwise", 104.9), ("dad", 144.7)):
        assert pred[stage] == pytest.approx(seconds, rel=0.05), (stage, pred)
    assert sum(pred.values()) == pytest.approx(289.7, rel=0.05)


@pytest.mark.parametrize("minutes", [6, 10, 20, 60])  # default's floor: 4.9 min
def test_fit_stays_within_the_budget_and_is_deterministic(minutes):
    opts = QuantizeOptions(preset="default", time_budget=minutes).resolved()
    a, info = budget.fit(opts, SMOLLM2)
    b, _ = budget.fit(opts, SMOLLM2)
    assert (a.bw_steps, a.dad_steps) == (b.bw_steps, b.dad_steps)
    assert info["predicted_total_s"] <= minutes * 60
    assert sum(budget.predict(a, SMOLLM2).values()) <= minutes * 60
    # one more step of each stage would not fit: the budget is used, not just respected
    more = a.__class__(**{**a.__dict__, "bw_steps": a.bw_steps + 1, "dad_steps": a.dad_steps + 1})
    assert sum(budget.predict(more, SMOLLM2).values()) > minutes * 60


def test_more_minutes_buy_more_steps_in_the_preset_balance():
    fits = [budget.fit(QuantizeOptions(preset="default", time_budget=m).resolved(), SMOLLM2)[0]
            for m in (6, 10, 20, 40)]
    assert [f.dad_steps for f in fits] == sorted(f.dad_steps for f in fits)
    assert len({f.dad_steps for f in fits}) == 4
    preset = QuantizeOptions(preset="default").resolved()
    for f in fits[1:]:  # both stages scaled by one factor: the preset's balance is kept
        assert f.dad_steps / f.bw_steps == pytest.approx(preset.dad_steps / preset.bw_steps, rel=0.1)


def test_a_step_count_given_on_the_command_line_is_kept():
    opts = QuantizeOptions(preset="default", time_budget=15, dad_steps=100).resolved()
    out, info = budget.fit(opts, SMOLLM2, given={"dad_steps"})
    assert out.dad_steps == 100 and "dad_steps" not in info["steps"] and out.bw_steps != opts.bw_steps
    with pytest.raises(DbquantError, match="both are given"):
        budget.fit(opts, SMOLLM2, given={"dad_steps", "bw_steps"})


def test_a_budget_below_the_floor_is_refused_with_the_floor():
    with pytest.raises(DbquantError, match=r"below this run's floor: .* \d+\.\d min"):
        budget.fit(QuantizeOptions(preset="default", time_budget=0.5).resolved(), SMOLLM2)


@pytest.mark.parametrize("kw", [dict(time_budget=0), dict(time_budget=-3), dict(time_budget=5, method="fdb"),
                                dict(time_budget=5, calib=None)])
def test_bad_budget_options(kw):
    with pytest.raises(DbquantError, match="--time-budget"):
        QuantizeOptions(**kw).check()


@pytest.mark.parametrize("preset, minutes", [("fast", 5), ("default", 20), ("best", 180)])
def test_each_preset_fits_its_budget_with_chat_text_and_target_bpw(preset, minutes):
    """The cost model, corrected by the quiet preset runs, keeps `fast` within 5 min, `default`
    within 20 and `best` within 3 h, with what `--calib auto` resolves to for SmolLM2 (the chat text it
    generates counted)."""
    opts = QuantizeOptions(preset=preset, target_bpw=None if preset == "fast" else 2.5,
                           calib=AUTO_CHAT_MIX).resolved()
    pred = budget.predict(opts, SMOLLM2)
    assert pred["generate"] > 0 and sum(pred.values()) <= minutes * 60


def test_generated_calibration_text_is_counted_by_its_size():
    """16 conversations of 192 tokens: the measured 29 s (within 5%); twice the sequences, twice the time;
    text sources alone generate nothing."""
    chat = budget.predict(QuantizeOptions(preset="fast", calib="wiki:0.75,chat:0.25").resolved(), SMOLLM2)
    assert chat["generate"] == pytest.approx(29.0, rel=0.05)
    more = budget.predict(QuantizeOptions(preset="fast", calib="self", calib_self_samples=32).resolved(), SMOLLM2)
    assert more["generate"] == pytest.approx(2 * chat["generate"])
    assert "generate" not in budget.predict(QuantizeOptions(preset="fast", calib="wiki").resolved(), SMOLLM2)


def test_the_online_teacher_costs_more_and_caches_nothing():
    topk = budget.predict(QuantizeOptions(preset="fast").resolved(), SMOLLM2)
    online = budget.predict(QuantizeOptions(preset="fast", dad_teacher="online").resolved(), SMOLLM2)
    assert "teacher" not in online and online["dad"] > topk["dad"]


@pytest.mark.parametrize("preset", ["fast", "default"])
@pytest.mark.parametrize("kind", ["zen5", "amx", "zen4", None])
def test_bf16_autocast_costs_what_this_cpu_kind_measured(monkeypatch, kind, preset):
    """A training step under bf16 costs its CPU kind's measured factor against the reference CPU's fp32
    step (DAD: 0.6 on Zen 5; with AMX 0.88 training scales (`fast`), 0.95 with the latent weights
    (`default`); on Zen 4 0.67 / 0.64; block-wise: 1.0, i.e. not measured, on Zen 5, 0.93 with AMX, 0.64 on
    Zen 4; the cached teacher's forward: 1.0 on Zen 5, 0.78 with AMX, 0.6 on Zen 4) where bf16 is fast, 1.22x
    where it is not; `auto` is fp32 on a CPU without fast bf16. Nothing else moves."""
    monkeypatch.setattr(budget, "bf16_kind", lambda: kind)
    weights = preset == "default"
    dad_f, bw_f, fw_f = {"zen5": (0.6, 1.0, 1.0), "amx": (0.95 if weights else 0.88, 0.93, 0.78),
                         "zen4": (0.64 if weights else 0.67, 0.64, 0.6),
                         None: (1.22, 1.22, 1.22)}[kind]
    off = budget.predict(QuantizeOptions(preset=preset, dad_autocast="off", bw_autocast="off").resolved(), SMOLLM2)
    bf16 = budget.predict(QuantizeOptions(preset=preset, dad_autocast="bf16", bw_autocast="bf16").resolved(), SMOLLM2)
    auto = budget.predict(QuantizeOptions(preset=preset).resolved(), SMOLLM2)
    assert bf16["dad"] == pytest.approx(off["dad"] * dad_f)
    steps = budget.predict(QuantizeOptions(preset=preset, bw_autocast="off", bw_steps=0).resolved(), SMOLLM2)
    assert bf16["blockwise"] - steps["blockwise"] == pytest.approx((off["blockwise"] - steps["blockwise"]) * bw_f)
    assert bf16["teacher"] == pytest.approx(off["teacher"] * fw_f)
    assert auto == (bf16 if kind else off)
    moved = ("dad", "blockwise", "teacher")
    assert {k: v for k, v in bf16.items() if k not in moved} == {k: v for k, v in off.items() if k not in moved}


@pytest.mark.parametrize("preset", ["fast", "default"])
@pytest.mark.parametrize("kind", ["zen5", "amx", "zen4"])
def test_bf16_dividend_buys_dad_steps_at_the_fp32_wall_time(monkeypatch, preset, kind):
    """Where bf16 is fast the preset's DAD steps grow until the predicted time is the fp32 preset's
    (within one step; on Zen 5, whose block-wise gets no credit, by 1 / 0.6 exactly); elsewhere, or
    with --dad-steps given, nothing changes."""
    opts = QuantizeOptions(preset=preset).resolved()
    same, info = budget.bf16_dividend(opts, SMOLLM2)
    assert same is opts and "bf16_dividend" not in info
    monkeypatch.setattr(budget, "bf16_kind", lambda: kind)
    out, info = budget.bf16_dividend(opts, SMOLLM2)
    assert info["bf16_dividend"]["dad_steps"] == [opts.dad_steps, out.dad_steps] and out.dad_steps > opts.dad_steps
    if kind == "zen5":
        assert out.dad_steps == int(opts.dad_steps / 0.6 + 1e-9)
    fp32 = sum(budget.predict(QuantizeOptions(preset=preset, dad_autocast="off", bw_autocast="off").resolved(),
                              SMOLLM2).values())
    step = budget.predict(out, SMOLLM2)["dad"] / out.dad_steps
    assert fp32 - step <= info["predicted_total_s"] <= fp32
    off, _ = budget.bf16_dividend(QuantizeOptions(preset=preset, dad_autocast="off", bw_autocast="off").resolved(),
                                  SMOLLM2)
    assert off.dad_steps == opts.dad_steps
    model = make_tiny_model()
    plan = make_plan(model, QuantizeOptions(preset=preset, group_size=32))
    assert budgeted(model, QuantizeOptions(preset=preset, group_size=32, dad_steps=7), plan)[0].dad_steps == 7
    grown, _ = budgeted(model, QuantizeOptions(preset=preset, group_size=32), plan)
    assert grown.dad_steps > opts.dad_steps


def test_more_bit_planes_cost_more_and_get_fewer_dividend_steps(monkeypatch):
    """A plan with planes beyond k = 2 (the 8-bit-scale allocation at 2.5 bpw: 22.3M plane-weights on
    SmolLM2) adds plane_p per plane-weight to every block-wise and DAD step, and the bf16 dividend aims at
    the uniform plan's fp32 time, so the richer plan gets fewer extra DAD steps and the same predicted total
    (within a step)."""
    rich = budget.Shapes(SMOLLM2.block_params, SMOLLM2.compute_params, (744_653,) * 30)
    opts = QuantizeOptions(preset="default", target_bpw=2.5).resolved()
    base, more = budget.predict(opts, SMOLLM2), budget.predict(opts, rich)
    planes = 30 * 744_653
    assert more["dad"] - base["dad"] == pytest.approx(opts.dad_steps * planes * budget.COSTS.plane_p)
    assert more["blockwise"] - base["blockwise"] == pytest.approx(opts.bw_steps * planes * budget.COSTS.plane_p)
    assert rich.uniform() == SMOLLM2
    monkeypatch.setattr(budget, "bf16_kind", lambda: "zen4")
    uni, uni_info = budget.bf16_dividend(opts, SMOLLM2)
    out, info = budget.bf16_dividend(opts, rich)
    assert opts.dad_steps < out.dad_steps < uni.dad_steps
    step = budget.predict(out, rich)["dad"] / out.dad_steps
    assert abs(info["predicted_total_s"] - uni_info["predicted_total_s"]) <= step


def test_quantize_runs_the_fitted_steps(tiny_tokenizer, text_file):
    """End to end on a tiny model: the report records the budget and the options it trained with."""
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    base = dict(group_size=32, calib=text_file, preset="fast", bw_samples=4, bw_seq_len=24, bw_batch=2,
                dad_samples=4, dad_seq_len=24, dad_batch=2, dad_topk=8)
    plan = make_plan(model, QuantizeOptions(**base))
    shapes = budget.Shapes.of(model, plan)
    assert shapes.block_params == tuple(sum(p.layout.out_features * p.layout.in_features for p in plan
                                            if p.name.startswith(f"model.layers.{i}.")) for i in range(2))
    # a budget that the cost model fills with ~3 block-wise and ~6 DAD steps on this model
    target = QuantizeOptions(**base, bw_steps=3, dad_steps=6).resolved()
    minutes = sum(budget.predict(target, shapes).values()) / 60
    opts = QuantizeOptions(**base, time_budget=minutes)
    fitted, info = budgeted(model, opts, plan)
    assert sum(budget.predict(fitted, shapes).values()) <= minutes * 60 and 1 <= fitted.dad_steps <= 12
    report = quantize(model, tiny_tokenizer, opts, progress=False, model_id="tiny", plan=plan)
    assert report["time_model"]["steps"] == info["steps"]
    assert (report["options"]["bw_steps"], report["options"]["dad_steps"]) == (fitted.bw_steps, fitted.dad_steps)
    assert report["calibration"]["dad"]["steps"] == fitted.dad_steps
