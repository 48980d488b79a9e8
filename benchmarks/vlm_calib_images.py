"""Calibrating the SmolVLM test bed with and without images (``--calib-images``, issue 7).

Two ``dbquant quantize smolvlm-testbed`` runs with the same block-wise + DAD budget, one on
text only (through the language model) and one whose first block-wise and DAD samples are
image+caption samples run through the whole VLM; then the text-only wiki PPL of each.

The images are seeded synthetic colour fields (the test bed's vision tower is random, so
image content carries no meaning: this measures that the multimodal path runs at real
scale, what it costs, and what it does to text quality). Captions are the first words of
calibration-split wiki documents, never the eval split.

Usage: python benchmarks/vlm_calib_images.py [--images 16] [--out runs/vlm-calib]
           [--json docs/bench/vlm_calib_images.json]
The JSON is written atomically (temp file, then rename).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# "fast"-sized block-wise plus 16 DAD steps: both stages see the images
BUDGET = ["--preset", "default", "--bw-samples", "32", "--bw-steps", "16", "--dad-samples", "32",
          "--dad-steps", "16", "--device", "cpu"]


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """n seeded 256x256 images (smooth random colour fields) with wiki captions (calibration split)."""
    import torch
    from PIL import Image

    from dbquant.eval.data import load_text

    docs = load_text("wiki", "calibration")
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        field = torch.rand(1, 3, 8, 8, generator=gen)
        img = torch.nn.functional.interpolate(field, size=(256, 256), mode="bicubic", align_corners=False)
        arr = (img[0].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(" ".join(docs[i % len(docs)].split()[:40]))


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dbquant", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): dbquant {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--out", default="runs/vlm-calib")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    out = Path(a.out)
    images = out / "images"
    make_images(images, a.images)
    rows = []
    for name, extra in (("text", []), ("images", ["--calib-images", str(images)])):
        ckpt = out / name
        quant_s, _ = run(["quantize", "smolvlm-testbed", *BUDGET, *extra, "-o", str(ckpt), "--overwrite"])
        report = json.loads((ckpt / "dbquant-report.json").read_text())
        _, stdout = run(["eval", str(ckpt), "--json"])
        ppl = json.loads(stdout)["ppl"]
        row = {"calibration": name, "inputs": report["calibration"]["inputs"], "wiki_ppl": ppl,
               "quantize_s": round(quant_s, 1), "times": report.get("times")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"benchmark": "vlm_calib_images", "model": "smolvlm-testbed", "images": a.images,
              "options": BUDGET, "rows": rows, "torch_threads": os.cpu_count()}
    if a.json:
        from dbquant.format.files import write_json

        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
