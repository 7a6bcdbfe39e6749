"""Low-precision number formats: the E2M1 (FP4) grid and the FP8 casts.

E2M1 has no hardware cast on the GPUs fp4compile targets, so rounding to its grid
is written out as arithmetic that Inductor can fuse and that is exact in float32
and float64 alike. FP8 (E4M3, E5M2) uses torch's own casts, which are the
hardware's round-to-nearest-even.

Stochastic rounding (the NVFP4 recipe's rounding of gradients) has no cast in
any format, so it is written out as arithmetic for all three grids: the two grid
neighbours of a magnitude come from its binade's spacing, a power of two, which
makes every step exact (`stochastic_round`).
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
# Every format `round_to_format` can round to (E5M2 is for gradients only).
ROUNDING_FORMATS = ("e2m1", "e4m3", "e5m2")
ROUNDING_MODES = ("nearest", "stochastic")
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


def e2m1_spacing(a: torch.Tensor):
    """(spacing, 1 / spacing) of the E2M1 grid at magnitudes `a`: 0.5 below 2, 1 in [2, 4), 2 from 4 up.

    Callers multiply by the reciprocal instead of dividing by the spacing: a
    power-of-two factor that cannot overflow or underflow here (exact), where a
    vector division costs about twenty products.
    """
    spacing = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0)).to(a.dtype)
    per_spacing = torch.where(a < 2.0, 2.0, torch.where(a < 4.0, 1.0, 0.5)).to(a.dtype)
    return spacing, per_spacing


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
    spacing, per_spacing = e2m1_spacing(a)
    q = (torch.round(a * per_spacing) * spacing).clamp(max=E2M1_MAX)
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


# Bit layout of the compute dtypes (`quantize.compute_dtype`): the integer dtype
# of the same width, the mantissa bits and the exponent bias.
_FLOAT_LAYOUT = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _layout(a: torch.Tensor, what: str):
    try:
        return _FLOAT_LAYOUT[a.dtype]
    except KeyError:
        raise ValueError(f"{what} takes float32 or float64 values (the compute dtypes), got {a.dtype}") from None


def _lift_subnormals(a: torch.Tensor, mantissa_bits: int):
    """(a_n, lifted): subnormal magnitudes times 2**(mantissa_bits + 1), into the normal range.

    A power-of-two product is exact, and every subnormal lands in a normal
    binade, so the exponent field of a_n is its true binade.
    """
    lifted = a < torch.finfo(a.dtype).tiny
    return torch.where(lifted, a * 2.0 ** (mantissa_bits + 1), a), lifted


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) of magnitudes `a` > 0 (float32 or float64), as an integer tensor, exactly.

    Read from the bit pattern: the exponent field less the bias, subnormals
    lifted into the normal range first. The same values as `torch.frexp(a)[1] - 1`,
    but integer and comparison ops only: Inductor's C++ backend vectorizes them,
    while it runs frexp element by element (and, on a per-tensor value, once
    per vector iteration of every consumer loop, as a libm call).
    Zero gives a value below every subnormal binade (-bias - mantissa bits - 1);
    Inf and NaN give bias + 1. Callers clamp or mask those.
    """
    int_dtype, mantissa_bits, bias = _layout(a, "floor_log2")
    a_n, lifted = _lift_subnormals(a.abs(), mantissa_bits)
    exponent_field = (a_n.view(int_dtype) >> mantissa_bits) & (2 * bias + 1)
    return exponent_field - bias - torch.where(lifted, mantissa_bits + 1, 0).to(int_dtype)


