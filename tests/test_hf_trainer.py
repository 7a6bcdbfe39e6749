"""The Hugging Face Trainer route: examples/hf_trainer.py trains, reports, saves, reloads.

`compile_model` exists so that training stacks that never call `torch.compile`
themselves can train in FP4. These tests run the example itself (its `main`,
on a tiny LlamaForCausalLM: hidden 64, 32-byte windows, batch 4, 3 steps)
under `paper` (whole-model compile, one block: the compile grows with the
blocks, and one has every kind of linear) and `fp4-direct` (regional, two
blocks: one block graph serves both), and check what a user relies on:

- the report: every decoder-block linear (q/k/v/o/gate/up/down) of every
  block quantized, `lm_head` kept by the default skip list;
- the Trainer logged a finite loss at every step;
- `save_pretrained`'s checkpoint loads into a plain, uncompiled
  `LlamaForCausalLM` with every tensor equal to the trained model's (and the
  weights did change in training, so the equality is not that of two fresh
  initialisations);
- a bad recipe or option on the command line stops the run with a message
  naming the option, before anything is compiled.

Each training run costs one Inductor compile (forward and backward).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaForCausalLM  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
STEPS, SEED = 3, 0
TINY = ["--hidden", "64", "--heads", "4", "--seq-len", "32", "--batch-size", "4",
        "--steps", str(STEPS), "--max-bytes", "65536", "--seed", str(SEED)]
# Blocks per run: a whole-model compile's time grows with them; regional needs two to share a graph.
LAYERS = {False: 1, True: 2}
SWITCH_LAYERS = 2  # the precision-switch tests (fp4_eager, nothing generated)


def _load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture(scope="module", params=[("paper", False), ("fp4-direct", True)],
                ids=["paper-whole-model", "fp4-direct-regional"])
def run(request, tmp_path_factory):
    recipe, regional = request.param
    out = tmp_path_factory.mktemp(f"hf-{recipe}")
    argv = [*TINY, "--layers", str(LAYERS[regional]), "--recipe", recipe, "--out", str(out)]
    argv += ["--regional"] if regional else []
    return recipe, regional, example.main(argv)


@pytest.mark.slow
def test_report_quantizes_every_block_linear_and_keeps_lm_head(run):
    recipe, regional, result = run
    assert type(result.model) is LlamaForCausalLM  # compiled in place: class kept
    assert result.reports, "nothing was compiled"
    assert all(report.config.recipe == recipe for report in result.reports)
    if regional:
        # One graph serves both blocks (a second compile would add a report);
        # its sites are named relative to the block.
        assert [block._compiled_call_impl is not None for block in result.model.model.layers] == [True] * LAYERS[True]
        assert len(result.reports) == 1
        decisions = {site.module_path: (site.quantized, site.reason) for site in result.reports[0].sites}
        assert decisions == {name: (True, "") for name in BLOCK_LINEARS}
    else:
        assert len(result.reports) == 1  # one graph for the whole model: no graph break
        decisions = {site.module_path: (site.quantized, site.reason) for site in result.reports[0].sites}
        expected = {f"model.layers.{i}.{name}": (True, "") for i in range(LAYERS[False]) for name in BLOCK_LINEARS}
        expected["lm_head"] = (False, "skip list (lm_head)")
        assert decisions == expected


@pytest.mark.slow
def test_trainer_logs_a_finite_loss_every_step(run):
    _, _, result = run
    losses = [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    assert all(math.isfinite(loss) for loss in losses), losses
    # Bytes as tokens: a random model starts near ln(256) ~ 5.5; FP4 must not blow it up.
    assert all(0.5 < loss < 2 * math.log(256) for loss in losses), losses


@pytest.mark.slow
def test_checkpoint_reloads_into_plain_transformers_with_identical_values(run):
    _, regional, result = run
    reloaded = LlamaForCausalLM.from_pretrained(result.checkpoint)
    assert reloaded._compiled_call_impl is None  # plain, uncompiled
    trained, loaded = result.model.state_dict(), reloaded.state_dict()
    assert list(loaded) == list(trained)  # compiled in place: the plain keys
    for key, value in trained.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    # Training moved the block weights, so the equality above is of trained values.
    initial = example.build_model(64, LAYERS[regional], 4, 32, SEED).state_dict()
    assert not torch.equal(initial["model.layers.0.self_attn.q_proj.weight"],
                           trained["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("argv, named", [
    (["--recipe", "nope"], "recipe='nope'"),
    (["--options", '{"dge_kk": 3}'], "'dge_kk'"),
    (["--options", '{"occ_alpha": 2.0}'], "occ_alpha"),
    (["--options", "[1, 2]"], "--options must be a JSON object"),
    (["--switch-last", "0"], "last_fraction must be in (0, 1]"),
    (["--switch-last", "0.1", "--switch-to", "fp2"], "recipe='fp2' does not exist"),
])
def test_bad_option_exits_with_a_message_naming_it(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main([*TINY, "--out", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not any(tmp_path.iterdir())  # stopped before training or saving


def test_per_layer_policy_sees_full_names_and_modules_of_a_whole_hf_model():
    """HF wraps `forward` in (*args, **kwargs) decorators (the root is L['args'][0] to
    dynamo): names, filter_fn's module objects and keep_first_last must still resolve."""
    import fp4compile

    torch.manual_seed(0)
    model = example.build_model(hidden=64, layers=3, heads=4, seq_len=16, seed=0)
    seen = {}

    def no_gate(module, fqn):
        seen[fqn] = module
        return not fqn.endswith("gate_proj")

    fp4compile.reset()
    compiled = torch.compile(model, backend="fp4_eager", options={"keep_first_last": 1, "filter_fn": no_gate})
    compiled(input_ids=torch.randint(0, 256, (1, 16)))
    decisions = {s.module_path: s.reason for r in fp4compile.reports() for s in r.sites}
    fp4compile.reset()
    assert seen["model.layers.1.mlp.up_proj"] is model.model.layers[1].mlp.up_proj
    assert decisions["model.layers.1.mlp.gate_proj"] == "filter_fn returned False"
    assert decisions["model.layers.1.self_attn.q_proj"] == ""
    assert decisions["model.layers.0.mlp.down_proj"] == "keep_first_last=1 (block 0 of 3)"
    assert decisions["model.layers.2.self_attn.o_proj"] == "keep_first_last=1 (block 2 of 3)"
    assert decisions["lm_head"] == "skip list (lm_head)"


