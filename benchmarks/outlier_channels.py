"""Where the OCC residual falls: per activation site, how many channels hold any of it.

Why it exists: the CUDA compensation (`fp4compile/lowering/cuda_compensation.py`)
multiplies the residual on a bounded set C of channels by dense GEMMs and
leaves the entries outside C to a sparse gather/scatter. Whether that is fast
depends on how concentrated the residual is, and the roofline
(`fp4compile.inspection.roofline --coverage`) needs that share as input.

For the demo model (the `cpu` Llama preset), trained for `--steps` AdamW steps
on the embedded corpus (and, for comparison, at initialisation), this hooks the
input of every linear layer the `paper` recipe quantizes, applies the recipe's
OCC clamp (row scope, alpha 0.99, the runtime op) to each batch of held-out
tokens, and reports per distinct activation (q/k/v and gate/up share theirs):

- columns: how many of the K channels hold a non-zero residual entry in any
  row of the batch, and that as a share of K;
- coverage@C: the share of residual entries inside the |C| most populated
  channels, for |C| = K / 32 (128 of 4096, the CUDA cap's share at K = 4096)
  and for |C| = cap(K) (what the CUDA lowering uses at this K);
- mass@C: the same share, weighted by |residual|.

    python benchmarks/outlier_channels.py                       # ~2 min on 2 CPU cores
    python benchmarks/outlier_channels.py --csv benchmarks/results/outlier_channels_cpu_demo.csv \
        --json benchmarks/results/outlier_channels_cpu_demo.json

An HF checkpoint is not measured: Hugging Face transformers and pretrained
weights are not available here, and a randomly initialised HF model would say
nothing about trained activations' outlier channels.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fp4compile.lowering.cuda_compensation import channel_cap
from fp4compile.runtime.occ import alpha_fraction, occ_split, occ_thresholds
from fp4compile.training.data import BatchSampler, load_corpus, split_train_val
from fp4compile.training.models.llama import Llama, preset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="Llama preset (default cpu, the demo model)")
    parser.add_argument("--steps", type=int, default=200, help="AdamW steps before measuring (default 200)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches measured (default 4)")
    parser.add_argument("--alpha", type=float, default=0.99, help="OCC alpha (default 0.99, the paper recipe)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write the per-site rows here")
    parser.add_argument("--json", default=None, help="write rows and settings here")
    return parser.parse_args(argv)


def _quantized_linears(model):
    """The linears `paper` quantizes: every nn.Linear but the output head (kept high precision)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"]


# Linears that read the same activation: one site (the rewrite clamps it once).
_SHARED_INPUT = {"q_proj": "attn.input (q,k,v)", "k_proj": "attn.input (q,k,v)", "v_proj": "attn.input (q,k,v)",
                 "gate_proj": "mlp.input (gate,up)", "up_proj": "mlp.input (gate,up)"}


def _site_of(linear_name: str) -> str:
    parent, leaf = linear_name.rsplit(".", 1)
    if leaf in _SHARED_INPUT:
        return parent.rsplit(".", 1)[0] + "." + _SHARED_INPUT[leaf]
    return linear_name


def residual_stats(x2: torch.Tensor, num: int, den: int) -> dict:
    """Column statistics of the row-scope OCC residual of one batch [M, K]."""
    upper, lower = occ_thresholds(x2, num, den, "row")
    _, residual = occ_split(x2, upper, lower)
    k = x2.shape[-1]
    nonzero = residual != 0
    per_column = nonzero.sum(0)
    mass = residual.abs().sum(0)
    order = torch.sort(per_column, descending=True, stable=True).indices
    out = {"K": k, "M": x2.shape[0], "entries": int(nonzero.sum()),
           "columns": int((per_column > 0).sum()), "column_share": float((per_column > 0).float().mean())}
    for label, c in (("k32", max(1, k // 32)), ("cap", channel_cap(k))):
        chosen = order[:c]
        out[f"C_{label}"] = c
        out[f"coverage_{label}"] = float(per_column[chosen].sum() / per_column.sum().clamp(min=1))
        out[f"mass_{label}"] = float(mass[chosen].sum() / mass.sum().clamp(min=1e-30))
    return out


def measure(model, batches, num, den) -> list:
    """One row per (distinct activation, batch)."""
    captured = {}
    hooks = []
    for name, module in _quantized_linears(model):
        def hook(mod, args, name=name):
            captured.setdefault(_site_of(name), (name, args[0].detach().clone()))
        hooks.append(module.register_forward_pre_hook(hook))
    rows = []
    try:
        with torch.no_grad():
            for b, (x, _) in enumerate(batches):
                captured.clear()
                model(x)
                for site, (name, act) in captured.items():
                    rows.append({"site": site, "first_linear": name, "batch": b,
                                 **residual_stats(act.reshape(-1, act.shape[-1]).float(), num, den)})
    finally:
        for h in hooks:
            h.remove()
    return rows


def train(model, data, args):
    sampler = BatchSampler(data, args.batch, args.seq, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(args.steps):
        x, y = sampler.next_batch()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach()) if args.steps else float("nan")


def summarize(rows) -> list:
    """Mean over batches per (stage, site)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["stage"], r["site"]), []).append(r)
    keys = ["K", "M", "entries", "columns", "column_share", "C_k32", "coverage_k32", "mass_k32",
            "C_cap", "coverage_cap", "mass_cap"]
    out = []
    for (stage, site), rs in groups.items():
        out.append({"stage": stage, "site": site,
                    **{k: sum(r[k] for r in rs) / len(rs) for k in keys}})
    return out


def measure_init_and_trained(args, measure_fn):
    """Rows of `measure_fn(model, held_out, num, den)` at init and after `args.steps` steps.

    Returns (rows tagged with their stage, final training loss, start time).
    """
    torch.manual_seed(args.seed)
    num, den = alpha_fraction(args.alpha)
    train_data, val_data = split_train_val(load_corpus())
    model = Llama(preset(args.preset))
    val = BatchSampler(val_data, args.batch, args.seq, seed=args.seed + 1)
    held_out = [val.next_batch() for _ in range(args.batches)]
    start = time.perf_counter()
    rows = [dict(r, stage="init") for r in measure_fn(model, held_out, num, den)]
    loss = train(model, train_data, args)
    rows += [dict(r, stage=f"trained {args.steps} steps") for r in measure_fn(model, held_out, num, den)]
    return rows, loss, start


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, loss, start = measure_init_and_trained(args, measure)
    summary = summarize(rows)
    header = ["stage", "site", "K", "M", "columns", "column_share", "C_k32", "coverage_k32", "mass_k32",
              "C_cap", "coverage_cap", "mass_cap"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in summary:
        print("| " + " | ".join(f"{r[h]:.3f}" if isinstance(r[h], float) and h not in ("K", "M", "columns", "C_k32",
                                                                                        "C_cap")
                                else str(int(r[h])) if isinstance(r[h], float) else str(r[h]) for h in header) + " |")
    print(f"\n{args.preset} preset, {args.batches} held-out batches of {args.batch}x{args.seq} tokens, "
          f"alpha {args.alpha}, final training loss {loss:.3f}, {time.perf_counter() - start:.0f} s")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(summary[0]))
            writer.writeheader()
            for r in summary:
                writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "final_train_loss": loss, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
