"""Triton kernels (installed as ``dbquant.kernels``): kernels only.

``dbgemm_triton``: the dual-binary prefill GEMM, the split-K decode GEMV and its
reduction, plus autotune configuration lists. The wrappers that check inputs, allocate
and launch live in ``dbquant/backends/triton.py`` and register the ``triton`` backend with
``dbquant.backends.registry``.
"""
