"""Loader and Python wrapper of the C++ CPU kernel (extension module ``dbquant._C``).

``dbquant._C`` has no Python functions: importing it loads the shared library, which
registers ``torch.ops.dbquant.dbgemm_cpu``. When it is missing (not built, or built
against another torch) :func:`load_cpu` returns False and warns once; dbquant then
uses the pure-PyTorch reference kernel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

BUILD_HINT = "pip install --no-build-isolation -e ."
# Above this many activation rows the lookup-table kernel hands over to dequantize + one
# BLAS GEMM, which wins on long prefills (crossover measured by `dbquant bench`, docs/RESULTS.md).
LUT_MAX_ROWS = 32
TILE = 16  # output rows per tile of the t16 layout (csrc/cpu/dbgemm_t16.h: kTile)

_cpu_state: bool | None = None  # None: not tried yet
_cpu_error: str | None = None


def load_cpu() -> bool:
    """Whether ``torch.ops.dbquant.dbgemm_cpu`` is available; imports ``dbquant._C`` once.

    On failure warns once per process (``RuntimeWarning``) with the reason and the build
    command; later calls return the cached answer silently.
    """
    global _cpu_state, _cpu_error
    if _cpu_state is None:
        try:
            from .. import _C  # noqa: F401 - loading the library registers the op

            torch.ops.dbquant.dbgemm_cpu  # noqa: B018 - raises if registration failed
            _cpu_state = True
        except (ImportError, OSError, AttributeError, RuntimeError) as e:
            _cpu_state, _cpu_error = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                "dbquant: the C++ CPU extension (dbquant._C) is not built or failed to load "
                f"({_cpu_error}); falling back to the slower pure-PyTorch reference kernel. "
                f"Build it from the source checkout with `{BUILD_HINT}` (needs torch and a C++ "
                "compiler).",
                RuntimeWarning,
                stacklevel=2,
            )
    return _cpu_state


@dataclass(frozen=True)
class CpuWeight:
    """A packed linear in the CPU kernel's "t16" layout (docs/FORMAT.md, Kernel layouts).

    With T = ceil(N / 16) tiles of 16 output rows (rows past N are zero), C8 = Kp / 8:
        planes: uint8 [T, C8, 2, 16]; planes[t, c, p, r] = qweight[p, 16t + r, c]
        scales: float16 [T, G, 2, 16]; offset: float16 [T, G, 16] or None
    The bytes are the canonical ones, only regrouped so that one SIMD register holds one
    byte of each of 16 rows.
    """

    planes: torch.Tensor
    scales: torch.Tensor
    offset: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scales, self.offset) if t is not None)


def _tile_rows(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """[N, ...] -> [T, 16, ...], zero rows appended up to 16 * T."""
    pad = tiles * TILE - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))])
    return t.reshape(tiles, TILE, *t.shape[1:])


def prepare_cpu(qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                in_features: int, group_size: int) -> CpuWeight:
    """Repack a canonical packed linear into the CPU kernel layout (done once per weight).

    Args: the canonical tensors (qweight uint8 [2, N, Kp/8], scales [N, G, 2], offset
    [N, G] or None; float16 or float32 — the kernel reads them at the format's float16).
    """
    n = qweight.shape[1]
    tiles = -(-n // TILE)
    planes = _tile_rows(qweight.detach().permute(1, 2, 0), tiles)  # [T, 16, C8, 2]
    sc = _tile_rows(scales.detach().to(torch.float16), tiles)  # [T, 16, G, 2]
    off = None if offset is None else _tile_rows(offset.detach().to(torch.float16), tiles)  # [T, 16, G]
    return CpuWeight(
        planes=planes.permute(0, 2, 3, 1).contiguous(),
        scales=sc.permute(0, 2, 3, 1).contiguous(),
        offset=None if off is None else off.permute(0, 2, 1).contiguous(),
        out_features=n, in_features=int(in_features), group_size=int(group_size),
    )


def run_cpu(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None, isa: str = "auto") -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the prepared weight ``w``.

    Args:
        x: float [..., K] on CPU (computed in float32; the result is cast back to x's dtype).
        bias: float [N] or None.
        isa: "auto" (fastest this CPU supports; above LUT_MAX_ROWS rows, dequantize + BLAS),
            or force one lookup-table path: "avx512", "avx2" or "scalar".
    Returns: [..., N] in x's dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    if x2.shape[0] > LUT_MAX_ROWS and isa == "auto":
        y = torch.nn.functional.linear(x2, dequantize_cpu(w), b)
    else:
        y = torch.ops.dbquant.dbgemm_cpu(x2, w.planes, w.scales, w.offset, b, w.out_features,
                                         w.in_features, w.group_size, isa)
    return y.reshape(*lead, w.out_features).to(x.dtype)


def dequantize_cpu(w: CpuWeight) -> torch.Tensor:
    """Dense float32 [N, K] weight of a prepared layer (equal to the reference's dequantization)."""
    return torch.ops.dbquant.dequantize_cpu(w.planes, w.scales, w.offset, w.out_features,
                                            w.in_features, w.group_size)


def dbgemm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """The registry's canonical-signature entry (see :func:`dbquant.backends.reference.dbgemm_ref`):
    repacks on every call. :class:`dbquant.model.modules.PackedLinear` instead calls
    :func:`prepare_cpu` once and :func:`run_cpu` per forward.
    """
    if not load_cpu():
        raise RuntimeError(f"dbquant._C is not available; build it with `{BUILD_HINT}`")
    return run_cpu(x, prepare_cpu(qweight, scales, offset, in_features, group_size), bias)


# The registry finds the load-time repack through these attributes.
dbgemm_cpu.prepare = prepare_cpu
dbgemm_cpu.run = run_cpu
