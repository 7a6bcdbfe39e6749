"""The late precision switch: its step arithmetic, the in-place recompile, its record, the loop and bench.

Most compiles here use the debug backend `fp4_eager` (the passes, no Inductor:
about a second each on the tiny model); one test switches through the
product backend (`compile_model`, one Inductor compile of one decoder block
under `bf16`).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from fractions import Fraction

import pytest
import torch

import fp4compile
from fp4compile.precision_switch import PrecisionSwitch, clear_switch_events, switch_events, switch_step_for
from fp4compile.training import TrainConfig, build_model, make_optimizer, train
from fp4compile.training import bench as bench_train
from fp4compile.training.data import load_corpus, split_train_val
from fp4compile.training.models import preset

BLOCK_LINEARS = 14  # 2 blocks x (q, k, v, o, gate, up, down) in the tiny preset


@pytest.fixture(autouse=True)
def fresh_state():
    fp4compile.reset()
    clear_switch_events()
    yield
    fp4compile.reset()
    clear_switch_events()


@pytest.fixture(scope="module")
def splits():
    return split_train_val(load_corpus(max_bytes=100_000), 0.1)


def _last_steps_by_search(total: int, percent: int) -> int:
    """The fewest steps m with m / total >= percent / 100, found by counting up (no ceil formula)."""
    m = 0
    while m * 100 < total * percent:
        m += 1
    return m


# ---------------------------------------------------------------- switch step


@pytest.mark.parametrize("total, fraction, expected", [
    (1000, 0.1, 900),
    (100, 0.07, 93),  # 100 * 0.07 is 7.000000000000001 in floats: a float ceil would give 92
    (10, 0.25, 7),  # 2.5 steps round up to 3
    (3, 0.3, 2),  # 0.9 steps round up to 1
    (7, 1.0, 0),  # the whole run under the new recipe
    (1, 0.5, 0),
    (5, Fraction(1, 3), 3),
])
def test_switch_step_examples(total, fraction, expected):
    assert switch_step_for(total, fraction) == expected
    switch = PrecisionSwitch(total, fraction, "bf16")
    assert switch.switch_step == expected and switch.last_steps == total - expected


def test_switch_step_matches_a_search_over_every_percentage():
    for total in (1, 2, 3, 7, 10, 99, 100, 101, 257, 1000, 12345):
        for percent in range(1, 101):
            expected = total - _last_steps_by_search(total, percent)
            assert switch_step_for(total, percent / 100) == expected, (total, percent)


@pytest.mark.parametrize("kwargs, message", [
    (dict(total_steps=0), "total_steps must be at least 1"),
    (dict(total_steps=-5), "total_steps must be at least 1"),
    (dict(total_steps=10.0), "total_steps must be an int"),
    (dict(total_steps=True), "total_steps must be an int"),
    (dict(total_steps=10, last_fraction=0), r"last_fraction must be in \(0, 1\]"),
    (dict(total_steps=10, last_fraction=-0.1), r"last_fraction must be in \(0, 1\]"),
    (dict(total_steps=10, last_fraction=1.5), r"last_fraction must be in \(0, 1\]"),
    (dict(total_steps=10, last_fraction=float("nan")), "last_fraction must be finite"),
    (dict(total_steps=10, last_fraction="0.1"), "last_fraction must be a number"),
    (dict(total_steps=10, to_recipe="fp2"), "recipe='fp2' does not exist"),
    (dict(total_steps=10, to_recipe=None), "to_recipe must be a recipe name"),
    (dict(total_steps=10, dge_kk=3), "dge_kk"),
    (dict(total_steps=10, to_recipe="fp8", options={"recipe": "bf16"}), "options name recipe 'bf16'"),
    (dict(total_steps=10, backend="fp4_eager", regional=True), "regional=True needs backend='fp4'"),
    (dict(total_steps=10, backend=""), "backend must be"),
])
def test_bad_arguments_raise_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrecisionSwitch(**kwargs)


# ---------------------------------------------------------------- in-place recompile (fp4_eager)


def _loss(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_switch_recompiles_in_place_keeping_parameters_optimizer_and_state_dict(caplog):
    torch.manual_seed(0)
    model = build_model(preset("tiny"), seed=0)
    model.compile(backend="fp4_eager", options={"recipe": "paper"})
    optimizer = make_optimizer(model, TrainConfig(steps=4, warmup_steps=0))
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    switch = PrecisionSwitch(4, 0.5, "bf16", from_recipe="paper", backend="fp4_eager")
    assert switch.switch_step == 2
    x, y = torch.randint(0, 256, (2, 2, 16)).unbind(0)

    losses, switched_at = [], []
    caplog.set_level(logging.INFO, logger="fp4compile")
    for step in range(4):
        if switch.maybe_switch(model, step):
            switched_at.append(step)
        loss = _loss(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step == 1:  # still paper: the compiled model is not the plain forward
            # (no torch.no_grad: dynamo would compile an inference graph for it)
            assert not torch.equal(model(x).detach(), model.forward(x).detach())
    assert switched_at == [2] and switch.switched
    assert all(math.isfinite(loss) for loss in losses), losses

    # One graph per recipe: paper quantized every block linear, bf16 none.
    assert [(r.config.recipe, len(r.quantized)) for r in fp4compile.reports()] == [
        ("paper", BLOCK_LINEARS), ("bf16", 0)]
    # The compiled model now computes the high-precision forward: the same ops as the plain module.
    torch.testing.assert_close(model(x).detach(), model.forward(x).detach(), rtol=0, atol=0)

    # Nothing the optimizer or a checkpoint holds was replaced.
    params_after = list(model.parameters())
    assert len(params_after) == len(params_before)
    assert all(a is b for a, b in zip(params_after, params_before))
    optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimizer_params} == {id(p) for p in params_after}
    assert all(p in optimizer.state for p in params_after)  # Adam moments kept across the switch
    assert list(model.state_dict()) == keys_before

    # The record: one event, in the log, in switch_events() and in fp4compile.stats().
    line = "precision switch at step 2: paper -> bf16 (the last 2 of 4 steps)"
    assert [str(event) for event in switch_events()] == [line]
    assert sum(line in record.getMessage() for record in caplog.records) == 1
    table = fp4compile.stats()
    assert [str(e) for e in table.events] == [line] and line in str(table)
    fp4compile.stats(clear=True)
    assert switch_events() == [] and fp4compile.stats().events == []


def test_switch_happens_once_and_a_resumed_run_switches_at_its_first_step():
    model = build_model(preset("tiny"), seed=0)
    model.compile(backend="fp4_eager", options={"recipe": "paper"})
    switch = PrecisionSwitch(10, 0.2, "fp8", backend="fp4_eager")
    assert switch.switch_step == 8
    assert [switch.maybe_switch(model, step) for step in (0, 7)] == [False, False]
    assert switch.maybe_switch(model, 9)  # resumed after step 9: switches now
    assert switch.event.step == 9 and str(switch.event).startswith("precision switch at step 9: previous recipe -> fp8")
    assert not switch.maybe_switch(model, 9) and len(switch_events()) == 1
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    assert fp4compile.reports()[-1].config.recipe == "fp8" and len(fp4compile.reports()[-1].quantized) == BLOCK_LINEARS
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        switch.maybe_switch(model, -1)
    with pytest.raises(ValueError, match="needs the nn.Module"):
        PrecisionSwitch(2, 0.5, backend="fp4_eager").maybe_switch(lambda x: x, 1)


# ---------------------------------------------------------------- the training loop


def test_train_with_switch_follows_the_plain_run_until_the_switch_then_leaves_it(splits, tmp_path):
    cfg = TrainConfig(steps=4, warmup_steps=0, eval_every=2, lr=3e-3, min_lr=3e-4, batch_size=4, seq_len=32,
                      eval_sequences=8)

    def run(switch=None, **kwargs):
        model = build_model(preset("tiny"), seed=0)
        compiled = torch.compile(model, backend="fp4_eager", options={"recipe": "paper"})
        result = train(model, compiled, cfg, *splits, progress=False, precision_switch=switch, **kwargs)
        return [(r.train_loss, r.val_loss, r.grad_norm) for r in result.history], model

    plain, _ = run()
    fp4compile.reset()
    switched, _ = run(PrecisionSwitch(4, 0.5, "bf16", from_recipe="paper", backend="fp4_eager"))
    assert [r.config.recipe for r in fp4compile.reports()] == ["paper", "bf16"]  # the loop ran the new compile
    assert str(switched[:2]) == str(plain[:2])  # bit-for-bit the paper run before the switch (str: NaN == NaN)
    assert switched[2][0] != plain[2][0] and switched[3][1] != plain[3][1]  # bf16 steps differ
    assert all(math.isfinite(loss) for row in switched for loss in (row[0], row[2]))
    assert [e.step for e in switch_events()] == [2]

    # Interrupted after step 3 (post-switch) and resumed with a new switch object:
    # it switches at its first step and ends as the uninterrupted run did.
    class Interrupted(Exception):
        pass

    def stop_after_3(record):
        if record.step == 3:
            raise Interrupted

    checkpoint = tmp_path / "run.pt"
    with pytest.raises(Interrupted):
        run(PrecisionSwitch(4, 0.5, "bf16", backend="fp4_eager"), checkpoint_path=checkpoint, checkpoint_every=1,
            on_step=stop_after_3)
    clear_switch_events()
    resumed, _ = run(PrecisionSwitch(4, 0.5, "bf16", backend="fp4_eager"), checkpoint_path=checkpoint,
                     checkpoint_every=1, resume=True)
    assert [e.step for e in switch_events()] == [3]
    assert str(resumed) == str(switched)

    with pytest.raises(ValueError, match="total_steps=5 but the run has cfg.steps=4"):
        run(PrecisionSwitch(5, 0.5, backend="fp4_eager"))


# ---------------------------------------------------------------- bench train


def _bench_args(out, *extra):
    parser = argparse.ArgumentParser()
    bench_train.add_arguments(parser)
    return parser.parse_args(
        ["--preset", "tiny", "--backend", "fp4_eager", "--out", str(out), "--no-progress", "--batch-size", "4",
         "--seq-len", "32", "--eval-sequences", "8", "--max-bytes", "100000", "--steps", "4", *extra])


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_bench_train_smoke_with_switch(tmp_path, capsys):
    assert bench_train.run(_bench_args(tmp_path, "--recipes", "bf16,paper", "--switch-last", "0.5")) == 0
    # bf16, paper, then the switched run: paper and, after the switch, bf16 (bench resets dynamo per run,
    # not the reports)
    assert [r.config.recipe for r in fp4compile.reports()] == ["bf16", "paper", "paper", "bf16"]
    printed = capsys.readouterr().out
    # On CPU (autocast float32) the bf16 recipe computes in float32, and the printed lines say so.
    cpu_bf16 = "float32 (bf16 recipe on CPU)"
    assert (f"paper -> {cpu_bf16} (last 0.5) seed 0: paper for 2 steps, then {cpu_bf16} for the last 2 "
            "(switch step 2 of 4)") in printed
    assert f"precision switch at step 2: paper -> {cpu_bf16} (the last 2 of 4 steps)" in printed

    switched, paper = _read_csv(tmp_path / "paper_to_bf16_seed0.csv"), _read_csv(tmp_path / "paper_seed0.csv")
    assert [row["recipe"] for row in switched] == ["paper", "paper", "bf16", "bf16"]
    assert [row["recipe"] for row in paper] == ["paper"] * 4
    loss_columns = ("train_loss", "val_loss", "grad_norm")
    assert [[r[c] for c in loss_columns] for r in switched[:2]] == [[r[c] for c in loss_columns] for r in paper[:2]]
    assert switched[3]["train_loss"] != paper[3]["train_loss"]
    result = json.loads((tmp_path / "paper_to_bf16_seed0.json").read_text())
    assert (result["switch_step"], result["switch_to"], result["switch_last_fraction"]) == (2, "bf16", 0.5)
    assert json.loads((tmp_path / "paper_seed0.json").read_text())["switch_step"] is None
    assert not (tmp_path / "bf16_to_bf16_seed0.csv").exists()  # the target itself is not switched

    summary = (tmp_path / "summary.md").read_text()
    assert f"| paper -> {cpu_bf16} (last 0.5) |" in summary
    assert f"then is recompiled with {cpu_bf16} for the last 2" in summary
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows["paper_to_bf16"]["switch_step"] == 2 and rows["paper"]["switch_step"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["context"]["switch"]["switch_step"] == 2


@pytest.mark.parametrize("extra, message", [
    (("--switch-last", "0"), "last_fraction must be in (0, 1]"),
    (("--switch-last", "0.1", "--switch-to", "fp2"), "unknown recipe 'fp2'"),
    (("--recipes", "bf16", "--switch-last", "0.1"), "every recipe in --recipes is the switch target"),
])
def test_bench_train_rejects_bad_switch_arguments(tmp_path, capsys, extra, message):
    assert bench_train.run(_bench_args(tmp_path, "--recipes", "bf16,paper", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the product backend (one Inductor compile)


@pytest.mark.slow
def test_switch_through_compile_model_regional():
    """paper in the debug backend block by block, then the switch recompiles the blocks with Inductor under bf16."""
    model = build_model(preset("tiny"), seed=0)
    for block in model.layers:
        block.compile(backend="fp4_eager", options={"recipe": "paper"})
    x, y = torch.randint(0, 256, (2, 2, 16)).unbind(0)
    params = list(model.parameters())
    before = _loss(model, x, y)
    before.backward()
    switch = PrecisionSwitch(10, 0.1, "bf16", from_recipe="paper", regional=True)
    assert switch.maybe_switch(model, 9)
    after = _loss(model, x, y)
    after.backward()
    assert math.isfinite(before.item()) and math.isfinite(after.item()) and after.item() != before.item()
    assert [(r.backend, r.config.recipe, len(r.quantized)) for r in fp4compile.reports()] == [
        ("fp4_eager", "paper", 7), ("fp4", "bf16", 0)]  # one graph per recipe serves both blocks
    assert all(a is b for a, b in zip(model.parameters(), params))
    # bf16 on CPU is the float32 forward of the plain module (Inductor may reorder sums).
    plain = build_model(preset("tiny"), seed=0)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x).detach(), plain(x).detach(), rtol=1e-5, atol=1e-5)
