"""Kernels behind one explicit registry.

Owns: ``registry`` (the ``(op, backend) -> function`` table and ``auto`` resolution),
``reference`` (the pure-PyTorch oracles), and the loaders/wrappers of the compiled
kernels: ``cpu`` (C++ extension ``dbquant._C``), ``cuda`` (``dbquant._C_cuda``) and
``triton`` (``dbquant.kernels``). Kernel sources live outside the package (csrc/, kernels/);
here inputs are checked and outputs allocated.

May import: ``dbquant.format``, ``dbquant.errors``, ``dbquant.kernels``, ``dbquant._C*``.
"""
