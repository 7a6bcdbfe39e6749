"""`python -m fp4compile inspect`: the whole inspection of one model from the command line.

    python -m fp4compile inspect --model demo --preset cpu --batch 4 --seq 128
    python -m fp4compile inspect --model mypkg.models:build --out dump/

prints the site table, the per-site numerics on a real batch, the paper's OCC
fidelity table on the captured activations next to the paper's figures, and the
cost model, then writes the dump folder (before/after code, site tables,
graph.html per graph).

`--model demo` is the project's LLaMA (`Llama(preset(...))`) fed with a batch of
the embedded byte corpus. `--model module:factory` imports `module` and calls
`factory()`, which returns either `(model, example_args)` or a model alone; a
model alone gets a random input of `--input-shape`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo",
                        help="'demo' (the project's LLaMA) or 'module:factory' (factory() -> model or (model, args))")
    parser.add_argument("--preset", default="cpu", help="demo model preset (fp4compile.training.models.llama.PRESETS)")
    parser.add_argument("--checkpoint", default=None,
                        help="demo only: load the model weights of a training checkpoint (fp4compile.training)")
    parser.add_argument("--batch", type=int, default=4, help="demo batch size")
    parser.add_argument("--seq", type=int, default=128, help="demo sequence length (at most the preset's max_seq_len)")
    parser.add_argument("--data", default=None, help="demo: a text file or folder (default: Python stdlib source)")
    parser.add_argument("--input-shape", default=None,
                        help="for a factory that returns a model alone: input shape, e.g. 4,128,256")
    parser.add_argument("--input-dtype", default="float32", choices=("float32", "float64", "bfloat16", "int64"),
                        help="dtype of that input (int64: byte values 0..255)")
    parser.add_argument("--recipe", default="paper", help="FP4 recipe (fp4compile.config.RECIPES)")
    parser.add_argument("--out", default="fp4compile_dump", help="dump folder")
    parser.add_argument("--seed", type=int, default=0)


class ModelSpecError(ValueError):
    """A --model value that does not give a model and its inputs."""


def demo_model_and_batch(args):
    """The demo LLaMA and one [batch, seq] batch of real bytes from the corpus."""
    from ..training.data import load_corpus, val_batches
    from ..training.models.llama import Llama, preset

    config = preset(args.preset)
    torch.manual_seed(args.seed)
    model = Llama(config)
    if args.checkpoint:
        payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
    seq = min(args.seq, config.max_seq_len)
    if seq < args.seq:
        print(f"(--seq {args.seq} is longer than the {args.preset} preset's max_seq_len; using {seq})")
    corpus = load_corpus(args.data, max_bytes=1_000_000)
    windows, _ = val_batches(corpus, args.batch, seq, n_sequences=args.batch)[0]
    # A contiguous tensor of its own: a view would make dynamo describe its shape through its base.
    return model.eval(), (windows.clone(),)


def factory_model_and_args(args):
    """Import `module:factory`, call it; a model alone gets a random --input-shape input."""
    module_name, sep, factory_name = args.model.partition(":")
    if not sep or not module_name or not factory_name:
        raise ModelSpecError(f"--model {args.model!r}: expected 'demo' or 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"--model {args.model!r}: {exc}") from None
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model, example_args = made
        if not isinstance(example_args, (tuple, list)):
            example_args = (example_args,)
        return model, tuple(example_args)
    if not isinstance(made, torch.nn.Module):
        raise ModelSpecError(f"{args.model}() returned {type(made).__name__}; expected a model or (model, example_args)")
    if not args.input_shape:
        raise ModelSpecError(f"{args.model}() returned a model without inputs: pass --input-shape (and --input-dtype)")
    shape = tuple(int(d) for d in args.input_shape.split(","))
    generator = torch.Generator().manual_seed(args.seed)
    if args.input_dtype == "int64":
        example = torch.randint(0, 256, shape, generator=generator)
    else:
        example = torch.randn(shape, generator=generator).to(getattr(torch, args.input_dtype))
    return made, (example,)


def run(args) -> int:
    from .inspect import inspect

    try:
        model, example_args = demo_model_and_batch(args) if args.model == "demo" else factory_model_and_args(args)
    except ModelSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    inspection = inspect(model, *example_args, options={"recipe": args.recipe})
    print(inspection)
    full_length = args.model == "demo" and example_args[0].shape[1] == model.config.max_seq_len
    if full_length and inspection.graphs and len(inspection.graphs[0].symbol_names()) < 2:
        print("Note: dynamo specialised the sequence length (a --seq equal to the preset's max_seq_len slices "
              "the whole rotary tables and mask), so shapes and cost are symbolic in the batch size only; "
              "a shorter --seq keeps s symbolic.")

    print()
    numerics = inspection.numerics(*example_args)
    print(numerics)
    if args.model == "demo" and not args.checkpoint and numerics.sites:
        ratio = sum(s.amax_over_median for s in numerics.sites) / len(numerics.sites)
        print(f"Note: this is a freshly initialised model (no --checkpoint). Its activations have few outliers "
              f"(mean amax/median |x| {ratio:.1f}), so clamping them changes little and the rows of the fidelity "
              "table below differ far less than on the paper's trained LLaMA-1.3B. Pass --checkpoint to "
              "inspect trained weights.")

    if numerics.operands:
        print()
        print(numerics.occ_study())

    if inspection.graphs:
        print()
        print(inspection.cost())

    out = inspection.save(args.out)
    print(f"\ndump written to {out}/ (index.md; per graph: before.py, after.py, sites.md, sites.csv, graph.html)")
    return 0
