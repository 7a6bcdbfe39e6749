"""What folding the OCC compensation into the FP8 activation codes costs numerically.

Why it exists: the CUDA lowering's default (`Fp4Config.cuda_compensation =
"fp8_folded"`, docs/cuda.md) rides the compensation in the forward and
weight-gradient FP8 GEMMs' activation operand, x_comp = E4M3(x_q + r / x_s)
(`fp4compile.runtime.folded.fold_compensation_e4m3`). Non-outlier entries are
unchanged (the E2M1 grid values are exact in E4M3); outlier entries carry
x / x_s at E4M3 precision (3 mantissa bits); a row with |x| > 448 x_s = 74.7 x
its clamp threshold (x_s = threshold / 6) falls back to a power-of-two larger
scale (counted here as "fallback rows"). This measures, on the demo model's activations (the
linear inputs `paper` quantizes, hooked as in benchmarks/outlier_channels.py),
per distinct activation:

- outliers: residual entries (|x| beyond the row's OCC thresholds), and
  saturating: those with |x| > 448 x_s (their rows fall back to 2**e > 1);
- SNR (dB) against x of the dequantized activation: clamped only (no
  compensation), exact compensation (x_q x_s + r), FP8-folded (codes * scale
  of `fold_compensation_e4m3`, the lowering's reference);
- SNR of the compensation term itself (exact r against the folded one).

    python benchmarks/fp8_folded_compensation.py --steps 20 --batch 8 --batches 2 \
        --json benchmarks/results/fp8_folded_compensation_cpu_demo.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from outlier_channels import _quantized_linears, _site_of, measure_init_and_trained  # noqa: E402

from fp4compile.runtime.folded import fold_compensation_e4m3  # noqa: E402
from fp4compile.runtime.occ import occ_split, occ_thresholds  # noqa: E402
from fp4compile.runtime.quantize import quantize  # noqa: E402

E4M3_MAX = 448.0


def _snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (approx - reference).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(reference.pow(2).sum() / noise))


def folded_stats(x: torch.Tensor, num: int, den: int) -> dict:
    """Outlier counts and SNRs of one activation [M, K] (float64) under row-scope OCC."""
    upper, lower = occ_thresholds(x, num, den, "row")
    clamped, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(clamped, "row", "e2m1")  # x_s = amax(clamped row) / 6
    outlier = residual != 0
    saturating = outlier & (x.abs() > E4M3_MAX * x_s)
    exact = x_q * x_s + residual
    folded_codes, folded_scale = fold_compensation_e4m3(x_q, x_s, residual)
    folded = folded_codes * folded_scale
    # The grid values must come through the fold unchanged (E2M1 is a subset of E4M3).
    assert torch.equal(folded[~outlier], (x_q * x_s)[~outlier])
    return {"K": x.shape[-1], "M": x.shape[0], "outliers": int(outlier.sum()), "saturating": int(saturating.sum()),
            "fallback_rows": int((folded_scale > x_s).sum()),
            "max_abs_x_over_x_s": float((x.abs() / x_s).max()),
            "snr_clamped_db": _snr_db(x, x_q * x_s), "snr_exact_db": _snr_db(x, exact),
            "snr_folded_db": _snr_db(x, folded),
            "snr_compensation_term_db": _snr_db(residual, folded - x_q * x_s)}


def measure(model, batches, num, den) -> list:
    captured, hooks = {}, []
    for name, module in _quantized_linears(model):
        def hook(mod, args, name=name):
            captured.setdefault(_site_of(name), args[0].detach().clone())
        hooks.append(module.register_forward_pre_hook(hook))
    rows = []
    try:
        with torch.no_grad():
            for b, (x, _) in enumerate(batches):
                captured.clear()
                model(x)
                for site, act in captured.items():
                    rows.append({"site": site, "batch": b,
                                 **folded_stats(act.reshape(-1, act.shape[-1]).double(), num, den)})
    finally:
        for h in hooks:
            h.remove()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps before the second measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows, loss, start = measure_init_and_trained(args, measure)
    stages = {}
    for r in rows:
        stages.setdefault(r["stage"], []).append(r)
    summary = {}
    for stage, rs in stages.items():
        outliers = sum(r["outliers"] for r in rs)
        summary[stage] = {
            "activations": len(rs), "outliers": outliers, "saturating": sum(r["saturating"] for r in rs),
            "fallback_rows": sum(r["fallback_rows"] for r in rs),
            "max_abs_x_over_x_s": max(r["max_abs_x_over_x_s"] for r in rs),
            **{k: sum(r[k] for r in rs) / len(rs) for k in ("snr_clamped_db", "snr_exact_db", "snr_folded_db",
                                                             "snr_compensation_term_db")},
            "min_snr_folded_db": min(r["snr_folded_db"] for r in rs),
        }
        s = summary[stage]
        print(f"{stage}: {s['activations']} activation batches, {outliers} outlier entries, "
              f"{s['saturating']} saturating (|x| > 448 x_s), {s['fallback_rows']} fallback rows, max |x|/x_s {s['max_abs_x_over_x_s']:.1f}; "
              f"mean SNR dB clamped {s['snr_clamped_db']:.2f}, exact {s['snr_exact_db']:.2f}, "
              f"FP8-folded {s['snr_folded_db']:.2f} (min {s['min_snr_folded_db']:.2f}); "
              f"compensation term {s['snr_compensation_term_db']:.2f}")
    print(f"{time.perf_counter() - start:.0f} s, final training loss {loss:.3f}")
    if args.json:
        def clean(v):
            return None if isinstance(v, float) and math.isinf(v) else (round(v, 4) if isinstance(v, float) else v)
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/fp8_folded_compensation.py " + " ".join(argv or sys.argv[1:]),
                       "settings": vars(args), "final_train_loss": loss, "summary": summary,
                       "rows": [{k: clean(v) for k, v in r.items()} for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
