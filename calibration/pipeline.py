"""The ``fdb-dad`` calibration: FDB init -> block-wise reconstruction -> DAD -> weights for export.

Order of work (each step is skipped on ``--resume`` when its result is already in the work dir):

1. calibration windows (stats, block-wise, DAD) from the calibration mix (``calibration/sources.py``:
   text sources by ratio, and the fp model's own text, cached as ``self-text.safetensors``);
2. activation-weighted FDB init (``init.pt``: scales only); with block-wise on, decoder
   linears are initialised inside the block loop from the block's own fp activations;
3. the DAD teacher, from the untouched full-precision model: its top-k or sampled logits
   (``teacher.pt``), or, for the online teacher, a copy of the planned linears' fp weights;
4. block-wise reconstruction (``block-NNN.pt``, ``acts-NNN.pt``, ``state.pt``);
5. DAD (``state.pt``);
6. export: each FakeQuantLinear's planes and stored-precision scales.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from dbquant.calibration.blockwise import (
    BlockwiseConfig,
    block_names,
    blockwise_reconstruct,
    export_weights,
    load_finished_blocks,
    to_fakequant,
)
from dbquant.calibration.dad import DADConfig, distill, teacher_cache
from dbquant.calibration.images import multimodal_samples
from dbquant.calibration.init import init_weights
from dbquant.calibration.precision import autocast_dtype
from dbquant.calibration.runstate import RunState, make_fingerprint, model_digest, tensor_digest
from dbquant.calibration.sources import SelfGenConfig, mix_sampler
from dbquant.calibration.stats import input_second_moments
from dbquant.errors import DbquantError
from dbquant.model.plan import LinearPlan
from dbquant.model.vlm import calibration_inputs
from dbquant.quant import fdb

# Options that do not change the result (excluded from the fingerprint).
NON_SEMANTIC = ("device", "work_dir", "resume", "checkpoint_every", "overwrite")


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DbquantError(f"--device {name}: CUDA is not available in this torch build / machine")
    return dev


def _init_from_scales(model, plan: list[LinearPlan], saved: dict) -> dict[str, fdb.DualBinaryWeight]:
    out = {}
    for p in plan:
        w = model.get_submodule(p.name).weight.detach().float()
        alpha, offset = saved[p.name]
        out[p.name] = fdb.finalize(fdb.to_groups(w, p.layout.group_size), alpha, offset, p.layout.in_features,
                                   p.layout.scale_bits)
    return out


def _digest(samples) -> str | None:
    """Digest of a stage's samples: token windows, a VLM's MultimodalSamples, or None (stage off)."""
    if samples is None:
        return None
    return samples.digest() if hasattr(samples, "digest") else tensor_digest(samples)


def semantic_options(opts) -> dict:
    """The options that change the result (all but :data:`NON_SEMANTIC`): the fingerprint's part."""
    return {k: v for k, v in asdict(opts).items() if k not in NON_SEMANTIC}


def blockwise_config(opts) -> BlockwiseConfig:
    """The block-wise stage's settings from resolved options (in-memory and streaming alike)."""
    return BlockwiseConfig(steps=opts.bw_steps, batch_size=opts.bw_batch, lr=opts.bw_lr,
                           lr_weight=opts.bw_lr_weight, inputs=opts.bw_inputs, grad_clip=opts.grad_clip,
                           seed=opts.seed, autocast=opts.bw_autocast)


def dad_config(opts) -> DADConfig:
    """The DAD stage's settings from resolved options."""
    return DADConfig(steps=opts.dad_steps, batch_size=opts.dad_batch, lr=opts.dad_lr,
                     lr_weight=opts.dad_lr_weight, train=opts.dad_train, weighting=opts.dad_weighting,
                     temperature=opts.dad_temperature, ce_weight=opts.dad_ce_weight, topk=opts.dad_topk,
                     grad_clip=opts.grad_clip, seed=opts.seed, teacher=opts.dad_teacher,
                     autocast=opts.dad_autocast)


def self_gen_config(opts) -> SelfGenConfig:
    """How the fp model writes its own calibration text (``--calib ...self...``), from the options."""
    return SelfGenConfig(count=opts.calib_self_samples, length=opts.calib_self_len,
                         temperature=opts.calib_self_temperature, prompt_len=opts.calib_self_prompt_len,
                         seed=opts.seed)


