"""Deviation-Aware Distillation (DAD): end-to-end distillation of the FDB student from the fp teacher.

Loss per token t: ``w_t * T^2 * KL(p_T(.|t) || p_S(.|t))`` at temperature T, plus an
optional cross-entropy term on the ground-truth next token. The per-token weight
``w_t`` comes from a small pluggable function of the teacher's and the student's
entropies (computed without gradient) and is normalised to mean 1 over the batch.

The teacher is never run during training: its top-k logits (and its exact entropy) are
computed once from the full-precision model before any weight is touched and kept in
memory / in the work dir (``teacher.pt``). The KL is taken over k + 1 outcomes: the
teacher's top-k tokens and the remaining mass (see :func:`dad_loss`).

Weightings (``WEIGHTINGS``):
  * ``uniform``          w = 1 (plain knowledge distillation; the default, by measured ablation);
  * ``teacher-entropy``  w ∝ H_T (ambiguous tokens, by the teacher, count more);
  * ``deviation``        **our formula** (DB-LLM's exact one is not public):
    ``s = H_T + |H_S - H_T|``, ``w = 0.5 + 0.5 * s / mean(s)`` — a token counts more when
    the teacher finds it ambiguous *and* when the student's uncertainty deviates from
    the teacher's (in either direction); the 0.5 floor keeps confident, already-matched
    tokens in the loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dbquant.calibration import distributed
from dbquant.calibration.blockwise import (
    batch_indices,
    cosine_factor,
    fq_modules,
    param_groups,
    set_trainable,
    to_device,
)
from dbquant.calibration.runstate import RunState, check_finite
from dbquant.errors import DbquantError

# ---------------------------------------------------------------- weightings

def _norm(w: torch.Tensor) -> torch.Tensor:
    return w / w.mean().clamp_min(1e-12)


def weight_uniform(h_t: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(h_t)


def weight_teacher_entropy(h_t: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
    return _norm(h_t.clamp_min(1e-6))


def weight_deviation(h_t: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
    """Ours: teacher ambiguity plus the student's entropy deviation, floored at half the mean."""
    s = h_t + (h_s - h_t).abs()
    return 0.5 + 0.5 * _norm(s.clamp_min(1e-6))


WEIGHTINGS = {"uniform": weight_uniform, "teacher-entropy": weight_teacher_entropy,
              "deviation": weight_deviation}
TRAIN_SETS = ("scales", "scales+weights")


