#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch (kept if already installed), fp4compile
# in editable mode with its dev extras. Idempotent: re-running installs nothing new.
#
# torch: an unpinned `pip install torch` pulls the multi-GB CUDA build even on
# CPU-only machines. An installed torch >= 2.11 is used as is (CPU or CUDA);
# otherwise torch 2.13.0 is installed (the CPU build where a local wheel of it is
# configured for pip). Set FP4COMPILE_TORCH to another requirement to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if $PY - <<'PYEOF' 2>/dev/null
import sys, torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
then
    echo "setup: using installed torch $($PY -c 'import torch; print(torch.__version__)')"
else
    $PY -m pip install --quiet "${FP4COMPILE_TORCH:-torch==2.13.0}"
fi

# Install unless this very checkout is already the installed fp4compile (-I: not
# the copy in the current directory, the one an import elsewhere would find).
installed=$($PY -I -c "import os, fp4compile, hypothesis, pytest, xdist, transformers, accelerate, tensorboard; print(os.path.dirname(os.path.dirname(os.path.realpath(fp4compile.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$(pwd -P)" ] || [ "${1:-}" = "--force" ]; then
    $PY -m pip install --quiet -e ".[dev]"
fi
# The entry point must be registered (editable installs can go stale after a move).
$PY - <<'PYEOF'
from importlib.metadata import entry_points
names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
assert "fp4" in names, "the fp4 entry point is not installed; run: pip install -e ."
PYEOF
