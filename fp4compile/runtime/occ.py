"""Outlier clamping and compensation (OCC) for activations, SPEC.md section 4.

One outlier per token inflates the absmax scale and flushes the rest of the token
to zero. OCC clamps each token (or the whole tensor) to its `alpha` and
`1 - alpha` quantiles before quantizing and keeps the sparse residual, whose
product with the weight is added back in higher precision.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from .formats import is_inf

OCC_SCOPES = ("row", "tensor")


def alpha_fraction(alpha: float) -> tuple[int, int]:
    """alpha as an exact ratio num/den (0.99 -> 99/100) for integer index arithmetic."""
    frac = Fraction(alpha).limit_denominator(1_000_000)
    return frac.numerator, frac.denominator


def outliers_per_side(n, alpha_num: int, alpha_den: int):
    """c: how many values per side lie strictly beyond the alpha quantile of n values.

    With linear interpolation (torch.quantile's and numpy's default) the alpha
    quantile sits at sorted position alpha * (n - 1); the c = (n - 1) -
    floor(alpha * (n - 1)) largest values lie beyond it (ties aside), about
    (1 - alpha) * n + 1. Integer arithmetic: `n` may be a symbolic size under
    torch.compile, and a float `int(0.99 * n)` would specialise on every n.
    """
    return (n - 1) - (alpha_num * (n - 1)) // alpha_den


def occ_thresholds(x: torch.Tensor, alpha_num: int, alpha_den: int, scope: str = "row", with_index: bool = False):
    """Upper and lower clamp thresholds: the alpha and 1 - alpha quantiles.

    Exactly torch.quantile's linear interpolation, found by a top-k of c + 1
    values per side rather than a sort: the quantile lies between the (c + 1)-th
    and the c-th largest value, at the fraction (alpha * (n - 1)) mod 1 of the
    way. The thresholds never cross zero (upper >= 0 >= lower), so clamping only
    ever shrinks magnitudes and never flips a sign.
    """
    flat = x if scope == "row" else x.reshape(-1)
    n = flat.shape[-1]
    c = outliers_per_side(n, alpha_num, alpha_den)
    top, bottom = flat.topk(c + 1, dim=-1), flat.topk(c + 1, dim=-1, largest=False)
    # Interpolation weight (alpha * (n - 1)) mod 1 as an integer ratio: a
    # symbolic size times a tensor stays symbolic (no recompile per size).
    frac_num = (alpha_num * (n - 1)) % alpha_den
    upper = _interpolate(top.values, c, frac_num, alpha_den).clamp(min=0)
    lower = _interpolate(bottom.values, c, frac_num, alpha_den).clamp(max=0)
    # One small [..., 2] buffer for both thresholds (exact: cat copies). Without
    # it Inductor inlines the interpolation into every full-size consumer and
    # then materializes full-size masks and threshold tensors; with it each
    # consumer loads two floats per row (a 1024x704 clamp + quantize: 14.6 ms
    # -> 8.1 ms on 2 CPU cores).
    bounds = torch.cat([upper, lower], dim=-1)
    upper, lower = bounds[..., :1], bounds[..., 1:]
    if scope == "tensor":
        upper = upper.reshape([1] * x.dim())
        lower = lower.reshape([1] * x.dim())
    if not with_index:
        return upper, lower
    # Every clamped entry lies strictly beyond the quantile, so among the first c
    # indices of its side: the sparse residual has at most 2c entries per row
    # (per tensor for scope "tensor"), at these positions.
    index = torch.cat([top.indices[..., :c], bottom.indices[..., :c]], dim=-1)
    return upper, lower, index


def _interpolate(extremes: torch.Tensor, c, frac_num, frac_den: int) -> torch.Tensor:
    """Between the (c + 1)-th and c-th extreme value (sorted outward), at frac_num/frac_den."""
    inner = extremes[..., c:]  # [..., 1]: the (c + 1)-th extreme
    outer = extremes[..., c - 1 : c] if c >= 1 else inner
    return inner + (outer - inner) * frac_num / frac_den


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
    clamped = torch.where(is_clamped & is_inf(x), threshold, clamped)
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
