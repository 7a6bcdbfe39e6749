"""The training benchmark's report: from finished runs to tables, statistics and plots.

``bench train`` (``fp4compile.training.bench``) trains; this module only reads
what the runs left (``RunOutcome``: the final loss and the logged history) and
turns it into ``summary.md``, ``summary.json``, ``loss_curves.png`` and
``gap_curves.png``. It knows nothing of models or recipes beyond their labels,
so a report can be rebuilt from the files in ``--out`` alone
(``bench train --report-only``).

Every gap is *paired*: recipe and baseline runs with the same seed share the
initial weights and the batches, so ``(loss - loss_baseline) / loss_baseline``
is taken seed by seed and only then averaged. The 95% confidence intervals are
Student's t intervals over those per-seed gaps.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fp4compile.training import StepRecord, TrainConfig

if TYPE_CHECKING:
    from fp4compile.training.bench import RunSpec

__all__ = [
    "BASELINE_RECIPE",
    "RunOutcome",
    "t_quantile_975",
    "ci95_half_width",
    "summarize",
    "best_rates",
    "gaps_by_seed",
    "gap_over_training",
    "final_losses_by_seed",
    "mechanism_contrasts",
    "render_summary_markdown",
    "plot_or_explain",
    "plot_gap_curves",
    "plot_loss_curves",
]

# The recipe every gap is measured against (the high-precision one).
BASELINE_RECIPE = "bf16"


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


def _usable(outcome: RunOutcome | None) -> bool:
    """A run that finished without failing or diverging, with a finite final loss."""
    return (outcome is not None and outcome.error is None and not outcome.diverged
            and math.isfinite(outcome.final_val_loss))


def _paired_gaps(by_run: dict, label: str, baseline: str, seeds: list[int]) -> list[float]:
    """Per seed, 100 (loss_label - loss_baseline) / loss_baseline, over seeds where both finished."""
    gaps = []
    for seed in seeds:
        o, base = by_run.get((label, seed)), by_run.get((baseline, seed))
        if _usable(o) and _usable(base):
            gaps.append(100.0 * (o.final_val_loss - base.final_val_loss) / base.final_val_loss)
    return gaps


def gaps_by_seed(by_run: dict, label: str, baseline: str) -> dict[int, dict[int, float]]:
    """Seed -> {validation step: paired gap in %} of run ``label`` to run ``baseline``.

    ``by_run`` maps (label, seed) to a RunOutcome. A step counts where both runs
    of the seed logged a finite validation loss; failed runs are left out.
    """
    gaps = {}
    for (run_label, seed), outcome in sorted(by_run.items(), key=lambda item: item[0][1]):
        base = by_run.get((baseline, seed))
        if run_label != label or base is None or outcome.error is not None or base.error is not None:
            continue
        base_loss = {r.step: r.val_loss for r in base.history if math.isfinite(r.val_loss)}
        gaps[seed] = {r.step: 100.0 * (r.val_loss - base_loss[r.step]) / base_loss[r.step]
                      for r in outcome.history if math.isfinite(r.val_loss) and r.step in base_loss}
    return gaps


def gap_over_training(outcomes: list[RunOutcome], labels: list[str], baselines: dict[str, str],
                      rows: int = 12) -> dict:
    """The paired gap to the baseline at about ``rows`` validation steps, per run label.

    The steps are spread evenly (integer arithmetic) over the validation steps
    the runs logged, the first and the last always included. At each step and
    for each label: the mean gap over the seeds where both runs validated there,
    its 95% confidence half-width (None below two seeds) and the seed count.
    Returns ``{"steps": [...], "gaps": {label: [{"step", "mean", "ci95", "seeds"}, ...]}}``.
    """
    by_run = {(o.recipe, o.seed): o for o in outcomes}
    per_label = {label: gaps_by_seed(by_run, label, baselines.get(label, BASELINE_RECIPE))
                 for label in labels if label != baselines.get(label, BASELINE_RECIPE)}
    logged = sorted({step for seeds in per_label.values() for gaps in seeds.values() for step in gaps})
    if len(logged) > rows > 1:
        logged = [logged[(index * (len(logged) - 1)) // (rows - 1)] for index in range(rows)]
    table = {}
    for label, seeds in per_label.items():
        entries = []
        for step in logged:
            values = [gaps[step] for gaps in seeds.values() if step in gaps]
            entries.append({"step": step, "mean": statistics.fmean(values) if values else None,
                            "ci95": ci95_half_width(values), "seeds": len(values)})
        table[label] = entries
    return {"steps": logged, "gaps": table}


def mechanism_contrasts(outcomes: list[RunOutcome], pairs: list[tuple[str, str, str]],
                        baselines: dict[str, str]) -> list[dict]:
    """What one mechanism buys: per pair of run labels (with it, without it, what differs), seed by seed.

    The difference for seed k is ``100 (loss_with,k - loss_without,k) / loss_baseline,k``:
    the difference of the two paired gaps, in points of the baseline's loss
    (negative: the mechanism helps). It is taken over the seeds where all three
    runs finished; its mean has a t-based 95% confidence interval. Over
    training, ``ahead_at_validations`` counts, per seed, the validation steps
    where the run with the mechanism had the lower loss, out of those both logged.
    """
    by_run = {(o.recipe, o.seed): o for o in outcomes}
    seeds = sorted({o.seed for o in outcomes})
    contrasts = []
    for with_label, without_label, what in pairs:
        baseline = baselines.get(with_label, BASELINE_RECIPE)
        differences = {}
        for seed in seeds:
            runs = [by_run.get((label, seed)) for label in (with_label, without_label, baseline)]
            if all(_usable(run) for run in runs):
                with_run, without_run, base = runs
                differences[seed] = 100.0 * (with_run.final_val_loss - without_run.final_val_loss) / base.final_val_loss
        with_gaps = gaps_by_seed(by_run, with_label, baseline)
        without_gaps = gaps_by_seed(by_run, without_label, baseline)
        ahead = {}
        for seed in sorted(set(with_gaps) & set(without_gaps)):
            steps = sorted(set(with_gaps[seed]) & set(without_gaps[seed]))
            ahead[seed] = [sum(with_gaps[seed][step] < without_gaps[seed][step] for step in steps), len(steps)]
        values = list(differences.values())
        contrasts.append({
            "with": with_label,
            "without": without_label,
            "what": what,
            "baseline": baseline,
            "seeds": len(values),
            "difference_pts_by_seed": differences,
            "difference_pts_mean": statistics.fmean(values) if values else None,
            "difference_pts_ci95": ci95_half_width(values),
            "with_ahead_seeds": sum(value < 0 for value in values),
            "ahead_at_validations": ahead,
        })
    return contrasts


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

    The rates of one recipe are compared over the same seeds: those where the
    recipe's run at every rate is present (all of them, once every run has
    finished; fewer in a ``--report-only`` report while some still train). The
    best rate has the lowest mean final validation loss over those seeds, among
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
        shared = [seed for seed in seeds if all((spec.label, seed) in by_run for spec in runs)]
        losses = {}
        for spec in runs:
            results = [by_run[(spec.label, seed)] for seed in shared]
            complete = bool(results) and all(_usable(o) for o in results)
            losses[spec.lr] = statistics.fmean(o.final_val_loss for o in results) if complete else None
        ranked = [lr for lr in losses if losses[lr] is not None]
        best = min(ranked, key=lambda lr: losses[lr]) if ranked else None
        entries[base] = {
            "recipe": base,
            "name": replace(runs[0], lr=None, baseline_lr=None).display(float32),
            "final_val_loss_by_lr": {f"{lr:g}": loss for lr, loss in losses.items()},
            "seeds": len(shared),
            "best_lr": best,
            "best_loss": losses[best] if best is not None else None,
            "best_label": replace(runs[0], lr=best).label
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


def final_losses_by_seed(outcomes: list[RunOutcome], labels: list[str]) -> dict[str, dict[int, float | str]]:
    """Label -> {seed: final validation loss}, or "diverged" / "failed" in its place, for the runs present."""
    table: dict[str, dict[int, float | str]] = {label: {} for label in labels}
    for outcome in sorted(outcomes, key=lambda o: o.seed):
        if outcome.recipe not in table:
            continue
        if outcome.error is not None:
            value = "failed"
        elif outcome.diverged or not math.isfinite(outcome.final_val_loss):
            value = "diverged"
        else:
            value = outcome.final_val_loss
        table[outcome.recipe][outcome.seed] = value
    return table


def render_summary_markdown(rows: list[dict], context: dict, sweep: list[dict] | None = None,
                            per_seed: dict[str, dict[int, float | str]] | None = None,
                            over_training: dict | None = None, mechanisms: list[dict] | None = None) -> str:
    """The ``summary.md`` text: setup, results table, per-seed losses, the gap over training,
    what each mechanism buys, the learning-rate sweep, plots."""

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
        + (f"; report only (--report-only), from the finished runs: {context['wall_time_s']:.1f} s of training "
           "in all." if context.get("report_only") else f"; wall time {context['wall_time_s']:.1f} s."),
        f"- Regime: {context['parameters'] / 1e6:.2f}M parameters, {tokens / 1e6:.2f}M training tokens, "
        f"{tokens / context['parameters']:.2f} tokens per parameter.",
        f"- Training: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes, AdamW "
        + (f"peak lr per run (in its name) -> {min_lr_text} " if "lrs" in context else f"lr {cfg.lr:g} -> {cfg.min_lr:g} ")
        + f"(warmup {cfg.warmup_steps}, cosine), weight decay {cfg.weight_decay:g}, grad clip {cfg.grad_clip:g}, "
        f"autocast {cfg.dtype}.",
        f"- Data: {context['data']} ({context['corpus_bytes']:,} bytes, last {context['val_fraction']:.0%} held out; "
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
        f"| recipe | seeds | final val loss | gap to {baseline_name} (%) | gap std (%) | gap 95% CI (%) | tokens/s "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|",
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
            f"| {names.get(row['recipe'], row['recipe'])} | {row['seeds']} | {number(row['final_val_loss_mean'], '.4f')} | "
            f"{'n/a' if gap is None else format(gap, '+.2f')} | {number(row['gap_to_bf16_pct_std'], '.2f')} | "
            f"{_ci_text(gap, row['gap_to_bf16_pct_ci95'])} | {number(row['tokens_per_s'], ',.0f')} | {diverged} |"
        )
    errors = [(row["recipe"], error) for row in rows for error in row["errors"]]
    if errors:
        lines += ["", "Failed runs:", ""] + [f"- {recipe}: `{error}`" for recipe, error in errors]
    missing = context.get("missing_runs")
    if missing:
        lines += ["", f"Not finished in this folder, so left out ({len(missing)}): "
                  + ", ".join(f"`{name}`" for name in missing) + "."]
    if per_seed and len(seeds) > 1:
        lines += ["", "## Final validation loss per seed", "",
                  "| recipe | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
                  "|---|" + "---|" * len(seeds)]
        for label, by_seed in per_seed.items():
            cells = [by_seed.get(seed, "-") for seed in seeds]
            lines.append(f"| {names.get(label, label)} | "
                         + " | ".join(format(c, ".4f") if isinstance(c, float) else c for c in cells) + " |")
    if over_training and over_training["steps"] and len(over_training["steps"]) > 1:
        tokens_per_step = cfg.batch_size * cfg.seq_len
        labels = list(over_training["gaps"])
        most = {label: max((e["seeds"] for e in entries), default=0) for label, entries in over_training["gaps"].items()}
        lines += ["", f"## Gap to {baseline_name} over training", "",
                  "Paired validation gap (%) at evenly spread validation steps: mean over seeds, +- the half-width of "
                  "its 95% confidence interval (two or more seeds); a seed count in brackets where fewer seeds had "
                  "validated there.", "",
                  "| step | tokens | " + " | ".join(f"{names.get(label, label)} ({most[label]} seed"
                                                    f"{'' if most[label] == 1 else 's'})"
                                                    for label in labels) + " |",
                  "|---|---|" + "---|" * len(labels)]
        for index, step in enumerate(over_training["steps"]):
            cells = []
            for label in labels:
                entry = over_training["gaps"][label][index]
                if entry["mean"] is None:
                    cells.append("-")
                    continue
                cell = format(entry["mean"], "+.2f")
                if entry["ci95"] is not None:
                    cell += f" +- {entry['ci95']:.2f}"
                if entry["seeds"] < most[label]:
                    cell += f" ({entry['seeds']})"
                cells.append(cell)
            lines.append(f"| {step:,} | {step * tokens_per_step / 1e6:.2f}M | " + " | ".join(cells) + " |")
    if mechanisms:
        lines += ["", "## What each mechanism buys", "",
                  "Each pair of runs differs by one mechanism. Difference: per seed, (loss with it - loss without it) "
                  f"/ loss of {baseline_name}, in points (negative: the mechanism helps); mean over the seeds where "
                  "all three runs finished, with its 95% confidence interval. Ahead: the seeds, and per seed the "
                  "validation steps, where the run with the mechanism had the lower loss.", "",
                  "| with | without | what differs | seeds | difference (points) | 95% CI | per seed | ahead at the end "
                  "| ahead at validations, per seed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for entry in mechanisms:
            by_seed = entry["difference_pts_by_seed"]
            mean = entry["difference_pts_mean"]
            validations = ", ".join(f"{ahead}/{total}" for ahead, total in entry["ahead_at_validations"].values())
            lines.append(
                f"| {names.get(entry['with'], entry['with'])} | {names.get(entry['without'], entry['without'])} | "
                f"{entry['what']} | {entry['seeds']} | {'n/a' if mean is None else format(mean, '+.2f')} | "
                f"{_ci_text(mean, entry['difference_pts_ci95'])} | "
                f"{', '.join(format(value, '+.2f') for value in by_seed.values()) or '-'} | "
                f"{entry['with_ahead_seeds']} of {entry['seeds']} | {validations or '-'} |")
    if sweep:
        rates = [f"{lr:g}" for lr in context["lrs"]]
        lines += ["", "## Learning-rate sweep", "",
                  "Final validation loss at each peak rate: the mean over the seeds where the recipe has a run at "
                  "every rate (n/a: one of them diverged or failed; -: not run at that rate); the gap pairs each "
                  f"recipe at its best rate with {baseline_name} at its best rate, seed by seed.", "",
                  "| recipe | seeds | " + " | ".join(f"lr {rate}" for rate in rates) + f" | best lr | gap to "
                  f"{baseline_name} at best rates (%) | gap std (%) | gap 95% CI (%) |",
                  "|---|---|" + "---|" * (len(rates) + 4)]
        for entry in sweep:
            by_lr = entry["final_val_loss_by_lr"]
            losses = [number(by_lr[rate], ".4f") if rate in by_lr else "-" for rate in rates]
            best = "n/a" if entry["best_lr"] is None else f"{entry['best_lr']:g}"
            gap = entry["best_gap_pct_mean"]
            lines.append(f"| {entry['name']} | {entry['seeds']} | " + " | ".join(losses) + f" | {best} | "
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


def plot_or_explain(plot, *args, **kwargs) -> bool:
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
        per_seed = list(gaps_by_seed(by_run, label, baseline).values())
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
    # Tokens on the top axis: every run of a benchmark takes the same tokens per step.
    record = next((r for o in outcomes for r in o.history if r.step > 0), None)
    if record is not None:
        millions_per_step = record.tokens / record.step / 1e6
        top = axes.secondary_xaxis("top", functions=(lambda step: step * millions_per_step,
                                                     lambda tokens: tokens / millions_per_step))
        top.set_xlabel("training tokens (millions)")
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
