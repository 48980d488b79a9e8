"""Peak resident memory of `dbquant quantize --streaming` against model size (issue 8).

Each quantize runs in a fresh child process that reports its own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM`` from /proc) when it ends, so imports,
calibration activations and every block count, and nothing of the parent does.

Runs (see docs/RESULTS.md for the numbers):
  baseline   the child importing dbquant/torch/transformers and loading the tokenizer only;
  synthetic  a random-weight Llama built on disk to be larger than the budget (fp32
             safetensors, one shard per block, SmolLM2's tokenizer), quantized with
             --streaming and a cheap calibration (it is a memory measurement);
  smollm2    SmolLM2-135M with the same cheap options, streaming and in memory; the two
             outputs are compared tensor by tensor.

Usage: python benchmarks/streaming_rss.py [--layers 15] [--hidden 2048] [--intermediate 4096]
           [--runs baseline,synthetic,smollm2] [--lr-weight 0] [--json docs/bench/streaming_rss.json]
The JSON is written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHEAP = ["--no-dad", "--preset", "fast", "--calib", "wiki", "--device", "cpu", "--iters", "1",
         "--bw-samples", "4", "--bw-seq-len", "64", "--bw-steps", "2", "--bw-batch", "2"]


def child(argv: list[str]) -> None:
    """Run one dbquant command, then print its peak memory as the last stdout line."""
    if argv and argv[0] == "baseline":
        from transformers import AutoTokenizer

        import dbquant.cli  # noqa: F401  (what every quantize run imports)
        from dbquant.model.sources import resolve_model

        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        rc = 0
    else:
        from dbquant.cli import main

        rc = main(argv)
    hwm = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")), None)
    print(json.dumps({"rc": rc, "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vmhwm_kib": hwm}), flush=True)


def measure(args: list[str]) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"command": "dbquant " + " ".join(args), "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mib": round(res["ru_maxrss_kib"] / 1024, 1),
            "vmhwm_mib": None if res["vmhwm_kib"] is None else round(res["vmhwm_kib"] / 1024, 1)}


def dir_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))


def build_synthetic(folder: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A random Llama written shard by shard (never whole in memory): fp32, tied embeddings."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dbquant.model.sources import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    stamp = folder / "synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == cfg.to_dict():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    groups: dict[str, list[str]] = {}
    for k in shapes:
        key = f"layer-{int(k.split('.')[2]):05d}" if k.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(k)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for key, names in groups.items():
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight")
                       else torch.randn(shapes[n], generator=gen) * 0.02) for n in names}
        save_file(tensors, folder / f"{key}.safetensors", metadata={"format": "pt"})
        weight_map.update({n: f"{key}.safetensors" for n in names})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    stamp.write_text(json.dumps(cfg.to_dict()))
    return folder


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="baseline,synthetic,smollm2")
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--lr-weight", default="0", help="--bw-lr-weight of the runs (0: scales only)")
    ap.add_argument("--synthetic-dir", default=os.path.join(tempfile.gettempdir(), "dbquant-synthetic-llama"))
    ap.add_argument("--json", default="docs/bench/streaming_rss.json")
    a = ap.parse_args()
    runs = a.runs.split(",")
    opts = CHEAP + ["--bw-lr-weight", a.lr_weight]
    out: dict = {"options": opts, "runs": {}}
    if Path(a.json).is_file():  # keep earlier runs of other kinds
        out["runs"] = json.loads(Path(a.json).read_text()).get("runs", {})
    work = Path(tempfile.mkdtemp(prefix="dbquant-rss-"))
    if "baseline" in runs:
        out["runs"]["baseline"] = measure(["baseline"])
        print(json.dumps(out["runs"]["baseline"]), flush=True)
    if "synthetic" in runs:
        src = build_synthetic(Path(a.synthetic_dir), a.layers, a.hidden, a.intermediate)
        layer = src / "layer-00000.safetensors"
        r = measure(["quantize", str(src), "--streaming", "--output", str(work / "synthetic"), *opts])
        r.update(model_bytes=dir_bytes(src), block_bytes=layer.stat().st_size,
                 output_bytes=dir_bytes(work / "synthetic"),
                 config={"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate})
        r["model_gib"] = round(r["model_bytes"] / 2**30, 3)
        r["rss_over_model"] = round(r["peak_rss_mib"] * 2**20 / r["model_bytes"], 3)
        out["runs"][f"synthetic_{a.layers}l_lrw{a.lr_weight}"] = r
        print(json.dumps(r), flush=True)
    if "smollm2" in runs:
        from dbquant.model.sources import resolve_model

        src = resolve_model("smollm2-135m")
        for mode in ("streaming", "in-memory"):
            flags = ["--streaming"] if mode == "streaming" else []
            r = measure(["quantize", "smollm2-135m", *flags, "--output", str(work / mode), *opts])
            r["model_bytes"] = dir_bytes(src)
            out["runs"][f"smollm2_{mode}_lrw{a.lr_weight}"] = r
            print(json.dumps(r), flush=True)
        import torch
        from safetensors.torch import load_file

        def tensors(d):
            t = {}
            for f in sorted(Path(d).glob("*.safetensors")):
                t.update(load_file(f))
            return t

        s, m = tensors(work / "streaming"), tensors(work / "in-memory")
        out["runs"][f"smollm2_identical_lrw{a.lr_weight}"] = sorted(s) == sorted(m) and all(
            torch.equal(s[k], m[k]) for k in m)
        print("smollm2 streaming == in-memory:", out["runs"][f"smollm2_identical_lrw{a.lr_weight}"], flush=True)
    out["machine"] = {"cpus": os.cpu_count(), "note": "2-core development VM, shared with other jobs"}
    from dbquant.format.files import write_json

    write_json(a.json, out)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
