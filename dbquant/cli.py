"""The ``dbquant`` command line: quantize, eval, generate, bench, inspect.

Argument parsing only: each command turns its flags into one options object (or the
arguments of one library call) and prints what the library returns. ``quantize``'s flags
are generated from :class:`dbquant.quantize.QuantizeOptions` (each field carries its flag
and help), so a new quantize option is one field there.

Every user error is a :class:`DbquantError` printed as one line (exit code 2); Ctrl-C
prints one line (exit code 130; for ``quantize`` how to ``--resume``); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields
from pathlib import Path

from transformers import AutoTokenizer

from .backends import cpu as cpu_backend
from .bench import cpu as bench
from .bench import kv as bench_kv
from .bench import peers as bench_peers
from .bench.gpu import format_table, run_gpu_bench
from .calibration import distributed
from .calibration.distributed import is_writer
from .calibration.streaming import quantize_streaming
from .errors import DbquantError
from .eval import kv_ppl
from .eval.protocols import PROTOCOLS, evaluate
from .model import plan as planlib
from .model.checkpoint import is_dbquant_dir, load, measured_bits
from .model.inspect import layer_stats, load_source, stats_summary, table_stats
from .model.sources import load_fp_model, resolve_model
from .model.vlm import processor_files
from .quantize import (
    QuantizeOptions,
    budgeted,
    check_output,
    drop_work_dir,
    make_plan,
    make_table_plan,
    quantize,
    save_output,
)
from .runtime.decode import CACHE_DTYPE_CHOICES, LM_HEAD_DTYPES
from .runtime.generate import ENGINES, GenerateOptions, generate
from .runtime.kv.quantizers import SCALE_DTYPES
from .runtime.kv.spec import DEFAULT_GROUP, DEFAULT_RESIDUAL, DEFAULT_SINK

DEFAULT_MODEL = "smollm2-135m"


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _tokenizer(folder):
    """The tokenizer of a model folder; ``DbquantError`` (not transformers' traceback) when it has none."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # transformers' "no tokenizer" errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DbquantError(f"{folder} has no usable tokenizer ({first[:200]}); copy the tokenizer files "
                           "(tokenizer.json, tokenizer_config.json, ...) of the original model into it") from None


def _fp_source(name: str):
    """The local folder of a full-precision model, refused early when it is a dbquant checkpoint."""
    folder = resolve_model(name)
    if is_dbquant_dir(folder):
        raise DbquantError(f"{name} is a dbquant checkpoint (already quantized); quantize takes the full-precision "
                           "model it came from")
    return folder


def _load_fp(name: str):
    """(model, tokenizer) of a full-precision model; the tokenizer is checked first (no minutes lost)."""
    tok = _tokenizer(_fp_source(name))
    return load_fp_model(name)[0], tok


def _load_any(model_or_dir: str, backend: str = "auto"):
    """(model, tokenizer, bpw, folder) for a dbquant checkpoint, a builtin name or a local HF folder."""

    if is_dbquant_dir(model_or_dir):
        tok = _tokenizer(model_or_dir)
        model = load(model_or_dir, backend=backend)
        return model, tok, (model.config.quantization_config.bpw or {}).get("bpw"), model_or_dir
    folder = resolve_model(model_or_dir)
    tok = _tokenizer(folder)
    return load_fp_model(model_or_dir)[0].eval(), tok, None, folder


def _options(cls, a: argparse.Namespace, **override):
    """``cls`` (an options dataclass) from the parsed flags of the same names."""
    return cls(**{**{f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}, **override})


# ---------------------------------------------------------------- quantize

def _print_plan(plan, bits, out=sys.stdout, tables=()) -> None:
    print(f"{'module':<48} {'shape':>12} {'k':>2} {'group':>6} {'scale':>5} {'offset':>6} {'bpw':>6}", file=out)
    for p in plan:
        lay = p.layout
        print(f"{p.name:<48} {f'{lay.out_features}x{lay.in_features}':>12} {lay.planes:>2} {lay.group_size:>6} "
              f"{lay.scale_bits:>5} {str(lay.offset).lower():>6} {lay.bits_per_weight():>6.3f}", file=out)
    for t in tables:
        lay = t.layout
        print(f"{t.name:<48} {'(reads the embedding)' if lay is None else f'{lay.rows}x{lay.dim}':>12} {'':>2} "
              f"{'' if lay is None else lay.group_size:>6} {'':>5} {'':>6} "
              f"{'' if lay is None else f'{lay.bits_per_weight():.3f}':>6}  {t.kind}", file=out)
    print(f"{len(plan)} linears, {bits['quantized_weights']:,} weights: {bits['bpw']:.4f} bits/weight; "
          f"whole checkpoint {bits['checkpoint_bpw']:.3f} bits/weight, "
          f"{bits['checkpoint_bytes'] / 2**20:.1f} MiB", file=out)


def quantize_options(a: argparse.Namespace) -> QuantizeOptions:
    """The checked :class:`QuantizeOptions` of a parsed ``quantize`` command line.

    Beyond the 1:1 fields: ``--quantize-vision`` adds the ``vision`` module set, and the work
    dir of ``fdb-dad`` defaults to ``OUTPUT.work`` (other methods keep no run state).
    """
    work_dir = a.work_dir or (str(Path(a.output).with_name(Path(a.output).name + ".work")) if a.output else None)
    return _options(QuantizeOptions, a, modules=tuple(a.modules) + (("vision",) if a.quantize_vision else ()),
                    work_dir=work_dir if a.method == "fdb-dad" else None).check()


def cmd_quantize(a) -> int:
    opts = quantize_options(a)
    a.work_dir_used = opts.work_dir  # for main()'s Ctrl-C line
    if not a.dry_run:
        if not a.output:
            raise DbquantError("quantize needs --output DIR (or --dry-run to only print the plan)")
        check_output(a.output, a.overwrite)  # exists / not writable: refused before minutes of work, not after

    # torchrun sets WORLD_SIZE: DAD then runs data parallel over the ranks (rank 0 writes)
    started = distributed.init_from_env(opts.device) if not a.dry_run else False
    try:
        if a.streaming and not a.dry_run:
            if distributed.world_size() > 1:
                raise DbquantError("--streaming runs in one process (it has no DAD to spread); "
                                   "launch it without torchrun")
            if opts.target_bpw is not None:
                raise DbquantError("--target-bpw measures every linear's sensitivity on the whole model; it does "
                                   "not run with --streaming")
            if opts.time_budget is not None:
                raise DbquantError("--time-budget is fitted to the in-memory pipeline's stages; give --streaming "
                                   "its --bw-steps instead")
            return _quantize_streaming(a, opts)
        return _quantize_in_memory(a, opts)
    finally:
        if started:
            distributed.close()


def _quantize_in_memory(a, opts) -> int:
    model, tok = _load_fp(a.model)
    opts = opts.with_calib(tok, model)  # --calib auto: wiki, or wiki plus chat for a model with a chat template
    alloc: dict = {}
    plan = make_plan(model, opts, tok, report=alloc)
    tables = make_table_plan(model, opts, plan)
    _print_plan(plan, planlib.bits_summary(plan, model, tables), out=sys.stderr if a.json else sys.stdout,
                tables=tables)
    if alloc:
        info = alloc["allocation"]
        print(f"--target-bpw {info['target_bpw']}: {info['bpw']:.4f} bits/weight chosen by {info['sensitivity']} "
              f"sensitivity among k in {info['planes']} in {info['seconds']:.0f} s; layouts {info['layouts']}",
              file=sys.stderr if a.json else sys.stdout)
    if opts.method == "fdb-dad":  # quantize() fits the same steps again: the fit is deterministic
        info = budgeted(model, opts, plan)[1]
        head = ""
        if "steps" in info:
            head = f"--time-budget {opts.time_budget:g} min: " + ", ".join(
                f"{k.replace('_', '-')} {before} -> {after}" for k, (before, after) in info["steps"].items()) + "; "
        elif "bf16_dividend" in info:  # bf16 autocast is fast here: the time it saves buys DAD steps
            before, after = info["bf16_dividend"]["dad_steps"]
            head = f"bf16 autocast (fast on this CPU): dad-steps {before} -> {after}; "
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in info["predicted_s"].items())
        print(f"{head}predicted {info['predicted_total_s'] / 60:.1f} min on the reference 2-core CPU ({stages})",
              file=sys.stderr if a.json else sys.stdout)
    if a.dry_run:
        return 0
    report = quantize(model, tok, opts, model_id=a.model, plan=plan)
    report.update(alloc)
    if not is_writer():  # distributed: every rank holds the same result; rank 0 writes it
        return 0
    extra = {}
    log = report.get("calibration", {}).pop("log", "")
    if log:
        extra["dbquant-log.jsonl"] = log
    extra.update(processor_files(resolve_model(a.model)))  # a VLM's image preprocessing travels with it
    # checkpoints are dropped only once the output reloads; a failed save says how to --resume
    save_output(model, a.output, tok, a.overwrite,
                {"dbquant-report.json": json.dumps({"model": a.model, **report}, indent=1), **extra}, opts.work_dir)
    _print_summary(a, opts, report, "")
    return 0


