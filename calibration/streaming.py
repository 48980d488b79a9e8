"""Layer streaming: FDB init + block-wise reconstruction of a model larger than memory.

The model is built as a skeleton on the ``meta`` device (no storage). Only the input
embedding and one decoder block at a time are materialised, read straight from the
source safetensors shards into the block's own storage (:class:`ShardReader`: plain reads
at the offsets of the safetensors header, no memory map, no intermediate copy; the
embedding, final norm and untied head are copied to the output piecewise, never whole).
Each block goes through the same
:func:`~dbquant.calibration.blockwise.calibrate_block` as the in-memory path, is packed,
written as a safetensors shard of its own and freed (back to ``meta``). Peak resident
memory is therefore about one block (plus its optimizer state) and the calibration
activations, not the model.

Where things are while a run is going:

- ``WORK/shards/block-NNNNN.safetensors``: finished blocks (each written temp-then-rename),
- ``WORK/state.pt`` + ``WORK/acts-NNN.pt``: position and the next block's inputs (resume),
- ``OUTPUT`` appears only at the end, in one rename: shards + the non-block tensors +
  ``config.json`` + tokenizer, with ``model.safetensors.index.json`` written last.

``--resume`` skips every block whose shard is done. DAD is not part of streaming: it runs
the whole model end to end (``--no-dad`` is required; see docs/SCALING.md for FSDP).
The output loads with :func:`dbquant.load` exactly like the in-memory one, and holds the
same tensors bit for bit (``tests/test_streaming.py``).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from dbquant.calibration.blockwise import (
    INPUT_MODES,
    BlockInputs,
    BlockRun,
    block_names,
    calibrate_block,
    capture_block_inputs,
    export_weights,
    to_device,
)
from dbquant.calibration.pipeline import blockwise_config, pick_device, semantic_options
from dbquant.calibration.runstate import RunState, make_fingerprint, tensor_digest
from dbquant.calibration.sources import mix_sampler, uses_generated
from dbquant.errors import DbquantError
from dbquant.format.files import atomic_dir, read_header, validate_files
from dbquant.model import plan as planlib
from dbquant.model.convert import pack_into
from dbquant.model.hf import DbquantConfig, attach, format_metadata
from dbquant.model.plan import DECODER_BLOCKS, block_path, decoder_blocks
from dbquant.model.vlm import is_vlm

INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------- reading the source

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_CHUNK = 16 << 20  # bytes per read when a tensor is converted or copied piecewise


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    header = read_header(path)  # checks the file is whole
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n, header


class ShardReader:
    """The tensors of a HF model folder (one safetensors file or an index of shards), read on demand.

    Reads are plain ``readinto`` calls straight into the destination tensor's storage, not
    memory maps: a mapped file's touched pages count as resident memory while it stays
    mapped, and a copy out of the map doubles the block for a moment. Converting dtypes
    (e.g. bf16 sources into the float32 model) goes through 16 MiB pieces.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise DbquantError(f"{self.dir} has no model.safetensors nor {INDEX}; streaming reads safetensors "
                               "weights only (re-save the model with save_pretrained(safe_serialization=True))")
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data offset, header entry)
        for name in files:
            path = self.dir / name
            base, header = _header(path)
            for k, v in header.items():
                if k != "__metadata__":
                    if v["dtype"] not in _DTYPES:
                        raise DbquantError(f"{path}: tensor {k} has dtype {v['dtype']}, which streaming cannot read")
                    self.entries[k] = (path, base, v)

    def names(self, prefix: str = "") -> list[str]:
        return [k for k in self.entries if k.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2]["shape"])

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor ``out`` with tensor ``name`` (converted to ``out.dtype``)."""
        path, base, e = self.entries[name]
        if tuple(out.shape) != tuple(e["shape"]):
            raise DbquantError(f"{path}: {name} is {e['shape']} in the file but {list(out.shape)} in the model config")
        src = _DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        flat = out.view(-1)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + start)
            if src == out.dtype:
                view = memoryview(flat.view(torch.uint8).numpy())
                got = 0
                while got < len(view):  # readinto may return short counts
                    n = f.readinto(view[got:])
                    if not n:
                        raise DbquantError(f"{path} is truncated while reading {name}")
                    got += n
            else:
                per = max(1, _CHUNK // src.itemsize)
                for i in range(0, flat.numel(), per):
                    n = min(per, flat.numel() - i)
                    raw = f.read(n * src.itemsize)
                    flat[i:i + n] = torch.frombuffer(bytearray(raw), dtype=src)
        return out

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.read_into(name, torch.empty(self.shape(name), dtype=dtype))

    def copy_to_shard(self, names: list[str], dest: Path, metadata: dict[str, str]) -> None:
        """Write the named tensors as float32 into a new safetensors file, piece by piece
        (an embedding never sits in memory whole); temp file, then rename."""
        header: dict = {"__metadata__": metadata}
        off = 0
        for n in names:
            numel = 1
            for d in self.shape(n):
                numel *= d
            header[n] = {"dtype": "F32", "shape": list(self.shape(n)), "data_offsets": [off, off + 4 * numel]}
            off += 4 * numel
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for n in names:
                path, base, e = self.entries[n]
                src = _DTYPES[e["dtype"]]
                start, end = e["data_offsets"]
                with open(path, "rb") as f:
                    f.seek(base + start)
                    left = end - start
                    while left:
                        raw = f.read(min(_CHUNK - _CHUNK % src.itemsize, left))
                        left -= len(raw)
                        if src != torch.float32:
                            raw = torch.frombuffer(bytearray(raw), dtype=src).float().numpy().tobytes()
                        out.write(raw)
        os.replace(tmp, dest)

    def digest(self) -> str:
        """Identity of the weights without reading them all: every file's header, size and
        three 64 KiB samples (start, middle, end). Cheap on a model of any size."""
        h = hashlib.sha256()
        for path in sorted({p for p, _, _ in self.entries.values()}):
            size = path.stat().st_size
            h.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as f:
                for off in (0, size // 2, max(0, size - 65536)):
                    f.seek(off)
                    h.update(f.read(65536))
        return h.hexdigest()[:16]


def skeleton(model_dir: str | os.PathLike) -> nn.Module:
    """The model with every parameter on ``meta`` (no memory), float32, eval mode."""

    config = AutoConfig.from_pretrained(model_dir)
    if is_vlm(config):
        raise DbquantError(f"--streaming does not take vision-language models ({config.model_type}); quantize "
                           "it in memory (without --streaming)")
    if config.model_type not in DECODER_BLOCKS:
        raise DbquantError(f"streaming supports {sorted(DECODER_BLOCKS)} models, not {config.model_type!r}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def materialize(model: nn.Module, prefix: str, reader: ShardReader) -> nn.Module:
    """Give the submodule ``prefix`` real CPU storage and read its tensors into it (all must be there)."""
    mod = model.get_submodule(prefix)
    expected = list(mod.state_dict().keys())  # persistent tensors only (rotary tables are computed)
    have = set(reader.names(prefix + "."))
    missing = [k for k in expected if f"{prefix}.{k}" not in have]
    extra = sorted(have - {f"{prefix}.{k}" for k in expected})
    if missing or extra:
        raise DbquantError(f"{prefix}: the source files do not match the model config (missing {missing[:4]}, "
                           f"unexpected {extra[:4]})")
    mod.to_empty(device="cpu")
    tensors = {**dict(mod.named_parameters()), **dict(mod.named_buffers())}
    with torch.no_grad():
        for k in expected:
            reader.read_into(f"{prefix}.{k}", tensors[k].data)
    return mod


def free(module: nn.Module | None = None) -> None:
    """Drop a submodule's storage (back to ``meta``) and hand freed heap back to the OS.

    glibc keeps freed small-object heap (e.g. ~160 MB after tokenizing the wiki text)
    resident until ``malloc_trim``; without it that memory stacks under the next block.
    """
    if module is not None:
        module.to("meta")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _fix_rotary(model: nn.Module) -> None:
    """Rotary tables are computed buffers (not in the files): rebuild them on the CPU."""
    base = model.get_submodule(block_path(model).rsplit(".", 1)[0])
    rot = getattr(base, "rotary_emb", None)
    if rot is not None:
        base.rotary_emb = type(rot)(config=model.config)


# ---------------------------------------------------------------- writing the output

def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written to a temporary name, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _shard_index(files: list[Path]) -> dict:
    weight_map, total = {}, 0
    for path in files:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                weight_map[k] = path.name
                sl = f.get_slice(k)
                shape = sl.get_shape()
                n = 1
                for s in shape:
                    n *= s
                total += n * {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}.get(sl.get_dtype(), 4)
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


# ---------------------------------------------------------------- the run

def check_streaming(opts) -> None:
    """Streaming covers FDB init + block-wise on the decoder; refuse what it cannot do."""
    if opts.method != "fdb-dad" or not opts.calib:
        raise DbquantError("--streaming needs --method fdb-dad with calibration text (it streams the block-wise "
                           "stage); --method fdb/rtn fit in memory one linear at a time already")
    if not opts.blockwise:
        raise DbquantError("--streaming calibrates block by block: it cannot run with --no-blockwise")
    if opts.dad and opts.dad_steps:
        raise DbquantError("--streaming runs FDB init + block-wise only; DAD needs the whole model at once "
                           "(pass --no-dad; for DAD on large models see docs/SCALING.md)")
    if uses_generated(opts.calib):
        raise DbquantError("--streaming cannot generate `self` or `chat` calibration text (the model is never "
                           "whole in memory); use text sources only, e.g. --calib wiki or a mix of files")
    if tuple(opts.modules) != ("decoder",):
        raise DbquantError(f"--streaming quantizes the decoder blocks only (--modules decoder), not {opts.modules}")
    if opts.bw_inputs not in INPUT_MODES:
        raise DbquantError(f"unknown block-wise input mode {opts.bw_inputs!r}; choose from {INPUT_MODES}")


@dataclass
class _Stream:
    """One streaming run's moving parts: the meta skeleton, the source reader, the run state,
    the work dir's ``shards/`` folder, the safetensors metadata every shard carries, the
    compute device, and the report being filled (``blocks``, ``rel_weight_error``)."""

    model: nn.Module
    reader: ShardReader
    run: RunState
    shards: Path
    meta: dict[str, str]
    device: torch.device
    report: dict


def quantize_streaming(model_dir: str | os.PathLike, tokenizer, opts, output: str | os.PathLike,
                       model_id: str = "", progress: bool = True, overwrite: bool = False) -> dict:
    """Calibrate, pack and write the model in ``model_dir`` block by block into ``output``.

    ``opts`` is a :class:`dbquant.quantize.QuantizeOptions` (resolved here); its ``work_dir``
    holds the finished shards until the end. Returns the report written as
    ``dbquant-report.json`` (options, bits, per-layer weight errors, times).
    """
    opts = opts.check().with_calib(tokenizer, streaming=True).resolved()
    check_streaming(opts)
    if opts.work_dir is None:
        raise DbquantError("--streaming needs a work dir (it keeps the finished blocks there)")
    if opts.embed_bits not in ("auto", "fp32") or opts.head_bits in ("8", "fp16"):
        raise DbquantError(f"--streaming copies the embedding and output projection as they are; --embed-bits "
                           f"{opts.embed_bits} / --head-bits {opts.head_bits} are not built for it yet (quantize "
                           "in memory, or leave them at auto / fp32)")
    out = Path(output)
    if out.exists() and not overwrite:
        raise DbquantError(f"output directory {out} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    device = pick_device(opts.device)
    reader = ShardReader(model_dir)
    model = skeleton(model_dir)
    plan = planlib.make_plan(model, opts.group_size, opts.uses_offset, tuple(opts.modules), opts.stored_scale_bits)
    bits = planlib.bits_summary(plan, model)

    t = time.perf_counter()
    bw_b = mix_sampler(None, tokenizer, opts.calib)(opts.bw_samples, opts.bw_seq_len, opts.seed + 1)
    times["data_s"] = time.perf_counter() - t
    free()  # the tokenizer's working memory
    fingerprint = make_fingerprint(model={"id": model_id, "files": reader.digest()}, options=semantic_options(opts),
                                   data={"blockwise": tensor_digest(bw_b)}, streaming=True)
    run = RunState(opts.work_dir, fingerprint, resume=opts.resume, checkpoint_every=opts.checkpoint_every,
                   overwrite=opts.overwrite)
    shards = Path(opts.work_dir) / "shards"
    if not opts.resume and shards.exists():
        shutil.rmtree(shards)
    shards.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)

    qcfg = DbquantConfig(modules=[p.name for p in plan], group_size=opts.group_size, offset=opts.uses_offset,
                         method=opts.method, bpw=bits, layers=planlib.layer_rows(plan))
    meta = {"format": "pt", "dbquant": json.dumps(format_metadata(qcfg))}
    s = _Stream(model, reader, run, shards, meta, device, {"blocks": [], "rel_weight_error": {}})
    if run.finished:  # every shard is done and only the output failed: straight to assembling it
        s.report = run.final()["report"]
    else:
        _stream_blocks(s, plan, opts, bw_b, times, progress)
        _copy_rest(s)
        run.finish({"report": s.report})  # shards + report kept until the output validates

    attach(model, qcfg)
    times["total_s"] = time.perf_counter() - t0
    report = {"options": asdict(opts), "streaming": True, **bits, "layers": len(plan), **s.report, "times": times,
              "calibration": {"fingerprint": fingerprint["hash"], "device": str(device), "work_dir": opts.work_dir}}
    try:
        _write_output(s, Path(model_dir), out, overwrite, tokenizer, {"model": model_id, **report})
        _validate_output(out, plan, qcfg)
    except (DbquantError, OSError) as e:
        detail = e if isinstance(e, DbquantError) else f"{type(e).__name__}: {e.strerror or e}"
        raise DbquantError(f"writing {out} failed ({detail}); the finished blocks are kept in {opts.work_dir}: fix "
                           "the output location and rerun the same command with --resume (and --overwrite if the "
                           "output folder now exists)") from None
    run.cleanup()
    shutil.rmtree(shards, ignore_errors=True)
    return report


def _validate_output(out: Path, plan: list, qcfg: DbquantConfig) -> None:
    """Check the written output without loading it (it may not fit in memory): config.json says
    dbquant, and every shard is whole and holds each planned linear's packed tensors at their shapes."""
    config = json.loads((out / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "dbquant":
        raise DbquantError(f"{out}/config.json does not say quant_method dbquant")
    files = sorted(str(f) for f in out.glob("*.safetensors"))
    validate_files(files, {p.name: p.layout for p in plan}, format_metadata(qcfg))


def _resume_position(s: _Stream, n_blocks: int) -> tuple[int, dict | None]:
    """(first block to calibrate, its mid-block checkpoint or None); every earlier shard must exist."""
    resumed = s.run.resumed
    state = resumed if (resumed and resumed.get("stage") == "blockwise") else None
    done = resumed is not None and resumed.get("stage") == "blockwise-done"
    start = n_blocks if done else (state["position"]["block"] if state else 0)
    for i in range(start):
        if not (s.shards / f"block-{i:05d}.safetensors").is_file():
            raise DbquantError(f"resume: {s.shards}/block-{i:05d}.safetensors is missing; start over with --overwrite")
    return start, state


def _first_inputs(s: _Stream, start: int, bw_b: torch.Tensor, times: dict) -> BlockInputs:
    """Inputs of block ``start``: captured through the embedding (block 0) or read from acts-NNN.pt.

    bw_b: int64 [S, T] block-wise token windows.
    """
    if start == 0:
        t = time.perf_counter()
        embed = s.model.get_input_embeddings()
        embed_name = next(n for n, m in s.model.named_modules() if m is embed)
        materialize(s.model, embed_name, s.reader)
        _fix_rotary(s.model)
        x_fp, kwargs_cpu = capture_block_inputs(s.model, bw_b)
        x_q = x_fp
        free(embed)
        times["capture_s"] = time.perf_counter() - t
    else:
        acts = s.run.load(f"acts-{start:03d}.pt")
        if acts is None:
            raise DbquantError(f"resume: {s.run.dir}/acts-{start:03d}.pt is missing; start over with --overwrite")
        x_fp, x_q, kwargs_cpu = acts["x_fp"], acts["x_q"], acts["kwargs"]
    return BlockInputs(x_fp, x_q, to_device(kwargs_cpu, s.device), kwargs_cpu)


def _stream_blocks(s: _Stream, plan: list, opts, bw_b: torch.Tensor, times: dict, progress: bool) -> None:
    """Materialise, calibrate, pack, write and free each decoder block still to do."""
    model = s.model
    names = block_names(model, plan)
    path = block_path(model)
    n_blocks = len(decoder_blocks(model))
    start, state = _resume_position(s, n_blocks)
    if start >= n_blocks:
        return
    inputs = _first_inputs(s, start, bw_b, times)
    cfg = blockwise_config(opts)
    bar = tqdm(total=n_blocks * cfg.steps, initial=start * cfg.steps + (state["position"]["step"] if state else 0),
               desc="block-wise (streaming)", unit="step", disable=not progress, dynamic_ncols=True)
    job = BlockRun(model, {p.name: p for p in plan}, {}, cfg, s.run, s.device, bar, opts.iters,
                   finish=lambda _block, i: _write_block(s, names[i], i))
    t = time.perf_counter()
    try:
        for i in range(start, n_blocks):
            materialize(model, f"{path}.{i}", s.reader)
            inputs, rep = calibrate_block(job, i, names[i], inputs, state if i == start else None)
            s.report["blocks"].append(rep)
            job.init.clear()  # this block's init weights: not needed any more
            free(model.get_submodule(f"{path}.{i}"))
    finally:
        bar.close()
    times["blockwise_s"] = time.perf_counter() - t


def _write_block(s: _Stream, names_i: list[str], i: int) -> None:
    """Pack trained block ``i`` and write it as ``shards/block-NNNNN.safetensors``, recording
    each linear's relative weight error against the fp weight (read again, one at a time)."""
    weights = export_weights(s.model, names_i)
    for n, q in weights.items():
        w = s.reader.read(f"{n}.weight")
        s.report["rel_weight_error"][n] = float((w - q.dequantize()).square().sum()
                                                / w.square().sum().clamp_min(1e-30))
    pack_into(s.model, weights)
    path = block_path(s.model)
    sd = {f"{path}.{i}.{k}": v for k, v in s.model.get_submodule(f"{path}.{i}").state_dict().items()}
    write_shard(s.shards / f"block-{i:05d}.safetensors", sd, s.meta)


def _copy_rest(s: _Stream) -> None:
    """Everything outside the blocks (embedding, final norm, untied lm_head), copied as float32."""
    path = block_path(s.model)
    rest_names = [n for n in s.reader.names() if not n.startswith(path + ".")]
    if s.model.config.get_text_config().tie_word_embeddings:
        head = s.model.get_output_embeddings()
        head_name = next((n for n, m in s.model.named_modules() if m is head), None)
        rest_names = [n for n in rest_names if n != f"{head_name}.weight"]
    s.reader.copy_to_shard(rest_names, s.shards / "rest.safetensors", s.meta)


def _write_output(s: _Stream, model_dir: Path, out: Path, overwrite: bool, tokenizer, report: dict) -> None:
    """Assemble ``out`` in one rename: shards, config, generation config, tokenizer, report, log,
    and the safetensors index last."""
    n_blocks = len(decoder_blocks(s.model))
    files = [s.shards / f"block-{i:05d}.safetensors" for i in range(n_blocks)] + [s.shards / "rest.safetensors"]
    with atomic_dir(out, overwrite) as tmp:
        for f in files:  # same file system as the work dir in the usual layout; copy otherwise
            shutil.copyfile(f, tmp / f.name)
        s.model.config.save_pretrained(tmp)
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / gen.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "dbquant-report.json").write_text(json.dumps(report, indent=1))
        log = s.run.log_text()
        if log:
            (tmp / "dbquant-log.jsonl").write_text(log)
        (tmp / INDEX).write_text(json.dumps(_shard_index([tmp / f.name for f in files]), indent=1))  # last
