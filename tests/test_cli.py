"""The CLI end to end on a tiny random Llama, and its bad-input messages."""

import json
from dataclasses import fields

import pytest

from dbquant.calibration import input_second_moments, presets
from dbquant.cli import build_parser, main, quantize_options
from dbquant.errors import DbquantError
from dbquant.eval.data import calibration_batches, load_text
from dbquant.model.checkpoint import load
from dbquant.model.inspect import layer_stats, stats_summary
from dbquant.model.modules import PackedLinear
from dbquant.model.sources import load_fp_model
from dbquant.quantize import QuantizeOptions, quantize
from dbquant.runtime.generate import GenerateOptions, build_kv_cache, build_prompt, generate, pick_engine

from .conftest import make_tiny_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_eval_generate_inspect(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", tiny_model_dir, "--output", out, "--group-size", 32,
                          "--calib", "none", "--json")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["bpw"] == pytest.approx(2 + 32 / 32) and (out / "dbquant-report.json").is_file()

    code, stdout, _ = run(capsys, "eval", out, "--windows", 2, "--seq-len", 64, "--json")
    res = json.loads(stdout)
    assert code == 0 and res["protocol"] == "wiki" and res["tokens"] == 2 * 63
    assert res["bpw"] == pytest.approx(3.0) and res["ppl"] > 1

    code, stdout, _ = run(capsys, "eval", tiny_model_dir, "--windows", 2, "--seq-len", 64, "--json")
    assert code == 0 and json.loads(stdout)["bpw"] is None

    code, stdout, err = run(capsys, "generate", out, "--prompt", "The quick", "--max-new-tokens", 5, "--raw")
    assert code == 0 and "tokens/s" in err

    code, stdout, _ = run(capsys, "inspect", out, "--source", tiny_model_dir, "--json")
    table = json.loads(stdout)
    assert code == 0 and len(table["layers"]) == 14 and table["bpw"] == pytest.approx(3.0)
    for row in table["layers"]:
        assert 0 < row["density_b1"] < 1 and 0 < row["density_b2"] < 1 and 0 < row["rel_error"] < 0.2
    code, stdout, _ = run(capsys, "inspect", out)
    assert code == 0 and "14 packed linears" in stdout


def _weighted_errors(qdir, fp_model, importance) -> dict[str, float]:
    """sum_k E[x_k^2] * ||W[:, k] - W_q[:, k]||^2 of every packed linear of checkpoint ``qdir``."""
    q = load(qdir, backend="ref")
    return {n: float(((fp_model.get_submodule(n).weight.float() - q.get_submodule(n).dequantize()).square()
                      * importance[n]).sum()) for n in importance}


def test_activation_weighted_calibration(tmp_path, tiny_model_dir, capsys):
    # The activation-weighted FDB init (--calib) must beat the data-free one (--calib none) on
    # the error it weights: sum_k E[x_k^2] ||W[:, k] - W_q[:, k]||^2, with E[x^2] from the same windows.
    common = ("--method", "fdb", "--group-size", 32, "--calib-samples", 4, "--calib-seq-len", 32)
    code, _, _ = run(capsys, "quantize", tiny_model_dir, "-o", tmp_path / "q", "--calib", "wiki", *common)
    assert code == 0
    report = json.loads((tmp_path / "q" / "dbquant-report.json").read_text())
    assert "stats_s" in report["times"]
    code, _, _ = run(capsys, "quantize", tiny_model_dir, "-o", tmp_path / "free", "--calib", "none", *common)
    assert code == 0

    fp, tok = load_fp_model(tiny_model_dir)
    names = [n for n, m in load(tmp_path / "q", backend="ref").named_modules() if isinstance(m, PackedLinear)]
    batches = calibration_batches(tok, load_text("wiki", "calibration"), 4, 32, 0)
    importance = input_second_moments(fp, names, batches, progress=False)
    weighted = _weighted_errors(tmp_path / "q", fp, importance)
    free = _weighted_errors(tmp_path / "free", fp, importance)
    assert len(names) == 14 and weighted.keys() == free.keys()
    # a random tiny model has near-uniform activations, so the gain is small (~1%) but systematic
    assert sum(weighted.values()) < sum(free.values())
    assert sum(weighted[n] < free[n] for n in names) > len(names) // 2  # most layers, not one outlier


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    code, stdout, _ = run(capsys, "quantize", tiny_model_dir, "--dry-run", "--modules", "decoder,lm_head")
    assert code == 0
    assert "model.layers.0.self_attn.q_proj" in stdout and "lm_head" in stdout
    assert "15 linears" in stdout and "bits/weight" in stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "12"], "group size 12 cannot work"),
    (["--method", "gptq"], "unknown method 'gptq'"),
    (["--modules", "decoder,embeddings"], "unknown module set"),
    (["--iters", "-1"], "out-of-range option"),
    (["--calib", "nowhere.txt"], "text source"),
])
def test_bad_quantize_options(tmp_path, tiny_model_dir, capsys, argv, message):
    code, _, err = run(capsys, "quantize", tiny_model_dir, "-o", tmp_path / "q", *argv)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_existing_output_refused_unless_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run(capsys, "quantize", tiny_model_dir, "-o", out, "--calib", "none")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, _ = run(capsys, "quantize", tiny_model_dir, "-o", out, "--calib", "none", "--overwrite",
                     "--group-size", 32)
    assert code == 0 and (out / "config.json").is_file()


