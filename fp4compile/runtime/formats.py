"""Low-precision number formats: the E2M1 (FP4) grid and the FP8 casts.

E2M1 has no hardware cast on the GPUs fp4compile targets, so rounding to its grid
is written out as arithmetic that Inductor can fuse and that is exact in float32
and float64 alike. FP8 (E4M3, E5M2) uses torch's own casts, which are the
hardware's round-to-nearest-even.
"""
from __future__ import annotations

import torch

# Largest magnitude of each format. E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_MAX = 6.0
E4M3_MAX = 448.0  # torch.float8_e4m3fn
E5M2_MAX = 57344.0  # torch.float8_e5m2

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# Every E2M1 value is exactly representable in FP8 E4M3: that is what lets the FP4
# GEMM run on FP8 tensor cores with no extra error.
FORMATS = ("e2m1", "e4m3")
FORMAT_MAX = {"e2m1": E2M1_MAX, "e4m3": E4M3_MAX, "e5m2": E5M2_MAX}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def is_nan(v: torch.Tensor) -> torch.Tensor:
    """`torch.isnan(v)` written as `v != v` (true only for NaN, IEEE 754).

    Same values, but Inductor's C++ backend vectorizes a comparison while it
    runs `isnan` element by element: on the quantization kernels of a training
    step the difference is about 2.5x (benchmarks/step_time.py --profile).
    """
    return v != v


def is_inf(v: torch.Tensor) -> torch.Tensor:
    """`torch.isinf(v)` as a vectorizable comparison (see `is_nan`)."""
    return v.abs() == float("inf")


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even mantissa, saturating at +-6.

    The grid has three spacings: 0.5 below 2, 1 in [2, 4), 2 from 4 up. Dividing
    the magnitude by its spacing (a power of two: exact), rounding half to even
    (`torch.round`) and multiplying back rounds to the grid, and the tie rule
    falls out: the even multiples of each spacing are exactly the grid values
    whose mantissa bit is 0, so

        0.25 -> 0,  0.75 -> 1,  1.25 -> 1,  1.75 -> 2,  2.5 -> 2,  3.5 -> 4,  5 -> 4

    At a binade's top edge the rounding may land on the next binade's first value
    (1.9 -> 2, 3.9 -> 4), which is itself on the grid. Magnitudes above 6 (and
    Inf) saturate to 6; the sign is copied back, so rounding is symmetric; NaN
    stays NaN. About ten vectorizable operations (half of the former sum of
    seven step functions, on Inductor's C++ backend); `tests/test_quantize.py`
    holds it equal to a float64 nearest-value oracle, ties included.
    """
    a = v.abs()
    spacing = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    q = (torch.round(a / spacing) * spacing).clamp(max=E2M1_MAX)
    q = torch.copysign(q, v)
    return torch.where(is_nan(v), v, q)


def round_fp8(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round to FP8 `fmt` ("e4m3" or "e5m2") and back, saturating at the format max.

    Saturation comes first because torch's E5M2 cast overflows to Inf; callers
    scale so that the max lands on the format max anyway. NaN stays NaN.
    """
    fmax = FORMAT_MAX[fmt]
    clipped = v.clamp(-fmax, fmax)  # clamp keeps NaN
    return clipped.to(FP8_DTYPES[fmt]).to(v.dtype)


def round_to_format(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round values already in a format's range to that format's grid."""
    if fmt == "e2m1":
        return round_e2m1(v)
    if fmt in FP8_DTYPES:
        return round_fp8(v, fmt)
    raise ValueError(f"unknown format {fmt!r}; valid formats: e2m1, e4m3, e5m2")
