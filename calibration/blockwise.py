"""Block-wise reconstruction: train each decoder block's FDB scales (and latent weights) in turn.

For block i: its full-precision output on full-precision inputs is the target; its
quantized copy (every planned linear swapped for a :class:`~dbquant.model.modules.FakeQuantLinear`)
is trained to reproduce it by MSE. The trained block's own outputs (on the quantized
chain's inputs) become the next block's inputs, so later blocks learn to absorb the error
of earlier ones (``inputs="quant"``, the default); ``inputs="fp"`` trains every block on
full-precision inputs instead. Only one block sits on the compute device at a time;
activations of all calibration samples live on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dbquant.calibration.precision import autocast_dtype, autocast_to
from dbquant.calibration.runstate import RunState, check_finite
from dbquant.errors import DbquantError
from dbquant.format.layout import LinearLayout
from dbquant.model.convert import replace_module
from dbquant.model.modules import FakeQuantLinear
from dbquant.model.plan import LinearPlan, block_path, decoder_blocks
from dbquant.quant import fdb

INPUT_MODES = ("quant", "fp")


@dataclass
class BlockwiseConfig:
    """steps: optimizer steps per block; batch_size: sequences per step; lr: Adam LR of the
    scales (alpha, offset); lr_weight: Adam LR of the latent weights (0 = scales only);
    (both relative to each tensor's mean |value|, see :func:`param_groups`);
    inputs: ``quant`` or ``fp`` (see module doc); grad_clip: max grad norm (0 = off);
    seed: for the batch order; autocast: the block's forward/backward in training under bf16
    (``auto``: where fast, ``bf16``, ``off``; :mod:`dbquant.calibration.precision`): the fp
    targets, the loss and the next block's inputs stay float32."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-2
    lr_weight: float = 5e-3
    inputs: str = "quant"
    grad_clip: float = 1.0
    seed: int = 0
    autocast: str = "off"


# ---------------------------------------------------------------- module swapping

def to_fakequant(model: nn.Module, names: list[str], init: dict[str, fdb.DualBinaryWeight]) -> None:
    """Swap the named nn.Linear layers for FakeQuantLinear started from ``init`` (no-op if swapped)."""
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, FakeQuantLinear):
            continue
        fq = FakeQuantLinear.from_linear(m, init[n]).to(m.weight.device)
        replace_module(model, n, fq)


def placeholder(linear: nn.Module, lay: LinearLayout) -> fdb.DualBinaryWeight:
    """A zero-scale DualBinaryWeight of ``lay``'s shapes (its values are overwritten by a load)."""
    w = linear.weight.detach().float()
    g = fdb.to_groups(w, lay.group_size)
    return fdb.finalize(g, torch.zeros(*g.shape[:2], lay.planes), torch.zeros(g.shape[:2]) if lay.offset else None,
                        w.shape[1], lay.scale_bits)


@torch.no_grad()
def run_block_with_stats(block: nn.Module, x: torch.Tensor, kwargs: dict, device, names: list[str],
                         prefix: str, batch_size: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Like :func:`run_block`, also returning E[x_k^2] of every named linear's input."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        def fn(_m, inp, _out, n=n):
            a = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[n] = sums.get(n, 0) + a.square().sum(0).cpu()
        hooks.append(block.get_submodule(n[len(prefix):]).register_forward_hook(fn))
    try:
        y = run_block(block, x, kwargs, device, batch_size)
    finally:
        for h in hooks:
            h.remove()
    count = x.shape[0] * x.shape[1]
    return y, {n: sums[n] / count for n in names}


def export_weights(model: nn.Module, names: list[str]) -> dict[str, fdb.DualBinaryWeight]:
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, FakeQuantLinear):
            raise DbquantError(f"{n} was not calibrated (it is a {type(m).__name__})")
        out[n] = m.export()
    return out


def fq_modules(module: nn.Module, prefix: str = ""):
    return [(prefix + n, m) for n, m in module.named_modules() if isinstance(m, FakeQuantLinear)]


def param_groups(module: nn.Module, lr: float, lr_weight: float) -> list[dict]:
    """Adam groups, one per tensor, with *relative* learning rates.

    Adam's step is absolute, while scales and weights differ in size from layer to layer
    (and from model to model), so each tensor's LR is ``lr`` (scales, offsets) or
    ``lr_weight`` (latent weights; skipped when 0) times that tensor's mean absolute value
    at the start: an LR of 1e-2 moves every scale by about 1% per step.
    """
    groups = []
    for _, m in fq_modules(module):
        ref = m.alpha.detach().abs().mean().clamp_min(1e-12)
        groups.append({"params": [m.alpha], "lr": lr * float(ref)})
        if m.offset is not None:
            groups.append({"params": [m.offset], "lr": lr * float(ref)})
        if lr_weight > 0:
            groups.append({"params": [m.weight], "lr": lr_weight * float(m.weight.detach().abs().mean())})
    return groups


