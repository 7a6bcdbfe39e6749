"""The training loop and the multi-recipe benchmark, on the tiny model with stock backends.

These check the plumbing (schedule, resumption, divergence handling, outputs);
the FP4 numerics are tested elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math

import pytest
import torch

from fp4compile.training import bench as bench_train
from fp4compile.training import bench_report
from fp4compile.training.data import load_corpus, split_train_val
from fp4compile.training.models import preset
from fp4compile.training import StepRecord, TrainConfig, build_model, lr_at, train

TINY = dict(batch_size=4, seq_len=32, eval_sequences=8)


@pytest.fixture(scope="module")
def splits() -> tuple[torch.Tensor, torch.Tensor]:
    return split_train_val(load_corpus(max_bytes=100_000), 0.1)


def bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    return parser.parse_args(
        ["--preset", "tiny", "--backend", "eager", "--out", str(tmp_path), "--no-progress",
         "--batch-size", "4", "--seq-len", "32", "--eval-sequences", "8", "--max-bytes", "100000", *extra]
    )


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------- schedule


def test_lr_schedule_warmup_peak_and_end():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == 1e-3  # end of warmup: the peak, exactly
    assert lr_at(10, cfg) == 1e-3  # start of the cosine
    midpoint = 10 + (99 - 10) / 2
    assert lr_at(int(midpoint), cfg) == pytest.approx(5.5e-4, rel=0.02)
    assert lr_at(99, cfg) == 1e-4  # last step: the floor, exactly
    lrs = [lr_at(step, cfg) for step in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    no_warmup = TrainConfig(steps=5, lr=1.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, no_warmup) == 1.0 and lr_at(4, no_warmup) == 0.0


# ---------------------------------------------------------------- training loop


def test_train_logs_every_step_and_learns(splits):
    cfg = TrainConfig(steps=8, warmup_steps=1, eval_every=4, lr=3e-3, min_lr=3e-4, **TINY)
    model = build_model(preset("tiny"), seed=0)
    seen = []
    result = train(model, model, cfg, *splits, on_step=seen.append, progress=False)
    assert not result.diverged and result.steps_completed == 8
    assert [r.step for r in result.history] == list(range(1, 9)) and seen == result.history
    assert [r.tokens for r in result.history] == [128 * s for s in range(1, 9)]
    evaluated = [r.step for r in result.history if not math.isnan(r.val_loss)]
    assert evaluated == [4, 8]
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.final_val_loss == result.history[-1].val_loss < math.log(256)
    assert result.tokens_per_s > 0


def test_resume_is_bitwise_identical(splits, tmp_path):
    cfg = TrainConfig(steps=6, warmup_steps=2, eval_every=2, lr=3e-3, min_lr=3e-4, seed=5, **TINY)
    reference_model = build_model(preset("tiny"), seed=cfg.seed)
    reference = train(reference_model, reference_model, cfg, *splits, progress=False)

    class Interrupted(Exception):
        pass

    def interrupt_after_step_4(record):
        if record.step == 4:
            raise Interrupted

    checkpoint = tmp_path / "run.pt"
    model = build_model(preset("tiny"), seed=cfg.seed)
    with pytest.raises(Interrupted):
        train(model, model, cfg, *splits, on_step=interrupt_after_step_4, progress=False,
              checkpoint_path=checkpoint, checkpoint_every=3)
    assert checkpoint.exists()

    # a fresh process would start from a different init; the checkpoint must override it
    resumed_model = build_model(preset("tiny"), seed=99)
    torch.manual_seed(1234)
    resumed = train(resumed_model, resumed_model, cfg, *splits, progress=False,
                    checkpoint_path=checkpoint, checkpoint_every=3, resume=True)

    def losses(result):
        return [(r.step, r.tokens, r.train_loss, r.val_loss, r.grad_norm, r.lr) for r in result.history]

    assert len(resumed.history) == 6
    assert str(losses(resumed)) == str(losses(reference))  # str(): NaN == NaN, exact floats
    for (name, p), q in zip(reference_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_nan_loss_ends_the_run_as_diverged(splits):
    cfg = TrainConfig(steps=10, warmup_steps=1, eval_every=5, **TINY)
    model = build_model(preset("tiny"), seed=0)

    def poison_weights_after_step_2(record):
        if record.step == 2:
            with torch.no_grad():
                model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    result = train(model, model, cfg, *splits, on_step=poison_weights_after_step_2, progress=False)
    assert result.diverged and result.diverged_at_step == 3
    assert result.steps_completed == 2 and len(result.history) == 3
    assert math.isnan(result.history[-1].train_loss)
    assert math.isnan(result.final_val_loss)


# ---------------------------------------------------------------- benchmark


def test_recipe_options():
    assert bench_train.recipe_options("paper") == {"recipe": "paper"}
    assert bench_train.recipe_options("w4a8-ste") == {"recipe": "w4a8", "dge_clamp": None}
    assert bench_train.recipe_options("w8a4-no-occ") == {"recipe": "w8a4", "occ_alpha": None}
    assert bench_train.recipe_options("paper-tensorwise") == {
        "recipe": "paper", "weight_granularity": "tensor", "act_granularity": "tensor"}
    assert set(bench_train.RECIPE_NAMES) == {
        "bf16", "fp8", "fp4-direct", "paper", "w4a8", "w4a8-ste", "w8a4", "w8a4-no-occ", "paper-tensorwise"}
    with pytest.raises(ValueError, match="unknown recipe"):
        bench_train.recipe_options("fp2")


def test_recipe_options_take_any_config_recipe():
    from fp4compile.config import RECIPES

    for name in RECIPES:  # whatever recipes the config defines, without a list here
        expected = bench_train._RECIPE_OPTIONS.get(name, {"recipe": name})
        assert bench_train.recipe_options(name) == expected
        assert bench_train._parse_recipes(f"bf16,{name}" if name != "bf16" else name)


def test_bench_writes_csvs_plot_and_paired_summary(tmp_path):
    args = bench_args(tmp_path, "--recipes", "bf16,paper", "--seeds", "2", "--steps", "3")
    assert bench_train.run(args) == 0

    for recipe in ("bf16", "paper"):
        for seed in (0, 1):
            rows = read_csv(tmp_path / f"{recipe}_seed{seed}.csv")
            assert [int(r["step"]) for r in rows] == [1, 2, 3]
            assert {"step", "tokens", "train_loss", "val_loss", "grad_norm", "step_time_s"} <= set(rows[0])
            assert json.loads((tmp_path / f"{recipe}_seed{seed}.json").read_text())["diverged"] is False
    # the same seed gives the same init and batches whatever the recipe (eager: same numbers)
    bf16_seed0, paper_seed0 = read_csv(tmp_path / "bf16_seed0.csv"), read_csv(tmp_path / "paper_seed0.csv")
    assert bf16_seed0[-1]["val_loss"] == paper_seed0[-1]["val_loss"]
    assert bf16_seed0[0]["train_loss"] != read_csv(tmp_path / "bf16_seed1.csv")[0]["train_loss"]

    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    summary = (tmp_path / "summary.md").read_text()
    # CPU, autocast float32: the bf16 recipe is named for what it computes in.
    assert ("| recipe | seeds | final val loss | gap to float32 (bf16 recipe on CPU) (%) | gap std (%) | gap 95% CI (%) "
            "| tokens/s | diverged |") in summary
    assert "| float32 (bf16 recipe on CPU) |" in summary and "| bf16 |" not in summary
    assert "| paper |" in summary and "+0.00 | 0.00 |" in summary
    assert "torch " + torch.__version__ in summary and "wall time" in summary and "CPUs" in summary
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows["paper"]["gap_to_bf16_pct_mean"] == 0.0 and rows["paper"]["gap_seeds"] == 2
    assert not list((tmp_path / "checkpoints").glob("*.pt"))  # finished runs leave no checkpoint


def test_bench_reports_divergence_and_finishes_other_recipes(tmp_path, monkeypatch):
    stock_compile = bench_train.compile_for_recipe

    def compile_with_nan_for_fp8(model, recipe, backend, stats_interval=0, **kwargs):
        compiled = stock_compile(model, recipe, backend, stats_interval, **kwargs)
        if recipe != "fp8":
            return compiled
        calls = {"training": 0}

        def forward(idx):
            logits = compiled(idx)
            if torch.is_grad_enabled():
                calls["training"] += 1
                if calls["training"] >= 2:
                    return logits * float("nan")
            return logits

        return forward

    monkeypatch.setattr(bench_train, "compile_for_recipe", compile_with_nan_for_fp8)
    args = bench_args(tmp_path, "--recipes", "fp8,bf16,paper", "--steps", "3")
    assert bench_train.run(args) == 0

    assert json.loads((tmp_path / "fp8_seed0.json").read_text())["diverged_at_step"] == 2
    for recipe in ("bf16", "paper"):
        assert len(read_csv(tmp_path / f"{recipe}_seed0.csv")) == 3
    summary = (tmp_path / "summary.md").read_text()
    fp8_line = next(line for line in summary.splitlines() if line.startswith("| fp8 |"))
    assert "yes (step 2)" in fp8_line and "n/a" in fp8_line
    assert next(line for line in summary.splitlines() if line.startswith("| paper |")).endswith("| no |")


def test_bench_resume_skips_finished_runs_and_continues_interrupted_ones(tmp_path, monkeypatch):
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    common = ("--steps", "5", "--checkpoint-every", "2")
    assert bench_train.run(bench_args(reference_dir, "--recipes", "paper", *common)) == 0
    common = ("--recipes", "bf16,paper", *common)

    stock_compile = bench_train.compile_for_recipe
    compiled_recipes = []

    def interrupt_paper_at_step_4(model, recipe, backend, stats_interval=0, **kwargs):
        compiled_recipes.append(recipe)
        compiled = stock_compile(model, recipe, backend, stats_interval, **kwargs)
        if recipe != "paper":
            return compiled
        calls = {"training": 0}

        def forward(idx):
            # Evaluation also runs with autograd on (it reuses the training graph),
            # so tell the two apart by the caller.
            if not any(frame.function == "evaluate" for frame in inspect.stack(0)):
                calls["training"] += 1
                if calls["training"] == 4:
                    raise KeyboardInterrupt  # as if the user pressed Ctrl-C
            return compiled(idx)

        return forward

    monkeypatch.setattr(bench_train, "compile_for_recipe", interrupt_paper_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        bench_train.run(bench_args(run_dir, *common))
    assert (run_dir / "bf16_seed0.json").exists() and not (run_dir / "paper_seed0.json").exists()
    assert (run_dir / "checkpoints" / "paper_seed0.pt").exists()

    monkeypatch.setattr(bench_train, "compile_for_recipe", stock_compile)
    compiled_recipes.clear()
    finished_before = (run_dir / "bf16_seed0.json").read_text()
    monkeypatch.setattr(bench_train, "compile_for_recipe",
                        lambda *a, **k: compiled_recipes.append(a[1]) or stock_compile(*a, **k))
    assert bench_train.run(bench_args(run_dir, *common, "--resume")) == 0
    assert compiled_recipes == ["paper"]  # bf16 was complete and is not rerun
    assert (run_dir / "bf16_seed0.json").read_text() == finished_before

    def losses(path):
        return [(r["step"], r["train_loss"], r["val_loss"], r["grad_norm"]) for r in read_csv(path)]

    assert losses(run_dir / "paper_seed0.csv") == losses(reference_dir / "paper_seed0.csv")
    assert "| paper |" in (run_dir / "summary.md").read_text()

    # other settings in the same folder are refused instead of mixed in
    assert bench_train.run(bench_args(run_dir, "--recipes", "bf16", "--steps", "7", "--resume")) == 2


def test_regional_compiles_each_block_and_keeps_its_own_resume_key(tmp_path, monkeypatch):
    """--regional: the blocks are compiled, the model around them is not; its runs never resume whole-model ones."""
    stock_compile = bench_train.compile_for_recipe
    compiled = []

    def record(model, recipe, backend, stats_interval=0, **kwargs):
        result = stock_compile(model, recipe, backend, stats_interval, **kwargs)
        compiled.append((model, result, kwargs.get("regional")))
        return result

    monkeypatch.setattr(bench_train, "compile_for_recipe", record)
    whole, regional = tmp_path / "whole", tmp_path / "regional"
    common = ("--recipes", "bf16", "--steps", "2")
    assert bench_train.run(bench_args(whole, *common)) == 0
    assert bench_train.run(bench_args(regional, *common, "--regional")) == 0
    (model_w, result_w, flag_w), (model_r, result_r, flag_r) = compiled
    assert (flag_w, flag_r) == (False, True)
    assert isinstance(result_w, torch._dynamo.eval_frame.OptimizedModule) and result_w._orig_mod is model_w
    assert result_r is model_r and all(block._compiled_call_impl is not None for block in model_r.layers)
    assert model_r._compiled_call_impl is None and model_r.embed._compiled_call_impl is None
    # Same numbers (eager backend: compiling changes nothing), different keys.
    assert read_csv(whole / "bf16_seed0.csv")[-1]["val_loss"] == read_csv(regional / "bf16_seed0.csv")[-1]["val_loss"]
    assert "compiled block by block" in (regional / "summary.md").read_text()
    assert "compiled block by block" not in (whole / "summary.md").read_text()
    key = json.loads((regional / "bf16_seed0.json").read_text())["key"]
    assert key["regional"] is True and "regional" not in json.loads((whole / "bf16_seed0.json").read_text())["key"]
    # A finished whole-model run is not taken for a regional one.
    assert bench_train.run(bench_args(whole, *common, "--regional", "--resume")) == 2


def test_bench_optimizer_options_reach_the_training_config(tmp_path):
    device = torch.device("cpu")
    defaults = bench_train.PRESET_TRAINING["tiny"]
    cfg = bench_train._training_config(bench_args(tmp_path), defaults, 0, device)
    assert (cfg.grad_clip, cfg.weight_decay) == (1.0, 0.1)
    args = bench_args(tmp_path, "--grad-clip", "0", "--weight-decay", "0.05", "--lr", "4e-3")
    cfg = bench_train._training_config(args, defaults, 3, device)
    assert (cfg.grad_clip, cfg.weight_decay, cfg.lr, cfg.min_lr, cfg.seed) == (0.0, 0.05, 4e-3, 4e-4, 3)


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert bench_train.run(bench_args(tmp_path, "--recipes", "bf16,fp3")) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert bench_train.run(bench_args(tmp_path, "--seq-len", "4096")) == 2
    assert bench_train.run(bench_args(tmp_path, "--regional", "--switch-last", "0.5")) == 2
    assert "--regional with --switch-last needs --backend fp4" in capsys.readouterr().err


# ---------------------------------------------------------------- long studies: tokens, sweeps, gap plot, labels


def test_tokens_and_eval_every_tokens_set_steps_by_ceiling(tmp_path):
    defaults, device = bench_train.PRESET_TRAINING["tiny"], torch.device("cpu")
    for tokens, steps in ((128, 1), (129, 2), (500, 4), (512, 4), (513, 5)):  # 4 x 32 = 128 tokens per step
        cfg = bench_train._training_config(bench_args(tmp_path, "--tokens", str(tokens)), defaults, 0, device)
        assert cfg.steps == steps and cfg.warmup_steps == steps // 10
    cfg = bench_train._training_config(bench_args(tmp_path, "--eval-every-tokens", "300"), defaults, 0, device)
    assert cfg.eval_every == 3  # ceil(300 / 128)
    for extra, message in ((("--tokens", "500", "--steps", "4"), "--steps and --tokens exclude each other"),
                           (("--tokens", "0"), "--tokens must be positive"),
                           (("--eval-every-tokens", "9", "--eval-every", "2"), "exclude each other"),
                           (("--lrs", "1e-3,x"), "--lrs takes comma-separated numbers"),
                           (("--lrs", "1e-3,0.001"), "--lrs lists a rate twice"),
                           (("--lrs", "1e-3,-1"), "--lrs rates must be positive"),
                           (("--lrs", "1e-3", "--lr", "1e-3"), "--lr and --lrs exclude each other"),
                           (("--recipes", "bf16,paper@x", "--lrs", "1e-3"), "not NAME@RATE"),
                           (("--recipes", "bf16,paper@0", "--lrs", "1e-3"), "must be positive"),
                           (("--recipes", "bf16,paper@1e-3"), "need --lrs"),
                           (("--recipes", "bf16,paper,paper@1e-3", "--lrs", "1e-3"), "repeats a run")):
        assert bench_train.run(bench_args(tmp_path / "bad", *extra)) == 2, extra


def test_lr_sweep_reports_each_recipes_best_rate_and_gap_curves(tmp_path, capsys):
    args = bench_args(tmp_path, "--recipes", "bf16,paper", "--seeds", "2", "--tokens", "300",
                      "--eval-every-tokens", "200", "--lrs", "1e-3,3e-2")
    assert bench_train.run(args) == 0
    printed = capsys.readouterr().out
    assert "--tokens 300: 3 steps of 4 x 32 = 128 tokens (384 tokens)" in printed
    assert "--eval-every-tokens 200: validation every 2 steps (256 tokens)" in printed

    finals = {}
    for recipe in ("bf16", "paper"):
        for lr in ("0.001", "0.03"):
            for seed in (0, 1):
                rows = read_csv(tmp_path / f"{recipe}_lr{lr}_seed{seed}.csv")
                assert [int(r["step"]) for r in rows] == [1, 2, 3]
                assert [r["val_loss"] != "" for r in rows] == [False, True, True]  # every 2 steps and the last
                assert float(rows[0]["lr"]) == pytest.approx(float(lr) * 1 / 1)  # warmup 0: the peak rate
                finals[recipe, lr, seed] = float(rows[-1]["val_loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for entry in summary["sweep"]:
        means = {lr: (finals[entry["recipe"], lr, 0] + finals[entry["recipe"], lr, 1]) / 2 for lr in ("0.001", "0.03")}
        best = min(means, key=means.get)
        assert entry["best_lr"] == float(best) and entry["best_loss"] == pytest.approx(means[best], rel=1e-12)
        assert printed.count(f"best learning rate of {entry['name']}: {float(best):g}") == 1
    names = {entry["recipe"]: entry["name"] for entry in summary["sweep"]}
    assert names == {"bf16": "float32 (bf16 recipe on CPU)", "paper": "paper"}
    assert "## Learning-rate sweep" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "gap_curves.png").stat().st_size > 10_000


def test_recipe_at_rate_adds_one_run_compared_with_the_shared_rate(tmp_path):
    """`paper@3e-2` beside `--lrs 1e-3`: one more paper run, its gap paired with bf16 at 1e-3, seed by seed."""
    args = bench_args(tmp_path, "--recipes", "bf16,paper,paper@3e-2", "--seeds", "2", "--steps", "3",
                      "--eval-every", "3", "--lrs", "1e-3")
    assert bench_train.run(args) == 0
    assert sorted(p.name for p in tmp_path.glob("*_seed0.csv")) == [
        "bf16_lr0.001_seed0.csv", "paper_lr0.001_seed0.csv", "paper_lr0.03_seed0.csv"]
    final = {(name, seed): float(read_csv(tmp_path / f"{name}_seed{seed}.csv")[-1]["val_loss"])
             for name in ("bf16_lr0.001", "paper_lr0.03") for seed in (0, 1)}
    gaps = [100 * (final["paper_lr0.03", s] - final["bf16_lr0.001", s]) / final["bf16_lr0.001", s] for s in (0, 1)]
    assert gaps[0] != 0 and gaps[0] != gaps[1]  # a 30x higher rate changes the run (eager: no quantization)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["recipe"]: row for row in summary["rows"]}
    assert rows["paper_lr0.03"]["gap_to_bf16_pct_mean"] == pytest.approx(sum(gaps) / 2, rel=1e-12)
    half_width = 12.706 * abs(gaps[0] - gaps[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1 df) s / sqrt(n)
    assert rows["paper_lr0.03"]["gap_to_bf16_pct_ci95"] == pytest.approx(half_width, rel=1e-4)
    paper = next(entry for entry in summary["sweep"] if entry["recipe"] == "paper")
    assert set(paper["final_val_loss_by_lr"]) == {"0.001", "0.03"}
    text = (tmp_path / "summary.md").read_text()
    assert "| lr 0.001 | lr 0.03 |" in text and "gap 95% CI (%)" in text and "{" not in text
    # float32 ran at 1e-3 only: its 3e-2 cell says "not run", not "diverged or failed"
    assert "| float32 (bf16 recipe on CPU) | 2 | " in text and " | - | 0.001 | " in text


def _t_quantile_by_integration(df: int, p: float = 0.975) -> float:
    """Student's t quantile from its density (Simpson's rule, bisection): an oracle for the table."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, n: int = 20_000) -> float:
        h = x / n
        total = sum((1 if i in (0, n) else 4 if i % 2 else 2) * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
                    for i in range(n + 1))
        return 0.5 + norm * total * h / 3

    low, high = 0.0, 20.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


