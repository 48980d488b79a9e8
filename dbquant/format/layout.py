"""The canonical packed format of a dual-binary (FDB) linear, as data.

One quantized linear ``y = x @ W.T`` with ``W`` of shape [N, K] (N = out_features,
K = in_features) is stored as three tensors (``docs/FORMAT.md`` has the table and a
worked example that ``tests/test_formats.py`` pins byte for byte):

=========  =======  =============  ==================================================
name       dtype    shape          meaning
=========  =======  =============  ==================================================
qweight    uint8    [2, N, Kp/8]   bit planes b1 (plane 0) and b2 (plane 1); bit j of
                                   byte i holds input channel 8*i + j (LSB first);
                                   padded channels K..Kp-1 hold 0
scales     float16  [N, G, 2]      alpha1, alpha2 of each group of g input channels
offset     float16  [N, G]         beta (only when ``offset=True``)
=========  =======  =============  ==================================================

with ``Kp = ceil(K / g) * g`` and ``G = Kp / g``. The weight it encodes is
``W[n, k] = alpha1[n, k // g] * b1[n, k] + alpha2[n, k // g] * b2[n, k] (+ beta[n, k // g])``.

Kernels may repack this layout at load time; on disk there is only this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DbquantError

FORMAT_NAME = "dbquant-fdb"
FORMAT_VERSION = 1
# 2: the checkpoint may also hold quantized tables (input embedding / output projection,
# dbquant/format/embedding.py); a checkpoint says 2 exactly when it does, so a reader that only
# knows 1 refuses it by version instead of meeting tensors it has no place for.
SUPPORTED_VERSIONS = (1, 2)

PLANES = 2
CONTAINER_DTYPE = torch.uint8
SCALE_DTYPE = torch.float16
BIT_ORDER = "lsb-first"  # bit j of byte i <-> input channel 8*i + j
GROUP_MULTIPLE = 8  # groups are byte-aligned so a group's bits never share a byte
MAX_GROUP_SIZE = 4096


def check_group_size(group_size: int) -> int:
    """Return ``group_size`` if the format can hold it, else raise ``DbquantError``."""
    if (
        not isinstance(group_size, int)
        or group_size < GROUP_MULTIPLE
        or group_size > MAX_GROUP_SIZE
        or group_size % GROUP_MULTIPLE
    ):
        raise DbquantError(
            f"group size {group_size!r} cannot work: it must be a multiple of {GROUP_MULTIPLE} "
            f"between {GROUP_MULTIPLE} and {MAX_GROUP_SIZE} (groups are byte-aligned in the packed "
            "planes); 64 is the default"
        )
    return group_size


def check_version(version) -> int:
    """Raise ``DbquantError`` unless ``version`` is a packed-format version this build reads."""
    try:
        v = int(version)
    except (TypeError, ValueError):
        v = None
    if v not in SUPPORTED_VERSIONS:
        raise DbquantError(
            f"packed format version {version!r} is not supported by this dbquant "
            f"(it reads versions {list(SUPPORTED_VERSIONS)}); upgrade dbquant or re-quantize the model"
        )
    return v


@dataclass(frozen=True)
class LinearLayout:
    """Shape facts of one packed linear; everything else about its storage follows from it."""

    out_features: int
    in_features: int
    group_size: int
    offset: bool = False

    @property
    def padded_in_features(self) -> int:
        return self.groups * self.group_size

    @property
    def groups(self) -> int:
        return math.ceil(self.in_features / self.group_size)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor this linear stores (bias excluded)."""
        n, g = self.out_features, self.groups
        specs = {
            "qweight": ((PLANES, n, self.padded_in_features // 8), CONTAINER_DTYPE),
            "scales": ((n, g, 2), SCALE_DTYPE),
        }
        if self.offset:
            specs["offset"] = ((n, g), SCALE_DTYPE)
        return specs

    def storage_bits(self) -> int:
        """Bits held on disk for this weight: planes (padding included) + every scale/offset."""
        return sum(
            math.prod(shape) * torch.finfo(dt).bits if dt.is_floating_point else math.prod(shape) * 8
            for shape, dt in self.tensor_specs().values()
        )

    def bits_per_weight(self) -> float:
        """Effective bits per weight: ``storage_bits / (N * K)``; padding counts as cost."""
        return self.storage_bits() / (self.out_features * self.in_features)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack {0,1} values along the last dim, LSB first.

    Args:
        bits: uint8/bool [..., L] with L % 8 == 0, values in {0, 1}.
    Returns:
        uint8 [..., L / 8]; bit j of byte i is ``bits[..., 8 * i + j]``.
    """
    if bits.shape[-1] % 8:
        raise ValueError(f"pack_bits needs a last dim that is a multiple of 8, got {bits.shape[-1]}")
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (b * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 [..., B].
        length: keep the first ``length`` values (default ``8 * B``).
    Returns:
        uint8 [..., length] with values in {0, 1}.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return bits if length is None else bits[..., :length]


def pack(b1: torch.Tensor, b2: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
         layout: LinearLayout) -> dict[str, torch.Tensor]:
    """Pack planes and scales into the canonical tensors of ``layout``.

    Args:
        b1, b2: uint8 [N, Kp] bit planes (padded channels must be 0).
        alpha: float [N, G, 2] scales (alpha1, alpha2); stored as float16.
        offset: float [N, G] or None.
    Returns:
        ``{"qweight": uint8 [2, N, Kp/8], "scales": float16 [N, G, 2](, "offset": float16 [N, G])}``.
    """
    specs = layout.tensor_specs()
    if tuple(b1.shape) != (layout.out_features, layout.padded_in_features) or b1.shape != b2.shape:
        raise ValueError(f"planes {tuple(b1.shape)}/{tuple(b2.shape)} do not match layout {layout}")
    if (offset is not None) != layout.offset:
        raise ValueError(f"offset given={offset is not None} but layout.offset={layout.offset}")
    out = {
        "qweight": pack_bits(torch.stack([b1, b2])),
        "scales": alpha.to(SCALE_DTYPE).contiguous(),
    }
    if offset is not None:
        out["offset"] = offset.to(SCALE_DTYPE).contiguous()
    for name, (shape, dtype) in specs.items():
        assert tuple(out[name].shape) == shape and out[name].dtype == dtype, (name, out[name].shape)
    return out


def unpack(tensors: dict[str, torch.Tensor], layout: LinearLayout):
    """Inverse of :func:`pack`.

    Returns:
        ``(b1, b2, alpha, offset)``: uint8 [N, Kp] x2, float32 [N, G, 2], float32 [N, G] or None.
    """
    check_tensors(tensors, layout)
    planes = unpack_bits(tensors["qweight"])
    offset = tensors.get("offset")
    return planes[0], planes[1], tensors["scales"].float(), None if offset is None else offset.float()


def check_tensors(tensors: dict[str, torch.Tensor], layout: LinearLayout, where: str = "") -> None:
    """Raise ``DbquantError`` unless ``tensors`` hold exactly the shapes/dtypes ``layout`` needs."""
    for name, (shape, dtype) in layout.tensor_specs().items():
        t = tensors.get(name)
        if t is None:
            raise DbquantError(f"{where}{name} is missing from the checkpoint (layout {layout})")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DbquantError(
                f"{where}{name} has shape {tuple(t.shape)} and dtype {t.dtype}, but the format needs "
                f"{shape} {dtype} for out_features={layout.out_features}, "
                f"in_features={layout.in_features}, group_size={layout.group_size}"
            )


def dequantize(b1: torch.Tensor, b2: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
               in_features: int) -> torch.Tensor:
    """Dense weight from unpacked planes.

    Args:
        b1, b2: uint8 [N, Kp]; alpha: float [N, G, 2]; offset: float [N, G] or None.
    Returns:
        float32 [N, in_features].
    """
    n, kp = b1.shape
    g = alpha.shape[1]
    a = alpha.float()
    w = a[..., 0:1] * b1.view(n, g, kp // g).float() + a[..., 1:2] * b2.view(n, g, kp // g).float()
    if offset is not None:
        w = w + offset.float().unsqueeze(-1)
    return w.reshape(n, kp)[:, :in_features]
