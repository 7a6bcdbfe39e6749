"""Command line: `python -m fp4compile {demo, inspect, bench, fidelity}`."""
from __future__ import annotations

import argparse
import sys


def _fidelity(args) -> int:
    from .runtime.fidelity import format_occ_table, occ_study, synthetic_activation

    x = synthetic_activation(tokens=args.tokens, features=args.features)
    print(f"OCC fidelity on a synthetic {args.tokens}x{args.features} activation with channel outliers")
    print("(paper, LLaMA-1.3B activations: 92.19% / 98.83% / 99.61% / 100% / 100% cosine similarity)\n")
    print(format_occ_table(occ_study(x)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fp4compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from .training import demo

    p = sub.add_parser("demo", help="train a small LLaMA with backend='fp4' next to bf16 (the main job)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    p = sub.add_parser("fidelity", help="the paper's OCC fidelity table on a synthetic activation")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--features", type=int, default=1024)
    p.set_defaults(func=_fidelity)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from .training import bench as bench_train

    p = bench.add_parser("train", help="train every recipe on the same data and seeds; compare losses")
    bench_train.add_arguments(p)
    p.set_defaults(func=bench_train.run)

    try:
        from .inspection import cli as inspect_cli
    except ImportError:
        inspect_cli = None
    if inspect_cli is not None:
        p = sub.add_parser("inspect", help="site table, per-site numerics, cost model and graph dump of a model")
        inspect_cli.add_arguments(p)
        p.set_defaults(func=inspect_cli.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
