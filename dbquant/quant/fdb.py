"""Flexible Dual Binarization (FDB) math, generalised to k bit planes: no I/O, no modules.

A weight group of g input channels is written as k {0,1} planes with their own scales,
``w_hat = sum_i alpha_i * b_i`` (optionally ``+ beta``); k = 2 is DB-LLM's dual binarization,
``alpha1 * b1 + alpha2 * b2``. The level set is every subset sum of the alphas (2^k levels,
indexed by the code ``sum_i b_i << (k - 1 - i)``); code 0 is exactly 0 without an offset, which
keeps the planes sparse.

Shapes used throughout: a weight W [N, K] is padded to Kp = G * g channels and viewed
as groups [N, G, g]; scales ``alpha`` are [N, G, k]; ``offset`` is [N, G] or None; planes
are uint8 {0,1}, stacked plane-first ([k, N, G, g] grouped, [k, N, Kp] flat). ``importance``
is a per-input-channel weight [K] (e.g. E[x^2] from calibration data) for the error being
minimised. Every k = 2 computation performs the float operations of the dual-binary original
in the same order, so k = 2 results are bit for bit those of format version 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.layout import (
    FLOAT_SCALE_BITS,
    LinearLayout,
    check_group_size,
    check_planes,
    check_scale_bits,
    dequantize,
    storable_scales,
)


@dataclass
class DualBinaryWeight:
    """A quantized weight before packing (k planes; the name is kept from k = 2).

    Attributes:
        planes: uint8 [k, N, Kp] bit planes (padded channels are 0).
        alpha: float32 [N, G, k] scales, already representable at ``scale_bits`` (float16, or int8
            codes with a float16 row maximum: ``dbquant.format.layout.storable_scales``).
        offset: float32 [N, G] or None (representable in float16).
        in_features: K (the unpadded width).
        scale_bits: 16 or 8, the width the scales are stored at.
    """

    planes: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    in_features: int
    scale_bits: int = FLOAT_SCALE_BITS

    @property
    def b1(self) -> torch.Tensor:
        return self.planes[0]

    @property
    def b2(self) -> torch.Tensor:
        return self.planes[1]

    @property
    def layout(self) -> LinearLayout:
        k, n, kp = self.planes.shape
        return LinearLayout(n, self.in_features, kp // self.alpha.shape[1], self.offset is not None, k,
                            self.scale_bits)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        return dequantize(self.planes, self.alpha, self.offset, self.in_features)


# ---------------------------------------------------------------- grouping helpers

def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """float [N, K] -> float32 [N, G, g], zero-padded at the end of K.

    Without padding a contiguous float32 ``w`` comes back as a view (no copy: calibration groups
    every latent weight on every step), so callers read the groups and never write into them.
    """
    n, k = w.shape
    g = LinearLayout(n, k, group_size).groups
    if g * group_size == k and w.dtype == torch.float32 and w.is_contiguous():
        return w.view(n, g, group_size)
    wp = torch.zeros(n, g * group_size, dtype=torch.float32, device=w.device)
    wp[:, :k] = w
    return wp.view(n, g, group_size)


def group_importance(importance: torch.Tensor | None, in_features: int, group_size: int,
                     device=None) -> torch.Tensor:
    """Per-channel weights [K] (or None = uniform) -> float32 [G, g], 0 on padded channels."""
    h = torch.ones(in_features, device=device) if importance is None else importance.float().to(device)
    if h.shape != (in_features,):
        raise ValueError(f"importance must have shape [{in_features}], got {tuple(h.shape)}")
    return to_groups(h.unsqueeze(0), group_size)[0]


# ---------------------------------------------------------------- levels and bits

def levels(alpha: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The 2^k levels of each group, indexed by the code ``sum_i b_i << (k - 1 - i)``.

    Args:
        alpha: float [..., k]; offset: float [...] or None.
    Returns:
        float [..., 2^k]; k = 2: (0, alpha2, alpha1, alpha1 + alpha2) (+ offset).
    """
    k = alpha.shape[-1]
    cols = []
    for c in range(2 ** k):
        lv = None  # subset sum in plane order, no "0 +" (k = 2: exactly 0, a2, a1, a1 + a2)
        for i in range(k):
            if c >> (k - 1 - i) & 1:
                lv = alpha[..., i] if lv is None else lv + alpha[..., i]
        cols.append(torch.zeros_like(alpha[..., 0]) if lv is None else lv)
    lv = torch.stack(cols, dim=-1)
    return lv if offset is None else lv + offset.unsqueeze(-1)


