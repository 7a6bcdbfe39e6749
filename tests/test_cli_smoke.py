"""Smoke tests of the command lines: each runs as a user would run it and its output is checked.

- `python -m fp4compile fidelity`: the OCC table, its "no clamp" row recomputed
  with the independent quantizer oracle (tests/oracles.py);
- `python -m fp4compile bench train --backend fp4` with two recipes and two
  seeds: the product backend (Inductor) trains both, and the summary's paired
  gap statistics equal a recomputation from the per-run results, where the
  gaps are not 0 (FP4 against bf16);
- the `--small` modes of benchmarks/train_step.py, compile_time.py and
  dge_controls.py (benchmarks/step_time.py has its own test,
  tests/test_step_time_smoke.py), and examples/train_llama.py on the tiny model.

Inductor compiles dominate the cost (tens of seconds each on 2 cores), so each
script compiles as little as shows it working: the bench run compiles the tiny
model whole under `bf16` and `paper` (its second seed hits Inductor's cache,
and so may train_step's `paper` variant, the same graph at the same batch
shape); compile_time times a cold compile of one block under plain Inductor,
the cheapest compile that exercises its timers and kernel count.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fp4compile
from fp4compile.training.models.llama import Llama, param_count, preset

from . import oracles

ROOT = Path(__file__).resolve().parent.parent
# The tiny model's batch shape shared by the bench run and train_step --small (one Inductor cache entry).
BATCH, SEQ = 2, 32


def _run(args, timeout=600) -> str:
    """Run a command from the repository root with this checkout's fp4compile; its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


# ---------------------------------------------------------------- fidelity


def test_fidelity_cli_prints_the_occ_table():
    from fp4compile.runtime.fidelity import synthetic_activation

    tokens, features = 256, 128
    out = _run(["-m", "fp4compile", "fidelity", "--tokens", tokens, "--features", features])
    rows = re.findall(r"^\| (yes|no) \| (yes|no|-) \| ([\d.]+|-) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[:3] for r in rows] == [("no", "-", "-"), ("yes", "no", "99.9"), ("yes", "yes", "99.9"),
                                     ("yes", "yes", "99"), ("yes", "yes", "97")]
    cos = [float(r[3]) for r in rows]
    snr = [float(r[5]) for r in rows]
    # The paper's ordering: clamping helps, compensation helps more, a lower quantile more again.
    assert cos[0] < cos[1] < cos[2] < cos[3] < cos[4] <= 100
    assert snr == sorted(snr)

    # The "no clamp" row from the oracle: row-wise E2M1 absmax quantization in float32 arithmetic.
    x = synthetic_activation(tokens=tokens, features=features).numpy()
    values, scales = oracles.quantize_groups(x.astype(np.float64), features, 6.0, oracles.E2M1, f32=True)
    x_hat = (values.astype(np.float32) * scales.astype(np.float32)).astype(np.float64).ravel()
    a = x.astype(np.float64).ravel()
    err = ((a - x_hat) ** 2).sum()
    expected = (100 * a.dot(x_hat) / (np.linalg.norm(a) * np.linalg.norm(x_hat)), err / a.size,
                10 * math.log10((a ** 2).sum() / err))
    printed = (cos[0], float(rows[0][4]), snr[0])
    for got, want, unit in zip(printed, expected, (0.01, 1e-4, 0.01)):
        assert abs(got - want) <= unit / 2 + 1e-9, (printed, expected)