def calibration_sampler(model, tokenizer, opts, device="cpu", progress: bool = True):
    """``(n, seq_len, seed) -> int64 [n, seq_len]`` windows of ``opts.calib`` (a source or a mix;
    ``calibration/sources.py``); self-generated text is cached in ``opts.work_dir`` when given."""
    return mix_sampler(model, tokenizer, opts.calib, self_gen_config(opts), opts.work_dir, opts.resume, device,
                       progress)


def run_fdb_dad(model, tokenizer, plan: list[LinearPlan], opts, model_id: str = "",
                progress: bool = True) -> tuple[dict[str, fdb.DualBinaryWeight], dict]:
    """Calibrate ``model``'s planned linears; returns (weights to pack, report).

    ``opts`` is a resolved :class:`dbquant.quantize.QuantizeOptions` (preset values filled in).
    The model is left with FakeQuantLinear modules in place of the planned linears
    (the caller packs the returned weights over them; on a ``--resume`` of a finished run
    they are still the fp linears, which packing replaces just the same).

    The work dir (``report["work_dir"]``) keeps every checkpoint plus ``final.pt`` (the
    weights): the caller deletes them with ``runstate.discard_checkpoints`` once its output
    exists and validates, so a failed save loses nothing and ``--resume`` packs again.
    """
    times: dict[str, float] = {}
    device = pick_device(opts.device)
    t = time.perf_counter()
    stats_b, bw_b, dad_b = _stage_samples(model, tokenizer, opts, device, progress)
    times["data_s"] = time.perf_counter() - t

    fingerprint = make_fingerprint(
        model={"id": model_id, "digest": model_digest(model)}, options=semantic_options(opts),
        data={"stats": _digest(stats_b), "blockwise": _digest(bw_b), "dad": _digest(dad_b)})
    run = RunState(opts.work_dir, fingerprint, resume=opts.resume, checkpoint_every=opts.checkpoint_every,
                   overwrite=opts.overwrite)
    run.sync()  # distributed: every rank has read state.pt before rank 0 may replace it
    torch.manual_seed(opts.seed)
    report: dict = {"fingerprint": fingerprint["hash"], "device": str(device), "work_dir": opts.work_dir,
                    "inputs": _inputs_note(model, opts, bw_b, dad_b)}
    if run.finished:  # the calibration completed and only the save failed: straight to packing
        report.update(times=times, log=run.log_text(), resumed_finished=True)
        return run.final()["weights"], report
    run.log({"stage": "data", "inputs": report["inputs"]})

    init = _init_stage(model, plan, opts, run, stats_b, device, times, progress)  # 1-2
    teacher = _teacher_stage(model, plan, opts, run, dad_b, device, times, progress)  # 3
    stage = (run.resumed or {}).get("stage")
    if opts.blockwise:  # 4
        if stage in ("blockwise-done", "dad"):
            load_finished_blocks(model, plan, run)
        else:
            report["blockwise"] = blockwise_reconstruct(model, plan, init, bw_b, blockwise_config(opts), run,
                                                       device, progress, opts.iters)
            times["blockwise_s"] = report["blockwise"]["seconds"]
            times["stats_s"] = report["blockwise"]["stats_s"]  # in-block statistics (fused with the targets)
    to_fakequant(model, [p.name for p in plan], init)  # planned linears outside decoder blocks (lm_head)
    if dad_b is not None:  # 5
        if stage != "dad":  # stage boundary: a kill from here on resumes at DAD
            run.save("state.pt", {"stage": "dad", "position": {"step": 0}})
        report["dad"] = distill(model, dad_b, teacher, dad_config(opts), run, device, progress)
        times["dad_s"] = report["dad"]["seconds"]

    weights = export_weights(model, [p.name for p in plan])  # 6
    report["times"] = times
    run.finish({"weights": weights})  # checkpoints stay until the caller's output validates
    report["log"] = run.log_text()
    return weights, report


