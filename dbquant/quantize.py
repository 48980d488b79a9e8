"""The quantize pipeline: plan -> (activation statistics) -> calibration stages -> pack -> tag.

Each arrow is a separate module (``plan``, ``dbquant.calibration``, ``convert``, ``hf``);
this file only wires them and keeps the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .calibration import METHODS, init_weights, input_second_moments
from .calibration import budget as budgetlib
from .calibration.blockwise import INPUT_MODES
from .calibration.dad import DADConfig
from .calibration.pipeline import calibration_sampler, run_fdb_dad, self_gen_config
from .calibration.precision import AUTOCAST_MODES
from .calibration.presets import preset_values
from .calibration.runstate import discard_checkpoints
from .calibration.sensitivity import SENSITIVITIES, allocate_plan, parse_planes
from .calibration.sources import chat_unsupported, parse_mix, uses_generated
from .errors import DbquantError
from .format.layout import FLOAT_SCALE_BITS, FORMAT_VERSION, SCALE_BITS
from .model import embedding as embedlib
from .model import plan as planlib
from .model.checkpoint import load, save
from .model.convert import pack_into
from .model.embedding import TablePlan
from .model.hf import DbquantConfig, attach
from .model.vlm import is_vlm


def option(default: Any, help: str, *, section: str = "main", flag: str | None = None, **argparse_kw) -> Any:
    """A :class:`QuantizeOptions` field together with its ``dbquant quantize`` flag.

    ``flag`` defaults to ``--field-name``; ``section`` names the help group (``main`` or
    ``fdb-dad``); further keywords go to ``argparse.add_argument`` as they are (``type``,
    ``action``, ``metavar``). Without a ``type`` the CLI takes the field's annotation
    (``int | None`` -> int; ``bool`` -> a store-true switch).
    """
    return field(default=default, metadata={"help": help, "section": section, "flag": flag, "argparse": argparse_kw})


def stage_option(help: str, *, flag: str | None = None, **argparse_kw) -> Any:
    """An ``fdb-dad`` stage option: None on the command line means "take the preset's value"
    (``dbquant.calibration.presets`` must give it one; :meth:`QuantizeOptions.resolved` checks)."""
    return field(default=None, metadata={"help": help, "section": "fdb-dad", "flag": flag, "argparse": argparse_kw,
                                         "preset": True})


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _calib_source(text: str) -> str | None:
    return None if text == "none" else text


EMBED_BITS = {"8": 8, "6": 6, "4": 4, "fp16": 16, "fp32": None}  # --embed-bits -> stored table bits (None: dense)
# What ``--embed-bits auto`` stores in memory: the smallest table within +1% wiki PPL of the fp32 one
# on SmolLM2's fast-preset checkpoint, 32 windows: 8 bits, +0.18% (folder 150 -> 65 MB); 6 bits
# reaches 58 MB at +2.8% (docs/RESULTS.md, quantized tables).
AUTO_EMBED_BITS = "8"
HEAD_BITS = ("auto", "tied", "8", "fp16", "fp32")
# ``--calib auto`` (the default; ``QuantizeOptions.with_calib``): wiki text, plus a quarter of chat
# conversations (the fp model's answers in its own chat template) where fdb-dad trains an
# instruction-tuned language model (not a VLM).
# Trained on wiki text alone, SmolLM2-Instruct's 2-bit student closes its turn at once on the demo
# prompt; with this mix the `fast` preset answers in sentences at the same wiki PPL (43.29 vs 43.24,
# docs/RESULTS.md, issue 14 chat rows). Generating the 16 default conversations takes ~30 s.
AUTO_CALIB = "auto"
AUTO_CHAT_MIX = "wiki:0.75,chat:0.25"


@dataclass
class QuantizeOptions:
    """Options of ``dbquant quantize``: every field is one flag, generated from its metadata.

    method: ``fdb-dad`` (default: FDB init, block-wise reconstruction, DAD), ``fdb`` (init
    only) or ``rtn``. preset (``fast``/``default``/``best``) fills every stage option left
    None (``bw_*``: block-wise, ``dad_*``: distillation). work_dir / resume /
    checkpoint_every / device: run hygiene (see ``dbquant.calibration.runstate``).
    group_size: g. offset: store a per-group beta
    (always on for ``rtn``). target_bpw / sensitivity / alloc_samples / alloc_planes: choose k and g per linear
    under an average-bits budget (``dbquant.calibration.sensitivity``). modules: module sets
    (``decoder``, ``lm_head``).
    calib: text source whose activation statistics weight the FDB error (None: data-free).
    calib_samples / calib_seq_len: how much calibration text. iters: FDB refinement
    iterations. seed: for the calibration windows.

    Adding an option: one field here (``option`` or, for a stage option with preset values,
    ``stage_option`` plus its value in ``dbquant.calibration.presets``); the CLI flag, its help
    and the preset check follow from it. Field order is the report's (and fingerprint's) order.
    """

    method: str = option("fdb-dad", "fdb-dad (default: FDB init, block-wise reconstruction, distillation), "
                                    "fdb (init only), rtn")
    group_size: int = option(64, "input channels per scale group")
    offset: bool = option(False, "store a per-group offset beta (+16 bits/group)")
    scale_bits: str = option("auto", "stored width of each group scale: 16 (float16) or 8 (int8 codes on a float16 "
                                     "maximum per row: k = 2 at g64 is 2.28 bits per weight instead of 2.5); auto: 8 "
                                     "with --target-bpw, which spends the bits saved on sensitive layers, else 16",
                             choices=("auto", *map(str, SCALE_BITS)))
    target_bpw: float | None = option(None, "choose each linear's bit planes k (1..4) and group size (32/64/128) "
                                            "from its measured sensitivity so the average bits per weight over the "
                                            "quantized linears, every scale counted, is <= B (ignores --group-size)",
                                      metavar="B")
    sensitivity: str = option("fisher", "--target-bpw: how a linear's error is scored: fisher (empirical Fisher "
                                        "diagonal of the loss), kfac (Kronecker-factored Fisher: output-gradient "
                                        "and input-correlation second moments), output (its own output error, "
                                        "E[x^2]-weighted) or weight (plain; no calibration data)")
    alloc_samples: int = option(8, "--target-bpw: calibration windows of the sensitivity measurement")
    alloc_planes: str = option("auto", "--target-bpw: plane counts k to choose among, a comma list of 1..4; auto: "
                                       "2,3,4 where the target allows (>= 2.25 bpw), else 1,2,3,4 (a k = 1 layer "
                                       "costs more after training than its error says)")
    modules: tuple[str, ...] = option(("decoder",), "comma list of: decoder, lm_head, vision", type=_comma_tuple)
    embed_bits: str = option("auto", "input embedding storage: 8, 6 or 4 (group-wise int with float16 scales, rows "
                                     "dequantized on lookup), fp16, fp32 (dense, as the model has it); auto: "
                                     f"{AUTO_EMBED_BITS} (fp32 with --streaming, which copies the embedding as it is)",
                             choices=("auto", *EMBED_BITS))
    embed_group: int | None = option(None, "channels per embedding scale (default: a whole row for 8 and 6 bits, "
                                           "32 for 4)")
    head_bits: str = option("auto", "output projection storage: tied (read the stored embedding), 8 (int8, one "
                                    "scale per row: the fast decoder's int8 head as stored), fp16, fp32; auto: tied "
                                    "when the model ties it and --embed-bits quantizes, else fp32",
                            choices=HEAD_BITS)
    calib: str | None = option(AUTO_CALIB, "calibration text: wiki, a text file/folder, hf:NAME[:CONFIG]:SPLIT, "
                                           "self (the fp model's own samples), chat (the fp model's answers in its "
                                           "chat template), none, or a mix by ratio: SOURCE:RATIO,SOURCE:RATIO (e.g. "
                                           f"wiki:0.5,self:0.5); auto: {AUTO_CHAT_MIX} where fdb-dad trains a model "
                                           "with a chat template, else wiki", type=_calib_source)
    calib_images: str | None = option(None, "VLMs: images with a same-name .txt caption; block-wise reconstruction "
                                            "and DAD then run on image+text samples through the whole VLM "
                                            "(calibration/images.py)", metavar="DIR")
    calib_samples: int = option(32, "calibration windows for the activation statistics")
    calib_seq_len: int = option(512, "tokens per calibration window")
    calib_self_samples: int = option(16, "--calib self/chat: sequences the fp model generates (cached in the work dir)")
    calib_self_len: int = option(192, "--calib self/chat: tokens per generated sequence (chat: conversation), "
                                      "prompt included")
    calib_self_temperature: float = option(0.7, "--calib self/chat: sampling temperature (> 0)")
    calib_self_prompt_len: int = option(8, "--calib self: prompt tokens, taken from the calibration text")
    iters: int = option(8, "FDB least-squares refinement iterations")
    seed: int = option(0, "seed of the calibration windows")
    # ---- fdb-dad stages (None = take the preset's value; see dbquant.calibration.presets)
    preset: str = option("default", "fast (~5 min on a 2-core CPU for SmolLM2), default (~18 min), best (hours on CPU)",
                         section="fdb-dad")
    time_budget: float | None = option(None, "minutes: scale the preset's --bw-steps and --dad-steps (those not "
                                       "given) to fit this wall time on the reference 2-core CPU; deterministic "
                                       "(a cost model of the model's shapes, not a clock)", section="fdb-dad",
                                       metavar="MIN")
    blockwise: bool | None = stage_option("run block-wise reconstruction (--no-blockwise: skip it)",
                                          action=argparse.BooleanOptionalAction)
    bw_samples: int | None = stage_option("calibration windows for block-wise")
    bw_seq_len: int | None = stage_option("tokens per block-wise window")
    bw_steps: int | None = stage_option("optimizer steps per block")
    bw_batch: int | None = stage_option("windows per block-wise step")
    bw_lr: float | None = stage_option("block-wise Adam LR of the scales")
    bw_lr_weight: float | None = stage_option("block-wise Adam LR of the latent weights (0: scales only)")
    bw_inputs: str | None = stage_option("quant (train on the quantized chain's activations) or fp")
    bw_autocast: str | None = stage_option("bf16 autocast of a block's forward/backward in training: auto (as "
                                           "--dad-autocast auto), bf16 or off; targets stay float32")
    dad: bool | None = stage_option("run deviation-aware distillation (--no-dad: skip it)",
                                    action=argparse.BooleanOptionalAction)
    dad_samples: int | None = stage_option("calibration windows for DAD")
    dad_seq_len: int | None = stage_option("tokens per DAD window")
    dad_steps: int | None = stage_option("DAD optimizer steps")
    dad_batch: int | None = stage_option("windows per DAD step")
    dad_lr: float | None = stage_option("DAD Adam LR of the scales")
    dad_lr_weight: float | None = stage_option("DAD Adam LR of the latent weights")
    dad_train: str | None = stage_option("scales or scales+weights")
    dad_weighting: str | None = stage_option("uniform, teacher-entropy or deviation")
    dad_temperature: float | None = stage_option("distillation temperature")
    dad_ce_weight: float | None = stage_option("weight of an added ground-truth cross-entropy term")
    dad_topk: int | None = stage_option("teacher logits cached per token (topk: the k largest; sample: k draws)")
    dad_teacher: str | None = stage_option("teacher signal: topk (cached top-k + remaining mass), online (fp teacher "
                                           "run every step, exact full-vocabulary KL) or sample (cached k draws "
                                           "from the teacher, importance-weighted)")
    dad_autocast: str | None = stage_option("bf16 autocast of the student's forward/backward: auto (a GPU with "
                                            "bf16, or a CPU whose bf16 is fast: AMX or AMD Zen 5; there the preset's "
                                            "DAD steps grow by what it saves), bf16 or off")
    grad_clip: float | None = stage_option("max gradient norm (0: off)")
    # ---- run hygiene (not part of the result's fingerprint)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N", section="fdb-dad")
    work_dir: str | None = option(None, "checkpoints and log (default: OUTPUT.work, removed after success)",
                                  section="fdb-dad")
    resume: bool = option(False, "continue an interrupted run from its work dir (or save again a finished one "
                                 "whose save failed)", section="fdb-dad")
    checkpoint_every: int = option(50, "optimizer steps between checkpoints (stage and block ends always checkpoint)",
                                   section="fdb-dad")
    overwrite: bool = option(False, "replace an existing output folder")

    def check(self) -> QuantizeOptions:
        if self.method not in METHODS:
            raise DbquantError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.embed_group is not None and self.embed_group < 1:
            raise DbquantError(f"--embed-group must be >= 1, got {self.embed_group}")
        if self.target_bpw is not None:
            if self.method == "rtn" or not 1.0 <= self.target_bpw <= 8.0 or self.sensitivity not in SENSITIVITIES:
                raise DbquantError(f"--target-bpw {self.target_bpw} --sensitivity {self.sensitivity}: needs a "
                                   f"target in 1..8 bits, a sensitivity in {SENSITIVITIES} and --method fdb or "
                                   "fdb-dad")
            if self.sensitivity != "weight" and not self.calib:
                raise DbquantError(f"--sensitivity {self.sensitivity} measures on calibration text; with --calib "
                                   "none use --sensitivity weight")
            if self.alloc_samples < 1:
                raise DbquantError(f"out-of-range option: alloc_samples={self.alloc_samples} (>= 1)")
            parse_planes(self.alloc_planes)
        if self.iters < 0 or self.calib_samples < 1 or self.calib_seq_len < 2:
            raise DbquantError(f"out-of-range option: iters={self.iters} (>= 0), calib_samples="
                               f"{self.calib_samples} (>= 1), calib_seq_len={self.calib_seq_len} (>= 2)")
        if self.calib and self.calib != AUTO_CALIB:
            parse_mix(self.calib)  # a malformed mix fails here, before any work
            if uses_generated(self.calib):
                self_gen_config(self).check()
        if self.calib_images and (not self.calib or not self.trains):
            raise DbquantError("--calib-images feeds block-wise reconstruction and DAD: it needs --method fdb-dad "
                               "with block-wise or DAD on and calibration text (images fill the start of each "
                               "sample)")
        if self.time_budget is not None and (self.method != "fdb-dad" or not self.calib or not self.time_budget > 0):
            raise DbquantError(f"--time-budget {self.time_budget}: needs minutes > 0, --method fdb-dad and "
                               "calibration text (the budget scales the training steps; --calib none trains none)")
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
            if r.bw_autocast not in AUTOCAST_MODES:
                raise DbquantError(f"unknown block-wise autocast mode {r.bw_autocast!r}; choose from {AUTOCAST_MODES}")
            DADConfig(weighting=r.dad_weighting, train=r.dad_train, temperature=r.dad_temperature,
                      topk=r.dad_topk, teacher=r.dad_teacher, autocast=r.dad_autocast).check()
        return self

    def resolved(self) -> QuantizeOptions:
        """A copy with every stage option the user left unset taken from the preset.

        The preset must name fields of this class only, and give every ``stage_option`` a value.
        """
        values = preset_values(self.preset)
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise DbquantError(f"preset {self.preset!r} sets {unknown}, which are not QuantizeOptions fields")
        out = replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})
        unset = [f.name for f in fields(out) if f.metadata.get("preset") and getattr(out, f.name) is None]
        if unset:
            raise DbquantError(f"preset {self.preset!r} gives no value for stage option(s) {unset}; add them to "
                               "dbquant.calibration.presets")
        return out

    def with_calib(self, tokenizer, model=None, streaming: bool = False) -> QuantizeOptions:
        """A copy with ``calib="auto"`` made concrete (any other value is kept): :data:`AUTO_CHAT_MIX`
        where fdb-dad trains (block-wise or DAD, in memory, text only) a language model (not a VLM,
        whose chat templates take structured turns) whose ``tokenizer`` has a chat template and an
        EOS token, else ``wiki``. The report and the run's fingerprint hold the result."""
        if self.calib != AUTO_CALIB:
            return self
        trains = self.trains and not streaming and not self.calib_images and not (model is not None and is_vlm(model))
        return replace(self, calib=AUTO_CHAT_MIX if trains and chat_unsupported(tokenizer) is None else "wiki")

    @property
    def trains(self) -> bool:
        """Whether a training stage runs: ``fdb-dad`` with block-wise, or DAD with steps."""
        r = self.resolved() if self.method == "fdb-dad" else None
        return r is not None and bool(r.blockwise or (r.dad and r.dad_steps))

    @property
    def uses_offset(self) -> bool:
        return self.offset or self.method == "rtn"

    @property
    def stored_scale_bits(self) -> int:
        """``scale_bits`` as a width: ``auto`` is 8 under ``--target-bpw`` (at 2.5 bpw after ``fast`` that
        measured wiki PPL 34.42 against 40.49 with float16 scales; docs/RESULTS.md, issue 15), else 16
        (a uniform k = 2 g64 plan stays the 2.5 bits per weight it always was)."""
        if self.scale_bits == "auto":
            return 8 if self.target_bpw is not None else FLOAT_SCALE_BITS
        return int(self.scale_bits)


