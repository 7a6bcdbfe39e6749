"""One linear layer, forward + backward: compiled BF16 against the fp4 backend's recipes.

Two tables, Markdown, from one run on one GPU:

1. Time per fwd+bwd step of `y = x @ W.T` for each shape (M, K, N): BF16
   compiled with backend="inductor", and recipes fp8, fp4-direct and paper
   compiled with backend="fp4". Median over `--iters` steps after `--warmup`,
   timed with CUDA events; ratios are to the BF16 time of the same run. A
   variant `recipe:compensation` sets `Fp4Config.cuda_compensation`
   (`paper` is `paper:fp8_folded`, the compensation folded into the FP8
   activation codes; `paper:channels` the exact channel-GEMM path). A cell
   is marked `[no FP8 GEMM]` when the generated code calls no `_scaled_mm`
   (the recipe then runs its GEMMs emulated in float32 and the time says
   nothing about FP8 tensor cores), and `[folded]` when it runs the folded
   activation kernel (`_folded_rows_kernel`).
2. Each Triton quantization kernel (`lowering.triton_kernels`) on the same
   shapes: time, achieved bandwidth (bytes it must move / time) and that as a
   fraction of the copy bandwidth (`torch.clone` of a large tensor), measured
   in the same run. The OCC kernels are also set against the topk-based
   runtime op compiled by Inductor.

    python benchmarks/linear.py                     # CUDA: the five default shapes
    python benchmarks/linear.py --shapes 4096,4096,4096 --recipes paper,paper:channels
    python benchmarks/linear.py --device cpu --small    # smoke test on CPU (Triton interpreter)

`benchmarks/gpu_check.py` (`make gpu-check`) calls `run` and prints the roofline
prediction (`fp4compile.inspection.roofline`) beside each measured time.

On CPU (--device cpu) the timings mean nothing: the mode exists to check that
the script runs. It needs --small, runs tiny shapes, and runs the Triton
kernels in the interpreter.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

DEFAULT_SHAPES = ((4096, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (16384, 8192, 8192), (1024, 2048, 1024))
SMALL_SHAPES = ((48, 128, 32),)
DEFAULT_RECIPES = ("fp8", "fp4-direct", "paper")
COPY_BYTES = 1 << 30  # the copy-bandwidth probe moves 1 GiB each way


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default) or cpu (needs --small)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and few iterations (smoke test)")
    parser.add_argument("--shapes", default=None, help="semicolon-separated M,K,N triples (default: the five standard shapes)")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help="comma-separated fp4 recipes, each optionally recipe:cuda_compensation "
                             "(e.g. paper:channels)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after compilation (default 10; 1 with --small)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 50; 3 with --small)")
    parser.add_argument("--alpha", type=float, default=0.99, help="OCC alpha for the kernel table (default 0.99)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the quantization-kernel table")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.small:
        parser.error("--device cpu needs --small (CPU timings of these shapes would take hours and mean nothing)")
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
        if any(len(s) != 3 for s in args.shapes):
            parser.error("--shapes takes M,K,N triples separated by ';'")
    else:
        args.shapes = list(SMALL_SHAPES if args.small else DEFAULT_SHAPES)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    args.iters = args.iters if args.iters is not None else (3 if args.small else 50)
    return args


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: str):
        self.device = device

    def median_ms(self, fn, warmup: int, iters: int) -> float:
        import torch

        for _ in range(warmup):
            fn()
        times = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbs(device: str, timer: Timer, small: bool) -> float:
    """Bytes read + written per second by `clone` of a large bf16 tensor: the memory ceiling."""
    import torch

    nbytes = (1 << 20) if small else COPY_BYTES
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    ms = timer.median_ms(lambda: src.clone(), 3, 10 if not small else 3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def linear_step(layer, fn, x, grad_out):
    """One fwd+bwd step; returns a closure that runs it."""

    def step():
        x.grad = None
        layer.weight.grad = None
        fn(x).backward(grad_out)

    return step


def time_linears(args, device, timer, deadline=None):
    """Table 1 rows: {shape: {variant: (ms, uses_scaled_mm) or error string}}.

    `deadline` (a time.monotonic() value): shapes not started by then are
    reported as not run, so a bounded check (benchmarks/gpu_check.py) ends in time.
    """
    import torch
    from torch._inductor.utils import run_and_get_code

    results = {}
    for m, k, n in args.shapes:
        if deadline is not None and time.monotonic() > deadline:
            results[(m, k, n)] = {v: "not run: time budget spent" for v in ["bf16", *args.recipes]}
            continue
        torch.manual_seed(0)
        base = torch.nn.Linear(k, n, bias=False).to(device, torch.bfloat16)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, requires_grad=True)
        grad_out = torch.randn(m, n, device=device, dtype=torch.bfloat16)
        row = {}
        for variant in ["bf16", *args.recipes]:
            layer = copy.deepcopy(base)
            torch._dynamo.reset()
            try:
                if variant == "bf16":
                    fn = torch.compile(layer, backend="inductor")
                else:
                    fn = torch.compile(layer, backend="fp4", options=variant_options(variant))
                step = linear_step(layer, fn, x, grad_out)
                _, code = run_and_get_code(step)  # compiles forward and backward
                uses_fp8 = any("_scaled_mm" in c for c in code)
                folded = any("_folded_rows_kernel" in c for c in code)
                row[variant] = (timer.median_ms(step, args.warmup, args.iters), uses_fp8, folded)
            except Exception as exc:  # a failing recipe is a result, not the end of the run
                row[variant] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            del layer
            if device == "cuda":
                torch.cuda.empty_cache()
        results[(m, k, n)] = row
        print(f"  timed {m}x{k}x{n}", file=sys.stderr, flush=True)
    return results


def variant_options(variant: str) -> dict:
    """fp4 backend options of a variant `recipe` or `recipe:cuda_compensation`."""
    recipe, _, compensation = variant.partition(":")
    options = {"recipe": recipe, "cuda_size_policy": False}
    if compensation:
        options["cuda_compensation"] = compensation
    return options


def kernel_cases(m, k, n, alpha, device):
    """(name, shape text, callable, bytes it must move) for each quantization kernel."""
    import torch

    from fp4compile.lowering import triton_kernels as tq
    from fp4compile.runtime.occ import alpha_fraction, outliers_per_side

    num, den = alpha_fraction(alpha)
    c = outliers_per_side(k, num, den)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    grad_w = torch.randn(n, k, device=device, dtype=torch.float32)
    _, w_scale = tq.quantize_rows(w)
    x_scale = torch.rand(m, 1, device=device) + 0.5
    values_dtype = torch.float8_e4m3fn if device == "cuda" else torch.float32
    grad_dtype = torch.float8_e5m2 if device == "cuda" else torch.float32
    sparse = m * 2 * c * (4 + 8)  # float32 values + int64 index
    mk, nk, mn = m * k, n * k, m * n
    return [
        # The activation kernel of paper's default CUDA lowering: x read once, 1-byte codes and the row scale.
        ("folded_rows (OCC + E2M1 + folded E4M3 codes)", f"x {m}x{k}",
         lambda: tq.folded_rows(x, num, den, values_dtype), 2 * mk + mk + 4 * m),
        ("occ_residual_rows (thresholds + sparse residual)", f"x {m}x{k}",
         lambda: tq.occ_residual_rows(x, num, den), 2 * mk + sparse),
        ("occ_quantize_rows_sparse (fused, fp8 values)", f"x {m}x{k}",
         lambda: tq.occ_quantize_rows_sparse(x, num, den, "e2m1", values_dtype), 2 * mk + mk + sparse),
        ("occ_quantize_rows (fused, dense fp32 residual)", f"x {m}x{k}",
         lambda: tq.occ_quantize_rows(x, num, den, "e2m1", values_dtype), 2 * mk + mk + 4 * mk),
        ("quantize_rows (weight)", f"W {n}x{k}", lambda: tq.quantize_rows(w, "e2m1", values_dtype), 2 * nk + nk),
        ("dge_backward", f"W {n}x{k}", lambda: tq.dge_backward(w, w_scale, grad_w), 2 * nk + 4 * nk + 2 * nk),
        ("cast_gradient (E5M2, fold, transposed)", f"g.T {n}x{m}",
         lambda: tq.cast_gradient(g.t(), x_scale, 1, grad_dtype), 2 * 2 * mn + mn),
    ]


def topk_occ_reference(alpha):
    """The runtime's OCC + row quantization (topk thresholds, gather), for Inductor to compile."""
    import torch

    from fp4compile.runtime.occ import alpha_fraction, occ_split, occ_thresholds
    from fp4compile.runtime.quantize import quantize

    num, den = alpha_fraction(alpha)

    def occ_quantize(x):
        x32 = x.to(torch.float32)
        upper, lower, index = occ_thresholds(x32, num, den, "row", with_index=True)
        clamped, residual = occ_split(x32, upper, lower)
        values, scale = quantize(clamped, "row", "e2m1")
        return values.to(torch.float8_e4m3fn), scale, residual.gather(-1, index), index

    return occ_quantize


