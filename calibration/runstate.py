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

The ``.pt`` names are kept, but no file is a pickle: each is a safetensors file whose
tensors are the payload's tensors and whose header metadata (key ``dbquant-runstate``)
holds everything else as JSON (:func:`encode` / :func:`decode`). Loading never runs code
from the file: a pickle (an older dbquant's checkpoint, or a planted file) is refused.

A completed run is recorded, not deleted: :meth:`RunState.finish` writes ``final.pt`` (the
calibrated weights) and marks ``state.pt`` stage ``finished``, so ``--resume`` can go
straight to packing and saving when the save failed. The caller deletes the checkpoints
with :meth:`RunState.cleanup` only once the output exists and validates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dbquant import faults
from dbquant.calibration.distributed import barrier, is_writer
from dbquant.errors import DbquantError
from dbquant.format.files import pid_alive

STATE_VERSION = 2  # 1 was a torch.save pickle: refused, never unpickled
META_KEY = "dbquant-runstate"  # safetensors header metadata key holding the JSON part of a payload
FINISHED = "finished"  # stage of state.pt once the run completed (weights in final.pt)

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


# ---------------------------------------------------------------- pickle-free storage
# A payload is a tree of dicts (any str/int/float/bool keys), lists, tuples, tensors, numbers,
# strings, None, torch dtypes/devices and dataclasses of dbquant modules (DualBinaryWeight,
# PerSample). encode() moves every tensor into a flat {"tN": tensor} dict and returns a JSON
# tree where each non-JSON node is a one-key tagged object; decode() is its strict inverse.

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__", "__dtype__", "__device__", "__dataclass__")


def encode(obj, tensors: dict[str, torch.Tensor]):
    """JSON-able tree of ``obj``; its tensors are added to ``tensors`` under the names the tree cites."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and cls.__module__.startswith("dbquant."):
        fields = {f.name: encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj) if f.init}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise DbquantError(f"run state cannot store a {cls.__module__}.{cls.__qualname__} ({obj!r:.80}); "
                       "only tensors, numbers, strings, containers and dbquant dataclasses")


def _bad(why: str):
    raise DbquantError(f"malformed run state: {why}")


def _dataclass(spec, fields: dict, tensors: dict):
    """The dbquant dataclass named ``module:qualname``, only from a module already imported (no import here)."""
    if not isinstance(spec, str) or ":" not in spec or not spec.startswith("dbquant."):
        _bad(f"dataclass {spec!r} is not a dbquant class")
    mod, _, qual = spec.partition(":")
    cls = getattr(sys.modules.get(mod), qual, None)
    if cls is None or not isinstance(cls, type) or not dataclasses.is_dataclass(cls) or not isinstance(fields, dict):
        _bad(f"dataclass {spec!r} is unknown (module not loaded) or its fields are malformed")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(fields) != names:
        _bad(f"dataclass {spec} has fields {sorted(fields)}, expected {sorted(names)}")
    return cls(**{k: decode(v, tensors) for k, v in fields.items()})


def decode(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`encode`; ``DbquantError`` for anything it could not have written."""
    if tree is None or isinstance(tree, (bool, str, int, float)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict) or not tree or next(iter(tree)) not in _TAGS:
        _bad(f"unexpected node {str(tree)[:80]}")
    tag, value = next(iter(tree.items()))
    if tag == "__dataclass__":
        return _dataclass(value, tree.get("fields"), tensors)
    if len(tree) != 1:
        _bad(f"node {str(tree)[:80]} has extra keys")
    if tag == "__tensor__":
        if value not in tensors:
            _bad(f"tensor {value!r} is cited but not stored")
        return tensors[value]
    if tag in ("__tuple__", "__dict__") and not isinstance(value, list):
        _bad(f"{tag} holds a {type(value).__name__}, not a list")
    if tag == "__tuple__":
        return tuple(decode(v, tensors) for v in value)
    if tag == "__dict__":
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
            _bad("a dict entry is not a [key, value] pair")
        out = {}
        for k, v in value:
            k = decode(k, tensors)
            if not isinstance(k, (str, int, float, bool, tuple)) and k is not None:
                _bad(f"dict key of type {type(k).__name__}")
            out[k] = decode(v, tensors)
        return out
    if tag == "__float__":
        if value not in ("nan", "inf", "-inf"):
            _bad(f"float {value!r}")
        return float(value)
    if tag == "__dtype__":
        dt = getattr(torch, str(value), None)
        if not isinstance(dt, torch.dtype):
            _bad(f"dtype {value!r}")
        return dt
    try:  # __device__
        return torch.device(value)
    except (RuntimeError, TypeError):
        _bad(f"device {value!r}")


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors safetensors accepts: each contiguous and the sole owner of its whole storage.

    Views, slices and tensors sharing memory are copied (safetensors refuses shared storage);
    everything else is written without a copy.
    """
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if t.numel() and (not t.is_contiguous() or not whole or ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def atomic_save(obj: dict, path: Path) -> None:
    """Write ``obj`` (see :func:`encode`) as a safetensors file, atomically (temp name + os.replace)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(encode(obj, tensors), allow_nan=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(_storable(tensors), tmp, metadata={META_KEY: meta})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# First bytes of a pickle (protocol 2+) and of torch.save's zip container.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


def read_state_file(path: Path) -> dict:
    """The payload of a file written by :func:`atomic_save`. Never unpickles anything.

    Raises ``DbquantError`` for a pickle (an older dbquant's ``torch.save`` checkpoint, or a
    planted file), a truncated or foreign file, or malformed metadata.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    # A safetensors file starts with its header length (u64 LE, any first byte) and then "{".
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and head.startswith(_PICKLE_MAGIC):
        raise DbquantError(f"checkpoint {path} is a pickle (torch.save) file: an older dbquant's checkpoint or a "
                           "file planted in the work dir. dbquant never unpickles run state; start over with "
                           "--overwrite (or remove the file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / foreign bytes
        raise DbquantError(f"cannot read checkpoint {path} (not a dbquant run-state file: {e}); "
                           "start over with --overwrite") from None
    if meta is None:
        raise DbquantError(f"checkpoint {path} has no {META_KEY!r} metadata; it was not written by dbquant")
    try:
        tree = json.loads(meta)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DbquantError(f"checkpoint {path} has corrupt metadata ({e}); start over with --overwrite") from None
    try:
        obj = decode(tree, tensors)
    except DbquantError as e:
        raise DbquantError(f"checkpoint {path}: {e}; start over with --overwrite") from None
    except (RecursionError, ValueError, TypeError) as e:
        raise DbquantError(f"checkpoint {path} has malformed metadata ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
        version = obj.get("version") if isinstance(obj, dict) else None
        raise DbquantError(f"checkpoint {path} has run-state version {version!r}; this dbquant reads "
                           f"{STATE_VERSION}; start over with --overwrite")
    return obj


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files that a killed process left in ``folder`` (PID no longer running)."""
    gone = []
    for f in folder.glob(".*.tmp-*"):
        pid = f.name.rpartition(".tmp-")[2]
        if f.is_file() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


def discard_checkpoints(work_dir: str | os.PathLike) -> None:
    """Delete every checkpoint of a work dir (``*.pt``); the log stays. For callers without a RunState."""
    d = Path(work_dir)
    if d.is_dir():
        for f in d.glob("*.pt"):
            f.unlink(missing_ok=True)


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
            remove_stale_temps(self.dir)  # half-written files of a killed run
        if resume and not state_path.exists() and self._started_here():
            # killed before its first checkpoint: nothing to continue, so start this same run over
            resume = False
            self.log({"event": "resume-from-start", "reason": "no checkpoint was written before the stop"})
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

    def _started_here(self) -> bool:
        """Whether this work dir's log shows a start of the same run (same fingerprint)."""
        log = self.dir / "log.jsonl"
        if not log.is_file():
            return False
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("event") == "start" and rec.get("fingerprint") == self.fingerprint["hash"]:
                return True
        return False

    # ---------------------------------------------------------------- files
    def _check(self, obj: dict, path: Path) -> dict:
        fp = obj.get("fingerprint") if isinstance(obj, dict) else None
        if not isinstance(fp, dict) or fp.get("hash") != self.fingerprint["hash"]:
            diffs = _diff(fp if isinstance(fp, dict) else {}, self.fingerprint) or ["(unreadable fingerprint)"]
            raise DbquantError(f"checkpoint {path} was written by a different run and cannot be resumed; "
                               f"differences: {'; '.join(diffs[:6])}. Start over with --overwrite, or "
                               "rerun with the original model, options and data")
        return obj

    def _load_file(self, path: Path) -> dict:
        return self._check(read_state_file(path), path)  # safetensors + JSON: never unpickled

    def save(self, name: str, payload: dict) -> None:
        """Write ``payload`` (tensors, numbers, strings, containers, dbquant dataclasses) to ``name`` atomically."""
        if self.dir is None or not self.writer:
            return
        atomic_save({"version": STATE_VERSION, "fingerprint": self.fingerprint, **payload}, self.dir / name)
        faults.point(f"saved:{name}")

    def load(self, name: str) -> dict | None:
        if self.dir is None or not (self.dir / name).exists():
            return None
        return self._load_file(self.dir / name)

    def remove(self, name: str) -> None:
        if self.writer and self.dir is not None and (self.dir / name).exists():
            (self.dir / name).unlink()

    def finish(self, payload: dict | None = None) -> None:
        """Record that the run completed; keep every checkpoint (the output is not written yet).

        payload: what the caller needs to produce the output without recalibrating, e.g.
        ``{"weights": {name: DualBinaryWeight}}``; stored as ``final.pt``. ``state.pt`` then
        says stage ``finished``, so ``--resume`` after a failed save can go straight to
        packing/saving (:attr:`finished`, :meth:`final`). Delete the files with
        :meth:`cleanup` once the output exists and validates.
        """
        if self.dir is None or not self.writer:
            return
        if payload is not None:
            self.save("final.pt", payload)
        self.save("state.pt", {"stage": FINISHED, "position": {}})  # last: final.pt is complete when this says so
        self.log({"event": "done", "seconds": round(time.perf_counter() - self.t0, 2)})

    @property
    def finished(self) -> bool:
        """Whether the resumed checkpoint is a completed run (its result in ``final.pt``)."""
        return (self.resumed or {}).get("stage") == FINISHED

    def final(self) -> dict:
        """The payload :meth:`finish` stored; ``DbquantError`` if the completed run left none."""
        out = self.load("final.pt")
        if out is None:
            raise DbquantError(f"resume: {self.dir}/final.pt is missing although state.pt says the run finished; "
                               "start over with --overwrite")
        return out

    def cleanup(self) -> None:
        """Delete the checkpoints (the log stays). Call only after the output exists and validates."""
        if self.dir is None or not self.writer:
            return
        self.log({"event": "cleanup"})
        discard_checkpoints(self.dir)

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
                       "Lower the learning rates (--bw-lr / --bw-lr-weight for block-wise, --dad-lr / "
                       "--dad-lr-weight for DAD) or clip gradients (--grad-clip), then rerun")
