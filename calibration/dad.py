"""Deviation-Aware Distillation (DAD): end-to-end distillation of the FDB student from the fp teacher.

Loss per token t: ``w_t * T^2 * KL(p_T(.|t) || p_S(.|t))`` at temperature T, plus an
optional cross-entropy term on the ground-truth next token. The per-token weight
``w_t`` comes from a small pluggable function of the teacher's and the student's
entropies (computed without gradient) and is normalised to mean 1 over the batch.

The teacher signal (``DADConfig.teacher``, ``TEACHERS``):
  * ``topk`` (default): the teacher's top-k log-probabilities and exact entropy, computed
    once from the full-precision model before any weight is touched and kept in memory / in
    the work dir (``teacher.pt``); the KL is taken over k + 1 outcomes: the top-k tokens and
    the remaining mass (see :func:`dad_loss`). Biased: the tail's shape is lost.
  * ``online``: the fp teacher runs every step and the loss is the exact full-vocabulary
    forward KL. The teacher is the student itself with every FakeQuantLinear computing with
    a frozen copy of its fp weight (:func:`fp_forward`): one copy of the planned linears'
    weights, not of the model.
  * ``sample``: Random Sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating
    Knowledge Distillation in LLMs", ACL 2025, arXiv:2503.16870): k tokens drawn per position
    from p_T (at the temperature), cached once like ``topk`` with their importance weights
    (proposal q = p_T, so a token drawn c times weighs c / k). The loss
    ``sum_i w_i (log p_T(x_i) - log p_S(x_i))`` is an unbiased estimate of KL(p_T || p_S) and
    its gradient in the student's logits is unbiased for the full KL's.

Mixed precision (``DADConfig.autocast``, ``calibration/precision.py``): the student's forward (and
so its backward) runs under bf16 autocast where the device's bf16 is fast, and so does the cached
teacher's forward (:func:`teacher_cache`); the loss, the teacher's softmax, the online teacher and
the optimizer stay in fp32.

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

import contextlib
import functools
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
from dbquant.calibration.precision import AUTOCAST_MODES, autocast_dtype, autocast_to
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
TEACHERS = ("topk", "online", "sample")


@dataclass
class DADConfig:
    """steps / batch_size (sequences per step); lr (scales) and lr_weight (latent weights, used
    when train == "scales+weights"), relative to each tensor's mean |value|; weighting: a key of
    WEIGHTINGS; temperature; ce_weight: weight of the ground-truth cross-entropy term; topk: teacher
    logits kept per token;
    warmup: LR warmup steps before the cosine decay; grad_clip: max grad norm (0 = off);
    teacher: a key of TEACHERS (topk / sample cache ``topk`` tokens per position); autocast:
    ``auto`` (bf16 where fast), ``bf16`` or ``off`` (:func:`precision.autocast_dtype`)."""

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
    teacher: str = "topk"
    autocast: str = "off"

    def check(self) -> DADConfig:
        if self.weighting not in WEIGHTINGS:
            raise DbquantError(f"unknown DAD weighting {self.weighting!r}; choose from {sorted(WEIGHTINGS)}")
        if self.train not in TRAIN_SETS:
            raise DbquantError(f"unknown DAD parameter set {self.train!r}; choose from {TRAIN_SETS}")
        if self.teacher not in TEACHERS:
            raise DbquantError(f"unknown DAD teacher signal {self.teacher!r}; choose from {TEACHERS}")
        if self.autocast not in AUTOCAST_MODES:
            raise DbquantError(f"unknown DAD autocast mode {self.autocast!r}; choose from {AUTOCAST_MODES}")
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


def sample_tokens(logp: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws (with replacement) from each row's distribution, with their importance weights.

    logp: float32 [..., V] log-probabilities (the proposal q = p). Draws run on the CPU from
    ``gen``, so they do not depend on the device. Returns (int64 [..., k] token ids, sorted;
    float32 [..., k] weights): a token drawn c times keeps weight c / k on its first copy and
    0 on the others (weights sum to 1 per row).
    """
    flat = logp.reshape(-1, logp.shape[-1]).float().exp().cpu()
    ids = torch.multinomial(flat, k, replacement=True, generator=gen).sort(-1).values
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [N, k, k]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    weights = first * same.sum(-1).float() / k
    shape = (*logp.shape[:-1], k)
    return ids.view(shape).to(logp.device), weights.view(shape).to(logp.device)


