"""The differentiable gradient estimator (DGE) for weights, SPEC.md section 3.

Hard quantization is a step function with zero derivative almost everywhere. DGE
replaces each step on a grid interval [a, a + d] by the smooth surrogate

    f(x)  = a + d/2 * (1 + sign(t) * |t| ** (1/k)),   t = 2(x - a)/d - 1
    f'(x) = (1/k) * |t| ** (1/k - 1)

and multiplies the weight gradient by f' evaluated on the scaled weight. f' is
1/k at grid points and grows without bound at interval midpoints, hence the cap.
"""
from __future__ import annotations

import torch

from .formats import E2M1_MAX, e2m1_spacing


def _interval(a_abs: torch.Tensor):
    """Start `a`, width `d` and 1 / d of the E2M1 grid interval holding each magnitude.

    Intervals: [0, 2) in steps of 0.5, [2, 4) in steps of 1, [4, 6] one step of 2.
    d is a power of two, so multiplying by 1 / d gives the quotient's bits
    exactly, without a vector division per element.
    """
    d, per_d = e2m1_spacing(a_abs)
    start = torch.where(a_abs < 4.0, torch.floor(a_abs * per_d) * d, torch.full_like(a_abs, 4.0))
    return start, d, per_d


def dge_surrogate(x_scaled: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """The smooth surrogate f(x) of E2M1 rounding (saturating outside +-6)."""
    a_abs = x_scaled.abs().clamp(max=E2M1_MAX)
    start, d, per_d = _interval(a_abs)
    t = 2.0 * (a_abs - start) * per_d - 1.0
    f = start + d / 2.0 * (1.0 + torch.sign(t) * t.abs() ** (1.0 / k))
    return torch.copysign(f, x_scaled)


def dge_grad_scale(x_scaled: torch.Tensor, k: float = 5.0, clamp: float | None = 3.0) -> torch.Tensor:
    """DGE derivative f'(x) on the scaled domain (`x_scaled = w / scale`).

    1/k at grid points, capped at `clamp` near interval midpoints (None: no cap),
    0 outside [-6, 6] where the quantizer saturates. NaN stays NaN.
    """
    a_abs = x_scaled.abs()
    start, _, per_d = _interval(a_abs.clamp(max=E2M1_MAX))
    t = (2.0 * (a_abs - start) * per_d - 1.0).abs()
    # |t| ** (1/k - 1) is +inf at t == 0 (the midpoint); the cap makes it finite.
    slope = t.pow(1.0 / k - 1.0) / k
    if clamp is not None:
        slope = slope.clamp(max=clamp)
    # NaN stays NaN by propagation alone: a NaN input makes `t` NaN, pow, clamp
    # and the saturation test below keep it. No separate `is_nan(x_scaled)`
    # mask here: the quantizer's forward already computes that same mask, so
    # the partitioner would save it (one bool per weight) for this backward,
    # and Inductor's C++ backend stores and loads bool vectors element by
    # element (storing one cost about 3 ns per weight element, BENCHMARKS.md).
    return torch.where(a_abs > E2M1_MAX, torch.zeros_like(slope), slope)
