"""Perplexity under dbquant's standard "wiki" protocol.

Protocol: the built-in wiki eval articles joined with blank lines, tokenized without
special tokens, cut into non-overlapping ``seq_len``-token windows, the first
``n_windows`` kept; if the tokenizer adds a BOS by default, each window's first token
is replaced by BOS. PPL = exp(mean NLL over all predicted positions). fp32 SmolLM2
scores 16.08 (llama.cpp F32 on the same windows agrees).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DbquantError


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by default (Llama-2 style yes, SmolLM2 no)."""
    with_special = tokenizer("x").input_ids
    plain = tokenizer("x", add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    return bos is not None and len(with_special) > len(plain) and with_special[0] == bos


def wiki_windows(tokenizer, texts: list[str], seq_len: int = 512, n_windows: int = 32) -> torch.Tensor:
    """The protocol's token windows.

    Returns: torch.int64 tensor [n, seq_len] with n = min(n_windows, available windows).
    """
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False, return_tensors="pt").input_ids[0]
    n = min(n_windows, ids.numel() // seq_len)
    if n == 0:
        raise DbquantError(f"eval text has {ids.numel()} tokens, not enough for one {seq_len}-token window.")
    windows = ids[: n * seq_len].view(n, seq_len).clone()
    if adds_bos(tokenizer):
        # The model was trained to see BOS first; overwrite rather than shift so the
        # windows stay aligned with those of other tools (llama.cpp does the same).
        windows[:, 0] = tokenizer.bos_token_id
    return windows


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``windows`` (torch.int64 [n, seq_len]).

    Every position but the first of each window is predicted, so
    tokens = n * (seq_len - 1). Log-probabilities are taken in fp32 whatever the
    model's dtype; the NLL sum is accumulated in float64.

    Returns: {"ppl": float, "nll": float (mean, nats), "tokens": int}.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off while scoring; the caller's mode is restored below
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # [b, seq_len-1, vocab]
            targets = batch[:, 1:]  # [b, seq_len-1]
            nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            total_nll += nll.item()
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens}
