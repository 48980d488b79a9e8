"""The ``code`` eval protocol: listed standard-library files, their sha256, windows spread over them."""

import hashlib
import json
import math

import pytest
import torch

from dbquant.cli import main
from dbquant.errors import DbquantError
from dbquant.eval import code
from dbquant.eval.protocols import evaluate
from dbquant.eval.wiki import wiki_windows

from .conftest import make_tiny_model

torch.set_num_threads(1)


def test_listed_files_exist_with_their_hashes():
    files = code.code_files()
    assert [f["name"] for f in files] == list(code.CODE_FILES) and len(files) >= 20
    for f in files:
        raw = (code.stdlib_dir() / f["name"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(raw).hexdigest() and f["text"] == raw.decode()


def test_missing_file_is_refused(monkeypatch):
    monkeypatch.setattr(code, "CODE_FILES", (*code.CODE_FILES, "no_such_module_xyz.py"))
    with pytest.raises(DbquantError, match="no_such_module_xyz.py"):
        code.code_files()


def test_spread_keeps_evenly_spaced_windows():
    rows = torch.arange(10).view(10, 1)
    assert code.spread(rows, 3).flatten().tolist() == [0, 3, 6]
    assert torch.equal(code.spread(rows, 20), rows)


def test_code_windows_are_wiki_windows_spread(tiny_tokenizer):
    files = code.code_files()
    every = wiki_windows(tiny_tokenizer, [f["text"] for f in files], seq_len=64, n_windows=10**9)
    got = code.code_windows(tiny_tokenizer, files, seq_len=64, n_windows=5)
    assert got.shape == (5, 64) and torch.equal(got, every[[j * len(every) // 5 for j in range(5)]])


def test_code_protocol_on_tiny_model(tiny_tokenizer):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    res = evaluate(model, tiny_tokenizer, "code", n_windows=3, seq_len=32, progress=False)
    assert res["protocol"] == "code" and res["n_windows"] == 3 and res["tokens"] == 3 * 31
    assert math.isfinite(res["ppl"]) and res["ppl"] > 1
    assert [f["name"] for f in res["files"]] == list(code.CODE_FILES)
    assert all(len(f["sha256"]) == 64 for f in res["files"])
    with pytest.raises(DbquantError, match="kv-ppl only"):
        evaluate(model, tiny_tokenizer, "code", kv={"kv": "2/2"})


def test_cli_eval_protocol_code(tiny_model_dir, capsys):
    assert main(["eval", str(tiny_model_dir), "--protocol", "code", "--windows", "2", "--seq-len", "32",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["protocol"] == "code" and res["n_windows"] == 2 and len(res["files"]) == len(code.CODE_FILES)
