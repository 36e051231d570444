#!/usr/bin/env bash
# Quick start 2: install, then run the whole test suite (exits non-zero on a failure or on no tests).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
bash "$HERE/scripts/setup-env.sh" test
cd "$HERE"
set +e
.venv/bin/python -m pytest -n "${CBAM_TEST_WORKERS:-2}" -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "no tests ran" >&2
    exit 1
fi
exit "$rc"