def make_plan(model, opts: QuantizeOptions, tokenizer=None, progress: bool = True,
              report: dict | None = None) -> list[planlib.LinearPlan]:
    """The linears to quantize and their layouts: uniform (``group_size``, k = 2), or with
    ``target_bpw`` chosen per linear from measured sensitivity (``calibration.sensitivity``);
    the allocation's summary goes into ``report["allocation"]`` when a dict is given."""
    plan = planlib.make_plan(model, opts.group_size, opts.uses_offset, tuple(opts.modules), opts.stored_scale_bits)
    if opts.target_bpw is None:
        return plan
    opts = opts.with_calib(tokenizer, model)
    batches = None
    if opts.sensitivity != "weight":
        batches = calibration_sampler(model, tokenizer, opts, progress=progress)(opts.alloc_samples,
                                                                                 opts.calib_seq_len, opts.seed)
    plan, info = allocate_plan(model, plan, opts.target_bpw, opts.sensitivity, batches, opts.uses_offset, progress,
                               opts.alloc_planes)
    if report is not None:
        report["allocation"] = info
    return plan


def make_table_plan(model, opts: QuantizeOptions, plan: list[planlib.LinearPlan]) -> list[TablePlan]:
    """The input embedding / output projection tables ``--embed-bits`` / ``--head-bits`` store.

    Given the linear ``plan`` (whose weights will be packed): tables that would leave the model without any
    floating-point parameter (e.g. OLMo, whose norms hold no weights, with a tied embedding) are dropped under
    ``auto`` and refused when asked for, because transformers' ``save_pretrained`` reads the
    model's dtype from such a parameter.
    """
    bits = AUTO_EMBED_BITS if opts.embed_bits == "auto" else opts.embed_bits
    tables = embedlib.make_table_plan(model, EMBED_BITS[bits], opts.embed_group, opts.head_bits,
                                      head_packed="lm_head" in opts.modules)
    if not tables:
        return tables
    packed = {f"{p.name}.weight" for p in plan}
    stored = tuple(f"{t.name}." for t in tables)
    if any(prm.is_floating_point() and n not in packed and not n.startswith(stored)
           for n, prm in model.named_parameters()):
        return tables
    if opts.embed_bits == "auto" and opts.head_bits == "auto":
        return []
    raise DbquantError(f"--embed-bits {opts.embed_bits} / --head-bits {opts.head_bits} would leave this model "
                       "without a floating-point parameter (its norms hold no weights), which transformers' "
                       "save_pretrained needs; use --embed-bits fp32")


