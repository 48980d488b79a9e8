"""A quantized checkpoint runs on a GPU through every GPU backend and agrees with the CPU.

A tiny random Llama is quantized on the CPU (FDB, 2 planes, int8 embedding and head tables),
saved, loaded with ``dbquant.load`` and moved to the GPU. Its logits through ``auto`` (the CUDA
GEMV for decode-sized inputs, Triton above), ``triton`` and ``cuda`` must match the CPU ``ref``
backend's, and greedy generation must give the same tokens. Skipped without a CUDA device (this
workplace's CI has none); ``scripts/gpu_check.sh`` runs it on a lent GPU.
"""

from __future__ import annotations

import pytest
import torch

import dbquant
from dbquant.backends import cuda as _cuda
from dbquant.backends import triton as _triton
from dbquant.quantize import QuantizeOptions, quantize
from tests.conftest import make_tiny_model
from tests.tolerances import KERNEL_REL_ERR

if not torch.cuda.is_available():
    pytest.skip("no CUDA device is visible to torch", allow_module_level=True)

GPU_BACKENDS = [b for b, ok in (("triton", _triton.load_triton() and not _triton.interpreted()),
                                ("cuda", _cuda.load_cuda())) if ok]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_tiny_model()
    quantize(model, None, QuantizeOptions(method="fdb", calib=None, group_size=32), progress=False)
    out = tmp_path_factory.mktemp("gpu") / "q"
    dbquant.save(model, out)
    return out


def test_a_gpu_backend_is_built():
    """The GPU run must exercise kernels, not only fall back to ``ref``."""
    assert GPU_BACKENDS, f"neither GPU backend loads: triton: {_triton.unavailable_reason()}; cuda: {_cuda._cuda_error}"


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logits_and_greedy_tokens_match_the_cpu(checkpoint, backend, dtype):
    if backend != "auto" and backend not in GPU_BACKENDS:
        pytest.fail(f"backend {backend} did not load on this GPU machine")
    cpu = dbquant.load(checkpoint, backend="ref")
    gpu = dbquant.load(checkpoint, backend=backend, dtype=dtype).to("cuda")
    with torch.no_grad():
        ref = cpu(IDS).logits
        for ids in (IDS, IDS[:1, :1], IDS[:, :3]):  # a prompt, one decode row, M = 6 rows
            got = gpu(ids.cuda()).logits.float().cpu()
            want = cpu(ids).logits if ids is not IDS else ref
            err = ((got - want).norm() / want.norm()).item()
            # dense parts (norms, attention) in dtype too: a few roundings more than one kernel
            assert err < 5 * KERNEL_REL_ERR[dtype], (ids.shape, err)
    if dtype == torch.float32:
        kw = dict(max_new_tokens=8, do_sample=False)
        a = cpu.generate(IDS[:1], **kw)
        b = gpu.generate(IDS[:1].cuda(), **kw).cpu()
        assert torch.equal(a, b)
