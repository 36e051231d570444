#!/usr/bin/env bash
# Create .venv (once) and install cbam-insert with its test extras into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import cbam_insert, pytest, onnxruntime, safetensors, hypothesis, sklearn" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet -e ".[test]"
fi
