"""Fault injection: a quantize process killed (SIGKILL) at each stage boundary and inside the save,
then resumed, writes the same tensors as a run that was never interrupted.

The kill points are ``dbquant.faults`` points, reached by a real ``dbquant quantize`` subprocess
(no exception handler, ``finally`` or atexit runs after SIGKILL: what a power cut leaves).
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.conftest import TINY_TEXT

# block-wise on 2 blocks (3 steps each, a checkpoint every 2 steps), then DAD for 4 steps
ARGS = ["--group-size", "32", "--preset", "default", "--bw-samples", "4", "--bw-seq-len", "24", "--bw-steps", "3",
        "--bw-batch", "2", "--dad-samples", "4", "--dad-seq-len", "24", "--dad-steps", "4", "--dad-batch", "2",
        "--dad-topk", "8", "--checkpoint-every", "2"]
POINTS = [
    "saved:init.pt",          # after the FDB init, before block-wise
    "saved:state.pt#2",       # inside block 0
    "saved:block-000.pt",     # between block 0 and block 1
    "saved:teacher.pt",       # after block-wise and the teacher cache, before DAD
    "saved:state.pt#8",       # inside DAD
    "saved:final.pt",         # calibration done, output not written
    "output:before-rename",   # inside the save: the checkpoint is whole in its temp folder
]


def quantize(model_dir, calib, out, *extra, fault=None):
    env = {k: v for k, v in os.environ.items() if k != "DBQUANT_FAULT"}
    if fault:
        env["DBQUANT_FAULT"] = fault
    argv = [sys.executable, "-m", "dbquant", "quantize", str(model_dir), "-o", str(out), "--calib", calib,
            *ARGS, *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


def tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("faults")
    calib = d / "calib.txt"
    calib.write_text(TINY_TEXT * 3)
    r = quantize(tiny_model_dir, str(calib), d / "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    return d, str(calib), tensors(d / "ref")


@pytest.mark.slow  # ~10 s per point: two CLI processes each
@pytest.mark.parametrize("point", POINTS)
def test_kill_then_resume_writes_the_same_tensors(setup, tiny_model_dir, point):
    d, calib, ref = setup
    out = d / point.replace(":", "-").replace("#", "-")
    killed = quantize(tiny_model_dir, calib, out, fault=point)
    assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
    assert not out.exists()  # never a half-written output
    resumed = quantize(tiny_model_dir, calib, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = tensors(out)
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), (point, k)
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers  # the killed save's temp folder was cleaned by the next run
    assert not (d / f"{out.name}.work").exists()  # checkpoints discarded once the output validated


def test_an_unset_fault_point_does_nothing(monkeypatch):
    from dbquant import faults

    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("saved:state.pt")  # returns: the process is alive
    monkeypatch.setenv(faults.ENV, "saved:other.pt")
    faults.point("saved:state.pt")
