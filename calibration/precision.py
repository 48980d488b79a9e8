"""bf16 autocast of the training stages (block-wise and DAD): where, and how.

The student's forward (and so its backward) runs under bf16 autocast where the device's bf16
matmuls are fast; targets, teachers, losses and optimizer states stay float32. The CPU rule is
:func:`dbquant.backends.cpuinfo.fast_bf16_cpu` (a fixed /proc/cpuinfo reading, so a run trains the
same numbers every time on one machine); its measurements are in docs/RESULTS.md.
"""

from __future__ import annotations

import contextlib

import torch

from dbquant.backends.cpuinfo import fast_bf16_cpu
from dbquant.errors import DbquantError

AUTOCAST_MODES = ("auto", "bf16", "off")


def native_bf16(device) -> bool:
    """Whether ``device`` (a torch.device or its name) runs bf16 matmuls fast enough to use them."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and fast_bf16_cpu()


def autocast_dtype(mode: str, device) -> torch.dtype | None:
    """The autocast dtype of a student's forward: bf16 or None (float32).

    ``auto``: bf16 where :func:`native_bf16`, else None; ``bf16``: always (emulated where not
    native: slower, same numbers); ``off``: None.
    """
    if mode not in AUTOCAST_MODES:
        raise DbquantError(f"unknown autocast mode {mode!r}; choose from {AUTOCAST_MODES}")
    if mode == "off" or (mode == "auto" and not native_bf16(device)):
        return None
    return torch.bfloat16


def autocast_to(device, dtype: torch.dtype | None):
    """A context running ``device``'s ops under autocast to ``dtype`` (None: a no-op context)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)
