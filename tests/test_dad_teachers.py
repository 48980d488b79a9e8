"""DAD's teacher signals (topk / online / sample), bf16 autocast detection, tokens/s, and resume with them."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from dbquant.backends import cpuinfo
from dbquant.calibration import dad, precision, runstate, sources
from dbquant.calibration.blockwise import to_fakequant
from dbquant.calibration.dad import DADConfig, distill, distill_loss, fp_forward, sample_tokens, teacher_cache
from dbquant.calibration.runstate import Interrupted, RunState, make_fingerprint
from dbquant.errors import DbquantError
from dbquant.quant import fdb
from dbquant.quantize import QuantizeOptions, make_plan, quantize

from .conftest import make_tiny_model

torch.set_num_threads(1)


def _setup(n=4, t=24):
    """(tiny model with FakeQuant linears, its fp copy, token windows int64 [n, t], {name: fp weight})."""
    model = make_tiny_model()
    fp = copy.deepcopy(model)
    plan = make_plan(model, QuantizeOptions(group_size=32))
    data = torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(0))
    fp_weights = {p.name: model.get_submodule(p.name).weight.detach().clone() for p in plan}
    init = {p.name: fdb.quantize_fdb(model.get_submodule(p.name).weight.detach(), p.layout.group_size) for p in plan}
    return model, fp, plan, data, fp_weights, init


def _teacher(mode, model, data, fp_weights):
    if mode == "online":
        return {"fp_weights": fp_weights}
    return teacher_cache(model, data, topk=16, progress=False, mode=mode, seed=1)


@pytest.mark.parametrize("mode", ["topk", "online", "sample"])
def test_each_teacher_lowers_its_loss(mode):
    model, _, plan, data, fp_weights, init = _setup()
    teacher = _teacher(mode, model, data, fp_weights)
    to_fakequant(model, [p.name for p in plan], init)
    cfg = DADConfig(steps=20, batch_size=4, lr=1e-2, warmup=0, train="scales+weights", lr_weight=5e-3, teacher=mode)
    rep = distill(model, data, teacher, cfg, RunState(None, make_fingerprint(test=True)), progress=False)
    assert rep["teacher"] == mode and rep["tokens"] == 20 * 4 * 24 and rep["tokens_per_s"] > 0
    assert rep["last_kl"] < 0.8 * rep["first_kl"], rep


def test_teacher_modes_refuse_the_wrong_signal():
    model, _, plan, data, fp_weights, init = _setup()
    topk = teacher_cache(model, data, topk=8, progress=False)
    to_fakequant(model, [p.name for p in plan], init)
    run = RunState(None, make_fingerprint(test=True))
    for mode, teacher in (("online", topk), ("sample", topk), ("topk", {"fp_weights": fp_weights})):
        with pytest.raises(DbquantError, match="teacher"):
            distill(model, data, teacher, DADConfig(steps=1, teacher=mode), run, progress=False)
    with pytest.raises(DbquantError, match="teacher"):
        DADConfig(teacher="oracle").check()


def test_online_teacher_is_the_fp_model_even_after_weights_train():
    model, fp, plan, data, fp_weights, init = _setup()
    to_fakequant(model, [p.name for p in plan], init)
    with torch.no_grad():
        for _, m in dad.fq_modules(model):
            m.weight.add_(0.05 * torch.randn_like(m.weight))  # latent weights moved, as scales+weights does
    student = model(input_ids=data).logits
    with fp_forward(model, fp_weights):
        teacher = model(input_ids=data).logits
    torch.testing.assert_close(teacher, fp(input_ids=data).logits, rtol=1e-5, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-2  # the quantized student really differs
    torch.testing.assert_close(model(input_ids=data).logits, student)  # and comes back after the context


def test_online_loss_is_the_full_vocabulary_kl():
    s, t = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    for tau in (1.0, 2.0):
        cfg = DADConfig(temperature=tau)
        loss, _ = distill_loss(s, {"logits": t, "entropy": torch.ones(2, 5)}, cfg)
        want = F.kl_div((s / tau).log_softmax(-1), (t / tau).log_softmax(-1), log_target=True,
                        reduction="none").sum(-1).mean() * tau * tau
        torch.testing.assert_close(loss, want)


def test_sampled_signal_is_unbiased_and_topk_is_not():
    torch.manual_seed(0)
    t = torch.randn(3, 30) * 2
    s = torch.randn(3, 30, requires_grad=True)
    cfg = DADConfig()
    ent = torch.ones(1, 3)

    def grad(signal):
        s.grad = None
        distill_loss(s[None], {**signal, "entropy": ent}, cfg)[0].backward()
        return s.grad.clone()

    full = grad({"logits": t[None]})
    logp = t.log_softmax(-1)
    ids, w = sample_tokens(logp, 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(w.sum(-1), torch.ones(3)) and (w >= 0).all()
    sampled = grad({"values": logp.gather(-1, ids)[None], "indices": ids[None], "weights": w[None]})
    v, ix = logp.topk(3, -1)
    top3 = grad({"values": v[None], "indices": ix[None]})
    assert (sampled - full).abs().max() < 0.01, (sampled - full).abs().max()
    assert (top3 - full).abs().max() > 0.01  # the bias the sampled signal removes


def test_sample_cache_is_seeded():
    model = make_tiny_model()
    data = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    a, b, c = (teacher_cache(model, data, topk=8, progress=False, mode="sample", seed=s) for s in (0, 0, 1))
    assert a["weights"].shape == a["indices"].shape == (2, 8, 8)
    assert torch.equal(a["indices"], b["indices"]) and not torch.equal(a["indices"], c["indices"])


# ---------------------------------------------------------------- autocast

@pytest.fixture
def no_torch_probe(monkeypatch):
    """Detection from /proc/cpuinfo only (this torch build may or may not have its own probes)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch._C._cpu, name, raising=False)


