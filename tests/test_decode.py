"""The lean decoder (dbquant.runtime.decode) against the Hugging Face forward and generate()."""

import pytest
import torch

import dbquant
from dbquant.backends import cpu as cpu_backend
from dbquant.backends import reference
from dbquant.errors import DbquantError
from dbquant.quantize import QuantizeOptions, quantize
from dbquant.runtime.decode import SUPPORTED, FastDecoder, check_supported
from tests.conftest import make_tiny_model
from tests.tolerances import (
    BF16_LM_HEAD,
    FP16_CACHE,
    FP32_REORDER,
    FP32_REORDER_LONG,
    FP32_ULP,
    INT8_ACT_REL_ERR,
    INT8_LM_HEAD,
    KERNEL_REL_ERR,
)

IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def _packed(model_type="llama", tmp_path=None, **cfg):
    model = make_tiny_model(model_type, **cfg)
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    if tmp_path is not None:  # through a checkpoint, as users load it
        dbquant.save(model, tmp_path / model_type)
        model = dbquant.load(tmp_path / model_type)
    return model


def _assert_chunked_logits_match(model, cache_dtype="float32", torch_ops=False):
    """Prefill 5 tokens, append a 3-token chunk, then single tokens: every step's last-position
    logits equal the full forward's at that position (float32 rounding with the float32 cache; with
    the float16 one, to that cache's rounding). torch_ops: a chunk's RoPE, attention and gated activation
    by torch's ops (the path off the CPU) instead of the native ones."""
    with torch.no_grad():
        ref = model(IDS).logits
    dec = FastDecoder(model, max_len=32, cache_dtype=cache_dtype)
    if torch_ops:  # what a decoder off the CPU runs
        dec.rope_heads, dec.gated_act, dec.attend_causal = reference.rope_heads_ref, reference.gated_act_ref, None
    dec._alloc(IDS.shape[0])
    assert dec.k_cache.dtype == getattr(torch, cache_dtype)
    scale = ref.abs().max().item()
    rtol, atol = (FP32_REORDER_LONG, FP32_REORDER * scale) if cache_dtype == "float32" else (0, FP16_CACHE * scale)
    for start, end in [(0, 5), (5, 8), (8, 9), (9, 10), (10, 11)]:
        got = dec.forward(IDS[:, start:end], start)
        torch.testing.assert_close(got, ref[:, end - 1], rtol=rtol, atol=atol)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_matches_hf_forward(model_type):
    _assert_chunked_logits_match(make_tiny_model(model_type))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_packed_fused_matches_hf_forward(model_type, tmp_path):
    model = _packed(model_type, tmp_path)
    dec = FastDecoder(model)
    assert dec.layers[0].qkv.packed is not None  # q, k, v fused into one kernel call
    _assert_chunked_logits_match(model)


