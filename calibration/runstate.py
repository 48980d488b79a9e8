"""Run hygiene for long calibrations: work dir, fingerprint, atomic checkpoints, log, guards.

A run keeps its state in a *work dir* (by default next to the output folder):

- ``state.pt``   the latest checkpoint: fingerprint, stage, position (block, step), the
                 trainable tensors of the stage in progress and its optimizer state;
- ``init.pt``    the FDB initialisation (scales only: bits follow from the weights);
- ``teacher.pt`` the teacher's cached top-k logits for DAD;
- ``acts.pt``    block-wise activations at the start of the current block;
- ``block-NNN.pt`` the calibrated parameters of each finished block;
- ``log.jsonl``  one JSON object per logged step (losses, learning rates, times).

Every file is written to a temporary name and moved into place with ``os.replace``, so a
run killed at any instant leaves either the old or the new file, never half of one.
Each file carries the run's fingerprint (a hash of model, options and data); ``--resume``
refuses state whose fingerprint differs and says which part changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from dbquant.calibration.distributed import barrier, is_writer
from dbquant.errors import DbquantError

STATE_VERSION = 1

# Test hook: raise _Interrupted after this many optimizer steps (counted over all stages of
# one process). Lets tests "kill" a run mid-stage at a deterministic point.
TEST_HOOKS: dict = {"interrupt_after_steps": None}


class Interrupted(RuntimeError):
    """Raised by the test hook to simulate a killed run (never raised in normal use)."""


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_digest(model) -> str:
    """Cheap identity of a model's weights: config plus a hash of a strided sample of every parameter."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def make_fingerprint(**parts) -> dict:
    """A fingerprint is a flat dict of JSON-able parts (model, options, data) plus their hash."""
    body = json.loads(json.dumps(parts, sort_keys=True, default=str))
    body["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k == "hash":
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs now {vb!r}")
    return out


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunState:
    """The work dir of one calibration run: checkpoints, log, fingerprint, step counter."""

    def __init__(self, work_dir: str | os.PathLike | None, fingerprint: dict, resume: bool = False,
                 checkpoint_every: int = 0, overwrite: bool = False, writer: bool | None = None):
        self.dir = None if work_dir is None else Path(work_dir)
        # Under torch.distributed only rank 0 writes; the other ranks read the same files on resume.
        self.writer = is_writer() if writer is None else writer
        self.fingerprint = fingerprint
        self.checkpoint_every = checkpoint_every
        self.steps_this_process = 0
        self.t0 = time.perf_counter()
        self.resumed: dict | None = None
        if self.dir is None:
            return
        state_path = self.dir / "state.pt"
        if state_path.exists() and not resume and not overwrite:
            raise DbquantError(f"work dir {self.dir} holds a checkpoint of an earlier run; pass --resume to "
                               "continue it or --overwrite to start over")
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
        if resume:
            if not state_path.exists():
                raise DbquantError(f"--resume: no checkpoint in {self.dir} (state.pt is missing); "
                                   "run without --resume to start")
            state = self._load_file(state_path)
            self.resumed = state
            self.log({"event": "resume", "stage": state.get("stage"), "position": state.get("position")})
        elif self.writer:
            for f in self.dir.glob("*.pt"):
                f.unlink()
            self.log({"event": "start", "fingerprint": fingerprint["hash"]})

    # ---------------------------------------------------------------- files
    def _check(self, obj: dict, path: Path) -> dict:
        fp = obj.get("fingerprint") if isinstance(obj, dict) else None
        if fp is None or fp.get("hash") != self.fingerprint["hash"]:
            diffs = _diff(fp or {}, self.fingerprint) or ["(unreadable fingerprint)"]
            raise DbquantError(f"checkpoint {path} was written by a different run and cannot be resumed; "
                               f"differences: {'; '.join(diffs[:6])}. Start over with --overwrite, or "
                               "rerun with the original model, options and data")
        return obj

    def _load_file(self, path: Path) -> dict:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated or foreign file
            raise DbquantError(f"cannot read checkpoint {path}: {e}") from e
        return self._check(obj, path)

    def save(self, name: str, payload: dict) -> None:
        if self.dir is None or not self.writer:
            return
        atomic_save({"version": STATE_VERSION, "fingerprint": self.fingerprint, **payload}, self.dir / name)

    def load(self, name: str) -> dict | None:
        if self.dir is None or not (self.dir / name).exists():
            return None
        return self._load_file(self.dir / name)

    def remove(self, name: str) -> None:
        if self.writer and self.dir is not None and (self.dir / name).exists():
            (self.dir / name).unlink()

    def finish(self) -> None:
        """Drop the checkpoints of a completed run (the log stays)."""
        if self.dir is None or not self.writer:
            return
        self.log({"event": "done", "seconds": round(time.perf_counter() - self.t0, 2)})
        for f in self.dir.glob("*.pt"):
            f.unlink()

    # ---------------------------------------------------------------- log & steps
    def log(self, record: dict) -> None:
        if self.dir is None or not self.writer:
            return
        record = {"t": round(time.perf_counter() - self.t0, 3), **record}
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_text(self) -> str:
        if self.dir is None or not (self.dir / "log.jsonl").exists():
            return ""
        return (self.dir / "log.jsonl").read_text()

    def sync(self) -> None:
        """Wait for every rank (distributed runs): called after resume reads, before rank 0
        may replace or remove the files just read."""
        barrier()

    def step_done(self) -> bool:
        """Count an optimizer step; True when a periodic checkpoint is due. Fires the test hook."""
        self.steps_this_process += 1
        limit = TEST_HOOKS.get("interrupt_after_steps")
        if limit is not None and self.steps_this_process > limit:
            raise Interrupted(f"test hook: interrupted after {limit} steps")
        return bool(self.checkpoint_every) and self.steps_this_process % self.checkpoint_every == 0


def check_finite(loss: torch.Tensor, stage: str, where: str, step: int, modules=None) -> None:
    """Stop with a clear message when a loss (or a parameter / gradient) is NaN or Inf.

    Args:
        modules: optional iterable of (name, module) whose parameters and gradients are
            scanned to name the first layer that went non-finite.
    """
    value = float(loss.detach())
    if math.isfinite(value):
        return
    culprit = ""
    for name, mod in modules or ():
        for pname, p in mod.named_parameters(recurse=False):
            for kind, t in (("value", p), ("gradient", p.grad)):
                if t is not None and not torch.isfinite(t).all():
                    culprit = f"; first non-finite tensor: {name}.{pname} ({kind})"
                    break
            if culprit:
                break
        if culprit:
            break
    raise DbquantError(f"non-finite loss ({value}) in stage {stage}, {where}, step {step}{culprit}. "
                       "Lower the learning rate (--lr-scale) or enable gradient clipping, then rerun")
