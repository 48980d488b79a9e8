#!/usr/bin/env bash
# Set up, then run the whole test suite (the C++ extension is required here: a broken build fails).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first (pyflakes, import order, 120 columns; pyproject.toml): seconds, and a failure names file and line.
.venv/bin/ruff check --quiet .
# One worker per core (pytest-xdist), each test file whole on one worker (its module fixtures built once).
DBQUANT_REQUIRE_NATIVE=1 .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
