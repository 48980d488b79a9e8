"""Everything that knows a model's structure: what to quantize, the modules that hold packed
weights, swapping them in, transformers glue, checkpoints, model sources and VLM families.

Owns: ``plan`` (decoder-block table, which linears, bits accounting), ``vlm`` (VLM family
table), ``modules`` (``FakeQuantLinear``, ``PackedLinear``), ``convert`` (module swapping),
``hf`` (``quant_method: dbquant`` for transformers), ``checkpoint`` (save/load),
``sources`` (built-in models, the model cache), ``testbed`` (the SmolVLM test bed) and
``inspect`` (per-layer statistics of a packed model).

May import: ``dbquant.format``, ``dbquant.quant``, ``dbquant.backends``, ``dbquant.errors``.
"""
