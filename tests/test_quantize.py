"""Quantizers against the independent oracle: exact equality, every tie, saturation,
zero groups, NaN/Inf, subnormal scales, all float dtypes, plus property tests."""
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fp4compile
from fp4compile import fake_quantize, quantize
from fp4compile.runtime.quantize import quantize_gradient

from .oracles import E2M1, E4M3, E5M2, quantize_groups, quantize_nvfp4_tiles, round_grid

TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


def _random_magnitudes(rows, cols, seed, lo=-30, hi=30):
    gen = torch.Generator().manual_seed(seed)
    mant = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    expo = torch.randint(lo, hi, (rows, 1), generator=gen).double()
    return mant * 10.0 ** expo


def _assert_same(actual: torch.Tensor, expected: np.ndarray):
    got = actual.double().numpy()
    assert got.shape == expected.shape
    both_nan = np.isnan(got) & np.isnan(expected)
    assert np.array_equal(np.where(both_nan, 0, got), np.where(both_nan, 0, expected)), (
        f"mismatch at {np.argwhere((got != expected) & ~both_nan)[:5]}"
    )


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (16, 64)])
def test_absmax_matches_oracle(granularity, dtype, shape):
    for seed in range(3):
        x = _random_magnitudes(*shape, seed=seed).to(dtype)
        values, scale = quantize(x, granularity=granularity)
        exp_v, exp_s = quantize_groups(
            x.double().numpy(), shape[1] if granularity == "row" else None, 6.0, E2M1, dtype == torch.float32
        )
        _assert_same(values, exp_v)
        _assert_same(scale.expand_as(values), exp_s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block32_matches_oracle(dtype):
    x = _random_magnitudes(6, 128, seed=1).to(dtype)
    x[2, 32:64] = 0.0
    values, scale = quantize(x, granularity="block32")
    exp_v, exp_s = quantize_groups(x.double().numpy(), 32, 6.0, E2M1, dtype == torch.float32, scale_rule=2)
    _assert_same(values, exp_v)
    _assert_same(scale, exp_s)
    assert (values.abs() <= 6).all()
    # Powers of two only (E8M0).
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def test_block16_matches_oracle():
    x = _random_magnitudes(4, 64, seed=2, lo=-3, hi=3)
    values, scale = quantize(x, granularity="block16")
    xn = x.numpy()
    tensor_scale = np.abs(xn).max() / (6 * 448)
    exp_v = np.empty_like(xn)
    exp_s = np.empty_like(xn)
    for r in range(4):
        for c in range(0, 64, 16):
            block = xn[r, c:c + 16]
            s_e4m3 = round_grid(np.abs(block).max() / 6 / tensor_scale, E4M3)
            s = s_e4m3 * tensor_scale
            exp_s[r, c:c + 16] = s
            exp_v[r, c:c + 16] = [round_grid(v / s, E2M1) for v in block]
    _assert_same(values, exp_v)
    _assert_same(scale, exp_s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(5, 32), (3, 2, 48)])
def test_block16_matches_tile_oracle_with_leading_dims(dtype, shape):
    x = _random_magnitudes(math.prod(shape[:-1]), shape[-1], seed=4, lo=-3, hi=3).reshape(shape).to(dtype)
    values, scale = quantize(x, granularity="block16")
    exp_v, exp_s = quantize_nvfp4_tiles(x.double().numpy(), 1, 16, dtype == torch.float32)
    _assert_same(values, exp_v)
    _assert_same(scale, exp_s)


