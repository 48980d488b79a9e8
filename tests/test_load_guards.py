"""A config that disagrees with its tensors, or a malformed header, is refused (never loaded silently).

Every case goes through ``dbquant.load`` and through plain ``from_pretrained`` after ``import
dbquant`` (the HfQuantizer sees the files). Output folders: creation errors, permissions,
leftovers of killed or overwriting saves.
"""

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import dbquant
from dbquant.errors import DbquantError
from dbquant.format.files import atomic_dir, read_header
from dbquant.quantize import QuantizeOptions, quantize
from tests.conftest import make_tiny_model

IDS = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(1))
LOADERS = {"dbquant.load": dbquant.load, "from_pretrained": AutoModelForCausalLM.from_pretrained}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Two tiny packed checkpoints (built once): ``plain`` (no offset) and ``offset``; and their logits."""
    root = tmp_path_factory.mktemp("guards")
    out = {}
    for name, offset in (("plain", False), ("offset", True)):
        model = make_tiny_model()
        quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32, offset=offset, iters=1),
                 progress=False)
        dbquant.save(model, root / name)
        out[name] = (root / name, model(IDS).logits)
    return out


def _copy(packed, name, tmp_path):
    src, logits = packed[name]
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst, logits


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def _refused(d, match):
    for name, load in LOADERS.items():
        with pytest.raises(DbquantError, match=match):
            load(d)


def test_intact_checkpoints_still_load_exactly(packed):
    for d, logits in packed.values():
        for load in LOADERS.values():
            assert torch.equal(load(d)(IDS).logits, logits)


def test_offset_false_on_an_offset_checkpoint(packed, tmp_path):
    d, _ = _copy(packed, "offset", tmp_path)
    _edit_config(d, lambda q: q.update(offset=False))
    _refused(d, r"offset.*(config.json|quantization_config)")


def test_offset_true_on_a_plain_checkpoint(packed, tmp_path):
    d, _ = _copy(packed, "plain", tmp_path)
    _edit_config(d, lambda q: q.update(offset=True))
    _refused(d, "offset")


@pytest.mark.parametrize("edit", ["drop one", "null", "empty", "drop all of a layer"])
def test_modules_that_do_not_cover_the_packed_tensors(packed, tmp_path, edit):
    d, _ = _copy(packed, "plain", tmp_path)
    fns = {"drop one": lambda q: q["modules"].remove("model.layers.1.mlp.down_proj"),
           "null": lambda q: q.update(modules=None),
           "empty": lambda q: q.update(modules=[]),
           "drop all of a layer": lambda q: q.update(modules=[m for m in q["modules"] if ".layers.0." not in m])}
    _edit_config(d, fns[edit])
    _refused(d, "does not list")


@pytest.mark.parametrize("modules", ["model.layers.0.mlp.up_proj", [1, 2], ["model.norm"]])
def test_malformed_modules_entry(packed, tmp_path, modules):
    d, _ = _copy(packed, "plain", tmp_path)
    _edit_config(d, lambda q: q.update(modules=modules))
    _refused(d, "modules|module|linear")


def _rewrite(st, tensors=None, meta=None):
    save_file(load_file(st) if tensors is None else tensors, st, metadata=meta or read_header(st)["__metadata__"])


@pytest.mark.parametrize("key,value", [("group_size", 64), ("offset", True), ("format_version", 99),
                                       ("bit_order", "msb-first")])
def test_header_metadata_must_agree_with_config(packed, tmp_path, key, value):
    d, _ = _copy(packed, "plain", tmp_path)
    st = d / "model.safetensors"
    meta = read_header(st)["__metadata__"]
    facts = json.loads(meta["dbquant"])
    facts[key] = value
    _rewrite(st, meta={**meta, "dbquant": json.dumps(facts)})
    _refused(d, f"{key}|version 99")


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", "null"])
def test_metadata_that_is_not_a_json_object(packed, tmp_path, meta):
    d, _ = _copy(packed, "plain", tmp_path)
    st = d / "model.safetensors"
    _rewrite(st, meta={**read_header(st)["__metadata__"], "dbquant": meta})
    _refused(d, "metadata 'dbquant'")


def test_missing_dense_tensor_is_not_initialised_at_random(packed, tmp_path):
    d, _ = _copy(packed, "plain", tmp_path)
    st = d / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.norm.weight"]
    _rewrite(st, tensors)
    _refused(d, r"lacks 1 tensor.*model.norm.weight")


def test_stray_packed_tensor_is_refused(packed, tmp_path):
    d, _ = _copy(packed, "plain", tmp_path)
    st = d / "model.safetensors"
    tensors = load_file(st)
    tensors["model.layers.0.mlp.gate_proj.offset"] = torch.zeros(96, 2, dtype=torch.float16)
    _rewrite(st, tensors)
    _refused(d, "gate_proj.offset.*offset: false")


def _raw_header(st, edit):
    """Rewrite the JSON header of ``st`` through ``edit(header_dict)``, keeping the data bytes."""
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    st.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["model.norm.weight"].pop("data_offsets"), "data_offsets=None"),
    (lambda h: h["model.norm.weight"].update(data_offsets="0-4"), "data_offsets='0-4'"),
    (lambda h: h["model.norm.weight"].update(shape=["64"]), r"shape=\['64'\]"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[8, 4]), r"data_offsets=\[8, 4\]"),
    (lambda h: h["model.norm.weight"].update(shape=[65]), "span"),
    (lambda h: h.update({"model.norm.weight": 7}), "is a int"),
    (lambda h: h.update({"__metadata__": {"dbquant": 5}}), "__metadata__ must map strings"),
    (lambda h: h.update({"model.norm.weight": {**h["model.norm.weight"], "data_offsets": [0, 10 ** 12]}}),
     "truncated"),
])
def test_malformed_header_gives_one_error(packed, tmp_path, edit, match):
    d, _ = _copy(packed, "plain", tmp_path)
    _raw_header(d / "model.safetensors", edit)
    _refused(d, match)
    assert "\n" not in str(pytest.raises(DbquantError, dbquant.load, d).value)


def test_header_that_is_not_an_object(packed, tmp_path):
    d, _ = _copy(packed, "plain", tmp_path)
    st = d / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 8) + b"[1,2,3] " + st.read_bytes()[8:])
    _refused(d, "not an object")


# ---------------------------------------------------------------- output folders

def test_output_dir_that_cannot_be_created():
    with pytest.raises(DbquantError, match="cannot create the output directory /proc/nope/out"):
        with atomic_dir("/proc/nope/out"):
            pass


def test_output_parent_not_writable(tmp_path, monkeypatch):
    # root passes any mode check, so the permission answer is what the OS would give a user
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real_access(p, mode))
    with pytest.raises(DbquantError, match="not writable"):
        with atomic_dir(ro / "out"):
            pass


def test_temp_folder_that_cannot_be_made(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(DbquantError, match="cannot create a folder beside"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_output_dir_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        os.umask(0o027)
        with atomic_dir(tmp_path / "out2"):
            pass
        assert stat.S_IMODE((tmp_path / "out2").stat().st_mode) == 0o750
    finally:
        os.umask(old)


def test_overwrite_over_a_file_leaves_nothing_behind(tmp_path):
    (tmp_path / "out").write_text("a file, not a folder")
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "new.txt").is_file()


def test_stale_temp_folders_of_killed_saves_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f".out.tmp-{dead}-abcd1234", tmp_path / f".out.old-{dead}"]
    for s in stale:
        s.mkdir()
        (s / "half.safetensors").write_bytes(b"x")
    live = tmp_path / f".out.tmp-{os.getppid()}-zzzz"  # a running save's folder stays
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abcd"  # another output's leftovers are not ours to judge here
    other.mkdir()
    with atomic_dir(tmp_path / "out"):
        pass
    assert sorted(os.listdir(tmp_path)) == sorted([other.name, live.name, "out"])
