"""``--time-budget MIN``: the preset's step counts scaled to fit a wall time, by a cost model.

The fit is deterministic: it reads the options and the model's shapes, never a clock, so
the same command trains the same steps on every machine (and ``--resume`` finds the same
fingerprint). One exception, still no clock: under bf16 autocast (``--dad-autocast`` / ``--bw-autocast``
bf16, or auto where it resolves to bf16) a training step's cost depends on the kind of fast bf16 this
CPU has (:func:`dbquant.backends.cpuinfo.bf16_kind`, a fixed reading of /proc/cpuinfo). What it
predicts is the wall time on the reference CPU, where the constants below were measured, and for a
bf16 step the time measured on a CPU of that kind; another machine takes longer or shorter by its
speed ratio, and the report holds the prediction beside the measured stage times.

The model counts work in token x parameter units (a linear's forward is ~2 FLOPs per
weight and token, so every compute-bound stage is linear in it):

- teacher cache: ``dad_samples * dad_seq_len`` tokens through the whole model (forward, under
  DAD's autocast);
- block-wise, per decoder block: two forwards of every calibration token (the fp target,
  with the statistics of the in-block init, and the quantized chain's next inputs), the FDB
  init of the block's weights, and ``bw_steps`` training steps of ``bw_batch * bw_seq_len``
  tokens;
- DAD: ``dad_steps`` steps of ``dad_batch * dad_seq_len`` tokens through the whole model
  (the output head included), times the teacher signal's measured cost;
- without block-wise: one statistics forward and the init of every planned linear;
- ``--target-bpw``: the sensitivity pass (forward and backward of ``alloc_samples`` windows);
- ``self`` / ``chat`` in ``--calib``: the fp model writing ``calib_self_samples`` sequences of
  ``calib_self_len`` tokens (sampled generation with the KV cache, before any stage).

Only ``bw_steps`` and ``dad_steps`` are scaled, both by one factor (the preset's balance
between the stages is kept); a step count given on the command line is kept as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from torch import nn

from dbquant.backends.cpuinfo import bf16_kind
from dbquant.calibration.sources import uses_generated
from dbquant.errors import DbquantError
from dbquant.model.plan import LinearPlan, decoder_blocks

REFERENCE_CPU = ("quiet 2-core Intel Xeon (Sapphire Rapids class: AVX-512 VNNI/BF16, no AMX), 2 threads, fp32; "
                 "SmolLM2-135M `fast` preset, 2026-12-02 (docs/CALIBRATION.md, time budget)")


@dataclass(frozen=True)
class Costs:
    """Seconds on the reference CPU; ``*_tp``: per token x parameter, ``init_p``: per quantized weight.

    Measured on the ``fast`` preset's quiet run (runs/main-quiet, dbquant-log.jsonl): teacher
    32.9 s for 12,288 tokens over 134.5M parameters; a block-wise step 0.148 s for 512 tokens
    over a 3.54M-parameter block; the quantized chain's forward 0.54 s per block for 8,192
    tokens; the rest of a block's 2.32 s outside its steps (the target forward with statistics,
    the FDB init, the block's checkpoint) less that forward gives ``init_p``; a DAD step 4.25 s
    for 512 tokens over 134.5M. The stage totals come out at 32 / 105 / 145 s, as measured.
    """

    forward_tp: float = 1.95e-11
    block_step_tp: float = 8.2e-11
    init_p: float = 3.4e-7
    dad_step_tp: float = 6.2e-11
    fixed_s: float = 8.0  # data windows, packing, the validating save (loading the model, ~15 s, is not counted)
    # DAD step cost of each teacher signal relative to topk (docs/RESULTS.md, training tokens/s)
    teacher_factor: tuple = (("topk", 1.0), ("online", 1.22), ("sample", 0.94))
    # a DAD step that also trains the latent weights (the quiet `default` run: 4.87 s a step
    # against 4.25 s for scales only), and the --target-bpw Fisher pass (73 s for 8 windows
    # of 512 there) per token x parameter
    weights_factor: float = 1.15
    sensitivity_tp: float = 1.33e-10
    # where bf16 is fast (cpuinfo.bf16_kind), a training step under bf16 autocast against the REFERENCE CPU's
    # fp32 step of the same work (not this CPU's fp32 step: the dividend aims at the reference's fp32 wall
    # time), per kind, from whole quiet runs (a step benchmark alone is ~25% more optimistic on both kinds).
    # DAD, (scales only, scales + latent weights): AMD Zen 5 (fp32 at the reference's speed) 2.67 s a step
    # in `fast` (0.625x of 4.27 s) and 2.83 s in `default` (0.576x of 4.91 s): 0.6 for both. AMX (a Xeon
    # whose fp32 DAD runs at 0.87x the reference's tokens/s): 3.75 s in `fast` (0.88x) and 4.67 s in
    # `default` (0.95x: the Adam update of the latent weights stays fp32, so bf16 saves less there).
    # Block-wise, a block's training step: AMX 0.93x (`default`: 370 s for the stage, its 104 s of
    # forwards and inits as predicted); not measured on Zen 5, so no credit there (1.0).
    # AMD Zen 4 (fp32 DAD at the reference's speed in the step benchmark): 2.84 s a step in `fast` (0.67x
    # of 4.27 s) and 3.14 s in `default` (0.64x of 4.91 s); block-wise 0.64x for its training steps,
    # solved from both presets' whole stages (fast 66.6 s, default 247.5 s) with its fp32 forwards and
    # inits at 0.62x the reference's (this CPU is faster there; the model does not know that).
    # docs/CALIBRATION.md (the time model) has the table.
    bf16_dad_factor: tuple = (("zen5", (0.6, 0.6)), ("amx", (0.88, 0.95)), ("zen4", (0.67, 0.64)))
    bf16_block_factor: tuple = (("zen5", 1.0), ("amx", 0.93), ("zen4", 0.64))
    # the cached teacher's forward under DAD's bf16 autocast: AMX 0.78x (the quiet `default` run, 2 threads:
    # 131 s against 168 s in fp32; 0.68x on 8 windows at 1 thread, benchmarks/teacher_bf16.py); not measured on
    # Zen 5 (1.0); Zen 4 0.6 of the reference's fp32 prediction (`fast` 26.0 s against 32.2 s, `default` 89.1 s against
    # 171.6 s: ~11 s fixed and 0.45x per window; 0.6 keeps both presets inside their budgets)
    bf16_forward_factor: tuple = (("zen5", 1.0), ("amx", 0.78), ("zen4", 0.6))
    # 0.82x the tokens/s (1.22) under forced bf16 on a CPU where it is not fast (the reference CPU; DAD)
    bf16_slow_factor: float = 1.22
    # the fp model writing calibration text (--calib chat, 16 conversations of <= 192 tokens at batch 16:
    # 29.0 s, quiet, 2 threads, AMD Zen 5, whose fp32 runs at the reference CPU's speed), per
    # (sequences x length) token x parameter
    generate_tp: float = 7.0e-11
    # a bit plane beyond k = 2 (fewer for k = 1), per training step and weight: the fake-quant forward and
    # backward walk 2^k levels (float32 under any autocast). The op alone (fdb.fake_quant, forward + backward
    # of 7.1M weights at g64, 2 threads, AMD Zen 4): 7.1 ns a weight at k = 2, 11.6 at k = 3 and at k = 4, so
    # 4.5e-9 s for the first extra plane (an upper figure for the second). Whole quiet `default` runs could
    # not resolve it: the 8-bit-scale plan (22.3M plane-weights beyond k = 2) took 3.28 s and then 3.02 s a
    # DAD step, the float16-scale plan (5.2M) 3.14 s (docs/CALIBRATION.md, time budget).
    plane_p: float = 4.5e-9


COSTS = Costs()
SCALED = ("bw_steps", "dad_steps")


@dataclass(frozen=True)
class Shapes:
    """Parameter counts the cost model needs: each decoder block's planned linear weights,
    the whole model's compute (planned linears + output head), and each block's bit planes beyond
    k = 2 (sum over its linears of weights x (k - 2): what a plan with more planes adds to a step)."""

    block_params: tuple[int, ...]
    compute_params: int
    block_extra_planes: tuple[int, ...] = ()

    def uniform(self) -> Shapes:
        """The same model with every planned linear at k = 2 (what a preset's step counts were set for)."""
        return replace(self, block_extra_planes=())

    @classmethod
    def of(cls, model: nn.Module, plan: list[LinearPlan]) -> Shapes:
        blocks = decoder_blocks(model)
        owner = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
        per = [0] * len(blocks)
        planes = [0] * len(blocks)
        total = 0
        for p in plan:
            m = model.get_submodule(p.name)
            n = p.layout.out_features * p.layout.in_features
            total += n
            if id(m) in owner:
                per[owner[id(m)]] += n
                planes[owner[id(m)]] += n * (p.layout.planes - 2)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and not any(p.name.endswith("lm_head") for p in plan):
            total += head.weight.numel()
        return cls(tuple(per), total, tuple(planes) if any(planes) else ())


def predict(opts, shapes: Shapes, costs: Costs = COSTS) -> dict[str, float]:
    """Predicted seconds per stage on the reference CPU of resolved options ``opts``."""
    c = costs
    out = {"fixed": c.fixed_s}
    if opts.target_bpw is not None and opts.sensitivity != "weight":
        out["sensitivity"] = opts.alloc_samples * opts.calib_seq_len * shapes.compute_params * c.sensitivity_tp
    if uses_generated(opts.calib):
        out["generate"] = opts.calib_self_samples * opts.calib_self_len * shapes.compute_params * c.generate_tp
    planned = sum(shapes.block_params)
    if opts.blockwise:
        tokens = opts.bw_samples * opts.bw_seq_len
        step = c.block_step_tp * bf16_factor(opts.bw_autocast, c.bf16_block_factor, c)
        out["blockwise"] = sum(p * (2 * tokens * c.forward_tp + c.init_p
                                    + opts.bw_steps * opts.bw_batch * opts.bw_seq_len * step)
                               for p in shapes.block_params) \
            + opts.bw_steps * sum(shapes.block_extra_planes) * c.plane_p
    else:
        out["init"] = opts.calib_samples * opts.calib_seq_len * shapes.compute_params * c.forward_tp \
            + planned * c.init_p
    if opts.dad and opts.dad_steps:
        weights = opts.dad_train == "scales+weights"
        factor = dict(c.teacher_factor).get(opts.dad_teacher, 1.0) * (c.weights_factor if weights else 1.0)
        per_kind = tuple((kind, f[weights]) for kind, f in c.bf16_dad_factor)
        factor *= bf16_factor(opts.dad_autocast, per_kind, c)
        if opts.dad_teacher != "online":
            out["teacher"] = opts.dad_samples * opts.dad_seq_len * shapes.compute_params * c.forward_tp \
                * bf16_factor(opts.dad_autocast, c.bf16_forward_factor, c)
        step_tokens = opts.dad_batch * opts.dad_seq_len
        out["dad"] = opts.dad_steps * (step_tokens * shapes.compute_params * c.dad_step_tp * factor
                                       + sum(shapes.block_extra_planes) * c.plane_p)
    return out


def prediction(opts, shapes: Shapes, costs: Costs = COSTS) -> dict:
    """The report's record of a run without a budget: predicted seconds per stage and in all."""
    pred = predict(opts, shapes, costs)
    return {"predicted_s": {k: round(v, 1) for k, v in pred.items()}, "predicted_total_s": round(sum(pred.values()), 1),
            "reference_cpu": REFERENCE_CPU}


def fit(opts, shapes: Shapes, given: set[str] = frozenset(), costs: Costs = COSTS):
    """Scale the step counts not in ``given`` so the predicted total is <= ``opts.time_budget`` minutes.

    Returns (options with the scaled step counts, a report: budget, factor, steps before and
    after, predicted seconds per stage, the reference CPU). Raises :class:`DbquantError` when
    no step count can be scaled, or when even one step per scaled stage does not fit.
    """
    budget = opts.time_budget * 60.0
    scalable = [k for k in SCALED if k not in given and getattr(opts, _stage(k)) and getattr(opts, k) > 0]
    if not scalable:
        raise DbquantError("--time-budget scales --bw-steps and --dad-steps, but both are given on the command line "
                           "(or their stages are off); leave one of them to the budget")

    def total(f: float) -> tuple[float, object]:
        o = replace(opts, **{k: max(1, int(getattr(opts, k) * f)) for k in scalable})
        return sum(predict(o, shapes, costs).values()), o

    floor_s, _ = total(0.0)
    if floor_s > budget:
        raise DbquantError(f"--time-budget {opts.time_budget:g} min is below this run's floor: one step per scaled "
                           f"stage is predicted to take {floor_s / 60:.1f} min on the reference CPU")
    lo, hi = 0.0, 1.0
    while total(hi)[0] <= budget and hi < 1e6:  # grow until over, then bisect the factor
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid)[0] <= budget else (lo, mid)
    out = total(lo)[1]
    info = {"minutes": opts.time_budget, "factor": round(lo, 4),
            "steps": {k: [getattr(opts, k), getattr(out, k)] for k in scalable},
            **prediction(out, shapes, costs), "costs": asdict(costs)}
    return out, info


