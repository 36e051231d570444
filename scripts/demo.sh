#!/usr/bin/env bash
# Quick start 1: install (pip install -e ., no test extras), then put CBAM on every residual block of torchvision's ResNet-50
# (random weights), print the report, and save resnet50_cbam.pt in the current directory.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
bash "$HERE/scripts/setup-env.sh"
exec "$HERE/.venv/bin/cbam-insert" torchvision:resnet50 --after block -o resnet50_cbam.pt --force "$@"