def _quantize_streaming(a, opts) -> int:
    """``quantize --streaming``: one decoder block in memory at a time (dbquant.calibration.streaming)."""

    folder = _fp_source(a.model)
    report = quantize_streaming(folder, _tokenizer(folder), opts, a.output, model_id=a.model, overwrite=a.overwrite)
    _print_summary(a, opts, report, " (streaming)")
    return 0


def _print_summary(a, opts, report: dict, how: str) -> None:
    """Drop the default work dir (its log was copied into the output), then print one summary line."""
    if not a.work_dir:
        drop_work_dir(opts.work_dir)
    summary = {"output": str(a.output), "bpw": report["bpw"], "checkpoint_bpw": report["checkpoint_bpw"],
               "seconds": round(report["times"]["total_s"], 1)}
    if how:
        summary["streaming"] = True
    print(json.dumps(summary) if a.json else
          f"wrote {a.output}{how}: {report['bpw']:.4f} bits/weight over {report['layers']} linears "
          f"in {summary['seconds']} s")


# ---------------------------------------------------------------- eval, generate

def _check_eval_sizes(a) -> None:
    """--windows >= 1 and --seq-len >= 2 when given (0 must not silently mean the default)."""
    if a.windows is not None and a.windows < 1:
        raise DbquantError(f"--windows must be >= 1, got {a.windows} (leave it out for the protocol's default)")
    if a.seq_len is not None and a.seq_len < 2:
        raise DbquantError(f"--seq-len must be >= 2 (a window predicts its tokens after the first), got {a.seq_len} "
                           "(leave it out for the protocol's default)")


