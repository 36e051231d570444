#!/usr/bin/env bash
# A walk through the cbam-insert command line: dry run, selection, JSON report, patch, the
# --force guard, exports, and patching a patched model. Every command is printed before it runs.
#
#   bash examples/cli_walkthrough.sh                 # in a temporary directory, 224x224 inputs
#   WORKDIR=out bash examples/cli_walkthrough.sh     # keep the files in ./out
#
# Environment:
#   SHAPE    example input shape (default 1,3,224,224; the tests use 1,3,64,64)
#   EXPORTS  export formats to try (default "safetensors torchscript onnx pt2"; onnx needs the
#            onnx and onnxruntime packages: pip install 'cbam-insert[export]')
#   PYTHON   the Python that has cbam_insert installed (default: python)
set -euo pipefail

SHAPE="${SHAPE:-1,3,224,224}"
EXPORTS="${EXPORTS:-safetensors torchscript onnx pt2}"
PYTHON="${PYTHON:-python}"
if [ -n "${WORKDIR:-}" ]; then
    mkdir -p "$WORKDIR"
    cd "$WORKDIR"
else
    WORKDIR="$(mktemp -d)"
    trap 'rm -rf "$WORKDIR"' EXIT
    cd "$WORKDIR"
fi

step() { printf '\n### %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "0. a model file, as torch.save writes it (ResNet-18, random weights)"
run "$PYTHON" -c "import torch, torchvision; torch.save(torchvision.models.resnet18(), 'resnet18.pt')"

step "1. dry run: every site for the paper's placement, used or skipped and why, and the cost; nothing is written"
run cbam-insert resnet18.pt --after block --input-shape "$SHAPE" --dry-run

step "2. selection: conv units of stages 3-4 with at least 256 channels, every second one"
run cbam-insert resnet18.pt --after conv --stages 3-4 --min-channels 256 --every 2 --input-shape "$SHAPE" --dry-run

step "3. the same facts as JSON (stdout holds only the JSON)"
printf '$ cbam-insert resnet18.pt --input-shape %s --dry-run --json > report.json\n' "$SHAPE"
cbam-insert resnet18.pt --input-shape "$SHAPE" --dry-run --json > report.json
run "$PYTHON" -c "
import json
r = json.load(open('report.json'))
used = [s['name'] for s in r['sites'] if s['used']]
print(f\"{len(used)} sites used: {', '.join(used)}\")
print(f\"params {r['params']['before']:,} -> {r['params']['after']:,}; MACs {r['flops']['before']:,} -> {r['flops']['after']:,}\")
"

step "4. patch: identity init (the outputs do not change), seeded CBAM weights; saved beside the input"
run cbam-insert resnet18.pt --after block --init identity --seed 0 --input-shape "$SHAPE"
run "$PYTHON" -c "
import torch
from cbam_insert import load_model
orig, patched = load_model('resnet18.pt').eval(), load_model('resnet18_cbam.pt').eval()
x = torch.rand(2, *[int(d) for d in '$SHAPE'.split(',')[1:]])
print('patched:', type(patched).__name__, 'with', len(patched.cbam_recipe['steps'][-1]['modules']), 'CBAM modules')
print('same outputs as the original:', torch.allclose(orig(x), patched(x), atol=1e-5))
"

step "5. the output exists: a second run refuses (exit 1, one line on stderr, nothing written) unless --force"
printf '$ cbam-insert resnet18.pt --after block --input-shape %s --quiet\n' "$SHAPE"
if cbam-insert resnet18.pt --after block --input-shape "$SHAPE" --quiet; then
    echo "expected a refusal" >&2
    exit 1
else
    echo "(exit status $?)"
fi
run cbam-insert resnet18.pt --after block --input-shape "$SHAPE" --seed 0 --force --quiet

step "6. exports: the format follows the extension (or --format)"
for fmt in $EXPORTS; do
    case "$fmt" in
        safetensors) out=resnet18_cbam.safetensors ;;
        torchscript) out=resnet18_cbam.ts ;;
        onnx) out=resnet18_cbam.onnx ;;
        pt2) out=resnet18_cbam.pt2 ;;
        *) echo "unknown format $fmt" >&2; exit 2 ;;
    esac
    run cbam-insert resnet18.pt --after block --seed 0 --input-shape "$SHAPE" -o "$out" --quiet
done
ls -l resnet18_cbam.*
case " $EXPORTS " in *" torchscript "*)
    run "$PYTHON" -c "
import sys
sys.modules['cbam_insert'] = None  # any import of cbam_insert would now fail
import torch
m = torch.jit.load('resnet18_cbam.ts')
print('TorchScript runs without cbam_insert:', tuple(m(torch.rand(1, *[int(d) for d in '$SHAPE'.split(',')[1:]])).shape))
" ;;
esac

case " $EXPORTS " in *" safetensors "*)
    step "7. weights + recipe: the .safetensors rebuilds the patched model; its CBAM sites are not patched twice"
    run cbam-insert resnet18_cbam.safetensors --arch torchvision:resnet18 --input-shape "$SHAPE" --dry-run
    ;;
esac

printf '\ndone: files in %s\n' "$WORKDIR"
