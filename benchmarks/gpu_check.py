"""`make gpu-check`: everything the CUDA path needs checked on a GPU, in one bounded run.

Why it exists: a GPU is lent to this project only now and then, for minutes.
This script is the one prepared run: it needs no installs (torch and triton as
found, the tree on PYTHONPATH) and ends in about 8 minutes on one H100/H200:

1. the CUDA tests (`pytest -m cuda` over the CUDA test files);
2. `benchmarks/linear.py`: the five standard shapes x bf16, fp8, fp4-direct,
   paper (fwd + bwd; paper's OCC compensation folded into the FP8 activation
   codes, the CUDA lowering's default, and the report says whether the
   compiled code ran the folded kernel), and the quantization kernels'
   bandwidth against a copy (the folded activation kernel among them), each
   measured time printed beside the roofline PREDICTION
   (`fp4compile.inspection.roofline`); `--channels` adds paper on the exact
   channel-GEMM path (`paper:channels`), predicted at the coverage of the
   benchmark's input;
3. one training step (fwd + bwd + AdamW) of a 360M-parameter Llama, BF16 and
   `paper`, blocks compiled one by one.

Each phase has its own time budget; what does not fit is reported as not run.
With $OUT set it writes gpu_check.json and gpu_check.md there (device name,
torch and triton versions, date, every figure). Without CUDA it exits with
status 2 and one line saying so.

    PYTHONPATH=. python3 benchmarks/gpu_check.py           # or: make gpu-check
    bash scripts/gpu_check.sh                              # the same, logged to $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_CUDA_MESSAGE = ("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                   "run it on a GPU machine, see DEVELOPERS.md")
CUDA_TEST_FILES = ("tests/test_cuda_path.py", "tests/test_triton_kernels.py", "tests/test_triton_folded.py")
# The training-step model: 28 blocks of the gpu-350m preset's width, 360M
# parameters (the gpu-350m preset itself has 309M); dims in this file so the
# presets stay as they are.
TRAIN_DIMS = dict(dim=1024, n_layers=28, n_heads=16, ffn_dim=2816, max_seq_len=1024)
TRAIN_BATCH = (8, 1024)  # sequences x tokens per step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-budget", type=float, default=120, help="seconds for the CUDA tests (default 120)")
    parser.add_argument("--linear-budget", type=float, default=170,
                        help="seconds for the linear-layer table (default 170; a shape started in time runs to its end)")
    parser.add_argument("--kernel-budget", type=float, default=40, help="seconds for the kernel table (default 40)")
    parser.add_argument("--train-budget", type=float, default=110, help="seconds for the training step (default 110)")
    parser.add_argument("--iters", type=int, default=20, help="timed steps per linear variant (default 20)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: tests, linear, train")
    parser.add_argument("--channels", action="store_true",
                        help="also time paper with cuda_compensation='channels' (the exact channel-GEMM path)")
    return parser.parse_args(argv)


def run_cuda_tests(budget: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TEST_FILES]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=budget)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), 124
    lines = [line for line in out.splitlines() if line.strip()]
    summary = lines[-1] if lines else "(no output)"
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(cmd), "returncode": rc, "summary": summary, "failures": failures,
            "seconds": time.monotonic() - start, "tail": "\n".join(lines[-40:])}


def run_linear(args) -> dict:
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import linear

    from fp4compile.inspection import roofline

    recipes = ["fp8", "fp4-direct", "paper"] + (["paper:channels"] if args.channels else [])
    largs = linear.parse_args(["--iters", str(args.iters), "--warmup", "5", "--recipes", ",".join(recipes)])
    now = time.monotonic()
    measured = linear.run(largs, linear_deadline=now + args.linear_budget,
                          kernel_deadline=now + args.linear_budget + args.kernel_budget)
    shapes = [tuple(s) for s in largs.shapes]
    # PREDICTIONS: paper as built (folded compensation, independent of the data) and,
    # with --channels, the channel path at the coverage of the benchmark's Gaussian
    # input (its OCC residual is spread over the channels).
    predicted = {tuple(r["shape"]): r for r in roofline.ratio_table(roofline.predict(shapes=shapes))}
    channels = {}
    if args.channels:
        for shape in shapes:
            cov = gaussian_coverage(shape[0], shape[1])
            (r,) = roofline.ratio_table(roofline.predict(["bf16", "paper"], [shape], coverage=cov,
                                                         compensation="channels"))
            channels[shape] = (cov, r["recipes"]["paper"])
    rows = []
    for shape in shapes:
        got = measured["linear"].get(shape, {})
        base = got.get("bf16")
        base_ms = base[0] if isinstance(base, tuple) else None
        for recipe in ["bf16", *recipes]:
            if recipe == "paper:channels":
                cov, p = channels[shape]
            else:
                cov, p = None, predicted[shape]["recipes"][recipe]
            row = {"shape": list(shape), "recipe": recipe, "predicted_ms": p["ms"],
                   "predicted_ratio": p["ratio_to_bf16"]}
            if cov is not None:
                row["input_coverage"] = cov
            cell = got.get(recipe)
            if isinstance(cell, tuple):
                row.update(measured_ms=cell[0], fp8_gemm=cell[1], folded_kernel=cell[2],
                           measured_ratio=(base_ms / cell[0]) if base_ms else None)
            else:
                row["measured"] = cell
            rows.append(row)
    return {"rows": rows, "copy_gbs": measured["copy_gbs"],
            "kernels": [list(r) for r in measured["kernels"]]}


def gaussian_coverage(m: int, k: int) -> float:
    """Share of the row-scope OCC residual entries (alpha 0.99) of a Gaussian [m, k] in its top-|C| channels."""
    import torch

    from fp4compile.lowering import cuda_compensation as cc
    from fp4compile.runtime.linear_ops import occ_clamp_op

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    _, values, index = occ_clamp_op(x, 99, 100, "row")
    rows, cols, vals, _, kk = cc.residual_entries(values, index, x.shape)
    counts = cc.residual_column_counts(cols, vals, kk)
    chosen = cc.select_channels(counts, cc.channel_cap(kk))
    return float(counts[chosen].sum() / counts.sum().clamp(min=1))


def run_train_step(budget: float) -> dict:
    import torch

    import fp4compile  # noqa: F401  (registers the backends)
    from fp4compile.training.models.llama import Llama, LlamaConfig, param_count

    deadline = time.monotonic() + budget
    results = {"dims": TRAIN_DIMS, "batch": list(TRAIN_BATCH)}
    for variant in ("bf16", "paper"):
        # A variant needs a compile (tens of seconds) and 4 steps: start it only with 45 s left.
        if time.monotonic() > deadline - 45:
            results[variant] = "not run: time budget spent"
            continue
        try:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = Llama(LlamaConfig(**TRAIN_DIMS)).to("cuda", torch.bfloat16)
            results["params"] = param_count(model)
            for block in model.layers:  # one graph serves every block
                if variant == "bf16":
                    block.compile(backend="inductor")
                else:
                    block.compile(backend="fp4", options={"recipe": variant, "cuda_size_policy": False})
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            idx = torch.randint(0, model.config.vocab_size, TRAIN_BATCH, device="cuda")

            def step(model=model, opt=opt):
                logits = model(idx)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            t0 = time.monotonic()
            loss = step()  # compiles
            torch.cuda.synchronize()
            compile_s = time.monotonic() - t0
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                loss = step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            ms = sorted(times)[1]
            results[variant] = {"first_step_s": compile_s, "step_ms": ms,
                                "tokens_per_s": TRAIN_BATCH[0] * TRAIN_BATCH[1] / (ms * 1e-3),
                                "loss": float(loss), "finite": bool(torch.isfinite(loss))}
            del model, opt
            torch.cuda.empty_cache()
        except Exception as exc:  # a failing variant is a result, not the end of the check
            results[variant] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return results


def _fmt(v, spec=".3f"):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, (int, float)) else ("" if v is None else str(v))


def markdown_report(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu-check: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}", ""]
    tests = report.get("tests")
    if tests:
        lines += ["## CUDA tests", "", f"`{tests['command']}`: {tests['summary']} (rc {tests['returncode']})", ""]
        lines += [f"- {f}" for f in tests["failures"]] + [""]
    lin = report.get("linear")
    if lin:
        lines += ["## One linear layer fwd+bwd: measured beside the roofline PREDICTION", "",
                  "paper: OCC compensation folded into the FP8 activation codes (the default); "
                  "paper:channels: the exact channel-GEMM path, predicted at the input's channel coverage.", "",
                  "| M,K,N | recipe | measured ms | measured x BF16 | predicted ms | predicted x BF16 "
                  "| FP8 GEMM | folded kernel |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in lin["rows"]:
            predicted = _fmt(r["predicted_ratio"], ".2f") + (
                f" (coverage {r['input_coverage']:.3f})" if "input_coverage" in r else "")
            lines.append("| " + " | ".join([
                ",".join(map(str, r["shape"])), r["recipe"], _fmt(r.get("measured_ms", r.get("measured"))),
                _fmt(r.get("measured_ratio"), ".2f"), _fmt(r["predicted_ms"]), predicted,
                _fmt(r.get("fp8_gemm")), _fmt(r.get("folded_kernel"))]) + " |")
        lines += ["", f"Copy bandwidth (torch.clone, read + write): {_fmt(lin['copy_gbs'], '.0f')} GB/s; "
                  "the prediction assumes 4300.", "",
                  "| kernel | operand | ms | GB/s | of copy |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(map(str, k)) + " |" for k in lin["kernels"]]
        lines.append("")
    train = report.get("train")
    if train:
        lines += ["## Training step (fwd + bwd + AdamW)", "",
                  f"Llama {train['dims']}, {train.get('params', '?')} parameters, batch {train['batch']}", ""]
        for variant in ("bf16", "paper"):
            lines.append(f"- {variant}: {json.dumps(train.get(variant))}")
        lines.append("")
    lines.append(f"Total {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA_MESSAGE, file=sys.stderr)
        return 2
    import triton

    start = time.monotonic()
    skip = {s for s in args.skip.split(",") if s}
    report = {"environment": {
        "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}
    print(f"gpu-check on {report['environment']}", flush=True)
    if "tests" not in skip:
        report["tests"] = run_cuda_tests(args.test_budget)
        print(report["tests"]["tail"], flush=True)
    if "linear" not in skip:
        report["linear"] = run_linear(args)
    if "train" not in skip:
        report["train"] = run_train_step(args.train_budget)
    report["seconds"] = time.monotonic() - start
    text = markdown_report(report)
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (Path(out) / "gpu_check.md").write_text(text)
        print(f"wrote {out}/gpu_check.json and gpu_check.md")
    failed = report.get("tests", {}).get("returncode", 0) not in (0, 5)  # 5: no test collected
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
