"""``--target-bpw``: measure each linear's sensitivity and choose its (k, group size) under a budget.

For every planned linear and every candidate layout (k planes in ``--alloc-planes``, group size
in ``GROUPS``; k = 1 always with an offset, the scaled binary of the issue), the weight is
FDB-quantized (activation-weighted, a short refinement) and the error it leaves is scored:

- ``fisher`` (default): sum F * (W - W_q)^2 with F the empirical Fisher diagonal, the mean
  over calibration windows of (dLoss/dW)^2 of the full-precision model under next-token cross
  entropy: a second-order estimate of the *loss* increase, comparable across layers.
- ``kfac``: sum_n G_n * d_n^T C d_n with d_n = W_n - W_q,n a row's error, G_n = E[(dLoss/dy_n)^2]
  the per-token output-gradient second moment and C = E[x x^T] the input second-moment matrix (the
  Kronecker-factored Fisher, its output factor kept diagonal): the loss increase with the input
  channels' correlations, which the diagonal Fisher drops; both factors from one forward and
  backward pass per window.
- ``output``: sum E[x^2] * (W - W_q)^2, the layer's own output error (diagonal of X^T X),
  not comparable across layers (a layer's output scale is not its effect on the loss).
- ``weight``: plain sum (W - W_q)^2 (no calibration data).

:func:`dbquant.quant.allocate.allocate` then picks one layout per linear so the average bits
per weight over the quantized linears, every scale counted at its stored width, is <= the target.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import DbquantError
from ..format.layout import LinearLayout
from ..model.plan import LinearPlan
from ..quant import fdb
from ..quant.allocate import allocate
from .stats import input_second_moments

PLANES = (1, 2, 3, 4)
# --alloc-planes auto: k = 1 only where the target needs it. A k = 1 layer loses more to calibration's
# end than its init error says: after the `fast` preset at 2.5 bpw, choosing among k = 2..4 gave wiki PPL
# 42.00 against 43.76 with k = 1 allowed (uniform k = 2: 46.99; docs/RESULTS.md, issue 15 rows).
AUTO_PLANES = (2, 3, 4)
GROUPS = (32, 64, 128)
SENSITIVITIES = ("fisher", "kfac", "output", "weight")


def candidates(lay: LinearLayout, offset: bool, planes: tuple[int, ...] = PLANES) -> list[LinearLayout]:
    """Every layout ``--target-bpw`` may choose for a linear: k in ``planes`` x g in GROUPS (k = 1 with
    an offset; k >= 2 with ``offset`` as the user asked)."""
    return [LinearLayout(lay.out_features, lay.in_features, g, offset or k == 1, k, lay.scale_bits)
            for k in planes for g in GROUPS]


def parse_planes(spec: str) -> tuple[int, ...] | None:
    """``--alloc-planes``: ``auto`` (None) or a comma list of plane counts in 1..4, sorted."""
    if spec == "auto":
        return None
    try:
        planes = tuple(sorted({int(x) for x in spec.split(",")}))
    except ValueError:
        planes = ()
    if not planes or not set(planes) <= set(PLANES):
        raise DbquantError(f"--alloc-planes {spec!r}: give auto or a comma list of plane counts in {PLANES}")
    return planes


def resolve_planes(spec: str, plan: list[LinearPlan], target_bpw: float, offset: bool) -> tuple[int, ...]:
    """The plane counts the allocation chooses among: ``spec`` as given, or for ``auto`` AUTO_PLANES when
    their cheapest layouts fit ``target_bpw`` (2.25 bpw at g128 without offsets), else every k in PLANES."""
    planes = parse_planes(spec)
    if planes is not None:
        return planes
    weights = sum(p.layout.out_features * p.layout.in_features for p in plan)
    cheapest = sum(min(lay.storage_bits() for lay in candidates(p.layout, offset, AUTO_PLANES)) for p in plan)
    return AUTO_PLANES if cheapest <= int(target_bpw * weights) else PLANES


def _window_grads(model: nn.Module, weights: list[torch.Tensor], batches: torch.Tensor, desc: str, progress: bool):
    """Yield, window by window of int64 [S, T] ``batches``, the gradients of the window's next-token cross
    entropy with respect to ``weights``. Only they require grad meanwhile (less memory and time); every
    parameter's flag is restored when the loop ends."""
    keep = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in keep:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    dev = next(model.parameters()).device
    try:
        for i in tqdm(range(len(batches)), desc=desc, disable=not progress):
            ids = batches[i:i + 1].to(dev)
            logits = model(ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            yield torch.autograd.grad(loss, weights)
    finally:
        for p, k in keep:
            p.requires_grad_(k)


def fisher_diagonal(model: nn.Module, names: list[str], batches: torch.Tensor,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of each named linear's weight: mean over windows of grad^2.

    Args:
        batches: int64 [S, T] token windows; one backward pass per window (next-token CE).
    Returns:
        ``{name: float32 [N, K]}``.
    """
    weights = [model.get_submodule(n).weight for n in names]
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for grads in _window_grads(model, weights, batches, "fisher", progress):
        for f, g in zip(fisher, grads):
            f += g.float().square()
    return {n: f / len(batches) for n, f in zip(names, fisher)}


def kfac_factors(model: nn.Module, names: list[str], batches: torch.Tensor,
                 progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Kronecker factors of each named linear's Fisher: the output gradient's and the input's second moments.

    Args:
        batches: int64 [S, T] token windows; one forward and backward pass per window (next-token CE).
    Returns:
        ``{name: (G float32 [N], C float32 [K, K])}``: G_n = mean over tokens of (dLoss/dy_n)^2,
        C = mean over tokens of x x^T.
    """
    mods = {n: model.get_submodule(n) for n in names}
    grad2 = {n: torch.zeros(m.out_features) for n, m in mods.items()}
    cov = {n: torch.zeros(m.in_features, m.in_features) for n, m in mods.items()}

    def hook(name):
        def fn(_mod, inp, out):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            cov[name] += (x.T @ x).cpu()

            def on_grad(g):  # dLoss/dy for every token of the window
                grad2[name] += g.detach().float().reshape(-1, g.shape[-1]).square().sum(0).cpu()
            out.register_hook(on_grad)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        # the weights' own gradients are dropped: requiring them puts every linear's output on the graph
        for _ in _window_grads(model, [m.weight for m in mods.values()], batches, "k-fac", progress):
            pass
    finally:
        for h in handles:
            h.remove()
    return {n: (grad2[n] / batches.numel(), cov[n] / batches.numel()) for n in names}


SAMPLE_ROWS = 64  # output rows quantized per option: rows quantize independently, so a sample estimates the sum


@torch.no_grad()
def option_errors(w: torch.Tensor, layouts: list[LinearLayout], importance: torch.Tensor | None,
                  score: torch.Tensor | None, rows: int = SAMPLE_ROWS, cov: torch.Tensor | None = None) -> list[float]:
    """Scored error of each layout for weight ``w`` float32 [N, K], estimated on ``rows`` evenly
    spaced output rows and scaled by N / rows (12 layouts x every linear of a model at full size
    would take hours on a small CPU; the sample's estimate is unbiased over rows).

    importance: float32 [K] E[x^2] (weights the FDB fit, as the init does) or None;
    score: float32 [N, K] or [K] per-weight factor of the squared error (None: 1); with ``cov``, float32 [N]
    a per-row factor; cov: float32 [K, K] or None: a row's error d is scored d^T cov d instead of sum d^2.
    """
    n = w.shape[0]
    idx = torch.linspace(0, n - 1, min(n, rows)).round().long().unique()
    ws = w[idx]
    sc = None if score is None else score[idx] if score.dim() == 2 or cov is not None else score
    out = []
    for lay in layouts:
        q = fdb.quantize_fdb(ws, lay.group_size, importance, lay.offset, iters=2, grid=8, planes=lay.planes,
                             scale_bits=lay.scale_bits)
        d = ws - q.dequantize()
        if cov is not None:
            row = ((d @ cov) * d).sum(1)
            out.append(float(row.sum() if sc is None else (row * sc).sum()) * n / len(idx))
            continue
        d2 = d.square()
        out.append(float((d2 if sc is None else d2 * sc).sum()) * n / len(idx))
    return out


def allocate_plan(model: nn.Module, plan: list[LinearPlan], target_bpw: float, sensitivity: str,
                  batches: torch.Tensor | None, offset: bool = False,
                  progress: bool = True, planes: str = "auto") -> tuple[list[LinearPlan], dict]:
    """The plan with each linear's layout chosen so the average bits per weight is <= ``target_bpw``.

    Args:
        batches: int64 [S, T] calibration windows (None only with ``sensitivity="weight"``).
        planes: ``--alloc-planes``, the plane counts to choose among (:func:`resolve_planes`).
    Returns:
        (new plan, report) where the report holds the achieved bpw, the sensitivity used, the
        plane counts allowed, the chosen (k, g) counts and the time taken.
    """
    if sensitivity not in SENSITIVITIES:
        raise DbquantError(f"unknown sensitivity {sensitivity!r}; choose from {SENSITIVITIES}")
    if batches is None and sensitivity != "weight":
        raise DbquantError(f"--sensitivity {sensitivity} needs calibration text (--calib); with --calib none "
                           "use --sensitivity weight")
    t0 = time.perf_counter()
    allowed = resolve_planes(planes, plan, target_bpw, offset)
    names = [p.name for p in plan]
    imp = input_second_moments(model, names, batches, progress=progress) if batches is not None else {}
    fisher = fisher_diagonal(model, names, batches, progress) if sensitivity == "fisher" else {}
    kfac = kfac_factors(model, names, batches, progress) if sensitivity == "kfac" else {}
    costs, errors, options = [], [], []
    threads = torch.get_num_threads()
    # The per-option tensors are small (SAMPLE_ROWS rows): intra-op threads cost more than they save
    # (measured 0.5 s vs 3.8 s per 1536 x 576 linear on a loaded 2-core VM).
    torch.set_num_threads(1)
    try:
        for p in tqdm(plan, desc="sensitivity", disable=not progress):
            lays = candidates(p.layout, offset, allowed)
            w = model.get_submodule(p.name).weight.detach().float()
            score = {"fisher": fisher.pop(p.name, None), "output": imp.get(p.name)}.get(sensitivity)
            cov = None
            if sensitivity == "kfac":
                score, cov = kfac.pop(p.name)
            errors.append(option_errors(w, lays, imp.get(p.name), score, cov=cov))
            costs.append([lay.storage_bits() for lay in lays])
            options.append(lays)
    finally:
        torch.set_num_threads(threads)
    weights = sum(p.layout.out_features * p.layout.in_features for p in plan)
    choice = allocate(costs, errors, int(target_bpw * weights))
    new = [replace(p, layout=options[i][o]) for i, (p, o) in enumerate(zip(plan, choice.picks))]
    counts: dict[str, int] = {}
    for p in new:
        key = f"k{p.layout.planes}g{p.layout.group_size}"
        counts[key] = counts.get(key, 0) + 1
    return new, {"target_bpw": target_bpw, "bpw": choice.bits / weights, "sensitivity": sensitivity,
                 "planes": list(allowed),
                 "layouts": dict(sorted(counts.items())), "seconds": time.perf_counter() - t0}
