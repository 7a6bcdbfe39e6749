"""Train a Hugging Face `LlamaForCausalLM` with `transformers.Trainer` and FP4 linear layers.

The model is built from a small `LlamaConfig` (random initialisation, nothing
downloaded) and trained on the embedded corpus (the Python standard library's
own source, bytes as tokens: vocabulary 256). The only FP4-specific line is

    fp4compile.compile_model(model, args.recipe)

run BEFORE the model goes into the Trainer. It compiles the model in place
(`model.compile(backend="fp4", options=...)`), so the model keeps its class,
its `forward` signature and its `state_dict` keys, and `save_pretrained` writes
an ordinary checkpoint that plain, uncompiled transformers loads.

Why not `TrainingArguments(torch_compile=True, torch_compile_backend="fp4")`:

- the Trainer hands the backend name to Accelerate, whose `TorchDynamoPlugin`
  converts it into its closed `DynamoBackend` enum: "fp4" is rejected with a
  ValueError before anything is compiled; and the Trainer has no way to pass
  `options=` (the recipe) to a backend;
- handing the Trainer a `torch.compile(model)` wrapper instead does not work
  either: the Trainer reads the wrapper's `forward(*args, **kwargs)` signature
  and drops every dataset column (`input_ids`, `labels`) as unused.

So leave `torch_compile` unset (False) and compile in place first.

    python examples/hf_trainer.py --recipe paper --steps 50
    python examples/hf_trainer.py --recipe fp4-direct --regional
    python examples/hf_trainer.py --recipe bf16 --out /tmp/llama-bf16
    python examples/hf_trainer.py --options '{"recipe": "paper", "keep_first_last": 1}'
    python examples/hf_trainer.py --recipe paper --switch-last 0.1 --switch-to bf16

`--switch-last F` adds a late precision switch (`fp4compile.PrecisionSwitch`,
as a `TrainerCallback`): the last fraction F of the steps (rounded up) train
under `--switch-to`, the model recompiled in place at that step.

Needs `transformers` and `accelerate` (`pip install -e ".[dev]"` installs both).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import fp4compile
from fp4compile.training.data import load_corpus, split_train_val


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="paper",
                        help=f"fp4 recipe: {', '.join(fp4compile.RECIPES)} (default: paper)")
    parser.add_argument("--options", default=None,
                        help="more fp4 options as a JSON object of Fp4Config fields, e.g. "
                             "'{\"keep_first_last\": 1}'; --recipe overrides its \"recipe\"")
    parser.add_argument("--regional", action="store_true",
                        help="compile one decoder block (shared by all of them) instead of the whole model: "
                             "a shorter cold compile; embeddings and lm_head then run uncompiled")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default: 50)")
    parser.add_argument("--out", default="hf_trainer_out", help="folder for the save_pretrained checkpoint")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks (default: 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="bytes per training window (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default: 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--logging-steps", type=int, default=1, help="log the loss every N steps (default: 1)")
    parser.add_argument("--max-bytes", type=int, default=2**20,
                        help="bytes of the embedded corpus to read (default: 1 MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch-last", type=float, default=None, metavar="FRACTION",
                        help="train the last FRACTION of the steps (rounded up) under --switch-to (default: off)")
    parser.add_argument("--switch-to", default="bf16", metavar="RECIPE",
                        help="the recipe of a --switch-last switch (default: bf16)")
    return parser


class ByteWindows(torch.utils.data.Dataset):
    """Disjoint windows of `seq_len` bytes, as the `input_ids`/`labels` a causal LM takes.

    `labels` equals `input_ids`: `LlamaForCausalLM` shifts them by one itself
    when it computes the loss.
    """

    def __init__(self, data: torch.Tensor, seq_len: int) -> None:
        if data.dim() != 1 or data.dtype != torch.uint8:
            raise ValueError("data must be a 1-D uint8 byte tensor")
        if len(data) < seq_len:
            raise ValueError(f"{len(data)} bytes cannot hold one window of {seq_len}")
        self.data = data
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.data) // self.seq_len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        window = self.data[index * self.seq_len:(index + 1) * self.seq_len].long()
        return {"input_ids": window, "labels": window.clone()}


def build_model(hidden: int, layers: int, heads: int, seq_len: int, seed: int):
    """A randomly initialised byte-level `LlamaForCausalLM` (no hub download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,  # bytes are the tokens
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        use_cache=False,  # training: no KV cache
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass
class RunResult:
    model: torch.nn.Module  # the trained, compiled-in-place model
    trainer: object  # the transformers.Trainer (its state.log_history has the losses)
    reports: list  # fp4compile.reports() after training: one per compiled graph
    checkpoint: Path  # the save_pretrained folder
    switch: object = None  # the fp4compile.PrecisionSwitch of --switch-last, if any


def fp4_options(args, parser) -> dict:
    """The options dict from --options and --recipe; a malformed --options exits with a message."""
    options = {}
    if args.options:
        try:
            options = json.loads(args.options)
        except json.JSONDecodeError as exc:
            parser.error(f"--options is not valid JSON ({exc}): {args.options!r}")
        if not isinstance(options, dict):
            parser.error(f"--options must be a JSON object of Fp4Config fields, got {args.options!r}")
    return {**options, "recipe": args.recipe}


def main(argv: list[str] | None = None) -> RunResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    except ImportError:
        parser.error("this example needs transformers and accelerate: pip install transformers accelerate")

    model = build_model(args.hidden, args.layers, args.heads, args.seq_len, args.seed)
    print(f"LlamaForCausalLM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{args.layers} blocks, hidden {args.hidden}")

    # The FP4 line: compile in place, before the Trainer sees the model. Options
    # are validated here, so a bad recipe or option stops the run at once.
    fp4compile.reset()
    try:
        fp4compile.compile_model(model, regional=args.regional, options=fp4_options(args, parser))
    except fp4compile.Fp4OptionsError as exc:
        parser.error(str(exc))
    switch, callbacks = None, []
    if args.switch_last is not None:
        # Only the recipe changes at the switch (no --options): the policy of the
        # first compile (skip, keep_first_last) is the recipe's default again.
        try:
            switch = fp4compile.PrecisionSwitch(args.steps, args.switch_last, args.switch_to, from_recipe=args.recipe,
                                                regional=args.regional)
        except ValueError as exc:
            parser.error(f"--switch-last/--switch-to: {exc}")
        callbacks.append(switch.hf_callback())
        print(f"precision switch: {args.recipe} for {switch.switch_step} steps, then {args.switch_to} for the "
              f"last {switch.last_steps} (switch step {switch.switch_step} of {args.steps})")

    train_data, _ = split_train_val(load_corpus(max_bytes=args.max_bytes), val_fraction=0.05)
    dataset = ByteWindows(train_data, args.seq_len)
    out = Path(args.out)
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.steps // 10,
        weight_decay=0.1,
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        save_strategy="no",  # one save_pretrained at the end instead
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),  # autocast on GPU (not run by the CPU-only tests); CPU keeps float32
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=args.seed,
        disable_tqdm=True,
        # torch_compile stays False: Accelerate rejects backend="fp4" (see the docstring).
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    if switch is not None:
        print(switch.event if switch.switched else f"precision switch: did not happen (switch step "
              f"{switch.switch_step}, {trainer.state.global_step} steps trained)")

    reports = fp4compile.reports()
    print(f"\nfp4compile reports ({len(reports)} compiled graph(s)):")
    for report in reports:
        print(report)

    model.save_pretrained(out)
    # An uncompiled model loads the checkpoint: the keys are the plain ones.
    reloaded = LlamaForCausalLM.from_pretrained(out)
    trained, loaded = model.state_dict(), reloaded.state_dict()
    same = list(trained) == list(loaded) and all(torch.equal(trained[k], loaded[k]) for k in trained)
    print(f"\nsaved to {out}; reloaded into a plain LlamaForCausalLM: "
          f"{len(loaded)} tensors, {'all identical' if same else 'NOT identical'} to the trained model")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        raise SystemExit(f"training loss is not finite: {losses}")
    if not same:
        raise SystemExit(f"the checkpoint in {out} does not reload with the trained values")
    return RunResult(model=model, trainer=trainer, reports=reports, checkpoint=out, switch=switch)


if __name__ == "__main__":
    main()
