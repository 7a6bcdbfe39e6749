"""OCC row thresholds on CPU: the lowering's selection against ATen's top-k, both compiled by Inductor.

`fp4compile/lowering/cpu_thresholds.py` finds the clamp thresholds of each row
with c + 1 fused max/count passes instead of a top-k of c + 1 values, where
c + 1 <= MAX_SELECTED. This script times both forms at every width, the
selection beyond the cut-off too (the same values, checked here as well), so
that the cut-off can be re-derived on another machine; the last column says
which form the lowering uses:

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

from fp4compile.lowering.cpu_thresholds import MAX_SELECTED, selection_thresholds  # noqa: E402
from fp4compile.runtime.occ import alpha_fraction, occ_thresholds, outliers_per_side  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="rows (tokens) per tensor (default: 1024)")
    parser.add_argument("--widths", default="256,384,704,1024,1536", help="row widths (default: 256,384,704,1024,1536)")
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None, help="write the table here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num, den = alpha_fraction(args.alpha)

    def topk_form(x):
        return torch.cat(occ_thresholds(x, num, den, "row"), dim=-1)

    def selection_form(x):
        return torch.cat(selection_thresholds(x, num, den), dim=-1)

    rows = []
    for n in (int(w) for w in args.widths.split(",")):
        torch._dynamo.reset()
        forms = {"topk": torch.compile(topk_form), "selection": torch.compile(selection_form)}
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n))
        results = {name: f(x) for name, f in forms.items()}
        if not torch.equal(results["topk"], results["selection"]):
            raise SystemExit(f"n={n}: the selection's thresholds differ from the top-k's")
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
                     "selection_ms": median["selection"], "ratio": median["topk"] / median["selection"],
                     "lowering_selects": c + 1 <= MAX_SELECTED})

    print(f"{args.rows} rows, alpha {args.alpha}, {args.threads} thread(s); median of {args.repeats} calls")
    print("| row width | values per side (c+1) | top-k ms | selection ms | top-k / selection | lowering uses |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | {r['values_per_side']} | {r['topk_ms']:.2f} | {r['selection_ms']:.2f} | "
              f"{r['ratio']:.2f} | {'selection' if r['lowering_selects'] else 'top-k'} |")
    if args.json:
        command = "python benchmarks/occ_thresholds.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({
            "command": command.strip(), "rows_per_tensor": args.rows, "alpha": args.alpha,
            "threads": args.threads, "max_selected": MAX_SELECTED, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