def code_bits(code: torch.Tensor, k: int) -> torch.Tensor:
    """Codes (any int tensor) -> uint8 planes [k, *code.shape]; plane 0 is the code's MSB."""
    return torch.stack([((code >> (k - 1 - i)) & 1).to(torch.uint8) for i in range(k)])


def assign_bits(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Exact nearest-level bits for any alphas (ties go to the higher level).

    The levels are sorted per group; a weight's rank among the 2^k - 1 midpoints is its
    nearest sorted level, which maps back to a code. 2^k - 1 comparisons per weight instead
    of 2^k distances and an argmin.

    Args:
        wg: float32 [N, G, g]; alpha: float [N, G, k]; offset: float [N, G] or None.
    Returns:
        planes: uint8 [k, N, G, g].
    """
    return code_bits(nearest_code(wg, alpha, offset)[1], alpha.shape[-1])


def nearest_code(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels and each weight's nearest-level code (ties go to the higher level).

    Args:
        wg: float32 [N, G, g]; alpha: float [N, G, k]; offset: float [N, G] or None.
    Returns:
        (levels float32 [N, G, 2^k] as :func:`levels` orders them, codes int64 [N, G, g]).
    """
    lv = levels(alpha.float(), None if offset is None else offset.float())
    sorted_lv, order = lv.sort(dim=-1)
    mids = (sorted_lv[..., 1:] + sorted_lv[..., :-1]) * 0.5  # [N, G, 2^k - 1]
    # One comparison pass per midpoint into a uint8 count: no [N, G, g, 2^k - 1] intermediate
    # (that broadcast was most of a fake-quant forward's time and memory).
    rank = (wg >= mids[..., 0:1]).to(torch.uint8)
    for j in range(1, mids.shape[-1]):
        rank += wg >= mids[..., j:j + 1]
    return lv, order.gather(-1, rank.long())  # rank in 0..2^k - 1 -> code


class _FakeQuant(torch.autograd.Function):
    """w_hat = levels[code] with code the nearest level's, fixed within the step (see :func:`fake_quant`)."""

    @staticmethod
    def forward(ctx, wg, alpha, offset):
        lv, code = nearest_code(wg.detach(), alpha.detach(), None if offset is None else offset.detach())
        ctx.save_for_backward(code.to(torch.uint8))
        ctx.k = alpha.shape[-1]
        return lv.gather(-1, code)

    @staticmethod
    def backward(ctx, grad):
        (code,) = ctx.saved_tensors
        k = ctx.k
        grad_alpha = grad_offset = None
        if ctx.needs_input_grad[1]:  # d w_hat / d alpha_i = b_i
            grad_alpha = torch.stack([(grad * ((code >> (k - 1 - i)) & 1)).sum(-1) for i in range(k)], dim=-1)
        if ctx.needs_input_grad[2]:  # d w_hat / d beta = 1
            grad_offset = grad.sum(-1)
        return grad if ctx.needs_input_grad[0] else None, grad_alpha, grad_offset  # straight-through for w


def fake_quant(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The training-time quantized weight: float32 [N, G, g], differentiable.

    Forward: each weight's nearest level under the current scales, bit for bit
    ``reconstruct(assign_bits(wg, alpha, offset), alpha, offset)``. Backward: the bits are held
    fixed, so d/d alpha_i is the sum of the gradient over the weights whose plane i is set, d/d
    beta the sum over the group, and the latent weight gets the gradient unchanged (the
    straight-through estimator). One fused step instead of bits, floats and an STE add: it
    saves one uint8 code per weight for backward instead of k planes, and was most of a
    calibration step's time when written with those.

    Args:
        wg: float32 [N, G, g] latent weights; alpha: float32 [N, G, k]; offset: float32 [N, G] or None.
    """
    return _FakeQuant.apply(wg, alpha, offset)


def paper_bits(wg: torch.Tensor, alpha: torch.Tensor):
    """DB-LLM's closed-form bits (k = 2), valid while ``alpha1 > -alpha2 > 0``.

    ``b1 = H(w - (alpha1 + alpha2) / 2)``, ``b2 = H(-(w - alpha1 * b1 - alpha2 / 2))``,
    H(0) = 1. Kept as the published reference; :func:`assign_bits` is the general form.
    """
    a1, a2 = alpha[..., 0:1], alpha[..., 1:2]
    b1 = (wg - (a1 + a2) / 2 >= 0).to(torch.uint8)
    b2 = (-(wg - a1 * b1 - a2 / 2) >= 0).to(torch.uint8)
    return b1, b2


def reconstruct(planes, alpha, offset=None) -> torch.Tensor:
    """Grouped planes uint8 [k, N, G, g] -> float32 [N, G, g] weights (summed plane by plane)."""
    w = alpha[..., 0:1].float() * planes[0]
    for i in range(1, planes.shape[0]):
        w = w + alpha[..., i:i + 1].float() * planes[i]
    return w if offset is None else w + offset.float().unsqueeze(-1)


def group_error(wg, planes, alpha, offset, h) -> torch.Tensor:
    """Importance-weighted squared error per group: float32 [N, G]."""
    return ((wg - reconstruct(planes, alpha, offset)).square() * h).sum(-1)


# ---------------------------------------------------------------- initialisation

def paper_init(step: torch.Tensor) -> torch.Tensor:
    """DB-LLM init from a 2-bit uniform step s: alpha1 = 2s, alpha2 = -s (levels {-s, 0, s, 2s}).

    Args: step float [N, G]. Returns: float32 [N, G, 2].
    """
    return torch.stack([2 * step, -step], dim=-1).float()


def grid_init(step: torch.Tensor, k: int) -> torch.Tensor:
    """Scales whose levels are the integer grid s * {-(2^(k-1) - 1) .. 2^(k-1)} (0 at code 0).

    Negated two's complement: alpha = (2^(k-1) s, -2^(k-2) s, ..., -s); k = 2 is
    :func:`paper_init`, k = 1 is (s,) (levels {0, s}). Its negation is the mirror grid.
    Args: step float [N, G]. Returns: float32 [N, G, k].
    """
    if k == 2:
        return paper_init(step)
    cols = [2 ** (k - 1) * step] + [-(2 ** (k - 2 - i)) * step for i in range(k - 1)]
    return torch.stack(cols, dim=-1).float()


def search_scales(wg: torch.Tensor, h: torch.Tensor, grid: int = 20, k: int = 2):
    """Per-group step search over the zero-including integer grids of k planes and their mirrors.

    Levels are ``s * {lo..hi}`` with (lo, hi) = (-(2^(k-1) - 1), 2^(k-1)) ({-s, 0, s, 2s} at
    k = 2) or its mirror (-2^(k-1), 2^(k-1) - 1), which serves groups whose mass leans
    negative. Candidate steps are ``c * max|w| * 2 / 2^(k-1)`` for ``grid`` values of c in
    [0.15, 1.0] (k = 2: ``c * max|w|``). Keeps the candidate with the lowest importance-weighted
    error. On these uniform grids nearest-level rounding is ``s * clamp(floor(w / s + 1/2), lo, hi)``,
    which is what makes the search cheap (the general :func:`assign_bits` is not needed).

    Args:
        wg: float32 [N, G, g]; h: float32 [G, g] importance; k: planes.
    Returns:
        alpha float32 [N, G, k], err float32 [N, G].
    """
    amax = wg.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # [N, G, 1]
    half = 2.0 ** (k - 1)
    if k != 2:
        amax = amax * (2.0 / half)  # same spread of the step range relative to the grid's top level
    best_alpha = grid_init(amax[..., 0] * 0.5, k)
    best_err = torch.full_like(amax[..., 0], float("inf"))
    for c in torch.linspace(0.15, 1.0, grid).tolist():
        step = amax * c
        r = torch.floor(wg / step + 0.5)
        for sign, lo, hi in ((1.0, 1.0 - half, half), (-1.0, -half, half - 1.0)):
            err = ((wg - step * r.clamp(lo, hi)).square() * h).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better.unsqueeze(-1), grid_init(step[..., 0], k) * sign, best_alpha)
    return best_alpha, best_err


def rtn_init(wg: torch.Tensor, valid: torch.Tensor, k: int = 2):
    """Classic asymmetric min/max k-bit grid: levels beta + s * {0, 1, .., 2^k - 1}.

    As k planes: alpha_i = 2^(k-1-i) s, beta = min (k = 2: alpha1 = 2s, alpha2 = s).
    Args: wg float32 [N, G, g]; valid bool [G, g] (False on padded channels).
    Returns alpha float32 [N, G, k], offset float32 [N, G].
    """
    lo = wg.masked_fill(~valid, float("inf")).amin(-1)
    hi = wg.masked_fill(~valid, float("-inf")).amax(-1)
    step = (hi - lo) / (2 ** k - 1)
    return torch.stack([2 ** (k - 1 - i) * step if i < k - 1 else step for i in range(k)], dim=-1), lo


# ---------------------------------------------------------------- refinement

def solve_scales(wg, planes, h, with_offset: bool):
    """Weighted least-squares scales given bits: argmin sum h (w - sum_i a_i b_i [- beta])^2.

    Solves the k x k ((k+1) x (k+1) with offset) normal equations of every group at once; a
    tiny ridge keeps degenerate groups (an empty or duplicated plane) finite — the caller
    accepts a solution only where it lowers the error.

    Returns:
        alpha float32 [N, G, k], offset float32 [N, G] or None.
    """
    k = planes.shape[0]
    cols = [planes[i].float() for i in range(k)]
    if with_offset:
        cols.append(torch.ones_like(wg))
    x = torch.stack(cols, dim=-1)  # [N, G, g, p]
    xh = x * h.unsqueeze(-1)
    ata = xh.transpose(-1, -2) @ x  # [N, G, p, p]
    atb = (xh * wg.unsqueeze(-1)).sum(-2)  # [N, G, p]
    p = ata.shape[-1]
    ridge = 1e-6 * ata.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12) / p
    ata = ata + ridge[..., None, None] * torch.eye(p, device=wg.device)
    sol = torch.linalg.solve_ex(ata, atb.unsqueeze(-1))[0].squeeze(-1)
    sol = torch.nan_to_num(sol, nan=0.0, posinf=0.0, neginf=0.0)
    return sol[..., :k], (sol[..., k] if with_offset else None)


def to_storable(x: torch.Tensor | None, scale_bits: int = FLOAT_SCALE_BITS) -> torch.Tensor | None:
    """Round scales (or an offset, always float16) to what the format stores, back in float32, so
    bits fit the stored scales."""
    return None if x is None else storable_scales(x, scale_bits)


def refine(wg, h, alpha, offset=None, iters: int = 8):
    """Alternate exact bits given scales and least-squares scales given bits.

    Each step is an exact minimiser of the other's variables, and a new solution is
    kept only where it lowers a group's error, so the error never increases.

    Args:
        wg: float32 [N, G, g]; h: float32 [G, g]; alpha: float32 [N, G, k]; offset: [N, G] or None.
    Returns:
        (planes, alpha, offset, err) with planes uint8 [k, N, G, g] and err float32 [N, G].
    """
    planes = assign_bits(wg, alpha, offset)
    err = group_error(wg, planes, alpha, offset, h)
    for _ in range(iters):
        new_alpha, new_offset = solve_scales(wg, planes, h, offset is not None)
        new_alpha, new_offset = to_storable(new_alpha), to_storable(new_offset)
        new_planes = assign_bits(wg, new_alpha, new_offset)
        new_err = group_error(wg, new_planes, new_alpha, new_offset, h)
        better = new_err < err
        if not bool(better.any()):
            break
        m = better.unsqueeze(-1)
        alpha = torch.where(m, new_alpha, alpha)
        if offset is not None:
            offset = torch.where(better, new_offset, offset)
        planes = torch.where(m, new_planes, planes)
        err = torch.where(better, new_err, err)
    return planes, alpha, offset, err


# ---------------------------------------------------------------- entry points

def finalize(wg, alpha, offset, in_features, scale_bits: int = FLOAT_SCALE_BITS) -> DualBinaryWeight:
    """Round scales to their stored precision (``scale_bits``), reassign bits against them, clear padding."""
    alpha, offset = to_storable(alpha, check_scale_bits(scale_bits)), to_storable(offset)
    planes = assign_bits(wg, alpha, offset)
    n, g, gs = wg.shape
    pad = (torch.arange(g * gs, device=wg.device) >= in_features).view(g, gs)
    planes = planes.masked_fill(pad, 0)
    return DualBinaryWeight(planes.reshape(planes.shape[0], n, g * gs), alpha, offset, in_features, scale_bits)


@torch.no_grad()
def quantize_fdb(w: torch.Tensor, group_size: int = 64, importance: torch.Tensor | None = None,
                 offset: bool = False, iters: int = 8, grid: int = 20, planes: int = 2,
                 scale_bits: int = FLOAT_SCALE_BITS) -> DualBinaryWeight:
    """FDB-quantize one weight: scale search (or RTN start with an offset), then refinement.

    Args:
        w: float [N, K] weight.
        group_size: g, a multiple of 8 (K need not be a multiple of g).
        importance: float [K] per-input-channel error weight, or None for plain MSE.
        offset: also learn a per-group offset beta (costs 16 bits per group).
        iters: refinement iterations (0 = the searched init only).
        grid: number of candidate steps per orientation in the scale search.
        planes: k, the number of bit planes (1..4; 2 = dual binary).
        scale_bits: the stored width of the scales (16, or 8: rounded to it after refinement).
    """
    check_group_size(group_size)
    check_planes(planes)
    wg = to_groups(w, group_size)
    h = group_importance(importance, w.shape[1], group_size, w.device)
    if offset:
        alpha, beta = rtn_init(wg, group_importance(None, w.shape[1], group_size, w.device) > 0, planes)
    else:
        alpha, beta = search_scales(wg, h, grid, planes)[0], None
    alpha, beta = to_storable(alpha), to_storable(beta)
    if iters:
        _, alpha, beta, _ = refine(wg, h, alpha, beta, iters)
    return finalize(wg, alpha, beta, w.shape[1], scale_bits)


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, group_size: int = 64, planes: int = 2,
                 scale_bits: int = FLOAT_SCALE_BITS) -> DualBinaryWeight:
    """Plain k-bit round-to-nearest on the asymmetric min/max grid (the ablation's baseline).

    Stored in the k-plane format with an offset (k = 2: alpha1 = 2s, alpha2 = s, beta = min).
    """
    check_group_size(group_size)
    check_planes(planes)
    wg = to_groups(w, group_size)
    alpha, beta = rtn_init(wg, group_importance(None, w.shape[1], group_size, w.device) > 0, planes)
    return finalize(wg, alpha, beta, w.shape[1], scale_bits)
