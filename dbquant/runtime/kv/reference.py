"""Loop oracles for the KV quantizers: each returns the fake-quantized (dequantized) values
of one group straight from the definitions in docs/METHODS.md (VidKV), with no packing and no
vectorisation, so the tests can compare the packed path against them.

All take ``x``: float [G, C] (G tokens, C channels) and return fp32 [G, C]. Scales are
rounded to fp16 where the packed format stores fp16.
"""

from __future__ import annotations

import torch


def _h(v: float) -> float:
    """Round to the stored fp16 value."""
    return float(torch.tensor(v, dtype=torch.float32).to(torch.float16).float())


def asym2_ref(x: torch.Tensor) -> torch.Tensor:
    """Per channel: min/max grid of 4 levels ``min + s*q``, ``s = (max - min) / 3``, nearest level."""
    g, c = x.shape
    out = torch.empty(g, c)
    for j in range(c):
        col = [float(v) for v in x[:, j]]
        mn, s = _h(min(col)), _h((max(col) - min(col)) / 3)
        for i, v in enumerate(col):
            q = 0 if s == 0 else min(3, max(0, round((v - mn) / s)))
            out[i, j] = mn + s * q
    return out


def sign1_ref(x: torch.Tensor) -> torch.Tensor:
    """Per channel: ``+a`` where x >= 0 else ``-a``, ``a = mean |x|`` (signed, never {0, a})."""
    g, c = x.shape
    out = torch.empty(g, c)
    for j in range(c):
        a = _h(sum(abs(float(v)) for v in x[:, j]) / g)
        for i in range(g):
            out[i, j] = a if float(x[i, j]) >= 0 else -a
    return out


def ternary_ref(x: torch.Tensor, fit: bool = True) -> torch.Tensor:
    """Per channel: code sign(x) where |x| > 0.5 * mean|x| else 0; value = scale * code.

    scale = mean |x| over the nonzero codes (``fit``) or gamma = mean |x| (the paper).
    """
    g, c = x.shape
    out = torch.empty(g, c)
    for j in range(c):
        col = [float(v) for v in x[:, j]]
        gamma = sum(abs(v) for v in col) / g
        codes = [(1 if v > 0 else -1) if abs(v) > 0.5 * gamma else 0 for v in col]
        if fit:
            nz = [abs(v) for v, t in zip(col, codes) if t]
            s = sum(nz) / len(nz) if nz else 0.0
        else:
            s = gamma
        s = _h(s)
        for i in range(g):
            out[i, j] = s * codes[i]
    return out


def keys_mixed_ref(x: torch.Tensor, n_anom: int, fft: bool = True) -> torch.Tensor:
    """VidKV keys: the ``n_anom`` channels of largest range -> asym2; the rest (in channel order)
    -> orthonormal rfft along channels, sign1 on each of the n real coefficients, inverse rfft.
    """
    g, c = x.shape
    rng = [(float(x[:, j].max() - x[:, j].min()), j) for j in range(c)]
    anom = sorted(j for _, j in sorted(rng, key=lambda t: (-t[0], t[1]))[:n_anom])
    normal = [j for j in range(c) if j not in anom]
    out = torch.empty(g, c)
    if anom:
        out[:, anom] = asym2_ref(x[:, anom])
    if normal:
        n = len(normal)
        xn = x[:, normal].float()
        if not fft:
            out[:, normal] = sign1_ref(xn)
            return out
        spec = torch.fft.rfft(xn, dim=-1, norm="ortho")  # [g, n/2 + 1]
        # the n real degrees of freedom: Re c_0..c_{n/2}, Im c_1..c_{n/2-1}
        re = sign1_ref(spec.real)
        im = torch.zeros_like(spec.imag)
        if n > 2:
            im[:, 1:n // 2] = sign1_ref(spec.imag[:, 1:n // 2])
        out[:, normal] = torch.fft.irfft(torch.complex(re, im), n=n, dim=-1, norm="ortho")
    return out
