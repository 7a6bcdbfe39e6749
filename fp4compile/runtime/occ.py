"""Outlier clamping and compensation (OCC) for activations, SPEC.md section 4.

One outlier per token inflates the absmax scale and flushes the rest of the token
to zero. OCC clamps each token (or the whole tensor) to its `alpha` and
`1 - alpha` quantiles before quantizing and keeps the sparse residual, whose
product with the weight is added back in higher precision.
"""
from __future__ import annotations

from fractions import Fraction

import torch

OCC_SCOPES = ("row", "tensor")


def alpha_fraction(alpha: float) -> tuple[int, int]:
    """alpha as an exact ratio num/den (0.99 -> 99/100) for integer index arithmetic."""
    frac = Fraction(alpha).limit_denominator(1_000_000)
    return frac.numerator, frac.denominator


def outliers_per_side(n, alpha_num: int, alpha_den: int):
    """k = ceil((1 - alpha) * n), at least 1, in integer arithmetic.

    `n` may be a symbolic size under torch.compile: integer arithmetic keeps one
    compiled graph for every size (float `int(0.99 * n)` would specialise on n).
    """
    k = ((alpha_den - alpha_num) * n + alpha_den - 1) // alpha_den
    return max(k, 1) if isinstance(k, int) else torch.sym_max(k, 1)


def occ_thresholds(x: torch.Tensor, alpha_num: int, alpha_den: int, scope: str = "row", with_index: bool = False):
    """Upper and lower clamp thresholds: the k-th largest and k-th smallest values.

    This is the nearest-rank quantile with k = ceil((1 - alpha) * n), found by a
    top-k rather than a sort. The thresholds never cross zero (upper >= 0 >=
    lower), so clamping only ever shrinks magnitudes and never flips a sign.
    """
    flat = x if scope == "row" else x.reshape(-1)
    k = outliers_per_side(flat.shape[-1], alpha_num, alpha_den)
    top, bottom = flat.topk(k, dim=-1), flat.topk(k, dim=-1, largest=False)
    upper = top.values[..., -1:].clamp(min=0)
    lower = bottom.values[..., -1:].clamp(max=0)
    if scope == "tensor":
        upper = upper.reshape([1] * x.dim())
        lower = lower.reshape([1] * x.dim())
    if not with_index:
        return upper, lower
    # Every clamped entry lies strictly beyond the k-th value, so among the first
    # k - 1 indices of each side: the sparse residual has at most 2(k - 1) entries
    # per row (per tensor for scope "tensor"), at these positions.
    index = torch.cat([top.indices[..., : k - 1], bottom.indices[..., : k - 1]], dim=-1)
    return upper, lower, index


def occ_split(x: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor):
    """Split x into (clamped, residual) with `clamped + residual == x` exactly.

    For a clamped entry the residual is r = fl(x - t) and the clamped value is
    x - r. If |x| <= 2|t|, x - t is exact (Sterbenz) and the clamped value is t
    itself. Otherwise |r| lies in [|x|/2, |x|], so x - r is exact (Sterbenz
    again) and differs from t by at most half an ulp of x, far below FP4/FP8
    resolution. Either way the pair sums back to x bit for bit, which plain
    `(t, x - t)` does not guarantee (it fails for about 1% of float32 outliers).
    A clamped Inf entry keeps t and puts the Inf in the residual (an Inf that is
    itself the threshold stays unclamped, with a zero residual); NaN entries are not
    clamped (comparisons with NaN are false) and stay NaN.
    """
    is_clamped = (x > upper) | (x < lower)
    threshold = torch.where(x > upper, upper, lower)
    residual = torch.where(is_clamped, x - threshold, torch.zeros_like(x))
    clamped = torch.where(is_clamped, x - residual, x)
    clamped = torch.where(is_clamped & torch.isinf(x), threshold, clamped)
    return clamped, residual


def occ_clamp(x: torch.Tensor, alpha: float = 0.99, scope: str = "row"):
    """Two-sided signed quantile clamp. Returns `(clamped, residual)`.

    `scope="row"`: thresholds per vector along the last dim (per token);
    `scope="tensor"`: one pair of thresholds for the whole tensor.
    """
    if scope not in OCC_SCOPES:
        raise ValueError(f"scope={scope!r} is unknown; valid: {', '.join(OCC_SCOPES)}")
    if not (0.5 < alpha < 1.0):
        raise ValueError(f"alpha={alpha!r} must lie in (0.5, 1)")
    num, den = alpha_fraction(alpha)
    upper, lower = occ_thresholds(x, num, den, scope)
    return occ_split(x, upper, lower)
