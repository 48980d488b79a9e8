"""Fuzz the loader: corrupted headers, metadata, configs and tensor bytes of a tiny packed checkpoint.

Every generated corruption must end in one of two ways:
- ``DbquantError`` (one clear line): anything else raised is a traceback and fails the test;
- a load that is *faithful*: every tensor of the loaded model equals, bit for bit, the tensor of
  the same name in the files, no file tensor is left unused, and a corruption of
  ``quantization_config`` that loads gives the reference logits exactly. A load that invented
  or dropped a tensor (random init, ignored offset, unlisted module) is a silent wrong load.

Bytes inside tensor data cannot be told from real weights without checksums, so a flipped
data byte loads faithfully (the model holds what the file holds); that is the documented
limit (docs/FORMAT.md, Guarantees).
"""

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import dbquant
from dbquant.errors import DbquantError
from dbquant.quantize import QuantizeOptions, quantize
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
EXAMPLES = 520

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The pristine files (bytes) of a tiny packed checkpoint with an offset, its logits, and a scratch dir."""
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_model(num_hidden_layers=1)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32, offset=True, iters=1),
             progress=False)
    dbquant.save(model, root / "src")
    files = {f.name: f.read_bytes() for f in (root / "src").iterdir()}
    return {"files": files, "logits": model(IDS).logits, "dir": root / "work"}


def _split(st_bytes: bytes):
    (n,) = struct.unpack("<Q", st_bytes[:8])
    return json.loads(st_bytes[8:8 + n]), st_bytes[8 + n:]


def _join(header, data: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _pick(draw, seq):
    seq = sorted(seq)
    return seq[draw(st.integers(0, len(seq) - 1))]


# ---------------------------------------------------------------- mutations: (files) -> (files, kind)

def _mutate_bytes(draw, data: bytes, lo: int, hi: int) -> bytes:
    """Flip, overwrite, delete or insert bytes in data[lo:hi], or truncate there."""
    op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
    i = draw(st.integers(lo, max(lo, hi - 1)))
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if op == "set":
        return data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    if op == "delete":
        return data[:i] + data[i + draw(st.integers(1, 16)):]
    if op == "insert":
        return data[:i] + draw(st.binary(min_size=1, max_size=16)) + data[i:]
    return data[:i]


def header_bytes(draw, files):
    raw = files["model.safetensors"]
    (n,) = struct.unpack("<Q", raw[:8])
    return {**files, "model.safetensors": _mutate_bytes(draw, raw, 0, 8 + n)}, "header-bytes"


def header_json(draw, files):
    header, data = _split(files["model.safetensors"])
    name = _pick(draw, [k for k in header if k != "__metadata__"])
    op = draw(st.sampled_from(["field", "drop-field", "drop-tensor", "rename", "add", "swap-offsets"]))
    entry = header[name]
    if op == "field":
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
    elif op == "drop-field":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    elif op == "drop-tensor":
        header.pop(name)
    elif op == "rename":
        header[name + draw(st.sampled_from(["x", ".qweight", ".offset", ""]))[:len(name) + 9]] = header.pop(name)
    elif op == "add":
        header[draw(st.text(min_size=1, max_size=20))] = draw(JSON_VALUES)
    else:
        other = _pick(draw, [k for k in header if k not in ("__metadata__", name)])
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    return {**files, "model.safetensors": _join(header, data, pad=draw(st.booleans()))}, "header-json"


def metadata(draw, files):
    header, data = _split(files["model.safetensors"])
    meta = header["__metadata__"]
    facts = json.loads(meta["dbquant"])
    op = draw(st.sampled_from(["text", "fact", "drop-fact", "drop-key", "non-string"]))
    if op == "text":
        meta["dbquant"] = draw(st.text(max_size=40))
    elif op == "fact":
        facts[_pick(draw, facts)] = draw(JSON_VALUES)
        meta["dbquant"] = json.dumps(facts)
    elif op == "drop-fact":
        facts.pop(_pick(draw, facts))
        meta["dbquant"] = json.dumps(facts)
    elif op == "drop-key":
        meta.pop("dbquant")
    else:
        meta["dbquant"] = draw(JSON_VALUES.filter(lambda v: not isinstance(v, str)))
    return {**files, "model.safetensors": _join(header, data)}, "metadata"


def config(draw, files):
    cfg = json.loads(files["config.json"])
    qc = cfg["quantization_config"]
    op = draw(st.sampled_from(["value", "drop", "modules", "bytes"]))
    if op == "bytes":
        raw = files["config.json"]
        return {**files, "config.json": _mutate_bytes(draw, raw, 0, len(raw))}, "config-bytes"
    if op == "value":
        # not bpw (informative) nor backend (a run-time kernel choice: a valid one changes the logits by
        # float rounding, which tests/test_checkpoint.py bounds; an invalid one is refused in test_load_guards)
        qc[_pick(draw, [k for k in qc if k not in ("bpw", "backend")])] = draw(JSON_VALUES | st.sampled_from(
            [True, False, 8, 16, 64, 128, 4096, 2, "dbquant-fdb", "auto", "ref", None, []]))
    elif op == "drop":
        qc.pop(_pick(draw, qc))
    else:
        mods = qc["modules"]
        sub = draw(st.lists(st.sampled_from(mods), unique=True, max_size=len(mods)))
        qc["modules"] = draw(st.sampled_from([sub, sub + ["model.norm"], sub + ["lm_head"], sub[::-1]]))
    return {**files, "config.json": json.dumps(cfg).encode()}, "config"


def tensor_bytes(draw, files):
    raw = files["model.safetensors"]
    (n,) = struct.unpack("<Q", raw[:8])
    return {**files, "model.safetensors": _mutate_bytes(draw, raw, 8 + n, len(raw))}, "tensor-bytes"


MUTATIONS = [header_bytes, header_json, metadata, config, tensor_bytes]


class Case:
    """One corrupted checkpoint; a short repr so a failure report stays readable."""

    def __init__(self, files, kind, seed):
        self.files, self.kind, self.seed = files, kind, seed

    def __repr__(self):
        return f"Case({self.kind}, seed={self.seed})"


@st.composite
def corruptions(draw, files):
    files, kind = draw(st.sampled_from(MUTATIONS))(draw, files)
    return Case(files, kind, draw(st.integers(0, 0)))


# ---------------------------------------------------------------- the oracle

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.numel() else t


def _check_faithful(model, folder, kind, ref_logits):
    """A successful load must hold exactly the files' tensors, all of them, and nothing else."""
    on_disk = load_file(folder / "model.safetensors")
    sd = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    assert set(on_disk) - set(sd) == set(), f"{kind}: file tensors dropped silently: {set(on_disk) - set(sd)}"
    for k, v in sd.items():
        if k in tied and k not in on_disk:
            continue
        assert k in on_disk, f"{kind}: {k} was not in the files (initialised at random)"
        assert v.dtype == on_disk[k].dtype and v.shape == on_disk[k].shape, f"{kind}: {k} changed type/shape"
        assert torch.equal(_bits(v), _bits(on_disk[k])), f"{kind}: {k} differs from the file"
    if kind == "config":  # a quantization_config edit that loads must not change the model
        assert torch.equal(model(IDS).logits, ref_logits), f"{kind}: logits changed"


def test_loader_fuzz(ckpt):
    """At least EXAMPLES corruptions: 0 tracebacks, 0 silent wrong loads."""
    outcomes = {"refused": 0, "loaded": 0}
    folder = ckpt["dir"]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(corruptions(ckpt["files"]))
    def one(case):
        kind = case.kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
        try:
            model = dbquant.load(folder)
        except DbquantError as e:
            assert "\n" not in str(e).strip(), f"{kind}: multi-line error {e}"
            outcomes["refused"] += 1
            return
        except Exception as e:  # a traceback: report the kind and the first line, not the bytes
            raise AssertionError(f"{kind}: traceback {type(e).__name__}: {str(e)[:300]}") from e
        outcomes["loaded"] += 1
        _check_faithful(model, folder, kind, ckpt["logits"])

    one()
    assert sum(outcomes.values()) >= EXAMPLES, outcomes
    assert outcomes["refused"] > EXAMPLES // 4 and outcomes["loaded"] > 0, outcomes