def cmd_eval(a) -> int:
    _check_eval_sizes(a)  # before loading a model
    model, tok, bpw, folder = _load_any(a.model, a.backend)
    kv = None
    if a.protocol == "kv-ppl" or a.kv:  # options of dbquant.eval.kv_ppl.evaluate_kv
        kv = {"kv": a.kv, "n_windows": a.windows, "seq_len": a.seq_len, "residual": a.kv_residual,
              "sink": a.kv_sink, "group": a.kv_group, "fft": False if a.kv_no_fft else None,
              "scale_dtype": a.kv_scales}
    sizes = {k: v for k, v in (("n_windows", a.windows), ("seq_len", a.seq_len)) if v is not None}  # unset: protocol's
    res = evaluate(model, tok, a.protocol, kv=kv, **sizes)
    size = measured_bits(folder, model)
    res = {"model": a.model, "bpw": bpw, "checkpoint_bpw": size["checkpoint_bpw"],
           "checkpoint_bytes": size["checkpoint_bytes"], **res}
    if a.json:
        print(json.dumps(res))
    else:
        bits = "fp" if bpw is None else f"{bpw:.3f} bpw"
        print(f"{a.model}: {a.protocol} PPL {res['ppl']:.3f} over {res['tokens']} tokens ({bits}; whole checkpoint "
              f"{size['checkpoint_bpw']:.3f} bits/parameter, {size['checkpoint_bytes']:,} bytes)")
        if res.get("kv_note"):
            print(f"note: {res['kv_note']}")
    return 0


