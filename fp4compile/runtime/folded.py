"""OCC compensation folded into FP8 E4M3 activation codes: the reference.

Why it exists: on a GPU with FP8 tensor cores the exact OCC compensation
needs GEMMs, gathers and scatters of its own. Folding it into the activation
operand instead, `x_comp = x_q + r / x_s` (x_q the E2M1 grid values of the
OCC-clamped row, x_s its row scale, r = x - clamp(x) the dense residual), and
rounding x_comp to E4M3 lets the forward and weight-gradient GEMMs take it as
their one FP8 operand: the layer runs fp4-direct's three FP8 GEMMs and no
compensation op (SPEC.md section 4 allows the compensation in FP8). This module
is the plain-PyTorch definition the CUDA lowering (`lowering/cuda.py`) and its
Triton kernel (`lowering/triton_kernels.folded_rows`) are tested against.

    v     = x_q + r / x_s                     (compute dtype: float32, float64)
    e     = smallest integer >= 0 with max|v| / 2**e <= 448 (E4M3's max), capped at 8,
            per row for a row scale, over the tensor for a tensor scale (NaN ignored)
    codes = E4M3(v / 2**e)                    round to nearest, ties to even, saturating
    scale = x_s * 2**e                        codes * scale is the compensated activation

Numerics, all stated and tested (tests/test_folded_compensation.py):

- Non-outlier entries are exact: there r = 0 and v = x_q, an E2M1 value
  (0, 0.5 ... 6); times 2**-e for e <= 8 it stays an E4M3 number (E4M3's
  subnormals reach 2**-9 = 0.5 * 2**-8), so `codes * scale == x_q * x_s`.
- Outlier entries carry E4M3's rounding: |codes * 2**e - v| <=
  max(2**-4 |v|, 2**(e - 10)) while |v| <= 448 * 2**e: half an ulp of a
  3-bit mantissa, or half of E4M3's subnormal spacing 2**-9 where v / 2**e
  falls below its smallest normal 2**-6 (`fold_error_bound`).
- Saturation: a row whose max|v| exceeds 448 (an outlier beyond 448 x_s,
  74.7 times the row's clamp threshold x_s * 6) takes the smallest power of
  two 2**e that brings it back to 448, which keeps the row exact up to the
  rounding above. e is capped at 8: entries with |v| > 448 * 256 (|x| beyond
  448 * 256 * x_s, about 19000 times the clamp threshold) saturate to
  +-448 * 256 * x_s, an error of |v| - 448 * 256 in units of x_s.
- No host synchronisation and no data-dependent shape: e is computed on the
  device as eight comparisons, `sum_j [max|v| > 448 * 2**j]`, exact in any
  float format.
- NaN stays NaN (NaN is ignored by the row max); an Inf input saturates.
"""
from __future__ import annotations

import torch

from .formats import E4M3_MAX, is_nan
from .quantize import nan_aware_amax

# Largest fallback exponent: 2**-8 times the smallest non-zero E2M1 value (0.5)
# is 2**-9, E4M3's smallest subnormal, so grid values stay exact up to here.
MAX_FOLD_EXPONENT = 8
# E4M3 (float8_e4m3fn): 3 mantissa bits, smallest normal 2**-6.
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_NORMAL_EXPONENT = -6
# Relative rounding error of an in-range E4M3 value: half an ulp, 2**-(3 + 1);
# below the smallest normal (2**-6) the absolute error is half the subnormal
# spacing 2**-9.
E4M3_RELATIVE_ERROR = 2.0**-4
E4M3_SUBNORMAL_ERROR = 2.0**-10


