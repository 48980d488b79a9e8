"""Layer-streaming calibration: the same checkpoint as the in-memory path, bit for bit; resume; refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

import dbquant
from dbquant.calibration import runstate
from dbquant.calibration.runstate import Interrupted
from dbquant.calibration.streaming import ShardReader, quantize_streaming
from dbquant.cli import main
from dbquant.errors import DbquantError
from dbquant.model.sources import load_fp_model
from dbquant.quantize import QuantizeOptions, quantize

from .conftest import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_tokenizer):
    """3 decoder blocks, untied head, saved in several safetensors shards with an index."""
    d = tmp_path_factory.mktemp("tiny-sharded")
    make_tiny_model(vocab_size=len(tiny_tokenizer), num_hidden_layers=3, tie_word_embeddings=False,
                    seed=1).save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(d)
    assert (d / "model.safetensors.index.json").is_file()
    return d


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tiny_tokenizer):
    """bf16 weights on disk: streaming converts them to float32 piecewise, as from_pretrained does whole."""
    d = tmp_path_factory.mktemp("tiny-bf16")
    make_tiny_model(vocab_size=len(tiny_tokenizer), seed=2).to(torch.bfloat16).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _opts(text_file, work_dir, **kw):
    return QuantizeOptions(**{**dict(group_size=32, calib=text_file, preset="fast", bw_samples=4, bw_seq_len=16,
                                     bw_steps=4, bw_batch=2, dad=False, checkpoint_every=2,
                                     work_dir=str(work_dir)), **kw})


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _in_memory(model_dir, opts, out):
    model, tok = load_fp_model(str(model_dir))
    quantize(model, tok, opts, progress=False)
    dbquant.save(model, out, tokenizer=tok)
    return _tensors(out)


@pytest.mark.parametrize("source", ["single", "sharded", "bf16"])
def test_streaming_output_is_identical_to_in_memory(tmp_path, tiny_model_dir, sharded_dir, bf16_dir, text_file,
                                                    source):
    src = {"single": tiny_model_dir, "sharded": sharded_dir, "bf16": bf16_dir}[source]
    tok = load_fp_model(str(src))[1]
    # --embed-bits auto is fp32 under --streaming (it copies the embedding): ask the in-memory run for that
    ref = _in_memory(src, _opts(text_file, tmp_path / "w1", embed_bits="fp32"), tmp_path / "mem")
    rep = quantize_streaming(src, tok, _opts(text_file, tmp_path / "w2"), tmp_path / "stream", progress=False)
    got = _tensors(tmp_path / "stream")
    assert sorted(got) == sorted(ref)
    planes = [k for k in ref if k.endswith("qweight")]
    assert planes, "no packed tensors in the reference"
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert rep["streaming"] and rep["layers"] == len(planes)
    # the streamed checkpoint loads through dbquant.load and computes what the in-memory one does
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    a = dbquant.load(tmp_path / "mem", backend="ref")(ids).logits
    b = dbquant.load(tmp_path / "stream", backend="ref")(ids).logits
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())["weight_map"]


def test_streaming_resume_after_kill_matches(tmp_path, sharded_dir, text_file, monkeypatch):
    tok = load_fp_model(str(sharded_dir))[1]
    quantize_streaming(sharded_dir, tok, _opts(text_file, tmp_path / "w0"), tmp_path / "ref", progress=False)
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 6)  # block 1, step 2 of 4
    with pytest.raises(Interrupted):
        quantize_streaming(sharded_dir, tok, _opts(text_file, tmp_path / "w"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing half-written under the output name
    assert (tmp_path / "w" / "shards" / "block-00000.safetensors").is_file()
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", None)
    quantize_streaming(sharded_dir, tok, _opts(text_file, tmp_path / "w", resume=True), tmp_path / "out",
                       progress=False)
    ref, got = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    log = (tmp_path / "out" / "dbquant-log.jsonl").read_text()
    assert '"event": "resume"' in log


def test_streaming_refuses_what_it_cannot_do(tmp_path, tiny_model_dir, text_file):
    tok = load_fp_model(str(tiny_model_dir))[1]
    for kw, needle in ((dict(dad=True, dad_steps=2), "DAD"), (dict(blockwise=False), "no-blockwise"),
                       (dict(modules=("decoder", "lm_head")), "decoder blocks only"),
                       (dict(calib=None), "calibration text")):
        with pytest.raises(DbquantError, match=needle):
            quantize_streaming(tiny_model_dir, tok, _opts(text_file, tmp_path / "w", **kw), tmp_path / "o",
                               progress=False)
    with pytest.raises(DbquantError, match="no model.safetensors"):
        ShardReader(tmp_path)
    from .tiny_vlms import make_tiny_vlm

    make_tiny_vlm("smolvlm").save_pretrained(tmp_path / "vlm")
    with pytest.raises(DbquantError, match="does not take vision-language models"):
        quantize_streaming(tmp_path / "vlm", tok, _opts(text_file, tmp_path / "w2"), tmp_path / "o2", progress=False)


def test_cli_streaming(tmp_path, tiny_model_dir, text_file, capsys):
    rc = main(["quantize", str(tiny_model_dir), "--output", str(tmp_path / "q"), "--streaming", "--no-dad",
               "--calib", text_file, "--group-size", "32", "--preset", "fast", "--bw-samples", "4",
               "--bw-seq-len", "16", "--bw-steps", "2", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bpw"] == pytest.approx(3.0, abs=0.01)  # g32: 2 planes + two fp16 scales per 32 weights
    model = dbquant.load(tmp_path / "q", backend="ref")
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert not (tmp_path / "q.work").exists()
    assert main(["quantize", str(tiny_model_dir), "--output", str(tmp_path / "r"), "--streaming",
                 "--calib", text_file]) == 2  # DAD on (default preset): refused with a message
    assert "--no-dad" in capsys.readouterr().err


def test_streaming_failed_output_keeps_blocks_and_resume_assembles_it(tmp_path, sharded_dir, text_file,
                                                                      monkeypatch):
    from dbquant.calibration import streaming

    tok = load_fp_model(str(sharded_dir))[1]
    quantize_streaming(sharded_dir, tok, _opts(text_file, tmp_path / "w0"), tmp_path / "ref", progress=False)
    real_write = streaming._write_output

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streaming, "_write_output", full_disk)
    work = tmp_path / "w"
    with pytest.raises(DbquantError, match="--resume") as e:
        quantize_streaming(sharded_dir, tok, _opts(text_file, work), tmp_path / "out", progress=False)
    assert str(work) in str(e.value) and not (tmp_path / "out").exists()
    assert (work / "final.pt").is_file() and (work / "shards" / "rest.safetensors").is_file()
    monkeypatch.setattr(streaming, "_write_output", real_write)
    monkeypatch.setitem(runstate.TEST_HOOKS, "interrupt_after_steps", 0)  # resume must not recalibrate
    rep = quantize_streaming(sharded_dir, tok, _opts(text_file, work, resume=True), tmp_path / "out",
                             progress=False)
    ref, got = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert rep["rel_weight_error"] and len(rep["blocks"]) == 3  # the finished run's report, kept in final.pt
    assert not list(work.glob("*.pt")) and not (work / "shards").exists()  # dropped once the output validated
