#!/usr/bin/env bash
# Create (or refresh) the project virtualenv in .venv and install the pinned dependencies plus the
# package in editable mode. Idempotent: safe to re-run; pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps -e .