def fold_error_bound(v: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Largest |codes * factor - v| of an unsaturated entry (|v| <= 448 * factor): see the module docstring."""
    return torch.maximum(E4M3_RELATIVE_ERROR * v.abs(), E4M3_SUBNORMAL_ERROR * factor)


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float8_e4m3fn value, ties to even, saturating at +-448; NaN kept.

    Exact arithmetic, no float8 conversion: the spacing of E4M3 numbers around
    |v| is 2**(b - 3) with b = floor(log2|v|) clamped to E4M3's binades
    [-6, 8] (found by exact comparisons with powers of two; below 2**-6 the
    subnormal spacing 2**-9); dividing by a power of two is exact,
    `torch.round` rounds half to even, and the even multiples of the spacing
    are the codes with an even mantissa. A value that rounds up to the next
    binade lands on its first number, which is on the grid. Same results in
    float32 and float64 (no double rounding through float32), and the same as
    the hardware's round-to-nearest-even. (Comparisons rather than frexp:
    Inductor's C++ backend fails to vectorize frexp's integer exponent in
    float64 kernels.)
    """
    a = v.abs().clamp(max=E4M3_MAX)  # saturate first (Inf too); clamp keeps NaN
    spacing = torch.full_like(a, 2.0 ** (_E4M3_MIN_NORMAL_EXPONENT - _E4M3_MANTISSA_BITS))
    for b in range(_E4M3_MIN_NORMAL_EXPONENT + 1, 9):  # binades -5 .. 8 (448 = 1.75 * 2**8)
        spacing = torch.where(a >= 2.0**b, 2.0 ** (b - _E4M3_MANTISSA_BITS), spacing)
    q = (torch.round(a / spacing) * spacing).clamp(max=E4M3_MAX)
    q = torch.copysign(q, v)
    return torch.where(is_nan(v), v, q)


def fold_exponent(amax: torch.Tensor) -> torch.Tensor:
    """e = smallest integer >= 0 with amax / 2**e <= 448, capped at 8 (amax >= 0, may be Inf).

    Written as a count of exact comparisons, sum_j [amax > 448 * 2**j] for j < 8,
    so it needs no logarithm and rounds nothing.
    """
    e = torch.zeros_like(amax)
    for j in range(MAX_FOLD_EXPONENT):
        e = e + (amax > E4M3_MAX * 2.0**j).to(amax.dtype)
    return e


def fold_compensation_e4m3(x_q: torch.Tensor, x_s: torch.Tensor, residual: torch.Tensor):
    """(codes, scale): the compensated activation x_q * x_s + residual as E4M3 codes times a scale.

    `x_q` [..., K] E2M1 grid values of the clamped activation, `x_s` its row
    scale [..., 1] or tensor scale [1, ..., 1], `residual` [..., K] the dense
    OCC residual. Returns codes on the E4M3 grid (in x_q's dtype; casting them
    to float8_e4m3fn is exact) and `scale = x_s * 2**e`, shaped like x_s. See
    the module docstring for the saturation rule and the error bounds.
    """
    if x_q.shape != residual.shape:
        raise ValueError(f"x_q {tuple(x_q.shape)} and residual {tuple(residual.shape)} must have the same shape")
    if x_s.shape[-1] != 1 or x_s.dim() != x_q.dim():
        raise ValueError(f"the fold needs a row or tensor scale ([..., 1]), got shape {tuple(x_s.shape)}")
    v = x_q + residual / x_s
    amax = nan_aware_amax(v, dim=-1 if x_s.numel() > 1 else None)
    e = fold_exponent(amax)
    factor = torch.exp2(e)
    codes = round_e4m3(v / factor)  # division by a power of two: exact (v is never subnormal-small here)
    return codes, x_s * factor


def folded_activation_reference(x: torch.Tensor, alpha_num: int, alpha_den: int, scope: str = "row",
                                fmt: str = "e2m1", granularity: str = "row"):
    """OCC clamp, quantize and fold, as the semantic ops compute each step: (codes, scale).

    The compute dtype of x (float32, or float64 for float64 input); the steps are
    `occ_thresholds`, `occ_split`, `quantize` and `fold_compensation_e4m3`.
    """
    from .occ import occ_split, occ_thresholds
    from .quantize import compute_dtype, quantize

    x_hp = x.to(compute_dtype(x.dtype))
    upper, lower = occ_thresholds(x_hp, alpha_num, alpha_den, scope)
    clamped, residual = occ_split(x_hp, upper, lower)
    x_q, x_s = quantize(clamped, granularity=granularity, fmt=fmt)
    return fold_compensation_e4m3(x_q, x_s, residual)
