"""`dbquant bench --e2e DIR --kv ...`: decode speed, cache bytes and peak RSS of the fast decoder
with the float32 cache and with the packed VidKV cache, at long prompts, side by side in one run.

Each (kv, prompt length, threads) configuration runs in a fresh interpreter (``python -m
dbquant.bench.kv``), so its peak RSS is its own: the peak is reset after the checkpoint has
loaded (Linux ``/proc/self/clear_refs``), and ``peak_rss_mb`` is the high-water mark of the
prefill and decode that follow (the model's resident memory included). Decode speed is the
median per-token step (robust to the shared machine's noise); the prompt is prefilled once.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer

from ..eval import kv_ppl
from ..model.checkpoint import load
from ..model.sources import resolve_model
from ..runtime.decode import FastDecoder
from ..runtime.kv import QuantKVCache, fp16_bytes_per_token, parse_kv

BUDGET = 1 << 30  # the memory budget of the "longest prompt" figures: 1 GiB for cache + weights


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_one(model_dir: str, kv: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """One configuration in this process: load, prefill ``prompt_tokens`` random tokens, decode
    ``new_tokens`` greedily; the row (see :func:`e2e_kv_bench`)."""
    torch.set_num_threads(threads)
    model = load(model_dir)
    spec = parse_kv(kv)
    dec = FastDecoder(model, max_len=prompt_tokens + new_tokens + 8, kv=None if spec.method == "fp" else spec)
    ids = torch.randint(100, min(model.config.vocab_size, 20000), (1, prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    rss0 = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here on
        f.write("5")
    t = time.perf_counter()
    _, st = dec.generate(ids, new_tokens, min_new_tokens=new_tokens)
    wall = time.perf_counter() - t
    step = statistics.median(st.per_step_s)
    fp16_tok = fp16_bytes_per_token(model.config)
    n_tok = prompt_tokens + new_tokens - 1  # cached after the last step
    if dec.kv_cache is not None:
        cache = dec.kv_cache.nbytes()
    else:  # the float32 cache holds every token at 4 bytes (its buffer is preallocated to max_len)
        cache = {"packed": 0, "residual": 2 * fp16_tok * n_tok, "sink": 0, "tokens": n_tok, "tokens_packed": 0,
                 "allocated": dec.k_cache.numel() * 8}
        cache["total"] = cache["residual"]
    return dict(kv=spec.bits_label, kv_name=spec.name, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                threads=threads, decode_tok_s=round(1.0 / step, 2), decode_tok_s_mean=round(st.decode_tok_s, 2),
                step_ms=round(step * 1e3, 2), prefill_tok_s=round(st.prefill_tok_s, 2), wall_s=round(wall, 1),
                cache_bytes=cache, cache_bytes_fp16=fp16_tok * cache["tokens"],
                packed_bytes_per_token=(round(cache["packed"] / cache["tokens_packed"], 1)
                                        if cache["tokens_packed"] else None),
                fp16_bytes_per_token=fp16_tok, rss_after_load_mb=round(rss0 / 1024, 1),
                peak_rss_mb=round(_status_kb("VmHWM") / 1024, 1), loadavg=os.getloadavg())


def e2e_kv_bench(model_dir: str, kvs: list[str], prompt_tokens: list[int], new_tokens: int = 32,
                 threads: list[int] = (2,), progress=None) -> list[dict]:
    """Rows per (kv, prompt length, threads), each from its own process (see the module docstring):
    decode_tok_s, cache_bytes {packed, residual, sink, total, ...} beside fp16's, peak_rss_mb;
    ``decode_vs_fp`` relates decode speed to the fp row of the same prompt length and threads."""
    rows = []
    for t in threads:
        for p in prompt_tokens:
            for kv in kvs:
                cmd = [sys.executable, "-m", "dbquant.bench.kv", model_dir, kv, str(p), str(new_tokens), str(t)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                if progress:
                    progress(json.dumps(row))
    for r in rows:
        fp = next((x for x in rows if x["kv"] == "fp" and x["prompt_tokens"] == r["prompt_tokens"]
                   and x["threads"] == r["threads"]), None)
        r["decode_vs_fp"] = round(r["decode_tok_s"] / fp["decode_tok_s"], 3) if fp else None
    return rows


def budget_rows(rows: list[dict], weight_bytes: int, budget: int = BUDGET) -> list[dict]:
    """The longest context that fits ``budget`` bytes of cache + weights, per cache, from measured
    bytes per token (the longest prompt's row): fp16 at its 2 x layers x kv heads x D x 2 bytes; a
    packed cache at its packed bytes per token plus its fixed full-precision part (residual window,
    sink) as measured."""
    out = []
    longest = max(r["prompt_tokens"] for r in rows)
    for r in rows:
        if r["prompt_tokens"] != longest or r["kv"] == "fp":
            continue
        c = r["cache_bytes"]
        fixed = c["residual"] + c["sink"]
        out.append(dict(budget_bytes=budget, weight_bytes=weight_bytes, kv="fp16",
                        bytes_per_token=r["fp16_bytes_per_token"],
                        max_tokens=(budget - weight_bytes) // r["fp16_bytes_per_token"]))
        out.append(dict(budget_bytes=budget, weight_bytes=weight_bytes, kv=r["kv"],
                        bytes_per_token=r["packed_bytes_per_token"], fixed_fp_bytes=fixed,
                        max_tokens=int((budget - weight_bytes - fixed) // r["packed_bytes_per_token"])))
    return out


def checkpoint_bytes(model_dir: str) -> int:
    """Bytes of a checkpoint's weight files (what its weights cost, as stored)."""
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))


