"""Run a named evaluation protocol: ``wiki`` (perplexity, dbquant.eval.wiki), ``code`` (perplexity
on listed Python standard-library files, dbquant.eval.code) or ``kv-ppl`` (perplexity through a
quantized KV cache, dbquant.eval.kv_ppl)."""

from __future__ import annotations

import time

from ..errors import DbquantError
from .code import code_files, code_windows
from .data import load_text
from .kv_ppl import evaluate_kv
from .wiki import perplexity, wiki_windows

PROTOCOLS = ("wiki", "code", "kv-ppl")


def evaluate(model, tokenizer, protocol: str = "wiki", n_windows: int = 32, seq_len: int = 512,
             batch_size: int = 4, progress: bool = True, kv: dict | None = None) -> dict:
    """Run a named protocol.

    Returns: {"protocol", "ppl", "nll", "tokens", "n_windows" (actually used),
    "seq_len", "seconds"}; ``code`` adds "files": [{"name", "sha256"}] (the text it read). ``kv`` (kv-ppl
    only): keyword arguments of :func:`dbquant.eval.kv_ppl.evaluate_kv` (kv, n_windows, seq_len, residual, ...).
    """
    if protocol not in PROTOCOLS:
        raise DbquantError(f"unknown eval protocol {protocol!r}; available: {', '.join(PROTOCOLS)}.")
    if protocol == "kv-ppl":  # its own windows (16 x 1024) and a cache spec: see dbquant.eval.kv_ppl
        return evaluate_kv(model, tokenizer, progress=progress, **(kv or {}))
    if kv:
        raise DbquantError(f"--kv applies to --protocol kv-ppl only (the {protocol} protocol runs without a cache)")
    t0 = time.perf_counter()
    extra = {}
    if protocol == "code":
        files = code_files()
        windows = code_windows(tokenizer, files, seq_len=seq_len, n_windows=n_windows)
        extra["files"] = [{"name": f["name"], "sha256": f["sha256"]} for f in files]
    else:
        windows = wiki_windows(tokenizer, load_text("wiki", "eval"), seq_len=seq_len, n_windows=n_windows)
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {
        "protocol": protocol,
        **result,
        "n_windows": windows.shape[0],
        "seq_len": seq_len,
        "seconds": time.perf_counter() - t0,
        **extra,
    }
