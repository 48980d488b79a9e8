"""Triton kernels (installed as ``dbquant.kernels``): kernels only.

Wrappers that check inputs, allocate and launch live in the ``dbquant`` package and
register with ``dbquant.ops``. No Triton kernel has landed yet; the ``ref`` and ``cpu``
backends serve every call until one does.
"""