@pytest.mark.parametrize("df", [1, 2, 4, 9, 17, 30])
def test_t_quantile_table_matches_the_density(df):
    assert bench_report.t_quantile_975(df) == pytest.approx(_t_quantile_by_integration(df), abs=1.5e-3)


def test_gap_curves_pair_each_seed_with_its_baseline(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def outcome(recipe, seed, losses):
        history = [StepRecord(step=step, tokens=2048 * step, train_loss=1.0, val_loss=loss, grad_norm=1.0,
                              lr=1e-3, step_time_s=0.1) for step, loss in enumerate(losses, 1)]
        return bench_report.RunOutcome(recipe=recipe, seed=seed, history=history)

    nan = float("nan")
    outcomes = [outcome("bf16", 0, [2.0, nan, 1.0]), outcome("bf16", 1, [4.0, nan, 2.0]),
                outcome("paper", 0, [2.2, nan, 1.05]), outcome("paper", 1, [4.0, nan, 2.2])]
    drawn = {}

    def capture(figure, path, **kwargs):
        axes = figure.axes[0]
        drawn["lines"] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        drawn["bands"] = len(axes.collections)
        drawn["ylabel"] = axes.get_ylabel()
        figure.canvas.draw()  # lays out the top axis
        (top,) = axes.child_axes
        drawn["top"] = (top.get_xlabel(), top.get_xlim(), axes.get_xlim())

    monkeypatch.setattr(Figure, "savefig", capture)
    names = {"bf16": "float32 (bf16 recipe on CPU)", "paper": "paper"}
    plotted = bench_report.plot_gap_curves(outcomes, ["bf16", "paper"], {}, tmp_path / "gap.png", names=names,
                                          baseline_name=names["bf16"])
    assert plotted == ["paper"]
    steps, gaps = drawn["lines"]["paper (2 seeds)"]
    # seed 0: +10% then +5%; seed 1: 0% then +10%: means 5% and 7.5%
    assert steps == [1, 3] and gaps == pytest.approx([5.0, 7.5], rel=1e-12)
    assert drawn["bands"] == 1 and drawn["ylabel"] == "validation loss gap to float32 (bf16 recipe on CPU) (%)"
    # the top axis reads tokens: 2048 per step here
    label, top_limits, step_limits = drawn["top"]
    assert label == "training tokens (millions)"
    assert top_limits == pytest.approx([limit * 2048 / 1e6 for limit in step_limits], rel=1e-9)


def test_without_matplotlib_the_benchmark_says_so_and_still_writes_results(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert bench_train.run(bench_args(tmp_path, "--recipes", "bf16", "--steps", "2")) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed, so no loss_curves.png" in err
    assert not (tmp_path / "loss_curves.png").exists() and (tmp_path / "bf16_seed0.csv").exists()
    assert "(no plots: matplotlib is not installed)" in (tmp_path / "summary.md").read_text()


def test_labels_name_float32_only_where_bf16_computes_in_float32():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench_train.float32_name("float32", cpu) == "float32 (bf16 recipe on CPU)"
    assert bench_train.float32_name("float32", cuda) == "float32 (bf16 recipe, no autocast)"
    assert bench_train.float32_name("bfloat16", cpu) is None and bench_train.float32_name("bfloat16", cuda) is None
    float32 = bench_train.float32_name("float32", cpu)
    assert bench_train.display_recipe("bf16", float32) == float32
    assert bench_train.display_recipe("bf16", None) == "bf16"
    assert bench_train.display_recipe("paper", float32) == "paper"
    spec = bench_train.RunSpec("paper", "bf16", 0.1, 3e-3)
    assert spec.label == "paper_to_bf16_lr0.003" and spec.baseline_label == "bf16_lr0.003"
    assert spec.display(float32) == f"paper -> {float32} (last 0.1), lr 0.003"


def _outcome(recipe, seed, val_losses, **kwargs):
    """A finished run with a validation loss at steps 1, 2, ... (NaN: no validation at that step)."""
    history = [StepRecord(step=step, tokens=step, train_loss=1.0, val_loss=loss, grad_norm=1.0, lr=1e-3,
                          step_time_s=0.1) for step, loss in enumerate(val_losses, 1)]
    final = next((loss for loss in reversed(val_losses) if math.isfinite(loss)), float("nan"))
    return bench_report.RunOutcome(recipe=recipe, seed=seed, history=history, final_val_loss=final, **kwargs)


def test_gap_over_training_pairs_each_seed_and_spreads_the_steps():
    nan = float("nan")
    base = {0: [2.0, 2.0, 2.0, 2.0, 1.0], 1: [4.0, 4.0, 4.0, 4.0, 2.0], 2: [1.0, 1.0, 1.0, 1.0, 1.0]}
    paper = {0: [2.2, 2.0, 2.1, 2.0, 1.05], 1: [4.0, 4.4, 4.2, 4.0, 2.2], 2: [0.9, nan, 1.1, 1.0, 1.02]}
    outcomes = [_outcome("bf16", s, v) for s, v in base.items()] + [_outcome("paper", s, v) for s, v in paper.items()]
    table = bench_report.gap_over_training(outcomes, ["bf16", "paper"], {}, rows=3)
    assert table["steps"] == [1, 3, 5]  # five validation steps, three rows: first, middle, last
    assert list(table["gaps"]) == ["paper"]  # the baseline has no row of its own
    first, middle, last = table["gaps"]["paper"]
    # step 1: +10%, 0%, -10%; step 5: +5%, +10%, +2% (by hand)
    assert first["mean"] == pytest.approx(0.0, abs=1e-12) and first["seeds"] == 3
    assert first["ci95"] == pytest.approx(4.303 * 10.0 / math.sqrt(3), rel=1e-12)  # t(0.975, 2) * s / sqrt(n)
    assert last["mean"] == pytest.approx(17 / 3, rel=1e-12)
    spread = math.sqrt(((5 - 17 / 3) ** 2 + (10 - 17 / 3) ** 2 + (2 - 17 / 3) ** 2) / 2)
    assert last["ci95"] == pytest.approx(4.303 * spread / math.sqrt(3), rel=1e-12)
    assert middle["seeds"] == 3 and middle["mean"] == pytest.approx((5 + 5 + 10) / 3, rel=1e-12)
    # a step where one seed did not validate counts the others only
    step2 = bench_report.gap_over_training(outcomes, ["bf16", "paper"], {}, rows=5)["gaps"]["paper"][1]
    assert step2["step"] == 2 and step2["seeds"] == 2 and step2["mean"] == pytest.approx(5.0, rel=1e-12)


def test_final_losses_by_seed_name_diverged_and_failed_runs():
    outcomes = [_outcome("bf16", 0, [2.0, 1.5]), _outcome("paper", 0, [2.0, float("nan")], diverged=True),
                bench_report.RunOutcome(recipe="paper", seed=1, error="RuntimeError: x"), _outcome("bf16", 1, [1.25])]
    table = bench_report.final_losses_by_seed(outcomes, ["bf16", "paper"])
    assert table == {"bf16": {0: 1.5, 1: 1.25}, "paper": {0: "diverged", 1: "failed"}}


def test_report_only_rebuilds_the_summary_from_finished_runs_without_training(tmp_path, monkeypatch, capsys):
    common = ("--recipes", "bf16,paper", "--steps", "4", "--eval-every", "2")
    assert bench_train.run(bench_args(tmp_path, *common, "--seeds", "2")) == 0
    trained = json.loads((tmp_path / "summary.json").read_text())
    trained_md = (tmp_path / "summary.md").read_text()
    assert "## Final validation loss per seed" in trained_md and "## Gap to float32" in trained_md
    (tmp_path / "paper_seed1.json").unlink()  # as if that run were still going
    files_before = sorted(p.name for p in tmp_path.iterdir())

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only must not compile or train")

    monkeypatch.setattr(bench_train, "compile_for_recipe", no_training)
    assert bench_train.run(bench_args(tmp_path, *common, "--seeds", "3", "--report-only")) == 0
    assert "3 run(s) not finished" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == files_before  # summary and plots rewritten, nothing added
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["context"]["missing_runs"] == ["paper_seed1", "bf16_seed2", "paper_seed2"]
    rows = {row["recipe"]: row for row in report["rows"]}
    before = {row["recipe"]: row for row in trained["rows"]}
    assert rows["bf16"] == before["bf16"]  # both seeds of bf16 are still there
    assert rows["paper"]["seeds"] == 1 and rows["paper"]["gap_seeds"] == 1
    paper_seed0 = json.loads((tmp_path / "paper_seed0.json").read_text())["final_val_loss"]
    assert rows["paper"]["final_val_loss_mean"] == paper_seed0
    assert report["final_val_loss_by_seed"]["paper"] == {"0": paper_seed0}
    text = (tmp_path / "summary.md").read_text()
    assert "report only (--report-only)" in text and "`paper_seed1`, `bf16_seed2`, `paper_seed2`" in text
    # runs of other settings are refused, and an empty folder has nothing to report
    assert bench_train.run(bench_args(tmp_path, "--recipes", "bf16", "--steps", "5", "--report-only")) == 2
    assert bench_train.run(bench_args(tmp_path / "empty", *common, "--report-only")) == 2


def test_best_rates_compare_a_recipes_rates_over_the_same_seeds():
    """A rate whose seed 1 is still missing must not be ranked against a rate averaged over two seeds."""
    specs = [bench_train.RunSpec(recipe, lr=lr) for lr in (1e-3, 2e-3) for recipe in ("bf16", "paper")]
    outcomes = [_outcome("bf16_lr0.001", 0, [1.0]), _outcome("bf16_lr0.001", 1, [1.2]),
                _outcome("bf16_lr0.002", 0, [1.1]), _outcome("bf16_lr0.002", 1, [1.3]),
                _outcome("paper_lr0.001", 0, [1.08]), _outcome("paper_lr0.001", 1, [1.5]),
                _outcome("paper_lr0.002", 0, [1.1])]  # paper at 2e-3, seed 1: not finished
    sweep = {entry["recipe"]: entry for entry in bench_report.best_rates(outcomes, specs)}
    assert sweep["bf16"]["seeds"] == 2 and sweep["bf16"]["best_lr"] == 1e-3
    assert sweep["bf16"]["final_val_loss_by_lr"] == pytest.approx({"0.001": 1.1, "0.002": 1.2}, rel=1e-12)
    # over seed 0 alone 1e-3 wins (1.08 < 1.10); over both seeds it would have looked worse (1.29)
    assert sweep["paper"]["seeds"] == 1 and sweep["paper"]["best_lr"] == 1e-3
    assert sweep["paper"]["final_val_loss_by_lr"] == pytest.approx({"0.001": 1.08, "0.002": 1.1}, rel=1e-12)
    # its gap pairs both seeds of paper at 1e-3 with bf16 at 1e-3: +8% and +25%
    assert sweep["paper"]["best_gap_pct_mean"] == pytest.approx(16.5, rel=1e-9)


def test_mechanism_pairs_match_runs_at_the_same_rate_and_baseline():
    specs = bench_train._run_specs(["bf16", "paper", "fp4-direct", "w4a8", "paper@0.002", "fp4-direct@0.002"],
                                   None, "bf16", [1e-3])
    pairs = bench_train.mechanism_pairs(specs)
    # paper against fp4-direct at each rate, never across rates; w4a8 has no STE partner here
    assert [(w, wo) for w, wo, _ in pairs] == [("paper_lr0.001", "fp4-direct_lr0.001"),
                                               ("paper_lr0.002", "fp4-direct_lr0.002")]
    sweep = bench_train._run_specs(["bf16", "w8a4", "w8a4-no-occ"], None, "bf16", [1e-3, 2e-3])
    assert [(w, wo) for w, wo, _ in bench_train.mechanism_pairs(sweep)] == [
        ("w8a4_lr0.001", "w8a4-no-occ_lr0.001"), ("w8a4_lr0.002", "w8a4-no-occ_lr0.002")]
    # dge-only against float32 at its own rate: the baseline run itself, or a NAME@RATE run of it
    controls = bench_train._run_specs(["bf16", "dge-only", "bf16@0.002", "dge-only@0.002"], None, "bf16", [1e-3])
    assert [(w, wo) for w, wo, _ in bench_train.mechanism_pairs(controls)] == [
        ("dge-only_lr0.001", "bf16_lr0.001"), ("dge-only_lr0.002", "bf16_lr0.002")]


def test_mechanism_contrasts_difference_of_paired_gaps_seed_by_seed():
    nan = float("nan")
    outcomes = [
        _outcome("bf16", 0, [2.0, 2.0, 1.0]), _outcome("bf16", 1, [4.0, 4.0, 2.0]), _outcome("bf16", 2, [1.0, 1.0, 1.0]),
        _outcome("w4a8", 0, [2.2, 1.9, 1.02]), _outcome("w4a8", 1, [4.4, 4.2, 2.1]), _outcome("w4a8", 2, [1.0, 1.0, 1.0]),
        _outcome("w4a8-ste", 0, [2.0, nan, 1.05]), _outcome("w4a8-ste", 1, [4.0, 4.4, 2.3]),
        _outcome("w4a8-ste", 2, [1.0, nan, nan], diverged=True),
    ]
    (entry,) = bench_report.mechanism_contrasts(outcomes, [("w4a8", "w4a8-ste", "DGE")], {})
    # seed 0: (1.02 - 1.05) / 1.0 = -3 points; seed 1: (2.1 - 2.3) / 2.0 = -10; seed 2: its STE run diverged
    assert entry["seeds"] == 2 and set(entry["difference_pts_by_seed"]) == {0, 1}
    assert entry["difference_pts_by_seed"][0] == pytest.approx(-3.0, rel=1e-9)
    assert entry["difference_pts_by_seed"][1] == pytest.approx(-10.0, rel=1e-9)
    assert entry["difference_pts_mean"] == pytest.approx(-6.5, rel=1e-12)
    assert entry["difference_pts_ci95"] == pytest.approx(12.706 * 7 / math.sqrt(2) / math.sqrt(2), rel=1e-9)
    assert entry["with_ahead_seeds"] == 2
    # seed 0: behind at step 1, step 2 not validated by STE, ahead at step 3; seed 1: behind, ahead, ahead;
    # seed 2: the diverged run's one validation ties (not ahead)
    assert entry["ahead_at_validations"] == {0: [1, 2], 1: [2, 3], 2: [0, 1]}


def test_summary_reports_what_each_mechanism_buys(tmp_path, monkeypatch):
    stock_compile = bench_train.compile_for_recipe

    def compile_with_damped_logits_for_fp4_direct(model, recipe, backend, stats_interval=0, **kwargs):
        compiled = stock_compile(model, recipe, backend, stats_interval, **kwargs)
        # the eager backend trains every recipe alike; this makes the pair differ
        return compiled if recipe != "fp4-direct" else (lambda idx: 0.5 * compiled(idx))

    monkeypatch.setattr(bench_train, "compile_for_recipe", compile_with_damped_logits_for_fp4_direct)
    args = bench_args(tmp_path, "--recipes", "bf16,paper,fp4-direct", "--seeds", "2", "--steps", "3",
                      "--eval-every", "3")
    assert bench_train.run(args) == 0
    final = {(name, seed): float(read_csv(tmp_path / f"{name}_seed{seed}.csv")[-1]["val_loss"])
             for name in ("bf16", "paper", "fp4-direct") for seed in (0, 1)}
    expected = [100 * (final["paper", s] - final["fp4-direct", s]) / final["bf16", s] for s in (0, 1)]
    assert all(abs(value) > 1e-3 for value in expected) and expected[0] != expected[1]
    (entry,) = json.loads((tmp_path / "summary.json").read_text())["mechanisms"]
    assert (entry["with"], entry["without"], entry["seeds"]) == ("paper", "fp4-direct", 2)
    assert list(entry["difference_pts_by_seed"].values()) == pytest.approx(expected, rel=1e-9)
    text = (tmp_path / "summary.md").read_text()
    assert "## What each mechanism buys" in text
    assert f"| paper | fp4-direct | DGE and OCC (W4A4) | 2 | {sum(expected) / 2:+.2f} |" in text
