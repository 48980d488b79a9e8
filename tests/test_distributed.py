"""Data-parallel DAD on torch.distributed (gloo, 2 CPU processes) matches the 1-process run.

Same global batch, same steps: the 2-process run gives every rank half of each batch
and DDP averages the gradients, so the trained scales equal the 1-process ones up to
float summation order (tolerance below); only rank 0 writes; resume works across ranks.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from dbquant.calibration import distributed, runstate
from dbquant.calibration.blockwise import export_weights, to_fakequant
from dbquant.calibration.dad import DADConfig, distill, teacher_cache
from dbquant.calibration.runstate import RunState, make_fingerprint
from dbquant.cli import main
from dbquant.quant import fdb
from dbquant.quantize import QuantizeOptions, make_plan
from tests.tolerances import ACCUMULATED_GRAD_ATOL, ACCUMULATED_GRAD_RTOL, FP16_SCALE

from .conftest import TINY_TEXT, make_tiny_model

# Scales after a few Adam steps: the 2-process gradient is the mean of two half-batch means,
# equal to the full-batch mean up to float reassociation (~1e-7 relative per step).
RTOL, ATOL = ACCUMULATED_GRAD_RTOL, ACCUMULATED_GRAD_ATOL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dad_run(work_dir=None, resume=False, interrupt=None, steps=6) -> dict:
    """A short DAD on a tiny random Llama (global batch 4); returns {name: alpha} (and planes)."""
    torch.manual_seed(0)
    model = make_tiny_model()
    plan = make_plan(model, QuantizeOptions(group_size=32))
    init = {p.name: fdb.quantize_fdb(model.get_submodule(p.name).weight.detach(), p.layout.group_size)
            for p in plan}
    batches = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(0))
    teacher = teacher_cache(model, batches, 16, progress=False)
    to_fakequant(model, [p.name for p in plan], init)
    run = RunState(work_dir, make_fingerprint(test="ddp"), resume=resume, checkpoint_every=2)
    run.sync()
    runstate.TEST_HOOKS["interrupt_after_steps"] = interrupt
    try:
        distill(model, batches, teacher, DADConfig(steps=steps, batch_size=4, lr=2e-2, topk=16, warmup=1), run,
                progress=False)
    except runstate.Interrupted:
        return {}
    finally:
        runstate.TEST_HOOKS["interrupt_after_steps"] = None
    w = export_weights(model, [p.name for p in plan])
    return {n: {"alpha": q.alpha, "b1": q.b1, "b2": q.b2} for n, q in w.items()}


def _worker(rank, world, port, out, work_dir, resume, interrupt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu")
    try:
        res = _dad_run(work_dir, resume, interrupt)
        torch.save(res, f"{out}.rank{rank}")
    finally:
        distributed.close()


def _spawn(tmp_path, tag, work_dir=None, resume=False, interrupt=None):
    out = tmp_path / tag
    mp.spawn(_worker, args=(2, _free_port(), str(out), work_dir, resume, interrupt), nprocs=2, join=True)
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def _assert_close(a: dict, b: dict):
    assert sorted(a) == sorted(b) and a
    for n in a:
        torch.testing.assert_close(a[n]["alpha"], b[n]["alpha"], rtol=RTOL, atol=ATOL, msg=n)
        assert torch.equal(a[n]["b1"], b[n]["b1"]) and torch.equal(a[n]["b2"], b[n]["b2"]), n


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.set_num_threads(1)
    one = _dad_run()
    r0, r1 = _spawn(tmp_path, "ddp")
    _assert_close(one, r0)
    for n in r0:  # the ranks agree exactly: identical averaged gradients, identical updates
        assert torch.equal(r0[n]["alpha"], r1[n]["alpha"]), n
    start = {p: fdb.quantize_fdb(make_tiny_model().get_submodule(p).weight.detach(), 32).alpha for p in one}
    assert any(not torch.allclose(start[n], one[n]["alpha"]) for n in one)  # training did move the scales


def test_two_processes_resume_and_only_rank0_writes(tmp_path):
    torch.set_num_threads(1)
    work = tmp_path / "work"
    assert _spawn(tmp_path, "killed", str(work), interrupt=3) == [{}, {}]
    assert (work / "state.pt").is_file()
    logged = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    # one writer: no duplicates
    assert [r["step"] for r in logged if r.get("stage") == "dad" and "step" in r] == [0, 1, 2, 3]
    r0, _ = _spawn(tmp_path, "resumed", str(work), resume=True)
    _assert_close(_dad_run(), r0)


def test_local_slice_in_one_process_is_the_whole_batch():
    idx = torch.arange(5)
    assert torch.equal(distributed.local_slice(idx), idx)  # one process: the whole batch


@pytest.mark.parametrize("nproc", [2])
def test_torchrun_cli_matches_single_process(tmp_path, tiny_model_dir, nproc):
    text = tmp_path / "calib.txt"
    text.write_text(TINY_TEXT * 3)
    args = [str(tiny_model_dir), "--calib", str(text), "--group-size", "32", "--preset", "default",
            "--bw-samples", "4", "--bw-seq-len", "16", "--bw-steps", "2", "--dad-samples", "8",
            "--dad-seq-len", "16", "--dad-steps", "4", "--dad-batch", "4", "--dad-topk", "8",
            # fp32: the codes must match bit for bit; under bf16 autocast (auto on a CPU with fast bf16) the
            # two processes' gradient sums round differently and a code at a level midpoint may flip
            "--dad-autocast", "off", "--json"]
    assert main(["quantize", *args[:1], "--output", str(tmp_path / "one"), *args[1:]]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(_free_port()), "-m", "dbquant", "quantize", args[0],
                           "--output", str(tmp_path / "ddp"), *args[1:]], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("{")]) == 1  # rank 0 alone reports
    one, ddp = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "ddp" / "model.safetensors")
    assert sorted(one) == sorted(ddp)
    for k in one:
        if k.endswith("qweight"):
            assert torch.equal(one[k], ddp[k]), k
        else:
            torch.testing.assert_close(one[k].float(), ddp[k].float(), rtol=FP16_SCALE, atol=ACCUMULATED_GRAD_ATOL,
                                       msg=k)
    log = (tmp_path / "ddp" / "dbquant-log.jsonl").read_text()
    assert '"stage": "dad"' in log