def budgeted(model, opts: QuantizeOptions, plan: list[planlib.LinearPlan]) -> tuple[QuantizeOptions, dict]:
    """Resolved ``fdb-dad`` options, with ``--time-budget`` applied (``calibration/budget.py``), or
    else, where bf16 autocast is fast, the preset's DAD steps grown by what it saves (``bf16_dividend``;
    not a ``--dad-steps`` given on the command line).

    Returns (options, the time model's report: predicted seconds per stage on the reference
    CPU, and the steps it chose). Deterministic: the same options, model shapes and CPU class give
    the same step counts, so the CLI's printed plan is what ``quantize`` runs.
    """
    r, shapes = opts.resolved(), budgetlib.Shapes.of(model, plan)
    if opts.time_budget is None:
        return ((r, budgetlib.prediction(r, shapes)) if opts.dad_steps is not None
                else budgetlib.bf16_dividend(r, shapes))
    given = {k for k in budgetlib.SCALED if getattr(opts, k) is not None}
    return budgetlib.fit(r, shapes, given)


def _init_only(model, tokenizer, plan, opts: QuantizeOptions, times: dict, progress: bool):
    """The FDB/RTN init stage alone (activation-weighted when calibration text is given)."""
    importance = None
    if opts.method != "rtn" and opts.calib:
        batches = calibration_sampler(model, tokenizer, opts, progress=progress)(opts.calib_samples,
                                                                                  opts.calib_seq_len, opts.seed)
        t = time.perf_counter()
        importance = input_second_moments(model, [p.name for p in plan], batches, progress=progress)
        times["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    weights = init_weights(model, plan, "rtn" if opts.method == "rtn" else "fdb", importance, opts.iters,
                           progress=progress)
    times["init_s"] = time.perf_counter() - t
    return weights


