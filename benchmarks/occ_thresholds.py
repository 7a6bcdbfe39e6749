"""OCC row thresholds on CPU: the lowering's row kernel against ATen's top-k, both compiled by Inductor.

`fp4compile/lowering/cpu_thresholds.py` takes the two order statistics per side
that each row's clamp thresholds need from the C++ kernel
`fp4compile::row_extremes` instead of a top-k of c + 1 values. This script times
both forms (the whole thresholds computation, interpolation included) at every
width, and checks that they agree bit for bit:

    python benchmarks/occ_thresholds.py --json benchmarks/results/occ_thresholds_cpu.json

Each form is compiled once per width; the median of `--repeats` calls after
three warm-up calls is reported, the two forms interleaved.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4compile.lowering.cpu_thresholds import cpu_occ_thresholds, uses_kernel  # noqa: E402
from fp4compile.runtime.occ import alpha_fraction, occ_thresholds, outliers_per_side  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="rows (tokens) per tensor (default: 1024)")
    parser.add_argument("--widths", default="256,384,704,1024,1536,4096", help="row widths (default: 256,384,704,1024,1536,4096)")
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the table here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num, den = alpha_fraction(args.alpha)

    def topk_form(x):
        return torch.cat(occ_thresholds(x, num, den, "row"), dim=-1)

    def kernel_form(x):
        return torch.cat(cpu_occ_thresholds(x, num, den, "row"), dim=-1)

    if not uses_kernel("row"):
        raise SystemExit("the row kernel did not build on this machine (see the warning): nothing to compare")

    rows = []
    for n in (int(w) for w in args.widths.split(",")):
        torch._dynamo.reset()
        forms = {"topk": torch.compile(topk_form), "kernel": torch.compile(kernel_form)}
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n))
        results = {name: f(x) for name, f in forms.items()}
        if not torch.equal(results["topk"], results["kernel"]):
            raise SystemExit(f"n={n}: the kernel's thresholds differ from the top-k's")
        for f in forms.values():
            for _ in range(2):
                f(x)
        times = {name: [] for name in forms}
        for _ in range(args.repeats):
            for name, f in forms.items():
                start = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - start)
        median = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
        c = outliers_per_side(n, num, den)
        rows.append({"width": n, "values_per_side": c + 1, "topk_ms": median["topk"],
                     "kernel_ms": median["kernel"], "ratio": median["topk"] / median["kernel"]})

    print(f"{args.rows} rows, alpha {args.alpha}, {args.threads} thread(s); median of {args.repeats} calls")
    print("| row width | values per side (c+1) | top-k ms | kernel ms | top-k / kernel |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['values_per_side']} | {r['topk_ms']:.2f} | {r['kernel_ms']:.2f} | "
              f"{r['ratio']:.2f} |")
    if args.json:
        command = "python benchmarks/occ_thresholds.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({
            "command": command.strip(), "rows_per_tensor": args.rows, "alpha": args.alpha,
            "threads": args.threads, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