def set_trainable(module: nn.Module, groups: list[dict]) -> None:
    module.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)


def cosine_factor(step: int, total: int, warmup: int = 0, floor: float = 0.05) -> float:
    """LR multiplier: linear warmup, then cosine from 1 down to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def batch_indices(n: int, batch_size: int, step: int, seed: int, salt: int) -> torch.Tensor:
    """Deterministic sample indices of one step: epochs are seeded permutations of range(n).

    A pure function of (n, batch_size, step, seed, salt), so a resumed run draws exactly the
    batches an uninterrupted one would, with no generator state to checkpoint.
    """
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for e in pos.div(n, rounding_mode="floor").unique().tolist():
        gen = torch.Generator().manual_seed((seed * 1_000_003 + salt * 7919 + e) % (2**63))
        perm = torch.randperm(n, generator=gen)
        sel = pos.div(n, rounding_mode="floor") == e
        out[sel] = perm[pos[sel] % n]
    return out


# ---------------------------------------------------------------- capture

class _Stop(Exception):
    pass


@dataclass
class PerSample:
    """A block call kwarg that differs between calibration samples, stacked over them.

    M-RoPE families (Qwen2-VL, Qwen2.5-VL) give each image+text sample its own position
    embeddings (the image's tokens take 2-D positions), so one captured set cannot serve
    every sample. value: a tensor or tuple of tensors whose dim 0 indexes the S samples
    (e.g. (cos, sin), each float32 [S, T, D]); :func:`call_block` takes the batch's rows.
    """

    value: object

    def take(self, idx):
        return _map(self.value, lambda t: t[idx])


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, PerSample):
        return PerSample(_map(obj.value, fn))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches, batch_size: int = 8):
    """The first decoder block's inputs on every calibration sample, and its call kwargs.

    The kwargs (``position_embeddings``, ``position_ids``, attention mask, ...) are
    captured from a 1-sample call, so their batch dimension broadcasts to any batch.
    ``batches``: int64 [S, T] token windows (run through the language model), or a VLM's
    :class:`~dbquant.calibration.images.MultimodalSamples` (run one by one through the
    whole VLM, so image features are merged in); a kwarg that then differs between
    samples (M-RoPE position embeddings) is kept for all of them as a :class:`PerSample`.

    Returns: (hidden float32 [S, T, H] on the CPU, kwargs dict on the CPU).
    """
    first = decoder_blocks(model)[0]
    seen: dict = {}

    def pre_hook(_mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    device = next(model.parameters()).device
    base = model.get_submodule(block_path(model).rsplit(".", 1)[0])
    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    xs = []
    if not isinstance(batches, torch.Tensor):
        per_sample = []
        try:
            for i in range(len(batches)):
                try:
                    model(**to_device(batches.inputs(i), device), use_cache=False)
                except _Stop:
                    pass
                xs.append(seen["x"].detach().float().cpu())
                per_sample.append(_block_kwargs(seen["kwargs"]))
        finally:
            handle.remove()
        return torch.cat(xs), _merge_samples(per_sample)
    try:
        for i in range(0, len(batches), batch_size):
            try:
                base(input_ids=batches[i:i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            xs.append(seen["x"].detach().float().cpu())
        try:
            base(input_ids=batches[:1].to(device), use_cache=False)
        except _Stop:
            pass
    finally:
        handle.remove()
    return torch.cat(xs), _block_kwargs(seen["kwargs"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _merge_samples(kwargs: list[dict]) -> dict:
    """One kwargs dict from per-sample (batch 1) ones: shared values as they are, others as PerSample."""
    out = {}
    for k, v in kwargs[0].items():
        if all(_same(v, kw[k]) for kw in kwargs[1:]):
            out[k] = v
        else:
            out[k] = PerSample(_stack([kw[k] for kw in kwargs]))
    return out


def _stack(parts: list):
    """Concatenate per-sample values (tensors or tuples of tensors, dim 0 of size 1) over samples."""
    if isinstance(parts[0], torch.Tensor):
        if any(p.shape[0] != 1 for p in parts):
            raise DbquantError("a per-sample block input has no batch dimension of 1; cannot stack it")
        return torch.cat(parts)
    if isinstance(parts[0], (tuple, list)):
        return type(parts[0])(_stack([p[j] for p in parts]) for j in range(len(parts[0])))
    raise DbquantError(f"calibration samples give the first decoder block different {type(parts[0]).__name__} "
                       "inputs; dbquant can only stack tensors")


def _block_kwargs(seen: dict) -> dict:
    kwargs = {k: v for k, v in seen.items() if k not in ("past_key_values", "past_key_value",
                                                          "use_cache", "output_attentions")}
    kwargs = to_device(kwargs, "cpu")
    kwargs["use_cache"] = False
    return kwargs


def to_device(obj, device):
    """``obj`` with every tensor in it (nested in tuples, lists, dicts, :class:`PerSample`)
    detached and moved to ``device``; anything else is returned as it is."""
    return _map(obj, lambda t: t.detach().to(device))


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict, idx) -> torch.Tensor:
    """The block's output on ``x`` = samples ``idx`` (a slice or int64 index tensor) of the calibration set."""
    kwargs = {k: v.take(idx) if isinstance(v, PerSample) else v for k, v in kwargs.items()}
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict, device, batch_size: int = 8) -> torch.Tensor:
    """Block outputs for all samples, in chunks; float32 on the CPU."""
    return torch.cat([call_block(block, x[i:i + batch_size].to(device), kwargs, slice(i, i + batch_size)).float().cpu()
                      for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------- the stage

def block_names(model: nn.Module, plan: list[LinearPlan]) -> list[list[str]]:
    """Planned linear names per decoder block (blocks with none get [])."""
    path = block_path(model)
    n_blocks = len(decoder_blocks(model))
    out = [[] for _ in range(n_blocks)]
    for p in plan:
        if p.name.startswith(path + "."):
            out[int(p.name[len(path) + 1:].split(".")[0])].append(p.name)
    return out


def _block_state(block: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in block.named_parameters()}


def blockwise_reconstruct(model: nn.Module, plan: list[LinearPlan], init: dict[str, fdb.DualBinaryWeight],
                          batches: torch.Tensor, cfg: BlockwiseConfig, run: RunState,
                          device: str | torch.device = "cpu", progress: bool = True, iters: int = 8) -> dict:
    """Run (or resume) the stage. Leaves every planned decoder linear as a trained FakeQuantLinear.

    Args:
        init: FDB initialisation of the planned linears. A decoder linear missing from it is
            initialised here, activation-weighted by E[x^2] of its input gathered while the
            full-precision block computes its targets (no separate statistics pass).
        batches: int64 [S, T] calibration token windows.
        iters: FDB refinement iterations of that in-block init.
    Returns:
        a report: per block, the relative MSE before and after training (on the training
        inputs), and the stage's wall time.
    """
    if cfg.inputs not in INPUT_MODES:
        raise DbquantError(f"unknown block-wise input mode {cfg.inputs!r}; choose from {INPUT_MODES}")
    t0 = time.perf_counter()
    blocks = decoder_blocks(model)
    names = block_names(model, plan)
    state = run.resumed if (run.resumed and run.resumed.get("stage") == "blockwise") else None
    start_block, start_step = (state["position"]["block"], state["position"]["step"]) if state else (0, 0)

    plan_by_name = {p.name: p for p in plan}
    init = dict(init)

    def ensure_init(names_i):
        for n in names_i:
            if n not in init:
                p = plan_by_name[n]
                init[n] = placeholder(model.get_submodule(n), p.layout)

    # Finished blocks come back from their files; the quantized chain's activations from acts-NNN.pt.
    for i in range(start_block):
        ensure_init(names[i])
        to_fakequant(model, names[i], init)
        saved = run.load(f"block-{i:03d}.pt")
        if saved is None:
            raise DbquantError(f"resume: {run.dir}/block-{i:03d}.pt is missing; start over with --overwrite")
        blocks[i].load_state_dict(saved["params"], strict=False)
    acts = run.load(f"acts-{start_block:03d}.pt") if start_block else None
    kwargs_cpu = None
    if acts is not None:
        x_fp, x_q, kwargs_cpu = acts["x_fp"], acts["x_q"], acts["kwargs"]
    elif start_block:
        raise DbquantError(f"resume: {run.dir}/acts-{start_block:03d}.pt is missing; start over with --overwrite")
    else:
        x_fp, kwargs_cpu = capture_block_inputs(model, batches)
        x_q = x_fp
    inputs = BlockInputs(x_fp, x_q, to_device(kwargs_cpu, device), kwargs_cpu)
    run.sync()  # distributed: every rank has read acts-NNN.pt before rank 0 removes it

    report = {"blocks": [], "stats_s": 0.0}
    total = len(blocks) * cfg.steps
    bar = tqdm(total=total, initial=start_block * cfg.steps + start_step, desc="block-wise", unit="step",
               disable=not progress, dynamic_ncols=True)
    job = BlockRun(model, plan_by_name, init, cfg, run, device, bar, iters)
    try:
        for i in range(start_block, len(blocks)):
            inputs, rep = calibrate_block(job, i, names[i], inputs, state if i == start_block else None)
            report["stats_s"] += rep.pop("stats_s")
            report["blocks"].append(rep)
            state = None
    finally:
        bar.close()
    report["seconds"] = time.perf_counter() - t0
    return report


@dataclass
class BlockInputs:
    """One decoder block's inputs on every calibration sample.

    x_fp / x_q: float32 [S, T, H] on the CPU: the inputs on the full-precision chain and on
    the quantized chain (the same tensor for block 0). kwargs: the block's call kwargs on the
    compute device; kwargs_cpu: the same on the CPU (what the activation checkpoint
    ``acts-NNN.pt`` holds).
    """

    x_fp: torch.Tensor
    x_q: torch.Tensor
    kwargs: dict
    kwargs_cpu: dict


@dataclass
class BlockRun:
    """What every block of one block-wise run shares (the setting of :func:`calibrate_block`).

    plan_by_name: module path -> its LinearPlan. init: FDB initialisation of the planned
    linears; a block fills in, in place, those it initialises from its own statistics.
    bar: a tqdm bar advanced once per optimizer step. iters: FDB refinement iterations of
    that in-block init. finish: ``finish(block, i)`` persists trained block ``i`` (streaming
    packs and writes it); None: its parameters go to ``block-NNN.pt``.
    """

    model: nn.Module
    plan_by_name: dict[str, LinearPlan]
    init: dict[str, fdb.DualBinaryWeight]
    cfg: BlockwiseConfig
    run: RunState
    device: str | torch.device
    bar: object
    iters: int = 8
    finish: Callable[[nn.Module, int], None] | None = None


def calibrate_block(job: BlockRun, i: int, names_i: list[str], inputs: BlockInputs,
                    state: dict | None = None) -> tuple[BlockInputs, dict]:
    """Calibrate decoder block ``i`` of ``job.model`` and return the next block's inputs.

    The one code path of the stage, shared by the in-memory loop above and by layer
    streaming (``calibration/streaming.py``), which materialises only this block.

    Args:
        names_i: the block's planned linears (full module paths); initialised here from the
            fp block's own input statistics unless already in ``job.init``.
        inputs: the block's inputs (fp and quantized chains, call kwargs).
        state: a mid-block checkpoint of this block to continue from (``state.pt``), or None.
    ``job.finish`` runs before the position checkpoint, so a run killed in between redoes
    the block instead of losing it.

    Returns:
        (inputs of block i + 1, {"block", "first_loss", "last_loss", "stats_s"}). The block's
        planned linears are left as trained FakeQuantLinears, back on their device.
    """
    path = block_path(job.model)
    blocks = decoder_blocks(job.model)
    block = blocks[i]
    orig_device = next(block.parameters()).device
    block.to(job.device)
    y_fp, stats_s = _targets_and_init(job, f"{path}.{i}", block, names_i, inputs)
    to_fakequant(job.model, names_i, job.init)
    block.to(job.device)
    x_in = inputs.x_q if job.cfg.inputs == "quant" else inputs.x_fp
    first_loss, last_loss = _train_block(job, f"{path}.{i}", block, i, x_in, y_fp, inputs.kwargs, state)
    block.requires_grad_(False)
    with torch.no_grad():
        x_q = run_block(block, inputs.x_q, inputs.kwargs, job.device)
    block.to(orig_device)
    nxt = BlockInputs(y_fp, x_q, inputs.kwargs, inputs.kwargs_cpu)  # the fp target is the next fp input
    job.run.log({"stage": "block-wise", "block": i, "event": "block done", "first_loss": first_loss,
                 "last_loss": last_loss})
    _persist_block(job, block, i, len(blocks), nxt)
    return nxt, {"block": i, "first_loss": first_loss, "last_loss": last_loss, "stats_s": stats_s}


def _targets_and_init(job: BlockRun, prefix: str, block: nn.Module, names_i: list[str],
                      inputs: BlockInputs) -> tuple[torch.Tensor, float]:
    """(fp block output on fp inputs: float32 [S, T, H] on the CPU, seconds of statistics).

    Linears missing from ``job.init`` get their FDB init here, weighted by E[x^2] of their
    inputs gathered in the same pass that computes the target.
    """
    missing = [n for n in names_i if n not in job.init]
    if not missing:
        return run_block(block, inputs.x_fp, inputs.kwargs, job.device), 0.0
    ts = time.perf_counter()
    y_fp, imp = run_block_with_stats(block, inputs.x_fp, inputs.kwargs, job.device, missing, prefix + ".")
    stats_s = time.perf_counter() - ts
    for n in missing:
        p = job.plan_by_name[n]
        w = job.model.get_submodule(n).weight.detach().float()
        job.init[n] = fdb.quantize_fdb(w, p.layout.group_size, imp[n].to(w.device), p.layout.offset, job.iters,
                                       grid=10, planes=p.layout.planes, scale_bits=p.layout.scale_bits)
        # (grid 10: training follows, a coarser search suffices)
    return y_fp, stats_s


def _train_block(job: BlockRun, prefix: str, block: nn.Module, i: int, x_in: torch.Tensor, y_fp: torch.Tensor,
                 kwargs: dict, state: dict | None) -> tuple[float | None, float | None]:
    """Block ``i``'s (module path ``prefix``) optimizer loop, resumed from ``state`` when given;
    returns its (first, last) loss. x_in / y_fp: float32 [S, T, H] on the CPU: training inputs
    and fp targets.
    """
    cfg, run, device = job.cfg, job.run, job.device
    denom = y_fp.square().mean().clamp_min(1e-30)
    groups = param_groups(block, cfg.lr, cfg.lr_weight)
    set_trainable(block, groups)
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95))
    step0 = 0
    if state is not None and state["position"]["step"]:
        block.load_state_dict(to_device(state["params"], device), strict=False)
        opt.load_state_dict(state["optimizer"])
        step0 = state["position"]["step"]
    mods = fq_modules(block, prefix + ".")
    amp = autocast_dtype(cfg.autocast, device)
    first_loss = last_loss = None
    for step in range(step0, cfg.steps):
        f = cosine_factor(step, cfg.steps)
        for g, base_lr in zip(opt.param_groups, base_lrs):
            g["lr"] = base_lr * f
        idx = batch_indices(len(x_in), cfg.batch_size, step, cfg.seed, salt=i)
        with autocast_to(device, amp):
            out = call_block(block, x_in[idx].to(device), kwargs, idx.to(device))
        loss = F.mse_loss(out.float(), y_fp[idx].to(device)) / denom
        check_finite(loss, "block-wise", f"block {i} ({prefix})", step, mods)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        first_loss = lv if first_loss is None else first_loss
        last_loss = lv
        job.bar.update(1)
        job.bar.set_postfix(block=i, loss=f"{lv:.4g}")
        run.log({"stage": "block-wise", "block": i, "step": step, "loss": lv,
                 "lr": opt.param_groups[0]["lr"]})
        if run.step_done() and step + 1 < cfg.steps:
            run.save("state.pt", {"stage": "blockwise", "position": {"block": i, "step": step + 1},
                                  "params": to_device(_block_state(block), "cpu"),
                                  "optimizer": opt.state_dict()})
    return first_loss, last_loss


