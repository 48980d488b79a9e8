"""Group-wise symmetric integer quantization of a table (input embedding, output projection).

Each group of ``g`` channels of a row gets one scale ``s`` and codes ``round(w / s)`` clamped to
``[-qmax, qmax]``. The scale is chosen per group among ``clip * max|w| / qmax`` for a few clip
ratios, keeping the one with the least squared error: clipping a rare outlier buys resolution
for the rest of the group, which matters at 4 bits (7 levels each side). The codes are computed
against the float16-rounded scale, so dequantizing the stored pair gives exactly what was scored.
"""

from __future__ import annotations

import torch

from ..format.embedding import QMAX, TableLayout

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # candidate clip ratios of max|w|
ROW_CHUNK = 4096  # rows scored at once (bounds the temporary [chunk, G, clips, g] tensors)


def _codes(wg: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """float [..., g] values, float [...] scales -> float codes [..., g] (0 where the scale is 0)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    return torch.round(wg / safe).clamp(-qmax, qmax) * (scale > 0).unsqueeze(-1)


def quantize_table(w: torch.Tensor, layout: TableLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize ``w`` for ``layout``.

    Args:
        w: float [R, D] with (R, D) = (layout.rows, layout.dim).
    Returns:
        8/4 bits: (int8 [R, Dp] codes, padding 0; float16 [R, G] scales). 16 bits: (float16 [R, D], None).
    """
    if tuple(w.shape) != (layout.rows, layout.dim):
        raise ValueError(f"table {tuple(w.shape)} does not match {layout}")
    if layout.bits == 16:
        return w.detach().to(torch.float16), None
    qmax = QMAX[layout.bits]
    wp = torch.nn.functional.pad(w.detach().float(), (0, layout.padded_dim - layout.dim))
    codes, scales = [], []
    for start in range(0, layout.rows, ROW_CHUNK):
        c, s = _quantize_rows(wp[start:start + ROW_CHUNK], layout.groups, qmax)
        codes.append(c)
        scales.append(s)
    return torch.cat(codes), torch.cat(scales)


def _quantize_rows(wp: torch.Tensor, groups: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [r, Dp] -> (int8 [r, Dp], float16 [r, G]): the clip ratio of least error per group."""
    r = wp.shape[0]
    wg = wp.view(r, groups, -1)  # [r, G, g]
    amax = wg.abs().amax(-1)  # [r, G]
    cand = torch.stack([(c * amax / qmax).half().float() for c in CLIPS], dim=-1)  # [r, G, C] stored scales
    q = _codes(wg.unsqueeze(2), cand, qmax)  # [r, G, C, g]
    err = (q * cand.unsqueeze(-1) - wg.unsqueeze(2)).square().sum(-1)  # [r, G, C]
    best = err.argmin(-1, keepdim=True)  # ties keep the first (largest) clip
    scale = cand.gather(-1, best).squeeze(-1)
    codes = q.gather(2, best.unsqueeze(-1).expand(r, groups, 1, wg.shape[-1])).squeeze(2)
    return codes.reshape(r, -1).to(torch.int8), scale.half()