def test_bad_model_and_checkpoint_paths(tmp_path, capsys):
    code, _, err = run(capsys, "quantize", tmp_path / "missing-model", "-o", tmp_path / "q")
    assert code == 2 and "dbquant: error:" in err
    code, _, err = run(capsys, "generate", tmp_path, "--prompt", "hi")
    assert code == 2 and "dbquant: error:" in err
    code, _, err = run(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and "not a directory" in err


# ---------------------------------------------------------------- the library behind the CLI

def test_every_quantize_option_is_one_flag_with_its_default():
    # Flags are generated from QuantizeOptions: each field has one, and no flags give the defaults.
    q = build_parser()._subparsers._group_actions[0].choices["quantize"]
    dests = {a.dest for a in q._actions}
    assert {f.name for f in fields(QuantizeOptions)} <= dests
    assert quantize_options(build_parser().parse_args(["quantize", "--dry-run"])) == QuantizeOptions()
    a = build_parser().parse_args(["quantize", "-o", "out", "--no-dad", "--dad-topk", "7", "--calib", "none",
                                   "--modules", "decoder,lm_head", "--quantize-vision"])
    opts = quantize_options(a)
    assert (opts.dad, opts.dad_topk, opts.calib, opts.blockwise) == (False, 7, None, None)
    assert opts.modules == ("decoder", "lm_head", "vision") and opts.work_dir == "out.work"


def test_presets_are_checked_against_the_option_fields(monkeypatch):
    stage = [f.name for f in fields(QuantizeOptions) if f.metadata.get("preset")]
    assert "grad_clip" in stage and "preset" not in stage
    for name in presets.PRESETS:
        r = QuantizeOptions(preset=name).resolved()
        assert all(getattr(r, k) is not None for k in stage), name
    monkeypatch.setitem(presets.COMMON, "dad_tempreature", 2.0)  # a typo must not pass silently
    with pytest.raises(DbquantError, match="dad_tempreature"):
        QuantizeOptions().resolved()
    monkeypatch.delitem(presets.COMMON, "dad_tempreature")
    monkeypatch.delitem(presets.COMMON, "grad_clip")
    with pytest.raises(DbquantError, match="grad_clip"):
        QuantizeOptions().resolved()


def test_layer_stats_match_the_quantize_report(tiny_tokenizer):
    fp = make_tiny_model(vocab_size=len(tiny_tokenizer))
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    report = quantize(model, tiny_tokenizer, QuantizeOptions(method="rtn", calib=None, group_size=32),
                      progress=False)
    rows = layer_stats(model, fp)
    assert {r["module"] for r in rows} == set(report["rel_weight_error"]) and len(rows) == report["layers"] == 14
    for r in rows:
        assert r["rel_error"] == pytest.approx(report["rel_weight_error"][r["module"]], rel=1e-4)
        assert 0 < r["density_b1"] < 1 and 0 < r["density_b2"] < 1 and r["group"] == 32
    assert "rel_error" not in layer_stats(model)[0]
    assert stats_summary(model, rows)["bpw"] == pytest.approx(report["bpw"])


def test_generate_prompt_engine_and_cache(tiny_tokenizer):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    ids, extra = build_prompt(model, tiny_tokenizer, GenerateOptions("The quick", raw=True), "tiny")
    assert extra == {} and ids.tolist() == tiny_tokenizer("The quick", return_tensors="pt").input_ids.tolist()
    with pytest.raises(DbquantError, match="vision-language"):
        build_prompt(model, tiny_tokenizer, GenerateOptions("hi", image="x.png"), "tiny")
    assert pick_engine(model, GenerateOptions("hi")) == "dbquant"
    assert pick_engine(model, GenerateOptions("hi", kv="kivi2")) == "hf"
    assert pick_engine(model, GenerateOptions("hi", kv="1.5/1.58")) == "dbquant"  # the packed cache
    with pytest.raises(DbquantError, match="--engine dbquant cannot run this: the fast decoder's packed KV cache "
                                           "serves VidKV with ternary"):
        pick_engine(model, GenerateOptions("hi", kv="kivi2", engine="dbquant"))
    assert build_kv_cache(model, GenerateOptions("hi")) is None
    assert build_kv_cache(model, GenerateOptions("hi", kv="kivi2")) is not None
    with pytest.raises(DbquantError, match="max-new-tokens"):
        generate(model, tiny_tokenizer, GenerateOptions("hi", max_new_tokens=0))
    with pytest.raises(DbquantError, match="unknown prefill GEMM 'fp16'"):
        generate(model, tiny_tokenizer, GenerateOptions("hi", prefill_gemm="fp16"))
    with pytest.raises(DbquantError, match="unknown cache dtype 'bf16'"):
        generate(model, tiny_tokenizer, GenerateOptions("hi", cache_dtype="bf16"))
    g = generate(model, tiny_tokenizer, GenerateOptions("The quick", raw=True, max_new_tokens=4, engine="hf"))
    assert g.engine == "hf" and g.prompt_tokens == ids.shape[1] and 1 <= len(g.new_tokens) <= 4
    g = generate(model, tiny_tokenizer, GenerateOptions("The quick brown fox jumps", raw=True, max_new_tokens=12,
                                                        kv="1.5/1.58", kv_residual=0))
    assert g.engine == "dbquant" and "packed KV cache K1.5/V1.58" in g.speed
