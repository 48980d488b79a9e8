"""The ``dbquant`` command line: quantize, eval, generate, bench, inspect.

Every user error is a :class:`DbquantError` printed as one line (exit code 2); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .bench import cpu as bench
from .bench.gpu import format_table, run_gpu_bench
from .calibration import distributed
from .calibration.distributed import is_writer
from .calibration.streaming import quantize_streaming
from .errors import DbquantError
from .eval.protocols import evaluate
from .format.layout import unpack_bits
from .model import plan as planlib
from .model.checkpoint import is_dbquant_dir, load, save
from .model.modules import PackedLinear
from .model.plan import LinearPlan, bits_summary
from .model.sources import load_fp_model, resolve_model
from .model.vlm import image_prompt_inputs, processor_files, vlm_family
from .quantize import QuantizeOptions, make_plan, quantize
from .runtime.decode import LM_HEAD_DTYPES, FastDecoder, check_supported
from .runtime.kv import cache_nbytes, make_cache, parse_kv

DEFAULT_MODEL = "smollm2-135m"
# fdb-dad stage flags mapped 1:1 onto QuantizeOptions fields (None = the preset's value).
STAGE_FLAGS = ("bw_samples", "bw_seq_len", "bw_steps", "bw_batch", "bw_lr", "bw_lr_weight", "bw_inputs",
               "dad_samples", "dad_seq_len", "dad_steps", "dad_batch", "dad_lr", "dad_lr_weight", "dad_train",
               "dad_weighting", "dad_temperature", "dad_ce_weight", "dad_topk", "grad_clip")


def _load_any(model_or_dir: str, backend: str = "auto"):
    """(model, tokenizer, bpw) for a dbquant checkpoint, a builtin name or a local HF folder."""

    if is_dbquant_dir(model_or_dir):
        model = load(model_or_dir, backend=backend)
        tok = AutoTokenizer.from_pretrained(model_or_dir)
        return model, tok, (model.config.quantization_config.bpw or {}).get("bpw")
    model, tok = load_fp_model(model_or_dir)
    return model.eval(), tok, None


def _print_plan(plan, bits, out=sys.stdout) -> None:
    print(f"{'module':<48} {'shape':>12} {'group':>6} {'bpw':>6}", file=out)
    for p in plan:
        lay = p.layout
        print(f"{p.name:<48} {f'{lay.out_features}x{lay.in_features}':>12} {lay.group_size:>6} "
              f"{lay.bits_per_weight():>6.3f}", file=out)
    print(f"{len(plan)} linears, {bits['quantized_weights']:,} weights: {bits['bpw']:.4f} bits/weight; "
          f"whole checkpoint {bits['checkpoint_bpw']:.3f} bits/weight, "
          f"{bits['checkpoint_bytes'] / 2**20:.1f} MiB", file=out)


def cmd_quantize(a) -> int:
    stage_opts = {k: getattr(a, k) for k in STAGE_FLAGS if getattr(a, k) is not None}
    if a.no_blockwise:
        stage_opts["blockwise"] = False
    if a.no_dad:
        stage_opts["dad"] = False
    work_dir = a.work_dir or (str(Path(a.output).with_name(Path(a.output).name + ".work")) if a.output else None)
    opts = QuantizeOptions(method=a.method, group_size=a.group_size, offset=a.offset,
                           modules=tuple(a.modules.split(",")) + (("vision",) if a.quantize_vision else ()),
                           calib=None if a.calib == "none" else a.calib, calib_images=a.calib_images,
                           calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len, iters=a.iters,
                           seed=a.seed, preset=a.preset, device=a.device, resume=a.resume,
                           checkpoint_every=a.checkpoint_every, overwrite=a.overwrite,
                           work_dir=work_dir if a.method == "fdb-dad" else None, **stage_opts).check()
    if not a.dry_run:
        if not a.output:
            raise DbquantError("quantize needs --output DIR (or --dry-run to only print the plan)")
        if Path(a.output).exists() and not a.overwrite:  # refuse before minutes of work, not after
            raise DbquantError(f"output directory {a.output} already exists; pass --overwrite to replace it")

    # torchrun sets WORLD_SIZE: DAD then runs data parallel over the ranks (rank 0 writes)
    started = distributed.init_from_env(opts.device) if not a.dry_run else False
    try:
        if a.streaming and not a.dry_run:
            if distributed.world_size() > 1:
                raise DbquantError("--streaming runs in one process (it has no DAD to spread); "
                                   "launch it without torchrun")
            return _quantize_streaming(a, opts)
        return _quantize_in_memory(a, opts)
    finally:
        if started:
            distributed.close()


def _quantize_in_memory(a, opts) -> int:
    model, tok = load_fp_model(a.model)
    plan = make_plan(model, opts)
    _print_plan(plan, planlib.bits_summary(plan, model), out=sys.stderr if a.json else sys.stdout)
    if a.dry_run:
        return 0
    report = quantize(model, tok, opts, model_id=a.model)
    if not is_writer():  # distributed: every rank holds the same result; rank 0 writes it
        return 0
    extra = {}
    log = report.get("calibration", {}).pop("log", "")
    if log:
        extra["dbquant-log.jsonl"] = log

    extra.update(processor_files(resolve_model(a.model)))  # a VLM's image preprocessing travels with it
    save(model, a.output, tok, a.overwrite,
         extra_files={"dbquant-report.json": json.dumps({"model": a.model, **report}, indent=1), **extra})
    if opts.work_dir and not a.work_dir and Path(opts.work_dir).is_dir():  # the default work dir: log copied

        shutil.rmtree(opts.work_dir, ignore_errors=True)
    summary = {"output": str(a.output), "bpw": report["bpw"], "checkpoint_bpw": report["checkpoint_bpw"],
               "seconds": round(report["times"]["total_s"], 1)}
    print(json.dumps(summary) if a.json else
          f"wrote {a.output}: {report['bpw']:.4f} bits/weight over {report['layers']} linears "
          f"in {summary['seconds']} s")
    return 0


def _quantize_streaming(a, opts) -> int:
    """``quantize --streaming``: one decoder block in memory at a time (dbquant.calibration.streaming)."""

    folder = resolve_model(a.model)
    report = quantize_streaming(folder, AutoTokenizer.from_pretrained(folder), opts, a.output, model_id=a.model,
                                overwrite=a.overwrite)
    if opts.work_dir and not a.work_dir and Path(opts.work_dir).is_dir():  # the default work dir: log copied

        shutil.rmtree(opts.work_dir, ignore_errors=True)
    summary = {"output": str(a.output), "bpw": report["bpw"], "checkpoint_bpw": report["checkpoint_bpw"],
               "seconds": round(report["times"]["total_s"], 1), "streaming": True}
    print(json.dumps(summary) if a.json else
          f"wrote {a.output} (streaming): {report['bpw']:.4f} bits/weight over {report['layers']} linears "
          f"in {summary['seconds']} s")
    return 0


def cmd_eval(a) -> int:
    model, tok, bpw = _load_any(a.model, a.backend)
    kv = None
    if a.protocol == "kv-ppl" or a.kv:  # options of dbquant.eval.kv_ppl.evaluate_kv
        kv = {"kv": a.kv, "n_windows": a.windows, "seq_len": a.seq_len, "residual": a.kv_residual,
              "sink": a.kv_sink, "group": a.kv_group, "fft": False if a.kv_no_fft else None,
              "scale_dtype": a.kv_scales}
    res = evaluate(model, tok, a.protocol, n_windows=a.windows or 32, seq_len=a.seq_len or 512, kv=kv)
    res = {"model": a.model, "bpw": bpw, **res}
    if a.json:
        print(json.dumps(res))
    else:
        bits = "fp" if bpw is None else f"{bpw:.3f} bpw"
        print(f"{a.model}: {a.protocol} PPL {res['ppl']:.3f} over {res['tokens']} tokens ({bits})")
    return 0


def cmd_generate(a) -> int:
    model, tok, _ = _load_any(a.model, a.backend)
    if a.max_new_tokens < 1:
        raise DbquantError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    extra = {}  # pixel tensors of --image
    if a.image:
        if vlm_family(model) is None:
            raise DbquantError(f"--image needs a vision-language model; {a.model} is a {type(model).__name__}")
        folder = a.model if is_dbquant_dir(a.model) else resolve_model(a.model)
        extra = image_prompt_inputs(folder, model, tok, a.image, a.prompt, chat=not a.raw)
        ids = extra.pop("input_ids")
    elif not a.raw and tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(a.prompt, return_tensors="pt").input_ids
    torch.manual_seed(a.seed)
    engine = _pick_engine(a, model)
    t = time.perf_counter()
    if engine == "dbquant":
        out, st = _fast_generate(a, model, tok, ids)
        speed = f"prefill {st.prefill_tok_s:.1f} tokens/s, decode {st.decode_tok_s:.1f} tokens/s"
    else:
        cache = None
        if a.kv:
            cache = make_cache(model, parse_kv(a.kv, residual=a.kv_residual, sink=a.kv_sink))
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, past_key_values=cache, **extra)
        speed = "Hugging Face generate()"
        if cache is not None:
            nb = cache_nbytes(cache)
            speed += f"; KV cache {a.kv}: {nb['total'] / max(nb['tokens'], 1):.0f} bytes/token held"
    dt = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True).strip())
    print(f"[{len(new)} tokens in {dt:.2f} s: {len(new) / dt:.1f} tokens/s overall ({speed}), "
          f"prompt {ids.shape[1]} tokens, engine {engine}]", file=sys.stderr)
    return 0


def _pick_engine(a, model) -> str:
    """``dbquant`` (the lean decoder of dbquant.runtime.decode) or ``hf`` (model.generate)."""
    if a.engine == "hf":
        return "hf"
    reason = None
    if getattr(a, "kv", None):
        reason = "--kv needs the Hugging Face generate() path (its cache plugs into it)"
    elif getattr(a, "image", None):
        reason = "--image needs the Hugging Face generate() path (the VLM class merges the image features)"
    else:
        try:
            check_supported(model)
        except DbquantError as e:
            reason = str(e)
    if reason is None:
        return "dbquant"
    if a.engine == "dbquant":
        raise DbquantError(f"--engine dbquant cannot run this: {reason}")
    return "hf"


def _fast_generate(a, model, tok, ids):

    gc = model.generation_config
    dec = FastDecoder(model, max_len=ids.shape[1] + a.max_new_tokens, backend=a.backend,
                      lm_head_dtype=LM_HEAD_DTYPES[a.lm_head_dtype])
    return dec.generate(ids, a.max_new_tokens, do_sample=a.sample, temperature=gc.temperature or 1.0,
                        top_k=gc.top_k or 0, top_p=gc.top_p or 1.0, eos_token_id=gc.eos_token_id or tok.eos_token_id,
                        generator=torch.Generator().manual_seed(a.seed))


def cmd_bench(a) -> int:
    if a.backend in ("triton", "cuda"):
        shapes = None if a.smoke and a.shapes == "all" else _shapes(a.shapes)
        rows = run_gpu_bench(a.backend, shapes=shapes, ms=_ints(a.m, "--m") if a.m else None,
                             group_size=a.group_size, smoke=a.smoke)
        print(format_table(rows))
    elif a.e2e:
        rows = [r for t in _ints(a.threads, "--threads")
                for r in bench.e2e_bench(a.e2e, fp_model=a.fp_model, prompt_tokens=a.prompt_tokens,
                                         new_tokens=a.new_tokens, threads=t, repeats=a.repeats)]
        for r in rows:
            print(json.dumps(r))
    else:
        rows = bench.kernel_bench(_shapes(a.shapes), _ints(a.m or "1,16", "--m"), _ints(a.threads, "--threads"),
                                  _choices(a.mode, ("cache", "stream"), "--mode"),
                                  _choices(a.backends, bench.BACKENDS, "--backends"), a.group_size,
                                  progress=print)
    if a.json:
        bench.write_json(a.json, rows)
        print(f"wrote {a.json}", file=sys.stderr)
    if a.plot:
        if a.e2e or a.backend in ("triton", "cuda"):
            raise DbquantError("--plot draws kernel rows; run it without --e2e/--backend")
        bench.plot(rows, a.plot)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DbquantError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise DbquantError(f"{flag} values must be >= 1, got {text!r}")
    return vals


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise DbquantError(f"{flag}: unknown value(s) {bad or text!r}; choose from {list(allowed)}")
    return vals


def _shapes(text: str) -> list[tuple[int, int]]:
    """``smollm2``, ``llama7b``, ``all`` or a comma list of NxK (out x in)."""
    named = {"smollm2": bench.SMOLLM2_SHAPES, "llama7b": bench.LLAMA7B_SHAPES,
             "all": bench.SMOLLM2_SHAPES + bench.LLAMA7B_SHAPES}
    if text in named:
        return named[text]
    out = []
    for item in text.split(","):
        try:
            n, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise DbquantError(f"--shapes: {item!r} is not NxK (e.g. 4096x4096) nor one of {list(named)}") from None
        if n < 1 or k < 1:
            raise DbquantError(f"--shapes: {item!r} must have positive sizes")
        out.append((n, k))
    return out


def cmd_inspect(a) -> int:
    model = load(a.dir, backend="ref")
    source = None
    if a.source:
        source = load_fp_model(a.source)[0]
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        # padded channels hold 0 bits, so ones per real weight = total ones / (N * K)
        ones = unpack_bits(m.qweight).sum(dim=(1, 2)).double() / (m.out_features * m.in_features)
        row = {"module": name, "shape": [m.out_features, m.in_features], "group": m.group_size,
               "bpw": m.layout.bits_per_weight(), "density_b1": ones[0].item(), "density_b2": ones[1].item()}
        if source is not None:
            w = source.get_submodule(name).weight.float()
            row["rel_error"] = ((w - m.dequantize()).square().sum() / w.square().sum()).item()
        rows.append(row)
    plan = [LinearPlan(r["module"], model.get_submodule(r["module"]).layout, False) for r in rows]
    summary = bits_summary(plan, model)
    if a.json:
        print(json.dumps({"layers": rows, **summary}))
        return 0
    hdr = f"{'module':<48} {'shape':>10} {'g':>4} {'bpw':>6} {'ones b1':>8} {'ones b2':>8}"
    print(hdr + (f" {'rel err':>9}" if source is not None else ""))
    for r in rows:
        line = (f"{r['module']:<48} {'x'.join(map(str, r['shape'])):>10} {r['group']:>4} {r['bpw']:>6.3f} "
                f"{r['density_b1']:>8.3f} {r['density_b2']:>8.3f}")
        print(line + (f" {r['rel_error']:>9.4f}" if source is not None else ""))
    print(f"{len(rows)} packed linears: {summary['bpw']:.4f} bits/weight; whole checkpoint "
          f"{summary['checkpoint_bpw']:.3f} bits/weight ({summary['checkpoint_bytes'] / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    d = QuantizeOptions()
    p = argparse.ArgumentParser(prog="dbquant", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model to dual-binary ~2-bit weights")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"builtin name or local HF folder (default {DEFAULT_MODEL})")
    q.add_argument("--output", "-o", help="output folder (written atomically)")
    q.add_argument("--method", default=d.method,
                   help="fdb-dad (default: FDB init, block-wise reconstruction, distillation), fdb (init only), rtn")
    q.add_argument("--group-size", type=int, default=d.group_size, help="input channels per scale group")
    q.add_argument("--offset", action="store_true", help="store a per-group offset beta (+16 bits/group)")
    q.add_argument("--modules", default=",".join(d.modules), help="comma list of: decoder, lm_head, vision")
    q.add_argument("--quantize-vision", action="store_true",
                   help="VLMs: also quantize the vision tower and projector (kept full precision by default)")
    q.add_argument("--calib-images", metavar="DIR",
                   help="VLMs: images with a same-name .txt caption; block-wise reconstruction and DAD then run "
                        "on image+text samples through the whole VLM")
    q.add_argument("--calib", default=d.calib,
                   help="text for activation statistics: wiki, a text file/folder, hf:NAME[:CONFIG]:SPLIT, or none")
    q.add_argument("--calib-samples", type=int, default=d.calib_samples)
    q.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len)
    q.add_argument("--iters", type=int, default=d.iters, help="FDB least-squares refinement iterations")
    q.add_argument("--seed", type=int, default=d.seed)
    c = q.add_argument_group("fdb-dad calibration (unset options come from --preset)")
    c.add_argument("--preset", default=d.preset, help="fast (<5 min on a 2-core CPU for SmolLM2), default "
                   "(~6 min), best (hours on CPU)")
    c.add_argument("--no-blockwise", action="store_true", help="skip block-wise reconstruction")
    c.add_argument("--no-dad", action="store_true", help="skip deviation-aware distillation")
    for flag, typ, hlp in (("bw-samples", int, "calibration windows for block-wise"),
                           ("bw-seq-len", int, "tokens per block-wise window"),
                           ("bw-steps", int, "optimizer steps per block"),
                           ("bw-batch", int, "windows per block-wise step"),
                           ("bw-lr", float, "block-wise Adam LR of the scales"),
                           ("bw-lr-weight", float, "block-wise Adam LR of the latent weights (0: scales only)"),
                           ("bw-inputs", str, "quant (train on the quantized chain's activations) or fp"),
                           ("dad-samples", int, "calibration windows for DAD"),
                           ("dad-seq-len", int, "tokens per DAD window"),
                           ("dad-steps", int, "DAD optimizer steps"),
                           ("dad-batch", int, "windows per DAD step"),
                           ("dad-lr", float, "DAD Adam LR of the scales"),
                           ("dad-lr-weight", float, "DAD Adam LR of the latent weights"),
                           ("dad-train", str, "scales or scales+weights"),
                           ("dad-weighting", str, "uniform, teacher-entropy or deviation"),
                           ("dad-temperature", float, "distillation temperature"),
                           ("dad-ce-weight", float, "weight of an added ground-truth cross-entropy term"),
                           ("dad-topk", int, "teacher logits cached per token"),
                           ("grad-clip", float, "max gradient norm (0: off)")):
        c.add_argument("--" + flag, type=typ, default=None, help=hlp)
    c.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda, cuda:N")
    c.add_argument("--work-dir", help="checkpoints and log (default: OUTPUT.work, removed after success)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its work dir")
    c.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="optimizer steps between checkpoints (stage and block ends always checkpoint)")
    c.add_argument("--streaming", action="store_true",
                   help="layer streaming: read, calibrate, pack and write one decoder block at a time (models "
                        "larger than memory; FDB init + block-wise only, needs --no-dad)")
    q.add_argument("--dry-run", action="store_true", help="print the per-layer plan and bits, then stop")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or dbquant checkpoint")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--protocol", default="wiki")
    e.add_argument("--windows", type=int, default=None, help="windows (default: wiki 32, kv-ppl 16)")
    e.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: wiki 512, kv-ppl 1024)")
    e.add_argument("--kv", help="KV cache for --protocol kv-ppl: fp, K/V (e.g. 1.5/1.58, 2/2), kivi2, hqq2, hqq1")
    e.add_argument("--kv-residual", type=int, help="full-precision recent tokens (default 128; 0: whole prefix)")
    e.add_argument("--kv-sink", type=int, help="first tokens kept in full precision (attention sinks; default 1)")
    e.add_argument("--kv-group", type=int, help="tokens per quantization group (default 32)")
    e.add_argument("--kv-no-fft", action="store_true", help="VidKV keys without the FFT (ablation)")
    e.add_argument("--kv-scales", choices=("fp16", "fp8"), help="stored scale width (default: fp8 for K/V, fp16 for kivi2)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object (ppl, tokens, protocol, bpw, ...)")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text and print tokens/s")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    g.add_argument("--image", help="VLMs: an image file the prompt refers to (hf engine)")
    g.add_argument("--backend", default="auto")
    g.add_argument("--kv", help="quantized KV cache (hf engine): K/V such as 1.5/1.58, kivi2, hqq2, hqq1, fp")
    g.add_argument("--kv-residual", type=int, help="full-precision recent tokens of the KV cache (default 128)")
    g.add_argument("--kv-sink", type=int, help="first tokens kept in full precision (attention sinks; default 1)")
    g.add_argument("--engine", default="auto", choices=("auto", "dbquant", "hf"),
                   help="dbquant: the lean decoder (dbquant.runtime.decode; Llama-family); hf: model.generate(); "
                        "auto: dbquant when it supports the model")
    g.add_argument("--lm-head-dtype", default="float32", choices=("float32", "bfloat16", "int8", "w8a8"),
                   help="how the dbquant engine computes a dense output projection (int8: per-row "
                        "int8 copy made at load, a quarter of the bytes; w8a8: the same with int8 "
                        "activations per block of 32, ~2x faster; see docs/RESULTS.md for their PPL cost)")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="kernel microbenchmarks (CPU; --backend triton|cuda for GPUs) or --e2e decode speed")
    b.add_argument("--shapes", default="all", help="smollm2, llama7b, all, or NxK list (out x in), e.g. 4096x4096")
    b.add_argument("--m", help="activation rows, comma list (default 1,16)")
    b.add_argument("--threads", default="1,2", help="comma list of thread counts")
    b.add_argument("--mode", default="cache,stream", help="cache, stream or both")
    b.add_argument("--backends", default=",".join(("fp32", "bf16", "ref", "cpu")), help="fp32, bf16, ref, cpu")
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--backend", default="cpu", choices=("cpu", "triton", "cuda"),
                   help="cpu: the CPU kernel rows above; triton/cuda: the GPU benchmark vs torch fp16/bf16")
    b.add_argument("--smoke", action="store_true", help="GPU benchmark at a tiny shape (runs under TRITON_INTERPRET=1)")
    b.add_argument("--e2e", metavar="DIR", help="end-to-end prefill/decode tokens/s of checkpoint DIR vs the fp32 model")
    b.add_argument("--fp-model", default=DEFAULT_MODEL, help="the fp32 model --e2e compares against")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", metavar="PATH", help="write the rows (and the environment) as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of the kernel rows")
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("inspect", help="per-layer table of a dbquant checkpoint")
    i.add_argument("dir")
    i.add_argument("--source", help="the full-precision model, to report reconstruction error")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except DbquantError as e:
        print(f"dbquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
