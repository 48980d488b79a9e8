"""The stored layout of a quantized table: the input embedding and the output projection, as data.

A table ``W`` of shape [R, D] (embedding: R = vocabulary rows, D = hidden size; output
projection: R = out_features, D = in_features) is stored with ``bits`` per value in groups
of ``g`` consecutive channels of a row (``g = D``: one scale per row), ``Dp = ceil(D / g) * g``,
``G = Dp / g`` (``docs/FORMAT.md`` has the table and the worked example that
``tests/test_embedding.py::test_golden_vector`` pins byte for byte):

======  ==========  ======================  ===================================================
bits    name        dtype / shape           meaning
======  ==========  ======================  ===================================================
8       codes       int8 [R, Dp]            symmetric codes in [-127, 127]; padding holds 0
6       codes       uint8 [R, 3*Dp/4]       four codes in [-31, 31] per 3 bytes as 6-bit two's
                                            complement: channels 4i..4i+3 at bits 0, 6, 12, 18
                                            of the little-endian 24-bit word; padding holds 0
4       codes       uint8 [R, Dp/2]         two codes in [-7, 7] per byte as 4-bit two's
                                            complement: channel 2i in the low nibble, 2i+1 in
                                            the high nibble; padding holds 0
8/6/4   code_scales float16 [R, G]          the scale of each group
16      codes       float16 [R, D]          the values themselves (no scales)
======  ==========  ======================  ===================================================

``W[r, d] = code_scales[r, d // g] * codes[r, d]``. The names are not the packed linear's
(``qweight``/``scales``), so a reader that only knows packed linears finds no tensor of its own
kind here; the checkpoint says ``format_version`` 2 whenever such a table is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import DbquantError

TABLE_VERSION = 2  # the first packed-format version that may hold quantized tables
TABLE_BITS = (8, 6, 4, 16)  # 16: float16 values, no scales
QMAX = {8: 127, 6: 31, 4: 7}  # symmetric code range of each integer width
CODE_DTYPE = {8: torch.int8, 6: torch.uint8, 4: torch.uint8, 16: torch.float16}
CODES_PER_PACK = {8: 1, 6: 4, 4: 2}  # a group holds whole packs: 6-bit codes go 4 to 3 bytes
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class TableLayout:
    """Shape facts of one stored table; everything else about its storage follows from it."""

    rows: int
    dim: int
    bits: int
    group_size: int

    def __post_init__(self):
        if self.bits not in TABLE_BITS:
            raise DbquantError(f"table bits {self.bits!r} are not stored; choose from {list(TABLE_BITS)}")
        if not all(isinstance(v, int) and v >= 1 for v in (self.rows, self.dim, self.group_size)):
            raise DbquantError(f"table rows={self.rows!r}, dim={self.dim!r}, group_size={self.group_size!r} "
                               "must be positive integers")
        per = CODES_PER_PACK.get(self.bits, 1)
        if self.group_size % per:
            raise DbquantError(f"a {self.bits}-bit table packs {per} codes together: group size {self.group_size} "
                               f"must be a multiple of {per}")

    @property
    def groups(self) -> int:
        return math.ceil(self.dim / self.group_size)

    @property
    def padded_dim(self) -> int:
        return self.groups * self.group_size

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor this table stores."""
        if self.bits == 16:
            return {"codes": ((self.rows, self.dim), CODE_DTYPE[16])}
        width = self.padded_dim * self.bits // 8
        return {"codes": ((self.rows, width), CODE_DTYPE[self.bits]),
                "code_scales": ((self.rows, self.groups), SCALE_DTYPE)}

    def storage_bits(self) -> int:
        """Bits held on disk for this table, padding and scales included."""
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() * 8
                   for shape, dt in self.tensor_specs().values())

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.rows * self.dim)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., L] in [-8, 7], L even -> uint8 [..., L/2]: channel 2i low nibble, 2i+1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dim, got {codes.shape[-1]}")
    n = (codes.to(torch.int16) & 0xF).to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return n[..., 0] | (n[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 [..., B] -> int8 [..., 2B] (sign-extended)."""
    pair = torch.stack([packed & 0xF, packed >> 4], dim=-1).to(torch.int8)
    return ((pair ^ 8) - 8).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_sextets(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., L] in [-32, 31], L % 4 == 0 -> uint8 [..., 3L/4]: channels 4i..4i+3 at bits
    0, 6, 12, 18 of a little-endian 24-bit word."""
    if codes.shape[-1] % 4:
        raise ValueError(f"pack_sextets needs a last dim that is a multiple of 4, got {codes.shape[-1]}")
    u = (codes.to(torch.int32) & 0x3F).reshape(*codes.shape[:-1], -1, 4)
    word = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1).to(torch.uint8)
    return out.reshape(*codes.shape[:-1], -1)


def unpack_sextets(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_sextets`: uint8 [..., 3B] -> int8 [..., 4B] (sign-extended)."""
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    u = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1)
    return ((u ^ 32) - 32).to(torch.int8).reshape(*packed.shape[:-1], -1)


_PACKERS = {4: (pack_nibbles, unpack_nibbles), 6: (pack_sextets, unpack_sextets)}


def pack(codes: torch.Tensor, scales: torch.Tensor | None, layout: TableLayout) -> dict[str, torch.Tensor]:
    """Integer codes int [R, Dp] and scales float [R, G] (or, for 16 bits, values [R, D] and None)
    -> the stored tensors of ``layout``."""
    if layout.bits == 16:
        out = {"codes": codes.to(torch.float16).contiguous()}
    else:
        c = codes.to(torch.int8) if layout.bits == 8 else _PACKERS[layout.bits][0](codes)
        out = {"codes": c.contiguous(), "code_scales": scales.to(SCALE_DTYPE).contiguous()}
    check_tensors(out, layout)
    return out


def unpack_codes(tensors: dict[str, torch.Tensor], layout: TableLayout) -> torch.Tensor:
    """int8 [R, Dp] codes of an 8/6/4-bit table (narrower codes sign-extended)."""
    c = tensors["codes"]
    return c if layout.bits == 8 else _PACKERS[layout.bits][1](c)


def dequantize(tensors: dict[str, torch.Tensor], layout: TableLayout) -> torch.Tensor:
    """float32 [R', D] of the stored rows (any leading row count R': a lookup passes gathered rows)."""
    if layout.bits == 16:
        return tensors["codes"].float()
    codes = unpack_codes(tensors, layout).float()
    r = codes.shape[0]
    w = codes.view(r, layout.groups, layout.group_size) * tensors["code_scales"].float().unsqueeze(-1)
    return w.reshape(r, layout.padded_dim)[:, :layout.dim]


def check_tensors(tensors: dict[str, torch.Tensor], layout: TableLayout, where: str = "") -> None:
    """Raise ``DbquantError`` unless ``tensors`` hold exactly the shapes/dtypes ``layout`` needs."""
    for name, (shape, dtype) in layout.tensor_specs().items():
        t = tensors.get(name)
        if t is None:
            raise DbquantError(f"{where}{name} is missing from the checkpoint (table layout {layout})")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise DbquantError(f"{where}{name} has shape {tuple(t.shape)} and dtype {t.dtype}, but the format needs "
                               f"{shape} {dtype} for {layout}")