def _persist_block(job: BlockRun, block: nn.Module, i: int, n_blocks: int, nxt: BlockInputs) -> None:
    """Block ``i`` of ``n_blocks`` done: its parameters (or ``job.finish``), the next inputs, then the position."""
    run = job.run
    if job.finish is None:
        run.save(f"block-{i:03d}.pt", {"params": to_device(_block_state(block), "cpu")})
    else:
        job.finish(block, i)
    if i + 1 < n_blocks:
        run.save(f"acts-{i + 1:03d}.pt", {"x_fp": nxt.x_fp, "x_q": nxt.x_q, "kwargs": nxt.kwargs_cpu})
    run.save("state.pt", {"stage": "blockwise" if i + 1 < n_blocks else "blockwise-done",
                          "position": {"block": i + 1, "step": 0}})
    run.remove(f"acts-{i:03d}.pt")


def load_finished_blocks(model: nn.Module, plan: list[LinearPlan], run: RunState) -> None:
    """After a completed block-wise stage (resumed later): swap in and load every block's parameters."""
    blocks = decoder_blocks(model)
    names = block_names(model, plan)
    plan_by_name = {p.name: p for p in plan}
    for i, block in enumerate(blocks):
        to_fakequant(model, names[i], {n: placeholder(model.get_submodule(n), plan_by_name[n].layout)
                                       for n in names[i]})
        saved = run.load(f"block-{i:03d}.pt")
        if saved is None:
            raise DbquantError(f"resume: {run.dir}/block-{i:03d}.pt is missing; start over with --overwrite")
        block.load_state_dict(saved["params"], strict=False)
