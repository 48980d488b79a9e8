"""Checkpoints: save/load both ways, save_pretrained round trip, every bad input gets a clear error."""

import itertools
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import dbquant
from dbquant.errors import DbquantError
from dbquant.format.files import atomic_dir, read_header, write_json
from dbquant.model.modules import PackedLinear
from dbquant.quantize import QuantizeOptions, quantize
from tests.conftest import make_tiny_model
from tests.tolerances import FP32_REORDER_LONG

IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantized_dir(tmp_path, name="q", model_type="llama", **opts):
    model = make_tiny_model(model_type)
    quantize(model, None, QuantizeOptions(**{"method": "fdb", "calib": None, "group_size": 32, **opts}),
             progress=False)
    out = tmp_path / name
    dbquant.save(model, out)
    return model, out


@pytest.mark.parametrize("modules,offset,method", [(("decoder",), False, "fdb"),
                                                   (("decoder", "lm_head"), True, "fdb"),
                                                   (("decoder",), True, "rtn")])
def test_from_pretrained_equals_dbquant_load(tmp_path, modules, offset, method):
    model, out = _quantized_dir(tmp_path, modules=modules, offset=offset, method=method)
    expect = model(IDS).logits
    a = dbquant.load(out)
    b = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(b.model.layers[0].mlp.down_proj, PackedLinear)
    assert b.model.layers[0].mlp.down_proj.scales.dtype == torch.float16
    assert torch.equal(a(IDS).logits, expect) and torch.equal(b(IDS).logits, expect)
    # save_pretrained of a loaded model round-trips, metadata included
    b.save_pretrained(tmp_path / "again")
    meta = json.loads(read_header(tmp_path / "again" / "model.safetensors")["__metadata__"]["dbquant"])
    assert meta["format_version"] == 3 and meta["group_size"] == 32
    assert torch.equal(dbquant.load(tmp_path / "again")(IDS).logits, expect)


def test_quantized_model_is_close_to_the_original(tmp_path):
    fp = make_tiny_model()
    ref = fp(IDS).logits
    model, _ = _quantized_dir(tmp_path)
    rel = ((model(IDS).logits - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5


def test_other_families(tmp_path):
    for mt in ("qwen2", "mistral", "qwen3"):
        model, out = _quantized_dir(tmp_path, name=mt, model_type=mt)
        assert torch.equal(dbquant.load(out)(IDS).logits, model(IDS).logits)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    # GPT-2 keeps its projections in Conv1D (transposed weights): refused by layer type, naming the family
    with pytest.raises(DbquantError, match=r"unsupported layer type .*Conv1D at transformer\.h\.0\..*'gpt2'"):
        quantize(m, None, QuantizeOptions(calib=None), progress=False)


def test_missing_and_plain_dirs(tmp_path, tiny_model_dir):
    with pytest.raises(DbquantError, match="not a directory"):
        dbquant.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DbquantError, match="no config.json"):
        dbquant.load(tmp_path / "empty")
    with pytest.raises(DbquantError, match="not a dbquant checkpoint"):
        dbquant.load(tiny_model_dir)


def test_truncated_and_corrupt_weights(tmp_path):
    _, out = _quantized_dir(tmp_path)
    st = out / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 100])
    with pytest.raises(DbquantError, match="truncated"):
        dbquant.load(out)
    with pytest.raises(DbquantError, match="truncated"):  # plain transformers refuses too
        AutoModelForCausalLM.from_pretrained(out)
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[30:])
    with pytest.raises(DbquantError, match="corrupt"):
        dbquant.load(out)
    st.write_bytes(b"abc")
    with pytest.raises(DbquantError, match="truncated or not a safetensors"):
        dbquant.load(out)
    st.unlink()
    with pytest.raises(DbquantError, match="no .safetensors"):
        dbquant.load(out)