@torch.inference_mode()
def decode_nll_check(model_dir: str, kv: str, n_windows: int = 2, tokenizer_from: str = "smollm2-135m",
                     prefix: int = kv_ppl.PREFIX, seq_len: int = kv_ppl.SEQ_LEN) -> dict:
    """The kv-ppl windows decoded token by token (teacher-forced) through the fast decoder's packed
    cache and through HF's forward with the reference ``QuantKVCache``, fed alike (the prefix group
    by group, then one token per step): both perplexities over the tokens after ``prefix + 1``, and
    the largest logit difference. Equal perplexities mean the packed path changes no kv-ppl figure
    of the reference path; the float32 cache's (fast decoder) is given beside them."""
    torch.set_num_threads(1)
    model = load(model_dir)
    windows = kv_ppl.kv_windows(AutoTokenizer.from_pretrained(resolve_model(tokenizer_from)), n_windows, seq_len)
    spec = parse_kv(kv)
    nll = {"packed": 0.0, "reference": 0.0, "fp": 0.0}
    worst = 0.0
    for w in windows:
        w = w[None]
        targets = w[0, prefix + 1:]
        logits = {}
        for name in ("packed", "fp"):
            dec = FastDecoder(model, max_len=seq_len, kv=spec if name == "packed" else None)
            dec._alloc(1)
            dec.forward(w[:, :prefix], 0)
            logits[name] = torch.stack([dec.forward(w[:, p:p + 1], p)[0] for p in range(prefix, seq_len - 1)])
        cache = QuantKVCache(model.config, spec)
        for s in range(0, prefix, spec.group):
            model(w[:, s:min(s + spec.group, prefix)], past_key_values=cache, use_cache=True)
        logits["reference"] = torch.stack([model(w[:, p:p + 1], past_key_values=cache, use_cache=True).logits[0, -1]
                                           for p in range(prefix, seq_len - 1)])
        for k in nll:
            nll[k] += torch.nn.functional.cross_entropy(logits[k].float(), targets, reduction="sum").item()
        worst = max(worst, (logits["packed"] - logits["reference"]).abs().max().item())
    n = windows.shape[0] * (seq_len - prefix - 1)
    return dict(kv=spec.name, windows=windows.shape[0], tokens=n, ppl_packed_fast_decoder=math.exp(nll["packed"] / n),
                ppl_reference_quantkvcache=math.exp(nll["reference"] / n), ppl_fp_cache=math.exp(nll["fp"] / n),
                max_abs_logit_diff=worst, loadavg=os.getloadavg())


if __name__ == "__main__":  # one configuration, its row as the last line of stdout
    if sys.argv[1] == "nll":  # python -m dbquant.bench.kv nll DIR KV [WINDOWS]
        print(json.dumps(decode_nll_check(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5]))))
        sys.exit(0)
    d, kv, p, n, t = sys.argv[1:6]
    print(json.dumps(run_one(d, kv, int(p), int(n), int(t))))
