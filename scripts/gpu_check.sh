#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py), logged to $OUT when it is set.
# On the lent GPU machine: `bash scripts/gpu_check.sh` from the repository root.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
if [ -n "$OUT" ]; then
    mkdir -p "$OUT"
    "$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    "$PYTHON" benchmarks/gpu_check.py "$@"
fi