@torch.no_grad()
def teacher_cache(model: nn.Module, batches, topk: int, device="cpu", batch_size: int = 4,
                  progress: bool = True, temperature: float = 1.0, mode: str = "topk", seed: int = 0,
                  autocast: torch.dtype | None = None) -> dict:
    """The cached teacher signal: top-k or sampled log-probabilities (at ``temperature``) and exact entropy (at 1).

    The model's forward runs under ``autocast`` (None: float32; the pipeline passes DAD's own, so the
    teacher is computed as precisely as the student it trains: with AMX bf16 takes 0.78x the time and
    moves the teacher by KL 0.0007 nats a token, docs/RESULTS.md); the softmax, top-k and sampling
    are float32.

    batches: int64 [S, T] token windows, or MultimodalSamples (see :func:`micro_batches`).
    mode ``topk``: {"values": float32 [S, T, k] log p_T, "indices": int32 [S, T, k],
    "entropy": float32 [S, T]}; the mass outside the top k is ``1 - sum(exp(values))``.
    mode ``sample``: the same keys (k draws from p_T, :func:`sample_tokens`, seeded with
    ``seed``) plus "weights": float32 [S, T, k] importance weights.
    """
    if mode not in ("topk", "sample"):
        raise DbquantError(f"teacher_cache caches mode topk or sample, not {mode!r} (online is not cached)")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {"values": [], "indices": [], "entropy": [], "weights": []}
    for i in tqdm(range(0, len(batches), batch_size), desc=f"teacher {mode}", disable=not progress):
        for _, inputs in micro_batches(batches, torch.arange(i, min(i + batch_size, len(batches)))):
            with autocast_to(device, autocast):
                logits = model(**to_device(inputs, device), use_cache=False).logits
            logits = logits.float()
            out["entropy"].append(entropy(logits).cpu())
            logp = (logits / temperature).log_softmax(-1)
            if mode == "topk":
                v, ix = logp.topk(topk, dim=-1)
            else:
                ix, w = sample_tokens(logp, topk, gen)
                v = logp.gather(-1, ix)
                out["weights"].append(w.cpu())
            out["values"].append(v.cpu())
            out["indices"].append(ix.to(torch.int32).cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """float32 [...]: the entropy (nats, at temperature 1) of float logits [..., V]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def fp_forward(model: nn.Module, fp_weights: dict[str, torch.Tensor]):
    """Context: every FakeQuantLinear of ``model`` named in ``fp_weights`` computes with that
    frozen fp weight (float32 [N, K]) instead of its quantized one: the student becomes the
    fp teacher without a second model in memory (the other parameters are frozen during DAD,
    so they are the teacher's). Names must match :func:`fq_modules` exactly."""
    mods = dict(fq_modules(model))
    if set(mods) != set(fp_weights):
        raise DbquantError(f"online teacher: fp weights for {sorted(set(fp_weights) - set(mods))[:3]} have no "
                           f"FakeQuantLinear, and {sorted(set(mods) - set(fp_weights))[:3]} have no fp weight")
    return _patched_forwards({n: functools.partial(_dense_forward, m, fp_weights[n]) for n, m in mods.items()},
                             mods)


@contextlib.contextmanager
def _patched_forwards(forwards: dict, mods: dict):
    try:
        for n, f in forwards.items():
            mods[n].forward = f  # an instance attribute shadows the class's forward
        yield
    finally:
        for m in mods.values():
            m.__dict__.pop("forward", None)


def _dense_forward(m: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))


def teacher_kl(logp_s: torch.Tensor, signal: dict, tau: float) -> torch.Tensor:
    """Per-token KL(p_T || p_S) at temperature ``tau`` (not yet scaled by tau^2): float32 [B, T].

    logp_s: float32 [B, T, V] student log-probabilities at ``tau``. ``signal`` holds one of:
    "logits" (float [B, T, V]: online, the exact full-vocabulary KL); "values" / "indices" /
    "weights" ([B, T, k]: sampled, the importance-weighted estimate); "values" / "indices"
    (top-k, exact over the top k and the remaining mass).
    """
    if "logits" in signal:
        logp_t = (signal["logits"].float() / tau).log_softmax(-1)
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    t_vals, t_idx = signal["values"].float(), signal["indices"].long()
    ls_k = logp_s.gather(-1, t_idx)  # [B, T, k]
    if "weights" in signal:
        return (signal["weights"] * (t_vals - ls_k)).sum(-1)
    p_t = t_vals.exp()
    tail_t = (1 - p_t.sum(-1)).clamp_min(1e-12)
    tail_s = (1 - ls_k.exp().sum(-1)).clamp_min(1e-12)
    return (p_t * (t_vals - ls_k)).sum(-1) + tail_t * (tail_t.log() - tail_s.log())


def distill_loss(student_logits: torch.Tensor, signal: dict, cfg: DADConfig,
                 targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted distillation loss of one batch for any teacher signal (:func:`teacher_kl`).

    Args:
        student_logits: float [B, T, V]; signal: the teacher's signal for these rows plus
        "entropy" (float32 [B, T], at temperature 1); targets: int64 [B, T] token ids (for the
        CE term: position t predicts targets[t + 1]).
    Returns: (loss, {"kl": mean unweighted KL, "ce": ..., "w_max": ...}).
    """
    tau = cfg.temperature
    logits = student_logits.float()
    logp_s = (logits / tau).log_softmax(-1)
    kl = teacher_kl(logp_s, signal, tau) * tau * tau
    with torch.no_grad():
        lp1 = logp_s if tau == 1 else logits.log_softmax(-1)
        h_s = -(lp1.exp() * lp1).sum(-1)
        w = WEIGHTINGS[cfg.weighting](signal["entropy"], h_s)
    loss = (w * kl).mean()
    info = {"kl": float(kl.detach().mean()), "w_max": float(w.max())}
    if cfg.ce_weight and targets is not None:
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
        loss = loss + cfg.ce_weight * ce
        info["ce"] = float(ce.detach())
    return loss, info


def dad_loss(student_logits: torch.Tensor, t_vals: torch.Tensor, t_idx: torch.Tensor, t_ent: torch.Tensor,
             cfg: DADConfig, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The top-k loss (:func:`distill_loss` with the cached top-k signal).

    The KL is exact over k + 1 outcomes: the teacher's top k tokens and "everything else"
    (both distributions' remaining mass), so it is 0 exactly when the student matches the
    teacher on the top k and on the tail's total.

    Args:
        student_logits: float [B, T, V]; t_vals / t_idx: [B, T, k] teacher top-k log-probs (at the
        temperature) and token ids; t_ent: [B, T]; targets: int64 [B, T].
    """
    return distill_loss(student_logits, {"values": t_vals, "indices": t_idx, "entropy": t_ent}, cfg, targets)


# ---------------------------------------------------------------- the stage

def distill(model: nn.Module, batches, teacher: dict, cfg: DADConfig, run: RunState,
            device="cpu", progress: bool = True) -> dict:
    """Train the FakeQuant student (all planned linears already swapped) against the teacher.

    batches: int64 [S, T] token windows, or a VLM's MultimodalSamples, whose samples run
    one at a time with gradients accumulated over the step's batch (:func:`micro_batches`;
    the ``teacher-entropy`` / ``deviation`` weights are then normalised per sample).
    teacher: for ``cfg.teacher`` topk / sample, :func:`teacher_cache`'s dict; for online,
    {"fp_weights": {name: float32 [N, K]}}, the fp weight of every FakeQuantLinear
    (:func:`fp_forward`), taken before any weight changed.

    Trains the scales of every FakeQuantLinear (and their latent weights with
    ``train="scales+weights"``); everything else stays frozen. Resumes from ``run.resumed``
    when it is a DAD checkpoint. Logs each step's tokens and training tokens/s (``tok_s``).

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
    source = _TeacherSource(model, teacher, cfg, device)
    amp = autocast_dtype(cfg.autocast, device)
    opt, base_lrs, trainable = _optimizer(model, cfg)
    net = distributed.wrap(model)  # the model itself in a single process
    step0 = _resume(run, opt, trainable, device)
    run.log({"stage": "dad", "event": "setup", "teacher": cfg.teacher,
             "autocast": "off" if amp is None else str(amp).removeprefix("torch.")})
    report = {"steps": cfg.steps, "first_kl": None, "last_kl": None, "teacher": cfg.teacher,
              "autocast": amp is not None, "tokens": 0, "train_s": 0.0}
    bar = tqdm(total=cfg.steps, initial=step0, desc=f"DAD ({cfg.weighting}, {cfg.teacher})", unit="step",
               disable=not progress, dynamic_ncols=True)
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    try:
        for step in range(step0, cfg.steps):
            t_step = time.perf_counter()
            f = cosine_factor(step, cfg.steps, cfg.warmup)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * f
            idx = distributed.local_slice(batch_indices(len(batches), cfg.batch_size, step, cfg.seed, salt=100_003))
            loss_value, info, tokens = _accumulate_step(net, batches, source, idx, cfg, device, amp)
            # every rank sees (and logs, and stops on) the global batch's numbers
            loss_value, info["kl"] = distributed.mean_over_ranks([loss_value, info["kl"]])
            check_finite(torch.tensor(loss_value), "DAD", "end-to-end", step, mods)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t_step
            report["tokens"] += tokens
            report["train_s"] += seconds
            report["first_kl"] = info["kl"] if report["first_kl"] is None else report["first_kl"]
            report["last_kl"] = info["kl"]
            bar.update(1)
            bar.set_postfix(kl=f"{info['kl']:.4g}", tok_s=f"{tokens / seconds:.0f}")
            run.log({"stage": "dad", "step": step, "loss": loss_value, **info, "lr": opt.param_groups[0]["lr"],
                     "tokens": tokens, "tok_s": round(tokens / seconds, 1)})
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
    report["tokens_per_s"] = report["tokens"] / report["train_s"] if report["train_s"] else None
    return report


class _TeacherSource:
    """The teacher's signal for a micro-batch: sliced from the cache, or the fp teacher run now (online)."""

    def __init__(self, model: nn.Module, teacher: dict, cfg: DADConfig, device):
        self.model, self.cfg, self.device = model, cfg, device
        self.online = cfg.teacher == "online"
        if self.online:
            if "fp_weights" not in teacher:
                raise DbquantError("DAD teacher 'online' needs the fp weights ({'fp_weights': ...}), not a cache")
            self.fp_weights = {n: w.to(device) for n, w in teacher["fp_weights"].items()}
        else:
            want = {"values", "indices", "entropy"} | ({"weights"} if cfg.teacher == "sample" else set())
            if not want <= set(teacher) or (cfg.teacher == "topk" and "weights" in teacher):
                raise DbquantError(f"DAD teacher {cfg.teacher!r} needs a cache with {sorted(want)}, got "
                                   f"{sorted(teacher)} (cached with another --dad-teacher?)")
            self.cache = {k: teacher[k] for k in want}

    @torch.no_grad()
    def signal(self, rows: torch.Tensor, inputs: dict) -> dict:
        """The signal of the samples ``rows`` (int64 [b]) whose model inputs are ``inputs``."""
        if not self.online:
            return {k: v[rows].to(self.device) for k, v in self.cache.items()}
        with fp_forward(self.model, self.fp_weights):
            logits = self.model(**inputs, use_cache=False).logits.float()  # fp32 teacher, outside autocast
        return {"logits": logits, "entropy": entropy(logits)}


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


def _accumulate_step(net: nn.Module, batches, source: _TeacherSource, idx: torch.Tensor, cfg: DADConfig,
                     device, amp: torch.dtype | None) -> tuple[float, dict, int]:
    """Forward and backward the samples ``idx`` (int64 [B]); gradients accumulate over micro-batches.

    The student's forward runs under autocast ``amp`` (None: fp32); the loss is fp32.
    Returns (loss, {"kl", "w_max", ...}, tokens) of this rank's slice, each micro-batch weighted
    by its share of the samples; tokens: the input tokens it trained on.
    """
    loss_value, info, tokens = 0.0, {"kl": 0.0, "w_max": 0.0}, 0
    for rows, inputs in micro_batches(batches, idx):
        j = idx[rows]
        inputs = to_device(inputs, device)
        signal = source.signal(j, inputs)
        with autocast_to(device, amp):
            logits = net(**inputs, use_cache=False).logits
        loss, part = distill_loss(logits, signal, cfg, inputs["input_ids"])
        share = len(j) / len(idx)
        (loss * share).backward()
        loss_value += float(loss.detach()) * share
        tokens += inputs["input_ids"].numel()
        info = {k: info.get(k, 0.0) + v * share for k, v in part.items()} | {
            "w_max": max(info["w_max"], part["w_max"])}
    return loss_value, info, tokens
