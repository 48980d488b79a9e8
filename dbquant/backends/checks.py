"""Input checks at the kernels' Python boundary: dtype, rank and every tensor's shape, each
error naming the offending values.

The kernels compute in float and cast the result back to the activations' dtype, so an
integer, bool or complex input would not fail but come back wrapped or truncated (uint8 wraps):
such inputs are refused here, as are a 0-dim x (no last dim to contract) and weights whose
shapes disagree with ``in_features``/``group_size`` (the CPU repack pads missing rows with
zeros, so a short ``scales`` would otherwise compute silently wrong outputs).
"""

from __future__ import annotations

import torch

from ..errors import DbquantError
from ..format.layout import MAX_PLANES

# Activation dtypes of the dbgemm reference and CPU kernels (computed in float32).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KernelInputError(DbquantError, ValueError):
    """A kernel was given inputs it must refuse. A :class:`DbquantError` (user-facing); also a
    ``ValueError``, which the wrappers raised before this type existed."""


def fail(op: str, message: str):
    raise KernelInputError(f"{op}: {message}")


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(op: str, name: str, t, dtypes, shape: tuple | None = None, dim: int | None = None) -> None:
    """``t`` is a tensor of one of ``dtypes``, with exactly ``shape`` (or ``dim`` dims) when given."""
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        fail(op, f"{name} must be {_names(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dim is not None and t.dim() != dim:
        fail(op, f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_activations(op: str, x, in_features: int | None, dtypes=FLOAT_DTYPES) -> None:
    """x: one of ``dtypes``, shape [..., in_features] with at least one dim."""
    check_tensor(op, "x", x, dtypes)
    if x.dim() < 1:
        fail(op, f"x must have at least 1 dim ([..., K]), got a 0-dim tensor (shape {tuple(x.shape)})")
    if in_features is not None and x.shape[-1] != in_features:
        fail(op, f"x has shape {tuple(x.shape)} but in_features={in_features}")


def check_packed(op: str, qweight, scales, offset, bias, in_features, group_size) -> int:
    """The canonical packed tensors (``dbquant.format.layout``) agree with ``in_features`` and
    ``group_size``: qweight uint8 [k, N, Kp/8] (k in 1..4 planes), scales [N, G, k], offset
    [N, G] or None, bias [N] or None (float). Returns N."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        fail(op, f"group_size must be a positive multiple of 8, got {group_size!r}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        fail(op, f"in_features must be a positive int, got {in_features!r}")
    groups = -(-in_features // group_size)
    kb = groups * group_size // 8
    check_tensor(op, "qweight", qweight, (torch.uint8,), dim=3)
    if not 1 <= qweight.shape[0] <= MAX_PLANES or qweight.shape[2] != kb:
        fail(op, f"qweight must be uint8 [k, N, {kb}] (k in 1..{MAX_PLANES}) for in_features={in_features}, "
                 f"group_size={group_size}; got {tuple(qweight.shape)}")
    n, k = qweight.shape[1], qweight.shape[0]
    floats = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor(op, "scales", scales, floats, (n, groups, k))
    if offset is not None:
        check_tensor(op, "offset", offset, floats, (n, groups))
    if bias is not None:
        check_tensor(op, "bias", bias, FLOAT_DTYPES, (n,))
    return n


def check_int8_head(op: str, x, wq, s, block: int = 1) -> None:
    """x float32 [M, K] (K a multiple of ``block``), wq int8 [N, K], s float32 [N]."""
    check_tensor(op, "x", x, (torch.float32,), dim=2)
    check_tensor(op, "wq", wq, (torch.int8,), dim=2)
    if wq.shape[1] != x.shape[1]:
        fail(op, f"x has K={x.shape[1]} but wq is {tuple(wq.shape)}")
    check_tensor(op, "s", s, (torch.float32,), (wq.shape[0],))
    if x.shape[1] % block:
        fail(op, f"K={x.shape[1]} must be a multiple of {block} (activations are quantized per block); "
                 "use linear_int8")


def check_rms_norm(op: str, x, w) -> None:
    """x float32 [..., D] (at least 1 dim), w float32 [D]."""
    check_activations(op, x, None, (torch.float32,))
    check_tensor(op, "w", w, (torch.float32,), (x.shape[-1],))


def check_table_rows(op: str, codes, code_scales, ids, dim: int) -> None:
    """codes int8 [R, Dp], code_scales float16 [R, G] with G dividing Dp, ids int64 [n] in 0..R-1,
    and Dp the table's padded width for dim: Dp - Dp / G < dim <= Dp (dbquant/format/embedding.py)."""
    check_tensor(op, "codes", codes, (torch.int8,), dim=2)
    check_tensor(op, "code_scales", code_scales, (torch.float16,), dim=2)
    check_tensor(op, "ids", ids, (torch.int64,), dim=1)
    r, dp = codes.shape
    if code_scales.shape[0] != r or dp % code_scales.shape[1]:
        fail(op, f"code_scales {tuple(code_scales.shape)} must be [{r}, G] with G dividing {dp}")
    g = dp // code_scales.shape[1]
    if not dp - g < dim <= dp:
        fail(op, f"dim must be in {dp - g + 1}..{dp} (codes of {dp} channels in groups of {g}), got {dim}")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < r):
        fail(op, f"ids must be in 0..{r - 1}, got {ids.min().item()}..{ids.max().item()}")


# The float KV cache's storage: float32, or float16 (half the bytes a step reads; the decoder's default).
FLOAT_CACHE_DTYPES = (torch.float32, torch.float16)


def check_decode_step(op: str, x, layer, cos, sin, k_cache, v_cache, pos) -> None:
    """The per-token arguments of ``decode_layer`` against ``layer``'s sizes (a ``t16.DecodeLayerWeights``)."""
    h, hk, d = layer.hidden, layer.n_kv, layer.head_dim
    check_tensor(op, "x", x, (torch.float32,), (1, h))
    check_tensor(op, "cos", cos, (torch.float32,), (d,))
    check_tensor(op, "sin", sin, (torch.float32,), (d,))
    check_tensor(op, "k_cache", k_cache, FLOAT_CACHE_DTYPES, dim=4)
    if tuple(k_cache.shape[:2]) != (1, hk) or k_cache.shape[3] != d:
        fail(op, f"k_cache must be [1, {hk}, max_len, {d}], got {tuple(k_cache.shape)}")
    check_tensor(op, "v_cache", v_cache, (k_cache.dtype,), tuple(k_cache.shape))
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < k_cache.shape[2]:
        fail(op, f"pos {pos!r} is outside the cache (max_len {k_cache.shape[2]})")


def check_attend_causal(op: str, q, k, v, pos, window) -> None:
    """q float32 [B, Hq, T, D]; k, v float32 or float16 (the same) [B, Hk, L, D] with Hq a multiple of Hk;
    positions pos..pos+T-1 inside the cache; window >= 0 (0: none)."""
    check_tensor(op, "q", q, (torch.float32,), dim=4)
    check_tensor(op, "k", k, FLOAT_CACHE_DTYPES, dim=4)
    check_tensor(op, "v", v, (k.dtype,), tuple(k.shape))
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] < 1 or hq % k.shape[1]:
        fail(op, f"k, v must be [{b}, Hk, L, {d}] with Hk dividing {hq}, got {tuple(k.shape)}")
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0 or pos + t > k.shape[2]:
        fail(op, f"positions {pos!r}..{pos}+{t}-1 are outside the cache ({k.shape[2]} rows)")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        fail(op, f"window must be an int >= 0 (0: none), got {window!r}")


GATED_ACTS = ("silu", "gelu_tanh")  # the MLP gates of the supported families (decode.py ACTIVATIONS)


def check_gated_act(op: str, gu, act) -> None:
    """gu float32 [M, 2I]; act one of GATED_ACTS."""
    check_tensor(op, "gu", gu, (torch.float32,), dim=2)
    if gu.shape[1] % 2:
        fail(op, f"gu must be [M, 2I] (a gate and an up half per row), got {tuple(gu.shape)}")
    if act not in GATED_ACTS:
        fail(op, f"act must be one of {GATED_ACTS}, got {act!r}")


def check_rope_heads(op: str, x, cos, sin) -> None:
    """x float32 [B, T, H, D] with D even; cos, sin float32 [T, D]."""
    check_tensor(op, "x", x, (torch.float32,), dim=4)
    if x.shape[3] % 2:
        fail(op, f"x's head dim must be even (rotate-half), got {tuple(x.shape)}")
    check_tensor(op, "cos", cos, (torch.float32,), (x.shape[1], x.shape[3]))
    check_tensor(op, "sin", sin, (torch.float32,), (x.shape[1], x.shape[3]))
