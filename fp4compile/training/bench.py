"""``python -m fp4compile bench train``: train one model under every recipe and compare losses.

The claim under test is the paper's: FP4 training with DGE and OCC reaches a
loss close to BF16, while direct FP4 and the ablations without them do worse
or diverge. This benchmark trains the same model from the same initial
weights on the same batches once per recipe (and per seed), and reports each
recipe's final validation loss as a *paired* gap to the BF16 run with the same
seed, so the seed-to-seed variation of the baseline does not enter the gap.

Outputs, all in ``--out``:

- ``<recipe>_seed<k>.csv``: the per-step log of each run (written as it trains);
- ``<recipe>_seed<k>.json``: the run's result, written once it is complete
  (``--resume`` skips runs that have one);
- ``checkpoints/<recipe>_seed<k>.pt``: the state of an unfinished run, from
  which ``--resume`` continues; removed when the run completes;
- ``loss_curves.png``: validation and training loss of all recipes;
- ``summary.md`` and ``summary.json``: the comparison table.

``--switch-last F --switch-to R`` adds a late precision switch
(``fp4compile.PrecisionSwitch``): for every recipe other than R, one more run,
named ``<recipe>_to_<R>``, trains under the recipe and recompiles the model with
R for the last fraction F of the steps (rounded up to whole steps). Its CSV has
a ``recipe`` column (the recipe each step trained under) and its JSON the
``switch_step``.

``--recipes`` takes the benchmark's own names below and any recipe name of
``fp4compile.RECIPES``.

A diverging recipe is a result (reported as such), and a recipe that fails to
compile or run is reported and skipped: neither stops the other recipes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fp4compile.config import RECIPES
from fp4compile.precision_switch import PrecisionSwitch, switch_step_for
from fp4compile.training.data import DEFAULT_MAX_BYTES, load_corpus, split_train_val, val_batches
from fp4compile.training.models.llama import PRESETS, Llama, param_count, preset
from fp4compile.training import StepRecord, TrainConfig, build_model, train

__all__ = [
    "RECIPE_NAMES",
    "BASELINE_RECIPE",
    "recipe_options",
    "compile_for_recipe",
    "add_arguments",
    "run",
    "main",
]

# Every recipe the benchmark knows, in the order tables and plots list them:
# the high-precision baseline, the FP8 reference, FP4 without and with the
# paper's method, then the paper's ablations.
RECIPE_NAMES = (
    "bf16",
    "fp8",
    "fp4-direct",
    "paper",
    "w4a8",
    "w4a8-ste",
    "w8a4",
    "w8a4-no-occ",
    "paper-tensorwise",
)
BASELINE_RECIPE = "bf16"

_RECIPE_OPTIONS: dict[str, dict] = {
    "bf16": {"recipe": "bf16"},
    "fp8": {"recipe": "fp8"},
    "fp4-direct": {"recipe": "fp4-direct"},
    "paper": {"recipe": "paper"},
    "w4a8": {"recipe": "w4a8"},
    # Weight-only FP4 with the straight-through estimator instead of DGE.
    "w4a8-ste": {"recipe": "w4a8", "dge_clamp": None},
    "w8a4": {"recipe": "w8a4"},
    # Activation-only FP4 without outlier clamping: the paper reports a NaN loss.
    "w8a4-no-occ": {"recipe": "w8a4", "occ_alpha": None},
    # The paper method with one scale per tensor instead of per row/channel.
    "paper-tensorwise": {"recipe": "paper", "weight_granularity": "tensor", "act_granularity": "tensor"},
}

# Stock torch.compile backends take no options; with them the benchmark only
# exercises its own plumbing (every recipe then trains identically).
BACKENDS_WITHOUT_OPTIONS = frozenset({"eager", "aot_eager", "inductor"})


@dataclass(frozen=True)
class PresetTraining:
    """Default training setup for a model preset (each overridable on the command line)."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    eval_sequences: int
    max_bytes: int | None  # corpus size; None reads the whole default corpus (about 12 MB)


