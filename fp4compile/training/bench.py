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

Longer studies: ``--tokens N`` sets the run length in tokens instead of steps
(``ceil(N / tokens per step)`` steps), ``--eval-every-tokens N`` the validation
interval; ``--lrs A,B,C`` trains every recipe at each peak learning rate (runs
named ``<recipe>_lr<rate>``) and reports each recipe's best rate and its gap,
best rate against the baseline's best rate; ``gap_curves.png`` plots each run's
paired validation gap to the baseline over training (seed band shaded).

``--regional`` compiles each transformer block on its own instead of the whole
model: the blocks share one compiled graph, so a cold compile covers one block
(the embedding, final norm and unquantized head run uncompiled). Its runs carry
``regional`` in their resume key, so they never resume or pair with
whole-model runs in the same ``--out``.

Honest labels: with autocast float32 (the default on CPU) the ``bf16`` recipe
computes in float32; tables, plot legends and printed lines then call it
"float32 (bf16 recipe on CPU)" (file names and JSON keys keep ``bf16``).

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fp4compile.config import RECIPES, Fp4Config
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
    # NVFP4 with round-to-nearest gradients: what stochastic rounding buys (not in the default list).
    "nvfp4-nearest": {"recipe": "nvfp4", "grad_rounding": "nearest"},
    # Controls for what DGE does (not in the default list). The paper method with the
    # straight-through estimator instead of DGE:
    "paper-ste": {"recipe": "paper", "dge_clamp": None},
    # The unquantized baseline with only DGE's gradient factor on the weights `paper`
    # quantizes (fp4compile.training.dge_only; the factor is applied outside the compiler).
    "dge-only": {"recipe": "bf16"},
}

# Benchmark recipes that multiply weight gradients by the DGE factor of this recipe's
# weight quantizer, without quantizing anything (fp4compile.training.dge_only).
DGE_ONLY_RECIPES = {"dge-only": "paper"}

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
    # 20 tokens per parameter: 8500 steps of 2048 tokens for its 0.87M parameters.
    # The whole default corpus (about 12 MB), so the 17M tokens are sampled from
    # about 1.5 passes over it rather than 2 over the 8 MB prefix.
    # Its rate is the best of a bf16 sweep at a tenth of that length (850 steps, seed 0:
    # 1e-3 1.465, 2e-3 1.449, 4e-3 1.437, 8e-3 1.488; BENCHMARKS.md).
    "cpu-small": PresetTraining(steps=8500, batch_size=16, seq_len=128, lr=4e-3, eval_sequences=256, max_bytes=None),
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
    known = (list(RECIPE_NAMES) + [r for r in _RECIPE_OPTIONS if r not in RECIPE_NAMES]
             + [r for r in RECIPES if r not in _RECIPE_OPTIONS])
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(known)}")


@dataclass(frozen=True)
class RunSpec:
    """One run per seed: a recipe, optionally switched to ``switch_to`` for the last ``switch_last`` of steps."""

    recipe: str
    switch_to: str | None = None
    switch_last: float | None = None
    lr: float | None = None  # the peak learning rate of a --lrs sweep; None: the run's --lr
    # The baseline's rate for this run's gap; None: the same rate as this run
    # (a NAME@RATE run is compared with the baseline at the one --lrs rate).
    baseline_lr: float | None = None

    @property
    def base(self) -> str:
        """The recipe, or ``<recipe>_to_<switch_to>`` for a switched run."""
        return self.recipe if self.switch_to is None else f"{self.recipe}_to_{self.switch_to}"

    @property
    def label(self) -> str:
        """The run's name in file names and JSON: ``base``, then ``_lr<rate>`` in a sweep."""
        return self.base if self.lr is None else f"{self.base}_lr{self.lr:g}"

    @property
    def baseline_label(self) -> str:
        """The run this one's gap is measured against: the baseline recipe at the same learning rate."""
        return RunSpec(BASELINE_RECIPE, lr=self.lr if self.baseline_lr is None else self.baseline_lr).label

    def display(self, float32_name: str | None = None) -> str:
        """The name tables, legends and printed lines use (see ``display_recipe``)."""
        text = display_recipe(self.recipe, float32_name)
        if self.switch_to is not None:
            text += f" -> {display_recipe(self.switch_to, float32_name)} (last {self.switch_last:g})"
        if self.lr is not None:
            text += f", lr {self.lr:g}"
        return text


