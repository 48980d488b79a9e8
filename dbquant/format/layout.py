"""The canonical packed format of a k-plane binary (FDB) linear, as data.

One quantized linear ``y = x @ W.T`` with ``W`` of shape [N, K] (N = out_features,
K = in_features) and k bit planes (k in 1..4; k = 2 is DB-LLM's dual binarization) is
stored as three tensors (``docs/FORMAT.md`` has the table and worked examples that
``tests/test_formats.py`` pins byte for byte):

=========  =======  =============  ==================================================
name       dtype    shape          meaning
=========  =======  =============  ==================================================
qweight    uint8    [k, N, Kp/8]   bit plane i = b_{i+1}; bit j of byte c holds input
                                   channel 8*c + j (LSB first); padded channels
                                   K..Kp-1 hold 0
scales     float16  [N, G, k]      alpha_1..alpha_k of each group of g input channels
offset     float16  [N, G]         beta (only when ``offset=True``)
=========  =======  =============  ==================================================

with ``Kp = ceil(K / g) * g`` and ``G = Kp / g``. The weight it encodes is
``W[n, k] = sum_i alpha_i[n, k // g] * b_i[n, k] (+ beta[n, k // g])``.

With 8-bit scales (``scale_bits = 8``, version 3) ``scales`` holds int8 codes in -127..127 and
``scale_max`` float16 [N] each row's largest scale magnitude m:
``alpha = float16(float32(code) * float32(m) / 127)`` (the offset stays float16). At g = 64 and
k = 2 that is 2.28 bits per weight instead of 2.5: the bits a budget (``--target-bpw``) can
spend elsewhere.

Version 1 had k = 2 everywhere and one group size for the whole model; version 2 gives each
linear its own k, group size and offset (``quantization_config.layers``); version 3 adds each
linear's ``scale_bits``. A version-1 file's tensors are exactly version 2's with k = 2, and a
version-2 file's are version 3's with 16-bit scales.

Kernels may repack this layout at load time; on disk there is only this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DbquantError

FORMAT_NAME = "dbquant-fdb"
# Version 2: k bit planes per linear (qweight [k, N, Kp/8], scales [N, G, k]; each layer's k,
# group size and offset in ``quantization_config.layers``), and the checkpoint may hold quantized
# tables (input embedding / output projection, dbquant/format/embedding.py). Version 1 is
# version 2 with k = 2 everywhere and no tables; it is still read. Version 3: a linear's scales may
# be int8 codes with one float16 maximum per row (``scale_bits`` 8, ``scale_max`` [N]).
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
SCALE_BITS_VERSION = 3  # the first version whose layers may say scale_bits

PLANES = 2  # the default k (and the only one of format version 1)
MAX_PLANES = 4  # k in 1..MAX_PLANES
CONTAINER_DTYPE = torch.uint8
SCALE_DTYPE = torch.float16
SCALE_BITS = (16, 8)  # float16 scales, or int8 codes with a float16 maximum per row
FLOAT_SCALE_BITS = 16  # the default width (and the only one of format versions 1 and 2)
SCALE_CODE_DTYPE = torch.int8
SCALE_CODE_MAX = 127  # codes in -127..127: symmetric, so a scale of either sign has the same grid
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


def check_planes(planes: int) -> int:
    """Return ``planes`` (k) if the format can hold it, else raise ``DbquantError``."""
    if not isinstance(planes, int) or isinstance(planes, bool) or not 1 <= planes <= MAX_PLANES:
        raise DbquantError(f"plane count k={planes!r} cannot work: it must be an integer in 1..{MAX_PLANES} "
                           "(k = 2 is dual binary, the default)")
    return planes


def check_scale_bits(scale_bits) -> int:
    """Return ``scale_bits`` if the format stores scales at that width, else raise ``DbquantError``."""
    if isinstance(scale_bits, bool) or scale_bits not in SCALE_BITS:
        raise DbquantError(f"scale width {scale_bits!r} bits cannot work: the format stores scales as float16 (16) "
                           "or as int8 codes with a float16 maximum per row (8)")
    return scale_bits


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
    planes: int = PLANES
    scale_bits: int = FLOAT_SCALE_BITS

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
            "qweight": ((self.planes, n, self.padded_in_features // 8), CONTAINER_DTYPE),
            "scales": ((n, g, self.planes), SCALE_DTYPE if self.scale_bits == 16 else SCALE_CODE_DTYPE),
        }
        if self.scale_bits == 8:
            specs["scale_max"] = ((n,), SCALE_DTYPE)
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


def pack(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
         layout: LinearLayout) -> dict[str, torch.Tensor]:
    """Pack planes and scales into the canonical tensors of ``layout``.

    Args:
        planes: uint8 [k, N, Kp] bit planes (padded channels must be 0).
        alpha: float [N, G, k] scales; stored as float16, or (``layout.scale_bits`` 8) as int8 codes
            and a float16 maximum per row (:func:`quantize_scales`; pass scales already on that grid,
            :func:`storable_scales`, for the planes to stay the nearest levels of what is stored).
        offset: float [N, G] or None.
    Returns:
        ``{"qweight": uint8 [k, N, Kp/8], "scales": float16 [N, G, k](, "offset": float16 [N, G])}``;
        with 8-bit scales ``scales`` is int8 [N, G, k] and ``scale_max`` float16 [N] is added.
    """
    specs = layout.tensor_specs()
    want = (layout.planes, layout.out_features, layout.padded_in_features)
    if tuple(planes.shape) != want:
        raise ValueError(f"planes {tuple(planes.shape)} do not match layout {layout} (want {want})")
    if (offset is not None) != layout.offset:
        raise ValueError(f"offset given={offset is not None} but layout.offset={layout.offset}")
    out = {"qweight": pack_bits(planes)}
    if layout.scale_bits == 8:
        out["scales"], out["scale_max"] = quantize_scales(alpha)
    else:
        out["scales"] = alpha.to(SCALE_DTYPE).contiguous()
    if offset is not None:
        out["offset"] = offset.to(SCALE_DTYPE).contiguous()
    for name, (shape, dtype) in specs.items():
        assert tuple(out[name].shape) == shape and out[name].dtype == dtype, (name, out[name].shape)
    return out


def unpack(tensors: dict[str, torch.Tensor], layout: LinearLayout):
    """Inverse of :func:`pack`.

    Returns:
        ``(planes, alpha, offset)``: uint8 [k, N, Kp], float32 [N, G, k], float32 [N, G] or None.
    """
    check_tensors(tensors, layout)
    offset = tensors.get("offset")
    alpha = float_scales(tensors["scales"], tensors.get("scale_max")).float()
    return unpack_bits(tensors["qweight"]), alpha, None if offset is None else offset.float()


def quantize_scales(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit scales: each row's largest magnitude ``m`` (float16) and each scale's nearest code on m / 127.

    Decoding (:func:`float_scales`) gives back every code but the largest exactly, and the largest as
    ``m`` itself, so ``quantize_scales(float_scales(*quantize_scales(a)))`` returns the same codes and
    maxima: re-packing unpacked scales is exact.

    Args:
        alpha: float [N, G, k].
    Returns:
        (codes int8 [N, G, k] in -127..127, ``scale_max`` float16 [N]). A row of zeros gets m = 0.
    """
    fmax = torch.finfo(SCALE_DTYPE).max
    m = alpha.float().abs().amax(dim=(1, 2)).clamp(max=fmax).to(SCALE_DTYPE)
    mf = m.float()[:, None, None]
    codes = torch.where(mf > 0, torch.round(alpha.float() * SCALE_CODE_MAX / torch.where(mf > 0, mf, 1.0)), 0.0)
    return codes.clamp(-SCALE_CODE_MAX, SCALE_CODE_MAX).to(SCALE_CODE_DTYPE).contiguous(), m.contiguous()