@pytest.mark.parametrize("gemm", ["fp32", "bf16", "int8", "w8a8"])
def test_long_prefill_gemm(gemm):
    """A prompt of more than LUT_MAX_ROWS tokens goes through one GEMM per projection:
    prefill_gemm="fp32" gives the HF forward's logits to fp32 rounding, "bf16" (weights and
    activations rounded to bfloat16) to bf16 rounding, "int8" (activations rounded to int8 per
    group, csrc/cpu/gemm_a8.h) to that rounding, "w8a8" (and the weights to 8-bit levels) to both,
    the same greedy token; "auto" is what
    backends/cpuinfo.py says this CPU pays for."""
    model = _packed("llama")
    ids = torch.randint(0, 300, (1, cpu_backend.LUT_MAX_ROWS + 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    dec = FastDecoder(model, max_len=64, prefill_gemm=gemm, cache_dtype="float32")
    assert dec.prefill_gemm == gemm and dec.layers[0].qkv.gemm == gemm
    dec._alloc(1)
    got = dec.forward(ids, 0)
    scale = ref.abs().max().item()
    if gemm == "fp32":
        torch.testing.assert_close(got, ref, rtol=FP32_REORDER_LONG, atol=FP32_REORDER * scale)
    else:
        err = ((got - ref).norm() / ref.norm()).item()
        assert 0 < err < (KERNEL_REL_ERR[torch.bfloat16] if gemm == "bf16" else INT8_ACT_REL_ERR), err
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert FastDecoder(model, max_len=64).prefill_gemm == cpu_backend.resolve_gemm("auto")
    with pytest.raises(DbquantError, match="gemm must be one of"):
        FastDecoder(model, max_len=64, prefill_gemm="fp16")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_long_prefill_trims_the_last_layer(packed):
    """Above LUT_MAX_ROWS tokens the last layer runs attention, o-projection and MLP for each sequence's
    last position only: a batch of two gives HF's last-position logits, and the next token's step (which
    reads every position's keys and values, the last layer's included) gives HF's too."""
    model = _packed("llama") if packed else make_tiny_model("llama")
    t = cpu_backend.LUT_MAX_ROWS + 9
    ids = torch.randint(0, 300, (2, t + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    dec = FastDecoder(model, max_len=64, prefill_gemm="fp32", cache_dtype="float32")
    dec._alloc(2)
    scale = ref.abs().max().item()
    calls = []

    class Spy:  # the last layer's MLP projection, counting the rows it gets
        def __init__(self, proj):
            self.proj, self.sizes = proj, proj.sizes

        def __call__(self, x, rows=None):
            calls.append(x.shape[0])
            return self.proj(x, rows)

    dec.layers[-1].gate_up = Spy(dec.layers[-1].gate_up)
    for got, want in ((dec.forward(ids[:, :t], 0), ref[:, t - 1]), (dec.forward(ids[:, t:], t), ref[:, t])):
        torch.testing.assert_close(got, want, rtol=FP32_REORDER_LONG, atol=FP32_REORDER * scale)
    assert calls == [2, 2]  # the prefill's last layer: one row per sequence, not 2 t


def _prefilled_pair(model, cache_dtype="float32"):
    """(native decoder, Python-step decoder, ids [1, T], HF logits [T, V]), both prefilled with 4 tokens
    (the same Python path in both) into caches of ``cache_dtype``; their one-token steps are what the
    tests compare."""
    native, python = (FastDecoder(model, max_len=32, cache_dtype=cache_dtype) for _ in range(2))
    python.native = python.stack = None
    ids = IDS[:1]
    with torch.no_grad():
        ref = model(ids).logits[0]
    for dec in (native, python):
        dec._alloc(1)
        dec.forward(ids[:, :4], 0)
    return native, python, ids, ref


@pytest.mark.parametrize("kind", ["int8", "int16"])
def test_native_step_with_integer_tables_matches_the_python_step(kind):
    """With ``kind`` tables forced, the C++ step and the Python step (whose one-row linears take
    the same tables through run_cpu's lut="auto") agree to fp32 rounding, caches included; HF's float
    forward is only near (the tables' error, csrc/cpu/dbgemm_i8lut.h), and its greedy token is kept."""
    model = _packed("llama")
    with cpu_backend.forced_lut(kind):
        native, python, ids, ref = _prefilled_pair(model)
        scale = ref.abs().max().item()
        for p in range(4, ids.shape[1]):
            a, b = native.forward(ids[:, p:p + 1], p), python.forward(ids[:, p:p + 1], p)
            torch.testing.assert_close(a, b, rtol=FP32_REORDER, atol=FP32_REORDER * scale)
            assert (a[0] - ref[p]).abs().max().item() < 0.05 * scale
        torch.testing.assert_close(native.k_cache, python.k_cache, rtol=FP32_REORDER, atol=FP32_ULP)


def _on_every_isa(check, *args):
    """check(*args) on every ISA path this CPU can run, each forced for the whole check."""
    assert cpu_backend.load_cpu()
    for isa in torch.ops.dbquant.cpu_isas():
        with cpu_backend.forced_isa(isa):
            try:
                check(*args)
            except AssertionError as e:
                raise AssertionError(f"isa={isa}: {e}") from e


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("model_type,cfg", [("llama", {}), ("qwen2", {}),  # qwen2: q/k/v biases
                                             ("llama", {"num_key_value_heads": 4}),  # no GQA
                                             ("llama", {"head_dim": 24})])  # vectors' tails (AVX-512: 16 + 8)
def test_native_layer_step_matches_the_python_step(model_type, cfg):
    """A one-token step through decode_step_cpu (one C++ call for every layer) gives the Python
    step's logits and cache contents, position after position, and HF's forward at every position;
    so does decode_layer_cpu called once per layer. On each ISA path, forced for both steps (the
    decode ops' attention, norms and activations are compiled once per ISA: csrc/cpu/decode_ops_impl.h)."""
    _on_every_isa(_native_step_matches, model_type, cfg)


def _native_step_matches(model_type, cfg):
    model = _packed(model_type, **cfg)
    native, python, ids, ref = _prefilled_pair(model)
    assert native.native is not None and len(native.native) == model.config.num_hidden_layers
    scale = ref.abs().max().item()
    steps = []
    for p in range(4, ids.shape[1]):
        a, b = native.forward(ids[:, p:p + 1], p), python.forward(ids[:, p:p + 1], p)
        steps.append(a)
        torch.testing.assert_close(a, b, rtol=FP32_REORDER, atol=FP32_REORDER * scale)
        torch.testing.assert_close(a[0], ref[p], rtol=FP32_REORDER_LONG, atol=FP32_REORDER * scale)
    torch.testing.assert_close(native.k_cache, python.k_cache, rtol=FP32_REORDER, atol=FP32_ULP)
    torch.testing.assert_close(native.v_cache, python.v_cache, rtol=FP32_REORDER, atol=FP32_ULP)
    assert all(L.native is native.native[i] for i, L in enumerate(native.layers))
    assert native.stack.size() == model.config.num_hidden_layers
    # the per-layer op, one call per layer from the same prefilled caches: the same arithmetic, bit for bit
    per_layer, _, _, _ = _prefilled_pair(model)
    for p, want in zip(range(4, ids.shape[1]), steps):
        x = per_layer.embed(ids[:, p:p + 1]).float().reshape(1, -1)
        for i, L in enumerate(per_layer.layers):
            per_layer.decode_layer.run(x, L.native, L.cos[p], L.sin[p], per_layer.k_cache[i], per_layer.v_cache[i], p)
        assert torch.equal(per_layer._logits(per_layer._rms(x, per_layer.norm)), want)
    assert torch.equal(per_layer.k_cache, native.k_cache) and torch.equal(per_layer.v_cache, native.v_cache)
    # bad input is refused by the ops, not computed
    step = cpu_backend.decode_step_cpu.run
    with pytest.raises(RuntimeError, match=r"pos 32 is outside the RoPE tables \(max_len 32\)"):
        step(torch.zeros(1, model.config.hidden_size), native.stack, native.k_cache, native.v_cache, 32)
    with pytest.raises(RuntimeError, match=r"decode_step_cpu: caches must be \["):
        step(torch.zeros(1, model.config.hidden_size), native.stack, native.k_cache[1:], native.v_cache[1:], 0)
    H, D = model.config.hidden_size, native.head_dim
    with pytest.raises(RuntimeError, match=rf"decode_step_cpu: x must be \[1, {H}\]"):
        step(torch.zeros(1, H - 1), native.stack, native.k_cache, native.v_cache, 0)
    with pytest.raises(RuntimeError, match=rf"set_final_norm: w must be float32 \[{H}\]"):
        native.stack.set_final_norm(torch.ones(H - 1), 1e-5)
    run, layer = native.decode_layer.run, native.native[0]
    x = torch.zeros(1, model.config.hidden_size)
    with pytest.raises(RuntimeError, match=r"pos 32 is outside the cache \(max_len 32\)"):
        run(x, layer, native.cos[0], native.sin[0], native.k_cache[0], native.v_cache[0], 32)
    with pytest.raises(RuntimeError, match=rf"x must be \[1, {H}\] \(hidden\), got \[1, {H - 1}\]"):
        run(x[:, :H - 1].contiguous(), layer, native.cos[0], native.sin[0], native.k_cache[0], native.v_cache[0], 0)
    with pytest.raises(RuntimeError, match=rf"cos must have shape \[{D}\]"):
        run(x, layer, native.cos[0, :8].contiguous(), native.sin[0], native.k_cache[0], native.v_cache[0], 0)


def _steps_on_threads(model, threads):
    """The hidden states after decode_step_cpu (the final norm included) at positions 4..10 (after a 4-token
    prefill on one thread: BLAS may round differently on more) and the caches, the steps run with `threads`
    torch threads."""
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dec = FastDecoder(model, max_len=32)
        assert dec.stack is not None
        dec._alloc(1)
        dec.forward(IDS[:1, :4], 0)
        torch.set_num_threads(threads)
        xs = []
        for p in range(4, IDS.shape[1]):
            x = dec.embed(IDS[:1, p:p + 1]).float().reshape(1, -1)
            cpu_backend.decode_step_cpu.run(x, dec.stack, dec.k_cache, dec.v_cache, p)
            xs.append(x)
        return torch.cat(xs), dec.k_cache.clone(), dec.v_cache.clone()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])  # gemma2: post-branch norms, window, soft-capping
def test_native_step_is_bit_identical_on_any_thread_count(model_type):
    """The step splits each GEMV's tiles and the attention's query heads among the threads, and no sum
    crosses a split: 2 and 3 threads (shares of unequal size, more threads than this CPU's cores) give the
    1-thread hidden states and caches bit for bit."""
    assert cpu_backend.load_cpu()
    model = _family_model(model_type, packed=True) if model_type != "llama" else _packed("llama", head_dim=24)
    want = _steps_on_threads(model, 1)
    for threads in (2, 3):
        got = _steps_on_threads(model, threads)
        for name, a, b in zip(("hidden states", "k_cache", "v_cache"), got, want):
            assert torch.equal(a, b), f"{threads} threads: {name} differ by {(a - b).abs().max().item()}"


def test_cache_dtype_is_float16_where_the_step_is_native():
    """"auto" keeps the float KV cache in float16 where one native call runs a token's layers (its
    attention widens the rows as it reads them), in float32 where the framework path runs (it would
    widen the whole cache every step); either can be asked for, and nothing else."""
    assert cpu_backend.load_cpu()
    model = _packed("llama")
    for dec, want in ((FastDecoder(model, max_len=16), torch.float16),
                      (FastDecoder(make_tiny_model(), max_len=16), torch.float32),  # dense: no native step
                      (FastDecoder(model, max_len=16, cache_dtype="float32"), torch.float32),
                      (FastDecoder(make_tiny_model(), max_len=16, cache_dtype="float16"), torch.float16)):
        dec._alloc(1)
        assert dec.cache_dtype == want and dec.k_cache.dtype == want and dec.v_cache.dtype == want
    with pytest.raises(DbquantError, match=r"unknown cache dtype 'bfloat16'; choose from \('auto', 'float16'"):
        FastDecoder(model, max_len=16, cache_dtype="bfloat16")


@pytest.mark.usefixtures("float_luts")  # the steps compared at the cache's rounding, not the tables'
@pytest.mark.parametrize("model_type,cfg", [("llama", {}),
                                             ("llama", {"head_dim": 24}),  # AVX-512: rows of 16 + 8 halves
                                             ("gemma2", None)])  # a sliding window, soft-capping
def test_float16_cache_step_matches_the_python_step(model_type, cfg):
    """With float16 caches the C++ step (its rows widened by vcvtph2ps, or in software on the portable path)
    gives the Python step's logits, whose attention reads the same cache through torch, on every ISA path;
    both write the same float16 keys and values, or neighbours where their float32 keys straddle a rounding
    boundary; and both follow HF's forward to the cache's rounding. A dense decoder with a float16 cache
    (the framework path throughout) follows HF's forward too."""
    model = _family_model(model_type, packed=True) if cfg is None else _packed(model_type, **cfg)
    _on_every_isa(_float16_step_matches, model)
    _assert_chunked_logits_match(model, "float16")
    _assert_chunked_logits_match(make_tiny_model("llama"), "float16")


def _float16_step_matches(model):
    native, python, ids, ref = _prefilled_pair(model, "float16")
    assert native.stack is not None and native.k_cache.dtype == python.k_cache.dtype == torch.float16
    scale = ref.abs().max().item()
    for p in range(4, ids.shape[1]):
        a, b = native.forward(ids[:, p:p + 1], p), python.forward(ids[:, p:p + 1], p)
        torch.testing.assert_close(a, b, rtol=0, atol=FP16_CACHE * scale)
        torch.testing.assert_close(a[0], ref[p], rtol=0, atol=FP16_CACHE * scale)
    for got, want in ((native.k_cache, python.k_cache), (native.v_cache, python.v_cache)):
        # one float16 ulp: 2^-10 relative (normal values), 2^-24 absolute (subnormal ones)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -10, atol=2 ** -24)


def test_decode_stack_refuses_layers_of_unequal_kv_heads():
    """One cache tensor holds every layer's k, v: DecodeStack.add checks it once, not every step."""
    a = FastDecoder(_packed("llama"), max_len=32)
    b = FastDecoder(_packed("llama", num_key_value_heads=4), max_len=32)
    with pytest.raises(RuntimeError, match="every layer must have the first layer's 2 kv heads of 16 channels, "
                                           "got 4 of 16"):
        cpu_backend.prepare_decode_stack([(L.native, L.cos, L.sin) for L in (a.layers[0], b.layers[0])])


def test_native_layer_step_needs_fused_packed_layers():
    assert FastDecoder(make_tiny_model()).native is None  # dense
    assert FastDecoder(_packed("llama", hidden_size=72)).native is None  # unfusable shapes


def test_packed_unfusable_shapes_fall_back_to_modules():
    # hidden 72 / 4 heads -> k, v have 36 rows: not a multiple of the 16-row tile
    model = _packed("llama", hidden_size=72)
    assert FastDecoder(model).layers[0].qkv.modules is not None
    _assert_chunked_logits_match(model)


@pytest.mark.parametrize("packed", [False, True])
def test_greedy_generation_equals_hf(packed):
    model = _packed() if packed else make_tiny_model()
    prompt = IDS[:1, :6]
    with torch.inference_mode():
        hf = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    seq, stats = FastDecoder(model, max_len=64).generate(prompt, 12)
    assert torch.equal(seq, hf)
    assert stats.prompt_tokens == 6 and stats.new_tokens == 12 and len(stats.per_step_s) == 11
    assert stats.prefill_tok_s > 0 and stats.decode_tok_s > 0


def test_batch_rows_are_independent():
    model = make_tiny_model()
    dec = FastDecoder(model, max_len=64)
    both, _ = dec.generate(IDS[:, :6], 5)
    for i in range(2):
        one, _ = dec.generate(IDS[i:i + 1, :6], 5)
        assert torch.equal(both[i:i + 1], one)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    dec = FastDecoder(make_tiny_model(), max_len=64)
    prompt = IDS[:1, :6]
    a, _ = dec.generate(prompt, 8, do_sample=True, generator=torch.Generator().manual_seed(3))
    b, _ = dec.generate(prompt, 8, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy, _ = dec.generate(prompt, 8)
    k1, _ = dec.generate(prompt, 8, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(5))
    p0, _ = dec.generate(prompt, 8, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(k1, greedy) and torch.equal(p0, greedy)


def test_stops_at_eos_after_min_new_tokens():
    dec = FastDecoder(make_tiny_model(), max_len=64)
    greedy, _ = dec.generate(IDS[:1, :6], 8)
    new = greedy[0, 6:].tolist()
    eos = new[-1]
    stop = new.index(eos) + 1  # generation ends at the first occurrence
    seq, stats = dec.generate(IDS[:1, :6], 8, eos_token_id=eos)
    assert seq.shape[1] == 6 + stop and stats.new_tokens == stop and torch.equal(seq, greedy[:, :6 + stop])
    seq, _ = dec.generate(IDS[:1, :6], 8, eos_token_id=eos, min_new_tokens=8)
    assert torch.equal(seq, greedy)


def test_bfloat16_lm_head_is_close():
    model = make_tiny_model()
    ref = FastDecoder(model, max_len=16)
    bf = FastDecoder(model, max_len=16, lm_head_dtype=torch.bfloat16)
    ref._alloc(2)
    bf._alloc(2)
    a, b = ref.forward(IDS[:, :8], 0), bf.forward(IDS[:, :8], 0)
    assert bf.lm_head.dtype == torch.bfloat16 and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=BF16_LM_HEAD, atol=BF16_LM_HEAD * a.abs().max().item())


def test_unsupported_models_and_lengths():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=100))
    with pytest.raises(DbquantError, match="supports .* not model_type='gpt2'"):
        FastDecoder(gpt2)
    dec = FastDecoder(make_tiny_model(), max_len=10)
    with pytest.raises(DbquantError, match=r"prompt 6 \+ 5 new tokens exceed max_len=10"):
        dec.generate(IDS[:1, :6], 5)
    with pytest.raises(DbquantError, match="max_new_tokens must be >= 1"):
        dec.generate(IDS[:1, :6], 0)


def test_int8_lm_head_matches_its_dequantized_weight():
    from dbquant.runtime.decode import quantize_rows_int8

    model = make_tiny_model()
    codes, scale = quantize_rows_int8(model.lm_head.weight)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scale.shape == (model.config.vocab_size,)
    dec = FastDecoder(model, max_len=16, lm_head_dtype=torch.int8)
    ref = FastDecoder(model, max_len=16)
    ref.lm_head = (codes.float() * scale[:, None])  # the same rounded weight, dense
    dec._alloc(2)
    ref._alloc(2)
    a, b = dec.forward(IDS[:, :8], 0), ref.forward(IDS[:, :8], 0)
    torch.testing.assert_close(a, b, rtol=FP32_REORDER, atol=FP32_REORDER * b.abs().max().item())


@pytest.mark.parametrize("n,k,m", [(37, 200, 3), (3, 17, 2), (1001, 576, 1), (8, 16, 4)])
def test_linear_int8_kernel_parity(n, k, m):
    from dbquant.runtime.decode import quantize_rows_int8

    assert cpu_backend.load_cpu()
    codes, scale = quantize_rows_int8(torch.randn(n, k))
    x = torch.randn(m, k)
    ref = x @ (codes.float() * scale[:, None]).T
    for isa in torch.ops.dbquant.cpu_isas():  # every ISA path this CPU can run (avx512, avx2, scalar)
        y = torch.ops.dbquant.linear_int8_cpu(x, codes, scale, isa)
        torch.testing.assert_close(y, ref, rtol=FP32_REORDER, atol=FP32_REORDER * ref.abs().max().item(), msg=isa)
    with pytest.raises(RuntimeError, match="x has K=5 but wq is"):
        torch.ops.dbquant.linear_int8_cpu(torch.randn(1, 5), codes, scale)
    with pytest.raises(RuntimeError, match="wq must be a contiguous int8"):
        torch.ops.dbquant.linear_int8_cpu(x, codes.float(), scale)


def _w8a8_ref(x, codes, scale):
    """The W8A8 product from its definition: x rounded to int8 per block of 32 channels
    (scale max|x| / 127), exact integer dots per block, then the two scales."""
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d.clamp_min(1e-30)), torch.zeros_like(xb))
    dots = torch.einsum("mbk,nbk->mnb", q.double(), codes.reshape(codes.shape[0], -1, 32).double())
    return ((dots * d[..., 0].double()[:, None, :]).sum(-1) * scale.double()).float()


