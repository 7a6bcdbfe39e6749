"""Where to compute the FP4 telemetry: every step inside the quantization kernel, or every N steps on its own.

Times, under Inductor on the CPU, for one activation of the demo model's shapes:

- `quantize`: the CPU lowering's clamp + quantize + residual op alone (what a step runs today);
- `quantize+stats`: the same op also reducing the activation statistics
  (amax, underflow and clamp counts, signal and noise power): the cost a
  step would pay if the statistics were computed in the kernel on every step;
- `stats alone`: the statistics in their own compiled function, as a
  statistics step pays when it recomputes them from x every N steps.

    python benchmarks/stats_variants.py --json benchmarks/results/stats_variants_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def _stats_from(x_hp, x_c, x_q, x_s):
    n = x_hp.numel()
    return torch.stack([
        x_hp.abs().amax(),
        ((x_c != 0) & (x_q == 0)).sum() / n,
        ((x_c != x_hp) & (x_hp == x_hp)).sum() / n,
        x_hp.square().sum(),
        (x_c - x_q * x_s).square().sum(),
    ])


def quantize_only(x):
    from fp4compile.lowering.cpu import compensated_activation_op

    return compensated_activation_op(x, 99, 100, "row", "e2m1", "row")


def quantize_and_stats(x):
    from fp4compile.runtime.occ import occ_split, occ_thresholds
    from fp4compile.runtime.quantize import quantize

    upper, lower = occ_thresholds(x, 99, 100, "row")
    x_c, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(x_c, granularity="row", fmt="e2m1")
    return x_q + residual / x_s, x_s, _stats_from(x, x_c, x_q, x_s)


def stats_alone(x):
    from fp4compile.runtime.stats import activation_stats

    return activation_stats(x, 99, 100, "row", "e2m1", "row", True)


def time_ms(fn, x, repeats):
    for _ in range(3):
        fn(x)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        samples.append(1e3 * (time.perf_counter() - t))
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1024x256,1024x704", help="activation shapes MxK, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import fp4compile  # noqa: F401

    variants = {"quantize": quantize_only, "quantize+stats": quantize_and_stats, "stats alone": stats_alone}
    compiled = {name: torch.compile(fn, backend="inductor", dynamic=False) for name, fn in variants.items()}
    rows = []
    load_start = os.getloadavg()
    for shape in args.shapes.split(","):
        m, k = map(int, shape.split("x"))
        x = torch.randn(m, k)
        x[:, 3] *= 20
        row = {"shape": shape}
        for name, fn in compiled.items():
            row[f"{name} ms"] = time_ms(fn, x, args.repeats)
        row["in-kernel extra ms per step"] = row["quantize+stats ms"] - row["quantize ms"]
        rows.append(row)
        print(row, flush=True)
    omp = os.environ.get("OMP_NUM_THREADS")
    result = {"command": (f"OMP_NUM_THREADS={omp} " if omp else "") + "python benchmarks/stats_variants.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_avg_1_5_15_start": load_start, "load_avg_1_5_15_end": os.getloadavg(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
