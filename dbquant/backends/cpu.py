"""Loader and Python wrappers of the C++ CPU kernels (extension module ``dbquant._C``).

``dbquant._C`` has no Python functions: importing it loads the shared library, which
registers ``torch.ops.dbquant.*`` (csrc/cpu/binding.cpp). When it is missing (not built, or
built against another torch) :func:`load_cpu` returns False and warns once; dbquant then
uses the pure-PyTorch reference kernels.

Each wrapper here checks its inputs in Python (KernelInputError, a DbquantError, naming the
values) and then calls the op, which checks again in C++. A wrapper's ``run`` attribute is the
call for per-token loops whose inputs were checked once when they were set up: for ``dbgemm``
and ``decode_layer`` it takes the weight as built by ``prepare``; for the others it is the op
itself (C++ checks only).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import t16
from .checks import (
    KernelInputError,
    check_activations,
    check_attend_causal,
    check_decode_step,
    check_gated_act,
    check_int8_head,
    check_packed,
    check_rms_norm,
    check_rope_heads,
    check_table_rows,
    check_tensor,
)
from .cpuinfo import bf16_kind, fast_bf16_cpu
from .kvpack import CODE_FIELDS, FLOAT_FIELDS, PackedKVLayer, check_kv_attend
from .reference import Q8_BLOCK
from .t16 import DWORD_GROUP, TILE, CpuWeight, DecodeLayerWeights  # noqa: F401 - re-exported

BUILD_HINT = "pip install --no-build-isolation -e ."
# Above this many activation rows the lookup-table kernel hands over to dequantize + one
# BLAS GEMM, which wins on long prefills (crossover measured by `dbquant bench`, docs/RESULTS.md).
LUT_MAX_ROWS = 32
# Above this many queries (a prefill chunk) kv_attend decodes each packed group once and calls SDPA:
# the codes kernel transforms every query per group, which costs more than one decode from ~4 on.
KV_CODES_MAX_QUERIES = 4
# The lookup tables run_cpu can be told to use (csrc/cpu/dbgemm_t16.h, dbgemm_i8lut.h).
LUT_KINDS = ("auto", "float", "int8", "int16")
# The GEMM above LUT_MAX_ROWS rows: "fp32" (the weight dequantized to float32: exact, what `eval`
# measures), "bf16" (weight and activations rounded to bfloat16 into torch's bf16 GEMM: fp32
# accumulation, a bf16 result), "int8" (activations rounded to 8 bits per row and group, the bit planes
# exact: csrc/cpu/gemm_a8.h), "w8a8" (the same activations, and each group's planes merged into one int8
# weight level per channel: one integer dot instead of P, gemm_a8.h "8-bit weight levels"), or "auto"
# (resolve_gemm): bf16 on AMX, w8a8 where AVX-512 VNNI runs it, bf16 where this CPU's bf16 is otherwise
# fast, int8 where AVX2 is its fastest path, else fp32. The fast decoder's prefill uses auto.
GEMM_DTYPES = ("auto", "fp32", "bf16", "int8", "w8a8")
A8_MAX_GROUP = 256  # csrc/cpu/gemm_a8.h kA8MaxGroup: larger groups take the fp32 GEMM

_cpu_state: bool | None = None  # None: not tried yet
_cpu_error: str | None = None


def load_cpu() -> bool:
    """Whether ``torch.ops.dbquant.dbgemm_cpu`` is available; imports ``dbquant._C`` once.

    On failure warns once per process (``RuntimeWarning``) with the reason and the build
    command; later calls return the cached answer silently.
    """
    global _cpu_state, _cpu_error
    if _cpu_state is None:
        try:
            from .. import _C  # noqa: F401 - loading the library registers the op

            torch.ops.dbquant.dbgemm_cpu  # noqa: B018 - raises if registration failed
            torch.classes.dbquant.DecodeLayer  # noqa: B018 - an extension built before the class existed
            torch.classes.dbquant.KVPacked  # noqa: B018 - likewise (the packed KV cache's attention)
            _cpu_state = True
        except (ImportError, OSError, AttributeError, RuntimeError) as e:
            _cpu_state, _cpu_error = False, f"{type(e).__name__}: {e}"
            warnings.warn(
                "dbquant: the C++ CPU extension (dbquant._C) is not built or failed to load "
                f"({_cpu_error}); falling back to the slower pure-PyTorch reference kernel. "
                f"Build it from the source checkout with `{BUILD_HINT}` (needs torch and a C++ "
                "compiler).",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _attach_runs()
    return _cpu_state


def _require() -> None:
    if not load_cpu():
        raise RuntimeError(f"dbquant._C is not available ({_cpu_error}); build it with `{BUILD_HINT}`")


# ---- dbgemm ---------------------------------------------------------------------------


class _DbgemmLut(torch.autograd.Function):
    """The lookup-table op with a backward (the op itself has none): dX = dY @ W with W
    dequantized, dBias = column sums of dY. Used only when a gradient is wanted."""

    @staticmethod
    def forward(ctx, x2, bias, w: CpuWeight, isa: str, lut: str):
        ctx.w = w
        return torch.ops.dbquant.dbgemm_cpu(x2, w.planes, w.scales, w.offset, bias, w.out_features,
                                            w.in_features, w.group_size, isa, lut)

    @staticmethod
    def backward(ctx, dy):
        dx = dy @ dequantize_cpu(ctx.w) if ctx.needs_input_grad[0] else None
        db = dy.sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None, None, None


def run_cpu(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None, isa: str = "auto",
            lut: str = "auto", gemm: str = "fp32") -> torch.Tensor:
    """``y = x @ W.T (+ bias)`` with the prepared weight ``w``.

    Args:
        x: float16, bfloat16, float32 or float64 [..., K] on CPU (computed in float32; the
            result is cast back to x's dtype).
        bias: float [N] or None.
        isa: "auto" (fastest this CPU supports; above LUT_MAX_ROWS rows, dequantize + BLAS),
            or force one lookup-table path: "avx512", "avx2" or "scalar".
        lut: which tables: "float" (csrc/cpu/dbgemm_t16.h), "int8" or "int16" (T-MAC style integer
            tables with 8- or 12-bit codes, csrc/cpu/dbgemm_i8lut.h: not bit-identical, within that
            header's error bound), or "auto": for M = 1 the tables measured best on that ISA path (C++
            ``default_lut``; the environment variable DBQUANT_CPU_LUT=float|int8|int16 overrides it).
            Either forced value also keeps M > LUT_MAX_ROWS on the lookup-table kernel.
        gemm: the precision of the dequantize + GEMM path above LUT_MAX_ROWS rows (GEMM_DTYPES).
    Returns: [..., N] in x's dtype; differentiable in x and bias.
    Raises: KernelInputError for another dtype, a 0-dim x, or K / bias shapes not matching ``w``.
    """
    check_activations("dbgemm_cpu", x, w.in_features)
    if bias is not None:
        check_tensor("dbgemm_cpu", "bias", bias, (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                     (w.out_features,))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    if lut not in LUT_KINDS:
        raise KernelInputError(f"dbgemm_cpu: lut must be one of {LUT_KINDS}, got {lut!r}")
    if x2.shape[0] > LUT_MAX_ROWS and isa == "auto" and lut == "auto":
        y = dense_gemm(x2, w, b, gemm)
    elif torch.is_grad_enabled() and (x2.requires_grad or (b is not None and b.requires_grad)):
        y = _DbgemmLut.apply(x2, b, w, isa, lut)
    else:
        y = torch.ops.dbquant.dbgemm_cpu(x2, w.planes, w.scales, w.offset, b, w.out_features,
                                         w.in_features, w.group_size, isa, lut)
    return y.reshape(*lead, w.out_features).to(x.dtype)


def default_lut(isa: str = "auto") -> str:
    """"float", "int8" or "int16": the tables ``run_cpu(..., lut="auto")`` and the fused decode ops use for one
    activation row on the ``isa`` path (C++ ``default_lut``: the measured table, or DBQUANT_CPU_LUT)."""
    _require()
    return torch.ops.dbquant.cpu_default_lut(isa)


@contextlib.contextmanager
def _forced(op_name: str, value: str):
    """Within the block, the process-wide C++ setting ``torch.ops.dbquant.<op_name>`` sets is ``value``;
    the previous one (which the op returns) comes back on exit."""
    _require()
    op = getattr(torch.ops.dbquant, op_name)
    prev = op(value)
    try:
        yield
    finally:
        op(prev)


def forced_lut(kind: str):
    """Within the block (a context manager), ``lut="auto"`` and the fused decode ops use ``kind`` ("float",
    "int8" or "int16") tables on every ISA path (process-wide: the C++ setting that DBQUANT_CPU_LUT also sets);
    the previous setting comes back on exit. For tests and benchmarks."""
    return _forced("cpu_force_lut", kind)


def forced_isa(isa: str):
    """Within the block (a context manager), every kernel and decode-step op asked for ``isa="auto"`` runs
    the ``isa`` path ("avx512", "avx2" or "scalar", one this CPU has; torch.ops.dbquant.cpu_isas()),
    process-wide; the previous setting comes back on exit. For tests and benchmarks: the decode step's
    ops take no ISA argument."""
    return _forced("cpu_force_isa", isa)


def hidden_exts(exts: str):
    """Within the block (a context manager), the kernels see no AVX-512 extension of the comma list
    ``exts`` ("vbmi", "vnni", "bf16", "bitalg"; process-wide), so the fallbacks of CPUs that lack them run
    here; the previous setting comes back on exit. For tests: a weight prepared in dword rows stays in
    them (every kernel reads both orders)."""
    return _forced("cpu_hide_exts", exts)


def resolve_gemm(gemm: str) -> str:
    """"fp32", "bf16", "int8" or "w8a8": what ``gemm`` (one of GEMM_DTYPES) means on this CPU. "auto" is, in
    this order (each measured where named, docs/RESULTS.md): bf16 on CPUs with AMX tiles (the tile GEMM
    beats every vector kernel); w8a8 where the AVX-512 VNNI kernel runs (``cpu_avx512_has("vnni")``: on
    Zen 4 1.6-2.7x the bf16 path at SmolLM2's shapes in most rows); bf16 where this CPU's bf16 is otherwise fast
    (``fast_bf16_cpu``); int8 activations where AVX2 is the fastest path (Zen 3); else fp32."""
    if gemm not in GEMM_DTYPES:
        raise KernelInputError(f"dbgemm_cpu: gemm must be one of {GEMM_DTYPES}, got {gemm!r}")
    if gemm != "auto":
        return gemm
    if bf16_kind() == "amx":
        return "bf16"
    native = load_cpu()
    if native and torch.ops.dbquant.cpu_isas()[0] == "avx512" and torch.ops.dbquant.cpu_avx512_has("vnni"):
        return "w8a8"
    if fast_bf16_cpu():
        return "bf16"
    return "int8" if native and torch.ops.dbquant.cpu_isas()[0] == "avx2" else "fp32"


def dense_gemm(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None, gemm: str = "fp32") -> torch.Tensor:
    """``x @ W.T (+ bias)`` by one GEMM, for many rows (a prefill).

    x: float32 [M, K] contiguous; bias: float32 [N] or None. ``gemm`` (GEMM_DTYPES): "fp32" is exact
    up to summation order (the dequantized weight into torch's GEMM); "bf16" rounds x and W to bfloat16
    (the product accumulates in fp32 inside the GEMM; its result is rounded to bf16 and returned as
    float32); "int8" rounds x to 8 bits per row and weight group (a zero point) and multiplies the exact
    bit planes in integers (``gemm_a8_cpu``, csrc/cpu/gemm_a8.h: no dense weight); "w8a8" rounds x the
    same way and each group's weight to 8-bit levels (one integer dot instead of P; gemm_a8.h). Groups
    over A8_MAX_GROUP take fp32 for both. Returns float32 [M, N].
    """
    kind = resolve_gemm(gemm)
    if kind in ("int8", "w8a8") and w.group_size <= A8_MAX_GROUP:
        return torch.ops.dbquant.gemm_a8_cpu(x, w.planes, w.scales, w.offset, bias, w.out_features,
                                             w.in_features, w.group_size, "auto", kind == "w8a8")
    bf16 = kind == "bf16"
    wt = torch.ops.dbquant.dequantize_t_cpu(w.planes, w.scales, w.offset, w.out_features, w.in_features,
                                            w.group_size, bf16)  # [K, N]: BLAS reads it as W^T
    if bf16:
        y = (x.to(torch.bfloat16) @ wt).float()
        return y if bias is None else y + bias
    return x @ wt if bias is None else torch.addmm(bias, x, wt)  # what F.linear(x, W, bias) calls


def plane_cols(group_size: int) -> int:
    """The planes' byte order (t16.PLANE_COLS) the CPU loaders choose for groups of ``group_size``
    channels: 4 (dword rows) where this CPU runs the dword-row kernel (AVX-512 VBMI + VNNI:
    ``torch.ops.dbquant.cpu_dword_rows``) and group_size % DWORD_GROUP == 0, else 1. The environment
    variable DBQUANT_CPU_COLS=1|4 forces one where the groups allow it (for A/B benchmarks; every
    kernel reads both orders, so neither changes a result)."""
    forced = os.environ.get("DBQUANT_CPU_COLS", "")
    if forced not in ("", "1", "4"):
        raise KernelInputError(f"DBQUANT_CPU_COLS must be 1 or 4 (or unset), got {forced!r}")
    if group_size % DWORD_GROUP:
        return 1
    if forced:
        return int(forced)
    return 4 if load_cpu() and torch.ops.dbquant.cpu_dword_rows() else 1


def prepare_cpu(qweight: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor | None,
                in_features: int, group_size: int) -> CpuWeight:
    """Repack a canonical packed linear into the CPU kernel layout (:func:`t16.prepare_cpu`, done once
    per weight), in the byte order :func:`plane_cols` picks for this CPU."""
    return t16.prepare_cpu(qweight, scales, offset, in_features, group_size, cols=plane_cols(group_size))


def dequantize_cpu(w: CpuWeight) -> torch.Tensor:
    """Dense float32 [N, K] weight of a prepared layer (equal to the reference's dequantization)."""
    return torch.ops.dbquant.dequantize_cpu(w.planes, w.scales, w.offset, w.out_features,
                                            w.in_features, w.group_size)


def dbgemm_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int,
               group_size: int) -> torch.Tensor:
    """The registry's canonical-signature entry (see :func:`dbquant.backends.reference.dbgemm_ref`):
    repacks on every call. :class:`dbquant.model.modules.PackedLinear` instead calls
    :func:`prepare_cpu` once and :func:`run_cpu` per forward.
    """
    _require()
    check_packed("dbgemm_cpu", qweight, scales, offset, bias, in_features, group_size)
    return run_cpu(x, prepare_cpu(qweight, scales, offset, in_features, group_size), bias)


# The registry finds the load-time repack through these attributes.
dbgemm_cpu.prepare = prepare_cpu
dbgemm_cpu.run = run_cpu


# ---- the decoder's ops (dbquant/runtime/decode.py) ------------------------------------------


def linear_int8_cpu(x: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y = x @ (s * wq).T`` (C++ ``linear_int8_cpu``); contract of
    :func:`dbquant.backends.reference.linear_int8_ref`."""
    _require()
    check_int8_head("linear_int8_cpu", x, wq, s)
    return torch.ops.dbquant.linear_int8_cpu(x.contiguous(), wq.contiguous(), s.contiguous())


def linear_w8a8_cpu(x: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same with x quantized to int8 per block of 32 (C++ ``linear_w8a8_cpu``); contract of
    :func:`dbquant.backends.reference.linear_w8a8_ref`."""
    _require()
    check_int8_head("linear_w8a8_cpu", x, wq, s, Q8_BLOCK)
    return torch.ops.dbquant.linear_w8a8_cpu(x.contiguous(), wq.contiguous(), s.contiguous())


def rms_norm_cpu(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim (C++ ``rms_norm_cpu``); contract of
    :func:`dbquant.backends.reference.rms_norm_ref`. x is made contiguous if needed."""
    _require()
    check_rms_norm("rms_norm_cpu", x, w)
    return torch.ops.dbquant.rms_norm_cpu(x.contiguous(), w.contiguous(), float(eps))


def table_rows_cpu(codes: torch.Tensor, code_scales: torch.Tensor, ids: torch.Tensor, dim: int,
                   scale: float = 1.0) -> torch.Tensor:
    """Rows of an 8-bit group-wise table (C++ ``table_rows_cpu``); contract of
    :func:`dbquant.backends.reference.table_rows_ref`. ``.run`` skips the Python checks (the C++ op
    checks shapes and ids itself): the decoder's per-token embedding lookup."""
    _require()
    check_table_rows("table_rows_cpu", codes, code_scales, ids, dim)
    return torch.ops.dbquant.table_rows_cpu(codes.contiguous(), code_scales.contiguous(), ids.contiguous(), int(dim),
                                            float(scale))


def argmax_cpu(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of float32 [B, V] (C++ ``argmax_cpu``); contract of
    :func:`dbquant.backends.reference.argmax_ref`."""
    _require()
    check_tensor("argmax_cpu", "x", x, (torch.float32,), dim=2)
    return torch.ops.dbquant.argmax_cpu(x.contiguous())


def gated_act_cpu(gu: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up of a prompt chunk's gate/up rows in one pass (C++ ``gated_act_cpu``: the decode step's
    row loop); contract of :func:`dbquant.backends.reference.gated_act_ref`. ``.run`` skips the Python checks."""
    _require()
    check_gated_act("gated_act_cpu", gu, act)
    return torch.ops.dbquant.gated_act_cpu(gu.contiguous(), act)


def rope_heads_cpu(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A prompt chunk's rotary embedding into attention's layout (C++ ``rope_heads_cpu``: the decode step's
    rotation per row); contract of :func:`dbquant.backends.reference.rope_heads_ref`. x is read through its
    strides (a contiguous last dim; else copied). ``.run`` skips the Python checks."""
    _require()
    check_rope_heads("rope_heads_cpu", x, cos, sin)
    x = x if x.stride(-1) == 1 else x.contiguous()
    return torch.ops.dbquant.rope_heads_cpu(x, cos.contiguous(), sin.contiguous())


def attend_causal_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float,
                      softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """A prompt chunk's causal attention over a float cache (C++ ``attend_causal_cpu``: the decode
    step's attention kernel for each query); contract of :func:`dbquant.backends.reference.attend_causal_ref`.
    q is read through its strides (a contiguous last dim; else copied); k, v made contiguous if needed.
    ``.run`` skips the Python checks (the C++ op checks shapes and positions itself): the prefill's call."""
    _require()
    check_attend_causal("attend_causal_cpu", q, k, v, pos, window)
    q = q if q.stride(-1) == 1 else q.contiguous()
    return torch.ops.dbquant.attend_causal_cpu(q, k.contiguous(), v.contiguous(), pos, float(scale),
                                               float(softcap), window)


def prepare_decode_layer(layer: DecodeLayerWeights):
    """The C++ form of a decoder layer (``torch.classes.dbquant.DecodeLayer``), built once per
    layer: it holds the layer's tensors (already checked) for :func:`decode_layer_cpu`'s ``run``."""
    _require()
    layer.check("decode_layer_cpu")
    obj = torch.classes.dbquant.DecodeLayer(layer.ln1, layer.ln2, float(layer.eps), layer.n_heads, layer.n_kv,
                                            layer.head_dim, layer.intermediate, float(layer.scale))
    for name in DecodeLayerWeights.PROJECTIONS:  # each with its own k and group size
        p = getattr(layer, name)
        obj.set_proj(name, p.weight.planes, p.weight.scales, p.weight.offset, p.bias, p.weight.group_size)
    obj.set_extras(layer.q_norm, layer.k_norm, layer.post_attn, layer.post_ffn, layer.pre_norm, layer.act,
                   int(layer.window), float(layer.softcap), float(layer.residual_scale))
    return obj


def decode_layer_cpu(x: torch.Tensor, layer: DecodeLayerWeights, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> None:
    """One decoder layer for one token, in place (C++ ``decode_layer_cpu``); contract of
    :func:`dbquant.backends.reference.decode_layer_ref`. Builds the C++ layer on every call
    (for tests); a decoder calls ``decode_layer_cpu.prepare`` once per layer, puts the prepared
    layers in a :func:`prepare_decode_stack`, and runs ``decode_step_cpu.run`` once per token."""
    check_decode_step("decode_layer_cpu", x, layer, cos, sin, k_cache, v_cache, pos)
    torch.ops.dbquant.decode_layer_cpu(x, prepare_decode_layer(layer), cos, sin, k_cache, v_cache, pos)


decode_layer_cpu.prepare = prepare_decode_layer


# ---- attention on a packed VidKV cache (backends/kvpack.py, csrc/cpu/kv_attn.h) ----------------


def prepare_kv_packed(kv: PackedKVLayer):
    """The C++ object over a layer's packed-cache buffers (``torch.classes.dbquant.KVPacked``),
    built once and kept in ``kv.native``; the buffers are shared, not copied."""
    _require()
    if kv.native is None:
        kv.native = torch.classes.dbquant.KVPacked([getattr(kv, f) for f in CODE_FIELDS],
                                                   [getattr(kv, f) for f in FLOAT_FIELDS], kv.group, kv.n_anom)
    return kv.native


def kv_attend_cpu(q: torch.Tensor, kv: PackedKVLayer, n_groups: int, n_tail: int, scale: float,
                  isa: str = "auto") -> torch.Tensor:
    """Attention on the packed codes (C++ ``kv_attend_cpu``); contract of
    :func:`dbquant.backends.reference.kv_attend_ref`. ``isa``: "auto" (the fastest this CPU has)
    or force "avx512", "avx2" or "scalar"."""
    check_kv_attend("kv_attend_cpu", q, kv, n_groups, n_tail)
    native = prepare_kv_packed(kv)
    t = q.shape[0]
    if t <= KV_CODES_MAX_QUERIES or isa != "auto":
        return torch.ops.dbquant.kv_attend_cpu(q.contiguous(), native, n_groups, n_tail, float(scale), isa)
    # a prefill chunk: decode each group once (C++) and attend with SDPA; the float copy is this
    # layer's past only and is dropped on return
    pk, pv = torch.ops.dbquant.kv_dequantize_cpu(native, n_groups)
    keys = torch.cat([pk, kv.tail_k[:, :n_tail]], dim=1)[None]
    vals = torch.cat([pv, kv.tail_v[:, :n_tail]], dim=1)[None]
    n = keys.shape[2]
    visible = torch.arange(n)[None] < (n - t + torch.arange(t) + 1)[:, None]  # [T, n]
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, vals, attn_mask=visible,
                                                           scale=scale, enable_gqa=q.shape[1] != kv.n_kv)
    return out[0].transpose(0, 1)


def decode_layer_kv_cpu(x: torch.Tensor, layer, cos: torch.Tensor, sin: torch.Tensor, kv: PackedKVLayer,
                        n_groups: int, n_tail: int) -> None:
    """One decoder layer for one token, in place, attending on a packed VidKV cache (C++
    ``decode_layer_kv_cpu``): the token's k, v go to tail row ``n_tail``; then the layer is
    :func:`dbquant.backends.reference.decode_layer_ref` with :func:`kv_attend_ref` as its attention.
    ``layer``: a prepared ``DecodeLayer`` (``decode_layer_cpu.prepare``). A decoder gives its
    stack every layer's cache (``stack.set_kv(i, prepare_kv_packed(kv_i))``) and runs
    ``decode_step_kv_cpu.run`` once per token."""
    _require()
    torch.ops.dbquant.decode_layer_kv_cpu(x, layer, cos, sin, prepare_kv_packed(kv), n_groups, n_tail)


# ---- the whole one-token step (every layer in one native call) --------------------------------


def prepare_decode_stack(layers: list[tuple], final_norm: tuple[torch.Tensor, float] | None = None):
    """The C++ decoder stack (``torch.classes.dbquant.DecodeStack``), built once per decoder.

    Args:
        layers: per decoder layer, in order: (prepared ``DecodeLayer`` from
            ``decode_layer_cpu.prepare``, cos, sin: float32 [max_len, D], its RoPE tables).
        final_norm: (weight float32 [H], eps) of the model's final RMSNorm, or None. When given, both
            step ops below end with it, in place: x comes back ready for the output projection.
    ``decode_step_cpu.run(x, stack, k_cache, v_cache, pos)`` then runs every layer for one token
    (caches float32 [n_layers, 1, Hk, max_len, D]); after ``stack.set_kv(i, prepare_kv_packed(kv_i))``
    for every layer, ``decode_step_kv_cpu.run(x, stack, pos, n_groups, n_tail)`` does so on the
    packed caches. Each is the same arithmetic as one ``decode_layer_cpu`` (``decode_layer_kv_cpu``)
    call per layer.
    """
    _require()
    stack = torch.classes.dbquant.DecodeStack()
    for layer, cos, sin in layers:
        stack.add(layer, cos.float().contiguous(), sin.float().contiguous())
    if final_norm is not None:
        stack.set_final_norm(final_norm[0].float().contiguous(), float(final_norm[1]))
    return stack


def decode_step_cpu(x: torch.Tensor, stack, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> None:
    """Every layer of a prepared stack for one token, in place on x float32 [1, H]
    (C++ ``decode_step_cpu``, which checks its arguments)."""
    _require()
    torch.ops.dbquant.decode_step_cpu(x, stack, k_cache, v_cache, int(pos))


def decode_step_kv_cpu(x: torch.Tensor, stack, pos: int, n_groups: int, n_tail: int) -> None:
    """:func:`decode_step_cpu` on the packed caches given with ``stack.set_kv`` (C++ ``decode_step_kv_cpu``)."""
    _require()
    torch.ops.dbquant.decode_step_kv_cpu(x, stack, int(pos), int(n_groups), int(n_tail))


# ---- the benchmark's read bandwidth (csrc/cpu/stream_read.h) ---------------------------------


def stream_read_cpu(buf: torch.Tensor, threads: int = 1, isa: str = "auto") -> int:
    """Read every byte of ``buf`` on ``threads`` threads with the widest loads the CPU has and
    return their XOR checksum (contract of :func:`dbquant.backends.reference.stream_read_ref`).
    Timing this call on a buffer larger than the last-level cache gives the memory read bandwidth.

    Args:
        buf: any dtype, contiguous, on CPU (its raw bytes are read; not copied).
        threads: OpenMP threads to split the buffer across (independent of torch's setting).
        isa: "auto" or force "avx512", "avx2" or "scalar".
    Returns: the uint64 checksum bit-cast to int64 (a Python int).
    """
    _require()
    if not (isinstance(buf, torch.Tensor) and buf.device.type == "cpu" and buf.is_contiguous()):
        raise KernelInputError(f"stream_read_cpu: buf must be a contiguous CPU tensor, got "
                               f"{type(buf).__name__} {getattr(buf, 'device', '')}")
    if not 1 <= int(threads) <= 4096:
        raise KernelInputError(f"stream_read_cpu: threads must be in 1..4096, got {threads}")
    return torch.ops.dbquant.stream_read_cpu(buf, int(threads), isa)


def _attach_runs() -> None:
    """``fn.run`` of the wrappers whose op has no prepared form: the op itself (ops exist
    only once the extension has loaded)."""
    ops = torch.ops.dbquant
    linear_int8_cpu.run = ops.linear_int8_cpu
    linear_w8a8_cpu.run = ops.linear_w8a8_cpu
    rms_norm_cpu.run = ops.rms_norm_cpu
    table_rows_cpu.run = ops.table_rows_cpu
    argmax_cpu.run = ops.argmax_cpu
    attend_causal_cpu.run = ops.attend_causal_cpu
    gated_act_cpu.run = ops.gated_act_cpu
    rope_heads_cpu.run = ops.rope_heads_cpu
    decode_layer_cpu.run = ops.decode_layer_cpu
    decode_layer_kv_cpu.run = ops.decode_layer_kv_cpu
    decode_step_cpu.run = ops.decode_step_cpu
    decode_step_kv_cpu.run = ops.decode_step_kv_cpu