@pytest.mark.parametrize("n,k,m", [(37, 64, 3), (1001, 576, 1), (5, 32, 4)])
def test_linear_w8a8_kernel_parity(n, k, m):
    from dbquant.runtime.decode import quantize_rows_int8

    assert cpu_backend.load_cpu()
    codes, scale = quantize_rows_int8(torch.randn(n, k))
    x = torch.randn(m, k)
    x[0, :32] = 0  # an all-zero block (scale 0)
    ref = _w8a8_ref(x, codes, scale)
    exact = x @ (codes.float() * scale[:, None]).T
    for isa in torch.ops.dbquant.cpu_isas():
        y = torch.ops.dbquant.linear_w8a8_cpu(x, codes, scale, isa)
        torch.testing.assert_close(y, ref, rtol=FP32_REORDER, atol=FP32_REORDER * ref.abs().max().item(), msg=isa)
    # the activations' rounding costs well under 1% of the output
    assert (ref - exact).norm() < 0.01 * exact.norm()
    with pytest.raises(RuntimeError, match="must be a multiple of 32"):
        torch.ops.dbquant.linear_w8a8_cpu(torch.randn(1, 40), torch.zeros(2, 40, dtype=torch.int8), torch.ones(2))


def test_w8a8_lm_head_in_the_decoder():
    from dbquant.runtime.decode import quantize_rows_int8

    model = make_tiny_model()
    dec = FastDecoder(model, max_len=16, lm_head_dtype="w8a8")
    exact = FastDecoder(model, max_len=16)
    dec._alloc(2)
    exact._alloc(2)
    a, b = dec.forward(IDS[:, :8], 0), exact.forward(IDS[:, :8], 0)
    codes, scale = quantize_rows_int8(model.lm_head.weight)
    assert torch.equal(dec.lm_head, codes)
    torch.testing.assert_close(a, b, rtol=INT8_LM_HEAD, atol=INT8_LM_HEAD * b.abs().max().item())
    with pytest.raises(DbquantError, match="not a multiple of 32"):
        FastDecoder(make_tiny_model(hidden_size=72), lm_head_dtype="w8a8")