def test_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    _, out = _quantized_dir(tmp_path)
    st = out / "model.safetensors"
    tensors = load_file(st)
    meta = read_header(st)["__metadata__"]
    name = "model.layers.1.mlp.up_proj.scales"
    save_file({k: v for k, v in tensors.items() if k != name}, st, metadata=meta)
    with pytest.raises(DbquantError, match=f"missing tensor {name}"):
        dbquant.load(out)
    save_file({**tensors, name: tensors[name][:, :1].contiguous()}, st, metadata=meta)
    with pytest.raises(DbquantError, match=f"{name} is F16"):
        AutoModelForCausalLM.from_pretrained(out)


def test_wrong_format_version(tmp_path):
    _, out = _quantized_dir(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DbquantError, match="format version 99"):
        dbquant.load(out)
    with pytest.raises(DbquantError, match="format version 99"):
        AutoModelForCausalLM.from_pretrained(out)


def test_atomic_dir_refuses_existing_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DbquantError, match="already exists"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("killed mid-write")
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left behind
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_write_json_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"rows": [1, 2]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())  # not mkstemp's 0600
    with pytest.raises(TypeError):
        write_json(path, {"rows": [object()]})  # fails mid-dump, after the temp file has some bytes
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["result.json"]  # no temp file left behind


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_refuses_unpacked_model(tmp_path):
    with pytest.raises(DbquantError, match="needs a dbquant-packed model"):
        dbquant.save(make_tiny_model(), tmp_path / "x")


# ---------------------------------------------------------------- format version 2: k planes per layer

MIXED = [(1, 32, True), (3, 64, False), (4, 32, False), (2, 128, False), (3, 32, True), (2, 64, False)]
SCALE_BITS = [16, 8, 8, 16, 8]  # cycled beside MIXED (coprime lengths: every pairing occurs)


def _mixed_dir(tmp_path, model_type="llama"):
    """A tiny model quantized with a hand-made plan cycling through MIXED (k, g, offset) layouts and
    SCALE_BITS scale widths."""
    from dataclasses import replace

    from dbquant.format.layout import LinearLayout
    from dbquant.model.plan import make_plan

    model = make_tiny_model(model_type)
    plan = [replace(p, layout=LinearLayout(p.layout.out_features, p.layout.in_features, g, off, k, sb))
            for p, (k, g, off), sb in zip(make_plan(model, 32), itertools.cycle(MIXED), itertools.cycle(SCALE_BITS))]
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False, plan=plan)
    out = tmp_path / f"mixed-{model_type}"
    dbquant.save(model, out)
    return model, out, plan


def test_mixed_checkpoint_loads_identically_both_ways(tmp_path):
    model, out, plan = _mixed_dir(tmp_path)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format_version"] == 3
    assert {(r["planes"], r["group_size"], r["offset"]) for r in cfg["layers"].values()} == set(MIXED)
    assert {r["scale_bits"] for r in cfg["layers"].values()} == {8, 16}
    expect = model(IDS).logits
    a, b = dbquant.load(out), AutoModelForCausalLM.from_pretrained(out)
    for p in plan:
        m = b.get_submodule(p.name)
        assert (m.planes, m.group_size, m.offset is not None, m.scale_bits) == (
            p.layout.planes, p.layout.group_size, p.layout.offset, p.layout.scale_bits)
        assert m.qweight.shape[0] == p.layout.planes and m.scales.shape[-1] == p.layout.planes
        assert m.scales.dtype == (torch.int8 if p.layout.scale_bits == 8 else torch.float16)
        assert m.float_scales().dtype == torch.float16
    assert torch.equal(a(IDS).logits, expect) and torch.equal(b(IDS).logits, expect)
    ref = dbquant.load(out, backend="ref")(IDS).logits  # the oracle kernel agrees to float rounding
    torch.testing.assert_close(ref, expect, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG * expect.abs().max().item())


