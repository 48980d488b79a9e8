"""Which lookup-table precision keeps a checkpoint's greedy answer: the decode GEMV's tables emulated in torch.

The integer tables of the one-row GEMV (csrc/cpu/dbgemm_i8lut.h) round every centred 4-channel partial
sum C_q[i] to a multiple of one step per group of g channels, step = max |C| / 127. This script models
that rounding with other precisions and runs the decoder's one-token step through the model, so one can
see how far a greedy answer follows the tables' error:

* ``exact``: no rounding (``reference.dbgemm_ref``; the float-table kernel agrees with it to float32
  rounding);
* ``i{B}g{C}``: centred tables rounded to B-bit codes (step = max |C| / (2^(B-1) - 1)) with one step
  per C channels; ``i8g64`` and ``i12g64`` are the kernel's own int8 and int16 tables (codes of 127 and
  2047) on a g = 64 checkpoint;
* ``i{B}g{C}o{N}``: the same, with each row's N largest-|x| channels left out of the tables and added
  exactly (outliers decide the step of their group).

Every row runs the same decoder (``FastDecoder`` with backend ``ref``: the prompt's prefill exact,
each decoded token's packed linears through the variant): the free-running greedy answer to the demo
prompt, the first token where it leaves the ``exact`` answer, and, teacher-forced on the exact answer
(every variant sees the same tokens), the largest and rms logit difference from ``exact`` and how many
greedy picks agree.

Usage: python benchmarks/table_precision.py CHECKPOINT [--variants exact,i8g64,i8g32,i8g64o2,i10g64]
       [--prompt "What is the capital of France?"] [--max-new-tokens 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys

import torch

VARIANT = re.compile(r"^i(\d+)g(\d+)(?:o(\d+))?$")


def rounded_tables(x: torch.Tensor, k: int, group_size: int, bits: int, step_channels: int) -> torch.Tensor:
    """The centred 16-entry tables of x float32 [M, K] (channels padded with zeros to a multiple of
    ``group_size``), each rounded to ``bits``-bit codes with one step per ``step_channels`` channels, as
    values: float32 [M, Kp / 4, 16] (entry i of chunk q: sum_k ([i has bit k] - 1/2) x[4q + k], rounded)."""
    m = x.shape[0]
    kp = -(-k // group_size) * group_size
    xp = x.new_zeros(m, kp)
    xp[:, :k] = x
    bit = ((torch.arange(16)[:, None] >> torch.arange(4)) & 1).float() - 0.5  # [16, 4]
    c = xp.reshape(m, kp // 4, 4) @ bit.T  # [M, Q, 16]
    top = 2 ** (bits - 1) - 1
    step = c.abs().reshape(m, kp // step_channels, -1).amax(-1) / top  # [M, Kp / step_channels]
    step = step.repeat_interleave(step_channels // 4, dim=1)[..., None]
    return torch.where(step > 0, torch.round(c / step.clamp_min(1e-30)) * step, torch.zeros(()))


def emulated_dbgemm(bits: int, step_channels: int | None, outliers: int):
    """A ``dbgemm`` (reference.dbgemm_ref's signature) whose one-row calls look the weight's 4-bit indices
    up in ``rounded_tables`` (``step_channels`` None: the weight's group size); calls of more rows are exact."""
    from dbquant.backends import reference

    def fn(x, qweight, scales, offset, bias, in_features, group_size):
        if x.shape[0] != 1:
            return reference.dbgemm_ref(x, qweight, scales, offset, bias, in_features, group_size)
        x = x.float()
        inside, extra = x, None
        if outliers:
            idx = x.abs().topk(outliers, dim=-1).indices
            inside = x.scatter(1, idx, 0.0)
            extra = reference.dbgemm_ref(x - inside, qweight, scales, offset, None, in_features, group_size)
        tab = rounded_tables(inside, in_features, group_size, bits, step_channels or group_size)[0]  # [Q, 16]
        p, n, c8 = qweight.shape
        nib = torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(p, n, 2 * c8).long()  # chunk 2c: low
        looked = tab[torch.arange(2 * c8), nib]  # [P, N, Q]: sum_k (b_k - 1/2) x_k per chunk, rounded
        g = scales.shape[1]
        s = looked.reshape(p, n, g, -1).sum(-1).double()  # [P, N, G]
        xp = inside.new_zeros(8 * c8)
        xp[:in_features] = inside[0]
        gsum = xp.reshape(g, -1).sum(-1).double()  # the centring's term: + gsum / 2 per plane
        a = scales.double()  # [N, G, P]
        y = torch.einsum("png,ngp->n", s, a) + torch.einsum("g,ngp->n", gsum / 2, a)
        if offset is not None:
            y = y + offset.double() @ gsum
        if bias is not None:
            y = y + bias.double()
        y = y.float()[None]
        return y if extra is None else y + extra

    return fn


def variant_kernel(name: str):
    from dbquant.backends import reference

    if name == "exact":
        return reference.dbgemm_ref
    m = VARIANT.match(name)
    if not m or not 2 <= int(m[1]) <= 16 or int(m[2]) % 4:
        raise ValueError(f"variant {name!r}: exact or i{{bits 2..16}}g{{channels, a multiple of 4}}[o{{outliers}}]")
    return emulated_dbgemm(int(m[1]), int(m[2]), int(m[3] or 0))


@contextlib.contextmanager
def ref_dbgemm(fn):
    """The registry's ``ref`` dbgemm is ``fn`` inside the block (the oracle again after it)."""
    from dbquant.backends import reference, registry

    registry.register("dbgemm", "ref")(fn)
    try:
        yield
    finally:
        registry.register("dbgemm", "ref")(reference.dbgemm_ref)


def check_emulation(model) -> float:
    """The emulation of the kernel's own tables (int8: 8-bit codes, int16: 12-bit) against
    ``reference.dbgemm_i8lut_ref`` on the first packed linear, with an outlier channel: the largest
    |difference| relative to max |y| (float32 rounding only)."""
    from dbquant.backends import reference
    from dbquant.model.modules import PackedLinear

    lin = next(m for m in model.modules() if isinstance(m, PackedLinear))
    x = torch.randn(1, lin.in_features, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 7] = 80.0
    args = (lin.qweight, lin.float_scales(), lin.offset, lin.bias, lin.in_features, lin.group_size)
    worst = 0.0
    for kind, bits in (("int8", 8), ("int16", 12)):
        want = reference.dbgemm_i8lut_ref(x, *args, kind)
        got = emulated_dbgemm(bits, None, 0)(x, *args)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def teacher_forced(model, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits float32 [len(seq) - prompt_len, vocab]: the prompt prefilled, then each next token of
    int64 [T] ``seq`` fed alone through the decoder's one-token step."""
    from dbquant.runtime.decode import FastDecoder

    dec = FastDecoder(model, max_len=seq.numel(), backend="ref")
    dec._alloc(1)
    out = [dec.forward(seq[None, :prompt_len], 0).reshape(-1, model.config.vocab_size)[-1:]]
    for p in range(prompt_len, seq.numel() - 1):
        out.append(dec.forward(seq[None, p:p + 1], p).reshape(-1, model.config.vocab_size))
    return torch.cat(out).float()


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.bench.machine import environment
    from dbquant.format.files import write_json
    from dbquant.runtime.generate import GenerateOptions, build_prompt, generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--variants", default="exact,i8g64,i8g32,i8g64o2,i10g64,i12g64")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    try:
        kernels = {v: variant_kernel(v) for v in a.variants.split(",")}
    except ValueError as e:
        ap.error(str(e))
    torch.set_grad_enabled(False)
    model = dbquant.load(a.checkpoint, backend="ref")
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    rel = check_emulation(model)
    if rel > 1e-4:
        raise SystemExit(f"the emulation of the integer tables is off by {rel:.2e} (relative): fix it first")
    opts = GenerateOptions(prompt=a.prompt, max_new_tokens=a.max_new_tokens, backend="ref")
    ids, _ = build_prompt(model, tok, opts, a.checkpoint)
    with ref_dbgemm(kernels.get("exact", variant_kernel("exact"))):
        answer = generate(model, tok, opts, a.checkpoint).new_tokens
        seq = torch.cat([ids[0], answer])
        base = teacher_forced(model, seq, ids.shape[1])
    top2 = base.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    print(f"exact answer ({answer.numel()} tokens): {tok.decode(answer)!r}; top-2 margins < 0.2 at "
          f"{int((margins < 0.2).sum())} of {margins.numel()} steps (smallest {float(margins.min()):.3f})")
    rows = []
    for name, fn in kernels.items():
        with ref_dbgemm(fn):
            got = generate(model, tok, opts, a.checkpoint).new_tokens
            logits = teacher_forced(model, seq, ids.shape[1])
        n = min(got.numel(), answer.numel())
        differ = (got[:n] != answer[:n]).nonzero()
        first = int(differ[0]) if differ.numel() else (None if got.numel() == answer.numel() else n)
        d = logits - base
        row = {"variant": name, "answer": tok.decode(got), "first_different_token": first,
               "max_abs_dlogit": float(d.abs().max()), "rms_dlogit": float(d.pow(2).mean().sqrt()),
               "top1_agree": int((logits.argmax(-1) == base.argmax(-1)).sum()), "steps": int(base.shape[0])}
        rows.append(row)
        print(f"{name:<10} answer same {'all' if first is None else f'to token {first}':<12} max |dlogit| "
              f"{row['max_abs_dlogit']:.3f}  rms {row['rms_dlogit']:.4f}  greedy picks {row['top1_agree']}/"
              f"{row['steps']}  | {row['answer']!r}", flush=True)
    if a.json:
        write_json(a.json, {"checkpoint": a.checkpoint, "prompt": a.prompt, "exact_answer": tok.decode(answer),
                            "margins_below_0.2": int((margins < 0.2).sum()), "emulation_rel_error": rel,
                            "rows": rows, "machine": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