@pytest.mark.parametrize("shape", [(1, 576), (3, 7, 64), (2, 17)])
def test_fused_rms_norm_matches_torch(shape):

    assert cpu_backend.load_cpu()
    x, w = torch.randn(*shape), torch.randn(shape[-1])
    y = torch.ops.dbquant.rms_norm_cpu(x, w, 1e-5)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (shape[-1],), w, 1e-5),
                               rtol=FP32_REORDER, atol=FP32_REORDER)
    with pytest.raises(RuntimeError, match=r"w must be a contiguous float32 \[" + str(shape[-1])):
        torch.ops.dbquant.rms_norm_cpu(x, torch.randn(shape[-1] + 1), 1e-5)


# Every family the decoder claims, with configs that make each of its switches bite: a sliding
# window shorter than the sequence (mistral, qwen2's upper layers, gemma2/3's local layers),
# Gemma-3's local/global layers with two RoPE bases, soft-caps and query_pre_attn_scalar small
# enough to change the logits, Granite's four multipliers away from 1.
FAMILY_CFGS = {
    "llama": {}, "mistral": dict(sliding_window=4), "qwen3": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=20.0),
    "gemma": {}, "olmo2": {}, "phi3": dict(sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=2.0, query_pre_attn_scalar=8),
    "gemma3_text": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
                        rope_local_base_freq=100.0, final_logit_softcapping=3.0),
}


