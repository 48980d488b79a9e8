"""The quantize pipeline: plan -> (activation statistics) -> calibration stages -> pack -> tag.

Each arrow is a separate module (``plan``, ``dbquant.calibration``, ``convert``, ``hf``);
this file only wires them and keeps the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields, replace

from .calibration import METHODS, init_weights, input_second_moments
from .calibration.blockwise import INPUT_MODES
from .calibration.dad import DADConfig
from .calibration.pipeline import run_fdb_dad
from .calibration.presets import preset_values
from .errors import DbquantError
from .eval.data import calibration_batches, load_text
from .model import plan as planlib
from .model.convert import pack_into
from .model.hf import DbquantConfig, attach


@dataclass
class QuantizeOptions:
    """Options of ``dbquant quantize`` (the CLI maps its flags 1:1 onto these).

    method: ``fdb-dad`` (default: FDB init, block-wise reconstruction, DAD), ``fdb`` (init
    only) or ``rtn``. preset (``fast``/``default``/``best``) fills every stage option left
    None (``bw_*``: block-wise, ``dad_*``: distillation). work_dir / resume /
    checkpoint_every / device: run hygiene (see ``dbquant.calibration.runstate``).
    group_size: g. offset: store a per-group beta
    (always on for ``rtn``). modules: module sets (``decoder``, ``lm_head``).
    calib: text source whose activation statistics weight the FDB error (None: data-free).
    calib_samples / calib_seq_len: how much calibration text. iters: FDB refinement
    iterations. seed: for the calibration windows.
    """

    method: str = "fdb-dad"
    group_size: int = 64
    offset: bool = False
    modules: tuple[str, ...] = ("decoder",)
    calib: str | None = "wiki"
    calib_images: str | None = None  # VLMs: images + captions for block-wise and DAD (calibration/images.py)
    calib_samples: int = 32
    calib_seq_len: int = 512
    iters: int = 8
    seed: int = 0
    # ---- fdb-dad stages (None = take the preset's value; see dbquant.calibration.presets)
    preset: str = "default"
    blockwise: bool | None = None
    bw_samples: int | None = None
    bw_seq_len: int | None = None
    bw_steps: int | None = None
    bw_batch: int | None = None
    bw_lr: float | None = None
    bw_lr_weight: float | None = None
    bw_inputs: str | None = None
    dad: bool | None = None
    dad_samples: int | None = None
    dad_seq_len: int | None = None
    dad_steps: int | None = None
    dad_batch: int | None = None
    dad_lr: float | None = None
    dad_lr_weight: float | None = None
    dad_train: str | None = None
    dad_weighting: str | None = None
    dad_temperature: float | None = None
    dad_ce_weight: float | None = None
    dad_topk: int | None = None
    grad_clip: float | None = None
    # ---- run hygiene (not part of the result's fingerprint)
    device: str = "auto"
    work_dir: str | None = None
    resume: bool = False
    checkpoint_every: int = 50
    overwrite: bool = False

    def check(self) -> "QuantizeOptions":
        if self.method not in METHODS:
            raise DbquantError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.iters < 0 or self.calib_samples < 1 or self.calib_seq_len < 2:
            raise DbquantError(f"out-of-range option: iters={self.iters} (>= 0), calib_samples="
                               f"{self.calib_samples} (>= 1), calib_seq_len={self.calib_seq_len} (>= 2)")
        if self.calib_images and (self.method != "fdb-dad" or not self.calib or not (
                self.resolved().blockwise or (self.resolved().dad and self.resolved().dad_steps))):
            raise DbquantError("--calib-images feeds block-wise reconstruction and DAD: it needs --method fdb-dad "
                               "with block-wise or DAD on and calibration text (images fill the start of each "
                               "sample)")
        if self.method == "fdb-dad":
            r = self.resolved()
            bad = [f"{k}={getattr(r, k)}" for k in ("bw_samples", "bw_steps", "bw_batch", "dad_samples",
                                                    "dad_steps", "dad_batch", "checkpoint_every")
                   if getattr(r, k) < (0 if k in ("bw_steps", "dad_steps", "checkpoint_every") else 1)]
            bad += [f"{k}={getattr(r, k)}" for k in ("bw_seq_len", "dad_seq_len") if getattr(r, k) < 2]
            if bad:
                raise DbquantError(f"out-of-range option: {', '.join(bad)}")

            if r.bw_inputs not in INPUT_MODES:
                raise DbquantError(f"unknown block-wise input mode {r.bw_inputs!r}; choose from {INPUT_MODES}")
            DADConfig(weighting=r.dad_weighting, train=r.dad_train, temperature=r.dad_temperature,
                      topk=r.dad_topk).check()
        return self

    def resolved(self) -> "QuantizeOptions":
        """A copy with every stage option the user left unset taken from the preset."""
        values = preset_values(self.preset)
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if k in names and getattr(self, k) is None})

    @property
    def uses_offset(self) -> bool:
        return self.offset or self.method == "rtn"


def make_plan(model, opts: QuantizeOptions) -> list[planlib.LinearPlan]:
    return planlib.make_plan(model, opts.group_size, opts.uses_offset, tuple(opts.modules))


def _init_only(model, tokenizer, plan, opts: QuantizeOptions, times: dict, progress: bool):
    """The FDB/RTN init stage alone (activation-weighted when calibration text is given)."""
    importance = None
    if opts.method != "rtn" and opts.calib:
        batches = calibration_batches(tokenizer, load_text(opts.calib, "calibration"), opts.calib_samples,
                                      opts.calib_seq_len, opts.seed)
        t = time.perf_counter()
        importance = input_second_moments(model, [p.name for p in plan], batches, progress=progress)
        times["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    weights = init_weights(model, plan, "rtn" if opts.method == "rtn" else "fdb", importance, opts.iters,
                           progress=progress)
    times["init_s"] = time.perf_counter() - t
    return weights


def quantize(model, tokenizer, opts: QuantizeOptions, progress: bool = True, model_id: str = "") -> dict:
    """Quantize ``model`` in place (its planned linears become packed) and return a report.

    The report holds the options, the effective-bits summary, per-layer relative weight
    errors, and the wall time of each stage. ``fdb-dad`` without calibration text
    (``calib=None``) is the data-free FDB init.
    """
    opts.check()
    if opts.method == "fdb-dad":
        opts = opts.resolved()
    t0 = time.perf_counter()
    plan = make_plan(model, opts)
    bits = planlib.bits_summary(plan, model)
    # kept before calibration: fdb-dad trains the latent weights in place
    fp_weights = {p.name: model.get_submodule(p.name).weight.detach().float().clone() for p in plan}
    times, report = {}, {}
    if opts.method == "fdb-dad" and opts.calib:
        weights, calib_report = run_fdb_dad(model, tokenizer, plan, opts, model_id=model_id, progress=progress)
        times.update(calib_report.pop("times"))
        report["calibration"] = calib_report
    else:
        weights = _init_only(model, tokenizer, plan, opts, times, progress)
    errors = {name: float((fp_weights[name] - q.dequantize()).square().sum()
                          / fp_weights[name].square().sum().clamp_min(1e-30)) for name, q in weights.items()}
    del fp_weights
    pack_into(model, weights)
    attach(model, DbquantConfig(modules=[p.name for p in plan], group_size=opts.group_size,
                                offset=opts.uses_offset, method=opts.method, bpw=bits))
    times["total_s"] = time.perf_counter() - t0
    return {"options": asdict(opts), **bits, "layers": len(plan), "rel_weight_error": errors, "times": times,
            **report}