def float_scales(scales: torch.Tensor, scale_max: torch.Tensor | None = None) -> torch.Tensor:
    """The float16 [N, G, k] scales every kernel takes: ``scales`` as stored (float16), or int8 codes
    [N, G, k] with their rows' float16 [N] maxima decoded as ``float16(float32(code) * float32(m) / 127)``
    (float32 operations left to right)."""
    if scale_max is None:
        return scales
    return (scales.float() * scale_max.float()[:, None, None] / SCALE_CODE_MAX).to(SCALE_DTYPE)


def storable_scales(alpha: torch.Tensor, scale_bits: int = FLOAT_SCALE_BITS) -> torch.Tensor:
    """float32 [N, G, k]: ``alpha`` rounded to what ``scale_bits``-bit storage holds (what unpack returns)."""
    if scale_bits == 8:
        return float_scales(*quantize_scales(alpha)).float()
    fmax = torch.finfo(SCALE_DTYPE).max
    return alpha.float().clamp(-fmax, fmax).to(SCALE_DTYPE).float()


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
                f"in_features={layout.in_features}, group_size={layout.group_size}, planes={layout.planes}, "
                f"scale_bits={layout.scale_bits}"
            )


def dequantize(planes: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None,
               in_features: int) -> torch.Tensor:
    """Dense weight from unpacked planes.

    Args:
        planes: uint8 [k, N, Kp]; alpha: float [N, G, k]; offset: float [N, G] or None.
    Returns:
        float32 [N, in_features]. Summed plane by plane in order (k = 2: a1*b1 + a2*b2, then + beta).
    """
    k, n, kp = planes.shape
    g = alpha.shape[1]
    a = alpha.float()
    w = a[..., 0:1] * planes[0].view(n, g, kp // g).float()
    for i in range(1, k):
        w = w + a[..., i:i + 1] * planes[i].view(n, g, kp // g).float()
    if offset is not None:
        w = w + offset.float().unsqueeze(-1)
    return w.reshape(n, kp)[:, :in_features]
