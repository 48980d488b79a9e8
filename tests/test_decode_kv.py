"""FastDecoder on the packed VidKV cache (kv=...) against HF's forward and generate() with the
same cache (QuantKVCache): the same tokens are packed the same way, so logits agree to float
rounding and greedy tokens are equal."""

import pytest
import torch

from dbquant.backends import cpu as cpu_backend
from dbquant.errors import DbquantError
from dbquant.quantize import QuantizeOptions, quantize
from dbquant.runtime.decode import FastDecoder
from dbquant.runtime.kv import QuantKVCache, parse_kv
from tests.conftest import make_tiny_model
from tests.tolerances import FP32_REORDER, FP32_REORDER_LONG

# small groups and window so that a short test sequence packs several groups
SPEC = parse_kv("1.5/1.58", group=8, residual=4)
IDS = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))


def _packed_model(**cfg):
    model = make_tiny_model(**cfg)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    return model


def _hf_logits(model, ids, prompt, spec):
    """HF forward with a QuantKVCache, the prompt fed group by group as the decoder prefills it,
    then one token at a time: last-position logits float32 [steps, vocab]."""
    cache = QuantKVCache(model.config, spec)
    out = []
    with torch.no_grad():
        for s in range(0, prompt, spec.group):
            logits = model(ids[:, s:min(s + spec.group, prompt)], past_key_values=cache, use_cache=True).logits
        out.append(logits[0, -1])
        for p in range(prompt, ids.shape[1]):
            out.append(model(ids[:, p:p + 1], past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


def _decoder_logits(dec, ids, prompt):
    dec._alloc(1)
    out = [dec.forward(ids[:, :prompt], 0)[0]]
    out += [dec.forward(ids[:, p:p + 1], p)[0] for p in range(prompt, ids.shape[1])]
    return torch.stack(out)


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kv", ["1.5/1.58", "1/1.58", "2/1.58"])
def test_logits_match_hf_forward_with_the_same_cache(packed, kv):
    model = _packed_model() if packed else make_tiny_model()
    spec = parse_kv(kv, group=8, residual=4)
    dec = FastDecoder(model, max_len=64, kv=spec)
    assert (dec.decode_step_kv is not None) == packed  # packed: one native call per token, every layer in it
    got = _decoder_logits(dec, IDS, 21)
    want = _hf_logits(model, IDS, 21, spec)
    assert dec.kv_cache.n_groups == (IDS.shape[1] - 1 - spec.residual) // spec.group  # groups were packed
    torch.testing.assert_close(got, want, rtol=FP32_REORDER_LONG, atol=FP32_REORDER_LONG * want.abs().max().item())


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_tokens_equal_hf_generate_with_the_same_cache(packed):
    """A prompt within one group: HF's generate() prefills it in one forward, as the decoder does;
    then 24 new tokens pack three groups on the way."""
    model = _packed_model() if packed else make_tiny_model()
    prompt = IDS[:, :6]
    with torch.inference_mode():
        hf = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
                            past_key_values=QuantKVCache(model.config, SPEC))
    dec = FastDecoder(model, max_len=64, kv=SPEC)
    seq, stats = dec.generate(prompt, 24)
    assert torch.equal(seq, hf)
    assert dec.kv_cache.n_groups == 3 and stats.new_tokens == 24


def test_native_step_matches_the_python_step():
    model = _packed_model(num_key_value_heads=1)  # 4 query heads on one kv head
    native, python = FastDecoder(model, max_len=64, kv=SPEC), FastDecoder(model, max_len=64, kv=SPEC)
    python.decode_step_kv = None
    a, b = _decoder_logits(native, IDS, 9), _decoder_logits(python, IDS, 9)
    torch.testing.assert_close(a, b, rtol=FP32_REORDER, atol=FP32_REORDER * b.abs().max().item())
    for name in ("vtrits", "kcodes", "nbits", "sink_k"):  # the same codes were packed
        assert torch.equal(native.kv_cache.bufs[name], python.kv_cache.bufs[name]), name
    # a stack whose layers were never given their packed caches is refused, not run
    bare = cpu_backend.prepare_decode_stack([(L.native, L.cos, L.sin) for L in native.layers])
    with pytest.raises(RuntimeError, match="layer 0 has no packed cache"):
        cpu_backend.decode_step_kv_cpu.run(torch.zeros(1, model.config.hidden_size), bare, 0, 0, 0)
    with pytest.raises(RuntimeError, match="n_groups 99 and n_tail"):
        cpu_backend.decode_step_kv_cpu.run(torch.zeros(1, model.config.hidden_size), native.stack, 0, 99, 0)


def test_long_prefill_is_quantized_group_by_group():
    """A 100-token prompt with group 8 and residual 4: the float tail never holds more than
    residual + 2 groups (its fixed capacity), and afterwards less than residual + 1 group."""
    dec = FastDecoder(make_tiny_model(), max_len=128, kv=SPEC)
    dec._alloc(1)
    dec.forward(IDS.repeat(1, 3)[:, :100], 0)
    c = dec.kv_cache
    assert c.bufs["tail_k"].shape[2] == SPEC.residual + 2 * SPEC.group
    assert c.n_groups == 12 and c.n_tail == 4
    nb = c.nbytes()
    assert nb["tokens"] == 100 and nb["total"] == nb["packed"] + nb["residual"] + nb["sink"]
    assert dec.k_cache is None  # no float copy of the past


def test_refusals_name_the_reason():
    model = make_tiny_model()
    with pytest.raises(DbquantError, match=r"ternary \(1.58-bit\) values and fp8 scales; K2/V2"):
        FastDecoder(model, kv="2/2")
    with pytest.raises(DbquantError, match=r"KIVI-2"):
        FastDecoder(model, kv="kivi2")
    with pytest.raises(DbquantError, match="one sequence at a time, got batch 2"):
        FastDecoder(model, kv=SPEC).generate(IDS[:1].repeat(2, 1)[:, :5], 2)
    dec = FastDecoder(model, max_len=32, kv=SPEC)
    dec._alloc(1)
    dec.forward(IDS[:, :5], 0)
    with pytest.raises(DbquantError, match="holds 5 tokens; it can only be extended at that position, not at 3"):
        dec.forward(IDS[:, 5:6], 3)
    assert FastDecoder(model, kv="fp").kv_spec is None  # fp: the float32 cache
