"""Evaluate trained weights through other recipes' forward passes (a control of the training benchmark).

A recipe's validation loss mixes two things: how good the weights it trained
are, and what its quantized forward pass costs at evaluation. Evaluating the
final weights of each run through every forward in ``--forwards`` separates
them: ``paper``-trained weights through the float32 forward measure the weights
alone, and float32-trained weights through the ``paper`` forward measure what
FP4 inference costs weights that never saw it.

Input: a ``bench train --save-weights`` output folder (``<run>_weights.pt``
files, each with the key it was trained under). Every run in the folder is
evaluated on its own validation set (the key's corpus, batch shape and number
of sequences), through each forward, compiled once per forward with the key's
backend. The diagonal (a run through its own recipe's forward) must reproduce
the run's final validation loss; the script checks that and fails otherwise.

    python -m fp4compile bench train --preset cpu-small --recipes bf16,paper --save-weights --out DIR
    python benchmarks/cross_eval.py DIR --forwards bf16,paper

Writes ``DIR/cross_eval.csv`` (run, trained recipe, forward recipe, validation
loss) and prints a table, one row per run.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch

import fp4compile  # noqa: F401  (registers the backends)
from fp4compile.training import bench as bench_train
from fp4compile.training.data import load_corpus, split_train_val, val_batches
from fp4compile.training.loop import TrainConfig, evaluate
from fp4compile.training.models.llama import Llama, preset

# A run's own forward must give its logged final loss back: same weights, same
# batches, same compiled code. Loose enough for a recompiled kernel's
# summation order, far below any gap between recipes.
DIAGONAL_RTOL = 1e-5


def _train_config(key: dict) -> TrainConfig:
    train = dict(key["train"])
    train["adam_betas"] = tuple(train["adam_betas"])
    return TrainConfig(**train)


def _data_key(key: dict) -> tuple:
    cfg = key["train"]
    return (key["preset"], key["data"], key["max_bytes"], cfg["batch_size"], cfg["seq_len"], cfg["eval_sequences"],
            cfg["dtype"], key["backend"])


def load_runs(folder: Path) -> list[dict]:
    """Every ``<run>_weights.pt`` in ``folder`` with its key and logged result, sorted by name."""
    runs = []
    for path in sorted(folder.glob("*_weights.pt")):
        name = path.name[: -len("_weights.pt")]
        payload = torch.load(path, map_location="cpu", weights_only=True)
        result_path = folder / f"{name}.json"
        logged = json.loads(result_path.read_text())["final_val_loss"] if result_path.exists() else None
        runs.append({"name": name, "key": payload["key"], "state": payload["model"], "logged": logged})
    if not runs:
        raise SystemExit(f"cross_eval: no *_weights.pt in {folder} (run bench train with --save-weights)")
    shapes = {_data_key(run["key"]) for run in runs}
    if len(shapes) != 1:
        raise SystemExit(f"cross_eval: the runs in {folder} differ in model, data or evaluation settings: {shapes}")
    return runs


def cross_evaluate(runs: list[dict], forwards: list[str], device: torch.device) -> list[dict]:
    """Validation loss of every run's weights through every forward recipe (one compile per forward)."""
    key = runs[0]["key"]
    cfg = _train_config(key)
    corpus = load_corpus(key["data"], max_bytes=key["max_bytes"])
    _, val_data = split_train_val(corpus, bench_train.VAL_FRACTION)
    batches = val_batches(val_data, cfg.batch_size, cfg.seq_len, cfg.eval_sequences, device=device)
    model = Llama(preset(key["preset"])).to(device)
    rows = []
    for forward in forwards:
        torch._dynamo.reset()
        compiled = bench_train.compile_for_recipe(model, forward, key["backend"])
        for run in runs:
            model.load_state_dict(run["state"])
            loss = evaluate(compiled, batches, cfg, device)
            rows.append({"run": run["name"], "trained": run["key"]["recipe"], "forward": forward,
                         "val_loss": loss, "logged": run["logged"]})
    return rows


def check_diagonal(rows: list[dict]) -> list[str]:
    """Runs whose own forward does not give back their logged final loss (should be none)."""
    bad = []
    for row in rows:
        own = bench_train.recipe_options(row["trained"]) == bench_train.recipe_options(row["forward"]) and (
            row["trained"] not in bench_train.DGE_ONLY_RECIPES)
        if own and row["logged"] is not None and not math.isclose(row["val_loss"], row["logged"],
                                                                   rel_tol=DIAGONAL_RTOL):
            bad.append(f"{row['run']} through {row['forward']}: {row['val_loss']:.6f}, logged {row['logged']:.6f}")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a bench train --save-weights output folder")
    parser.add_argument("--forwards", default="bf16,paper", help="comma-separated recipes to evaluate through")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    forwards = [name.strip() for name in args.forwards.split(",") if name.strip()]
    for name in forwards:
        bench_train.recipe_options(name)  # unknown names fail here, before any compile
    device = torch.device(args.device)
    runs = load_runs(args.folder)
    rows = cross_evaluate(runs, forwards, device)
    out_csv = args.folder / "cross_eval.csv"
    with out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "trained", "forward", "val_loss", "logged"])
        writer.writeheader()
        writer.writerows(rows)
    by_run: dict[str, dict[str, float]] = {}
    for row in rows:
        by_run.setdefault(row["run"], {})[row["forward"]] = row["val_loss"]
    print("| run | " + " | ".join(f"through {name}" for name in forwards) + " |")
    print("|---|" + "---|" * len(forwards))
    for name, losses in by_run.items():
        print(f"| {name} | " + " | ".join(f"{losses[f]:.4f}" for f in forwards) + " |")
    print(f"cross_eval: wrote {out_csv}")
    bad = check_diagonal(rows)
    if bad:
        print("cross_eval: a run's own forward does not reproduce its logged loss:\n  " + "\n  ".join(bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
