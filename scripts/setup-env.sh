#!/usr/bin/env bash
# Create .venv (once) and install cbam-insert into it: `setup-env.sh` installs what the command
# needs (pip install -e .); `setup-env.sh test` adds the test extras (pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
case "${1:-}" in
    "") target="." mods="cbam_insert torch torchvision typer rich" ;;
    test) target=".[test]" mods="cbam_insert torch torchvision typer rich pytest onnxruntime safetensors hypothesis sklearn timm transformers segmentation_models_pytorch monai efficientnet_pytorch ultralytics" ;;
    *) echo "usage: scripts/setup-env.sh [test]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# found without importing them (importing ultralytics writes a settings file); -I: not the source
# tree in the current directory, the installed package
check="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in '$mods'.split()))"
if ! .venv/bin/python -I -c "$check" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install --quiet -e "$target"
fi