# AVX512-BF16 without AMX measured slower under bf16 autocast (0.82x, Xeon-SPR), so it does not count
# as native; AMD Zen 5's (family 26) measured 2.15x, Zen 4's (family 25 with AVX512-BF16) 1.53x; Zen 3 (family 25,
# no AVX512-BF16) has none
INTEL, AMD = "GenuineIntel", "AuthenticAMD"


@pytest.mark.parametrize("vendor,family,flags,native", [
    (INTEL, 6, {"avx2", "avx512f"}, False), (INTEL, 6, {"avx512f", "avx512_bf16"}, False),
    (INTEL, 6, {"avx512_bf16", "amx_tile", "amx_bf16"}, True), (INTEL, 6, {"amx_bf16"}, True),
    (AMD, 26, {"avx512f", "avx512_bf16"}, True), (AMD, 26, {"avx2", "avx512f"}, False),
    (AMD, 25, {"avx512f", "avx512_bf16"}, True), (AMD, 25, {"avx2", "fma"}, False),
    (AMD, 24, {"avx512f", "avx512_bf16"}, False), (AMD, 27, {"avx512_bf16"}, True),
    ("", None, set(), False)])
def test_cpu_bf16_detection(monkeypatch, no_torch_probe, vendor, family, flags, native):
    monkeypatch.setattr(cpuinfo, "cpu_info", lambda: {"vendor": vendor, "family": family, "flags": flags})
    assert precision.native_bf16("cpu") is native
    assert precision.autocast_dtype("auto", "cpu") == (torch.bfloat16 if native else None)
    assert precision.autocast_dtype("bf16", "cpu") == torch.bfloat16 and precision.autocast_dtype("off", "cpu") is None


@pytest.mark.parametrize("vendor,family,flags,kind", [
    (INTEL, 6, {"avx512_bf16", "amx_bf16"}, "amx"), (AMD, 26, {"avx512_bf16"}, "zen5"),
    (AMD, 27, {"avx512_bf16"}, "zen5"), (AMD, 25, {"avx512_bf16"}, "zen4"), (AMD, 25, {"avx2"}, None)])
def test_bf16_kind_names_the_cpu(no_torch_probe, vendor, family, flags, kind):
    """The kind picks the time model's factors (calibration/budget.py), so Zen 4 must not pass for Zen 5."""
    assert cpuinfo.bf16_kind({"vendor": vendor, "family": family, "flags": flags}) == kind


