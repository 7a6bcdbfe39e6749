"""Where a cold compile's time goes: one training step of the demo model, one backend.

Compiles into a fresh Inductor cache (its own folder), runs one training step,
and prints the step's wall time next to dynamo's per-phase timers (tracing,
AOTAutograd, Inductor lowering, C++ code generation and compilation) and the
number of distinct generated C++ kernels in the forward and backward code.
Run once per backend, each in its own process, so no kernel is shared:

    python benchmarks/compile_time.py --backend inductor
    python benchmarks/compile_time.py --backend fp4 --recipe paper
    python benchmarks/compile_time.py --backend fp4 --recipe paper --regional
    python benchmarks/compile_time.py --small --regional            # smoke run (tiny preset, batch 2 x 32)

The phases overlap (C++ compiles run in worker processes while lowering goes
on, and some timers contain others), so they do not add up to the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

PHASES = (
    ("dynamo + everything below", "_compile.compile_inner"),
    ("AOTAutograd (trace, partition, both compiles)", "create_aot_dispatcher_function"),
    ("joint graph trace", "aot_trace_joint_graph"),
    ("Inductor: FX -> IR (GraphLowering.run)", "GraphLowering.run"),
    ("Inductor: scheduling + codegen", "GraphLowering.codegen"),
    ("C++ compiles (compile_file, summed)", "compile_file"),
    ("waiting for async compiles", "async_compile.wait"),
    ("backward compile", "compile_fx.<locals>.bw_compiler"),
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="fp4", choices=("fp4", "inductor"))
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--regional", action="store_true", help="compile each transformer block on its own")
    parser.add_argument("--small", action="store_true", help="smoke run: tiny preset, batch 2 x 32 tokens")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.preset, args.batch, args.seq = "tiny", 2, 32
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp4compile-inductor-")

    import torch
    from torch._dynamo.utils import compile_times
    from torch._inductor.utils import run_and_get_code

    import fp4compile  # noqa: F401  (registers the backend)
    from fp4compile.training.models.llama import Llama, preset
    from step_time import make_step

    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    options = {"recipe": args.recipe} if args.backend == "fp4" else None
    step = make_step(model, args.backend, options, regional=args.regional)
    start = time.perf_counter()
    _, code = run_and_get_code(lambda: step(idx, targets))
    wall = time.perf_counter() - start
    timers = {}
    for line in compile_times(repr="str", aggregate=True).splitlines():
        name, _, value = line.rpartition(", ")
        try:
            timers[name.strip()] = float(value)
        except ValueError:
            continue
    kernels = [text.count("async_compile.cpp_pybinding(") for text in code]
    label = args.backend + (f" ({args.recipe})" if args.backend == "fp4" else "") + (", regional" if args.regional else "")
    print(f"{label}: first training step {wall:.1f} s (cold cache); "
          f"{len(code)} generated modules with {kernels} C++ kernels")
    print("| phase | s |\n|---|---|")
    for title, key in PHASES:
        if key in timers:
            print(f"| {title} | {timers[key]:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": label, "preset": args.preset, "batch": args.batch, "seq": args.seq,
                       "first_step_s": wall, "cpp_kernels": kernels,
                       "timers_s": {key: timers.get(key) for _, key in PHASES}}, f, indent=1)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