def float32_name(dtype: str, device: torch.device) -> str | None:
    """What the high-precision recipe computes in, when that is not bf16: its honest name, else None.

    The ``bf16`` recipe keeps every matmul in the model's compute dtype; without
    bfloat16 autocast (``--dtype float32``, the default on CPU) that is float32.
    """
    if dtype != "float32":
        return None
    return "float32 (bf16 recipe on CPU)" if device.type == "cpu" else "float32 (bf16 recipe, no autocast)"


def display_recipe(recipe: str, float32: str | None = None) -> str:
    """A recipe's name for people: the high-precision one is called ``float32`` when it computes in float32."""
    if float32 is not None and recipe_options(recipe) == {"recipe": "bf16"} and recipe not in DGE_ONLY_RECIPES:
        return float32
    return recipe


def switch_options(recipe: str) -> tuple[str, dict]:
    """(recipe name, other options) of the recipe a switch moves to, as `PrecisionSwitch` takes them."""
    options = recipe_options(recipe)
    options["cuda_size_policy"] = False  # as compile_for_recipe: every layer in the recipe
    return options.pop("recipe"), options


def compile_for_recipe(model: torch.nn.Module, recipe: str, backend: str, stats_interval: int = 0,
                       regional: bool = False):
    """``torch.compile`` the model with the recipe's options (none for stock backends).

    ``stats_interval``: FP4 telemetry every N steps (``fp4compile.stats()``); 0 for none.
    ``regional``: compile each transformer block (``model.layers``) on its own and
    return ``model`` itself. The blocks are identical, so they share one compiled
    graph: the compile covers one block instead of the whole model. The embedding,
    final norm and output head then run uncompiled; the head is not quantized by
    any recipe (the default skip list), so every quantized layer is still inside a
    compiled block.
    """
    if backend in BACKENDS_WITHOUT_OPTIONS:
        recipe_options(recipe)  # still reject unknown recipe names
        kwargs = {"backend": backend}
    else:
        options = recipe_options(recipe)
        # Quality runs compare recipes on every layer: no layer kept in BF16 for speed on CUDA.
        options["cuda_size_policy"] = False
        if stats_interval:
            options["stats_interval"] = stats_interval
        kwargs = {"backend": backend, "options": options}
    if not regional:
        return torch.compile(model, **kwargs)
    for block in model.layers:
        block.compile(**kwargs)
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench train`` options to ``parser``."""
    parser.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model size (default: cpu)")
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPE_NAMES),
        help=f"comma-separated recipes: the benchmark's {','.join(RECIPE_NAMES)}, its variants and controls "
        f"({','.join(r for r in _RECIPE_OPTIONS if r not in RECIPE_NAMES)}) or any other name in "
        f"fp4compile.RECIPES ({','.join(r for r in RECIPES if r not in _RECIPE_OPTIONS) or 'none'}) "
        f"(default: all of {','.join(RECIPE_NAMES)}); with --lrs, NAME@RATE runs NAME at RATE only",
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
        "--save-weights",
        action="store_true",
        help="save each run's final weights as <run>_weights.pt in --out (for benchmarks/cross_eval.py)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="steps between checkpoints, 0 for none (default: steps / 10)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--regional",
        action="store_true",
        help="compile each transformer block on its own (one graph shared by the blocks, as `make demo` does): "
        "a shorter compile; the embedding, final norm and unquantized head run uncompiled (default: whole model)",
    )
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
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="training tokens instead of --steps: ceil(TOKENS / (batch size x seq len)) steps (default: off)",
    )
    parser.add_argument(
        "--eval-every-tokens",
        type=int,
        default=None,
        help="validate every ceil(N / tokens per step) steps, instead of --eval-every (default: off)",
    )
    parser.add_argument(
        "--lrs",
        default=None,
        metavar="LR,LR,...",
        help="learning-rate sweep: train every recipe at each peak rate (runs <recipe>_lr<rate>) and report "
        "each recipe's best rate; min lr is rate / 10 unless --min-lr. A --recipes entry NAME@RATE adds one "
        "run of NAME at RATE (e.g. its own tuned rate beside a shared one), compared with the baseline at "
        "the --lrs rate when --lrs has one (default: off, --lr)",
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


def _split_rate(entry: str) -> tuple[str, float | None]:
    """``NAME`` -> (NAME, None); ``NAME@RATE`` -> (NAME, RATE): one run of NAME at peak rate RATE."""
    name, at, rate_text = entry.partition("@")
    if not at:
        return entry, None
    try:
        rate = float(rate_text)
    except ValueError:
        raise ValueError(f"--recipes: {entry!r} is not NAME@RATE with a number RATE") from None
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--recipes: the rate of {entry!r} must be positive")
    return name, rate


def _parse_recipes(text: str) -> list[str]:
    recipes = [name.strip() for name in text.split(",") if name.strip()]
    if not recipes:
        raise ValueError("--recipes is empty")
    for entry in recipes:
        recipe_options(_split_rate(entry)[0])
    if len(set(recipes)) != len(recipes):
        raise ValueError(f"--recipes lists a recipe twice: {text}")
    return recipes


def _run_specs(recipes: list[str], switch_last: float | None, switch_to: str,
               lrs: list[float | None] = (None,)) -> list[RunSpec]:
    """Per learning rate: the plain run of every recipe, then (with a switch) the switched run of every
    recipe but the target."""
    specs = []
    extra = [_split_rate(entry) for entry in recipes if "@" in entry]
    recipes = [entry for entry in recipes if "@" not in entry]
    if extra and lrs == [None]:
        raise ValueError("--recipes NAME@RATE entries need --lrs (the rate of the other recipes)")
    if extra and switch_last is not None:
        raise ValueError("--recipes NAME@RATE entries and --switch-last exclude each other")
    if switch_last is not None:
        recipe_options(switch_to)
        switch_step_for(1, switch_last)  # checks the fraction: ValueError outside (0, 1]
        if all(recipe == switch_to for recipe in recipes):
            raise ValueError(f"--switch-last: every recipe in --recipes is the switch target {switch_to!r}")
    for lr in lrs:
        specs += [RunSpec(recipe, lr=lr) for recipe in recipes]
        if switch_last is not None:
            specs += [RunSpec(recipe, switch_to, switch_last, lr) for recipe in recipes if recipe != switch_to]
    # NAME@RATE: one more run of NAME (its own tuned rate, say), compared with the
    # baseline at the --lrs rate when there is one rate, else at its own rate.
    baseline_lr = lrs[0] if len(lrs) == 1 else None
    for name, rate in extra:
        spec = RunSpec(name, lr=rate, baseline_lr=baseline_lr)
        if spec.label in {existing.label for existing in specs}:
            raise ValueError(f"--recipes: {name}@{rate:g} repeats a run that --lrs already makes")
        specs.append(spec)
    return specs


def _parse_lrs(text: str | None, lr: float | None) -> list[float | None]:
    """The --lrs rates (None: no sweep, one run per recipe at --lr)."""
    if text is None:
        return [None]
    if lr is not None:
        raise ValueError("--lr and --lrs exclude each other")
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--lrs takes comma-separated numbers, got {text!r}") from None
    if not rates:
        raise ValueError("--lrs is empty")
    if not all(math.isfinite(rate) and rate > 0 for rate in rates):
        raise ValueError(f"--lrs rates must be positive, got {text!r}")
    if len({f"{rate:g}" for rate in rates}) != len(rates):  # run names use %g
        raise ValueError(f"--lrs lists a rate twice: {text!r}")
    return rates


def _spec_config(cfg: TrainConfig, spec: RunSpec, min_lr: float | None) -> TrainConfig:
    """The run's training config: the seed's, with the sweep's peak rate (min lr: rate / 10 unless --min-lr)."""
    if spec.lr is None:
        return cfg
    return replace(cfg, lr=spec.lr, min_lr=min_lr if min_lr is not None else spec.lr / 10)


