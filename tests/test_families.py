"""Any decoder-only transformers family: blocks and linears found from the model, calibrated, packed, loaded.

Every family is built from transformers' own config class at a tiny size (random weights, offline).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import dbquant
from dbquant.errors import DbquantError
from dbquant.model.modules import PackedLinear
from dbquant.model.plan import describe_blocks, find_block_list, make_plan
from dbquant.quantize import QuantizeOptions, quantize
from dbquant.runtime.decode import SUPPORTED, FastDecoder
from dbquant.runtime.kv import cache_nbytes, make_cache, parse_kv
from tests.conftest import TINY_TEXT, make_tiny_model

# model_type -> (block list path, linears per block). Token ids are put inside the tiny vocabulary.
FAMILIES = {
    "llama": ("model.layers", 7), "mistral": ("model.layers", 7), "qwen2": ("model.layers", 7),
    "qwen3": ("model.layers", 7), "gemma": ("model.layers", 7), "gemma2": ("model.layers", 7),
    "gemma3_text": ("model.layers", 7), "phi3": ("model.layers", 4), "olmo2": ("model.layers", 7),
    "granite": ("model.layers", 7), "stablelm": ("model.layers", 7), "gpt_neox": ("gpt_neox.layers", 4),
    "starcoder2": ("model.layers", 6), "cohere": ("model.layers", 7), "phi": ("model.layers", 6),
    "olmo": ("model.layers", 7), "cohere2": ("model.layers", 7),
}
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny(model_type: str, **kw):
    return make_tiny_model(model_type, **TOKENS, **kw)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_blocks_and_linears_are_found_from_the_model(model_type):
    model = tiny(model_type)
    path, per_block = FAMILIES[model_type]
    assert find_block_list(model) == path
    plan = make_plan(model, group_size=32)
    assert len(plan) == 2 * per_block and all(p.name.startswith(path + ".") for p in plan)
    assert describe_blocks(model).startswith(f"decoder blocks: {path} (2 x ")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pack_save_and_load_both_ways(tmp_path, model_type):
    model = tiny(model_type)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    expect = model(IDS).logits
    dbquant.save(model, tmp_path / "q")
    a = dbquant.load(tmp_path / "q")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    n_packed = sum(isinstance(m, PackedLinear) for m in b.modules())
    assert n_packed == 2 * FAMILIES[model_type][1]
    assert torch.equal(a(IDS).logits, expect) and torch.equal(b(IDS).logits, expect)


def _linear_errors(model_type: str, method: str) -> dict[str, float]:
    """Per packed linear, ||W_q - W|| / ||W|| after ``method`` (no calibration) on the tiny
    model's weights (the same weights for every method: one seed)."""
    model = tiny(model_type)
    fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize(model, None, QuantizeOptions(method=method, calib=None, group_size=32), progress=False)
    return {n: ((m.dequantize() - fp[n]).norm() / fp[n].norm()).item()
            for n, m in model.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_fdb_reconstructs_every_linear_better_than_rtn(model_type):
    fdb, rtn = _linear_errors(model_type, "fdb"), _linear_errors(model_type, "rtn")
    assert fdb.keys() == rtn.keys() and len(fdb) == 2 * FAMILIES[model_type][1]
    worse = {n: (fdb[n], rtn[n]) for n in fdb if not fdb[n] < rtn[n]}
    assert not worse, worse


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_fast_decoder_equals_hf_generate_where_it_claims_the_family(model_type):
    """Packed with fdb: greedy tokens of the fast decoder are HF generate()'s for every family
    in SUPPORTED; every other family is refused by name (generate falls back to HF)."""
    model = tiny(model_type)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    if model_type not in SUPPORTED:
        with pytest.raises(DbquantError, match=f"not model_type='{model_type}'"):
            FastDecoder(model)
        return
    prompt = IDS[:1, :6]
    with torch.inference_mode():
        hf = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(FastDecoder(model, max_len=32).generate(prompt, 10)[0], hf)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_kv_cache_serves_the_family(model_type):
    """--kv 1.5/1.58 inside stock generate(): the fp cache's tokens while everything fits in the
    full-precision residual; then, with a 16-token residual, 32 of 48 tokens packed and the
    logits of the next 16 still close to exact (the packed past is in view of every layer)."""
    model = tiny(model_type)
    prompt = IDS[:, :12]

    def gen(cache):
        with torch.inference_mode():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                  min_new_tokens=12, pad_token_id=0, past_key_values=cache)

    assert torch.equal(gen(make_cache(model, "1.5/1.58")), gen(None))
    ids = torch.randint(3, 300, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits[:, -16:]
        cache = make_cache(model, parse_kv("1.5/1.58", residual=16))
        model(ids[:, :48], past_key_values=cache)
        got = model(ids[:, 48:], past_key_values=cache).logits
    assert cache_nbytes(cache)["tokens_quantized"] == 32
    rel = ((got - ref).norm() / ref.norm()).item()
    # quantized (not exact), and not garbage: 0.6 is tests/test_kv_cache.py's bound for gemma3_text,
    # whose tiny random keys quantize worst of these families (0.53 here; gemma2 0.35, the rest 0.03-0.2)
    assert 0 < rel < 0.6, (model_type, rel)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(TINY_TEXT * 3)
    return str(f)


# Families whose forward differs in what block-wise capture must carry: position embeddings
# (RoPE or none), per-layer attention types (gemma2/3 sliding + global), q/k norms (qwen3,
# gemma3, olmo2), sandwich norms (gemma2/3), scaled embeddings (gemma), parallel blocks
# (gpt_neox, phi, cohere), partial rotary (stablelm, phi).
CALIBRATED = sorted(FAMILIES)


@pytest.mark.parametrize("model_type", CALIBRATED)
def test_blockwise_and_dad_run_on_the_family_and_lower_the_error(tmp_path, tiny_tokenizer, calib_file, model_type):
    extra = {"sliding_window": 8} if model_type in ("gemma2", "gemma3_text") else {}
    fp = tiny(model_type, vocab_size=len(tiny_tokenizer), **extra)
    # scored on text like the calibration text: that is what the stages fit (random ids are not)
    ids = tiny_tokenizer(TINY_TEXT[:400], return_tensors="pt").input_ids[:, :48]
    ref = fp(ids).logits

    def err(opts):
        model = tiny(model_type, vocab_size=len(tiny_tokenizer), **extra)
        quantize(model, tiny_tokenizer, opts, progress=False, model_id=model_type)
        return ((model(ids).logits - ref).norm() / ref.norm()).item(), model

    base = dict(group_size=32, calib=calib_file, preset="fast", bw_samples=8, bw_seq_len=24, bw_batch=4,
                dad_samples=4, dad_seq_len=24, dad_batch=2, dad_topk=8)
    init_err, _ = err(QuantizeOptions(method="fdb", **{k: v for k, v in base.items() if k in ("group_size", "calib")}))
    cal_err, model = err(QuantizeOptions(method="fdb-dad", bw_steps=20, dad=True, dad_steps=4,
                                         work_dir=str(tmp_path / "w"), **base))
    assert cal_err < init_err, (model_type, init_err, cal_err)
    dbquant.save(model, tmp_path / "q")
    assert torch.equal(dbquant.load(tmp_path / "q")(ids).logits, model(ids).logits)


def test_gpt2_conv1d_is_refused_by_name():
    model = make_tiny_model("gpt2", n_embd=64, n_layer=2, n_head=4, **TOKENS)
    with pytest.raises(DbquantError, match=r"Conv1D at transformer\.h\.0\.attn\.c_attn.*'gpt2'"):
        make_plan(model)


def test_a_model_without_decoder_blocks_is_refused():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny("llama").config
            self.proj = torch.nn.Linear(8, 8)

    with pytest.raises(DbquantError, match="no repeated list of decoder blocks"):
        make_plan(Flat())


def test_tables_that_would_leave_no_float_parameter():
    """OLMo's norms hold no weights: with its tied embedding stored as a table nothing floating-point
    is left, and transformers' save_pretrained needs one. ``auto`` keeps the embedding dense (the
    family's round trip above saves and loads); asking for a table is refused with the reason."""
    model = tiny("olmo")
    with pytest.raises(DbquantError, match="without a floating-point parameter"):
        quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32, embed_bits="8"),
                 progress=False)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
