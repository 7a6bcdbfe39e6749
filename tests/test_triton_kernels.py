"""Triton kernels against the runtime ops they replace: grid values, scales,
thresholds, residuals and outlier counts must be identical, bit for bit.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1) in a child
process: the variable must be set before the kernels are defined, and this
pytest process may already have imported them without it. The child runs every
check once on fresh random inputs (its seed is in every failure message; set
FP4COMPILE_TEST_SEED to replay one) and reports each check by name; each test
below asserts its own. The interpreter is slow, so rows are few and short.

On a CUDA machine the same inputs also run compiled, with float8 outputs, and
must equal the CPU reference (tests marked cuda).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # the interpreter child: before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
import triton.language as tl  # noqa: E402  (after the skip: the probe kernel below)

REPO_ROOT = Path(__file__).resolve().parent.parent
ALPHAS = {0.999: (999, 1000), 0.99: (99, 100), 0.97: (97, 100)}
# (K, alpha, M, dtype) of the OCC kernel checks: every K with every M and every
# alpha; the input dtype rotates through float32, bfloat16 and float16 (M >= 16
# holds the special rows below).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OCC_CASES = [
    (k, alpha, m, _DTYPES[i % 3])
    for i, (k, m, alpha) in enumerate((k, m, a) for k in (16, 64, 100, 1024) for m in (1, 3, 64) for a in ALPHAS)
]
# The float8 output is checked on a few of them (under the interpreter its
# float8 conversion is not the hardware's; the grid values are the same numbers).
FP8_OUTPUT_CASES = {(100, 0.99, 64), (1024, 0.97, 3), (16, 0.999, 64)}


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------

# The interpreter's bf16 load. Every kernel widens a bf16 input with
# `tl.load(...).to(tl.float32)`. Compiled, that is exact (a 16-bit shift or
# cvt.f32.bf16; subnormals are kept). Triton's CPU interpreter (3.x,
# `triton.runtime.interpreter._convert_float`) widens each of the 254 nonzero
# bf16 subnormals wrongly: it normalises the significand, then clamps the
# exponent at 0 without shifting the significand back (its underflow branch
# skips inputs whose own exponent field is 0). So 0x0001 (2**-133) loads as
# +0.0, 0x8001 as -0.0, 0x0003 (3 * 2**-133) as 2**-127; normal numbers,
# zeros, Inf and NaN load exactly. The kernels and the reference are both
# right; only the interpreter's emulation of the load differs (it made a bf16
# row of zeros and one -2**-133 lose its one clamped entry). Hence, where the
# load is inexact (`_bf16_as_loaded` measures it on all 65536 bit patterns and
# accepts no other deviation):
#   - the random inputs carry no bf16 subnormals: `_activations` and `_weights`
#     turn them into signed zeros, for kernel and reference alike;
#   - `check_occ_subnormal_rows` still feeds bf16 subnormals to the kernels and
#     compares with the reference applied to the values the load delivers.
# Where the load is exact (compiled kernels, a fixed interpreter) both are no-ops.


@triton.jit
def _load_bf16_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.float32))


_BF16_AS_LOADED: dict = {}


def _bf16_as_loaded(device: str):
    """float32 [65536]: bf16 bit pattern i (as uint16) as a kernel's load widens it on
    `device`, or None where that is exact (== `x.float()`).

    Raises unless the only inexact values are the interpreter's (above): nonzero
    subnormals, sign kept, low 16 bits zero (what the kernels' bf16 key search
    assumes), under the interpreter only.
    """
    if device not in _BF16_AS_LOADED:
        from fp4compile.lowering import triton_kernels as tq

        bits = torch.arange(65536, dtype=torch.int32)
        x = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16)
        out = torch.empty(65536, device=device)
        _load_bf16_kernel[(16,)](x.to(device), out, BLOCK=4096)
        loaded = out.cpu()
        got, want = loaded.view(torch.int32), x.float().view(torch.int32)
        wrong = (got != want) & ~(torch.isnan(loaded) & torch.isnan(x.float()))  # any NaN will do
        subnormal = ((bits & 0x7F80) == 0) & ((bits & 0x7F) != 0)
        allowed = subnormal & ((got ^ want) >= 0) & ((got & 0xFFFF) == 0)
        if not (device == "cpu" and tq.interpreting()):
            allowed = torch.zeros_like(allowed)
        if (wrong & ~allowed).any():
            i = int((wrong & ~allowed).nonzero()[0])
            raise AssertionError(
                f"bf16 -> float32 load on {device} is inexact ({int(wrong.sum())} of 65536 bit patterns); "
                f"first 0x{i:04x}: got {loaded[i].item()}, want {x[i].float().item()}"
            )
        _BF16_AS_LOADED[device] = loaded if wrong.any() else None
    return _BF16_AS_LOADED[device]


def _as_loaded(x: torch.Tensor, device: str) -> torch.Tensor:
    """x as the kernels load it on `device`: float32, bf16 through `_bf16_as_loaded`."""
    table = _bf16_as_loaded(device) if x.dtype == torch.bfloat16 else None
    if table is None:
        return x.to(torch.float32)
    return table[x.view(torch.int16).to(torch.int64) & 0xFFFF]


def _exactly_loadable(x: torch.Tensor) -> torch.Tensor:
    """Under an interpreter whose bf16 load is inexact (above): bf16 subnormals -> signed zeros."""
    from fp4compile.lowering import triton_kernels as tq

    if x.dtype != torch.bfloat16 or not tq.interpreting() or _bf16_as_loaded("cpu") is None:
        return x
    b = x.view(torch.int16)
    return torch.where((b & 0x7F80) == 0, b & -32768, b).view(torch.bfloat16)


def _activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows of varied magnitude with outlier channels; with m >= 16, also the special rows.

    Special rows: all zero, one NaN, all NaN, +-Inf, more NaNs than the outlier
    count (the quantile is NaN), all negative, all positive, constant (ties in
    the selection), subnormal, few distinct levels, signed zeros, a row whose
    outliers are ties, one with a single huge entry, rows whose quantile
    interpolates across zero, and one with two +Inf. (Under the interpreter,
    bf16 subnormals become signed zeros: see "The interpreter's bf16 load".)
    """
    row_scale = torch.exp(torch.randn(m, 1, generator=gen) * 2.0)
    x = torch.randn(m, k, generator=gen) * row_scale
    outlier_cols = torch.randint(0, k, (max(1, k // 32),), generator=gen)
    x[:, outlier_cols] *= 1.0 + 60.0 * torch.rand(len(outlier_cols), generator=gen)
    if m >= 3:
        x[1, int(torch.randint(0, k, (1,), generator=gen))] = float("nan")
    if m >= 16:
        x[0] = 0.0
        x[2] = float("nan")
        x[3, :2] = torch.tensor([float("inf"), float("-inf")])
        x[4, : min(k, 12)] = float("nan")
        x[5] = -x[5].abs() - 1e-3
        x[6] = x[6].abs() + 1e-3
        x[7] = 0.75
        x[8] = torch.randn(k, generator=gen) * 1e-41  # float32 subnormals
        x[9] = torch.randint(-3, 4, (k,), generator=gen).float() * 0.5
        x[10] = torch.where(torch.rand(k, generator=gen) < 0.5, -0.0, 0.0)
        x[11, : k // 2] = 7.0
        x[12, 0] = 3e38
        # One value on the other side of zero: the quantile interpolates across zero.
        x[13] = -x[13].abs() - 1e-3
        x[13, 1] = 2.0
        x[14] = x[14].abs() + 1e-3
        x[14, 2] = -2.0
        x[15, :2] = float("inf")  # an infinite c-th largest value
    return _exactly_loadable(x.to(dtype))


def _weights(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen) * 0.02 * torch.exp(torch.randn(n, 1, generator=gen))
    if n >= 8:
        w[0] = 0.0
        w[1, 0] = float("nan")
        w[2, 1] = float("inf")
        w[3] = torch.randn(k, generator=gen) * 1e-42
    return _exactly_loadable(w.to(dtype))


def _subnormal_rows(k: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [8, k] of subnormal magnitude in `dtype` (bfloat16 or float32), the same every run.

    The CI failure (all zero but one -2**-133 in bf16: clamped, residual
    -2**-133, count 1) and its mirror; every subnormal level with both signs
    (the thresholds interpolate between subnormals, the division rounds at
    subnormal spacing, the residual and the scale are subnormal); c + 1 distinct
    subnormals per side in a row of zeros (inner and outer both subnormal);
    subnormals among normal numbers (unclamped, quantized to zero); the largest
    subnormals and smallest normals; an interpolation across zero between
    subnormals; a subnormal row with one huge outlier.
    """
    gen = torch.Generator().manual_seed(709)  # fixed: the check must not depend on the run's seed
    mant_bits = 7 if dtype == torch.bfloat16 else 23
    tiny = 2.0 ** (-126 - mant_bits)  # the smallest subnormal; m * tiny is exact for m < 2**mant_bits
    top = 2**mant_bits - 1

    def levels(n, lo=1):
        return torch.randint(lo, top + 1, (n,), generator=gen).double() * tiny

    def signs(n):
        return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()

    x = torch.zeros(8, k, dtype=torch.float64)
    x[0, 709 % k] = -tiny
    x[1, 3 % k] = tiny
    x[2] = levels(k) * signs(k)
    n = c + 1
    assert 2 * n <= k, (k, c)
    x[3, :n] = torch.arange(1, n + 1, dtype=torch.float64) * 3 * tiny
    x[3, n : 2 * n] = -torch.arange(1, n + 1, dtype=torch.float64) * 5 * tiny
    x[4] = torch.randn(k, generator=gen).to(dtype).double()
    x[4, ::3] = (levels(k) * signs(k))[::3]
    normal = 2.0**-126  # the smallest normal number
    edge = torch.tensor([top * tiny, normal, (top - 1) * tiny, normal * (1 + 2.0**-mant_bits)], dtype=torch.float64)
    x[5] = torch.cat([edge, -edge]).repeat(k // 8 + 1)[:k]
    x[6] = -levels(k, lo=top // 2)
    x[6, :c] = levels(c)  # c positives: the upper quantile lies between a negative and a positive
    x[7] = levels(k) * signs(k)
    x[7, k // 2] = 2.0**127
    y = x.to(dtype)
    if not torch.equal(y.double(), x):
        raise AssertionError("subnormal rows must be exact in the input dtype")
    return y


def _grid_tie_row(grid: torch.Tensor, fmax: float, k: int) -> torch.Tensor:
    """A row with amax == fmax (so the scale is exactly 1) holding every grid value,
    every midpoint between neighbours (ties) and their float32 neighbours, both signs."""
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    vals = torch.cat([vals, -vals, torch.tensor([fmax])])
    assert vals.numel() <= k, (vals.numel(), k)
    row = torch.zeros(k)
    row[: vals.numel()] = vals
    return row


def _fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every non-negative finite value of a float8 dtype, sorted."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    vals = vals[torch.isfinite(vals) & (vals >= 0)]
    return vals.unique().sort().values


E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# ---------------------------------------------------------------------------
# Comparisons.
# ---------------------------------------------------------------------------


def _assert_identical(name: str, got: torch.Tensor, want: torch.Tensor, *, float8_nan_unreliable=False):
    """Same shape and dtype-converted values, NaN where NaN; +0 and -0 count as equal."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    g = got.to(torch.float64) if got.is_floating_point() else got.to(torch.int64)
    w = want.to(torch.float64) if want.is_floating_point() else want.to(torch.int64)
    if float8_nan_unreliable:
        # The interpreter's float8 conversion is not the hardware's (NaN included):
        # with float8 outputs under it, compare only where the reference is a number.
        keep = ~torch.isnan(w)
        g, w = g[keep], w[keep]
    both_nan = torch.isnan(g) & torch.isnan(w) if g.is_floating_point() else torch.zeros_like(g, dtype=torch.bool)
    bad = (g != w) & ~both_nan
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.numel()} differ; first at {idx}: "
            f"got {g[bad][:5].tolist()}, want {w[bad][:5].tolist()}"
        )


def _assert_close_ulps(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float):
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: {got.shape}/{got.dtype} != {want.shape}/{want.dtype}")
    g, w = got.double(), want.double()
    both_nan = torch.isnan(g) & torch.isnan(w)
    bad = ~both_nan & ~((g - w).abs() <= rtol * w.abs()) & (g != w)
    if bad.any():
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.numel()} beyond rtol {rtol}: "
            f"got {g[bad][:5].tolist()}, want {w[bad][:5].tolist()}"
        )


# ---------------------------------------------------------------------------
# Checks, each run against the kernels on one device ("cpu" = interpreter).
# ---------------------------------------------------------------------------


def check_occ_quantize_rows(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    fp8_interp = device == "cpu"
    names = ("values", "scale", "residual", "upper", "lower", "count")
    for k, alpha, m, dtype in OCC_CASES:
        x = _activations(m, k, dtype, gen)
        num, den = ALPHAS[alpha]
        want = tq.occ_quantize_rows_reference(x, num, den)
        if device != "cpu":
            out_dtypes = [torch.float8_e4m3fn]
        elif (k, alpha, m) in FP8_OUTPUT_CASES:
            out_dtypes = [torch.float32, torch.float8_e4m3fn]
        else:
            out_dtypes = [torch.float32]
        for values_dtype in out_dtypes:
            got = tq.occ_quantize_rows(x.to(device), num, den, "e2m1", values_dtype)
            if got[0].dtype != values_dtype or got[2].dtype != torch.float32 or got[5].dtype != torch.int32:
                raise AssertionError(f"output dtypes {[t.dtype for t in got]}")
            for name, g, w in zip(names, got, want):
                _assert_identical(
                    f"K={k} alpha={alpha} M={m} {dtype} -> {values_dtype} {name}",
                    g.cpu(),
                    w,
                    float8_nan_unreliable=fp8_interp and name == "values" and values_dtype != torch.float32,
                )


def check_occ_sparse_residual(gen, device):
    """The sparse residual (values, index) against `_OccClamp`'s: the same entries
    exactly (compared scattered back to dense, and against the dense residual),
    the same width 2c, and the fused quantize-with-sparse-residual variant."""
    from fp4compile.lowering import triton_kernels as tq

    values_dtype = torch.float32 if device == "cpu" else torch.float8_e4m3fn
    for k, alpha, m, dtype in [(100, 0.97, 64, torch.float32), (1024, 0.99, 3, torch.bfloat16),
                               (16, 0.97, 16, torch.float16), (64, 0.999, 1, torch.float32)]:
        x = _activations(m, k, dtype, gen)
        num, den = ALPHAS[alpha]
        upper, lower, r_val, r_idx, count, dense = tq.occ_residual_rows_reference(x, num, den)
        tag = f"K={k} alpha={alpha} M={m} {dtype}"
        got = tq.occ_residual_rows(x.to(device), num, den)
        fused = tq.occ_quantize_rows_sparse(x.to(device), num, den, "e2m1", values_dtype)
        want_q = tq.occ_quantize_rows_reference(x, num, den)
        for variant, (g_up, g_lo, g_val, g_idx, g_count) in [
            ("residual", got),
            ("fused", (fused[4], fused[5], fused[2], fused[3], fused[6])),
        ]:
            if g_val.shape != r_val.shape or g_idx.dtype != torch.int64 or g_val.dtype != torch.float32:
                raise AssertionError(f"{tag} {variant}: {g_val.shape}/{g_idx.dtype} vs {r_val.shape}/int64")
            _assert_identical(f"{tag} {variant} upper", g_up.cpu(), upper)
            _assert_identical(f"{tag} {variant} lower", g_lo.cpu(), lower)
            _assert_identical(f"{tag} {variant} count", g_count.cpu(), count)
            g_dense = tq.sparse_to_dense(g_val.cpu(), g_idx.cpu(), k)
            _assert_identical(f"{tag} {variant} residual", g_dense, dense)
            _assert_identical(f"{tag} {variant} vs topk form", g_dense, tq.sparse_to_dense(r_val, r_idx, k))
        _assert_identical(f"{tag} fused values", fused[0].cpu(), want_q[0])
        _assert_identical(f"{tag} fused scale", fused[1].cpu(), want_q[1])


def check_occ_subnormal_rows(gen, device):
    """Subnormal inputs, thresholds and residuals, bit for bit, whatever the seed.

    bf16 and float32 rows from `_subnormal_rows` through the OCC kernels (dense
    and sparse residual, fused quantization, thresholds) and the row
    quantization. The reference runs on the values the kernels' load delivers:
    the inputs themselves, except bf16 subnormals under an interpreter that
    widens them wrongly (see "The interpreter's bf16 load").
    """
    from fp4compile.lowering import triton_kernels as tq
    from fp4compile.runtime.occ import outliers_per_side

    values_dtype = torch.float32 if device == "cpu" else torch.float8_e4m3fn
    names = ("values", "scale", "residual", "upper", "lower", "count")
    for k, alpha, dtype in [(1024, 0.99, torch.bfloat16), (1024, 0.99, torch.float32),
                            (16, 0.97, torch.bfloat16), (100, 0.999, torch.float32)]:
        num, den = ALPHAS[alpha]
        x = _subnormal_rows(k, outliers_per_side(k, num, den), dtype)
        loaded = _as_loaded(x, device)
        tag = f"subnormal K={k} alpha={alpha} {dtype}" + ("" if torch.equal(loaded, x.float()) else " (as loaded)")
        got = tq.occ_quantize_rows(x.to(device), num, den, "e2m1", values_dtype)
        want = tq.occ_quantize_rows_reference(loaded, num, den)
        for name, g, w in zip(names, got, want):
            _assert_identical(f"{tag} {name}", g.cpu(), w)
        upper, lower, r_val, r_idx, count, dense = tq.occ_residual_rows_reference(loaded, num, den)
        g_up, g_lo, g_val, g_idx, g_count = tq.occ_residual_rows(x.to(device), num, den)
        _assert_identical(f"{tag} sparse upper", g_up.cpu(), upper)
        _assert_identical(f"{tag} sparse lower", g_lo.cpu(), lower)
        _assert_identical(f"{tag} sparse count", g_count.cpu(), count)
        _assert_identical(f"{tag} sparse residual", tq.sparse_to_dense(g_val.cpu(), g_idx.cpu(), k), dense)
        g_up, g_lo = tq.occ_thresholds_rows(x.to(device), num, den)
        _assert_identical(f"{tag} thresholds upper", g_up.cpu(), upper)
        _assert_identical(f"{tag} thresholds lower", g_lo.cpu(), lower)
        got = tq.quantize_rows(x.to(device), "e2m1", values_dtype)
        want = tq.quantize_rows_reference(loaded, "e2m1")
        _assert_identical(f"{tag} quantize_rows values", got[0].cpu(), want[0])
        _assert_identical(f"{tag} quantize_rows scale", got[1].cpu(), want[1])


def check_occ_quantize_rows_e4m3(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    x = _activations(16, 100, torch.float32, gen)
    want = tq.occ_quantize_rows_reference(x, 99, 100, fmt="e4m3")
    got = tq.occ_quantize_rows(x.to(device), 99, 100, "e4m3", torch.float32 if device == "cpu" else torch.float8_e4m3fn)
    for name, g, w in zip(("values", "scale", "residual", "upper", "lower", "count"), got, want):
        _assert_identical(f"e4m3 {name}", g.cpu(), w)


def check_occ_thresholds_rows(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    for k, alpha, m, dtype in [(100, 0.99, 64, torch.float32), (1024, 0.97, 3, torch.bfloat16), (16, 0.999, 16, torch.float16)]:
        x = _activations(m, k, dtype, gen)
        num, den = ALPHAS[alpha]
        got = tq.occ_thresholds_rows(x.to(device), num, den)
        want = tq.occ_thresholds_reference(x, num, den)
        _assert_identical(f"K={k} upper", got[0].cpu(), want[0])
        _assert_identical(f"K={k} lower", got[1].cpu(), want[1])
    # A strided row view (rows of a wider tensor) reads only its own elements.
    wide = _activations(16, 128, torch.float32, gen)
    got = tq.occ_thresholds_rows(wide.to(device)[:, :100], 99, 100)
    want = tq.occ_thresholds_reference(wide[:, :100], 99, 100)
    _assert_identical("strided upper", got[0].cpu(), want[0])
    _assert_identical("strided lower", got[1].cpu(), want[1])


def check_quantize_rows(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    values_dtype = torch.float32 if device == "cpu" else torch.float8_e4m3fn
    cases = [(1, 16, torch.float32), (3, 100, torch.bfloat16), (64, 1024, torch.float32), (16, 64, torch.float16)]
    for n, k, dtype in cases:
        for fmt in ("e2m1", "e4m3"):
            w = _weights(n, k, dtype, gen)
            got = tq.quantize_rows(w.to(device), fmt, values_dtype)
            want = tq.quantize_rows_reference(w, fmt)
            _assert_identical(f"{n}x{k} {dtype} {fmt} values", got[0].cpu(), want[0])
            _assert_identical(f"{n}x{k} {dtype} {fmt} scale", got[1].cpu(), want[1])
    # Every rounding tie of both grids, at scale exactly 1.
    for fmt, grid, fmax in (("e2m1", E2M1_GRID, 6.0), ("e4m3", _fp8_grid(torch.float8_e4m3fn), 448.0)):
        row = _grid_tie_row(grid, fmax, 1024)
        x = torch.stack([row, -row, row * 2.0**-3])  # the last row: a non-unit scale
        got = tq.quantize_rows(x.to(device), fmt, values_dtype)
        want = tq.quantize_rows_reference(x, fmt)
        if not torch.equal(want[1][:2], torch.ones(2, 1)):
            raise AssertionError("tie rows must have scale 1")
        _assert_identical(f"{fmt} ties values", got[0].cpu(), want[0])
        _assert_identical(f"{fmt} ties scale", got[1].cpu(), want[1])


def check_dge_backward(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    for n, k, dtype, dge_k, clamp in [
        (1, 16, torch.float32, 5.0, 3.0),
        (3, 100, torch.bfloat16, 5.0, 3.0),
        (64, 1024, torch.float32, 3.0, None),
        (40, 200, torch.float32, 5.0, 3.0),
    ]:
        w = _weights(n, k, dtype, gen)
        _, scale = tq.quantize_rows_reference(w)
        if n >= 40:
            # Grid points, interval midpoints (the capped pole), both signs, and
            # beyond 6 (saturated: slope 0) under a unit scale set by hand.
            special = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 2.5, 3.0, 5.0, 6.0, 6.5, -0.25, -5.0, -7.0])
            w[8, : special.numel()] = special.to(dtype)
            scale[8] = 1.0
        grad = torch.randn(n, k, generator=gen)
        got = tq.dge_backward(w.to(device), scale.to(device), grad.to(device), dge_k, clamp).cpu()
        want = tq.dge_backward_reference(w, scale, grad, dge_k, clamp)
        # pow is not correctly rounded on either side: one float32 ulp (or one
        # ulp of the output dtype, when the product is rounded to it).
        rtol = 2.5e-7 if dtype == torch.float32 else 2.0**-7
        _assert_close_ulps(f"DGE {n}x{k} {dtype} k={dge_k} clamp={clamp}", got, want, rtol)
        _assert_identical("DGE NaN/zero pattern", torch.isnan(got), torch.isnan(want))
        _assert_identical("DGE zero pattern", got == 0, want == 0)


def check_cast_gradient(gen, device):
    from fp4compile.lowering import triton_kernels as tq

    values_dtype = torch.float32 if device == "cpu" else torch.float8_e5m2
    for r, c in [(1, 16), (3, 100), (64, 1024)]:
        g = torch.randn(r, c, generator=gen) * torch.exp(torch.randn(r, 1, generator=gen) * 3)
        g[0, 0] = 1e-12  # lands on the E5M2 subnormal grid
        if r >= 3:
            g[1, 1] = float("nan")
        fold_rows = torch.rand(r, generator=gen) + 0.1
        fold_cols = torch.rand(c, generator=gen) + 0.1
        for fold, dim in [(None, 1), (fold_cols, 1), (fold_rows, 0)]:
            want = tq.cast_gradient_reference(g, fold, dim)
            got = tq.cast_gradient(g.to(device), None if fold is None else fold.to(device), dim, values_dtype)
            _assert_identical(f"{r}x{c} fold_dim={dim if fold is not None else None} values", got[0].cpu(), want[0])
            _assert_identical(f"{r}x{c} scale", got[1].cpu(), want[1])
        # A transposed view (the weight-gradient GEMM's g.T) comes out contiguous.
        gb = g.to(torch.bfloat16)
        want = tq.cast_gradient_reference(gb.t(), fold_rows, 1)
        got = tq.cast_gradient(gb.to(device).t(), fold_rows.to(device), 1, values_dtype)
        if not got[0].is_contiguous() or got[0].shape != (c, r):
            raise AssertionError(f"transposed cast: shape {tuple(got[0].shape)}, contiguous={got[0].is_contiguous()}")
        _assert_identical(f"{r}x{c} transposed values", got[0].cpu(), want[0])
        _assert_identical(f"{r}x{c} transposed scale", got[1].cpu(), want[1])
    # Power-of-two scales at every edge: exact powers, the next power up, a
    # subnormal amax / 57344 (power of two or not), one that underflows to 0.
    for amax in [57344.0, 57344.0 * 3, 1e-3, 1e-30, 57344.0 * 2.0**-140, 57344.0 * 2.0**-130 * 3, 1e-44, 3e38]:
        g = torch.tensor([[amax, -amax / 3, amax / 7, -amax, 0.0, amax / 1000] * 2], dtype=torch.float32)
        want = tq.cast_gradient_reference(g)
        got = tq.cast_gradient(g.to(device), None, 1, values_dtype)
        _assert_identical(f"amax {amax} scale", got[1].cpu(), want[1])
        _assert_identical(f"amax {amax} values", got[0].cpu(), want[0])
    # Every E5M2 tie at scale 1, an all-zero gradient (scale 1), an Inf (scale Inf).
    ties = _grid_tie_row(_fp8_grid(torch.float8_e5m2), 57344.0, 1024).reshape(8, 128)
    for name, g in [("ties", ties), ("zeros", torch.zeros(4, 32)), ("inf", torch.tensor([[1.0, float("inf")] * 8]))]:
        want = tq.cast_gradient_reference(g)
        got = tq.cast_gradient(g.to(device), None, 1, values_dtype)
        _assert_identical(f"{name} values", got[0].cpu(), want[0])
        _assert_identical(f"{name} scale", got[1].cpu(), want[1])


def check_sparse_compensation(gen, device):
    """The channel compensation's sparse rest (masked by value != 0) against the reference's
    gather-reduce and index_add: float32 sums in another order, so within J * 2**-24 of the
    sum of magnitudes; zero entries must contribute nothing, whatever their index."""
    from fp4compile.lowering import triton_kernels as tq

    for m, j, k, n in [(1, 1, 16, 1), (37, 6, 100, 130), (5, 8, 20000, 24), (17000, 2, 64, 16)]:
        v = torch.randn(m, j, generator=gen)
        v[torch.rand(m, j, generator=gen) < 0.6] = 0.0  # most entries taken by the channel GEMM
        idx = torch.randint(0, k, (m, j), generator=gen)
        idx[v == 0] = k - 1  # any index: a zero entry must not be read
        w = torch.randn(n, k, generator=gen)
        g = torch.randn(n, m, generator=gen)
        for name, got, want, mag in [
            ("matmul", tq.sparse_rows_matmul(v.to(device), idx.to(device), w.to(device).t()),
             tq.sparse_rows_matmul_reference(v, idx, w.t()),
             tq.sparse_rows_matmul_reference(v.abs(), idx, w.t().abs())),
            ("scatter", tq.sparse_rows_scatter(v.to(device), idx.to(device), g.to(device).t(), k),
             tq.sparse_rows_scatter_reference(v, idx, g.t(), k),
             tq.sparse_rows_scatter_reference(v.abs(), idx, g.t().abs(), k)),
        ]:
            bound = (j + 1) * 2.0**-24 * 2 * mag + (m + 1) * 2.0**-24 * mag * (name == "scatter")
            err = (got.cpu().double() - want.double()).abs()
            if got.shape != want.shape or not bool((err <= bound.double()).all()):
                raise AssertionError(f"sparse {name} {m}x{j} K={k} N={n}: max error {err.max().item():.3g}")


CHECKS = {
    "sparse_compensation": check_sparse_compensation,
    "occ_quantize_rows": check_occ_quantize_rows,
    "occ_sparse_residual": check_occ_sparse_residual,
    "occ_subnormal_rows": check_occ_subnormal_rows,
    "occ_quantize_rows_e4m3": check_occ_quantize_rows_e4m3,
    "occ_thresholds_rows": check_occ_thresholds_rows,
    "quantize_rows": check_quantize_rows,
    "dge_backward": check_dge_backward,
    "cast_gradient": check_cast_gradient,
}


def _run_checks(names, device: str, seed: int) -> dict:
    results = {}
    for name in names:
        gen = torch.Generator().manual_seed(seed)
        try:
            CHECKS[name](gen, device)
            results[name] = "ok"
        except Exception as exc:  # reported to the parent, test by test
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


def _child_env(interpret: str) -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = interpret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def interpreter_results():
    """Every check, once, in an interpreter child process: {name: "ok" or the failure}."""
    seed = int(os.environ.get("FP4COMPILE_TEST_SEED", random.randrange(2**31)))
    proc = subprocess.run(
        [sys.executable, __file__, "--seed", str(seed), *CHECKS],
        env=_child_env("1"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter child failed (seed {seed}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return seed, json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_equals_runtime_ops_under_interpreter(interpreter_results, name):
    seed, results = interpreter_results
    assert results[name] == "ok", f"seed {seed}: {results[name]}"


def test_launchers_are_custom_ops_and_trace_into_triton_kernels():
    """Under functionalization (what AOTAutograd hands Inductor) each op becomes
    its Triton kernel calls; checked in a child without the interpreter, on fake
    CPU tensors, so no kernel runs."""
    code = r"""
import torch
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from fp4compile.lowering import triton_kernels as tq

def f(x, w, g):
    v, s, r, u, l, c = tq.occ_quantize_rows(x, 99, 100)
    up, lo = tq.occ_thresholds_rows(x, 99, 100)
    up2, lo2, rv, ri, cnt = tq.occ_residual_rows(x, 99, 100)
    v2, s2, rv2, ri2, u2, l2, c2 = tq.occ_quantize_rows_sparse(x, 99, 100)
    wv, ws = tq.quantize_rows(w)
    d = tq.dge_backward(w, ws, g)
    gv, gs = tq.cast_gradient(g.t(), ws, 1)
    sm = tq.sparse_rows_matmul(rv, ri, w.t())
    sc = tq.sparse_rows_scatter(rv, ri, torch.randn(8, 32), 64)
    return v, s, r, up, rv, ri, v2, rv2, wv, d, gv, gs, sm, sc

x = torch.randn(8, 64, dtype=torch.bfloat16)
w = torch.randn(32, 64)
g = torch.randn(32, 64)
gm = make_fx(dispatch_functionalize(f), tracing_mode="fake")(x, w, g)
n = sum(1 for node in gm.graph.nodes if "triton_kernel_wrapper" in str(node.target))
print("KERNEL_CALLS", n)
for name in ("occ_quantize_rows", "occ_quantize_rows_sparse", "occ_thresholds_rows", "occ_residual_rows",
             "quantize_rows", "dge_backward", "cast_gradient", "sparse_rows_matmul", "sparse_rows_scatter"):
    assert hasattr(torch.ops.fp4compile, name), name
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_child_env("0"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "KERNEL_CALLS 10" in proc.stdout, proc.stdout


def test_launchers_reject_unsupported_inputs():
    from fp4compile.lowering import triton_kernels as tq

    with pytest.raises(ValueError, match="2-D"):
        tq.occ_quantize_rows(torch.zeros(2, 3, 16), 99, 100)
    with pytest.raises(ValueError, match="range"):
        tq.quantize_rows(torch.zeros(1, tq.MAX_ROW_LENGTH + 1))
    with pytest.raises(ValueError, match="fmt"):
        tq.quantize_rows(torch.zeros(2, 16), "e5m2")
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        tq.occ_thresholds_rows(torch.zeros(2, 16, dtype=torch.float64), 99, 100)
    assert tq.supports_row_kernel(16384) and not tq.supports_row_kernel(16385)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_equals_runtime_ops_on_cuda(name):
    """Compiled kernels on the GPU, float8 outputs, against the CPU reference."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the kernels would not be compiled")
    seed = int(os.environ.get("FP4COMPILE_TEST_SEED", random.randrange(2**31)))
    result = _run_checks([name], "cuda", seed)[name]
    assert result == "ok", f"seed {seed}: {result}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the kernel checks (under TRITON_INTERPRET=1 on CPU).")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("checks", nargs="*", default=list(CHECKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("RESULTS " + json.dumps(_run_checks(args.checks, args.device, args.seed)))
