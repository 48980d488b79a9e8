"""Quantization math, free of I/O and of model structure.

Owns: FDB (``fdb``: levels, nearest-level bits, initialisation, scale search and
least-squares refinement, RTN) producing :class:`dbquant.quant.fdb.DualBinaryWeight`.

May import: ``dbquant.format``, ``dbquant.errors``.
"""
