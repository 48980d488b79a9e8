"""1.x-bit KV cache (VidKV) with packed storage, for stock transformers ``generate()``.

    from dbquant.runtime.kv import make_cache
    cache = make_cache(model, "1.5/1.58")          # or "fp", "kivi2", "hqq2", "hqq1", "2/2", ...
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

Parts: ``spec`` (the ``--kv`` spellings), ``quantizers`` (pure quantize/dequantize pairs
and bit packing), ``reference`` (loop oracles for the tests), ``codecs`` (K/V of whole
token groups), ``cache`` (the transformers ``Cache``), ``stp`` (semantic token
protection), ``triton_dequant`` (optional Triton dequant kernels).
The kv-ppl protocol that measures these caches is ``dbquant.eval.kv_ppl``.
"""

from .cache import QuantKVCache, QuantKVLayer, cache_nbytes, fp16_bytes_per_token, make_cache
from .spec import KVSpec, parse_kv
from .stp import protected_tokens

__all__ = ["KVSpec", "QuantKVCache", "QuantKVLayer", "cache_nbytes", "fp16_bytes_per_token", "make_cache",
           "parse_kv", "protected_tokens"]
