"""Running a loaded model fast: the lean decoder and the quantized KV cache.

Owns: ``decode`` (``FastDecoder``: static cache, fused projections, one native call per
layer), ``generate`` (prompt, engine and cache building for ``dbquant generate``) and ``kv``
(the VidKV / KIVI caches for transformers ``generate()``).

May import: ``dbquant.model``, ``dbquant.backends``, ``dbquant.format``, ``dbquant.errors``.
"""
