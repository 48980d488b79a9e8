"""Quantized tables (--embed-bits / --head-bits): the golden vector of docs/FORMAT.md, exact
pack/unpack, lookup vs the dequantized table, tied and untied heads, both loaders, the fast
decoder's int8 head as stored, checkpoint_bpw, and clear errors for bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from dbquant.cli import main
from dbquant.errors import DbquantError
from dbquant.format import embedding as fmt
from dbquant.format import layout
from dbquant.format.embedding import TableLayout
from dbquant.model.checkpoint import load, measured_bits, parameter_count
from dbquant.model.embedding import QuantEmbedding, QuantHead, TiedHead
from dbquant.quant.table import CLIPS, quantize_table
from dbquant.quantize import QuantizeOptions, quantize, save_output
from dbquant.runtime.decode import FastDecoder

from .conftest import make_tiny_model

# The worked example of docs/FORMAT.md: rows=2, dim=6, g=4 -> Dp=8, G=2 (channels 6, 7 are padding).
GOLDEN_CODES = torch.tensor([[1, -2, 7, -7, 3, 0, 0, 0], [0, 5, -1, 2, -3, 4, 0, 0]])
GOLDEN_SCALES = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
GOLDEN_NIBBLES = [[0xE1, 0x97, 0x03, 0x00], [0x50, 0x2F, 0x4D, 0x00]]
GOLDEN_INT8 = [[0x01, 0xFE, 0x07, 0xF9, 0x03, 0x00, 0x00, 0x00], [0x00, 0x05, 0xFF, 0x02, 0xFD, 0x04, 0x00, 0x00]]
GOLDEN_SCALE_BITS = [[0x3800, 0x3400], [0x3C00, 0x4000]]
GOLDEN_W = [[0.5, -1.0, 3.5, -3.5, 0.75, 0.0], [0.0, 5.0, -1.0, 2.0, -6.0, 8.0]]


def _bits16(t):
    return t.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()


@pytest.mark.parametrize("bits,golden", [(4, GOLDEN_NIBBLES), (8, GOLDEN_INT8)])
def test_golden_vector(bits, golden):
    lay = TableLayout(2, 6, bits, 4)
    packed = fmt.pack(GOLDEN_CODES, GOLDEN_SCALES, lay)
    assert packed["codes"].view(torch.uint8).tolist() == golden
    assert _bits16(packed["code_scales"]) == GOLDEN_SCALE_BITS
    assert fmt.dequantize(packed, lay).tolist() == GOLDEN_W
    assert lay.storage_bits() == 2 * 8 * bits + 2 * 2 * 16


def test_float16_table_is_exact():
    vals = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)).half()
    lay = TableLayout(3, 10, 16, 10)
    packed = fmt.pack(vals, None, lay)
    assert set(packed) == {"codes"} and torch.equal(fmt.dequantize(packed, lay), vals.float())
    assert lay.storage_bits() == 3 * 10 * 16


@pytest.mark.parametrize("rows,dim,bits,g", [(1, 2, 4, 2), (3, 13, 4, 4), (7, 100, 8, 64), (5, 577, 4, 32),
                                             (9, 33, 8, 33), (4, 9, 8, 4), (3, 13, 6, 4), (2, 577, 6, 576),
                                             (5, 64, 6, 64)])
def test_pack_unpack_exact(rows, dim, bits, g):
    gen = torch.Generator().manual_seed(rows * 1000 + dim)
    lay = TableLayout(rows, dim, bits, g)
    qmax = fmt.QMAX[bits]
    codes = torch.randint(-qmax, qmax + 1, (rows, lay.padded_dim), generator=gen)
    codes[:, dim:] = 0
    scales = torch.randn(rows, lay.groups, generator=gen).half()
    packed = fmt.pack(codes, scales, lay)
    assert torch.equal(fmt.unpack_codes(packed, lay).long(), codes)
    want = (codes.float().view(rows, lay.groups, g) * scales.float().unsqueeze(-1)).reshape(rows, -1)[:, :dim]
    assert torch.equal(fmt.dequantize(packed, lay), want)


def test_nibbles_and_sextets_cover_every_code():
    codes = torch.arange(-8, 8).repeat(2)
    assert torch.equal(fmt.unpack_nibbles(fmt.pack_nibbles(codes)).long(), codes)
    codes = torch.arange(-32, 32)
    assert torch.equal(fmt.unpack_sextets(fmt.pack_sextets(codes)).long(), codes)
    # channels 0..3 = 1, -1, 0, 31 -> word 0x01 | 0x3F << 6 | 0 << 12 | 0x1F << 18 = 0x7C0FC1, little-endian
    assert fmt.pack_sextets(torch.tensor([1, -1, 0, 31])).tolist() == [0xC1, 0x0F, 0x7C]


def test_layout_refuses_what_it_cannot_store():
    for bad in [dict(bits=3, group_size=4), dict(bits=4, group_size=5), dict(bits=8, group_size=0),
                dict(bits=6, group_size=6)]:
        with pytest.raises(DbquantError):
            TableLayout(4, 10, **bad)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantize_table_beats_absmax(bits):
    # The clip search keeps, per group, the scale of least error: never worse than plain absmax
    # (clip 1.0, a candidate itself), and strictly better somewhere on heavy-tailed rows.
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 70, generator=gen) * torch.rand(40, 1, generator=gen)
    w[::7, 3] *= 12  # outliers
    lay = TableLayout(40, 70, bits, 16)
    codes, scales = quantize_table(w, lay)
    assert codes.abs().max() <= fmt.QMAX[bits] and torch.all(codes[:, 70:] == 0)
    deq = fmt.dequantize(fmt.pack(codes, scales, lay), lay)
    qmax = fmt.QMAX[bits]
    wp = torch.nn.functional.pad(w, (0, lay.padded_dim - 70)).view(40, lay.groups, 16)
    s_abs = (wp.abs().amax(-1) / qmax).half().float()
    absmax = (torch.round(wp / s_abs.unsqueeze(-1)).clamp(-qmax, qmax) * s_abs.unsqueeze(-1)).reshape(40, -1)[:, :70]
    err = (deq - w).square().view(40, -1)
    err_abs = (absmax - w).square().view(40, -1)
    assert err.sum() <= err_abs.sum() and len(CLIPS) > 1
    if bits == 4:
        assert err.sum() < 0.95 * err_abs.sum()
    assert (deq - w).square().sum() / w.square().sum() < {4: 0.02, 6: 2e-3, 8: 1e-4}[bits]


def test_lookup_equals_dequantized_rows():
    lay = TableLayout(37, 13, 4, 4)  # odd sizes: padding inside the last group
    emb = QuantEmbedding(lay)
    emb.load_table(fmt.pack(*quantize_table(torch.randn(37, 13), lay), lay))
    ids = torch.tensor([[0, 36, 5, 5], [1, 2, 3, 36]])
    assert emb(ids).shape == (2, 4, 13)
    assert torch.equal(emb(ids), emb.dequantize()[ids])


def _quantized(tmp_path, tok, embed_bits, head_bits, tied=True, name="q"):
    model = make_tiny_model(vocab_size=len(tok), tie_word_embeddings=tied)
    fp_params = parameter_count(model)
    quantize(model, tok, QuantizeOptions(method="fdb", calib=None, embed_bits=embed_bits, head_bits=head_bits),
             progress=False)
    out = tmp_path / name
    save_output(model, out, tok, False, {}, None)
    return model, out, fp_params


IDS = torch.tensor([[5, 17, 2, 99, 41, 8, 63, 120]])
CASES = [("8", "auto", True), ("6", "auto", True), ("4", "auto", True), ("fp16", "auto", True), ("fp32", "auto", True),
         ("4", "8", True), ("fp32", "8", True), ("4", "fp32", True), ("8", "auto", False), ("4", "fp16", False)]


@pytest.mark.parametrize("embed_bits,head_bits,tied", CASES)
def test_round_trip_both_loaders(tmp_path, tiny_tokenizer, embed_bits, head_bits, tied):
    model, out, fp_params = _quantized(tmp_path, tiny_tokenizer, embed_bits, head_bits, tied)
    with torch.no_grad():
        want = model(IDS).logits
        a, b = load(out), AutoModelForCausalLM.from_pretrained(out)
        la, lb = a(IDS).logits, b(IDS).logits
    assert torch.equal(la, lb) and torch.equal(la, want)
    emb_q = embed_bits != "fp32"
    assert isinstance(a.model.embed_tokens, QuantEmbedding) == emb_q
    if emb_q:
        assert torch.equal(a.model.embed_tokens.codes, model.model.embed_tokens.codes)
    head = {"8": QuantHead, "fp16": QuantHead, "fp32": torch.nn.Linear}.get(
        head_bits, TiedHead if tied and emb_q else torch.nn.Linear)
    assert type(a.lm_head) is head
    if head is TiedHead:
        assert a.lm_head.embedding is a.model.embed_tokens
    stored = load_file(out / "model.safetensors")
    assert ("lm_head.codes" in stored) == (head is QuantHead)
    has_tables = emb_q or head is QuantHead
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == layout.FORMAT_VERSION and bool(qc["tables"]) == has_tables
    # checkpoint_bpw: every stored byte over all parameters (a tied matrix once)
    size = measured_bits(out, a)
    files_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    own_head = tied and (head is QuantHead or (head is torch.nn.Linear and emb_q))  # untied here: its own matrix
    params = fp_params + (model.config.vocab_size * model.config.hidden_size if own_head else 0)
    assert size["checkpoint_bytes"] == files_bytes and size["parameters"] == params
    assert size["checkpoint_bpw"] == pytest.approx(files_bytes * 8 / params)


def test_tables_shrink_the_checkpoint(tmp_path, tiny_tokenizer):
    sizes = {b: measured_bits(out, load(out))["checkpoint_bytes"]
             for b in ("fp32", "fp16", "8", "6", "4") for _, out, _ in [_quantized(tmp_path, tiny_tokenizer, b,
                                                                                   "auto", name=b)]}
    assert sizes["fp32"] > sizes["fp16"] > sizes["8"] > sizes["6"] > sizes["4"]
    v, d = 300, 64  # the tiny model's table: each step saves what its layout says
    assert sizes["fp32"] - sizes["fp16"] == pytest.approx(v * d * 2, abs=2048)


def test_head_tied_needs_a_tied_model(tiny_tokenizer):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer), tie_word_embeddings=False)
    with pytest.raises(DbquantError, match="tied"):
        quantize(model, tiny_tokenizer, QuantizeOptions(method="fdb", calib=None, embed_bits="4", head_bits="tied"),
                 progress=False)
    with pytest.raises(DbquantError, match="--modules lm_head"):
        quantize(model, tiny_tokenizer, QuantizeOptions(method="fdb", calib=None, head_bits="8",
                                                        modules=("decoder", "lm_head")), progress=False)


def test_fast_decoder_runs_the_stored_int8_head(tmp_path, tiny_tokenizer):
    # its own int8 table; a tied per-row 8-bit embedding; a tied 6-bit one (codes widened to int8)
    for head_bits, embed_bits in (("8", "4"), ("auto", "8"), ("auto", "6")):
        _, out, _ = _quantized(tmp_path, tiny_tokenizer, embed_bits, head_bits, name=f"{embed_bits}-{head_bits}")
        model = load(out)
        table = model.lm_head if head_bits == "8" else model.model.embed_tokens
        dec = FastDecoder(model, max_len=64)
        if dec.lm_head_op is None:
            pytest.skip("the C++ CPU extension is not built")
        # the stored codes (6-bit ones widened), not requantized: the same values, copied into the decoder's
        # huge-page mapping (dbquant/backends/hugepages.py)
        stored = fmt.unpack_sextets(table.codes) if embed_bits == "6" else table.codes
        assert dec.lm_head.dtype == torch.int8 and torch.equal(dec.lm_head, stored)
        assert torch.equal(dec.lm_head_scale, table.code_scales[:, 0].float())
        with torch.inference_mode():
            hf = model.generate(IDS[:, :6], max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        seq, _ = dec.generate(IDS[:, :6], 10)
        assert torch.equal(seq, hf)


def test_missing_and_corrupt_tables_are_refused(tmp_path, tiny_tokenizer):
    _, out, _ = _quantized(tmp_path, tiny_tokenizer, "4", "8")
    st = out / "model.safetensors"
    tensors = load_file(st)
    from safetensors import safe_open
    with safe_open(st, "pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in tensors.items() if k != "model.embed_tokens.codes"}, st, metadata=meta)
    with pytest.raises(DbquantError, match="model.embed_tokens.codes"):
        load(out)
    with pytest.raises(DbquantError, match="model.embed_tokens.codes"):
        AutoModelForCausalLM.from_pretrained(out)
    save_file({**tensors, "lm_head.codes": tensors["lm_head.codes"].view(torch.uint8)}, st, metadata=meta)
    with pytest.raises(DbquantError, match="lm_head.codes"):
        load(out)
    save_file(tensors, st, metadata=meta)
    load(out)  # the restored file loads again


def test_table_config_is_checked(tmp_path, tiny_tokenizer, monkeypatch):
    _, out, _ = _quantized(tmp_path, tiny_tokenizer, "4", "auto")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    bad = json.loads(json.dumps(cfg))
    bad["quantization_config"]["format_version"] = 1  # tables in a v1 checkpoint
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(DbquantError, match="version 2"):
        load(out)
    bad = json.loads(json.dumps(cfg))
    bad["quantization_config"]["tables"][0]["bits"] = 3
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(DbquantError, match="bits 3"):
        load(out)
    bad["quantization_config"]["tables"] = [{"module": "model.nowhere", "kind": "embedding", "bits": 4,
                                             "group_size": 32}]
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(DbquantError, match="model.nowhere"):
        load(out)
    cfg_path.write_text(json.dumps(cfg))
    # a reader that knows only version 1 refuses the file by its version, not by its tensors
    monkeypatch.setattr(layout, "SUPPORTED_VERSIONS", (1,))
    with pytest.raises(DbquantError, match=f"version {layout.FORMAT_VERSION} is not supported"):
        load(out)


def test_v1_checkpoint_still_loads(tmp_path, tiny_tokenizer):
    # a checkpoint without tables, uniform k = 2, is a version-1 file once its config says so
    model, out, _ = _quantized(tmp_path, tiny_tokenizer, "fp32", "auto")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["format_version"] == 3 and not qc["tables"] and all(
        row.get("planes", 2) == 2 and row.get("scale_bits", 16) == 16 for row in qc.get("layers", {}).values())
    qc["format_version"] = 1
    qc.pop("tables")
    qc.pop("layers", None)
    (out / "config.json").write_text(json.dumps(cfg))
    with safe_open(out / "model.safetensors", "pt") as f:  # the header metadata says the version too
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open
    facts = json.loads(meta["dbquant"])
    save_file(tensors, out / "model.safetensors",
              metadata={**meta, "dbquant": json.dumps({**facts, "format_version": 1})})
    with torch.no_grad():
        assert torch.equal(load(out)(IDS).logits, model(IDS).logits)


def test_cli_reports_checkpoint_bpw(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_model_dir), "-o", str(out), "--method", "fdb", "--calib", "none",
                 "--embed-bits", "4", "--embed-group", "16", "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--windows", "1", "--seq-len", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    model = load(out)
    files_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert res["checkpoint_bpw"] == pytest.approx(files_bytes * 8 / parameter_count(model))
    assert main(["inspect", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["checkpoint_bpw"] == pytest.approx(res["checkpoint_bpw"])
    emb = [t for t in table["tables"] if t["kind"] == "embedding"]
    assert emb == [{"module": "model.embed_tokens", "kind": "embedding", "shape": [model.config.vocab_size, 64],
                    "bits": 4, "group": 16, "bpw": pytest.approx(4 + 16 / 16)}]
    assert [t["kind"] for t in table["tables"]] == ["embedding", "tied_head"]
    assert main(["inspect", str(out)]) == 0
    assert "bits/parameter" in capsys.readouterr().out