def quantize(model, tokenizer, opts: QuantizeOptions, progress: bool = True, model_id: str = "",
             plan: list[planlib.LinearPlan] | None = None) -> dict:
    """Quantize ``model`` in place (its planned linears become packed) and return a report.

    The report holds the options, the effective-bits summary, per-layer relative weight
    errors, and the wall time of each stage. ``fdb-dad`` without calibration text
    (``calib=None``) is the data-free FDB init.
    """
    opts = opts.check().with_calib(tokenizer, model)
    t0 = time.perf_counter()
    alloc: dict = {}
    if plan is None:  # the CLI passes the plan it printed (--target-bpw measures once)
        plan = make_plan(model, opts, tokenizer, progress, alloc)
    timing = None
    if opts.method == "fdb-dad":
        opts, timing = budgeted(model, opts, plan)
    tables = make_table_plan(model, opts, plan)
    bits = planlib.bits_summary(plan, model, tables)
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
    embedlib.quantize_tables(model, tables)
    bits = planlib.bits_summary(plan, model, tables)  # as stored (a head untied here is counted on its own)
    attach(model, DbquantConfig(modules=[p.name for p in plan], group_size=opts.group_size,
                                offset=opts.uses_offset, method=opts.method, bpw=bits,
                                tables=[t.to_dict() for t in tables], layers=planlib.layer_rows(plan),
                                format_version=FORMAT_VERSION))
    times["total_s"] = time.perf_counter() - t0
    if timing is not None:
        report["time_model"] = timing  # beside "times": predicted (reference CPU) vs measured
    return {"options": asdict(opts), **bits, "layers": len(plan), "rel_weight_error": errors, "times": times,
            **alloc, **report}