def _random_tiles(shape, seed):
    """Normal values times a per-16x16-tile power of ten, so the tile scales differ widely."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    tiles = (*shape[:-2], shape[-2] // 16, 1, shape[-1] // 16, 1)
    expo = torch.randint(-4, 4, tiles, generator=gen).double()
    return (x.reshape(*shape[:-2], shape[-2] // 16, 16, shape[-1] // 16, 16) * 10.0 ** expo).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(16, 16), (32, 48), (3, 16, 64), (2, 3, 48, 32)])
def test_block16x16_matches_tile_oracle(dtype, shape):
    for seed in range(2):
        x = _random_tiles(shape, seed).to(dtype)
        values, scale = quantize(x, granularity="block16x16")
        assert values.shape == x.shape and scale.shape == x.shape
        exp_v, exp_s = quantize_nvfp4_tiles(x.double().numpy(), 16, 16, dtype == torch.float32)
        _assert_same(values, exp_v)
        _assert_same(scale, exp_s)
        # The same oracle with 1x16 tiles is the block16 rule: the two differ.
        assert not torch.equal(scale, quantize(x, granularity="block16")[1])


def test_block16x16_flush_nan_inf():
    x = _random_tiles((32, 32), seed=5)
    x[:16, :16] *= 1e-12  # E4M3 tile scale underflows: the tile flushes to zeros
    x[0, 0] = float("nan")  # ... but its NaN stays NaN
    x[16, 20] = float("inf")  # an Inf tile gets scale Inf
    x[20, 3] = float("nan")
    values, scale = quantize(x, granularity="block16x16")
    exp_v, exp_s = quantize_nvfp4_tiles(x.numpy(), 16, 16, False)
    _assert_same(values, exp_v)
    _assert_same(scale, exp_s)
    assert (values[1:16, :16] == 0).all() and math.isnan(values[0, 0].item())
    assert math.isinf(scale[16, 20].item()) and not torch.isfinite((values * scale)[16, 20])
    assert math.isnan(values[20, 3].item()) and values[20, 4].item() == exp_v[20, 4]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 48), (2, 64, 16), (3, 2, 16, 32)])
def test_block16x16_transpose_quantizes_alike(dtype, shape):
    x = _random_tiles(shape, seed=7).to(dtype)
    values, scale = quantize(x, granularity="block16x16")
    values_t, scale_t = quantize(x.transpose(-2, -1), granularity="block16x16")
    assert torch.equal(values.transpose(-2, -1), values_t)
    assert torch.equal(scale.transpose(-2, -1), scale_t)
    # Not true of the 1-D blocks (the check can fail).
    v16, _ = quantize(x, granularity="block16")
    v16_t, _ = quantize(x.transpose(-2, -1), granularity="block16")
    assert not torch.equal(v16.transpose(-2, -1), v16_t)


@pytest.mark.parametrize("shape", [(32,), (16, 40), (40, 16), (2, 8, 32)])
def test_block16x16_shape_errors_name_the_shape(shape):
    with pytest.raises(ValueError, match=r"block16x16.*" + re.escape(str(tuple(shape)))):
        quantize(torch.randn(*shape), granularity="block16x16")


@pytest.mark.parametrize("tie, expected", TIES)
def test_every_tie_rounds_to_even_and_symmetric(tie, expected):
    # A row with max 6 has scale exactly 1, so the tie value reaches the rounder unchanged.
    x = torch.tensor([[6.0, tie, -tie]], dtype=torch.float64)
    values, scale = quantize(x)
    assert scale.item() == 1.0
    assert values[0, 1].item() == expected
    assert values[0, 2].item() == -expected


def test_saturation_zero_groups_nan_inf():
    x = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [1.0, float("nan"), -2.0, 6.0], [float("inf"), 1.0, 2.0, 3.0]], dtype=torch.float32
    )
    values, scale = quantize(x)
    assert torch.equal(values[0], torch.zeros(4)) and scale[0].item() == 1.0  # zero group: scale 1
    assert math.isnan(values[1, 1].item())  # NaN stays NaN ...
    assert values[1, 0].item() == 1.0 and values[1, 3].item() == 6.0  # ... and stays local
    deq = values * scale
    assert not torch.isfinite(deq[2]).any()  # an Inf never becomes a finite number
    # Block scales above the grid max saturate at 6 (MX puts the block max in [4, 8)).
    xb = torch.full((1, 32), 7.5)
    assert quantize(xb, granularity="block32")[0].max().item() == 6.0


def test_subnormal_and_huge_scales_stay_finite():
    gen = torch.Generator().manual_seed(11)
    for mag in (1e-30, 1e-40, 1e-44, 1e30, 1e38):
        # Clamped to +-3 so that 1e38 stays below float32's max (3.4e38) instead of
        # overflowing to Inf now and then.
        x = torch.randn(4, 32, generator=gen).clamp(-3, 3) * mag
        values, scale = quantize(x.float())
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.isfinite(values).all()
        for gran in ("tensor", "block32", "block16"):
            v, s = quantize(x.float(), granularity=gran)
            assert torch.isfinite(s).all() and torch.isfinite(v).all()
    # Subnormal float32 inputs still match the oracle exactly.
    x = torch.randn(3, 16) * 1e-44
    values, scale = quantize(x)
    exp_v, _ = quantize_groups(x.double().numpy(), 16, 6.0, E2M1, True)
    _assert_same(values, exp_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(8, 64).to(dtype)
    values, scale = quantize(x)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp_v, _ = quantize_groups(x.double().numpy(), 64, 6.0, E2M1, dtype != torch.float64)
    _assert_same(values, exp_v)
    fq = fake_quantize(x)
    assert fq.dtype == dtype
    assert torch.equal(fq, (values * scale).to(dtype))


def test_e4m3_format_matches_oracle():
    x = _random_magnitudes(4, 40, seed=3)
    values, scale = quantize(x, fmt="e4m3")
    exp_v, exp_s = quantize_groups(x.numpy(), 40, 448.0, E4M3, False)
    _assert_same(values, exp_v)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.randn(2, 32), granularity="col")
    with pytest.raises(ValueError, match="fmt"):
        quantize(torch.randn(2, 32), fmt="e3m2")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(2, 40), granularity="block32")
    with pytest.raises(ValueError, match="floating"):
        quantize(torch.ones(2, 32, dtype=torch.int32))


@pytest.mark.parametrize("fmt, fmax, grid", [("e5m2", 57344.0, E5M2), ("e2m1", 6.0, E2M1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 24), (2, 3, 40)])
def test_quantize_gradient_tensor_matches_oracle(fmt, fmax, grid, dtype, shape):
    # One power-of-two scale: the smallest 2**k >= amax / fmax, found here by a loop.
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 1e-4).to(dtype)
    g.view(-1)[3] = float("nan")
    values, scale = quantize_gradient(g, fmt)
    gd = g.double().numpy()
    amax = np.nanmax(np.abs(gd))
    k = 0
    while 2.0 ** k < amax / fmax:
        k += 1
    while 2.0 ** (k - 1) >= amax / fmax:
        k -= 1
    assert scale.shape == (1,) * len(shape) and scale.item() == 2.0 ** k
    expected = np.vectorize(lambda v: round_grid(v / 2.0 ** k, grid))(gd)
    _assert_same(values, expected)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert np.nanmax(np.abs(expected)) <= fmax


@pytest.mark.parametrize("granularity", ["block16", "block32"])
@pytest.mark.parametrize("fmt", ["e2m1", "e5m2"])
def test_quantize_gradient_blocks_are_quantize_blocks(granularity, fmt):
    g = _random_magnitudes(6, 64, seed=8, lo=-6, hi=0)
    values, scale = quantize_gradient(g, fmt, granularity)
    exp_v, exp_s = quantize(g, granularity, fmt)
    assert torch.equal(values, exp_v) and torch.equal(scale, exp_s) and scale.shape == g.shape
    fmax, grid = (6.0, E2M1) if fmt == "e2m1" else (57344.0, E5M2)
    if granularity == "block16":
        exp_v, exp_s = quantize_nvfp4_tiles(g.numpy(), 1, 16, False, fmax, grid)
    else:  # MX: power-of-two scale 2**(floor(log2 amax) - floor(log2 fmax)), 15 for E5M2
        emax = 2 if fmt == "e2m1" else 15
        exp_v, exp_s = quantize_groups(g.numpy(), 32, fmax, grid, False, scale_rule=emax)
    _assert_same(values, exp_v)
    _assert_same(scale, exp_s)


finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=64))
def test_property_idempotent_symmetric_bounded(vals):
    x = torch.tensor([vals], dtype=torch.float32)
    values, scale = quantize(x)
    # Idempotence: quantizing dequantized grid values changes nothing.
    deq = values * scale
    values2, scale2 = quantize(deq)
    assert torch.equal(values2 * scale2, deq)
    # Sign symmetry.
    neg_values, _ = quantize(-x)
    assert torch.equal(neg_values, -values)
    # Error bound: at most half the local grid step (1 above 4: steps 0.5/1/2) times scale.
    v = (x / scale).abs()
    half_step = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
    err = (x - deq).abs()
    assert (err <= half_step * scale * (1 + 1e-6)).all()


def test_public_api_exports():
    for name in ("quantize", "fake_quantize", "dge_grad_scale", "occ_clamp", "fp4_linear_reference", "Fp4Config"):
        assert hasattr(fp4compile, name)