@dataclass
class DADConfig:
    """steps / batch_size (sequences per step); lr (scales) and lr_weight (latent weights, used
    when train == "scales+weights"), relative to each tensor's mean |value|; weighting: a key of WEIGHTINGS; temperature; ce_weight:
    weight of the ground-truth cross-entropy term; topk: teacher logits kept per token;
    warmup: LR warmup steps before the cosine decay; grad_clip: max grad norm (0 = off)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 5e-3
    lr_weight: float = 2e-3
    train: str = "scales"
    weighting: str = "uniform"
    temperature: float = 1.0
    ce_weight: float = 0.0
    topk: int = 64
    warmup: int = 5
    grad_clip: float = 1.0
    seed: int = 0

    def check(self) -> DADConfig:
        if self.weighting not in WEIGHTINGS:
            raise DbquantError(f"unknown DAD weighting {self.weighting!r}; choose from {sorted(WEIGHTINGS)}")
        if self.train not in TRAIN_SETS:
            raise DbquantError(f"unknown DAD parameter set {self.train!r}; choose from {TRAIN_SETS}")
        if self.temperature <= 0 or self.topk < 1:
            raise DbquantError(f"out-of-range DAD option: temperature={self.temperature} (> 0), "
                               f"topk={self.topk} (>= 1)")
        return self


# ---------------------------------------------------------------- teacher cache

def micro_batches(batches, idx: torch.Tensor):
    """``(rows of idx, model inputs)`` to run for the samples ``idx`` (int64 [B]).

    batches: int64 [S, T] token windows (one micro-batch: all of idx), or a VLM's
    :class:`~dbquant.calibration.images.MultimodalSamples` (one sample at a time: image
    tensors of different samples do not batch in every family).
    """
    if isinstance(batches, torch.Tensor):
        yield slice(None), {"input_ids": batches[idx]}
        return
    for j, i in enumerate(idx.tolist()):
        yield slice(j, j + 1), batches.inputs(i)


@torch.no_grad()
def teacher_cache(model: nn.Module, batches, topk: int, device="cpu", batch_size: int = 4,
                  progress: bool = True, temperature: float = 1.0) -> dict:
    """Top-k log-probabilities (at ``temperature``) and exact entropy (at 1) of the teacher.

    batches: int64 [S, T] token windows, or MultimodalSamples (see :func:`micro_batches`).
    Returns: {"values": float32 [S, T, k] log p_T, "indices": int32 [S, T, k],
    "entropy": float32 [S, T]}. The mass outside the top k is ``1 - sum(exp(values))``.
    """
    vals, idxs, ents = [], [], []
    for i in tqdm(range(0, len(batches), batch_size), desc="teacher top-k", disable=not progress):
        for _, inputs in micro_batches(batches, torch.arange(i, min(i + batch_size, len(batches)))):
            logits = model(**to_device(inputs, device), use_cache=False).logits.float()
            logp = logits.log_softmax(-1)
            ents.append(-(logp.exp() * logp).sum(-1).cpu())
            v, ix = (logits / temperature).log_softmax(-1).topk(topk, dim=-1)
            vals.append(v.cpu())
            idxs.append(ix.to(torch.int32).cpu())
    return {"values": torch.cat(vals), "indices": torch.cat(idxs), "entropy": torch.cat(ents)}


def dad_loss(student_logits: torch.Tensor, t_vals: torch.Tensor, t_idx: torch.Tensor, t_ent: torch.Tensor,
             cfg: DADConfig, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted distillation loss of one batch.

    The KL is exact over k + 1 outcomes: the teacher's top k tokens and "everything else"
    (both distributions' remaining mass), so it is 0 exactly when the student matches the
    teacher on the top k and on the tail's total.

    Args:
        student_logits: float [B, T, V]; t_vals / t_idx: [B, T, k] teacher top-k log-probs (at the
        temperature) and token ids; t_ent: [B, T]; targets: int64 [B, T] token ids (for the CE
        term: position t predicts targets[t + 1]).
    Returns: (loss, {"kl": mean unweighted KL, "ce": ..., "w_max": ...}).
    """
    tau = cfg.temperature
    logits = student_logits.float()
    logp_s = (logits / tau).log_softmax(-1)
    ls_k = logp_s.gather(-1, t_idx.long())  # [B, T, k]
    p_t = t_vals.exp()
    tail_t = (1 - p_t.sum(-1)).clamp_min(1e-12)
    tail_s = (1 - ls_k.exp().sum(-1)).clamp_min(1e-12)
    kl = (p_t * (t_vals - ls_k)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())
    kl = kl * tau * tau
    with torch.no_grad():
        lp1 = logp_s if tau == 1 else logits.log_softmax(-1)
        h_s = -(lp1.exp() * lp1).sum(-1)
        w = WEIGHTINGS[cfg.weighting](t_ent, h_s)
    loss = (w * kl).mean()
    info = {"kl": float(kl.detach().mean()), "w_max": float(w.max())}
    if cfg.ce_weight and targets is not None:
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
        loss = loss + cfg.ce_weight * ce
        info["ce"] = float(ce.detach())
    return loss, info


# ---------------------------------------------------------------- the stage