def _tiny_trainer(model, steps, callbacks, out):
    from transformers import Trainer, TrainingArguments

    from fp4compile.training.data import load_corpus, split_train_val

    train_data, _ = split_train_val(load_corpus(max_bytes=65536), val_fraction=0.05)
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_strategy="steps", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=SEED, disable_tqdm=True)
    return Trainer(model=model, args=training_args, train_dataset=example.ByteWindows(train_data, 32),
                   callbacks=callbacks)


def test_precision_switch_callback_recompiles_the_trainers_model(tmp_path):
    """The TrainerCallback adapter: debug backend fp4_eager (no Inductor), 3 steps, the last 2 in bf16."""
    import fp4compile
    from fp4compile.precision_switch import clear_switch_events

    model = example.build_model(64, SWITCH_LAYERS, 4, 32, SEED)
    fp4compile.reset()
    clear_switch_events()
    model.compile(backend="fp4_eager", options={"recipe": "paper"})
    params = list(model.parameters())
    switch = fp4compile.PrecisionSwitch(STEPS, 0.5, "bf16", from_recipe="paper", backend="fp4_eager")
    assert switch.switch_step == 1  # 3 steps * 0.5 = 1.5, rounded up to 2 steps in bf16
    trainer = _tiny_trainer(model, STEPS, [switch.hf_callback()], tmp_path)
    try:
        trainer.train()
        reports = fp4compile.reports()
        events = fp4compile.switch_events()
    finally:
        fp4compile.reset()
        clear_switch_events()
    assert [str(e) for e in events] == ["precision switch at step 1: paper -> bf16 (the last 2 of 3 steps)"]
    expected_sites = SWITCH_LAYERS * len(BLOCK_LINEARS)
    assert [(r.config.recipe, len(r.quantized)) for r in reports] == [("paper", expected_sites), ("bf16", 0)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    # The Trainer's optimizer still holds the model's own parameter objects.
    assert all(a is b for a, b in zip(model.parameters(), params))
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in params if p.requires_grad}


def test_precision_switch_callback_rejects_another_step_count(tmp_path):
    import fp4compile

    model = example.build_model(64, SWITCH_LAYERS, 4, 32, SEED)
    switch = fp4compile.PrecisionSwitch(STEPS + 1, 0.5, backend="fp4_eager")
    with pytest.raises(ValueError, match=r"total_steps=4\) but the Trainer runs max_steps=3"):
        _tiny_trainer(model, STEPS, [switch.hf_callback()], tmp_path).train()