def power_of_two_ceil(r: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= r, for r >= 0 (float32 or float64), exactly; 0, Inf and NaN pass through.

    On the bit pattern: adding the all-ones mantissa to a finite r carries into
    the exponent unless r's mantissa field is zero (r is a power of two already),
    and clearing the mantissa then leaves the power of two (Inf past the largest
    binade, as exp2 overflows). Subnormals are lifted into the normal range and
    scaled back, both exact. About ten vectorizable ops (see `floor_log2`).
    """
    int_dtype, mantissa_bits, _ = _layout(r, "power_of_two_ceil")
    finite = r < float("inf")  # False for Inf and NaN, which would carry out of the exponent field
    r_n, lifted = _lift_subnormals(torch.where(finite, r, torch.zeros_like(r)), mantissa_bits)
    mantissa_mask = (1 << mantissa_bits) - 1
    up = ((r_n.view(int_dtype) + mantissa_mask) & ~mantissa_mask).view(r.dtype)
    up = torch.where(lifted, up * 2.0 ** -(mantissa_bits + 1), up)
    return torch.where(finite, up, r)


def power_of_two(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**exponent for integer exponents in the normal range of `dtype`, built from bits (exact)."""
    int_dtype, mantissa_bits, bias = _FLOAT_LAYOUT[dtype]
    return ((exponent.to(int_dtype) + bias) << mantissa_bits).view(dtype)


# (mantissa bits, exponent of the smallest normal binade) of the FP8 grids: in the
# binade [2**e, 2**(e+1)) the spacing is 2**(e - mantissa_bits); below the smallest
# normal 2**e_min (subnormals, and 0) it stays 2**(e_min - mantissa_bits).
_FP8_GRID = {"e4m3": (3, -6), "e5m2": (2, -14)}


def _neighbours(a: torch.Tensor, fmt: str):
    """For magnitudes `a` >= 0: the grid value at or below `a`, the spacing to the
    next one up, and the fraction `(a - lo) / spacing` in [0, 1).

    Exact: the spacing is a power of two, so `a / spacing` only shifts the exponent
    (no underflow: the spacing is at most about `a`), its floor is an integer of a
    few bits, and the fraction is a difference of two nearby floats.
    """
    if fmt == "e2m1":
        spacing, per_spacing = e2m1_spacing(a)
        units = a * per_spacing  # a / spacing, exactly
    else:
        mantissa_bits, e_min = _FP8_GRID[fmt]
        # The binade's exponent, clamped to the smallest normal one (0 and the
        # format's subnormals share its spacing). Inf and NaN get a huge but
        # finite spacing: their fraction is NaN, and the caller saturates them.
        spacing_exp = floor_log2(a).clamp(min=e_min) - mantissa_bits
        spacing = power_of_two(spacing_exp, a.dtype)
        units = a * power_of_two(-spacing_exp, a.dtype)  # a / spacing, exactly (both normal powers of two)
    lo_units = torch.floor(units)
    return lo_units * spacing, spacing, units - lo_units


def stochastic_round(v: torch.Tensor, fmt: str, noise: torch.Tensor) -> torch.Tensor:
    """Round `v` stochastically to the grid of `fmt` ("e2m1", "e4m3" or "e5m2").

    `noise` holds uniforms in [0, 1) of `v`'s shape. A magnitude between the grid
    neighbours lo < |v| < hi rounds to hi when `noise < (|v| - lo) / (hi - lo)`, else
    to lo, so P(hi) is that fraction and E[result] = v: the rounding is unbiased
    inside the grid's range (up to the noise's own resolution: float32 uniforms are
    multiples of 2**-24, so P(hi) exceeds the fraction by less than 2**-24).
    Grid values come back unchanged (fraction 0, and noise >= 0). Magnitudes above
    the format max, and Inf, saturate to the max deterministically, so that tail
    is biased toward zero. Absmax scaling puts the amax on the max, so it reaches
    only MX blocks (`quantize`'s "block32", whose block max lands in [4, 8) for
    E2M1) and E4M3-rounded NVFP4 block scales that round down. The sign is copied
    back; NaN stays NaN.
    Elementwise torch ops only, so Inductor fuses it into the surrounding kernel.
    """
    if fmt not in ROUNDING_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(ROUNDING_FORMATS)}")
    if not isinstance(noise, torch.Tensor) or noise.shape != v.shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(
            f"stochastic rounding needs a noise tensor of the values' shape {tuple(v.shape)}, got {got}"
        )
    fmax = FORMAT_MAX[fmt]
    a = v.abs()
    lo, spacing, fraction = _neighbours(a, fmt)
    q = torch.where(noise < fraction, lo + spacing, lo)
    # Above the max (Inf included: its fraction is NaN and its lo Inf) saturate.
    q = torch.where(a > fmax, torch.full_like(q, fmax), q)
    q = torch.copysign(q, v)
    return torch.where(is_nan(v), v, q)


def round_to_format(
    v: torch.Tensor, fmt: str, rounding: str = "nearest", noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Round values already in a format's range to that format's grid.

    rounding="nearest": round to nearest, ties to even (`round_e2m1`, `round_fp8`);
    `noise` must be None. rounding="stochastic": `stochastic_round(v, fmt, noise)`,
    with `noise` uniforms in [0, 1) of `v`'s shape.
    """
    if fmt not in ROUNDING_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(ROUNDING_FORMATS)}")
    if rounding == "stochastic":
        return stochastic_round(v, fmt, noise)
    if rounding != "nearest":
        raise ValueError(f"rounding={rounding!r} is unknown; valid: {', '.join(ROUNDING_MODES)}")
    if noise is not None:
        raise ValueError("noise is only used with rounding='stochastic'")
    if fmt == "e2m1":
        return round_e2m1(v)
    return round_fp8(v, fmt)
