#!/usr/bin/env bash
# CUDA numbers for docs/performance.md, as one short run on a GPU machine (fp32 and bf16).
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh            # on the GPU machine, from the repo root
#   OUT=/tmp/gpu DEVICE=cpu QUICK=1 bash benchmarks/gpu_run.sh   # rehearse the script's logic on a CPU
#
# Uses the python3 already there (its own torch and torchvision; nothing is installed) and the
# package from this checkout (PYTHONPATH). Every step has its own time limit and writes its log
# under $OUT (six text files at most), so a slow step costs only itself.
set -u
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step SECONDS LOG COMMAND...: run with a time limit, tee the output to $OUT/LOG
    local limit=$1 log=$2
    shift 2
    echo "=== $* (limit ${limit}s)" | tee -a "$OUT/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$log"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [ -n "$QUICK" ]; then
    model_args=(--quick --models resnet18)
    compile_args=(--quick --models resnet18)
    module_args=(--quick)
else
    model_args=(--models resnet50 mobilenet_v2 --batches 1 8 32 --reps 30 --warmup 5)
    compile_args=(--models resnet50 --batches 8 --layouts contiguous --modes compile --reps 30 --warmup 5 --compile-timeout 130)
    module_args=()
fi

if [ -f benchmarks/bench_module.py ] && "$PY" benchmarks/bench_module.py --help 2>/dev/null | grep -q -- --device; then
    for dt in float32 bfloat16; do
        step 75 module.txt "$PY" benchmarks/bench_module.py --device "$DEVICE" --dtype "$dt" "${module_args[@]}"
    done
else
    echo "bench_module.py has no --device option: module benchmark skipped" | tee "$OUT/module.txt"
fi

for dt in float32 bfloat16; do
    step 90 "model_$dt.txt" "$PY" benchmarks/bench_model.py --device "$DEVICE" --dtype "$dt" --modes eager \
        "${model_args[@]}"
done

step 60 profile.txt "$PY" benchmarks/bench_model.py --device "$DEVICE" --profile --models resnet50 --batches 8 \
    --layouts contiguous --reps 5 --profile-rows 15 ${QUICK:+--quick}

step 150 compile.txt "$PY" benchmarks/bench_model.py --device "$DEVICE" --dtype float32 "${compile_args[@]}"
date -u | tee -a "$OUT/env.txt"
