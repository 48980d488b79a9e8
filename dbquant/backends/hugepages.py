"""CPU tensors moved into one mapping advised for transparent huge pages (Linux ``madvise``).

A decode step streams every weight of the model once per token (~61 MB for SmolLM2: 210 small 2-bit
matrices and the int8 head). In 4 KiB pages that is ~15,000 pages a token, far more than the
second-level TLB maps, so every page costs a page walk. Torch allocates each small tensor on its own,
in 4 KiB pages. :func:`into_huge_pages` copies a list of tensors one after another into a single
anonymous mapping, 2 MiB-aligned and advised ``MADV_HUGEPAGE`` before anything touches it, so the
kernel backs it with 2 MiB pages where the system allows (``/sys/kernel/mm/transparent_hugepage/
enabled`` = ``always`` or ``madvise``; with ``never`` the copies are ordinary memory). Measured in
docs/RESULTS.md ("Huge pages for the decoder's weights").
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes; x86-64's transparent huge page
ALIGN = 64  # each tensor starts on a cache line
# private anonymous memory: a shared mapping (mmap's default) is shmem, whose huge pages another switch governs
_PRIVATE = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def _advised(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes] at the start of a fresh private anonymous mapping, 2 MiB-aligned and advised for
    huge pages before anything touches it (its pages read as zero until written)."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=_PRIVATE)
    buf = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
    start = -buf.data_ptr() % HUGE_PAGE  # a multiple of 4 KiB: mmap returns page-aligned memory
    region.madvise(mmap.MADV_HUGEPAGE, start, max(nbytes, 1))
    return buf[start:start + nbytes]


def into_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` (CPU; any dtype and shape, contiguous in the result) side by side in one
    mapping advised for huge pages; the copies keep the mapping alive. Where ``mmap.MADV_HUGEPAGE`` does
    not exist (not Linux), or for an empty list, the tensors come back as they are."""
    if not tensors or not hasattr(mmap, "MADV_HUGEPAGE"):
        return list(tensors)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("into_huge_pages: CPU tensors only")
    sizes = [t.numel() * t.element_size() for t in tensors]
    slots = [-(-n // ALIGN) * ALIGN for n in sizes]  # each size rounded up to ALIGN
    buf = _advised(sum(slots))
    out, off = [], 0
    for t, n, slot in zip(tensors, sizes, slots):
        copy = buf[off:off + n].view(t.dtype).view(t.shape)
        copy.copy_(t)
        out.append(copy)
        off += slot
    return out


def zeros_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero tensor in a mapping advised for huge pages (anonymous pages read as zero: nothing to copy)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return _advised(n).view(dtype).view(shape)
