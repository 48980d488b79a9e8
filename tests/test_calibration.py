"""fdb-dad calibration stages on a tiny random Llama: losses fall, shapes, resume, fingerprint, NaN guard."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from dbquant.calibration import precision, runstate
from dbquant.calibration.blockwise import (
    BlockwiseConfig,
    batch_indices,
    blockwise_reconstruct,
    export_weights,
    to_fakequant,
)
from dbquant.calibration.dad import WEIGHTINGS, DADConfig, distill, teacher_cache
from dbquant.calibration.runstate import Interrupted, RunState, make_fingerprint
from dbquant.cli import build_parser, main
from dbquant.errors import DbquantError
from dbquant.model.modules import FakeQuantLinear
from dbquant.quant import fdb
from dbquant.quantize import QuantizeOptions, make_plan, quantize

from .conftest import make_tiny_model

torch.set_num_threads(1)


def _batches(n=8, t=32, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _run():
    return RunState(None, make_fingerprint(test=True))


def _init(model, plan):
    return {p.name: fdb.quantize_fdb(model.get_submodule(p.name).weight.detach(), p.layout.group_size)
            for p in plan}


def test_blockwise_lowers_each_blocks_loss_and_exports_shapes():
    model = make_tiny_model()
    plan = make_plan(model, QuantizeOptions(group_size=32))
    rep = blockwise_reconstruct(model, plan, {}, _batches(), BlockwiseConfig(steps=25, batch_size=8),
                                _run(), progress=False)
    assert len(rep["blocks"]) == 2
    for b in rep["blocks"]:
        assert b["last_loss"] < 0.8 * b["first_loss"], b
    weights = export_weights(model, [p.name for p in plan])
    for p in plan:
        q = weights[p.name]
        assert q.b1.shape == q.b2.shape == (p.layout.out_features, p.layout.padded_in_features)
        assert q.alpha.shape == (p.layout.out_features, p.layout.groups, 2)
        assert q.dequantize().shape == (p.layout.out_features, p.layout.in_features)


@pytest.mark.parametrize("mode,fast,want", [("auto", False, torch.float32), ("auto", True, torch.bfloat16),
                                             ("bf16", False, torch.bfloat16), ("off", True, torch.float32)])
def test_blockwise_trains_under_the_autocast_it_is_given(monkeypatch, mode, fast, want):
    """`auto` is bf16 exactly where this CPU's bf16 is fast (calibration/precision.py); the fp targets and
    the next block's inputs stay float32 whatever the mode, and the loss still falls."""
    monkeypatch.setattr(precision, "fast_bf16_cpu", lambda: fast)
    model = make_tiny_model()
    plan = make_plan(model, QuantizeOptions(group_size=32))
    seen = []

    def hook(m, args, out):
        if isinstance(m, (torch.nn.Linear, FakeQuantLinear)):
            seen.append((torch.is_grad_enabled(), out.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        rep = blockwise_reconstruct(model, plan, {}, _batches(), BlockwiseConfig(steps=25, batch_size=8,
                                                                                 autocast=mode), _run(), progress=False)
    finally:
        handle.remove()
    assert {dt for grad, dt in seen if grad} == {want}  # training steps: the mode's dtype
    assert {dt for grad, dt in seen if not grad} == {torch.float32}  # targets and the chain's next inputs
    for b in rep["blocks"]:
        assert b["last_loss"] < 0.8 * b["first_loss"], b


def test_batch_indices_are_a_pure_function_and_cover_epochs():
    a = torch.cat([batch_indices(10, 4, s, seed=1, salt=3) for s in range(5)])
    b = torch.cat([batch_indices(10, 4, s, seed=1, salt=3) for s in range(5)])
    assert torch.equal(a, b)
    assert sorted(a[:10].tolist()) == list(range(10)) and sorted(a[10:20].tolist()) == list(range(10))


def test_weightings_are_normalised():
    h_t, h_s = torch.rand(3, 7) * 4, torch.rand(3, 7) * 4
    for name, fn in WEIGHTINGS.items():
        w = fn(h_t, h_s)
        assert w.shape == h_t.shape and torch.isfinite(w).all() and (w >= 0).all()
        assert w.mean().item() == pytest.approx(1.0, rel=1e-5), name
    assert WEIGHTINGS["deviation"](h_t, h_s).min() >= 0.5


@pytest.mark.parametrize("weighting", sorted(WEIGHTINGS))
def test_dad_lowers_kl(weighting):
    model = make_tiny_model()
    plan = make_plan(model, QuantizeOptions(group_size=32))
    data = _batches(4, 24)
    teacher = teacher_cache(model, data, topk=16, progress=False)
    assert teacher["values"].shape == (4, 24, 16) and teacher["entropy"].shape == (4, 24)
    to_fakequant(model, [p.name for p in plan], _init(model, plan))
    rep = distill(model, data, teacher, DADConfig(steps=20, batch_size=4, lr=1e-2, weighting=weighting,
                                                  warmup=0, train="scales+weights", lr_weight=5e-3),
                  _run(), progress=False)
    assert rep["last_kl"] < 0.8 * rep["first_kl"], rep
    assert all(isinstance(m, FakeQuantLinear) for m in (model.get_submodule(p.name) for p in plan))


# ---------------------------------------------------------------- the pipeline, resume, fingerprint

def _opts(text_file, work_dir, **kw):
    base = dict(group_size=32, calib=text_file, preset="fast", bw_samples=6, bw_seq_len=24, bw_steps=6,
                bw_batch=2, dad=True, dad_samples=4, dad_seq_len=24, dad_steps=6, dad_batch=2, dad_topk=8,
                checkpoint_every=2, work_dir=None if work_dir is None else str(work_dir))
    base.update(kw)
    return QuantizeOptions(**base)


def _quantize(tiny_tokenizer, opts):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    report = quantize(model, tiny_tokenizer, opts, progress=False, model_id="tiny")
    return model, report


def _packed(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stop_after", [3, 9, 14])  # mid block 0, mid block 1, mid DAD
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_tokenizer, text_file, monkeypatch, stop_after):
    ref, _ = _quantize(tiny_tokenizer, _opts(text_file, tmp_path / "ref-work"))
    work = tmp_path / "work"
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", stop_after)
    with pytest.raises(Interrupted):
        _quantize(tiny_tokenizer, _opts(text_file, work))
    assert (work / "state.pt").is_file()
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", None)
    with pytest.raises(DbquantError, match="--resume"):  # a fresh run will not silently discard the checkpoint
        _quantize(tiny_tokenizer, _opts(text_file, work))
    resumed, report = _quantize(tiny_tokenizer, _opts(text_file, work, resume=True))
    a, b = _packed(ref), _packed(resumed)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.uint8:
            assert (a[k] != b[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4, msg=k)
    events = [json.loads(line).get("event") for line in report["calibration"]["log"].splitlines()]
    assert "resume" in events and "block done" in events
    # the library keeps the checkpoints (and the weights, final.pt) until the caller's output validates
    assert report["calibration"]["work_dir"] == str(work) and (work / "final.pt").is_file()
    runstate.discard_checkpoints(work)
    assert not list(work.glob("*.pt")) and (work / "log.jsonl").is_file()


def test_resume_of_a_finished_run_packs_without_recalibrating(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    work = tmp_path / "work"
    ref, _ = _quantize(tiny_tokenizer, _opts(text_file, work))
    assert (work / "final.pt").is_file()
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 0)  # any optimizer step would raise
    again, report = _quantize(tiny_tokenizer, _opts(text_file, work, resume=True))
    assert report["calibration"]["resumed_finished"]
    a, b = _packed(ref), _packed(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 4)
    with pytest.raises(Interrupted):
        _quantize(tiny_tokenizer, _opts(text_file, work))
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", None)
    with pytest.raises(DbquantError, match="different run.*bw_lr"):
        _quantize(tiny_tokenizer, _opts(text_file, work, resume=True, bw_lr=5e-3))
    with pytest.raises(DbquantError, match="no checkpoint"):
        _quantize(tiny_tokenizer, _opts(text_file, tmp_path / "empty", resume=True))


def test_nan_guard_names_stage_block_layer_and_step(tmp_path, tiny_tokenizer, text_file):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DbquantError) as e:
        quantize(model, tiny_tokenizer, _opts(text_file, None), progress=False)
    msg = str(e.value)
    assert "block-wise" in msg and "block 1" in msg and "step 0" in msg
    assert "model.layers.1.mlp.down_proj.weight" in msg
    named = set(re.findall(r"--[a-z][a-z-]*", msg))  # every flag the advice names must exist
    quantize_flags = {o for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
                      for o in a.option_strings}
    assert named and named <= quantize_flags, named - quantize_flags


def test_bad_stage_options():
    with pytest.raises(DbquantError, match="weighting"):
        QuantizeOptions(dad_weighting="magic").check()
    with pytest.raises(DbquantError, match="preset"):
        QuantizeOptions(preset="huge").check()
    with pytest.raises(DbquantError, match="out-of-range"):
        QuantizeOptions(bw_steps=-1).check()
    with pytest.raises(DbquantError, match="block-wise autocast mode 'fp8'.*auto"):
        QuantizeOptions(bw_autocast="fp8").check()
    with pytest.raises(DbquantError, match="autocast mode 'fp8'.*auto"):
        QuantizeOptions(dad_autocast="fp8").check()


def testcli_fdb_dad_argv_end_to_end(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(tiny_model_dir), "-o", str(out), "--group-size", "32", "--calib", text_file,
            "--preset", "default", "--bw-samples", "4", "--bw-seq-len", "24", "--bw-steps", "3", "--dad-steps", "3",
            "--dad-samples", "4", "--dad-seq-len", "24", "--dad-weighting", "teacher-entropy", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bpw"] == pytest.approx(3.0)
    report = json.loads((out / "dbquant-report.json").read_text())
    assert report["options"]["method"] == "fdb-dad" and report["options"]["dad_weighting"] == "teacher-entropy"
    assert {"blockwise_s", "dad_s"} <= set(report["times"])
    log = [json.loads(x) for x in (out / "dbquant-log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "dad" for r in log) and any(r.get("stage") == "block-wise" for r in log)
    assert not (tmp_path / "q.work").exists()
    assert main(["eval", str(out), "--windows", "1", "--seq-len", "32", "--json"]) == 0


def cli_fdb_dad_argv(model_dir, text_file, out, *extra):
    return ["quantize", str(model_dir), "-o", str(out), "--group-size", "32", "--calib", text_file, "--preset",
            "fast", "--bw-samples", "4", "--bw-seq-len", "24", "--bw-steps", "3", "--dad-steps", "3",
            "--dad-samples", "4", "--dad-seq-len", "24", "--dad-batch", "2", *extra]


def test_cli_failed_save_keeps_calibration_and_resume_writes_same_bytes(tmp_path, tiny_model_dir, text_file,
                                                                       monkeypatch, capsys):
    import dbquant.quantize as quantize_mod

    assert main(cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "ref")) == 0
    real_save = quantize_mod.save

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize_mod, "save", full_disk)
    capsys.readouterr()
    assert main(cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "out")) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("dbquant:")]  # progress bars aside
    work = tmp_path / "out.work"
    assert ("Traceback" not in stderr and len(err) == 1 and err[0].startswith("dbquant: error: saving")
            and "--resume" in err[0]), err
    assert str(work) in err[0] and (work / "final.pt").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(quantize_mod, "save", real_save)
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 0)  # resume must not recalibrate
    assert main(cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "out", "--resume")) == 0
    # same tensors, bit for bit, and the same header metadata (safetensors orders metadata keys by hash
    # per process, so the raw header bytes may differ even between two uninterrupted runs)
    ref, got = (safe_open(tmp_path / d / "model.safetensors", "pt") for d in ("ref", "out"))
    assert ref.metadata() == got.metadata() and sorted(ref.keys()) == sorted(got.keys())
    for k in ref.keys():  # noqa: SIM118  (a safe_open handle is not iterable)
        a, b = ref.get_tensor(k), got.get_tensor(k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    assert not work.exists()  # default work dir: dropped once the output validated


def test_cli_explicit_work_dir_drops_checkpoints_keeps_log(tmp_path, tiny_model_dir, text_file):
    work = tmp_path / "mywork"
    assert main(cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "q", "--work-dir", str(work))) == 0
    assert not list(work.glob("*.pt")) and (work / "log.jsonl").is_file()
