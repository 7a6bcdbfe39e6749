"""Independent float64 oracles for the quantizers (they call nothing in fp4compile).

Rounding is done by brute force: the nearest of all representable values, ties
broken toward the value with an even mantissa bit. Scale arithmetic is emulated
in numpy float32 (IEEE, correctly rounded) for float32 inputs, so results must
match the code under test bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

# E2M1 magnitudes with their mantissa bit: (value, mantissa_is_odd)
E2M1 = [(0.0, 0), (0.5, 1), (1.0, 0), (1.5, 1), (2.0, 0), (3.0, 1), (4.0, 0), (6.0, 1)]


def _e4m3_values():
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN encoding in e4m3fn
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals.append((v, m & 1))
    return vals


E4M3 = _e4m3_values()


def round_grid(v: float, grid) -> float:
    """Nearest grid magnitude (ties to even mantissa), saturating; NaN stays NaN."""
    if math.isnan(v):
        return math.nan
    a = abs(v)
    best, best_d, best_odd = None, math.inf, 1
    for g, odd in grid:
        d = abs(a - g)
        if d < best_d or (d == best_d and best_odd and not odd):
            best, best_d, best_odd = g, d, odd
    return math.copysign(best, v)


def _div(a, b, f32):
    return float(np.float32(a) / np.float32(b)) if f32 else a / b


def quantize_groups(x: np.ndarray, group_axis_size: int | None, fmax: float, grid, f32: bool, scale_rule="absmax"):
    """Quantize a 2-D float64 array (values given as float64) in groups along the last dim.

    group_axis_size None means the whole tensor is one group.
    Returns (values, scale) arrays of x's shape.
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols = x.shape
    values = np.empty_like(x)
    scales = np.empty_like(x)
    size = cols if group_axis_size is None else group_axis_size
    groups = [(slice(None), slice(None))] if group_axis_size is None else [
        (slice(r, r + 1), slice(c, c + size)) for r in range(rows) for c in range(0, cols, size)
    ]
    for rs, cs in groups:
        block = x[rs, cs]
        finite = np.where(np.isnan(block), 0.0, np.abs(block))
        amax = float(finite.max())
        if scale_rule == "absmax":
            scale = 1.0 if amax == 0 else (math.inf if math.isinf(amax) else _div(amax, fmax, f32))
            if scale == 0:  # underflow of a subnormal amax: the smallest subnormal instead
                scale = float(np.finfo(np.float32).smallest_subnormal) if f32 else 5e-324
        else:  # MX: power of two
            if amax == 0:
                scale = 1.0
            elif math.isinf(amax):
                scale = math.inf
            else:
                scale = 2.0 ** max(-127, min(127, math.floor(math.log2(amax)) - scale_rule))
        scales[rs, cs] = scale
        vals = np.vectorize(lambda v: round_grid(_div(v, scale, f32), grid))(block)
        values[rs, cs] = vals
    return values, scales


def _mul(a, b, f32):
    return float(np.float32(a) * np.float32(b)) if f32 else a * b


def quantize_nvfp4_tiles(x: np.ndarray, tile_rows: int, tile_cols: int, f32: bool, fmax: float = 6.0, grid=E2M1):
    """NVFP4 two-level quantization of `x` (any ndim >= 2) in tiles over the last two dims.

    Tiles of (1, 16) are the "block16" rule, (16, 16) the "block16x16" rule. Loops
    over every tile of every leading index; element (`grid`, E2M1 by default) and
    E4M3 rounding by `round_grid`. Tensor scale `amax_finite / (fmax * 448)` (1 if 0);
    tile scale `E4M3(amax_tile / fmax / tensor_scale) * tensor_scale`; a tile whose E4M3 scale is 0
    becomes zeros (NaN kept) with scale 1; a tile holding an Inf gets scale Inf.
    Returns (values, scale) arrays of x's shape.
    """
    x = np.asarray(x, dtype=np.float64)
    mags = np.where(np.isnan(x), 0.0, np.abs(x))
    finite = mags[np.isfinite(mags)]
    t_amax = float(finite.max()) if finite.size else 0.0
    t_scale = 1.0 if t_amax == 0 else _div(t_amax, fmax * 448.0, f32)
    values = np.empty_like(x)
    scales = np.empty_like(x)
    rows, cols = x.shape[-2:]
    for lead in np.ndindex(*x.shape[:-2]):
        for r in range(0, rows, tile_rows):
            for c in range(0, cols, tile_cols):
                idx = lead + (slice(r, r + tile_rows), slice(c, c + tile_cols))
                tile = x[idx]
                amax = float(mags[idx].max())
                if math.isinf(amax):
                    scale, flushed = math.inf, False
                else:
                    s_e4m3 = round_grid(_div(_div(amax, fmax, f32), t_scale, f32), E4M3)
                    scale = _mul(s_e4m3, t_scale, f32)
                    flushed = scale == 0
                    if flushed:
                        scale = 1.0
                scales[idx] = scale
                if flushed:
                    values[idx] = np.where(np.isnan(tile), np.nan, 0.0)
                else:
                    with np.errstate(invalid="ignore"):  # Inf / Inf scale: NaN, as intended
                        values[idx] = np.vectorize(lambda v: round_grid(_div(v, scale, f32), grid))(tile)
    return values, scales


