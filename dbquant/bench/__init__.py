"""Benchmarks that print and save figures: ``cpu`` (kernels side by side, decode end to
end) and ``gpu`` (Triton/CUDA kernels against dense cuBLAS).

May import: any layer below the CLI (``runtime``, ``model``, ``backends``, ``format``).
"""