def _as_version(out, version: int, edit) -> tuple[dict, object]:
    """Make checkpoint ``out`` say format ``version`` in config.json and the safetensors header, after
    ``edit(quantization_config)`` removed what that version lacks. Returns (config, its path)."""
    from safetensors.torch import load_file, save_file

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    qc["format_version"] = version
    edit(qc)
    cfg_path.write_text(json.dumps(cfg))
    f = out / "model.safetensors"
    header = read_header(f)["__metadata__"]
    meta = json.loads(header["dbquant"])
    meta["format_version"] = version
    save_file(load_file(f), f, metadata={**header, "dbquant": json.dumps(meta)})
    return cfg, cfg_path


def _v1(qc):  # version 1: k = 2 everywhere, no ``layers``, no tables
    assert "tables" not in qc or not qc["tables"]
    del qc["layers"]


def _v2(qc):  # version 2: float16 scales, no ``scale_bits`` in the layers
    for row in qc["layers"].values():
        assert row.pop("scale_bits") == 16


@pytest.mark.parametrize("version,edit,is_old,newer,refusal", [
    (1, _v1, lambda m: m.planes == 2, {"planes": 3}, "layers needs format_version >= 2"),
    (2, _v2, lambda m: m.scale_bits == 16, {"scale_bits": 8}, "scale_bits, which needs format_version >= 3")])
def test_older_version_checkpoint_still_loads(tmp_path, version, edit, is_old, newer, refusal):
    """A version-1 / version-2 file (the tensors are version 3's with k = 2 / with 16-bit scales) loads both ways
    with the same logits; its config cannot carry what the next version added."""
    model, out = _quantized_dir(tmp_path, embed_bits="fp32")  # version 1 had no quantized tables
    expect = model(IDS).logits
    cfg, cfg_path = _as_version(out, version, edit)
    a = dbquant.load(out)
    assert a.config.quantization_config.format_version == version
    assert all(is_old(m) for m in a.modules() if isinstance(m, PackedLinear))
    assert torch.equal(a(IDS).logits, expect)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(IDS).logits, expect)
    qc = cfg["quantization_config"]
    qc.setdefault("layers", {}).setdefault(qc["modules"][0], {}).update(newer)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DbquantError, match=refusal):
        dbquant.load(out)


def test_eight_bit_scales_checkpoint(tmp_path):
    """--scale-bits 8: int8 codes on disk, the same logits both ways, 2.25 bits + a row maximum per weight,
    and a truncated scale_max is refused by name."""
    from safetensors.torch import load_file, save_file

    model, out = _quantized_dir(tmp_path, scale_bits="8")
    expect = model(IDS).logits
    a, b = dbquant.load(out), AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(a(IDS).logits, expect) and torch.equal(b(IDS).logits, expect)
    m = a.model.layers[0].mlp.down_proj
    assert m.scales.dtype == torch.int8 and m.scale_max.shape == (m.out_features,)
    k = m.in_features
    assert m.layout.bits_per_weight() == pytest.approx(2 + 2 * 8 / 32 + 16 / k)
    tensors = load_file(out / "model.safetensors")
    name = next(n for n in tensors if n.endswith("scale_max"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, out / "model.safetensors", metadata=read_header(out / "model.safetensors")["__metadata__"])
    with pytest.raises(DbquantError, match="scale_max"):
        dbquant.load(out)


def test_config_backend_is_checked(tmp_path):
    """quantization_config.backend is a run-time kernel choice: a valid one loads (kernels agree to
    float rounding), an unknown one is refused by name (the loader fuzz leaves this field to here)."""
    model, out = _quantized_dir(tmp_path)
    expect = model(IDS).logits
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["backend"] = "ref"
    cfg_path.write_text(json.dumps(cfg))
    got = dbquant.load(out)(IDS).logits
    torch.testing.assert_close(got, expect, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG * expect.abs().max().item())
    cfg["quantization_config"]["backend"] = "fpga"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DbquantError, match="backend 'fpga' is unknown"):
        dbquant.load(out)