def _e5m2_values():
    vals = []
    for e in range(31):  # exponent field 31 holds Inf and NaN
        for m in range(4):
            v = (m / 4) * 2.0 ** -14 if e == 0 else (1 + m / 4) * 2.0 ** (e - 15)
            vals.append((v, m & 1))
    return vals


E5M2 = _e5m2_values()
GRIDS = {"e2m1": E2M1, "e4m3": E4M3, "e5m2": E5M2}


def grid_neighbours(a: float, grid) -> tuple[float, float]:
    """The grid magnitudes (lo, hi) with lo <= a <= hi, both equal when a is on the grid.

    Plain enumeration of the explicit grid list; `a` must lie in [0, grid max].
    """
    mags = sorted(g for g, _ in grid)
    lo = max(g for g in mags if g <= a)
    hi = min(g for g in mags if g >= a)
    return lo, hi


def stochastic_round_oracle(v: np.ndarray, noise: np.ndarray, grid) -> np.ndarray:
    """Stochastic rounding of every element of `v` with the uniform `noise` beside it.

    |v| between grid neighbours lo < |v| < hi goes to hi when noise < (|v| - lo) / (hi - lo)
    (compared exactly, in rationals), else to lo; on the grid it stays; above the grid
    max (and Inf) it saturates to the max; the sign is copied back; NaN stays NaN.
    """
    from fractions import Fraction

    v = np.asarray(v, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    gmax = max(g for g, _ in grid)
    mags = sorted(g for g, _ in grid)
    out = np.empty_like(v)
    for i in np.ndindex(v.shape):
        x = float(v[i])
        if math.isnan(x):
            out[i] = math.nan
            continue
        a = abs(x)
        if a >= gmax:
            q = gmax
        else:
            k = np.searchsorted(mags, a, side="right")  # mags[k - 1] <= a < mags[k]
            lo, hi = mags[k - 1], mags[k]
            fraction = (Fraction(a) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
            q = hi if Fraction(float(noise[i])) < fraction else lo
        out[i] = math.copysign(q, x)
    return out


def hadamard_oracle(n: int) -> np.ndarray:
    """Orthonormal Hadamard matrix by its entry formula (-1)**popcount(i & j) / sqrt(n)."""
    return np.array(
        [[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)]
    ) / math.sqrt(n)


def rht_oracle(x: np.ndarray, signs, dim: int, inverse: bool = False) -> np.ndarray:
    """Random Hadamard transform of a float64 array, one block at a time.

    Forward: block b (len(signs) consecutive elements along `dim`) -> sum_i b[i] s[i] H[i, j];
    inverse: b -> s[j] * sum_i b[i] H[j, i].
    """
    x = np.moveaxis(np.asarray(x, dtype=np.float64), dim, -1)
    n = len(signs)
    h = hadamard_oracle(n)
    s = np.asarray(signs, dtype=np.float64)
    out = np.empty_like(x)
    for lead in np.ndindex(*x.shape[:-1]):
        for start in range(0, x.shape[-1], n):
            b = x[lead + (slice(start, start + n),)]
            out[lead + (slice(start, start + n),)] = s * (h @ b) if inverse else (b * s) @ h
    return np.moveaxis(out, -1, dim)
