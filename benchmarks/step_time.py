"""Training-step time of the demo model on CPU: backend="fp4" against backend="inductor".

Both models are compiled from the same weights; their steps are timed interleaved
(fp4, inductor, fp4, ...) so machine noise hits both alike, and the ratio of the
medians is reported. `--profile` prints the top ops of one fp4 step.

    python benchmarks/step_time.py --preset cpu --batch 8 --seq 128
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import fp4compile  # noqa: F401  (registers the backend)
from fp4compile.training.models.llama import Llama, preset


def make_step(model, backend, options):
    compiled = torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(idx, targets):
        logits = compiled(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    cfg = preset(args.preset)
    torch.manual_seed(0)
    model_fp4 = Llama(cfg)
    model_ref = Llama(cfg)
    model_ref.load_state_dict(model_fp4.state_dict())
    idx = torch.randint(0, 256, (args.batch, args.seq))
    targets = torch.randint(0, 256, (args.batch, args.seq))
    steps = {
        "fp4": make_step(model_fp4, "fp4", {"recipe": args.recipe}),
        "inductor": make_step(model_ref, "inductor", None),
    }
    for name, step in steps.items():
        t = time.perf_counter()
        for _ in range(args.warmup):
            step(idx, targets)
        print(f"{name}: compile + {args.warmup} warm-up steps {time.perf_counter() - t:.1f} s")
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step(idx, targets)
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\n| model | tokens/step | fp4 ({args.recipe}) ms | inductor ms | ratio fp4/inductor |")
    print("|---|---|---|---|---|")
    print(f"| {args.preset} (dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.n_layers} layers) | {args.batch * args.seq} "
          f"| {1e3 * med['fp4']:.1f} | {1e3 * med['inductor']:.1f} | {med['fp4'] / med['inductor']:.2f} |")
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.steps} interleaved steps")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                steps["fp4"](idx, targets)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