# ---------------------------------------------------------------- the output

def check_output(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that cannot be written, before any work (not after hours of it).

    The folder must not exist (unless ``overwrite``) and its parent must be creatable and
    writable: proven by creating and removing a probe folder there, since ``os.access``
    answers yes to root even where a write fails (``/proc``, read-only mounts).
    """
    out = Path(output).absolute()
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise DbquantError(f"output directory {output} already exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-{os.getpid()}-", dir=out.parent)
        os.rmdir(probe)
    except OSError as e:
        raise DbquantError(f"cannot create the output directory {output}: {e.strerror or e} (in {out.parent}); "
                           "choose another -o") from None
    return out


def save_output(model, output: str | os.PathLike, tokenizer, overwrite: bool, extra_files: dict[str, str],
                work_dir: str | os.PathLike | None) -> None:
    """Save the packed model, reload it to validate, and only then drop the calibration checkpoints.

    If the save or the reload fails, ``work_dir`` keeps the finished calibration (``final.pt``)
    and the error says to rerun with ``--resume``, which goes straight to packing and saving.
    """
    try:
        save(model, output, tokenizer, overwrite, extra_files=extra_files)
        load(output, backend="ref")  # the validating reload: every check dbquant.load makes
    except (DbquantError, OSError) as e:
        kept = work_dir is not None and (Path(work_dir) / "final.pt").is_file()
        hint = (f"; the finished calibration is kept in {work_dir}: fix the output location and rerun the same "
                "command with --resume (and --overwrite if the output folder now exists)" if kept else "")
        detail = e if isinstance(e, DbquantError) else f"{type(e).__name__}: {e.strerror or e}"
        raise DbquantError(f"saving {output} failed ({detail}){hint}") from None
    if work_dir is not None:
        discard_checkpoints(work_dir)


def drop_work_dir(work_dir: str | os.PathLike | None) -> None:
    """Remove a default work dir once the output holds its log (explicit work dirs keep their log)."""
    if work_dir is not None and Path(work_dir).is_dir():
        shutil.rmtree(work_dir, ignore_errors=True)