def time_kernels(args, device, timer, copy_gbs, deadline=None):
    import torch

    rows = []
    seen = set()
    compiled_ref = torch.compile(topk_occ_reference(args.alpha), backend="inductor") if device == "cuda" else None
    for m, k, n in args.shapes:
        if deadline is not None and time.monotonic() > deadline:
            rows.append(("(rest not run: time budget spent)", f"{m}x{k}x{n}", "", "", ""))
            continue
        for name, shape, fn, nbytes in kernel_cases(m, k, n, args.alpha, device):
            if (name, shape) in seen:
                continue
            seen.add((name, shape))
            try:
                ms = timer.median_ms(fn, args.warmup, args.iters)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append((name, shape, f"{ms:.3f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"))
            except Exception as exc:
                rows.append((name, shape, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}", "", ""))
        if compiled_ref is not None and ("ref", m, k) not in seen:
            seen.add(("ref", m, k))
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            try:
                ms = timer.median_ms(lambda: compiled_ref(x), args.warmup, args.iters)
                rows.append(("topk OCC + quantize, Inductor (reference)", f"x {m}x{k}", f"{ms:.3f}", "", ""))
            except Exception as exc:
                rows.append(("topk OCC + quantize, Inductor (reference)", f"x {m}x{k}",
                             f"error: {type(exc).__name__}", "", ""))
    return rows


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_linear_table(results, recipes) -> str:
    rows = []
    for (m, k, n), row in results.items():
        base = row.get("bf16")
        base_ms = base[0] if isinstance(base, tuple) else None
        cells = [m, k, n, f"{base_ms:.3f}" if base_ms is not None else base]
        for r in recipes:
            cell = row.get(r)
            if isinstance(cell, tuple):
                ms, fp8, folded = cell
                ratio = f" ({base_ms / ms:.2f}x)" if base_ms else ""
                cells.append(f"{ms:.3f}{ratio}{'' if fp8 else ' [no FP8 GEMM]'}{' [folded]' if folded else ''}")
            else:
                cells.append(cell)
        rows.append(cells)
    header = ["M", "K", "N", "bf16 ms"] + [f"{r} ms (speed-up)" for r in recipes]
    return markdown_table(header, rows)


def run(args, linear_deadline=None, kernel_deadline=None) -> dict:
    """Both tables as data: {"linear": {shape: {variant: (ms, fp8, folded) | text}}, "copy_gbs", "kernels": rows}.

    Prints the tables as it goes (Markdown), as `main` always has.
    """
    import torch
    import triton

    import fp4compile  # noqa: F401  (registers the fp4 backend)
    from fp4compile.lowering.cuda_gemm import supports_fp8_gemm

    device = args.device
    timer = Timer(device)
    torch.set_float32_matmul_precision("highest")
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"# Linear fwd+bwd, {gpu}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}, "
          f"FP8 tensor cores: {'yes' if supports_fp8_gemm() else 'no'}; "
          f"median of {args.iters} steps after {args.warmup} warm-up steps.\n")
    out = {"device": gpu, "linear": time_linears(args, device, timer, linear_deadline), "kernels": [],
           "copy_gbs": None}
    print(format_linear_table(out["linear"], args.recipes), flush=True)
    if not args.no_kernels:
        out["copy_gbs"] = copy_bandwidth_gbs(device, timer, args.small)
        print(f"\n## Quantization kernels (copy bandwidth ceiling: {out['copy_gbs']:.0f} GB/s, torch.clone)\n")
        out["kernels"] = time_kernels(args, device, timer, out["copy_gbs"], kernel_deadline)
        print(markdown_table(["kernel", "operand", "ms", "GB/s", "of copy"], out["kernels"]), flush=True)
    if device == "cpu":
        print("\n(CPU smoke test: the numbers above are not performance measurements.)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # Before anything defines the Triton kernels: on CPU they run interpreted.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/linear.py: no CUDA GPU is available; run with --device cpu --small for a CPU smoke test")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
