"""The main job: train a small LLaMA-style model with `backend="fp4"` next to BF16.

`python -m fp4compile demo` compiles the model under the `paper` recipe and under
`bf16` (same seed, same data order; block by block unless `--whole-model`),
trains each for a few hundred steps on the embedded corpus (the Python standard library's own source, no download), and
prints both losses and the report of what went to FP4.
"""
from __future__ import annotations

import argparse
import time

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="model preset (fp4compile.training.models.llama.PRESETS)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate (1e-3: the best of a bf16 sweep on the cpu preset, 300 steps of "
                             "16 x 128 bytes, BENCHMARKS.md; above it FP4 with DGE pulls ahead of bf16, which "
                             "flatters FP4; this demo's shorter schedule was not swept)")
    parser.add_argument("--recipe", default="paper", help="the FP4 recipe to compare with bf16")
    parser.add_argument("--data", default=None, help="a text file or folder (default: Python stdlib source)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-interval", type=int, default=0,
                        help="record FP4 telemetry every N steps for the FP4 recipe (0: off); writes a CSV and a "
                             "plot of underflow and clamp rate to --stats-dir")
    parser.add_argument("--stats-dir", default="results/demo_stats", help="where --stats-interval writes")
    parser.add_argument("--whole-model", action="store_true",
                        help="compile the whole model as one graph instead of block by block "
                             "(a cold compile then takes about three times as long, BENCHMARKS.md)")


def run(args) -> int:
    import fp4compile
    from fp4compile.training.data import load_corpus, split_train_val
    from fp4compile.training.models.llama import param_count, preset
    from fp4compile.training import TrainConfig, build_model, train

    import logging

    torch.set_float32_matmul_precision("high")
    # The backend logs a line before each Inductor compile (a minute or two on a
    # CPU): show it, so the first step's wait is explained.
    log = logging.getLogger("fp4compile")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("  %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    model_cfg = preset(args.preset)
    data = load_corpus(args.data, max_bytes=4_000_000)
    train_data, val_data = split_train_val(data, 0.05)
    train_cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=min(args.seq_len, model_cfg.max_seq_len),
        lr=args.lr, warmup_steps=max(1, args.steps // 10), eval_every=max(1, args.steps // 4),
        eval_sequences=256, seed=args.seed,
    )
    print(f"fp4compile demo: {args.preset} preset, "
          f"{param_count(build_model(model_cfg, args.seed)) / 1e6:.2f}M parameters, "
          f"{len(train_data) / 1e6:.1f} MB of training bytes, {args.steps} steps")
    results = {}
    for recipe in (args.recipe, "bf16"):
        fp4compile.reset()
        model = build_model(model_cfg, args.seed)
        # Every block linear quantized on CUDA too (the demo compares recipes, not speeds).
        options = {"recipe": recipe, "cuda_size_policy": False}
        if args.stats_interval and recipe == args.recipe:
            options["stats_interval"] = args.stats_interval
        if args.whole_model:
            compiled = torch.compile(model, backend="fp4", options=options)
        else:
            # Regional compilation: the transformer blocks are identical, so one
            # compiled graph serves them all and a cold compile covers one block.
            for block in model.layers:
                block.compile(backend="fp4", options=options)
            compiled = model
        print(f"\n{recipe}: compiling, then {args.steps} steps", flush=True)
        start = time.time()
        results[recipe] = train(model, compiled, train_cfg, train_data, val_data, desc=recipe)
        results[recipe].wall = time.time() - start
        if recipe == args.recipe:
            recipe_reports = fp4compile.reports()
            if args.stats_interval:
                _write_stats(model, args, recipe)

    print("\nrecipe      final train loss  final val loss  tokens/s  wall (s, incl. compile)")
    for recipe, res in results.items():
        print(f"{recipe:<11} {res.final_train_loss:>16.4f}  {res.final_val_loss:>14.4f}  "
              f"{res.tokens_per_s:>8.0f}  {res.wall:>8.1f}")
    gap = (results[args.recipe].final_val_loss / results["bf16"].final_val_loss - 1) * 100
    baseline = "bf16 (unquantized; on a CPU it runs in float32)" if not torch.cuda.is_available() else "bf16"
    print(f"\nval-loss gap of {args.recipe} to {baseline}: {gap:+.2f}%")
    print(f"\nWhat the fp4 backend did ({args.recipe}), one line per compiled graph:")
    for report in recipe_reports:
        print(" ", report.summary())
    if recipe_reports:  # the graphs of one model share their sites: one table suffices
        print("\n" + recipe_reports[0].table())
    if not args.whole_model:
        print(f"\n(Compiled block by block: one graph serves all {model_cfg.n_layers} blocks, so module names are "
              "relative to a block; the embedding, final norm and lm_head run outside it, unquantized.)")
    return 0


def _write_stats(model, args, recipe: str) -> None:
    """The FP4 telemetry of the run: CSV, a plot of the hardest layers, a two-line summary."""
    from pathlib import Path

    import fp4compile
    from fp4compile.stats import plot_rates

    table = fp4compile.stats(model, clear=True)
    out = Path(args.stats_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{recipe}_stats.csv")
    plot_rates(table, out / f"{recipe}_fp4_rates.png", title=f"{args.preset}, {recipe}, every {args.stats_interval} steps")
    for name in ("act_underflow", "act_clamp"):
        worst = table.hardest(name, 3)
        shown = ", ".join(f"{layer} {100 * table.series(layer, name)[1][-1]:.2f}%" for layer in worst)
        print(f"  {name} at the last record, hardest layers: {shown}")
    print(f"  FP4 telemetry ({len(table)} rows): {out}/{recipe}_stats.csv, {out}/{recipe}_fp4_rates.png")