def _family_model(model_type, packed):
    """A tiny model of the family with random norm weights (HF initialises them to 1, or to 0
    under Gemma's (1 + w), which would hide a wrong norm), packed with fdb when asked."""
    cfg = FAMILY_CFGS[model_type]
    model = _packed(model_type, **cfg) if packed else make_tiny_model(model_type, **cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def test_family_table_covers_supported():
    assert sorted(FAMILY_CFGS) == sorted(SUPPORTED)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("model_type", sorted(FAMILY_CFGS))
def test_family_matches_hf_forward_and_generate(model_type, packed):
    """Chunked prefill + single steps give HF's logits; greedy tokens equal HF generate();
    packed checkpoints run each one-token layer as one native call."""
    model = _family_model(model_type, packed)
    _assert_chunked_logits_match(model)
    prompt = IDS[:1, :6]
    with torch.inference_mode():
        hf = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    dec = FastDecoder(model, max_len=64, cache_dtype="float32")  # HF's arithmetic, so HF's greedy tokens
    assert (dec.native is not None) == (packed and cpu_backend.load_cpu())
    seq, _ = dec.generate(prompt, 12)
    assert torch.equal(seq, hf)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CFGS))
def test_family_prefill_by_torch_ops_matches_hf_forward(model_type):
    """The prefill's RoPE, attention and gated activation by torch's ops (what runs off the CPU) give HF's
    logits too, and the native ops are what a CPU decoder runs by default."""
    model = _family_model(model_type, packed=False)
    dec = FastDecoder(model, max_len=8)
    native = cpu_backend.load_cpu()
    assert (dec.attend_causal is not None) == native
    refs = (reference.rope_heads_ref, reference.gated_act_ref)
    assert ((dec.rope_heads, dec.gated_act) == refs) != native
    _assert_chunked_logits_match(model, torch_ops=True)


