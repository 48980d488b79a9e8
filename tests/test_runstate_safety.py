"""Run state is never unpickled; finished runs keep their checkpoints until the caller cleans up."""

import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from dbquant.calibration import runstate
from dbquant.calibration.blockwise import PerSample
from dbquant.calibration.runstate import RunState, make_fingerprint
from dbquant.errors import DbquantError
from dbquant.quant.fdb import DualBinaryWeight


class _Planted:
    """A pickle whose loading would create a marker file (what an attacker's payload would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _fp(**kw):
    return make_fingerprint(model={"id": "tiny"}, options={"lr": 1e-3, **kw})


def _run(work, **kw):
    return RunState(work, _fp(), writer=True, **kw)


def _payload():
    g = torch.Generator().manual_seed(0)
    w = DualBinaryWeight(planes=torch.randint(0, 2, (3, 4, 16), dtype=torch.uint8, generator=g),
                         alpha=torch.randn(4, 2, 3, generator=g), offset=None, in_features=13)
    x = torch.randn(3, 5, 8, generator=g)
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, generator=g)}},
           "param_groups": [{"lr": 1e-3 / 3, "betas": (0.9, 0.95), "eps": 1e-8, "foreach": None,
                             "amsgrad": False, "params": [0]}]}
    kwargs = {"position_embeddings": (x[0], x[1]), "attention_mask": None, "use_cache": False,
              "rope": PerSample((x[:, :2], x[:, 2:])), "dtype": torch.bfloat16, "inf": float("-inf")}
    return {"stage": "blockwise", "position": {"block": 1, "step": 2}, "optimizer": opt, "w": w,
            "x": x, "x_view": x[1:], "x_t": x.transpose(0, 1), "kwargs": kwargs, "empty": torch.zeros(0, 3),
            "bools": torch.tensor([True, False])}


def _same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, (DualBinaryWeight, PerSample)):
        _same(vars(a), vars(b))
    else:
        assert a == b or (a != a and b != b), (a, b)


def test_round_trip_is_exact_and_not_a_pickle(tmp_path):
    run = _run(tmp_path / "w")
    payload = _payload()
    run.save("state.pt", payload)
    raw = (tmp_path / "w" / "state.pt").read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # safetensors: 8-byte header length, then JSON
    back = run.load("state.pt")
    assert back["version"] == runstate.STATE_VERSION
    _same({k: back[k] for k in payload}, payload)


def test_unstorable_objects_are_refused_at_save(tmp_path):
    with pytest.raises(DbquantError, match="cannot store a .*_Planted"):
        _run(tmp_path / "w").save("state.pt", {"x": _Planted(tmp_path / "m")})


@pytest.mark.parametrize("how", ["pickle", "torch-zip"])
@pytest.mark.parametrize("name", ["state.pt", "block-000.pt"])
def test_planted_pickle_is_refused_and_never_run(tmp_path, how, name):
    work, marker = tmp_path / "w", tmp_path / "PWNED"
    run = _run(work)
    run.save("state.pt", {"stage": "blockwise", "position": {"block": 1, "step": 0}})
    evil = {"fingerprint": _fp(), "version": runstate.STATE_VERSION, "x": _Planted(marker)}
    if how == "pickle":
        (work / name).write_bytes(pickle.dumps(evil))
    else:
        torch.save(evil, work / name)
        assert zipfile.is_zipfile(work / name)
    with pytest.raises(DbquantError, match="pickle.*never unpickles"):
        _run(work, resume=True).load(name)
    assert not marker.exists()


def test_foreign_or_corrupt_state_gives_one_error(tmp_path):
    work = tmp_path / "w"
    run = _run(work)
    run.save("state.pt", {"stage": "dad", "position": {"step": 1}, "t": torch.ones(3)})
    good = (work / "state.pt").read_bytes()
    bad = {"truncated": good[:-5], "garbage": b"hello world, not a checkpoint",
           "empty": b"", "no meta": None}
    from safetensors.torch import save_file
    for what, data in bad.items():
        if data is None:
            save_file({"t": torch.ones(2)}, work / "state.pt")
        else:
            (work / "state.pt").write_bytes(data)
        with pytest.raises(DbquantError, match="checkpoint"):
            _run(work, resume=True)


@pytest.mark.parametrize("meta", ['{"__dict__": 5}', '{"__tensor__": "t9"}', '{"__evil__": 1}',
                                  '{"__dataclass__": "os:system", "fields": {}}',
                                  '{"__dataclass__": "dbquant.quant.fdb:DualBinaryWeight", "fields": {"planes": 1}}',
                                  '{"__dtype__": "nn"}', "[" * 5000 + "]" * 5000, "not json",
                                  '{"__dict__": [["version", 1]]}'])
def test_malformed_metadata_is_refused(tmp_path, meta):
    from safetensors.torch import save_file

    work = tmp_path / "w"
    work.mkdir()
    save_file({"t0": torch.ones(2)}, work / "state.pt", metadata={runstate.META_KEY: meta})
    with pytest.raises(DbquantError, match="checkpoint|run state"):
        _run(work, resume=True)


def test_finish_keeps_checkpoints_and_resume_goes_to_the_result(tmp_path):
    work = tmp_path / "w"
    run = _run(work)
    run.save("block-000.pt", {"params": {"a": torch.ones(2)}})
    weights = {"model.layers.0.mlp.up_proj": _payload()["w"]}
    run.finish({"weights": weights})
    assert sorted(p.name for p in work.glob("*.pt")) == ["block-000.pt", "final.pt", "state.pt"]
    with pytest.raises(DbquantError, match="--resume"):  # a finished run is not silently discarded
        _run(work)
    again = _run(work, resume=True)
    assert again.finished
    _same(again.final()["weights"], weights)
    again.cleanup()
    assert not list(work.glob("*.pt")) and (work / "log.jsonl").is_file()
    assert '"cleanup"' in (work / "log.jsonl").read_text()


def test_finished_without_final_file_is_a_clear_error(tmp_path):
    run = _run(tmp_path / "w")
    run.finish()
    again = _run(tmp_path / "w", resume=True)
    assert again.finished
    with pytest.raises(DbquantError, match="final.pt is missing"):
        again.final()


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (work / f".state.pt.tmp-{dead}").write_bytes(b"half")
    (work / f".acts-001.pt.tmp-{os.getppid()}").write_bytes(b"alive owner")  # a live process's file stays
    _run(work)
    assert sorted(p.name for p in work.iterdir()) == [f".acts-001.pt.tmp-{os.getppid()}", "log.jsonl"]


def test_no_unsafe_load_left_in_the_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hits = subprocess.run(["grep", "-rn", "--include=*.py", r"weights_only=False\|torch\.load(\|pickle\.load",
                           "dbquant", "calibration", "kernels"], cwd=root, capture_output=True, text=True).stdout
    assert hits == "", hits


def test_header_length_whose_first_byte_looks_like_a_pickle(tmp_path):
    """A safetensors header of 0x80 + 256*k bytes starts with 0x80 like a pickle; it must still load."""
    run = _run(tmp_path / "w")
    for pad in range(0, 300):
        run.save("state.pt", {"stage": "x" * pad, "position": {}})
        if (tmp_path / "w" / "state.pt").read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.skip("no padding gave a header length with first byte 0x80")
    assert run.load("state.pt")["stage"] == "x" * pad
