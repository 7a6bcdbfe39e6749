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
- ``summary.md`` and ``summary.json``: the comparison table, each run's final
  loss seed by seed, and the gap over training at evenly spread steps
  (``fp4compile.training.bench_report``); ``--report-only`` rebuilds them from
  the runs finished in ``--out`` without training.

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
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fp4compile.config import RECIPES, Fp4Config
from fp4compile.precision_switch import PrecisionSwitch, switch_step_for
from fp4compile.training.data import DEFAULT_MAX_BYTES, load_corpus, split_train_val, val_batches
from fp4compile.training.models.llama import PRESETS, Llama, param_count, preset
from fp4compile.training import StepRecord, TrainConfig, build_model, train
from fp4compile.training.bench_report import (
    BASELINE_RECIPE,
    RunOutcome,
    best_rates,
    final_losses_by_seed,
    gap_over_training,
    mechanism_contrasts,
    plot_gap_curves,
    plot_loss_curves,
    plot_or_explain,
    render_summary_markdown,
    summarize,
)

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

# Recipe pairs that differ by one mechanism of the paper's method: (with it,
# without it, what differs). Wherever both recipes of a pair run at the same
# rate, the summary reports what the mechanism buys, seed by seed.
MECHANISM_PAIRS = (
    ("paper", "fp4-direct", "DGE and OCC (W4A4)"),
    ("paper", "paper-ste", "DGE instead of STE (W4A4 with OCC)"),
    ("w4a8", "w4a8-ste", "DGE instead of STE (FP4 weights only)"),
    ("w8a4", "w8a4-no-occ", "OCC (FP4 activations only)"),
    # The baseline itself is the run without: the difference is dge-only's gap.
    ("dge-only", "bf16", "DGE's factor alone (nothing quantized)"),
)

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
    # Its rate is the best of a float32 sweep at that length (8500 steps, seed 0:
    # 5e-4 1.124, 1e-3 1.066, 2e-3 1.075, 4e-3 1.140 final validation loss;
    # BENCHMARKS.md). At a tenth of the length the best was 4e-3: the rate does
    # not carry over between lengths.
    "cpu-small": PresetTraining(steps=8500, batch_size=16, seq_len=128, lr=1e-3, eval_sequences=256, max_bytes=None),
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


def mechanism_pairs(specs: list[RunSpec]) -> list[tuple[str, str, str]]:
    """(label with the mechanism, label without it, what differs) for each ``MECHANISM_PAIRS`` pair
    run here at the same rate and measured against the same baseline run."""
    pairs = []
    for with_name, without_name, what in MECHANISM_PAIRS:
        for with_spec in specs:
            if with_spec.recipe != with_name or with_spec.switch_to is not None:
                continue
            for without_spec in specs:
                if (without_spec.recipe == without_name and without_spec.switch_to is None
                        and without_spec.lr == with_spec.lr and without_spec.baseline_label == with_spec.baseline_label):
                    pairs.append((with_spec.label, without_spec.label, what))
    return pairs


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
        "--report-only",
        action="store_true",
        help="train nothing: rebuild summary.md, summary.json and the plots from the runs already finished in "
        "--out with these settings (runs not finished there are listed and left out; gaps pair the seeds "
        "where both runs finished)",
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


def _finished_outcome(spec: RunSpec, seed: int, key: dict, out: Path) -> RunOutcome | None:
    """The outcome of a run finished in ``out`` (its JSON written), or None when it is not.

    Raises ConfigMismatch when the finished run had other settings than ``key``.
    """
    name = _run_name(spec.label, seed)
    result_path = out / f"{name}.json"
    if not result_path.exists():
        return None
    saved = json.loads(result_path.read_text())
    if saved["key"] != key:
        raise ConfigMismatch(f"{result_path} was produced with other settings; use another --out")
    return RunOutcome(
        recipe=spec.label,
        seed=seed,
        switch_step=saved.get("switch_step"),
        history=read_history_csv(out / f"{name}.csv"),
        diverged=saved["diverged"],
        diverged_at_step=saved["diverged_at_step"],
        final_val_loss=_float_or_nan(saved["final_val_loss"]),
        tokens_per_s=_float_or_nan(saved["tokens_per_s"]),
        wall_time_s=saved["wall_time_s"],
    )


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

    if args.resume:
        finished = _finished_outcome(spec, cfg.seed, key, out)
        if finished is not None:
            return finished

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
    missing: list[str] = []  # --report-only: the runs not finished in --out
    report_only = getattr(args, "report_only", False)
    # Seeds outermost: an interrupted benchmark has complete comparisons for the first seeds.
    for seed in seeds:
        for spec in specs:
            cfg = _spec_config(configs[seed], spec, args.min_lr)
            recipe = spec.display(float32)
            key = _run_key(args, spec, cfg, max_bytes)
            if report_only:
                try:
                    outcome = _finished_outcome(spec, seed, key, out)
                except ConfigMismatch as error:
                    print(f"bench train: {error}", file=sys.stderr)
                    return 2
                if outcome is None:
                    missing.append(_run_name(spec.label, seed))
                else:
                    outcomes.append(outcome)
                continue
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

    if report_only:
        if missing:
            print(f"bench train: --report-only: {len(missing)} run(s) not finished in {out}, left out: "
                  + ", ".join(missing), file=sys.stderr)
        if not outcomes:
            print(f"bench train: --report-only: no finished run in {out} matches these settings", file=sys.stderr)
            return 2
    # --report-only: the training time of the runs reported, not this invocation's.
    wall_time = (sum(o.wall_time_s for o in outcomes) if report_only
                 else time.perf_counter() - invocation_start)
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
        "report_only": report_only,
        "missing_runs": missing,
        "val_fraction": VAL_FRACTION,
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
    per_seed = final_losses_by_seed(outcomes, labels)
    over_training = gap_over_training(outcomes, labels, baselines)
    mechanisms = mechanism_contrasts(outcomes, mechanism_pairs(specs), baselines)
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
    plotted = plot_or_explain(plot_loss_curves, outcomes, labels, out / "loss_curves.png", title=title, names=names)
    if plotted:
        plot_or_explain(plot_gap_curves, outcomes, labels, baselines, out / "gap_curves.png", names=names,
                         baseline_name=context["baseline_name"], title=title)
    context["plots"] = plotted
    (out / "summary.md").write_text(render_summary_markdown(rows, context, sweep, per_seed, over_training,
                                                                mechanisms))
    (out / "summary.json").write_text(
        json.dumps({"rows": rows, "sweep": sweep, "final_val_loss_by_seed": per_seed, "gap_over_training": over_training,
                    "mechanisms": mechanisms,
                    "context": context | {"train": asdict(context["train"])}},
                   indent=1, default=str)
    )
    print(f"bench train: results in {out}")
    return 1 if any(outcome.error for outcome in outcomes) else 0


def param_count_of_preset(name: str) -> int:
    """Parameters of a preset's model, counted without allocating it."""
    with torch.device("meta"):
        return param_count(Llama(preset(name)))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m fp4compile.training.bench [options]``."""
    parser = argparse.ArgumentParser(
        prog="fp4compile bench train", description="Train one model under every recipe and compare losses."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