@pytest.mark.usefixtures("float_luts")  # compares with float references at fp32 tolerances
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "olmo2", "granite", "qwen2", "phi3"])
def test_family_native_step_matches_the_python_step(model_type):
    """The fused C++ layer with the family's switches against the Python step, token by token
    past the sliding window (positions 4..10 with window 4)."""
    assert cpu_backend.load_cpu()
    model = _family_model(model_type, packed=True)
    native, python = FastDecoder(model, max_len=32), FastDecoder(model, max_len=32)
    python.native = None
    for dec in (native, python):
        dec._alloc(1)
        dec.forward(IDS[:1, :4], 0)
    for p in range(4, IDS.shape[1]):
        a, b = native.forward(IDS[:1, p:p + 1], p), python.forward(IDS[:1, p:p + 1], p)
        torch.testing.assert_close(a, b, rtol=FP32_REORDER, atol=FP32_REORDER * b.abs().max().item())
    # keys through a reordered q/k norm (its sum of squares in SIMD order): relative to their size
    scale = python.k_cache.abs().max().item()
    torch.testing.assert_close(native.k_cache, python.k_cache, rtol=FP32_REORDER, atol=FP32_REORDER * scale)


# switch of a DecoderLayer -> its Llama value; turning one off must change the logits, so the
# family tests above would catch a switch computed wrongly (or ignored).
SWITCHES = {"gemma2": ["softcap", "window", "post_attn", "post_ffn", "act", "scale"],
            "gemma3_text": ["q_norm", "window", "cos"], "olmo2": ["q_norm", "post_attn", "ln1"],
            "granite": ["residual_scale", "scale"], "mistral": ["window"], "phi3": ["window"]}