def _stage_samples(model, tokenizer, opts, device="cpu", progress: bool = True) -> tuple:
    """(statistics, block-wise, DAD) samples; None for a stage that is off.

    Each is int64 [n, seq_len] token windows of the calibration mix, seeded seed, seed + 1,
    seed + 2; with ``calib_images`` the block-wise and DAD ones become a VLM's image+text
    samples (calibration/images.py).
    """
    windows = calibration_sampler(model, tokenizer, opts, device, progress)
    stats_b = None if opts.blockwise else windows(opts.calib_samples, opts.calib_seq_len, opts.seed)
    bw_b = windows(opts.bw_samples, opts.bw_seq_len, opts.seed + 1) if opts.blockwise else None
    dad_b = windows(opts.dad_samples, opts.dad_seq_len, opts.seed + 2) if opts.dad and opts.dad_steps else None
    if opts.calib_images:
        bw_b = multimodal_samples(model, tokenizer, model.name_or_path, opts.calib_images, bw_b)
        if dad_b is not None:
            dad_b = multimodal_samples(model, tokenizer, model.name_or_path, opts.calib_images, dad_b)
    return stats_b, bw_b, dad_b


def _inputs_note(model, opts, bw_b, dad_b) -> str:
    """What the stages run on, for the report: a VLM without ``--calib-images`` is calibrated
    on text through its language model alone, and the report says so."""
    if not opts.calib_images:
        return calibration_inputs(model)
    return "; ".join(
        f"{stage}: {b.n_images} image+text samples and {len(b) - b.n_images} text windows through the VLM"
        for stage, b in (("block-wise", bw_b), ("DAD", dad_b)) if b is not None)


def _init_stage(model, plan: list[LinearPlan], opts, run: RunState, stats_b, device, times: dict,
                progress: bool) -> dict[str, fdb.DualBinaryWeight]:
    """Steps 1-2: the FDB init (``init.pt`` keeps the scales only: the bits follow from the fp weights).

    With block-wise on, decoder linears are initialised inside the block loop from that
    stage's own activations (no separate statistics pass); only the other planned linears
    (lm_head) are initialised here, data-free.
    """
    decoder = {n for names in block_names(model, plan) for n in names} if opts.blockwise else set()
    todo = [p for p in plan if p.name not in decoder]
    saved = run.load("init.pt") if opts.resume else None
    if saved is not None:
        init = _init_from_scales(model, todo, saved["scales"])
    else:
        importance = None
        if not opts.blockwise:
            t = time.perf_counter()
            model.to(device)
            importance = input_second_moments(model, [p.name for p in todo], stats_b, progress=progress)
            model.to("cpu")
            importance = {k: v.cpu() for k, v in importance.items()}
            times["stats_s"] = time.perf_counter() - t
        t = time.perf_counter()
        init = init_weights(model, todo, "fdb", importance, opts.iters, progress=progress) if todo else {}
        times["init_s"] = time.perf_counter() - t
        run.save("init.pt", {"scales": {n: (q.alpha, q.offset) for n, q in init.items()}})
        run.save("state.pt", {"stage": "init-done", "position": {}})
    run.log({"stage": "init", "event": "done"})
    return init


def _teacher_stage(model, plan: list[LinearPlan], opts, run: RunState, dad_b, device, times: dict,
                   progress: bool) -> dict | None:
    """Step 3, while the model is still full precision: the teacher's top-k or sampled logits
    (``teacher.pt``), or for ``--dad-teacher online`` a copy of every planned linear's fp weight
    (float32 [N, K]; not saved: a resumed run takes it from the fp model it loads again)."""
    if dad_b is None:
        return None
    if opts.dad_teacher == "online":
        return {"fp_weights": {p.name: model.get_submodule(p.name).weight.detach().float().clone() for p in plan}}
    teacher = run.load("teacher.pt") if opts.resume else None
    if teacher is None:
        t = time.perf_counter()
        model.to(device)
        teacher = teacher_cache(model, dad_b, opts.dad_topk, device, progress=progress,
                                temperature=opts.dad_temperature, mode=opts.dad_teacher, seed=opts.seed,
                                autocast=autocast_dtype(opts.dad_autocast, device))
        model.to("cpu")
        times["teacher_s"] = time.perf_counter() - t
        run.save("teacher.pt", teacher)
    return teacher
