"""Control runs behind BENCHMARKS.md's "why `paper` leads `bf16`" section.

Two experiments on the `cpu` preset, seed-paired with `bench train` (same
initial weights, batches and schedule):

- `early`: train one recipe (plus config overrides) for the first N steps of the
  300-step schedule and print the training loss and gradient norm of every step,
  to see which part of a recipe (DGE, OCC, clipping) moves early training.

      python benchmarks/dge_controls.py early paper --steps 30 --lr 2e-3 --backend fp4_eager
      python benchmarks/dge_controls.py early w4a8 --set dge_clamp=None --grad-clip 0

- `matrix-lr`: train the unquantized model with the learning rate of the
  transformer blocks' weight matrices (the layers the FP4 recipes quantize)
  scaled by a factor, everything else at the peak rate, and print the final
  validation loss: tests whether DGE acts like a plain learning-rate cut.

      python benchmarks/dge_controls.py matrix-lr --lr 1e-3 --factor 0.69

`--small` (either experiment) is a smoke run: the tiny preset on a 200 kB
corpus with the tiny preset's batch shape, 3 steps of the schedule.
"""
from __future__ import annotations

import argparse
import ast

import torch

import fp4compile  # noqa: F401  (registers the backends)
from fp4compile.training import bench as bench_train, loop as training
from fp4compile.training.data import load_corpus, split_train_val
from fp4compile.training.models.llama import preset


class _StopTraining(Exception):
    pass


# The smoke run's shape: the tiny preset, a small corpus, a 3-step schedule.
SMALL = {"preset": "tiny", "max_bytes": 200_000, "steps": 3, "batch_size": 4, "seq_len": 32, "eval_sequences": 8}


def _preset(args: argparse.Namespace) -> str:
    return SMALL["preset"] if args.small else "cpu"


def _train_config(args: argparse.Namespace, eval_every: int, eval_sequences: int) -> training.TrainConfig:
    defaults = bench_train.PRESET_TRAINING["cpu"]  # the schedule `bench train --preset cpu` uses
    if args.small:
        defaults = bench_train.PresetTraining(
            steps=SMALL["steps"], batch_size=SMALL["batch_size"], seq_len=SMALL["seq_len"], lr=defaults.lr,
            eval_sequences=SMALL["eval_sequences"], max_bytes=SMALL["max_bytes"],
        )
        eval_sequences = min(eval_sequences, SMALL["eval_sequences"])
    return training.TrainConfig(
        steps=defaults.steps, batch_size=defaults.batch_size, seq_len=defaults.seq_len,
        lr=args.lr, min_lr=args.lr / 10, warmup_steps=defaults.steps // 10,
        eval_every=eval_every, eval_sequences=eval_sequences, seed=args.seed, grad_clip=args.grad_clip,
    )


def _splits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    max_bytes = SMALL["max_bytes"] if args.small else bench_train.PRESET_TRAINING["cpu"].max_bytes
    return split_train_val(load_corpus(None, max_bytes=max_bytes), bench_train.VAL_FRACTION)


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        overrides[name] = ast.literal_eval(text)
    return overrides


def run_early(args: argparse.Namespace) -> None:
    train_data, val_data = _splits(args)
    cfg = _train_config(args, eval_every=10**9, eval_sequences=16)  # no evaluation inside the window
    model = training.build_model(preset(_preset(args)), args.seed)
    options = bench_train.recipe_options(args.recipe) | _parse_overrides(args.set)
    forward = torch.compile(model, backend=args.backend, options=options)
    records = []

    def stop_after_window(record: training.StepRecord) -> None:
        records.append(record)
        if record.step >= args.steps:
            raise _StopTraining

    try:
        training.train(model, forward, cfg, train_data, val_data, on_step=stop_after_window, progress=False)
    except _StopTraining:
        pass
    print(f"{args.recipe} {options} lr {args.lr:g} grad clip {args.grad_clip:g}, seed {args.seed}")
    print("train loss:", " ".join(f"{r.train_loss:.4f}" for r in records))
    print("grad norm: ", " ".join(f"{r.grad_norm:.2f}" for r in records))


class _ScaledAdamW(torch.optim.AdamW):
    """AdamW whose param groups may carry an ``lr_scale`` on top of the scheduled rate."""

    def step(self, closure=None):
        scheduled = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, scheduled):
                group["lr"] = lr


def run_matrix_lr(args: argparse.Namespace) -> None:
    def make_optimizer(model, cfg):
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in model.named_parameters():
            block_matrix = param.dim() == 2 and name.startswith("layers.")
            groups.setdefault((block_matrix, param.dim() >= 2), []).append(param)
        return _ScaledAdamW(
            [
                {"params": params, "weight_decay": cfg.weight_decay if decayed else 0.0,
                 "lr_scale": args.factor if block_matrix else 1.0}
                for (block_matrix, decayed), params in groups.items()
            ],
            lr=training.lr_at(0, cfg), betas=cfg.adam_betas, eps=cfg.adam_eps,
        )

    training.make_optimizer = make_optimizer  # train() builds its optimizer through this name
    train_data, val_data = _splits(args)
    cfg = _train_config(args, eval_every=10**9, eval_sequences=bench_train.PRESET_TRAINING["cpu"].eval_sequences)
    model = training.build_model(preset(_preset(args)), args.seed)
    result = training.train(model, model, cfg, train_data, val_data, progress=False)
    print(f"unquantized, peak lr {args.lr:g}, block matrices x{args.factor:g}, seed {args.seed}: "
          f"final val loss {result.final_val_loss:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    early = sub.add_parser("early", help="per-step losses over the first steps of one recipe")
    early.add_argument("recipe", choices=bench_train.RECIPE_NAMES)
    early.add_argument("--steps", type=int, default=30)
    early.add_argument("--backend", default="fp4_eager")
    early.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="Fp4Config override")
    matrix = sub.add_parser("matrix-lr", help="unquantized run with the block matrices' rate scaled")
    matrix.add_argument("--factor", type=float, default=0.69)
    for p in (early, matrix):
        p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
        p.add_argument("--grad-clip", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--small", action="store_true", help="smoke run: tiny preset, small corpus, 3 steps")
    args = parser.parse_args()
    (run_early if args.experiment == "early" else run_matrix_lr)(args)


if __name__ == "__main__":
    main()
