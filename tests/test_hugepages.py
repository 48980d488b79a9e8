"""backends/hugepages.py: the decoder's tensors copied into one mapping advised for huge pages."""

import mmap

import pytest
import torch

from dbquant.backends.hugepages import ALIGN, HUGE_PAGE, into_huge_pages, zeros_in_huge_pages

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE) is Linux's")


def test_copies_are_exact_aligned_and_outlive_their_sources():
    src = [torch.randn(1001, 3), torch.randint(-128, 127, (7,), dtype=torch.int8), torch.randn(3, 5).half(),
           torch.randn(4, 6)[:, ::2]]  # the last one not contiguous
    want = [t.clone() for t in src]
    got = into_huge_pages(src)
    del src
    assert got[0].data_ptr() % HUGE_PAGE == 0  # the first on a huge page boundary
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        assert torch.equal(g, w)
        assert g.data_ptr() % ALIGN == 0
    ends = sorted((g.data_ptr(), g.data_ptr() + g.numel() * g.element_size()) for g in got)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:]))  # no overlap
    got[1][0] = 5  # writable, and only that copy changes
    assert got[1][0] == 5 and torch.equal(got[0], want[0])


def test_zeros_and_refusals():
    z = zeros_in_huge_pages((3, 1, 2, 17, 8))
    assert z.shape == (3, 1, 2, 17, 8) and z.dtype == torch.float32 and z.is_contiguous()
    assert z.data_ptr() % HUGE_PAGE == 0 and not z.any()
    z += 1
    assert z.sum().item() == z.numel()
    assert into_huge_pages([]) == []
    with pytest.raises(ValueError, match="CPU tensors only"):
        into_huge_pages([torch.zeros(2, device="meta")])


def test_the_decoder_streams_its_weights_from_one_mapping():
    """FastDecoder's fused projections and int8 head live in one huge-page mapping, its KV cache in
    another (tests/test_decode.py compares this decoder's numbers with HF's and the Python step's)."""
    from dbquant.runtime.decode import FastDecoder
    from tests.test_decode import _packed

    model = _packed("llama")
    dec = FastDecoder(model, max_len=32, lm_head_dtype=torch.int8)
    ptrs = [t.data_ptr() for L in dec.layers for p in (L.qkv, L.o, L.gate_up, L.down)
            for t in (p.packed.planes, p.packed.scales)] + [dec.lm_head.data_ptr()]
    assert min(ptrs) % HUGE_PAGE == 0 and max(ptrs) - min(ptrs) < 64 << 20  # one mapping, from its start
    dec._alloc(1)
    assert dec.k_cache.data_ptr() % HUGE_PAGE == 0 and not dec.k_cache.any()