# Peak learning rates follow the usual size scaling (GPT-3 used 6e-4 at 125M,
# 3e-4 at 350M, 2e-4 at 1.3B); the small CPU models tolerate more. Byte-level
# models see 4x fewer characters per token than BPE ones, hence the longer steps.
# The "cpu" rate is the best of a bf16 sweep (seed 0, 300 steps: 5e-4 1.828,
# 1e-3 1.777, 1.5e-3 1.796, 2e-3 1.806 final validation loss): every recipe
# trains with the baseline's tuned hyperparameters, as in the paper. Above the
# baseline's best rate the FP4 recipes with DGE pull ahead of bf16 (DGE damps
# the weight updates; see BENCHMARKS.md), which would flatter them.
PRESET_TRAINING: dict[str, PresetTraining] = {
    "tiny": PresetTraining(steps=60, batch_size=8, seq_len=64, lr=3e-3, eval_sequences=128, max_bytes=2**20),
    "cpu": PresetTraining(
        steps=300, batch_size=16, seq_len=128, lr=1e-3, eval_sequences=256, max_bytes=DEFAULT_MAX_BYTES
    ),
    "cpu-large": PresetTraining(
        steps=600, batch_size=16, seq_len=256, lr=1.5e-3, eval_sequences=256, max_bytes=DEFAULT_MAX_BYTES
    ),
    "gpu-125m": PresetTraining(steps=3000, batch_size=32, seq_len=1024, lr=6e-4, eval_sequences=256, max_bytes=None),
    "gpu-350m": PresetTraining(steps=2000, batch_size=32, seq_len=1024, lr=3e-4, eval_sequences=256, max_bytes=None),
    "gpu-1b": PresetTraining(steps=1000, batch_size=16, seq_len=2048, lr=2e-4, eval_sequences=256, max_bytes=None),
}

VAL_FRACTION = 0.05


def recipe_options(name: str) -> dict:
    """The ``torch.compile(..., options=...)`` dict of a benchmark recipe (a fresh copy).

    The benchmark's own names (``RECIPE_NAMES``, some of them ablations built
    from overrides) and any name in ``fp4compile.RECIPES``.
    """
    if name in _RECIPE_OPTIONS:
        return dict(_RECIPE_OPTIONS[name])
    if name in RECIPES:
        return {"recipe": name}
    known = list(RECIPE_NAMES) + [r for r in RECIPES if r not in _RECIPE_OPTIONS]
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(known)}")


@dataclass(frozen=True)
class RunSpec:
    """One run per seed: a recipe, optionally switched to ``switch_to`` for the last ``switch_last`` of steps."""

    recipe: str
    switch_to: str | None = None
    switch_last: float | None = None

    @property
    def label(self) -> str:
        """The run's name in file names and tables: the recipe, or ``<recipe>_to_<switch_to>``."""
        return self.recipe if self.switch_to is None else f"{self.recipe}_to_{self.switch_to}"


def switch_options(recipe: str) -> tuple[str, dict]:
    """(recipe name, other options) of the recipe a switch moves to, as `PrecisionSwitch` takes them."""
    options = recipe_options(recipe)
    options["cuda_size_policy"] = False  # as compile_for_recipe: every layer in the recipe
    return options.pop("recipe"), options


