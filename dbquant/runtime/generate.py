"""Text generation for ``dbquant generate``: the prompt, the engine, the KV cache, the timing.

Two engines: ``dbquant`` (the lean decoder of :mod:`dbquant.runtime.decode`, Llama-family
text models) and ``hf`` (transformers ``model.generate()``, which also takes a quantized
KV cache and a VLM's image). ``auto`` picks ``dbquant`` when it can run the request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dbquant.backends import cpu as cpu_backend
from dbquant.errors import DbquantError
from dbquant.model.checkpoint import is_dbquant_dir
from dbquant.model.sources import resolve_model
from dbquant.model.vlm import image_prompt_inputs, vlm_family
from dbquant.runtime.decode import (
    LM_HEAD_DTYPES,
    FastDecoder,
    check_cache_dtype,
    check_kv_supported,
    check_supported,
)
from dbquant.runtime.kv import KVSpec, cache_nbytes, make_cache, parse_kv

ENGINES = ("auto", "dbquant", "hf")


@dataclass
class GenerateOptions:
    """What to generate and how (the flags of ``dbquant generate``).

    prompt: the user text; raw: do not apply the tokenizer's chat template; image: an image
    file the prompt refers to (VLMs, hf engine); max_new_tokens; sample: sample instead of
    greedy decoding (with the model's generation config); seed; backend: packed-linear
    backend of the dbquant engine; kv / kv_residual / kv_sink: a quantized KV cache (VidKV with
    ternary values: the dbquant engine's packed cache; others: the hf engine; None = the cache
    spec's defaults); engine: one of :data:`ENGINES`;
    lm_head_dtype: a key of ``LM_HEAD_DTYPES`` (dbquant engine's dense output projection);
    prefill_gemm: the dbquant engine's GEMM precision on a long prompt (``cpu_backend.GEMM_DTYPES``);
    cache_dtype: the dbquant engine's float KV cache, one of ``CACHE_DTYPE_CHOICES``.
    """

    prompt: str
    max_new_tokens: int = 32
    sample: bool = False
    seed: int = 0
    raw: bool = False
    image: str | None = None
    backend: str = "auto"
    kv: str | None = None
    kv_residual: int | None = None
    kv_sink: int | None = None
    engine: str = "auto"
    lm_head_dtype: str = "float32"
    prefill_gemm: str = "auto"
    cache_dtype: str = "auto"

    def check(self) -> GenerateOptions:
        if self.max_new_tokens < 1:
            raise DbquantError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.engine not in ENGINES:
            raise DbquantError(f"unknown engine {self.engine!r}; choose from {ENGINES}")
        if self.lm_head_dtype not in LM_HEAD_DTYPES:
            raise DbquantError(f"unknown lm-head dtype {self.lm_head_dtype!r}; choose from {tuple(LM_HEAD_DTYPES)}")
        if self.prefill_gemm not in cpu_backend.GEMM_DTYPES:
            raise DbquantError(f"unknown prefill GEMM {self.prefill_gemm!r}; choose from {cpu_backend.GEMM_DTYPES}")
        check_cache_dtype(self.cache_dtype)
        return self


@dataclass
class Generation:
    """The result: new token ids (int64 [n]), prompt length, seconds, engine used, and a
    human-readable note on speed (and KV cache size for a quantized cache)."""

    new_tokens: torch.Tensor
    prompt_tokens: int
    seconds: float
    engine: str
    speed: str
    warning: str | None = None  # e.g. a --kv cache that quantized no token (prompt + output within its residual)


def build_prompt(model: nn.Module, tokenizer, opts: GenerateOptions, model_id: str) -> tuple[torch.Tensor, dict]:
    """(input ids: int64 [1, T], extra generate() inputs such as pixel tensors).

    With ``opts.image`` the VLM's processor builds both (its files come from ``model_id``, a
    checkpoint folder or a model name); otherwise the chat template is applied unless
    ``opts.raw`` or the tokenizer has none.
    """
    if opts.image:
        if vlm_family(model) is None:
            raise DbquantError(f"--image needs a vision-language model; {model_id} is a {type(model).__name__}")
        folder = model_id if is_dbquant_dir(model_id) else resolve_model(model_id)
        extra = image_prompt_inputs(folder, model, tokenizer, opts.image, opts.prompt, chat=not opts.raw)
        return extra.pop("input_ids"), extra
    if not opts.raw and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": opts.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids, {}
    return tokenizer(opts.prompt, return_tensors="pt").input_ids, {}


def pick_engine(model: nn.Module, opts: GenerateOptions) -> str:
    """``dbquant`` or ``hf`` for this model and request; ``--engine dbquant`` that cannot run raises."""
    if opts.engine == "hf":
        return "hf"
    reason = None
    if opts.image:
        reason = "--image needs the Hugging Face generate() path (the VLM class merges the image features)"
    else:
        try:
            check_supported(model)
            if opts.kv and _kv_spec(opts).method != "fp":
                check_kv_supported(model, _kv_spec(opts))
        except DbquantError as e:
            reason = str(e)
    if reason is None:
        return "dbquant"
    if opts.engine == "dbquant":
        raise DbquantError(f"--engine dbquant cannot run this: {reason}")
    return "hf"


def nothing_quantized_note(spec: KVSpec, tokens_quantized: int, tokens: int) -> str | None:
    """A warning when a quantized cache spec quantized no token (else None).

    The cache packs whole groups of tokens once they leave the full-precision residual: a
    sequence of ``tokens`` shorter than the residual plus one group leaves every token in
    full precision, so the result is the fp cache's, not the spec's.
    """
    if spec.method == "fp" or tokens_quantized:
        return None
    return (f"KV cache {spec.name} quantized no token: its {tokens} cached tokens do not exceed the full-precision "
            f"residual ({spec.residual} tokens) by a whole group ({spec.group} tokens), so this is the "
            "full-precision cache's result; use a longer sequence or a smaller --kv-residual")


def _kv_spec(opts: GenerateOptions) -> KVSpec:
    return parse_kv(opts.kv, residual=opts.kv_residual, sink=opts.kv_sink)


def build_kv_cache(model: nn.Module, opts: GenerateOptions):
    """The quantized KV cache of ``opts.kv`` for ``model.generate()``, or None (plain cache)."""
    if not opts.kv:
        return None
    return make_cache(model, parse_kv(opts.kv, residual=opts.kv_residual, sink=opts.kv_sink))


def generate(model: nn.Module, tokenizer, opts: GenerateOptions, model_id: str = "") -> Generation:
    """Generate ``opts.max_new_tokens`` tokens after the prompt (fewer at an end-of-sequence token)."""
    opts.check()
    ids, extra = build_prompt(model, tokenizer, opts, model_id)
    torch.manual_seed(opts.seed)
    engine = pick_engine(model, opts)
    t = time.perf_counter()
    warning = None
    if engine == "dbquant":
        out, st, dec = _fast_generate(model, tokenizer, ids, opts)
        speed = f"prefill {st.prefill_tok_s:.1f} tokens/s, decode {st.decode_tok_s:.1f} tokens/s"
        if dec.kv_cache is not None:
            nb = dec.kv_cache.nbytes()
            speed += (f"; packed KV cache {dec.kv_spec.name}: {nb['total'] / max(nb['tokens'], 1):.0f} bytes/token "
                      f"held ({nb['packed']} packed, {nb['residual'] + nb['sink']} full precision)")
            warning = nothing_quantized_note(dec.kv_spec, nb["tokens_packed"], nb["tokens"])
    else:
        out, speed, warning = _hf_generate(model, tokenizer, ids, extra, opts)
    dt = time.perf_counter() - t
    return Generation(out[0, ids.shape[1]:], ids.shape[1], dt, engine, speed, warning)


def _fast_generate(model: nn.Module, tokenizer, ids: torch.Tensor, opts: GenerateOptions):
    """The dbquant engine, sampling as the model's generation config says: (ids [1, T + n], stats,
    the decoder)."""
    gc = model.generation_config
    dec = FastDecoder(model, max_len=ids.shape[1] + opts.max_new_tokens, backend=opts.backend,
                      lm_head_dtype=LM_HEAD_DTYPES[opts.lm_head_dtype], kv=_kv_spec(opts) if opts.kv else None,
                      prefill_gemm=opts.prefill_gemm, cache_dtype=opts.cache_dtype)
    return *dec.generate(ids, opts.max_new_tokens, do_sample=opts.sample, temperature=gc.temperature or 1.0,
                        top_k=gc.top_k or 0, top_p=gc.top_p or 1.0,
                        eos_token_id=gc.eos_token_id or tokenizer.eos_token_id,
                        generator=torch.Generator().manual_seed(opts.seed)), dec


def _hf_generate(model: nn.Module, tokenizer, ids: torch.Tensor, extra: dict, opts: GenerateOptions):
    """transformers ``generate()`` (with the quantized cache of ``opts.kv``): (ids [1, T + n], speed note,
    warning or None)."""
    cache = build_kv_cache(model, opts)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=opts.max_new_tokens, do_sample=opts.sample,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, past_key_values=cache,
                             **extra)
    speed = "Hugging Face generate()"
    if cache is not None:
        nb = cache_nbytes(cache)
        speed += f"; KV cache {opts.kv}: {nb['total'] / max(nb['tokens'], 1):.0f} bytes/token held"
        spec = _kv_spec(opts)
        return out, speed, nothing_quantized_note(spec, nb["tokens_quantized"], nb["tokens"])
    return out, speed, None
