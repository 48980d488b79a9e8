"""torch.distributed glue for data-parallel DAD (``torchrun --nproc-per-node N -m dbquant quantize ...``).

One process per device. Every rank runs the same deterministic pipeline (FDB init and
block-wise are replicated: identical results on every rank, no communication); DAD is
data parallel: each rank takes its slice of the same global batch and
``DistributedDataParallel`` averages the gradients, so every rank applies the update a
single process would compute on the whole batch. Only rank 0 writes (work dir, log,
output). Everything here is a no-op in a single process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dbquant.errors import DbquantError


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1).

    gloo for CPU runs, NCCL when the run's device is CUDA (each rank on ``cuda:LOCAL_RANK``).
    Returns True when a group was started here (the caller then calls :func:`close`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return False
    if not dist.is_available():
        raise DbquantError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = device not in (None, "cpu") and torch.cuda.is_available() and not str(device).startswith("cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # block-wise runs replicated before DAD's first collective: allow a long first wait
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=6))
    return True


def close() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def local_slice(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch of sample indices.

    The global batch must split evenly: each rank's loss is a mean over its share, and DDP
    averages the ranks' gradients, which equals the gradient of the global mean only for
    equal shares.
    """
    w, r = world_size(), rank()
    if len(idx) % w:
        raise DbquantError(f"the DAD batch ({len(idx)} windows per step) must be divisible by the number of "
                           f"processes ({w}); set --dad-batch to a multiple of {w}")
    n = len(idx) // w
    return idx[r * n:(r + 1) * n]


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean of each value over all ranks (for losses that every rank must agree on)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (its trainable parameters are synchronised)."""
    if not active():
        return model

    dev = next(model.parameters()).device
    # buffers (rotary tables) are identical on every rank: no need to broadcast them each step
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   broadcast_buffers=False)