def compile_for_recipe(model: torch.nn.Module, recipe: str, backend: str, stats_interval: int = 0):
    """``torch.compile`` the model with the recipe's options (none for stock backends).

    ``stats_interval``: FP4 telemetry every N steps (``fp4compile.stats()``); 0 for none.
    """
    if backend in BACKENDS_WITHOUT_OPTIONS:
        recipe_options(recipe)  # still reject unknown recipe names
        return torch.compile(model, backend=backend)
    options = recipe_options(recipe)
    # Quality runs compare recipes on every layer: no layer kept in BF16 for speed on CUDA.
    options["cuda_size_policy"] = False
    if stats_interval:
        options["stats_interval"] = stats_interval
    return torch.compile(model, backend=backend, options=options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench train`` options to ``parser``."""
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model size (default: cpu)")
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPE_NAMES),
        help=f"comma-separated recipes (default: all of {','.join(RECIPE_NAMES)})",
    )
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds per recipe (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; seeds are SEED..SEED+N-1 (default: 0)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per preset)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: per preset)")
    parser.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default: per preset)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per preset)")
    parser.add_argument("--min-lr", type=float, default=None, help="final learning rate (default: lr / 10)")
    parser.add_argument(
        "--grad-clip", type=float, default=1.0, help="max global gradient norm, 0 for no clipping (default: 1.0)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default: steps / 10)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: steps / 12)")
    parser.add_argument("--eval-sequences", type=int, default=None, help="validation sequences (default: per preset)")
    parser.add_argument(
        "--data", default=None, help="text file or folder to train on (default: the Python stdlib sources)"
    )
    parser.add_argument("--max-bytes", type=int, default=None, help="corpus size limit in bytes (default: per preset)")
    parser.add_argument("--out", default="results/bench_train", help="output folder (default: results/bench_train)")
    parser.add_argument(
        "--resume", action="store_true", help="skip finished runs in --out and continue interrupted ones"
    )
    parser.add_argument(
        "--backend", default="fp4", help='torch.compile backend (default: fp4; "eager" tests the plumbing only)'
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="autocast dtype (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints, 0 for none (default: steps / 10)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--stats-interval",
        type=int,
        default=0,
        help="FP4 telemetry every N steps: <run>_stats.csv and <run>_fp4_rates.png (underflow and clamp rate "
        "of the hardest layers) per FP4 run (default: 0, off)",
    )
    parser.add_argument(
        "--switch-last",
        type=float,
        default=None,
        metavar="FRACTION",
        help="late precision switch: also run every recipe other than --switch-to with the last FRACTION of "
        "the steps (rounded up) under --switch-to, as <recipe>_to_<switch-to> (default: off)",
    )
    parser.add_argument(
        "--switch-to",
        default="bf16",
        metavar="RECIPE",
        help="the recipe a --switch-last run moves to (default: bf16)",
    )


@dataclass
class RunOutcome:
    """One (recipe, seed) run as the summary sees it (``recipe``: the run's label, see RunSpec)."""

    recipe: str
    seed: int
    switch_step: int | None = None
    history: list[StepRecord] = field(default_factory=list)
    diverged: bool = False
    diverged_at_step: int | None = None
    final_val_loss: float = float("nan")
    tokens_per_s: float = float("nan")
    wall_time_s: float = 0.0
    error: str | None = None


class ConfigMismatch(Exception):
    """Results in --out were produced with different settings than this invocation's."""


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _parse_recipes(text: str) -> list[str]:
    recipes = [name.strip() for name in text.split(",") if name.strip()]
    if not recipes:
        raise ValueError("--recipes is empty")
    for name in recipes:
        recipe_options(name)
    if len(set(recipes)) != len(recipes):
        raise ValueError(f"--recipes lists a recipe twice: {text}")
    return recipes


def _run_specs(recipes: list[str], switch_last: float | None, switch_to: str) -> list[RunSpec]:
    """The plain run of every recipe, then (with a switch) the switched run of every recipe but the target."""
    specs = [RunSpec(recipe) for recipe in recipes]
    if switch_last is None:
        return specs
    recipe_options(switch_to)
    switch_step_for(1, switch_last)  # checks the fraction: ValueError outside (0, 1]
    switched = [RunSpec(recipe, switch_to, switch_last) for recipe in recipes if recipe != switch_to]
    if not switched:
        raise ValueError(f"--switch-last: every recipe in --recipes is the switch target {switch_to!r}")
    return specs + switched


def _training_config(
    args: argparse.Namespace, defaults: PresetTraining, seed: int, device: torch.device
) -> TrainConfig:
    steps = args.steps if args.steps is not None else defaults.steps
    lr = args.lr if args.lr is not None else defaults.lr
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size,
        seq_len=args.seq_len if args.seq_len is not None else defaults.seq_len,
        lr=lr,
        min_lr=args.min_lr if args.min_lr is not None else lr / 10,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else steps // 10,
        eval_every=args.eval_every if args.eval_every is not None else max(1, steps // 12),
        eval_sequences=args.eval_sequences if args.eval_sequences is not None else defaults.eval_sequences,
        seed=seed,
        dtype=dtype,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
    )


def _run_name(recipe: str, seed: int) -> str:
    return f"{recipe}_seed{seed}"


def _format_csv_value(value: float | int) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


# The per-step CSV: the loop's record, then the recipe the step trained under
# (it changes at a precision switch).
CSV_COLUMNS = StepRecord.CSV_FIELDS + ("recipe",)


def _csv_values(record: StepRecord, recipe: str) -> list[str]:
    return [_format_csv_value(v) for v in record.as_row().values()] + [recipe]


def _write_csv(path: Path, history: list[StepRecord], recipe_of=lambda step: "") -> None:
    """``recipe_of(step)``: the recipe of the 1-based ``step``."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for record in history:
            writer.writerow(_csv_values(record, recipe_of(record.step)))


def _append_csv_row(path: Path, record: StepRecord, recipe: str = "") -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow(_csv_values(record, recipe))


def read_history_csv(path: str | os.PathLike) -> list[StepRecord]:
    """Read back a run's CSV log (empty cells are NaN)."""
    records = []
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {name: (float(row[name]) if row[name] != "" else float("nan")) for name in StepRecord.CSV_FIELDS}
            values["step"] = int(values["step"])
            values["tokens"] = int(values["tokens"])
            records.append(StepRecord(**values))
    return records


def _run_key(args: argparse.Namespace, spec: RunSpec, cfg: TrainConfig, max_bytes: int | None) -> dict:
    """Everything that determines a run's result, to check that --resume continues like for like."""
    key = {
        "recipe": spec.recipe,
        "options": recipe_options(spec.recipe),
        "preset": args.preset,
        "backend": args.backend,
        "data": str(args.data) if args.data is not None else None,
        "max_bytes": max_bytes,
        "train": asdict(cfg) | {"adam_betas": list(cfg.adam_betas)},
    }
    if spec.switch_to is not None:  # (plain runs keep the key they had before switches existed)
        key["switch"] = {"to": spec.switch_to, "to_options": recipe_options(spec.switch_to),
                         "last_fraction": spec.switch_last}
    return key


def _run_one(
    args: argparse.Namespace,
    spec: RunSpec,
    cfg: TrainConfig,
    key: dict,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    device: torch.device,
    out: Path,
) -> RunOutcome:
    recipe = spec.recipe
    name = _run_name(spec.label, cfg.seed)
    csv_path = out / f"{name}.csv"
    result_path = out / f"{name}.json"
    checkpoint_path = out / "checkpoints" / f"{name}.pt"
    key_path = out / "checkpoints" / f"{name}.key.json"

    if args.resume and result_path.exists():
        saved = json.loads(result_path.read_text())
        if saved["key"] != key:
            raise ConfigMismatch(f"{result_path} was produced with other settings; use another --out")
        return RunOutcome(
            recipe=spec.label,
            seed=cfg.seed,
            switch_step=saved.get("switch_step"),
            history=read_history_csv(csv_path),
            diverged=saved["diverged"],
            diverged_at_step=saved["diverged_at_step"],
            final_val_loss=_float_or_nan(saved["final_val_loss"]),
            tokens_per_s=_float_or_nan(saved["tokens_per_s"]),
            wall_time_s=saved["wall_time_s"],
        )

    resuming = args.resume and checkpoint_path.exists()
    if resuming:
        if not key_path.exists() or json.loads(key_path.read_text()) != key:
            raise ConfigMismatch(f"{checkpoint_path} was produced with other settings; use another --out")
    else:
        for stale in (checkpoint_path, result_path):
            stale.unlink(missing_ok=True)
    checkpoint_every = args.checkpoint_every if args.checkpoint_every is not None else max(1, cfg.steps // 10)
    use_checkpoints = checkpoint_every > 0 or resuming
    if use_checkpoints:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.write_text(json.dumps(key, indent=1))

    # Compiled code and guards from the previous recipe must not be reused (and
    # would otherwise pile up until dynamo's recompile limit drops to eager).
    torch._dynamo.reset()
    model = build_model(preset(args.preset), seed=cfg.seed, device=device)
    stats_interval = getattr(args, "stats_interval", 0)
    if stats_interval:
        import fp4compile

        fp4compile.stats(clear=True)  # nothing from an earlier run
    compiled_forward = compile_for_recipe(model, recipe, args.backend, stats_interval)
    switch = None
    recipe_of = lambda step: recipe  # noqa: E731 - the recipe of a 1-based step
    if spec.switch_to is not None:
        to_recipe, to_options = switch_options(spec.switch_to)
        if stats_interval:
            to_options["stats_interval"] = stats_interval
        switch = PrecisionSwitch(cfg.steps, spec.switch_last, to_recipe, from_recipe=recipe, backend=args.backend,
                                 options=to_options)
        recipe_of = lambda step: spec.switch_to if step - 1 >= switch.switch_step else recipe  # noqa: E731
        print(f"bench train: {spec.label} seed {cfg.seed}: {recipe} for {switch.switch_step} steps, then "
              f"{spec.switch_to} for the last {switch.last_steps} (switch step {switch.switch_step} of {cfg.steps})",
              flush=True)

    previous_history = []
    if resuming:
        # train() reloads the checkpoint itself; the CSV is rewritten from its history.
        # mmap: only the small history is read, not the weights.
        previous_history = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["history"]
    _write_csv(csv_path, [StepRecord(**record) for record in previous_history], recipe_of)

    result = train(
        model,
        compiled_forward,
        cfg,
        train_data,
        val_data,
        on_step=lambda record: _append_csv_row(csv_path, record, recipe_of(record.step)),
        progress=not args.no_progress,
        desc=f"{spec.label} seed {cfg.seed}",
        checkpoint_path=checkpoint_path if use_checkpoints else None,
        checkpoint_every=checkpoint_every,
        resume=resuming,
        precision_switch=switch,
    )
    if stats_interval:
        _write_stats(model, out / name, f"{args.preset}, {spec.label}, seed {cfg.seed}")
    outcome = RunOutcome(
        recipe=spec.label,
        seed=cfg.seed,
        switch_step=switch.switch_step if switch is not None else None,
        history=result.history,
        diverged=result.diverged,
        diverged_at_step=result.diverged_at_step,
        final_val_loss=result.final_val_loss,
        tokens_per_s=result.tokens_per_s,
        wall_time_s=result.wall_time_s,
    )
    result_path.write_text(
        json.dumps(
            {
                "key": key,
                "diverged": outcome.diverged,
                "diverged_at_step": outcome.diverged_at_step,
                "steps_completed": result.steps_completed,
                "final_val_loss": _nan_to_none(outcome.final_val_loss),
                "final_train_loss": _nan_to_none(result.final_train_loss),
                "tokens_per_s": _nan_to_none(outcome.tokens_per_s),
                "wall_time_s": outcome.wall_time_s,
                "parameters": param_count(model),
                "switch_step": outcome.switch_step,
                "switch_to": spec.switch_to,
                "switch_last_fraction": spec.switch_last,
            },
            indent=1,
        )
    )
    checkpoint_path.unlink(missing_ok=True)
    key_path.unlink(missing_ok=True)
    return outcome


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _float_or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _write_stats(model: torch.nn.Module, prefix: Path, title: str) -> None:
    """One run's FP4 telemetry: ``<run>_stats.csv`` and ``<run>_fp4_rates.png`` (nothing for bf16)."""
    import fp4compile
    from fp4compile.stats import plot_rates

    table = fp4compile.stats(model, clear=True)
    if len(table):
        table.to_csv(f"{prefix}_stats.csv")
        plot_rates(table, f"{prefix}_fp4_rates.png", title=title)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; returns a process exit status.

    0: every run completed (diverged runs included); 1: some run raised an
    error (reported, the others still ran); 2: invalid arguments or results in
    ``--out`` from different settings.
    """
    invocation_start = time.perf_counter()
    try:
        recipes = _parse_recipes(args.recipes)
        specs = _run_specs(recipes, getattr(args, "switch_last", None), getattr(args, "switch_to", "bf16"))
        if args.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        model_config = preset(args.preset)
        defaults = PRESET_TRAINING[args.preset]
        device = _resolve_device(args.device)
        seeds = [args.seed + i for i in range(args.seeds)]
        configs = {seed: _training_config(args, defaults, seed, device) for seed in seeds}
        seq_len = configs[seeds[0]].seq_len
        if seq_len > model_config.max_seq_len:
            raise ValueError(
                f"--seq-len {seq_len} exceeds the {args.preset} model's max_seq_len {model_config.max_seq_len}"
            )
        max_bytes = args.max_bytes if args.max_bytes is not None else defaults.max_bytes
        corpus = load_corpus(args.data, max_bytes=max_bytes)
        train_data, val_data = split_train_val(corpus, VAL_FRACTION)
        cfg = configs[seeds[0]]
        val_batches(val_data, cfg.batch_size, cfg.seq_len, cfg.eval_sequences)  # fails early if too small
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: a bad --device
        print(f"bench train: {error}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    outcomes: list[RunOutcome] = []
    # Seeds outermost: an interrupted benchmark has complete comparisons for the first seeds.
    for seed in seeds:
        cfg = configs[seed]
        for spec in specs:
            recipe = spec.label
            key = _run_key(args, spec, cfg, max_bytes)
            try:
                outcome = _run_one(args, spec, cfg, key, train_data, val_data, device, out)
            except ConfigMismatch as error:
                print(f"bench train: {error}", file=sys.stderr)
                return 2
            except Exception as error:  # noqa: BLE001 - one recipe's failure must not stop the others
                traceback.print_exc()
                print(f"bench train: {recipe} seed {seed} failed: {error!r}", file=sys.stderr)
                outcome = RunOutcome(recipe=recipe, seed=seed, error=f"{type(error).__name__}: {error}")
            if outcome.diverged:
                print(f"bench train: {recipe} seed {seed} diverged at step {outcome.diverged_at_step}", file=sys.stderr)
            outcomes.append(outcome)

    wall_time = time.perf_counter() - invocation_start
    context = {
        "preset": args.preset,
        "parameters": param_count_of_preset(args.preset),
        "backend": args.backend,
        "device": str(device),
        "train": configs[seeds[0]],
        "seeds": seeds,
        "data": str(args.data) if args.data is not None else "Python standard library sources",
        "corpus_bytes": len(corpus),
        "wall_time_s": wall_time,
    }
    labels = [spec.label for spec in specs]
    if getattr(args, "switch_last", None) is not None:
        context["switch"] = {"to": args.switch_to, "last_fraction": args.switch_last,
                             "switch_step": switch_step_for(configs[seeds[0]].steps, args.switch_last)}
    plot_loss_curves(outcomes, labels, out / "loss_curves.png", title=f"{args.preset}, backend {args.backend}")
    rows = summarize(outcomes, labels)
    (out / "summary.md").write_text(render_summary_markdown(rows, context))
    (out / "summary.json").write_text(
        json.dumps({"rows": rows, "context": context | {"train": asdict(context["train"])}}, indent=1, default=str)
    )
    print(f"bench train: results in {out}")
    return 1 if any(outcome.error for outcome in outcomes) else 0


def param_count_of_preset(name: str) -> int:
    """Parameters of a preset's model, counted without allocating it."""
    with torch.device("meta"):
        return param_count(Llama(preset(name)))


def summarize(outcomes: list[RunOutcome], recipes: list[str]) -> list[dict]:
    """One row per recipe: mean final val loss, paired gap to the baseline, speed, divergence.

    The gap of recipe r for seed k is ``(loss_r,k - loss_bf16,k) / loss_bf16,k``;
    its mean and sample standard deviation are over the seeds where both runs
    finished without diverging.
    """
    by_run = {(o.recipe, o.seed): o for o in outcomes}
    seeds = sorted({o.seed for o in outcomes})
    rows = []
    for recipe in recipes:
        runs = [by_run[(recipe, seed)] for seed in seeds if (recipe, seed) in by_run]
        finished = [o for o in runs if o.error is None]
        losses = [o.final_val_loss for o in finished if not o.diverged and math.isfinite(o.final_val_loss)]
        gaps = []
        for o in finished:
            baseline = by_run.get((BASELINE_RECIPE, o.seed))
            if baseline is None or baseline.error is not None or baseline.diverged:
                continue
            if o.diverged or not math.isfinite(o.final_val_loss) or not math.isfinite(baseline.final_val_loss):
                continue
            gaps.append(100.0 * (o.final_val_loss - baseline.final_val_loss) / baseline.final_val_loss)
        speeds = [o.tokens_per_s for o in finished if math.isfinite(o.tokens_per_s)]
        rows.append(
            {
                "recipe": recipe,
                "switch_step": next((o.switch_step for o in runs if o.switch_step is not None), None),
                "seeds": len(runs),
                "final_val_loss_mean": statistics.fmean(losses) if losses else None,
                "gap_to_bf16_pct_mean": statistics.fmean(gaps) if gaps else None,
                "gap_to_bf16_pct_std": statistics.stdev(gaps) if len(gaps) >= 2 else None,
                "gap_seeds": len(gaps),
                "tokens_per_s": statistics.fmean(speeds) if speeds else None,
                "diverged_seeds": sum(o.diverged for o in finished),
                "diverged_at_steps": [o.diverged_at_step for o in finished if o.diverged],
                "failed_seeds": len(runs) - len(finished),
                "errors": [o.error for o in runs if o.error is not None],
            }
        )
    return rows


def _machine_description(device: str) -> str:
    processor = platform.processor() or platform.machine()
    text = f"{processor}, {os.cpu_count()} CPUs"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text


def render_summary_markdown(rows: list[dict], context: dict) -> str:
    """The ``summary.md`` text: setup, results table, plot."""

    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    cfg: TrainConfig = context["train"]
    seeds = context["seeds"]
    lines = [
        f"# Training benchmark: preset `{context['preset']}`",
        "",
        f"- Machine: {_machine_description(context['device'])}; device {context['device']}; "
        f"torch {torch.__version__}; backend `{context['backend']}`; wall time {context['wall_time_s']:.1f} s.",
        f"- Model: {context['parameters'] / 1e6:.2f}M parameters. Training: {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} bytes, AdamW lr {cfg.lr:g} -> {cfg.min_lr:g} "
        f"(warmup {cfg.warmup_steps}, cosine), weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, "
        f"autocast {cfg.dtype}.",
        f"- Data: {context['data']} ({context['corpus_bytes']:,} bytes, last {VAL_FRACTION:.0%} held out; "
        f"{cfg.eval_sequences} validation sequences). Seeds: {', '.join(map(str, seeds))}.",
        f"- Gap to {BASELINE_RECIPE}: per seed (loss - loss_{BASELINE_RECIPE}) / loss_{BASELINE_RECIPE}, "
        "then mean and sample std over seeds.",
    ]
    switch = context.get("switch")
    if switch:
        lines.append(
            f"- Late precision switch: each `<recipe>_to_{switch['to']}` run trains under its recipe for "
            f"{switch['switch_step']} steps, then is recompiled with `{switch['to']}` for the last "
            f"{cfg.steps - switch['switch_step']} (--switch-last {switch['last_fraction']:g})."
        )
    lines += [
        "",
        f"| recipe | final val loss | gap to {BASELINE_RECIPE} (%) | gap std (%) | tokens/s | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["diverged_seeds"] == 0:
            diverged = "no"
        elif row["seeds"] == 1:
            diverged = f"yes (step {row['diverged_at_steps'][0]})"
        else:
            diverged = f"yes ({row['diverged_seeds']}/{row['seeds']} seeds)"
        if row["failed_seeds"]:
            diverged += f"; {row['failed_seeds']} run(s) failed"
        gap = row["gap_to_bf16_pct_mean"]
        lines.append(
            f"| {row['recipe']} | {number(row['final_val_loss_mean'], '.4f')} | "
            f"{'n/a' if gap is None else format(gap, '+.2f')} | {number(row['gap_to_bf16_pct_std'], '.2f')} | "
            f"{number(row['tokens_per_s'], ',.0f')} | {diverged} |"
        )
    errors = [(row["recipe"], error) for row in rows for error in row["errors"]]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {recipe}: `{error}`" for recipe, error in errors]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def _mean_curve(histories: list[list[StepRecord]], attribute: str) -> tuple[list[int], list[float]]:
    """Per-step mean over seeds of a logged value, at the steps every seed logged it."""
    per_seed = [
        {r.step: getattr(r, attribute) for r in history if math.isfinite(getattr(r, attribute))}
        for history in histories
    ]
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(values) for values in per_seed)))
    return steps, [statistics.fmean(values[step] for values in per_seed) for step in steps]


def _moving_average(values: list[float]) -> list[float]:
    """Trailing mean over a window of 1/25 of the run: smooths batch-to-batch noise
    of the training loss while keeping the curve's shape (no lag at the start)."""
    window = max(1, len(values) // 25)
    smoothed, running_sum = [], 0.0
    for index, value in enumerate(values):
        running_sum += value
        if index >= window:
            running_sum -= values[index - window]
        smoothed.append(running_sum / min(index + 1, window))
    return smoothed


def plot_loss_curves(outcomes: list[RunOutcome], recipes: list[str], path: Path, title: str = "") -> None:
    """One figure: validation loss (markers) and smoothed training loss (faint) per recipe,
    averaged over seeds, with an inset zoomed on the last 30% of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 6.5))
    inset = axes.inset_axes([0.42, 0.42, 0.55, 0.53])
    colors = plt.get_cmap("tab10")
    max_step = max((r.step for o in outcomes for r in o.history), default=1)
    zoom_from = 0.7 * max_step
    zoom_values: list[float] = []
    all_values: list[float] = []

    for index, recipe in enumerate(recipes):
        histories = [o.history for o in outcomes if o.recipe == recipe and o.error is None and o.history]
        if not histories:
            continue
        color = colors(index % 10)
        diverged = any(o.diverged for o in outcomes if o.recipe == recipe)
        train_steps, train_loss = _mean_curve(histories, "train_loss")
        val_steps, val_loss = _mean_curve(histories, "val_loss")
        label = recipe + (" (diverged)" if diverged else "")
        axes.plot(train_steps, _moving_average(train_loss), color=color, alpha=0.3, linewidth=1)
        axes.plot(val_steps, val_loss, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
        if diverged and train_steps:
            axes.plot(train_steps[-1], _moving_average(train_loss)[-1], color=color, marker="x", markersize=9)
        switch_step = next((o.switch_step for o in outcomes if o.recipe == recipe and o.switch_step is not None), None)
        if switch_step is not None:  # the first step under the new recipe is switch_step + 1
            for target in (axes, inset):
                target.axvline(switch_step + 0.5, color=color, linestyle=":", linewidth=1)
        inset.plot(val_steps, val_loss, color=color, marker="o", markersize=3, linewidth=1.5)
        all_values += val_loss + train_loss
        if not diverged:  # a diverging curve would stretch the zoom over its blow-up
            zoom_values += [loss for step, loss in zip(val_steps, val_loss) if step >= zoom_from]

    # Losses above that of a uniform guess over 256 bytes (ln 256 = 5.55) are
    # only reached by diverging runs; cutting there keeps the other curves legible.
    uniform_loss = math.log(256)
    if all_values:
        axes.set_ylim(min(all_values) * 0.95, min(max(all_values), uniform_loss) * 1.05)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per byte)")
    axes.set_title(f"Validation (markers) and smoothed training loss (faint){': ' + title if title else ''}")
    axes.legend(loc="lower left", fontsize=8)
    axes.grid(alpha=0.3)

    if len(zoom_values) >= 2 and max(zoom_values) > min(zoom_values):
        low, high = min(zoom_values), max(zoom_values)
        margin = 0.1 * (high - low)
        inset.set_xlim(zoom_from, max_step * 1.01)
        inset.set_ylim(low - margin, high + margin)
        inset.set_title("validation loss, last 30% of steps", fontsize=8)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
        axes.indicate_inset_zoom(inset, edgecolor="gray")
    else:
        inset.remove()

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m fp4compile.training.bench [options]``."""
    parser = argparse.ArgumentParser(
        prog="fp4compile bench train", description="Train one model under every recipe and compare losses."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