LLAMA_VALUE = {"softcap": 0.0, "window": 0, "post_attn": None, "post_ffn": None, "act": "silu", "q_norm": None,
               "ln1": "norm", "residual_scale": 1.0, "scale": 0.25, "cos": "global"}


@pytest.mark.parametrize("model_type", sorted(SWITCHES))
def test_each_family_switch_changes_the_logits(model_type):
    model = _family_model(model_type, packed=False)
    dec = FastDecoder(model, max_len=32)
    dec._alloc(2)
    ref = dec.forward(IDS, 0)
    for switch in SWITCHES[model_type]:
        changed = FastDecoder(model, max_len=32)
        for L in changed.layers:
            value = LLAMA_VALUE[switch]
            if switch == "q_norm":
                L.k_norm = None
            if value == "norm":  # OLMo-2 without pre-norms: give it one
                value = changed.norm
            if value == "global":  # Gemma-3's local layers with the global RoPE table
                L.sin = changed.layers[-1].sin
                value = changed.layers[-1].cos
            setattr(L, switch, value)
        changed._alloc(2)
        assert not torch.allclose(changed.forward(IDS, 0), ref, atol=1e-4), (model_type, switch)


def test_check_supported_names_the_reason():
    with pytest.raises(DbquantError, match="not model_type='starcoder2'"):
        check_supported(make_tiny_model("starcoder2"))
    with pytest.raises(DbquantError, match="rotates whole heads; phi3 has partial_rotary_factor=0.5"):
        check_supported(make_tiny_model("phi3", partial_rotary_factor=0.5, pad_token_id=0))
    with pytest.raises(DbquantError, match="SiLU or GELU-tanh gated MLP, got activation 'relu'"):
        check_supported(make_tiny_model("llama", hidden_act="relu"))
    with pytest.raises(DbquantError, match="use_bidirectional_attention"):
        check_supported(make_tiny_model("gemma3_text", use_bidirectional_attention=True))
    with pytest.raises(DbquantError, match="float32 models, got torch.bfloat16"):
        check_supported(make_tiny_model("gemma").to(torch.bfloat16))


def test_mixed_plane_checkpoint_decodes_natively(tmp_path):
    """A checkpoint whose linears differ in k (1..4), group size and offset: the decoder still fuses
    q/k/v and gate/up (t16.widen) and runs one C++ call per layer; its logits follow HF's forward
    and its greedy tokens equal HF generate()."""
    from tests.test_checkpoint import _mixed_dir

    _, out, plan = _mixed_dir(tmp_path)
    model = dbquant.load(out)
    assert len({(p.layout.planes, p.layout.group_size) for p in plan}) > 3
    dec = FastDecoder(model, max_len=32)
    assert dec.native is not None and dec.layers[0].qkv.packed is not None
    _assert_chunked_logits_match(model)
    ids = IDS[:1, :6]
    with torch.inference_mode():
        hf = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(FastDecoder(model, max_len=32, cache_dtype="float32").generate(ids, 8)[0], hf)
