"""Quantization fidelity: how close a quantized tensor is to the original.

The paper's OCC study (SPEC.md section 4) reports cosine similarity, MSE and SNR
of FP4-quantized activations with and without clamping and compensation. The
same table is computed here for any activation: a synthetic one for the demo,
real captured ones for `Inspection.numerics`.
"""
from __future__ import annotations

import math

import torch

from .occ import occ_clamp
from .quantize import fake_quantize

# (label, clamp, compensate, alpha): the rows of the paper's table.
OCC_STUDY = (
    ("no clamp", False, False, None),
    ("clamp 99.9", True, False, 0.999),
    ("clamp+comp 99.9", True, True, 0.999),
    ("clamp+comp 99", True, True, 0.99),
    ("clamp+comp 97", True, True, 0.97),
)


def fidelity(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Cosine similarity, MSE and SNR (dB) of x_hat against x, in float64."""
    a = x.double().reshape(-1)
    b = x_hat.double().reshape(-1)
    err = (a - b).pow(2).sum()
    signal = a.pow(2).sum()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)
    snr = 10 * math.log10(signal.item() / err.item()) if err.item() > 0 else math.inf
    return {"cos": cos.item(), "mse": (err / a.numel()).item(), "snr_db": snr}


def occ_study(x: torch.Tensor, granularity: str = "row", scope: str = "row") -> list[dict]:
    """The paper's OCC fidelity table for one activation tensor [tokens, features]."""
    rows = []
    for label, clamp, compensate, alpha in OCC_STUDY:
        if clamp:
            clamped, residual = occ_clamp(x, alpha=alpha, scope=scope)
            x_hat = fake_quantize(clamped, granularity=granularity)
            if compensate:
                x_hat = x_hat + residual
        else:
            x_hat = fake_quantize(x, granularity=granularity)
        rows.append({"setting": label, "clamp": clamp, "compensate": compensate, "alpha": alpha, **fidelity(x, x_hat)})
    return rows


def format_occ_table(rows: list[dict]) -> str:
    """Markdown in the paper's layout: clamp | compensate | quantile | cos sim | MSE | SNR."""
    lines = [
        "| clamp | compensate | quantile | cos sim | MSE | SNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        quantile = "-" if r["alpha"] is None else f"{100 * r['alpha']:g}"
        lines.append(
            f"| {'yes' if r['clamp'] else 'no'} | {('yes' if r['compensate'] else 'no') if r['clamp'] else '-'} "
            f"| {quantile} | {100 * r['cos']:.2f}% | {r['mse']:.4f} | {r['snr_db']:.2f} |"
        )
    return "\n".join(lines)


def synthetic_activation(tokens: int = 2048, features: int = 1024, outlier_channels: int = 8,
                         outlier_range: tuple = (5.0, 9.0), seed: int = 0) -> torch.Tensor:
    """A Gaussian activation with channel-concentrated outliers, as seen in LLMs.

    Every token carries one outlier of magnitude U(outlier_range) (in units of the
    bulk's standard deviation, random sign) in one of a few outlier channels.
    Such outliers dominate each token's absmax while holding a small share of its
    energy: the regime in which the paper's clamp-only row already helps.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen)
    channels = torch.randperm(features, generator=gen)[:outlier_channels]
    channel = channels[torch.randint(0, outlier_channels, (tokens,), generator=gen)]
    low, high = outlier_range
    magnitude = low + (high - low) * torch.rand(tokens, generator=gen)
    sign = torch.where(torch.rand(tokens, generator=gen) < 0.5, -1.0, 1.0)
    x[torch.arange(tokens), channel] = magnitude * sign
    return x