def distill(model: nn.Module, batches, teacher: dict, cfg: DADConfig, run: RunState,
            device="cpu", progress: bool = True) -> dict:
    """Train the FakeQuant student (all planned linears already swapped) against the cached teacher.

    batches: int64 [S, T] token windows, or a VLM's MultimodalSamples, whose samples run
    one at a time with gradients accumulated over the step's batch (:func:`micro_batches`;
    the ``teacher-entropy`` / ``deviation`` weights are then normalised per sample).

    Trains the scales of every FakeQuantLinear (and their latent weights with
    ``train="scales+weights"``); everything else stays frozen. Resumes from ``run.resumed``
    when it is a DAD checkpoint.

    Under torch.distributed (``calibration/distributed.py``) each rank computes the loss on
    its equal slice of the step's global batch and DDP averages the gradients: the update is
    the single-process one (up to float summation order). The ``teacher-entropy`` and
    ``deviation`` weights are normalised over each rank's slice rather than the global
    batch (``uniform``, the default, has nothing to normalise).
    """
    cfg.check()
    t0 = time.perf_counter()
    mods = fq_modules(model)
    if not mods:
        raise DbquantError("DAD needs a model whose planned linears are FakeQuantLinear modules")
    orig_device = next(model.parameters()).device
    model.to(device)
    opt, base_lrs, trainable = _optimizer(model, cfg)
    net = distributed.wrap(model)  # the model itself in a single process
    step0 = _resume(run, opt, trainable, device)
    report = {"steps": cfg.steps, "first_kl": None, "last_kl": None}
    bar = tqdm(total=cfg.steps, initial=step0, desc=f"DAD ({cfg.weighting})", unit="step",
               disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    try:
        for step in range(step0, cfg.steps):
            f = cosine_factor(step, cfg.steps, cfg.warmup)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            idx = distributed.local_slice(batch_indices(len(batches), cfg.batch_size, step, cfg.seed, salt=100_003))
            loss_value, info = _accumulate_step(net, batches, teacher, idx, cfg, device)
            # every rank sees (and logs, and stops on) the global batch's numbers
            loss_value, info["kl"] = distributed.mean_over_ranks([loss_value, info["kl"]])
            check_finite(torch.tensor(loss_value), "DAD", "end-to-end", step, mods)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            report["first_kl"] = info["kl"] if report["first_kl"] is None else report["first_kl"]
            report["last_kl"] = info["kl"]
            bar.update(1)
            bar.set_postfix(kl=f"{info['kl']:.4g}")
            run.log({"stage": "dad", "step": step, "loss": loss_value, **info, "lr": opt.param_groups[0]["lr"]})
            if run.step_done() and step + 1 < cfg.steps:
                run.save("state.pt", {"stage": "dad", "position": {"step": step + 1},
                                      "params": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                                      "optimizer": opt.state_dict()})
    finally:
        bar.close()
        model.train(was_training)
    model.requires_grad_(False)
    model.to(orig_device)
    report["seconds"] = time.perf_counter() - t0
    return report


def _optimizer(model: nn.Module, cfg: DADConfig):
    """(Adam over the trainable scales / weights, their base LRs, {name: parameter}).

    Marks exactly those parameters trainable (see :func:`param_groups`).
    """
    groups = param_groups(model, cfg.lr, cfg.lr_weight if cfg.train == "scales+weights" else 0.0)
    set_trainable(model, groups)
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.95))
    return opt, base_lrs, {n: p for n, p in model.named_parameters() if p.requires_grad}


def _resume(run: RunState, opt, trainable: dict, device) -> int:
    """Restore parameters and optimizer from a DAD checkpoint in ``run.resumed``; returns the first step."""
    state = run.resumed if (run.resumed and run.resumed.get("stage") == "dad") else None
    if state is None or not state["position"]["step"]:
        return 0
    with torch.no_grad():
        for n, t in state["params"].items():
            trainable[n].copy_(t.to(device))
    opt.load_state_dict(state["optimizer"])
    return state["position"]["step"]


def _accumulate_step(net: nn.Module, batches, teacher: dict, idx: torch.Tensor, cfg: DADConfig,
                     device) -> tuple[float, dict]:
    """Forward and backward the samples ``idx`` (int64 [B]); gradients accumulate over micro-batches.

    Returns (loss, {"kl", "w_max", ...}) of this rank's slice, each micro-batch weighted by
    its share of the samples.
    """
    loss_value, info = 0.0, {"kl": 0.0, "w_max": 0.0}
    for rows, inputs in micro_batches(batches, idx):
        j = idx[rows]
        inputs = to_device(inputs, device)
        logits = net(**inputs, use_cache=False).logits
        loss, part = dad_loss(logits, teacher["values"][j].to(device), teacher["indices"][j].to(device),
                              teacher["entropy"][j].to(device), cfg, inputs["input_ids"])
        share = len(j) / len(idx)
        (loss * share).backward()
        loss_value += float(loss.detach()) * share
        info = {k: info.get(k, 0.0) + v * share for k, v in part.items()} | {
            "w_max": max(info["w_max"], part["w_max"])}
    return loss_value, info
