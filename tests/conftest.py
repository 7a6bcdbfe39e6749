"""Test-session set-up shared by every test file.

`make test` runs the files in parallel (pytest-xdist, one file per worker at a
time, `--dist loadfile`, so a module's shared compiled model is built once). Each
worker then gets an equal share of the CPU cores for torch's intra-op threads,
and so do the subprocesses the tests launch (OMP_NUM_THREADS is inherited):
without this every worker would start one thread per core, and OpenMP threads
that spin-wait on an oversubscribed machine slow every GEMM down severalfold.
A plain `pytest` run (no workers) keeps torch's default.
"""
from __future__ import annotations

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = str(max(1, _cores // _WORKERS))
    # Before torch is imported by any test module: torch reads it at start-up.
    os.environ["OMP_NUM_THREADS"] = _threads

    import torch

    torch.set_num_threads(int(_threads))
