"""Train a small byte-level LLaMA with FP4 linear layers, in plain PyTorch.

With fp4compile installed (``pip install -e .``), the only FP4-specific lines
are ``import fp4compile`` (which registers the ``fp4`` torch.compile backend)
and the ``torch.compile`` call: the model, the optimizer and the training loop
are ordinary PyTorch.

    python examples/train_llama.py                      # the paper's recipe
    python examples/train_llama.py --recipe bf16        # high-precision baseline
    python examples/train_llama.py --backend eager      # no quantization at all
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import fp4compile  # noqa: F401  (registers backend="fp4")
from fp4compile.training.data import BatchSampler, load_corpus, split_train_val, val_batches
from fp4compile.training.models import Llama, param_count, preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="model size: tiny, cpu, cpu-large, gpu-125m, ...")
    parser.add_argument("--recipe", default="paper", help="fp4 recipe: paper, fp4-direct, w4a8, w8a4, fp8, bf16")
    parser.add_argument("--backend", default="fp4")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = preset(args.preset)
    seq_len = min(128, config.max_seq_len)

    # Data: the Python standard library's sources, as bytes (no download needed).
    train_data, val_data = split_train_val(load_corpus(), val_fraction=0.05)
    batches = BatchSampler(train_data, args.batch_size, seq_len, seed=0, device=device)
    validation = val_batches(val_data, args.batch_size, seq_len, n_sequences=128, device=device)

    torch.manual_seed(0)
    model = Llama(config).to(device)
    print(f"{param_count(model) / 1e6:.1f}M parameters on {device}")

    # The one FP4-specific call: every linear layer's GEMMs now run in FP4
    # (DGE for the weight gradient, OCC for activation outliers).
    options = {"recipe": args.recipe} if args.backend.startswith("fp4") else None
    compiled = torch.compile(model, backend=args.backend, options=options)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to a tenth of the peak
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - 1 - warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    @torch.no_grad()
    def validation_loss() -> float:
        losses = [F.cross_entropy(compiled(x).flatten(0, 1).float(), y.flatten()) for x, y in validation]
        return torch.stack(losses).mean().item()

    # bfloat16 autocast on GPU; CPU runs the high-precision parts in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        x, y = batches.next_batch()
        with autocast:
            logits = compiled(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if not math.isfinite(loss.item()):
            print(f"step {step + 1}: loss is {loss.item()}, training diverged")
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 20 == 0 or step == 0:
            print(f"step {step + 1:4d}  train loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)")
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            with autocast:
                print(f"step {step + 1:4d}  validation loss {validation_loss():.4f} nats/byte")


if __name__ == "__main__":
    main()
