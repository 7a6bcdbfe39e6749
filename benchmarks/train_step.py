"""Training throughput of the 1.2B-parameter LLaMA: the paper recipe against BF16, one run.

Each variant trains the same model (same initial weights, same batches) for
`--steps` optimizer steps: forward under BF16 autocast (float32 parameters and
AdamW state, as `fp4compile.training` trains), cross-entropy, backward, AdamW
step. "bf16" compiles with backend="inductor"; every other variant is an fp4
recipe compiled with backend="fp4". Tokens/s is batch * seq_len over the
median step time after `--warmup` steps (compilation excluded), measured with
CUDA events; the speed-up is to the bf16 variant of the same run. Variants
run one after the other (each frees its model first), so peak memory is
reported per variant.

    python benchmarks/train_step.py                         # gpu-1b, batch 8 x 1024 tokens
    python benchmarks/train_step.py --batch-size 4 --seq-len 2048
    python benchmarks/train_step.py --device cpu --small    # smoke test on CPU (tiny model)
    python benchmarks/train_step.py --layers 4              # gpu-1b cut to 4 blocks (a quicker compile)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (needs --small)")
    parser.add_argument("--small", action="store_true", help="tiny model, batch and step count (smoke test)")
    parser.add_argument("--preset", default=None, help="model preset (default gpu-1b; tiny with --small)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the preset's)")
    parser.add_argument("--variants", default="bf16,paper", help="comma-separated: bf16 and/or fp4 recipes")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; 2 with --small)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; 32 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --small)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 5; 1 with --small)")
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.small:
        parser.error("--device cpu needs --small (a 1.2B-parameter step on CPU takes minutes and means nothing)")
    args.preset = args.preset or ("tiny" if args.small else "gpu-1b")
    args.batch_size = args.batch_size or (2 if args.small else 8)
    args.seq_len = args.seq_len or (32 if args.small else 1024)
    args.steps = args.steps or (3 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be at least 1")
    return args


def run_variant(variant: str, args, device: str) -> dict:
    """Build, compile and time one variant; returns its measurements."""
    import torch
    import torch.nn.functional as F

    from fp4compile.training.models.llama import Llama, param_count, preset

    config = preset(args.preset)
    if args.layers is not None:
        config = dataclasses.replace(config, n_layers=args.layers)
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {config.max_seq_len}")
    torch.manual_seed(0)
    model = Llama(config).to(device)
    n_params = param_count(model)
    if variant == "bf16":
        compiled = torch.compile(model, backend="inductor")
    else:
        compiled = torch.compile(model, backend="fp4", options={"recipe": variant, "cuda_size_policy": False})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
               for _ in range(4)]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(i):
        batch = batches[i % len(batches)]
        with autocast:
            logits = compiled(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first_loss = step(0).item()  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        step(1 + i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times_ms = []
    for i in range(args.steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(i)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            loss = step(i)
            times_ms.append((time.perf_counter() - t) * 1e3)
    median_ms = statistics.median(times_ms)
    result = {
        "variant": variant,
        "params": n_params,
        "step_ms": median_ms,
        "tokens_per_s": args.batch_size * args.seq_len / (median_ms * 1e-3),
        "compile_s": compile_s,
        "first_loss": first_loss,
        "last_loss": float(loss),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
    }
    del model, compiled, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything defines a Triton kernel
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/train_step.py: no CUDA GPU is available; run with --device cpu --small for a CPU smoke test")
    import fp4compile  # noqa: F401  (registers the fp4 backend)
    from fp4compile.lowering.cuda_gemm import supports_fp8_gemm

    device = args.device
    # TF32 for any float32 GEMM left: it is exact on grid operands (E2M1/E4M3/E5M2
    # values have at most 4 significant bits, TF32 keeps 11), and the BF16
    # baseline runs its linears in bfloat16 under autocast anyway.
    torch.set_float32_matmul_precision("high" if device == "cuda" else "highest")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# Training step, Llama preset {args.preset!r}, {where}\n")
    print(f"torch {torch.__version__}; batch {args.batch_size} x {args.seq_len} tokens; "
          f"median of {args.steps} steps after {args.warmup} warm-up steps; "
          f"FP8 tensor cores: {'yes' if supports_fp8_gemm() else 'no'}.\n")
    results = []
    for variant in args.variants:
        torch._dynamo.reset()
        try:
            results.append(run_variant(variant, args, device))
        except Exception as exc:  # report and go on with the other variants
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"  done: {variant}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["variant"] == "bf16" and "error" not in r), None)
    print("| variant | step ms | tokens/s | vs bf16 | peak GiB | compile s | loss first -> last |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {ratio} | {r['peak_gib']:.1f} "
              f"| {r['compile_s']:.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    sized = next((r for r in results if "params" in r), None)
    if sized:
        print(f"\n{sized['params'] / 1e6:.1f}M parameters ({sized['params']:,}).")
    if device == "cpu":
        print("\n(CPU smoke test: the numbers above are not performance measurements.)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
