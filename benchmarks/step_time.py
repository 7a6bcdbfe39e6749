"""Training-step time on CPU: backend="fp4" recipes against backend="inductor", side by side.

Every model is compiled from the same weights; steps are timed interleaved
(inductor, fp4 recipe 1, fp4 recipe 2, inductor, ...) so machine noise hits all
alike, and ratios of medians are reported. The first step of each (compile
included, from whatever Inductor cache the machine holds; pass --cold to point
Inductor at a fresh cache folder) is reported as the compile time.

    python benchmarks/step_time.py                                  # demo model (cpu preset)
    python benchmarks/step_time.py --dim 384 --ffn 1536 --layers 4  # a wider model
    python benchmarks/step_time.py --regional                       # compile block by block
    python benchmarks/step_time.py --small                          # smoke run (tiny preset)

`--json PATH` writes the table as JSON (benchmarks/results/ holds committed runs);
`--profile` prints the top ops of three steps of the first fp4 recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch


def make_step(model, backend, options, regional: bool = False):
    """One training step of `model` compiled with `backend`.

    `regional`: compile each transformer block on its own (`block.compile(...)`);
    the blocks share one compiled graph, so the compile covers one block instead
    of the whole model, and the rest (embedding, final norm, lm_head) runs eagerly.
    """
    kwargs = {"backend": backend, **({"options": options} if options else {})}
    if regional:
        for block in model.layers:
            block.compile(**kwargs)
        compiled = model
    else:
        compiled = torch.compile(model, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(idx, targets):
        logits = compiled(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def model_config(args):
    from fp4compile.training.models.llama import preset

    cfg = preset(args.preset)
    overrides = {k: v for k, v in (("dim", args.dim), ("ffn_dim", args.ffn), ("n_layers", args.layers)) if v}
    return dataclasses.replace(cfg, **overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--dim", type=int, default=None, help="override the preset's hidden size")
    parser.add_argument("--ffn", type=int, default=None, help="override the preset's MLP size")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--recipes", default="paper,fp4-direct", help="comma-separated fp4 recipes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cold", action="store_true", help="compile into a fresh, empty Inductor cache")
    parser.add_argument("--regional", action="store_true",
                        help="compile each transformer block on its own, for every backend (see make_step)")
    parser.add_argument("--small", action="store_true", help="smoke run: tiny preset, 2 steps")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--stats-interval", type=int, default=0,
                        help="also time each fp4 recipe with FP4 telemetry every N steps (options stats_interval=N)")
    args = parser.parse_args(argv)
    if args.small:
        args.preset, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 32, 1, 2
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fp4compile-inductor-")

    import fp4compile  # noqa: F401  (registers the backend)
    from fp4compile.training.models.llama import Llama

    cfg = model_config(args)
    torch.manual_seed(0)
    base = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    runs = {"inductor": ("inductor", None)}
    for recipe in args.recipes.split(","):
        runs[f"fp4 {recipe}"] = ("fp4", {"recipe": recipe})
        if args.stats_interval:
            runs[f"fp4 {recipe} stats/{args.stats_interval}"] = (
                "fp4", {"recipe": recipe, "stats_interval": args.stats_interval})
    steps, compile_s = {}, {}
    for name, (backend, options) in runs.items():
        model = Llama(cfg)
        model.load_state_dict(base.state_dict())
        steps[name] = make_step(model, backend, options, regional=args.regional)
        t = time.perf_counter()
        steps[name](idx, targets)
        compile_s[name] = time.perf_counter() - t
        for _ in range(args.warmup):
            steps[name](idx, targets)
        print(f"{name}: first step (compile) {compile_s[name]:.1f} s", flush=True)
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step(idx, targets)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    mean = {name: statistics.fmean(v) for name, v in times.items()}  # telemetry steps hide from the median
    label = f"dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.n_layers} layers" + (", regional compile" if args.regional else "")
    print(f"\nmodel: {label}; batch {args.batch} x {args.seq} tokens")
    print("| backend | step ms (median) | ratio to inductor | first step s (compile) | compile ratio |")
    print("|---|---|---|---|---|")
    rows = []
    for name in steps:
        row = {
            "model": label, "tokens_per_step": args.batch * args.seq, "backend": name,
            "step_ms": 1e3 * med[name], "ratio": med[name] / med["inductor"],
            "first_step_s": compile_s[name], "compile_ratio": compile_s[name] / compile_s["inductor"],
            "step_ms_mean": 1e3 * mean[name],
        }
        rows.append(row)
        print(f"| {name} | {row['step_ms']:.1f} | {row['ratio']:.2f} | {row['first_step_s']:.1f} "
              f"| {row['compile_ratio']:.2f} |")
    if args.stats_interval:
        print("\nmean step ms (every step, telemetry steps included): "
              + ", ".join(f"{name} {1e3 * mean[name]:.1f}" for name in steps))
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    print(f"\nmachine: {machine}; median of {args.steps} interleaved steps; "
          f"{'cold' if args.cold else 'warm or cold (not forced)'} Inductor cache")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "cold_cache": args.cold, "regional": args.regional, "steps": args.steps,
                       "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "load_avg_1_5_15_at_end": os.getloadavg(), "rows": rows}, f, indent=1)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        first_fp4 = next(name for name in steps if name != "inductor")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps[first_fp4](idx, targets)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return rows


if __name__ == "__main__":
    main()
