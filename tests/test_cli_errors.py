"""Bad CLI inputs: each gives one ``dbquant: error: ...`` line and exit code 2 (no traceback), Ctrl-C
one line and 130; ``inspect --source``; a KV cache that quantized nothing says so (issue 17)."""

import json
import shutil

import pytest

from dbquant import cli
from dbquant.calibration import pipeline
from dbquant.cli import main

from .conftest import make_tiny_model
from .test_calibration import cli_fdb_dad_argv


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single ``dbquant:`` line of stderr (progress bars aside); fails on a traceback or several."""
    lines = [line for line in err.splitlines() if line.startswith("dbquant:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def no_tokenizer_dir(tmp_path_factory):
    """A model folder with config.json and weights but no tokenizer files."""
    d = tmp_path_factory.mktemp("no-tokenizer")
    make_tiny_model(vocab_size=300).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def rtn_dir(tmp_path_factory, tiny_model_dir):
    """A quantized checkpoint (RTN, g32) of the tiny model."""
    d = tmp_path_factory.mktemp("rtn") / "q"
    assert main(["quantize", str(tiny_model_dir), "-o", str(d), "--method", "rtn", "--group-size", "32"]) == 0
    return d


@pytest.mark.parametrize("argv", [
    ["--calib", "none", "--dry-run"],
    ["--calib", "none", "--method", "rtn"],
])
def test_model_without_tokenizer(tmp_path, no_tokenizer_dir, capsys, argv):
    code, _, err = run(capsys, "quantize", no_tokenizer_dir, "-o", tmp_path / "q", *argv)
    line = one_error_line(err)
    assert code == 2 and line.startswith("dbquant: error:") and "tokenizer" in line
    assert not (tmp_path / "q").exists()


def test_eval_model_without_tokenizer(no_tokenizer_dir, capsys):
    code, _, err = run(capsys, "eval", no_tokenizer_dir, "--windows", 1, "--seq-len", 16)
    assert code == 2 and "tokenizer" in one_error_line(err)


@pytest.mark.parametrize("extra", [["--dry-run"], ["-o", "OUT"], ["-o", "OUT", "--streaming", "--no-dad"]])
def test_quantized_checkpoint_as_quantize_input(tmp_path, rtn_dir, capsys, extra):
    extra = [str(tmp_path / "out") if x == "OUT" else x for x in extra]
    code, _, err = run(capsys, "quantize", rtn_dir, "--calib", "none", *extra)
    line = one_error_line(err)
    assert code == 2 and "already quantized" in line and str(rtn_dir) in line


def test_inspect_modules_null(tmp_path, rtn_dir, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(rtn_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["modules"] = None
    (bad / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(capsys, "inspect", bad)
    assert code == 2 and one_error_line(err).startswith("dbquant: error:") and not out


def test_inspect_source_reports_relative_error(rtn_dir, tiny_model_dir, capsys):
    code, out, err = run(capsys, "inspect", rtn_dir, "--source", tiny_model_dir, "--json")
    assert code == 0, err
    rows = json.loads(out)["layers"]
    expect = json.loads((rtn_dir / "dbquant-report.json").read_text())["rel_weight_error"]
    assert {r["module"] for r in rows} == set(expect)
    for r in rows:  # the same ||W - W_q||^2 / ||W||^2 the quantize report recorded
        assert r["rel_error"] == pytest.approx(expect[r["module"]], rel=1e-4), r["module"]
    code, out, _ = run(capsys, "inspect", rtn_dir, "--source", tiny_model_dir)
    assert code == 0 and "rel err" in out.splitlines()[0]
    assert out.splitlines()[0].split()[5] == "offset" and out.splitlines()[1].split()[5] == "yes"  # rtn stores beta
    assert out.splitlines()[0].split()[4] == "scale" and out.splitlines()[1].split()[4] == "16"


def test_inspect_source_without_tokenizer_works(rtn_dir, no_tokenizer_dir, capsys):
    code, out, err = run(capsys, "inspect", rtn_dir, "--source", no_tokenizer_dir, "--json")
    assert code == 0, err
    assert all(r["rel_error"] > 0 for r in json.loads(out)["layers"])


def test_inspect_source_refuses_wrong_sources(tmp_path, rtn_dir, capsys):
    code, _, err = run(capsys, "inspect", rtn_dir, "--source", rtn_dir)  # a quantized "source"
    assert code == 2 and "dbquant checkpoint" in one_error_line(err)
    other = tmp_path / "wide"
    make_tiny_model(vocab_size=300, intermediate_size=128).save_pretrained(other)
    code, _, err = run(capsys, "inspect", rtn_dir, "--source", other)
    assert code == 2 and "not the model" in one_error_line(err)


@pytest.mark.parametrize("flag, value", [("--windows", -3), ("--windows", 0), ("--seq-len", 1), ("--seq-len", 0)])
def test_eval_sizes_out_of_range(tiny_model_dir, capsys, monkeypatch, flag, value):
    monkeypatch.setattr(cli, "load_fp_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    code, _, err = run(capsys, "eval", tiny_model_dir, flag, value)
    line = one_error_line(err)
    assert code == 2 and flag in line and str(value) in line


def test_uncreatable_output_refused_before_any_work(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_fp_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    code, _, err = run(capsys, "quantize", tiny_model_dir, "-o", "/proc/dbquant-test/out", "--calib", "none")
    line = one_error_line(err)
    assert code == 2 and "/proc/dbquant-test/out" in line and "cannot create" in line


def test_ctrl_c_before_a_checkpoint(tmp_path, tiny_model_dir, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quantize", interrupt)
    code, _, err = run(capsys, "quantize", tiny_model_dir, "-o", tmp_path / "q", "--calib", "none")
    assert code == 130 and "interrupted" in one_error_line(err)


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):  # noqa: F811
    def interrupt(*args, **kwargs):  # Ctrl-C once block-wise has checkpointed
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "export_weights", interrupt)
    code, _, err = run(capsys, *cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "q"))
    line = one_error_line(err)
    work = tmp_path / "q.work"
    assert code == 130 and "--resume" in line and str(work) in line and (work / "state.pt").is_file()
    monkeypatch.undo()
    code, _, err = run(capsys, *cli_fdb_dad_argv(tiny_model_dir, text_file, tmp_path / "q", "--resume"))
    assert code == 0, err
    assert (tmp_path / "q" / "config.json").is_file() and not work.exists()


def test_kv_cache_that_quantized_nothing_says_so(tiny_model_dir, capsys):
    # windows of 16 tokens: a 12-token prefix is inside the default full-precision residual
    code, out, err = run(capsys, "eval", tiny_model_dir, "--protocol", "kv-ppl", "--kv", "2/2", "--windows", 1,
                         "--seq-len", 16, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["kv_tokens_quantized"] == 0 and "quantized no token" in res["kv_note"]
    code, out, _ = run(capsys, "eval", tiny_model_dir, "--protocol", "kv-ppl", "--kv", "2/2", "--windows", 1,
                       "--seq-len", 16)
    assert code == 0 and "quantized no token" in out
    # no residual and a prefix of whole groups: tokens are quantized, no note
    code, out, _ = run(capsys, "eval", tiny_model_dir, "--protocol", "kv-ppl", "--kv", "2/2", "--windows", 1,
                       "--seq-len", 64, "--kv-residual", 0, "--kv-sink", 0, "--json")
    res = json.loads(out)
    assert code == 0 and res["kv_tokens_quantized"] > 0 and res["kv_note"] is None


def test_generate_kv_that_quantized_nothing_warns(tiny_model_dir, capsys):
    code, _, err = run(capsys, "generate", tiny_model_dir, "--prompt", "hi", "--max-new-tokens", 3, "--raw",
                       "--kv", "2/2")
    assert code == 0 and "dbquant: warning:" in err and "quantized no token" in err
