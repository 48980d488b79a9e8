"""Modules: a trainable fake-quant linear (calibration) and a packed linear (inference).

The two meet at :class:`dbquant.quant.fdb.DualBinaryWeight`: ``FakeQuantLinear.export()``
produces one, :meth:`PackedLinear.from_weight` packs one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import registry
from ..backends.reference import dequantize_ref
from ..format import layout
from ..format.layout import LinearLayout
from ..quant import fdb


class FakeQuantLinear(nn.Module):
    """A linear whose forward uses the FDB-quantized weight, trainable by STE.

    Parameters:
        weight: float32 [N, K] latent full-precision weight.
        alpha: float32 [N, G, k] scales (alpha_1..alpha_k; k = 2: alpha1, alpha2).
        offset: float32 [N, G] or absent.
        bias: float32 [N] or absent (kept frozen by convention, trainable if you wish).

    Forward: bits are the nearest levels of the latent weight under the current
    scales (no gradient); ``w_hat = sum_i alpha_i * b_i (+ beta)`` is exact in
    the scales, and the latent weight gets the straight-through gradient of ``w_hat``.
    """

    def __init__(self, weight: torch.Tensor, q: fdb.DualBinaryWeight, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = weight.shape
        self.in_features, self.out_features = k, n
        self.group_size = q.layout.group_size
        self.scale_bits = q.layout.scale_bits  # the scales train in float32; export rounds them to this width
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.alpha = nn.Parameter(q.alpha.detach().clone())
        self.offset = None if q.offset is None else nn.Parameter(q.offset.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, q: fdb.DualBinaryWeight) -> "FakeQuantLinear":
        return cls(linear.weight, q, linear.bias)

    def quantized_weight(self) -> torch.Tensor:
        """float32 [N, K]: the fake-quantized weight (differentiable in scales and, by STE, weight)."""
        wg = fdb.to_groups(self.weight, self.group_size)
        return fdb.fake_quant(wg, self.alpha, self.offset).reshape(self.out_features, -1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> fdb.DualBinaryWeight:
        """Planes and stored-precision scales of the current state (for packing)."""
        wg = fdb.to_groups(self.weight, self.group_size)
        return fdb.finalize(wg, self.alpha.detach().float(), None if self.offset is None
                            else self.offset.detach().float(), self.in_features, self.scale_bits)


class PackedLinear(nn.Module):
    """Inference linear over the canonical packed format (``dbquant.format.layout``).

    Buffers (the state-dict names are the on-disk names):
        qweight: uint8 [k, N, Kp/8]; scales: float16 [N, G, k], or with ``scale_bits`` 8 int8 codes
        [N, G, k] and scale_max: float16 [N]; offset: float16 [N, G] (optional). Kernels take the
        float16 scales of :meth:`float_scales`.
    Parameter:
        bias: [N] (optional; same dtype as the model's dense params).

    ``backend`` names a registry entry of ``dbquant.backends.registry`` (``auto`` by default).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 offset: bool = False, device=None, dtype=None, backend: str = "auto", planes: int = layout.PLANES,
                 scale_bits: int = layout.FLOAT_SCALE_BITS):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.planes, self.scale_bits = planes, layout.check_scale_bits(scale_bits)
        self.backend = backend
        for name, (shape, dt) in self.layout_for(offset).tensor_specs().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        if "offset" not in self._buffers:
            self.offset = None
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def layout_for(self, offset: bool) -> LinearLayout:
        return LinearLayout(self.out_features, self.in_features, self.group_size, offset, self.planes,
                            self.scale_bits)

    @property
    def layout(self) -> LinearLayout:
        return self.layout_for(self.offset is not None)

    @classmethod
    def from_weight(cls, q: fdb.DualBinaryWeight, bias: torch.Tensor | None = None,
                    backend: str = "auto") -> "PackedLinear":
        lay = q.layout
        mod = cls(lay.in_features, lay.out_features, lay.group_size, bias is not None, lay.offset,
                  dtype=None if bias is None else bias.dtype, backend=backend, planes=lay.planes,
                  scale_bits=lay.scale_bits)
        for name, t in layout.pack(q.planes, q.alpha, q.offset, lay).items():
            getattr(mod, name).copy_(t)
        if bias is not None:
            mod.bias.data.copy_(bias.detach())
        return mod

    def float_scales(self) -> torch.Tensor:
        """float16 [N, G, k]: the scales kernels take (the stored ones, or 8-bit codes decoded;
        the decoded copy is kept until the buffers change)."""
        if self.scale_bits == layout.FLOAT_SCALE_BITS:
            return self.scales
        return self._memo("_scales_cache", (self.scales, self.scale_max),
                          lambda: layout.float_scales(self.scales, self.scale_max))

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] weight this module computes with."""
        return dequantize_ref(self.qweight, self.float_scales(), self.offset, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = registry.get("dbgemm", self.backend, x.device, registry.rows_of(x))
        if getattr(kernel, "prepare", None) is None:
            return kernel(x, self.qweight, self.float_scales(), self.offset, self.bias, self.in_features,
                          self.group_size)
        return kernel.run(x, self._prepared(kernel), self.bias)

    def _prepared(self, kernel):
        """The weight in ``kernel``'s own layout, built on first use and rebuilt only when
        the buffers change (moved, reloaded or modified in place)."""
        stored = (self.qweight, self.scales, self._buffers.get("scale_max"), self.offset)  # not the decoded copy:
        # a rebuilt one may reuse a freed copy's address with the same version counter
        return self._memo("_prepared_cache", stored,
                          lambda: kernel.prepare(self.qweight, self.float_scales(), self.offset, self.in_features,
                                                 self.group_size), kernel)

    def _memo(self, slot: str, tensors: tuple, build, *extra):
        """``build()``, kept in the plain attribute ``slot`` (not in the state dict) until one of
        ``tensors`` changes (storage or version counter) or ``extra`` differs."""
        key = (*extra, *(_identity(t) for t in tensors))
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, build())
            self.__dict__[slot] = cached
        return cached[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, planes={self.planes}, scale_bits={self.scale_bits}, "
                f"offset={self.offset is not None}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def _identity(t: torch.Tensor | None) -> tuple:
    """What tells a buffer apart from its earlier self: storage address and version counter."""
    if t is None:
        return ()
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside it)
        return (t.data_ptr(),)
