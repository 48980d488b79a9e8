"""The "kv-ppl" protocol (docs/PROTOCOLS.md): perplexity through a quantized KV cache.

Windows: the wiki eval text tokenized as in the "wiki" protocol, cut into 1024-token
windows, the first 16. Per window: the first ``prefix`` (768) tokens are prefilled into
the cache (the prefill itself attends in full precision, as in any generate()), the cache
quantizes what its policy says, then the last 256 tokens are fed teacher-forced in one
forward through that cache. Scored: the 255 predictions made inside that forward (token
769 .. 1023 of each window), so every scored logit attended to the quantized prefix;
PPL = exp(mean NLL) over 16 x 255 = 4080 tokens.

The prefill's exact K/V do not depend on the cache under test, so they are computed once
per window (a ``DynamicCache``) and fed to each cache under test through its own
``update`` -- the same calls, with the same tensors, that a prefill forward makes. A
transformers ``QuantizedCache`` (HQQ) quantizes the whole first chunk it sees; to give it a
full-precision residual of ``r`` tokens, the prefix is fed as ``prefix - r + 1`` then
``r - 1`` tokens (its flush rule keeps fewer than ``r`` tokens), so it scores with a
641-token quantized part and 127 fp tokens where ours has 640 and 128.

Bytes are measured after the scoring forward, when the cache holds the whole window.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from ..errors import DbquantError
from ..runtime.generate import nothing_quantized_note
from ..runtime.kv.cache import cache_nbytes, fp16_bytes_per_token, head_dim_of, make_cache
from ..runtime.kv.spec import KVSpec, parse_kv
from .data import load_text
from .wiki import wiki_windows

SEQ_LEN = 1024
PREFIX = 768
N_WINDOWS = 16


def kv_windows(tokenizer, n_windows: int = N_WINDOWS, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """int64 [n, seq_len]: the protocol's windows (same tokenization and BOS rule as "wiki")."""
    return wiki_windows(tokenizer, load_text("wiki", "eval"), seq_len=seq_len, n_windows=n_windows)


def _fill(cache, kv: list[tuple[torch.Tensor, torch.Tensor]], spec: KVSpec) -> None:
    """Feed the prefix's exact states to ``cache`` layer by layer, as a prefill forward does."""
    t = kv[0][0].shape[-2]
    if spec.method == "hqq" and 0 < spec.residual < t:
        cuts = [t - spec.residual + 1, t]
    else:
        cuts = [t]
    for i, (k, v) in enumerate(kv):
        start = 0
        for end in cuts:
            cache.update(k[..., start:end, :], v[..., start:end, :], i)
            start = end


@torch.inference_mode()
def kv_perplexity(model, windows: torch.Tensor, specs: list[KVSpec], prefix: int = PREFIX,
                  progress: bool = True) -> list[dict]:
    """kv-ppl of ``model`` on ``windows`` (int64 [n, L]) for each cache spec, sharing the prefills.

    Returns one dict per spec: {"kv", "kv_bits", "residual", "ppl", "nll", "tokens",
    "kv_bytes_per_token", "kv_quantized_bits" (bits per cached K/V value over the
    quantized part, every scale/min/mask counted; null for fp), "fp16_bytes_per_token",
    "ratio_vs_fp16", "seconds" (fill + scoring; the shared prefills are not included),
    "kv_note" (null, or why a quantized spec quantized nothing: :func:`nothing_quantized_note`)}.
    """
    n, length = windows.shape
    if not 0 < prefix < length - 1:
        raise DbquantError(f"kv-ppl needs 0 < prefix < window length - 1, got prefix {prefix}, window {length}")
    model.eval()
    cfg = model.config.get_text_config(decoder=True)
    for spec in specs:  # bad specs fail before any compute
        make_cache(model, spec)
    per_value = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim_of(cfg)  # K+V values per token
    device = next(model.parameters()).device
    nll = [0.0] * len(specs)
    secs = [0.0] * len(specs)
    last_bytes: list[dict] = [{}] * len(specs)
    tokens = 0
    for w in tqdm(windows, desc="kv-ppl", unit="window", disable=not progress):
        w = w[None].to(device)
        pre = DynamicCache(config=model.config)
        model(input_ids=w[:, :prefix], past_key_values=pre, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in pre.layers]
        targets = w[:, prefix + 1:]
        tokens += targets.numel()
        for j, spec in enumerate(specs):
            t0 = time.perf_counter()
            cache = make_cache(model, spec)
            _fill(cache, kv, spec)
            logits = model(input_ids=w[:, prefix:], past_key_values=cache, use_cache=True).logits[:, :-1].float()
            nll[j] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            secs[j] += time.perf_counter() - t0
            last_bytes[j] = cache_nbytes(cache)
    fp16 = fp16_bytes_per_token(cfg)
    out = []
    for j, spec in enumerate(specs):
        b = last_bytes[j]
        bpt = b["total"] / b["tokens"]
        qbits = 8 * b["quantized"] / (b["tokens_quantized"] * per_value) if b["tokens_quantized"] else None
        mean = nll[j] / tokens
        out.append({"kv": spec.name, "kv_bits": spec.bits_label,
                    "residual": None if spec.method == "fp" else spec.residual,
                    "ppl": math.exp(mean), "nll": mean, "tokens": tokens, "kv_bytes_per_token": bpt,
                    "kv_quantized_bits": qbits, "kv_tokens_quantized": b["tokens_quantized"],
                    "kv_bytes_per_token_quantized_part": (b["quantized"] / b["tokens_quantized"]
                                                          if b["tokens_quantized"] else None),
                    "fp16_bytes_per_token": fp16, "ratio_vs_fp16": fp16 / bpt, "seconds": secs[j],
                    "kv_note": nothing_quantized_note(spec, b["tokens_quantized"], prefix)})
    return out


def evaluate_kv(model, tokenizer, kv: str | KVSpec | None, n_windows: int | None = None,
                seq_len: int | None = None, prefix: int | None = None, progress: bool = True,
                **spec_overrides) -> dict:
    """``dbquant eval --protocol kv-ppl --kv ...``: one cache spec, the protocol's defaults.

    Returns {"protocol": "kv-ppl", "kv", "kv_bits", "kv_bytes_per_token", "ppl", "tokens",
    "n_windows", "seq_len", "prefix", "seconds", ...} (see :func:`kv_perplexity`).
    """
    if kv is None:
        raise DbquantError("--protocol kv-ppl needs --kv (fp, K/V such as 1.5/1.58, kivi2, hqq2, hqq1)")
    spec = kv if isinstance(kv, KVSpec) else parse_kv(kv, **spec_overrides)
    if isinstance(kv, KVSpec) and spec_overrides:
        spec = replace(spec, **{k: v for k, v in spec_overrides.items() if v is not None}).check()
    seq_len = seq_len or SEQ_LEN
    prefix = prefix if prefix is not None else seq_len * 3 // 4
    t0 = time.perf_counter()
    windows = kv_windows(tokenizer, n_windows or N_WINDOWS, seq_len)
    res = kv_perplexity(model, windows, [spec], prefix=prefix, progress=progress)[0]
    return {"protocol": "kv-ppl", **res, "n_windows": windows.shape[0], "seq_len": seq_len, "prefix": prefix,
            "seconds": time.perf_counter() - t0}