def test_cpuinfo_reads_the_first_processor(tmp_path, monkeypatch):
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nflags\t\t: fpu avx2 avx512_bf16\n\n"
            "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: fpu\n")
    (tmp_path / "cpuinfo").write_text(text)
    real = cpuinfo.Path
    monkeypatch.setattr(cpuinfo, "Path", lambda p: real(tmp_path / "cpuinfo") if p == "/proc/cpuinfo" else real(p))
    cpuinfo.cpu_info.cache_clear()
    try:
        assert cpuinfo.cpu_info() == {"vendor": "AuthenticAMD", "family": 26, "flags": {"fpu", "avx2", "avx512_bf16"}}
    finally:
        cpuinfo.cpu_info.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_autocast_auto_follows_the_cpu(monkeypatch, tmp_path, native):
    monkeypatch.setattr(precision, "fast_bf16_cpu", lambda: native)
    model, _, plan, data, fp_weights, init = _setup(2, 8)
    teacher = _teacher("topk", model, data, fp_weights)
    to_fakequant(model, [p.name for p in plan], init)
    dtypes = []
    mod = dad.fq_modules(model)[0][1]
    hook = mod.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    run = RunState(tmp_path, make_fingerprint(test=True))
    rep = distill(model, data, teacher, DADConfig(steps=2, batch_size=2, autocast="auto"), run, progress=False)
    hook.remove()
    want = torch.bfloat16 if native else torch.float32
    assert rep["autocast"] is native and dtypes and set(dtypes) == {want}
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["autocast"] for r in log if r.get("event") == "setup"] == ["bfloat16" if native else "off"]
    assert all(r["tok_s"] > 0 and r["tokens"] == 16 for r in log if "step" in r)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_teacher_cache_runs_under_the_given_autocast(mode):
    """The cached teacher's forward runs in bf16 when asked (the pipeline passes DAD's autocast), and its
    float32 log-probs stay those of the fp32 teacher to within bf16's rounding: the same top-1 token on
    nearly every position, a small KL between the two cached distributions."""
    model, _, _, data, _, _ = _setup(4, 24)
    dtypes = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    fp32 = teacher_cache(model, data, topk=300, progress=False, mode=mode, seed=1)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = teacher_cache(model, data, topk=300, progress=False, mode=mode, seed=1, autocast=torch.bfloat16)
    hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert all(v.dtype == fp32[k].dtype and v.shape == fp32[k].shape for k, v in bf16.items())
    assert bf16["values"].dtype == torch.float32
    if mode == "topk":  # k = the whole vocabulary: the full distributions, sorted
        q_fp = torch.full_like(fp32["values"], -1e9).scatter(-1, fp32["indices"].long(), fp32["values"])
        q_bf = torch.full_like(fp32["values"], -1e9).scatter(-1, bf16["indices"].long(), bf16["values"])
        kl = (q_fp.exp() * (q_fp - q_bf)).sum(-1)
        assert 0 < kl.mean() < 1e-2 and kl.max() < 5e-2
        assert (fp32["indices"][..., 0] == bf16["indices"][..., 0]).float().mean() > 0.9
    assert (fp32["entropy"] - bf16["entropy"]).abs().max() < 0.1


# ---------------------------------------------------------------- the pipeline: kill and resume

def _opts(calib, work_dir, **kw):
    base = {"group_size": 32, "calib": calib, "preset": "fast", "bw_samples": 6, "bw_seq_len": 24, "bw_steps": 6,
            "bw_batch": 2, "dad": True, "dad_samples": 4, "dad_seq_len": 24, "dad_steps": 6, "dad_batch": 2,
            "dad_topk": 8, "checkpoint_every": 2, "calib_self_samples": 3, "calib_self_len": 40,
            "calib_self_prompt_len": 4, "work_dir": None if work_dir is None else str(work_dir)}
    return QuantizeOptions(**{**base, **kw})


def _quantize(tokenizer, opts):
    model = make_tiny_model(vocab_size=len(tokenizer))
    report = quantize(model, tokenizer, opts, progress=False, model_id="tiny")
    return {k: v.clone() for k, v in model.state_dict().items()}, report


@pytest.mark.parametrize("teacher,mix,autocast", [("online", "{f}:0.5,self:0.5", "off"),
                                                  ("sample", "{f}", "bf16")])
def test_resume_after_kill_with_new_options(tmp_path, tiny_tokenizer, text_file, monkeypatch, teacher, mix,
                                            autocast):
    kw = {"dad_teacher": teacher, "dad_autocast": autocast}
    calib = mix.format(f=text_file)
    ref, _ = _quantize(tiny_tokenizer, _opts(calib, tmp_path / "ref-work", **kw))
    work = tmp_path / "work"
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 14)  # 12 block-wise steps, then mid DAD
    with pytest.raises(Interrupted):
        _quantize(tiny_tokenizer, _opts(calib, work, **kw))
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", None)
    if "self" in calib:
        assert (work / sources.SELF_CACHE).is_file()
        monkeypatch.setattr(sources, "generate_self", lambda *a, **k: pytest.fail("resume regenerated the text"))
    got, report = _quantize(tiny_tokenizer, _opts(calib, work, resume=True, **kw))
    assert ref.keys() == got.keys()
    for k in ref:
        if ref[k].dtype == torch.uint8:
            assert (ref[k] != got[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(ref[k].float(), got[k].float(), rtol=1e-3, atol=1e-4, msg=k)
    assert report["calibration"]["dad"]["teacher"] == teacher
    log = [json.loads(x) for x in report["calibration"]["log"].splitlines()]
    assert any(r.get("event") == "resume" for r in log) and any("tok_s" in r for r in log)
