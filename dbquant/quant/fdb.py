"""Flexible Dual Binarization (FDB) math: no I/O, no modules.

A weight group of g input channels is written as two {0,1} planes with their own
scales, ``w_hat = alpha1 * b1 + alpha2 * b2`` (optionally ``+ beta``). Its level set is
``{0, alpha2, alpha1, alpha1 + alpha2}`` (+ beta): one level is exactly 0 without an
offset, which keeps the planes sparse.

Shapes used throughout: a weight W [N, K] is padded to Kp = G * g channels and viewed
as groups [N, G, g]; scales ``alpha`` are [N, G, 2] (alpha1, alpha2); ``offset`` is
[N, G] or None; planes are uint8 {0,1}. ``importance`` is a per-input-channel weight
[K] (e.g. E[x^2] from calibration data) for the error being minimised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.layout import SCALE_DTYPE, LinearLayout, check_group_size, dequantize


@dataclass
class DualBinaryWeight:
    """A quantized weight before packing.

    Attributes:
        b1, b2: uint8 [N, Kp] bit planes (padded channels are 0).
        alpha: float32 [N, G, 2] scales (alpha1, alpha2), already representable in float16.
        offset: float32 [N, G] or None.
        in_features: K (the unpadded width).
    """

    b1: torch.Tensor
    b2: torch.Tensor
    alpha: torch.Tensor
    offset: torch.Tensor | None
    in_features: int

    @property
    def layout(self) -> LinearLayout:
        n, kp = self.b1.shape
        return LinearLayout(n, self.in_features, kp // self.alpha.shape[1], self.offset is not None)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        return dequantize(self.b1, self.b2, self.alpha, self.offset, self.in_features)


# ---------------------------------------------------------------- grouping helpers

def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """float [N, K] -> float32 [N, G, g], zero-padded at the end of K."""
    n, k = w.shape
    g = LinearLayout(n, k, group_size).groups
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
    """The four levels of each group, indexed by the code ``2 * b1 + b2``.

    Args:
        alpha: float [..., 2]; offset: float [...] or None.
    Returns:
        float [..., 4] = (0, alpha2, alpha1, alpha1 + alpha2) (+ offset).
    """
    a1, a2 = alpha[..., 0], alpha[..., 1]
    lv = torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], dim=-1)
    return lv if offset is None else lv + offset.unsqueeze(-1)


def assign_bits(wg: torch.Tensor, alpha: torch.Tensor, offset: torch.Tensor | None = None):
    """Exact nearest-level bits for any alphas (ties go to the higher level).

    The levels are sorted per group; a weight's rank among the three midpoints is
    its nearest sorted level, which maps back to a code ``2 * b1 + b2``. Three
    comparisons per weight instead of four distances and an argmin.

    Args:
        wg: float32 [N, G, g]; alpha: float [N, G, 2]; offset: float [N, G] or None.
    Returns:
        (b1, b2): uint8 [N, G, g] each.
    """
    lv = levels(alpha.float(), None if offset is None else offset.float())
    sorted_lv, order = lv.sort(dim=-1)
    mids = (sorted_lv[..., 1:] + sorted_lv[..., :-1]) * 0.5  # [N, G, 3]
    rank = (wg.unsqueeze(-1) >= mids.unsqueeze(-2)).sum(-1)  # [N, G, g] in 0..3
    code = order.gather(-1, rank)
    return (code >> 1).to(torch.uint8), (code & 1).to(torch.uint8)


def paper_bits(wg: torch.Tensor, alpha: torch.Tensor):
    """DB-LLM's closed-form bits, valid while ``alpha1 > -alpha2 > 0``.

    ``b1 = H(w - (alpha1 + alpha2) / 2)``, ``b2 = H(-(w - alpha1 * b1 - alpha2 / 2))``,
    H(0) = 1. Kept as the published reference; :func:`assign_bits` is the general form.
    """
    a1, a2 = alpha[..., 0:1], alpha[..., 1:2]
    b1 = (wg - (a1 + a2) / 2 >= 0).to(torch.uint8)
    b2 = (-(wg - a1 * b1 - a2 / 2) >= 0).to(torch.uint8)
    return b1, b2


def reconstruct(b1, b2, alpha, offset=None) -> torch.Tensor:
    """Grouped planes uint8 [N, G, g] -> float32 [N, G, g] weights."""
    w = alpha[..., 0:1].float() * b1 + alpha[..., 1:2].float() * b2
    return w if offset is None else w + offset.float().unsqueeze(-1)


def group_error(wg, b1, b2, alpha, offset, h) -> torch.Tensor:
    """Importance-weighted squared error per group: float32 [N, G]."""
    return ((wg - reconstruct(b1, b2, alpha, offset)).square() * h).sum(-1)


# ---------------------------------------------------------------- initialisation

def paper_init(step: torch.Tensor) -> torch.Tensor:
    """DB-LLM init from a 2-bit uniform step s: alpha1 = 2s, alpha2 = -s (levels {-s, 0, s, 2s}).

    Args: step float [N, G]. Returns: float32 [N, G, 2].
    """
    return torch.stack([2 * step, -step], dim=-1).float()


def search_scales(wg: torch.Tensor, h: torch.Tensor, grid: int = 20):
    """Per-group step search over the zero-including grids {-s, 0, s, 2s} and its mirror.

    Candidate steps are ``c * max|w|`` for ``grid`` values of c in [0.15, 1.0]; the mirror
    (alpha1 = -2s, alpha2 = s: levels {-2s, -s, 0, s}) serves groups whose mass leans
    negative. Keeps the candidate with the lowest importance-weighted error. On these
    uniform grids nearest-level rounding is ``s * clamp(floor(w / s + 1/2), lo, hi)``,
    which is what makes the search cheap (the general :func:`assign_bits` is not needed).

    Args:
        wg: float32 [N, G, g]; h: float32 [G, g] importance.
    Returns:
        alpha float32 [N, G, 2], err float32 [N, G].
    """
    amax = wg.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # [N, G, 1]
    best_alpha = paper_init(amax[..., 0] * 0.5)
    best_err = torch.full_like(amax[..., 0], float("inf"))
    for c in torch.linspace(0.15, 1.0, grid).tolist():
        step = amax * c
        r = torch.floor(wg / step + 0.5)
        for sign, lo, hi in ((1.0, -1.0, 2.0), (-1.0, -2.0, 1.0)):
            err = ((wg - step * r.clamp(lo, hi)).square() * h).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better.unsqueeze(-1), paper_init(step[..., 0]) * sign, best_alpha)
    return best_alpha, best_err


def rtn_init(wg: torch.Tensor, valid: torch.Tensor):
    """Classic asymmetric min/max 2-bit grid: levels beta + s * {0, 1, 2, 3}.

    As dual binary: alpha1 = 2s, alpha2 = s, beta = min (code q = 2*b1 + b2).
    Args: wg float32 [N, G, g]; valid bool [G, g] (False on padded channels).
    Returns alpha float32 [N, G, 2], offset float32 [N, G].
    """
    lo = wg.masked_fill(~valid, float("inf")).amin(-1)
    hi = wg.masked_fill(~valid, float("-inf")).amax(-1)
    step = (hi - lo) / 3
    return torch.stack([2 * step, step], dim=-1), lo


# ---------------------------------------------------------------- refinement

def solve_scales(wg, b1, b2, h, with_offset: bool):
    """Weighted least-squares scales given bits: argmin sum h (w - a1 b1 - a2 b2 [- beta])^2.

    Solves the 2x2 (3x3 with offset) normal equations of every group at once; a tiny
    ridge keeps degenerate groups (an empty or duplicated plane) finite — the caller
    accepts a solution only where it lowers the error.

    Returns:
        alpha float32 [N, G, 2], offset float32 [N, G] or None.
    """
    cols = [b1.float(), b2.float()]
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
    return sol[..., :2], (sol[..., 2] if with_offset else None)


def to_storable(x: torch.Tensor | None) -> torch.Tensor | None:
    """Round to what the format stores (float16), back in float32, so bits fit the stored scales."""
    if x is None:
        return None
    fmax = torch.finfo(SCALE_DTYPE).max
    return x.clamp(-fmax, fmax).to(SCALE_DTYPE).float()


def refine(wg, h, alpha, offset=None, iters: int = 8):
    """Alternate exact bits given scales and least-squares scales given bits.

    Each step is an exact minimiser of the other's variables, and a new solution is
    kept only where it lowers a group's error, so the error never increases.

    Args:
        wg: float32 [N, G, g]; h: float32 [G, g]; alpha: float32 [N, G, 2]; offset: [N, G] or None.
    Returns:
        (b1, b2, alpha, offset, err) with bits uint8 [N, G, g] and err float32 [N, G].
    """
    b1, b2 = assign_bits(wg, alpha, offset)
    err = group_error(wg, b1, b2, alpha, offset, h)
    for _ in range(iters):
        new_alpha, new_offset = solve_scales(wg, b1, b2, h, offset is not None)
        new_alpha, new_offset = to_storable(new_alpha), to_storable(new_offset)
        nb1, nb2 = assign_bits(wg, new_alpha, new_offset)
        new_err = group_error(wg, nb1, nb2, new_alpha, new_offset, h)
        better = new_err < err
        if not bool(better.any()):
            break
        m = better.unsqueeze(-1)
        alpha = torch.where(m, new_alpha, alpha)
        if offset is not None:
            offset = torch.where(better, new_offset, offset)
        b1, b2 = torch.where(m, nb1, b1), torch.where(m, nb2, b2)
        err = torch.where(better, new_err, err)
    return b1, b2, alpha, offset, err


# ---------------------------------------------------------------- entry points

def finalize(wg, alpha, offset, in_features) -> DualBinaryWeight:
    """Round scales to their stored precision, reassign bits against them, clear padding."""
    alpha, offset = to_storable(alpha), to_storable(offset)
    b1, b2 = assign_bits(wg, alpha, offset)
    n, g, gs = wg.shape
    pad = (torch.arange(g * gs, device=wg.device) >= in_features).view(g, gs)
    b1, b2 = b1.masked_fill(pad, 0), b2.masked_fill(pad, 0)
    return DualBinaryWeight(b1.reshape(n, g * gs), b2.reshape(n, g * gs), alpha, offset, in_features)


@torch.no_grad()
def quantize_fdb(w: torch.Tensor, group_size: int = 64, importance: torch.Tensor | None = None,
                 offset: bool = False, iters: int = 8, grid: int = 20) -> DualBinaryWeight:
    """FDB-quantize one weight: scale search (or RTN start with an offset), then refinement.

    Args:
        w: float [N, K] weight.
        group_size: g, a multiple of 8 (K need not be a multiple of g).
        importance: float [K] per-input-channel error weight, or None for plain MSE.
        offset: also learn a per-group offset beta (costs 16 bits per group).
        iters: refinement iterations (0 = the searched init only).
        grid: number of candidate steps per orientation in the scale search.
    """
    check_group_size(group_size)
    wg = to_groups(w, group_size)
    h = group_importance(importance, w.shape[1], group_size, w.device)
    if offset:
        alpha, beta = rtn_init(wg, group_importance(None, w.shape[1], group_size, w.device) > 0)
    else:
        alpha, beta = search_scales(wg, h, grid)[0], None
    alpha, beta = to_storable(alpha), to_storable(beta)
    if iters:
        _, _, alpha, beta, _ = refine(wg, h, alpha, beta, iters)
    return finalize(wg, alpha, beta, w.shape[1])


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, group_size: int = 64) -> DualBinaryWeight:
    """Plain 2-bit round-to-nearest on the asymmetric min/max grid (the ablation's baseline).

    Stored in the dual-binary format with an offset: alpha1 = 2s, alpha2 = s, beta = min.
    """
    check_group_size(group_size)
    wg = to_groups(w, group_size)
    alpha, beta = rtn_init(wg, group_importance(None, w.shape[1], group_size, w.device) > 0)
    return finalize(wg, alpha, beta, w.shape[1])
