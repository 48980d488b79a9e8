"""The CLI end to end on a tiny random Llama, and its bad-input messages."""

import json

import pytest

from dbquant.cli import main


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


def test_activation_weighted_calibration(tmp_path, tiny_model_dir, capsys):
    code, _, _ = run(capsys, "quantize", tiny_model_dir, "-o", tmp_path / "q", "--group-size", 32,
                     "--calib", "wiki", "--calib-samples", 2, "--calib-seq-len", 32)
    assert code == 0
    report = json.loads((tmp_path / "q" / "dbquant-report.json").read_text())
    assert "stats_s" in report["times"]


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
