"""What the decoder's cheaper output projections cost in perplexity (``--lm-head-dtype``).

The lean decoder can compute a dense output projection in bfloat16 (``bfloat16``: weight and
input rounded to bf16, fp32 accumulation, the logits rounded to bf16, as ``F.linear`` on bf16
tensors returns them), from an int8 copy of its weight (``int8``) and, in addition, from int8
activations per block of 32 channels (``w8a8``). The
wiki protocol runs through the Hugging Face forward, so this script gives the checkpoint's
``lm_head`` the same numerics there: the weight replaced by its per-row int8 rounding, and
for ``w8a8`` a forward pre-hook rounding the head's input per block of 32 as the C++ kernel
does (tests/test_decode.py pins the kernel to that definition).

Two 4-bit modes ask whether a head half the int8 bytes is possible (the decoder has no kernel for
them): ``int4sym32`` (llama.cpp Q4_0's shape: per group of 32, codes -8..7 with the scale
max|w| / 7, fp16 scale) and ``int4asym32`` (Q4_1's: per group of 32, 16 levels between min and max,
fp16 scale and minimum), both applied to the weight.

Usage: python benchmarks/lm_head_ppl.py CHECKPOINT [--windows 16] [--modes float32,bfloat16,int8,w8a8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def round_input_q8(_module, args):
    """The head's input rounded to int8 per block of 32 channels (scale max|x| / 127)."""
    x = args[0]
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d.clamp_min(1e-30)), torch.zeros_like(xb))
    return ((q * d).reshape(x.shape),)


def round_bf16(_module, args, out=None):
    """A forward (pre-)hook: the head's input (or its output) rounded to bfloat16, kept in float32."""
    x = args[0] if out is None else out
    y = x.to(torch.bfloat16).float()
    return (y,) if out is None else y


def int4_groups(w: torch.Tensor, g: int, symmetric: bool) -> torch.Tensor:
    """w float32 [N, K] (K a multiple of g) rounded to 4 bits per group of g along K, as float32 [N, K]."""
    wb = w.reshape(w.shape[0], -1, g)
    if symmetric:
        d = (wb.abs().amax(-1, keepdim=True) / 7).half().float()
        q = torch.clamp(torch.round(wb / d.clamp_min(1e-30)), -8, 7)
        return (q * d).reshape(w.shape)
    lo = wb.amin(-1, keepdim=True).half().float()
    d = ((wb.amax(-1, keepdim=True) - lo) / 15).half().float().clamp_min(1e-30)
    return (torch.clamp(torch.round((wb - lo) / d), 0, 15) * d + lo).reshape(w.shape)


MODES = ("float32", "bfloat16", "int8", "w8a8", "int4sym32", "int4asym32")


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    import dbquant
    from dbquant.eval.protocols import evaluate
    from dbquant.runtime.decode import quantize_rows_int8

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--modes", default="float32,bfloat16,int8,w8a8", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--json", help="write the results here (atomically)")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: unknown {sorted(set(modes) - set(MODES))}; use {', '.join(MODES)}")
    model, tok = dbquant.load(a.checkpoint), AutoTokenizer.from_pretrained(a.checkpoint)
    head = model.lm_head
    codes, scale = quantize_rows_int8(head.weight.detach())
    rows = []
    exact = head.weight.detach().clone()
    for mode in modes:
        # (a tied head gets its own weight: the embedding stays exact)
        if mode == "bfloat16":
            head.weight = torch.nn.Parameter(exact.to(torch.bfloat16).float(), requires_grad=False)
            hooks = [head.register_forward_pre_hook(round_bf16), head.register_forward_hook(round_bf16)]
        else:
            if mode in ("int8", "w8a8"):
                head.weight = torch.nn.Parameter(codes.float() * scale[:, None], requires_grad=False)
            elif mode.startswith("int4"):
                head.weight = torch.nn.Parameter(int4_groups(exact, 32, mode == "int4sym32"), requires_grad=False)
            else:
                head.weight = torch.nn.Parameter(exact, requires_grad=False)
            hooks = [head.register_forward_pre_hook(round_input_q8)] if mode == "w8a8" else []
        rows.append({"lm_head_dtype": mode,
                     "wiki_ppl": evaluate(model, tok, n_windows=a.windows, progress=False)["ppl"]})
        print(json.dumps(rows[-1]), flush=True)
        for h in hooks:
            h.remove()
    if a.json:
        from dbquant.format.files import write_json

        write_json(a.json, {"benchmark": "lm_head_ppl", "checkpoint": a.checkpoint, "windows": a.windows,
                            "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
