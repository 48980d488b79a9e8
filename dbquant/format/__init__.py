"""The packed on-disk format and the files that hold it.

Owns: the canonical dual-binary layout as data (``layout``: tensor specs, bit packing,
version and group-size checks) and checkpoint files (``files``: atomic output folders,
safetensors header checks).

May import: ``dbquant.errors`` only (and torch). Everything else builds on this layer.
"""