def _in_steps(tokens, steps_flag, tokens_name: str, steps_name: str, tokens_per_step: int):
    """A token count given on the command line as whole steps (ceil: at least the tokens asked
    for), or None when it was not given. The step flag and the token flag exclude each other."""
    if tokens is None:
        return None
    if steps_flag is not None:
        raise ValueError(f"{steps_name} and {tokens_name} exclude each other")
    if tokens < 1:
        raise ValueError(f"{tokens_name} must be positive, got {tokens}")
    return -(-tokens // tokens_per_step)


def _training_config(
    args: argparse.Namespace, defaults: PresetTraining, seed: int, device: torch.device
) -> TrainConfig:
    batch_size = args.batch_size if args.batch_size is not None else defaults.batch_size
    seq_len = args.seq_len if args.seq_len is not None else defaults.seq_len
    tokens_per_step = batch_size * seq_len
    steps = _in_steps(getattr(args, "tokens", None), args.steps, "--tokens", "--steps", tokens_per_step)
    if steps is None:
        steps = args.steps if args.steps is not None else defaults.steps
    eval_every = _in_steps(getattr(args, "eval_every_tokens", None), args.eval_every, "--eval-every-tokens",
                           "--eval-every", tokens_per_step)
    if eval_every is None:
        eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 12)
    lr = args.lr if args.lr is not None else defaults.lr
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr=args.min_lr if args.min_lr is not None else lr / 10,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else steps // 10,
        eval_every=eval_every,
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
    if getattr(args, "regional", False):  # (whole-model runs keep the key they had before --regional)
        key["regional"] = True
    if spec.recipe in DGE_ONLY_RECIPES:
        key["dge_only"] = recipe_options(DGE_ONLY_RECIPES[spec.recipe])
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
    float32 = float32_name(cfg.dtype, device)
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
    if recipe in DGE_ONLY_RECIPES:
        from fp4compile.training.dge_only import attach_dge_only

        attach_dge_only(model, Fp4Config.from_options(recipe_options(DGE_ONLY_RECIPES[recipe])))
    regional = getattr(args, "regional", False)
    compiled_forward = compile_for_recipe(model, recipe, args.backend, stats_interval, regional=regional)
    switch = None
    recipe_of = lambda step: recipe  # noqa: E731 - the recipe of a 1-based step
    if spec.switch_to is not None:
        to_recipe, to_options = switch_options(spec.switch_to)
        if stats_interval:
            to_options["stats_interval"] = stats_interval
        switch = PrecisionSwitch(cfg.steps, spec.switch_last, to_recipe, from_recipe=display_recipe(recipe, float32),
                                 backend=args.backend, options=to_options, regional=regional,
                                 to_label=display_recipe(spec.switch_to, float32))
        recipe_of = lambda step: spec.switch_to if step - 1 >= switch.switch_step else recipe  # noqa: E731
        print(f"bench train: {spec.display(float32)} seed {cfg.seed}: {display_recipe(recipe, float32)} for "
              f"{switch.switch_step} steps, then {display_recipe(spec.switch_to, float32)} for the last "
              f"{switch.last_steps} (switch step {switch.switch_step} of {cfg.steps})", flush=True)

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
        desc=f"{spec.display(float32)} seed {cfg.seed}",
        checkpoint_path=checkpoint_path if use_checkpoints else None,
        checkpoint_every=checkpoint_every,
        resume=resuming,
        precision_switch=switch,
    )
    if stats_interval:
        _write_stats(model, out / name, f"{args.preset}, {spec.display(float32)}, seed {cfg.seed}")
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
    if getattr(args, "save_weights", False):
        # The final weights, for evaluating them through another recipe's forward
        # (benchmarks/cross_eval.py); the key says how they were trained.
        torch.save({"key": key, "model": model.state_dict()}, out / f"{name}_weights.pt")
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
        lrs = _parse_lrs(getattr(args, "lrs", None), args.lr)
        specs = _run_specs(recipes, getattr(args, "switch_last", None), getattr(args, "switch_to", "bf16"), lrs)
        if args.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        switching = getattr(args, "switch_last", None) is not None
        if getattr(args, "regional", False) and switching and args.backend != "fp4":
            raise ValueError("--regional with --switch-last needs --backend fp4 (the switch recompiles the blocks "
                             "through fp4compile.compile_model)")
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
    float32 = float32_name(cfg.dtype, device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if getattr(args, "tokens", None) is not None:
        print(f"bench train: --tokens {args.tokens}: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} = "
              f"{tokens_per_step} tokens ({cfg.steps * tokens_per_step} tokens)", flush=True)
    if getattr(args, "eval_every_tokens", None) is not None:
        print(f"bench train: --eval-every-tokens {args.eval_every_tokens}: validation every {cfg.eval_every} steps "
              f"({cfg.eval_every * tokens_per_step} tokens) and at the last step", flush=True)
    if float32 is not None and any(display_recipe(spec.recipe, float32) != spec.recipe for spec in specs):
        print(f"bench train: autocast {cfg.dtype} on {device}: the bf16 recipe computes in float32, called "
              f"\"{float32}\" below", flush=True)

    outcomes: list[RunOutcome] = []
    # Seeds outermost: an interrupted benchmark has complete comparisons for the first seeds.
    for seed in seeds:
        for spec in specs:
            cfg = _spec_config(configs[seed], spec, args.min_lr)
            recipe = spec.display(float32)
            key = _run_key(args, spec, cfg, max_bytes)
            try:
                outcome = _run_one(args, spec, cfg, key, train_data, val_data, device, out)
            except ConfigMismatch as error:
                print(f"bench train: {error}", file=sys.stderr)
                return 2
            except Exception as error:  # noqa: BLE001 - one recipe's failure must not stop the others
                traceback.print_exc()
                print(f"bench train: {recipe} seed {seed} failed: {error!r}", file=sys.stderr)
                outcome = RunOutcome(recipe=spec.label, seed=seed, error=f"{type(error).__name__}: {error}")
            if outcome.diverged:
                print(f"bench train: {recipe} seed {seed} diverged at step {outcome.diverged_at_step}", file=sys.stderr)
            outcomes.append(outcome)

    wall_time = time.perf_counter() - invocation_start
    context = {
        "preset": args.preset,
        "parameters": param_count_of_preset(args.preset),
        "backend": args.backend,
        "regional": getattr(args, "regional", False),
        "device": str(device),
        "train": configs[seeds[0]],
        "seeds": seeds,
        "data": str(args.data) if args.data is not None else "Python standard library sources",
        "corpus_bytes": len(corpus),
        "wall_time_s": wall_time,
    }
    labels = [spec.label for spec in specs]
    names = {spec.label: spec.display(float32) for spec in specs}
    baselines = {spec.label: spec.baseline_label for spec in specs}
    context["names"] = names
    context["baseline_name"] = display_recipe(BASELINE_RECIPE, float32)
    if getattr(args, "switch_last", None) is not None:
        context["switch"] = {"to": args.switch_to, "to_name": display_recipe(args.switch_to, float32),
                             "last_fraction": args.switch_last,
                             "switch_step": switch_step_for(configs[seeds[0]].steps, args.switch_last)}
    rows = summarize(outcomes, labels, baselines)
    for row in rows:
        row["label"] = names[row["recipe"]]
    sweep = best_rates(outcomes, specs, float32) if lrs != [None] else None
    if sweep is not None:
        context["lrs"] = sorted({spec.lr for spec in specs})
        context["min_lr"] = args.min_lr
        for entry in sweep:
            if entry["best_lr"] is None:
                print(f"bench train: best learning rate of {entry['name']}: none (every rate diverged or failed)")
            else:
                print(f"bench train: best learning rate of {entry['name']}: {entry['best_lr']:g} "
                      f"(final val loss {entry['best_loss']:.4f})", flush=True)
    title = f"{args.preset}, backend {args.backend}"
    plotted = _plot_or_explain(plot_loss_curves, outcomes, labels, out / "loss_curves.png", title=title, names=names)
    if plotted:
        _plot_or_explain(plot_gap_curves, outcomes, labels, baselines, out / "gap_curves.png", names=names,
                         baseline_name=context["baseline_name"], title=title)
    context["plots"] = plotted
    (out / "summary.md").write_text(render_summary_markdown(rows, context, sweep))
    (out / "summary.json").write_text(
        json.dumps({"rows": rows, "sweep": sweep, "context": context | {"train": asdict(context["train"])}},
                   indent=1, default=str)
    )
    print(f"bench train: results in {out}")
    return 1 if any(outcome.error for outcome in outcomes) else 0


def param_count_of_preset(name: str) -> int:
    """Parameters of a preset's model, counted without allocating it."""
    with torch.device("meta"):
        return param_count(Llama(preset(name)))


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-30); larger
# samples use the normal quantile's neighbourhood (2.04 at 30, 1.96 in the limit).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (1.96 beyond the table)."""
    if df < 1:
        raise ValueError("t_quantile_975 needs at least one degree of freedom")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def ci95_half_width(values: list[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean of ``values`` (t-based; None below 2 values)."""
    if len(values) < 2:
        return None
    return t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def _paired_gaps(by_run: dict, label: str, baseline: str, seeds: list[int]) -> list[float]:
    """Per seed, 100 (loss_label - loss_baseline) / loss_baseline, over seeds where both finished."""
    gaps = []
    for seed in seeds:
        o, base = by_run.get((label, seed)), by_run.get((baseline, seed))
        if o is None or base is None or o.error is not None or base.error is not None or o.diverged or base.diverged:
            continue
        if not math.isfinite(o.final_val_loss) or not math.isfinite(base.final_val_loss):
            continue
        gaps.append(100.0 * (o.final_val_loss - base.final_val_loss) / base.final_val_loss)
    return gaps


def summarize(outcomes: list[RunOutcome], recipes: list[str], baselines: dict[str, str] | None = None) -> list[dict]:
    """One row per recipe (run label): mean final val loss, paired gap to the baseline, speed, divergence.

    The gap of recipe r for seed k is ``(loss_r,k - loss_bf16,k) / loss_bf16,k``;
    its mean and sample standard deviation are over the seeds where both runs
    finished without diverging. ``baselines``: each label's baseline label
    (default: ``bf16``; in a learning-rate sweep, bf16 at the same rate).
    """
    baselines = baselines or {}
    by_run = {(o.recipe, o.seed): o for o in outcomes}
    seeds = sorted({o.seed for o in outcomes})
    rows = []
    for recipe in recipes:
        runs = [by_run[(recipe, seed)] for seed in seeds if (recipe, seed) in by_run]
        finished = [o for o in runs if o.error is None]
        losses = [o.final_val_loss for o in finished if not o.diverged and math.isfinite(o.final_val_loss)]
        gaps = _paired_gaps(by_run, recipe, baselines.get(recipe, BASELINE_RECIPE), seeds)
        speeds = [o.tokens_per_s for o in finished if math.isfinite(o.tokens_per_s)]
        rows.append(
            {
                "recipe": recipe,
                "switch_step": next((o.switch_step for o in runs if o.switch_step is not None), None),
                "seeds": len(runs),
                "final_val_loss_mean": statistics.fmean(losses) if losses else None,
                "gap_to_bf16_pct_mean": statistics.fmean(gaps) if gaps else None,
                "gap_to_bf16_pct_std": statistics.stdev(gaps) if len(gaps) >= 2 else None,
                "gap_to_bf16_pct_ci95": ci95_half_width(gaps),
                "gap_seeds": len(gaps),
                "tokens_per_s": statistics.fmean(speeds) if speeds else None,
                "diverged_seeds": sum(o.diverged for o in finished),
                "diverged_at_steps": [o.diverged_at_step for o in finished if o.diverged],
                "failed_seeds": len(runs) - len(finished),
                "errors": [o.error for o in runs if o.error is not None],
            }
        )
    return rows


def best_rates(outcomes: list[RunOutcome], specs: list[RunSpec], float32: str | None = None) -> list[dict]:
    """Per recipe of a --lrs sweep: mean final val loss at each rate, the best rate, and its paired gap.

    The best rate has the lowest mean final validation loss over seeds, among
    the rates where no seed diverged or failed. The gap pairs, seed by seed,
    the recipe at its best rate with the baseline at the baseline's best rate.
    """
    by_run = {(o.recipe, o.seed): o for o in outcomes}
    seeds = sorted({o.seed for o in outcomes})
    bases: dict[str, list[RunSpec]] = {}
    for spec in specs:
        bases.setdefault(spec.base, []).append(spec)
    entries = {}
    for base, runs in bases.items():
        losses = {}
        for spec in runs:
            results = [by_run.get((spec.label, seed)) for seed in seeds]
            complete = all(o is not None and o.error is None and not o.diverged and math.isfinite(o.final_val_loss)
                           for o in results)
            losses[spec.lr] = statistics.fmean(o.final_val_loss for o in results) if complete else None
        ranked = [lr for lr in losses if losses[lr] is not None]
        best = min(ranked, key=lambda lr: losses[lr]) if ranked else None
        entries[base] = {
            "recipe": base,
            "name": RunSpec(runs[0].recipe, runs[0].switch_to, runs[0].switch_last).display(float32),
            "final_val_loss_by_lr": {f"{lr:g}": loss for lr, loss in losses.items()},
            "best_lr": best,
            "best_loss": losses[best] if best is not None else None,
            "best_label": RunSpec(runs[0].recipe, runs[0].switch_to, runs[0].switch_last, best).label
            if best is not None else None,
        }
    baseline = entries.get(BASELINE_RECIPE)
    for entry in entries.values():
        gaps = []
        if baseline is not None and baseline["best_label"] is not None and entry["best_label"] is not None:
            gaps = _paired_gaps(by_run, entry["best_label"], baseline["best_label"], seeds)
        entry["best_gap_pct_mean"] = statistics.fmean(gaps) if gaps else None
        entry["best_gap_pct_std"] = statistics.stdev(gaps) if len(gaps) >= 2 else None
        entry["best_gap_pct_ci95"] = ci95_half_width(gaps)
    return list(entries.values())


def _machine_description(device: str) -> str:
    processor = platform.processor() or platform.machine()
    text = f"{processor}, {os.cpu_count()} CPUs"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(torch.device(device))}"
    return text


def _ci_text(mean: float | None, half_width: float | None) -> str:
    """``[low, high]`` of a 95% confidence interval, or n/a."""
    if mean is None or half_width is None:
        return "n/a"
    return f"[{mean - half_width:+.2f}, {mean + half_width:+.2f}]"


def render_summary_markdown(rows: list[dict], context: dict, sweep: list[dict] | None = None) -> str:
    """The ``summary.md`` text: setup, results table, the learning-rate sweep, plots."""

    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    cfg: TrainConfig = context["train"]
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    min_lr_text = "peak / 10" if context.get("min_lr") is None else f"{context['min_lr']:g}"
    seeds = context["seeds"]
    names = context.get("names", {})
    baseline_name = context.get("baseline_name", BASELINE_RECIPE)
    lines = [
        f"# Training benchmark: preset `{context['preset']}`",
        "",
        f"- Machine: {_machine_description(context['device'])}; device {context['device']}; "
        f"torch {torch.__version__}; backend `{context['backend']}`"
        + (", compiled block by block" if context.get("regional") else "")
        + f"; wall time {context['wall_time_s']:.1f} s.",
        f"- Regime: {context['parameters'] / 1e6:.2f}M parameters, {tokens / 1e6:.2f}M training tokens, "
        f"{tokens / context['parameters']:.2f} tokens per parameter.",
        f"- Training: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes, AdamW "
        + (f"peak lr per run (in its name) -> {min_lr_text} " if "lrs" in context else f"lr {cfg.lr:g} -> {cfg.min_lr:g} ")
        + f"(warmup {cfg.warmup_steps}, cosine), weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, "
        f"autocast {cfg.dtype}.",
        f"- Data: {context['data']} ({context['corpus_bytes']:,} bytes, last {VAL_FRACTION:.0%} held out; "
        f"{cfg.eval_sequences} validation sequences). Seeds: {', '.join(map(str, seeds))}.",
        f"- Gap to {baseline_name}: per seed (loss - loss_{BASELINE_RECIPE}) / loss_{BASELINE_RECIPE}, "
        "then mean and sample std over seeds" + (" (at the same learning rate)." if sweep else "."),
    ]
    if baseline_name != BASELINE_RECIPE:
        lines.append(f"- {baseline_name}: the `{BASELINE_RECIPE}` recipe keeps every matmul in the compute dtype, "
                     f"which is float32 here (autocast {cfg.dtype}); file names and JSON keys say `{BASELINE_RECIPE}`.")
    switch = context.get("switch")
    if switch:
        lines.append(
            f"- Late precision switch: each `<recipe>_to_{switch['to']}` run trains under its recipe for "
            f"{switch['switch_step']} steps, then is recompiled with {switch.get('to_name', switch['to'])} for the "
            f"last {cfg.steps - switch['switch_step']} (--switch-last {switch['last_fraction']:g})."
        )
    lines += [
        "",
        f"| recipe | final val loss | gap to {baseline_name} (%) | gap std (%) | gap 95% CI (%) | tokens/s "
        "| diverged |",
        "|---|---|---|---|---|---|---|",
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
            f"| {names.get(row['recipe'], row['recipe'])} | {number(row['final_val_loss_mean'], '.4f')} | "
            f"{'n/a' if gap is None else format(gap, '+.2f')} | {number(row['gap_to_bf16_pct_std'], '.2f')} | "
            f"{_ci_text(gap, row['gap_to_bf16_pct_ci95'])} | {number(row['tokens_per_s'], ',.0f')} | {diverged} |"
        )
    errors = [(row["recipe"], error) for row in rows for error in row["errors"]]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {recipe}: `{error}`" for recipe, error in errors]
    if sweep:
        rates = [f"{lr:g}" for lr in context["lrs"]]
        lines += ["", "## Learning-rate sweep", "",
                  "Final validation loss (mean over seeds; n/a: a seed diverged or failed) at each peak rate; the "
                  f"gap pairs each recipe at its best rate with {baseline_name} at its best rate, seed by seed.", "",
                  "| recipe | " + " | ".join(f"lr {rate}" for rate in rates) + f" | best lr | gap to {baseline_name} "
                  "at best rates (%) | gap std (%) | gap 95% CI (%) |",
                  "|---|" + "---|" * (len(rates) + 4)]
        for entry in sweep:
            losses = [number(entry["final_val_loss_by_lr"].get(rate), ".4f") for rate in rates]
            best = "n/a" if entry["best_lr"] is None else f"{entry['best_lr']:g}"
            gap = entry["best_gap_pct_mean"]
            lines.append(f"| {entry['name']} | " + " | ".join(losses) + f" | {best} | "
                         f"{'n/a' if gap is None else format(gap, '+.2f')} | "
                         f"{number(entry['best_gap_pct_std'], '.2f')} | "
                         f"{_ci_text(gap, entry['best_gap_pct_ci95'])} |")
    if context.get("plots", True):
        lines += ["", "![loss curves](loss_curves.png)", "", "![gap to the baseline over training](gap_curves.png)", ""]
    else:
        lines += ["", "(no plots: matplotlib is not installed)", ""]
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


def _plot_or_explain(plot, *args, **kwargs) -> bool:
    """Run a plot function; without matplotlib, say so once per plot and return False."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"bench train: matplotlib is not installed, so no {Path(args[-1]).name} (pip install matplotlib); "
              "the CSV, JSON and summary files are complete", file=sys.stderr)
        return False
    plot(*args, **kwargs)
    return True


def plot_gap_curves(outcomes: list[RunOutcome], recipes: list[str], baselines: dict[str, str], path: Path,
                    names: dict[str, str] | None = None, baseline_name: str = BASELINE_RECIPE,
                    title: str = "") -> list[str]:
    """Paired validation gap to the baseline over training: one curve per run label (mean over seeds),
    the band between the lowest and highest seed shaded. Returns the labels plotted.

    At each validation step where both runs of a seed logged a loss, the gap is
    ``100 (loss - loss_baseline) / loss_baseline`` for that seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = names or {}
    by_run = {(o.recipe, o.seed): o for o in outcomes if o.error is None}
    figure, axes = plt.subplots(figsize=(9, 5))
    # One colour per curve, in plotting order: tab10 up to 10 curves, tab20 beyond (an lr sweep).
    curves = sum(1 for label in recipes if label != baselines.get(label, BASELINE_RECIPE))
    colors = plt.get_cmap("tab10" if curves <= 10 else "tab20")
    plotted = []
    for label in recipes:
        baseline = baselines.get(label, BASELINE_RECIPE)
        if label == baseline:
            continue
        per_seed = []
        for (run_label, seed), outcome in by_run.items():
            base = by_run.get((baseline, seed))
            if run_label != label or base is None:
                continue
            base_loss = {r.step: r.val_loss for r in base.history if math.isfinite(r.val_loss)}
            per_seed.append({r.step: 100.0 * (r.val_loss - base_loss[r.step]) / base_loss[r.step]
                             for r in outcome.history if math.isfinite(r.val_loss) and r.step in base_loss})
        if not per_seed or not all(per_seed):
            continue
        steps = sorted(set.intersection(*(set(gaps) for gaps in per_seed)))
        if not steps:
            continue
        color = colors(len(plotted) % colors.N)
        mean = [statistics.fmean(gaps[step] for gaps in per_seed) for step in steps]
        axes.plot(steps, mean, color=color, marker="o", markersize=3,
                  label=f"{names.get(label, label)} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
        if len(per_seed) > 1:
            axes.fill_between(steps, [min(g[step] for g in per_seed) for step in steps],
                              [max(g[step] for g in per_seed) for step in steps], color=color, alpha=0.2)
        switch_step = next((o.switch_step for o in outcomes if o.recipe == label and o.switch_step is not None), None)
        if switch_step is not None:
            axes.axvline(switch_step + 0.5, color=color, linestyle=":", linewidth=1)
        plotted.append(label)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel("step")
    axes.set_ylabel(f"validation loss gap to {baseline_name} (%)")
    axes.set_title("Paired gap to the baseline over training (mean over seeds, min-max band)"
                   + (f": {title}" if title else ""), fontsize=9)
    axes.grid(alpha=0.3)
    if plotted:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return plotted


def plot_loss_curves(outcomes: list[RunOutcome], recipes: list[str], path: Path, title: str = "",
                     names: dict[str, str] | None = None) -> None:
    """One figure: validation loss (markers) and smoothed training loss (faint) per recipe,
    averaged over seeds, with an inset zoomed on the last 30% of training. ``names``: legend text per label."""
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
        label = (names or {}).get(recipe, recipe) + (" (diverged)" if diverged else "")
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