# ---------------------------------------------------------------- bench train --backend fp4


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_bench_train_fp4_backend_paired_gaps(tmp_path):
    """Two recipes, one seed, backend fp4: the product backend runs and the summary's gap is the runs' own.

    One seed: the per-seed pairing, standard deviation and confidence interval are
    checked on two seeds with the eager backend (tests/test_bench_train.py); here
    each extra run costs a compile. Block by block (`--regional`): one block graph
    per recipe serves both blocks, half the compile of the whole model.
    """
    from fp4compile.__main__ import main

    fp4compile.reset()
    out = tmp_path / "bench"
    args = ["bench", "train", "--preset", "tiny", "--backend", "fp4", "--recipes", "bf16,paper", "--seeds", "1",
            "--steps", "2", "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--eval-sequences", "2",
            "--max-bytes", "100000", "--checkpoint-every", "0", "--no-progress", "--regional", "--out", str(out)]
    try:
        assert main(args) == 0
        reports = fp4compile.reports()
    finally:
        fp4compile.reset()
    # The product backend ran: one block graph per recipe (the second block reuses
    # it); paper's quantized the block's 7 linears, bf16's none.
    by_recipe = {}
    for report in reports:
        by_recipe.setdefault(report.config.recipe, []).append(report)
    assert set(by_recipe) == {"bf16", "paper"} and all(r.backend == "fp4" for r in reports)
    assert len(by_recipe["paper"]) == len(by_recipe["bf16"]) == 1
    assert len(by_recipe["paper"][0].quantized) == 7
    assert not by_recipe["bf16"][0].quantized

    losses = {}
    for recipe in ("bf16", "paper"):
        result = json.loads((out / f"{recipe}_seed0.json").read_text())
        history = _read_csv(out / f"{recipe}_seed0.csv")
        assert [int(r["step"]) for r in history] == [1, 2] and result["diverged"] is False
        # The run's final validation loss is its last logged one.
        assert result["final_val_loss"] == float(history[-1]["val_loss"])
        losses[recipe] = result["final_val_loss"]
    gap = 100 * (losses["paper"] - losses["bf16"]) / losses["bf16"]
    assert abs(gap) > 1e-3, gap  # FP4 moves the loss

    rows = {row["recipe"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    paper, bf16 = rows["paper"], rows["bf16"]
    assert paper["gap_seeds"] == 1 and paper["seeds"] == 1
    assert paper["gap_to_bf16_pct_mean"] == pytest.approx(gap, rel=1e-12, abs=1e-15)
    assert paper["gap_to_bf16_pct_std"] is None and paper["gap_to_bf16_pct_ci95"] is None  # one seed: no spread
    assert paper["final_val_loss_mean"] == losses["paper"]
    assert bf16["gap_to_bf16_pct_mean"] == 0
    summary = (out / "summary.md").read_text()
    assert f"| paper | 1 | {paper['final_val_loss_mean']:.4f} | {gap:+.2f} | n/a | n/a |" in summary
    assert "backend `fp4`, compiled block by block" in summary


# ---------------------------------------------------------------- benchmarks --small


@pytest.mark.slow
def test_train_step_small_on_cpu():
    # One variant (one compile) of the tiny model cut to one block (half the
    # compile of two): without bf16 the speed-up column reads "-".
    out = _run(["benchmarks/train_step.py", "--device", "cpu", "--small", "--layers", "1", "--variants", "paper"])
    rows = {m.group(1): m for m in re.finditer(
        r"^\| (paper) \| ([\d.]+) \| (\d+) \| - \| nan \| (\d+) \| ([\d.]+) -> ([\d.]+) \|$", out, re.M)}
    assert set(rows) == {"paper"}, out
    for match in rows.values():
        step_ms, tokens_per_s = float(match.group(2)), int(match.group(3))
        # The table prints ms/step to 0.1 ms and tokens/s from the unrounded time:
        # on a fast machine (a 3 ms step) that rounding alone moves the ratio by 1.6%.
        slowest, fastest = BATCH * SEQ / ((step_ms + 0.05) * 1e-3), BATCH * SEQ / ((step_ms - 0.05) * 1e-3)
        assert step_ms > 0.05 and slowest - 1 <= tokens_per_s <= fastest + 1, (step_ms, tokens_per_s)
        assert 0 < float(match.group(6)) < float(match.group(5)) < 6  # trains from about ln(256) = 5.55
    one_block = dataclasses.replace(preset("tiny"), n_layers=1)
    assert f"M parameters ({param_count(Llama(one_block)):,})." in out
    assert "batch 2 x 32 tokens" in out and "CPU smoke test" in out


@pytest.mark.slow
def test_compile_time_small_regional(tmp_path):
    result_path = tmp_path / "compile_time.json"
    out = _run(["benchmarks/compile_time.py", "--small", "--regional", "--backend", "inductor", "--json", result_path])
    result = json.loads(result_path.read_text())
    assert (result["backend"], result["preset"], result["batch"], result["seq"]) == ("inductor, regional", "tiny", 2, 32)
    assert result["first_step_s"] > 0
    # A forward and a backward module, each with generated C++ kernels, compiled into the fresh cache.
    assert len(result["cpp_kernels"]) == 2 and min(result["cpp_kernels"]) > 0
    assert result["timers_s"]["_compile.compile_inner"] > 0
    assert f"inductor, regional: first training step {result['first_step_s']:.1f} s (cold cache)" in out
    assert "| joint graph trace |" in out


def test_dge_controls_small():
    out = _run(["benchmarks/dge_controls.py", "early", "w4a8", "--small", "--set", "dge_clamp=None"])
    assert "w4a8 {'recipe': 'w4a8', 'dge_clamp': None} lr 0.001" in out
    losses = [float(v) for v in re.search(r"^train loss: (.*)$", out, re.M).group(1).split()]
    norms = [float(v) for v in re.search(r"^grad norm: (.*)$", out, re.M).group(1).split()]
    assert len(losses) == len(norms) == 3  # the --small schedule's 3 steps
    assert all(0 < v < 6 for v in losses) and all(v > 0 for v in norms)

    out = _run(["benchmarks/dge_controls.py", "matrix-lr", "--small", "--factor", "0.5"])
    final = float(re.search(r"block matrices x0.5, seed 0: final val loss ([\d.]+)$", out, re.M).group(1))
    assert 0 < final < 6


# ---------------------------------------------------------------- example


def test_example_train_llama_tiny():
    out = _run(["examples/train_llama.py", "--preset", "tiny", "--steps", "3", "--batch-size", "2",
                "--backend", "fp4_aot_eager"])
    assert f"{param_count(Llama(preset('tiny'))) / 1e6:.1f}M parameters on cpu" in out
    train = [float(v) for v in re.findall(r"^step +\d+  train loss ([\d.]+)", out, re.M)]
    assert len(train) == 1 and 0 < train[0] < 6  # printed at step 1 (then every 20)
    validation = re.findall(r"^step +3  validation loss ([\d.]+) nats/byte$", out, re.M)
    assert len(validation) == 1 and 0 < float(validation[0]) < 6