def cmd_generate(a) -> int:
    model, tok, _, _ = _load_any(a.model, a.backend)
    g = generate(model, tok, _options(GenerateOptions, a), model_id=a.model)
    n = len(g.new_tokens)
    print(tok.decode(g.new_tokens, skip_special_tokens=True).strip())
    print(f"[{n} tokens in {g.seconds:.2f} s: {n / g.seconds:.1f} tokens/s overall ({g.speed}), "
          f"prompt {g.prompt_tokens} tokens, engine {g.engine}]", file=sys.stderr)
    if g.warning:
        print(f"dbquant: warning: {g.warning}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- bench, inspect

def cmd_bench(a) -> int:
    extra = {}  # more top-level JSON fields: --rounds' per-round rows
    if a.backend in ("triton", "cuda"):
        shapes = None if a.smoke and a.shapes == "all" else _shapes(a.shapes)
        rows = run_gpu_bench(a.backend, shapes=shapes, ms=_ints(a.m, "--m") if a.m else None,
                             group_size=a.group_size, dtype=a.dtype, smoke=a.smoke)
        print(format_table(rows))
    elif a.peers and (not a.e2e or a.kv):
        raise DbquantError("--peers adds llama.cpp's rows to --e2e DIR (without --kv)")
    elif a.e2e and a.kv:  # fast decoder, float32 vs packed KV cache, long prompts (dbquant/bench/kv.py)
        rows = bench_kv.e2e_kv_bench(a.e2e, a.kv.split(","), _ints(a.prompt_tokens, "--prompt-tokens"),
                                     a.new_tokens, _ints(a.threads, "--threads"), progress=print)
        for r in bench_kv.budget_rows(rows, bench_kv.checkpoint_bytes(a.e2e)):
            print(json.dumps(r))
            rows.append(r)
    elif a.e2e:
        threads, prompts = _ints(a.threads, "--threads"), _ints(a.prompt_tokens, "--prompt-tokens")
        if a.rounds < 1:
            raise DbquantError(f"--rounds must be >= 1, got {a.rounds}")
        peer_types = _choices(a.peer_types, bench_peers.TYPES, "--peer-types") if a.peers else []
        prep = _llamacpp(a.fp_model, peer_types) if a.peers else None  # first: fail before minutes of rows
        rows = []
        for rnd in range(a.rounds):  # each round: every dbquant row, then every llama.cpp row
            got = [r for t in threads for p in prompts
                   for r in bench.e2e_bench(a.e2e, fp_model=a.fp_model, prompt_tokens=p,
                                            new_tokens=a.new_tokens, threads=t, repeats=a.repeats)]
            if prep is not None:
                try:
                    got += bench_peers.e2e_rows(prep, peer_types, threads, prompts, a.new_tokens, a.repeats)
                except Exception as e:  # noqa: BLE001 - any failure of the tool: say it, drop nothing silently
                    raise DbquantError(f"--peers: llama-bench failed: {e}") from e
            rows += [dict(r, round=rnd) for r in got]
        if prep is not None:
            bench_peers.add_ratios(rows)
        if a.rounds > 1:
            extra["per_round"], rows = rows, bench.merge_rounds(rows)
        for r in rows:
            print(json.dumps(r))
    else:
        if a.stream_mib is not None and a.stream_mib < 1:
            raise DbquantError(f"--stream-mib must be >= 1, got {a.stream_mib}")
        stream_bytes = None if a.stream_mib is None else a.stream_mib << 20
        rows = bench.kernel_bench(_shapes(a.shapes), _ints(a.m or "1,16", "--m"), _ints(a.threads, "--threads"),
                                  _choices(a.mode, ("cache", "stream"), "--mode"),
                                  _choices(a.backends, bench.BACKENDS, "--backends"), a.group_size,
                                  progress=print, stream_bytes=stream_bytes)
    if a.json:
        bench.write_json(a.json, rows, **extra)
        print(f"wrote {a.json}", file=sys.stderr)
    plot = a.plot or (str(Path(a.json).with_suffix(".png")) if a.peers and a.json else None)
    if plot:
        if a.backend in ("triton", "cuda") or (a.e2e and a.kv):
            raise DbquantError("--plot draws kernel rows or --e2e rows; not --backend triton/cuda nor --e2e --kv")
        (bench.plot_e2e if a.e2e else bench.plot)(rows, plot)
        print(f"wrote {plot}", file=sys.stderr)
    return 0


def _llamacpp(fp_model: str, types: list[str]) -> dict:
    """The cached llama.cpp build and GGUF files of ``fp_model`` for --peers (dbquant/bench/peers.py);
    a DbquantError that says why when there are none."""
    root = bench_peers.llamacpp_root()
    try:
        prep = bench_peers.build_llamacpp()
    except Exception as e:  # noqa: BLE001 - pip, cmake or the compiler: all mean "no llama.cpp"
        raise DbquantError(
            f"--peers: llama.cpp could not be found or built in {root}: {e}\n"
            f"It is built once from the llama-cpp-python {bench_peers.LLAMA_CPP_PYTHON_VERSION} sdist (pip "
            "download from PyPI, cmake, a C++ compiler; ~9 min) and cached there. Fix the cause above, or run "
            "`python benchmarks/peer_llamacpp.py` to see each step, or drop --peers for dbquant's rows alone."
        ) from e
    bench_peers.make_ggufs(prep, types, resolve_model(fp_model))
    bad = {ty: f["error"] for ty, f in prep["files"].items() if "error" in f}
    if bad:
        raise DbquantError(f"--peers: llama.cpp's GGUF files of {fp_model} could not be made in {root / 'models'}: "
                           + "; ".join(f"{ty}: {err}" for ty, err in bad.items()))
    try:
        return bench_peers.ensure_runnable(prep)
    except Exception as e:  # noqa: BLE001 - the no-AMX rebuild failed
        raise DbquantError("--peers: llama.cpp's native build dies on this CPU and "
                           f"the no-AMX build failed: {e}") from e


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
    source = load_source(a.source) if a.source else None
    rows, tables = layer_stats(model, source), table_stats(model)
    summary = {**stats_summary(model, rows), **measured_bits(a.dir, model)}  # checkpoint_* as measured on disk
    if a.json:
        print(json.dumps({"layers": rows, "tables": tables, **summary}))
        return 0
    hdr = f"{'module':<48} {'shape':>10} {'k':>2} {'g':>4} {'scale':>5} {'offset':>6} {'bpw':>6}  ones per plane"
    print(hdr + (f" {'rel err':>9}" if source is not None else ""))
    for r in rows:
        line = (f"{r['module']:<48} {'x'.join(map(str, r['shape'])):>10} {r['planes']:>2} {r['group']:>4} "
                f"{r['scale_bits']:>5} {'yes' if r['offset'] else 'no':>6} {r['bpw']:>6.3f}  "
                f"{' '.join(f'{d:.3f}' for d in r['density']):<24}")
        print(line + (f" {r['rel_error']:>9.4f}" if source is not None else ""))
    for t in tables:
        if t["bits"] is None:
            print(f"{t['module']:<48} {'tied':>10} {'':>2} {'':>4} {'':>5} {'':>6} {'':>6}  "
                  "output projection reads the embedding's table")
        else:
            print(f"{t['module']:<48} {'x'.join(map(str, t['shape'])):>10} {'':>2} {t['group']:>4} {'':>5} {'':>6} "
                  f"{t['bpw']:>6.3f}  "
                  f"{t['kind']} table, {t['bits']}-bit{' float' if t['bits'] == 16 else ' int'}")
    print(f"{len(rows)} packed linears: {summary['bpw']:.4f} bits/weight; whole checkpoint "
          f"{summary['checkpoint_bpw']:.3f} bits/parameter ({summary['checkpoint_bytes']:,} bytes of safetensors, "
          f"{summary['parameters']:,} parameters)")
    return 0


# ---------------------------------------------------------------- the parser

def _field_type(annotation) -> type:
    """The flag type of a field annotation: ``int | None`` -> int."""
    args = [t for t in typing.get_args(annotation) if t is not type(None)]
    return args[0] if args else annotation


def add_option_flags(groups: dict[str, argparse._ActionsContainer], cls) -> None:
    """One flag per field of the options dataclass ``cls`` that carries CLI metadata
    (``help``, ``section``, ``flag``, ``argparse``: see :func:`dbquant.quantize.option`),
    added to ``groups[section]`` with the field's default and the field's name as dest."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        kw = dict(f.metadata["argparse"])
        typ = _field_type(hints[f.name])
        if "action" not in kw:
            if typ is bool:
                kw["action"] = "store_true"
            else:
                kw.setdefault("type", typ)
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        groups[f.metadata["section"]].add_argument(flag, dest=f.name, default=f.default, help=f.metadata["help"],
                                                   **kw)


def _quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model to dual-binary ~2-bit weights")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"builtin name or local HF folder (default {DEFAULT_MODEL})")
    q.add_argument("--output", "-o", help="output folder (written atomically)")
    c = q.add_argument_group("fdb-dad calibration (unset options come from --preset)")
    add_option_flags({"main": q, "fdb-dad": c}, QuantizeOptions)
    q.add_argument("--quantize-vision", action="store_true",
                   help="VLMs: also quantize the vision tower and projector (kept full precision by default)")
    c.add_argument("--streaming", action="store_true",
                   help="layer streaming: read, calibrate, pack and write one decoder block at a time (models "
                        "larger than memory; FDB init + block-wise only, needs --no-dad)")
    q.add_argument("--dry-run", action="store_true", help="print the per-layer plan and bits, then stop")
    q.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    q.set_defaults(fn=cmd_quantize)


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a model or dbquant checkpoint")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--protocol", default="wiki", choices=PROTOCOLS,
                   help="wiki (built-in eval articles), code (Python stdlib sources) or kv-ppl (through a KV cache)")
    e.add_argument("--windows", type=int, default=None, help=f"windows (default: wiki 32, kv-ppl {kv_ppl.N_WINDOWS})")
    e.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per window (default: wiki 512, kv-ppl {kv_ppl.SEQ_LEN})")
    e.add_argument("--kv", help="KV cache for --protocol kv-ppl: fp, K/V (e.g. 1.5/1.58, 2/2), kivi2, hqq2, hqq1")
    e.add_argument("--kv-residual", type=int,
                   help=f"full-precision recent tokens (default {DEFAULT_RESIDUAL}; 0: whole prefix)")
    e.add_argument("--kv-sink", type=int,
                   help=f"first tokens kept in full precision (attention sinks; default {DEFAULT_SINK})")
    e.add_argument("--kv-group", type=int, help=f"tokens per quantization group (default {DEFAULT_GROUP})")
    e.add_argument("--kv-no-fft", action="store_true", help="VidKV keys without the FFT (ablation)")
    e.add_argument("--kv-scales", choices=SCALE_DTYPES,
                   help="stored scale width (default: fp8 for K/V, fp16 for kivi2)")
    e.add_argument("--backend", default="auto")
    e.add_argument("--json", action="store_true", help="print one JSON object (ppl, tokens, protocol, bpw, ...)")
    e.set_defaults(fn=cmd_eval)


def _generate_parser(sub) -> None:
    d = {f.name: f.default for f in fields(GenerateOptions)}
    g = sub.add_parser("generate", help="generate text and print tokens/s")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    g.add_argument("--image", help="VLMs: an image file the prompt refers to (hf engine)")
    g.add_argument("--backend", default=d["backend"])
    g.add_argument("--kv", help="quantized KV cache: K/V such as 1.5/1.58, kivi2, hqq2, hqq1, fp (VidKV with "
                               "1.58-bit values runs packed in the dbquant engine; the others in the hf engine)")
    g.add_argument("--kv-residual", type=int,
                   help=f"full-precision recent tokens of the KV cache (default {DEFAULT_RESIDUAL})")
    g.add_argument("--kv-sink", type=int,
                   help=f"first tokens kept in full precision (attention sinks; default {DEFAULT_SINK})")
    g.add_argument("--engine", default=d["engine"], choices=ENGINES,
                   help="dbquant: the lean decoder (dbquant.runtime.decode; Llama-family); hf: model.generate(); "
                        "auto: dbquant when it supports the model")
    g.add_argument("--lm-head-dtype", default=d["lm_head_dtype"], choices=tuple(LM_HEAD_DTYPES),
                   help="how the dbquant engine computes a dense output projection (int8: per-row "
                        "int8 copy made at load, a quarter of the bytes; w8a8: the same with int8 "
                        "activations per block of 32, ~2x faster; see docs/RESULTS.md for their PPL cost)")
    g.add_argument("--prefill-gemm", default=d["prefill_gemm"], choices=cpu_backend.GEMM_DTYPES,
                   help="the dbquant engine's GEMM on a prompt of more than 32 tokens: fp32 (exact), bf16, "
                        "int8 (activations rounded to 8 bits per group, exact weights), w8a8 (the same "
                        "activations, each group's weight rounded to 8-bit levels), auto: w8a8 where AVX-512 "
                        "VNNI runs it, bf16 on AMX or where bf16 is otherwise fast, int8 where AVX2 is the "
                        "fastest path, else fp32 (docs/RESULTS.md has their speed and PPL cost)")
    g.add_argument("--cache-dtype", default=d["cache_dtype"], choices=CACHE_DTYPE_CHOICES,
                   help="the dbquant engine's float KV cache (without --kv): float16 (half the bytes attention "
                        "reads a token), float32 (exact), auto: float16 where the layers of a token run natively")
    g.set_defaults(fn=cmd_generate)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench",
                       help="kernel microbenchmarks (CPU; --backend triton|cuda for GPUs) or --e2e decode speed")
    b.add_argument("--shapes", default="all", help="smollm2, llama7b, all, or NxK list (out x in), e.g. 4096x4096")
    b.add_argument("--m", help="activation rows, comma list (default 1,16)")
    b.add_argument("--threads", default="1,2", help="comma list of thread counts")
    b.add_argument("--mode", default="cache,stream", help="cache, stream or both")
    b.add_argument("--backends", default=",".join(bench.BACKENDS), help=", ".join(bench.BACKENDS))
    b.add_argument("--group-size", type=int, default=64)
    b.add_argument("--backend", default="cpu", choices=("cpu", "triton", "cuda"),
                   help="cpu: the CPU kernel rows above; triton/cuda: the GPU benchmark vs torch fp16/bf16")
    b.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="--backend triton|cuda: activations, output and the dense baseline's weight")
    b.add_argument("--smoke", action="store_true", help="GPU benchmark at a tiny shape (runs under TRITON_INTERPRET=1)")
    b.add_argument("--e2e", metavar="DIR",
                   help="end-to-end prefill/decode tokens/s of checkpoint DIR vs the fp32 model")
    b.add_argument("--fp-model", default=DEFAULT_MODEL, help="the fp32 model --e2e compares against")
    b.add_argument("--prompt-tokens", default="128", help="comma list of prompt lengths (--e2e)")
    b.add_argument("--kv", help="--e2e: comma list of KV caches for the fast decoder, e.g. fp,1.5/1.58: one row per "
                               "(kv, prompt length, threads) with decode tok/s, cache bytes and peak RSS")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--rounds", type=int, default=1,
                   help="--e2e: run every row this many times, round after round (with --peers: dbquant's rows, then "
                        "llama.cpp's, in each round), and report the median per row and of each round's ratio: on a "
                        "shared machine both engines then see the same minutes")
    b.add_argument("--json", metavar="PATH", help="write the rows (and the environment) as JSON")
    b.add_argument("--plot", metavar="PATH", help="write a PNG of the kernel rows, or of the --e2e rows "
                                                 "(decode and prefill tok/s per engine and thread count)")
    b.add_argument("--stream-mib", type=int, metavar="MIB",
                   help="stream mode's rotating set and bandwidth buffer in MiB (default: 4x the L3 read at "
                        "run time, at most a quarter of MemAvailable)")
    b.add_argument("--peers", action="store_true",
                   help="--e2e: add llama.cpp's rows (llama-bench on GGUF files of --fp-model; built once into "
                        "the cache, ~9 min) and draw the plot next to --json (or at --plot)")
    b.add_argument("--peer-types", default="Q4_0,Q2_K,TQ2_0", help="--peers: comma list of GGUF types "
                                                                   f"({', '.join(bench_peers.TYPES)})")
    b.set_defaults(fn=cmd_bench)


def _inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="per-layer table of a dbquant checkpoint")
    i.add_argument("dir")
    i.add_argument("--source", help="the full-precision model, to report reconstruction error")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbquant", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_quantize_parser, _eval_parser, _generate_parser, _bench_parser, _inspect_parser):
        add(sub)
    return p


def _interrupted_line(a: argparse.Namespace) -> str:
    """What a Ctrl-C left behind and how to go on: for ``quantize``, its work dir and ``--resume``."""
    work = getattr(a, "work_dir_used", None)
    if work and (Path(work) / "state.pt").is_file():
        return (f"interrupted; the calibration checkpoints are in {work}: rerun the same command with --resume "
                "to continue")
    if a.cmd == "quantize":
        return "interrupted before any checkpoint was written; rerun the same command to start again"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except DbquantError as e:
        print(f"dbquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print(f"\ndbquant: {_interrupted_line(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
