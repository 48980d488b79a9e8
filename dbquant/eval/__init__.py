"""Evaluation protocols and the text they read.

Owns: ``data`` (built-in wiki text with its calibration/eval split, other text sources,
token windows), ``wiki`` (the wiki perplexity protocol), ``kv_ppl`` (perplexity through a
quantized KV cache) and ``protocols`` (``evaluate``: run one by name).

May import: ``dbquant.runtime``, ``dbquant.model``, ``dbquant.format``, ``dbquant.errors``.
"""