def bf16_factor(mode: str, per_kind: tuple, costs: Costs = COSTS) -> float:
    """A training step's cost under autocast ``mode`` against the reference CPU's fp32 step: the kind's factor in
    ``per_kind`` where bf16 is fast and the mode uses it (auto, bf16), ``bf16_slow_factor`` where bf16
    is forced on a CPU where it is not fast, else 1."""
    kind = bf16_kind()
    if mode in ("auto", "bf16") and kind is not None:
        return dict(per_kind).get(kind, 1.0)
    return costs.bf16_slow_factor if mode == "bf16" else 1.0


def bf16_dividend(opts, shapes: Shapes, costs: Costs = COSTS):
    """Spend on DAD what bf16 autocast saves: where it is fast (:func:`bf16_factor` < 1 in block-wise or
    DAD), the preset's ``dad_steps`` grow until the predicted wall time is the fp32 preset's on a uniform
    k = 2 plan (within a step): the wall time its step counts were set for. A plan with more bit planes
    (``--target-bpw``) costs more a step, so it gets fewer of the extra steps. Without this, a CPU with
    fast bf16 would finish early with the same training. Deterministic (a fixed /proc/cpuinfo reading).

    Returns (options, the report: the time model's prediction, and ``bf16_dividend`` with the DAD
    steps before and after when it applies).
    """
    if not (opts.dad and opts.dad_steps):
        return opts, prediction(opts, shapes, costs)
    pred = predict(opts, shapes, costs)
    fp32 = sum(predict(replace(opts, dad_autocast="off", bw_autocast="off"), shapes.uniform(), costs).values())
    step = pred["dad"] / opts.dad_steps
    extra = int((fp32 - sum(pred.values())) / step)
    if extra <= 0:
        return opts, prediction(opts, shapes, costs)
    out = replace(opts, dad_steps=opts.dad_steps + extra)
    return out, {**prediction(out, shapes, costs), "bf16_dividend": {"dad_steps": [opts.dad_steps, out.dad_steps]}}


def _stage(step_option: str) -> str:
    return "blockwise" if step_option == "bw_steps" else "dad"
