"""Shared fixtures: a tiny random Llama with a tiny trained tokenizer, built offline."""

import os

# Triton kernels run on the CPU through the interpreter; it must be set before they import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_TEXT = ("The quick brown fox jumps over the lazy dog. Quantization maps weights to few levels. "
             "Two binary planes with their own scales make a two-bit code. ") * 20


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (no hub access)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_model(model_type: str = "llama", vocab_size: int = 300, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**sizes, **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture
def float_luts():
    """The float lookup tables for lut="auto" and the fused decode ops during the test. For tests that
    compare the CPU kernel with a float reference at fp32 tolerances: at one activation row the
    default may be the integer tables (csrc/cpu/dbgemm_i8lut.h), which are within their stated
    bound, not bit-identical; tests/test_cpu_i8lut.py tests those against that bound."""
    from dbquant.backends import cpu

    if not cpu.load_cpu():
        yield
        return
    with cpu.forced_lut("float"):
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A local HF folder: tiny random Llama (fp32, tied embeddings) + tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(vocab_size=len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def text_file(tmp_path):
    """A small calibration text file (the tiny tokenizer's own sentences, repeated): its path."""
    f = tmp_path / "calib.txt"
    f.write_text(TINY_TEXT * 3)
    return str(f)
