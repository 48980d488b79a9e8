"""The quantize pipeline: plan -> (activation statistics) -> calibration stages -> pack -> tag.

Each arrow is a separate module (``plan``, ``dbquant.calibration``, ``convert``, ``hf``);
this file only wires them and keeps the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from . import plan as planlib
from .convert import pack_into
from .errors import DbquantError
from .hf import DbquantConfig, attach


@dataclass
class QuantizeOptions:
    """Options of ``dbquant quantize`` (the CLI maps its flags 1:1 onto these).

    method: ``fdb`` (default) or ``rtn``. group_size: g. offset: store a per-group beta
    (always on for ``rtn``). modules: module sets (``decoder``, ``lm_head``).
    calib: text source whose activation statistics weight the FDB error (None: data-free).
    calib_samples / calib_seq_len: how much calibration text. iters: FDB refinement
    iterations. seed: for the calibration windows.
    """

    method: str = "fdb"
    group_size: int = 64
    offset: bool = False
    modules: tuple[str, ...] = ("decoder",)
    calib: str | None = "wiki"
    calib_samples: int = 32
    calib_seq_len: int = 512
    iters: int = 8
    seed: int = 0

    def check(self) -> "QuantizeOptions":
        from .calibration import METHODS

        if self.method not in METHODS:
            raise DbquantError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.iters < 0 or self.calib_samples < 1 or self.calib_seq_len < 2:
            raise DbquantError(f"out-of-range option: iters={self.iters} (>= 0), calib_samples="
                               f"{self.calib_samples} (>= 1), calib_seq_len={self.calib_seq_len} (>= 2)")
        return self

    @property
    def uses_offset(self) -> bool:
        return self.offset or self.method == "rtn"


def make_plan(model, opts: QuantizeOptions) -> list[planlib.LinearPlan]:
    return planlib.make_plan(model, opts.group_size, opts.uses_offset, tuple(opts.modules))


def quantize(model, tokenizer, opts: QuantizeOptions, progress: bool = True) -> dict:
    """Quantize ``model`` in place (its planned linears become packed) and return a report.

    The report holds the options, the effective-bits summary, per-layer relative weight
    errors, and the wall time of each stage.
    """
    from .calibration import init_weights, input_second_moments

    opts.check()
    t0 = time.perf_counter()
    plan = make_plan(model, opts)
    bits = planlib.bits_summary(plan, model)
    times = {}
    importance = None
    if opts.method == "fdb" and opts.calib:
        from .data import calibration_batches, load_text

        texts = load_text(opts.calib, "calibration")
        batches = calibration_batches(tokenizer, texts, opts.calib_samples, opts.calib_seq_len, opts.seed)
        t = time.perf_counter()
        importance = input_second_moments(model, [p.name for p in plan], batches, progress=progress)
        times["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    weights = init_weights(model, plan, opts.method, importance, opts.iters, progress=progress)
    times["init_s"] = time.perf_counter() - t
    errors = {}
    with torch.no_grad():
        for name, q in weights.items():
            w = model.get_submodule(name).weight.float()
            errors[name] = float((w - q.dequantize()).square().sum() / w.square().sum().clamp_min(1e-30))
    pack_into(model, weights)
    attach(model, DbquantConfig(modules=[p.name for p in plan], group_size=opts.group_size,
                                offset=opts.uses_offset, method=opts.method, bpw=bits))
    times["total_s"] = time.perf_counter() - t0
    return {"options": asdict(opts), **bits, "layers": len(plan), "rel_weight_error": errors, "times": times}
