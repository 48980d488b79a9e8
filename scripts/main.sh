#!/usr/bin/env bash
# The main job on the embedded default: quantize SmolLM2-135M to dual-binary 2.5 bits/weight
# (the `fast` preset: FDB init, a short block-wise pass, then distillation from the fp model,
# on wiki text plus a quarter of chat text the fp model writes; ~5 min on a quiet 2-core CPU),
# evaluate it (wiki perplexity, fp32 alongside), and answer a question. PRESET=default runs the
# ~20-minute preset instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/smollm2-135m-fdb-g64}
DBQ=.venv/bin/dbquant
mkdir -p runs
$DBQ quantize smollm2-135m --output "$OUT" --overwrite --preset "${PRESET:-fast}"
$DBQ eval smollm2-135m --json | tee runs/eval-fp32.json
$DBQ eval "$OUT" --json | tee "$OUT/eval-wiki.json"
$DBQ generate "$OUT" --prompt "What is the capital of France?" --max-new-tokens 32
