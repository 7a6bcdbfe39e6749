"""Stochastic rounding (formats.stochastic_round, quantize(..., rounding="stochastic"))
against the float64 oracle of tests/oracles.py: exact equality for a given noise
tensor, the neighbour property, specials, unbiasedness as a statistical test, and
bit-for-bit reproducibility from a seeded generator."""
import math
import random

import numpy as np
import pytest
import torch

from fp4compile.runtime.formats import FORMAT_MAX, round_to_format, stochastic_round
from fp4compile.runtime.quantize import fake_quantize, quantize, quantize_gradient

from .oracles import GRIDS, grid_neighbours, stochastic_round_oracle

FMTS = ("e2m1", "e4m3", "e5m2")
# log2 of the smallest magnitude drawn per format: a few binades below the smallest
# positive grid value, so the subnormal spacing and rounding to 0 are exercised.
_LOG2_MIN = {"e2m1": -4, "e4m3": -12, "e5m2": -19}
SHAPES = [(7,), (3, 5, 9), (2, 1, 33), (64, 16)]


def _values(shape, fmt, gen, dtype):
    """Signed magnitudes log-uniform over the format's range, with grid values,
    zeros, values above the max, +-Inf and NaN mixed in."""
    n = math.prod(shape)
    lo, hi = _LOG2_MIN[fmt], math.log2(FORMAT_MAX[fmt])
    mags = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64))
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    v = mags * signs
    grid = torch.tensor([g for g, _ in GRIDS[fmt]], dtype=torch.float64)
    specials = [0.0, -0.0, FORMAT_MAX[fmt] * 1.5, -FORMAT_MAX[fmt] * 3, math.inf, -math.inf, math.nan]
    picks = torch.randint(0, n, (min(n, 12),), generator=gen)
    for j, p in enumerate(picks.tolist()):
        if j % 2 == 0:
            v[p] = grid[torch.randint(0, len(grid), (1,), generator=gen)].item() * (-1) ** j
        else:
            v[p] = specials[(j // 2) % len(specials)]
    return v.reshape(shape).to(dtype)


def _assert_same(actual: torch.Tensor, expected: np.ndarray):
    got = actual.double().numpy()
    assert got.shape == expected.shape
    both_nan = np.isnan(got) & np.isnan(expected)
    ok = (got == expected) | both_nan
    # Sign of zero included: copysign keeps -0.
    ok &= np.signbit(got) == np.signbit(expected)
    assert ok.all(), f"mismatch at {np.argwhere(~ok)[:5].tolist()}: {got[~ok][:5]} vs {expected[~ok][:5]}"


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle_with_the_same_noise(fmt, dtype, shape):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    v = _values(shape, fmt, gen, dtype)
    noise = torch.rand(shape, generator=gen, dtype=dtype)
    got = stochastic_round(v, fmt, noise)
    assert got.dtype == dtype
    _assert_same(got, stochastic_round_oracle(v.double().numpy(), noise.double().numpy(), GRIDS[fmt]))
    assert torch.equal(round_to_format(v, fmt, "stochastic", noise).nan_to_num(7.0), got.nan_to_num(7.0))


@pytest.mark.parametrize("fmt", FMTS)
def test_result_is_a_grid_neighbour_and_grid_values_stay(fmt):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    v = _values((400,), fmt, gen, torch.float64)
    v = v[v.abs() <= FORMAT_MAX[fmt]]  # inside the range (NaN drops out too)
    grid = GRIDS[fmt]
    neighbours = [grid_neighbours(abs(x), grid) for x in v.tolist()]
    for extreme in (0.0, 0.5, 1.0 - 2**-53):  # noise at its ends and middle
        got = stochastic_round(v, fmt, torch.full_like(v, extreme)).tolist()
        for x, q, (lo, hi) in zip(v.tolist(), got, neighbours):
            assert abs(q) in (lo, hi) and (q == 0 or math.copysign(1, q) == math.copysign(1, x))
            if lo == hi:  # on the grid: unchanged whatever the noise
                assert q == x
    # Noise 0 always rounds away from zero off the grid, noise near 1 toward it.
    off_grid = torch.tensor([lo != hi for lo, hi in neighbours])
    up = stochastic_round(v, fmt, torch.zeros_like(v)).abs()
    down = stochastic_round(v, fmt, torch.full_like(v, 1.0 - 2**-53)).abs()
    assert (up[off_grid] > v.abs()[off_grid]).all() and (down[off_grid] < v.abs()[off_grid]).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_specials_saturation_and_sign_symmetry(fmt):
    fmax = FORMAT_MAX[fmt]
    v = torch.tensor([math.nan, math.inf, -math.inf, fmax * 1.01, -fmax * 1e3, fmax, -fmax, 0.0, -0.0])
    for noise in (torch.zeros_like(v), torch.rand(v.shape)):
        got = stochastic_round(v, fmt, noise)
        assert math.isnan(got[0].item())
        assert got[1:].tolist() == [fmax, -fmax, fmax, -fmax, fmax, -fmax, 0.0, -0.0]
        assert math.copysign(1, got[-1].item()) == -1.0
    x = torch.randn(1000, dtype=torch.float64) * fmax / 4
    noise = torch.rand(1000, dtype=torch.float64)
    assert torch.equal(stochastic_round(-x, fmt, noise), -stochastic_round(x, fmt, noise))


# Unbiasedness. For a value v strictly between grid neighbours lo < v < hi with
# p = (v - lo) / (hi - lo), the fraction of N independent draws that round up is
# the mean of N Bernoulli(p) variables, so by Hoeffding's inequality
#   P(|fraction_up - p| >= t) <= 2 exp(-2 N t^2).
# With N = 20000 and t = sqrt(ln(2e9) / (2N)) = 0.0231 that is <= 1e-9 per value;
# over the 3 formats x 32 values here the false-failure rate is <= 1e-7 (union
# bound). The check is on |mean(SR(v)) - v| / (hi - lo) = |fraction_up - p|.
# Round-to-nearest has bias min(p, 1 - p) >= 0.05 > t on these values (p is
# drawn in [0.05, 0.95]), so the same check rejects it: the test can fail.
DRAWS = 20000
_T = math.sqrt(math.log(2e9) / (2 * DRAWS))


def _values_inside(fmt, count, gen):
    """Values lo + p * (hi - lo) with p in [0.05, 0.95], across the format's binades."""
    grid = sorted(g for g, _ in GRIDS[fmt])
    idx = torch.randint(0, len(grid) - 1, (count,), generator=gen).tolist()
    p = 0.05 + 0.9 * torch.rand(count, generator=gen, dtype=torch.float64)
    lo = torch.tensor([grid[i] for i in idx], dtype=torch.float64)
    hi = torch.tensor([grid[i + 1] for i in idx], dtype=torch.float64)
    signs = torch.where(torch.rand(count, generator=gen) < 0.5, -1.0, 1.0).double()
    return (lo + p * (hi - lo)) * signs, hi - lo


def _normalized_bias(rounded: torch.Tensor, v: torch.Tensor, spacing: torch.Tensor) -> torch.Tensor:
    return (rounded.mean(dim=0) - v).abs() / spacing


@pytest.mark.parametrize("fmt", FMTS)
def test_unbiased_where_nearest_is_not(fmt):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    v, spacing = _values_inside(fmt, 32, gen)
    many = v.expand(DRAWS, -1)
    noise = torch.rand(many.shape, generator=gen, dtype=torch.float64)
    bias_sr = _normalized_bias(stochastic_round(many, fmt, noise), v, spacing)
    assert (bias_sr < _T).all(), f"seed {seed}: normalized bias {bias_sr.max().item():.4f} >= {_T:.4f}"
    bias_rtn = _normalized_bias(round_to_format(many, fmt), v, spacing)
    assert (bias_rtn >= _T).all()


def test_quantize_stochastic_is_unbiased_in_the_scaled_domain():
    # DRAWS copies of one row: each copy gets the same row scale and its own noise.
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 48, generator=gen, dtype=torch.float64)
    values, scale = quantize(x.expand(DRAWS, -1), "row", rounding="stochastic", generator=gen)
    scaled = (x / scale[0]).squeeze(0)
    lohi = [grid_neighbours(abs(s), GRIDS["e2m1"]) for s in scaled.tolist()]
    spacing = torch.tensor([hi - lo for lo, hi in lohi], dtype=torch.float64)
    p = (scaled.abs() - torch.tensor([lo for lo, _ in lohi], dtype=torch.float64)) / spacing.clamp(min=1e-300)
    inside = (spacing > 0) & (p > 0.05) & (p < 0.95)  # off the grid (the row max is on it)
    bias = _normalized_bias(values, scaled, spacing.clamp(min=1e-300))
    assert inside.sum() > 30
    # Same Hoeffding bound, 48 values: false-failure rate <= 5e-8.
    assert (bias[inside] < _T).all(), f"seed {seed}"
    assert (values.abs().amax(dim=1) == 6).all()  # the row max is on the grid: always 6


def _draws(seed, shape):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize("granularity", ["row", "tensor", "block16", "block32", "block16x16"])
@pytest.mark.parametrize("fmt", FMTS)
def test_quantize_stochastic_uses_one_draw_of_the_generator(granularity, fmt):
    # The uniforms are torch.rand(x.shape, generator) in the compute dtype, drawn
    # once: the oracle rounds x / scale with the same draw and must agree exactly.
    x = torch.randn(2, 32, 64, dtype=torch.float32) * 3
    x[0, 0, :16] *= 1e3
    got, scale = quantize(x, granularity, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(5))
    values_rtn, scale_rtn = quantize(x, granularity, fmt)
    if granularity in ("row", "tensor"):
        assert torch.equal(scale, scale_rtn)  # the max maps to the format max either way
    else:
        # Block scales round up with stochastic rounding, so nothing saturates (a bias).
        assert (scale >= scale_rtn).all() and (scale > scale_rtn).any()
        assert ((x / scale).abs() <= FORMAT_MAX[fmt] * (1 + 2 ** -20)).all()
    scaled = (x / scale).double().numpy()  # float32 division, as quantize does
    _assert_same(got, stochastic_round_oracle(scaled, _draws(5, x.shape).double().numpy(), GRIDS[fmt]))
    assert not torch.equal(got, values_rtn)


def test_stochastic_quantize_reproducible_from_the_seed():
    x = torch.randn(3, 48, 64, dtype=torch.bfloat16)
    for granularity in ("row", "block16", "block16x16", "block32"):
        a = quantize(x, granularity, rounding="stochastic", generator=torch.Generator().manual_seed(123))
        b = quantize(x, granularity, rounding="stochastic", generator=torch.Generator().manual_seed(123))
        c = quantize(x, granularity, rounding="stochastic", generator=torch.Generator().manual_seed(124))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])
    f1 = fake_quantize(x, "block16", rounding="stochastic", generator=torch.Generator().manual_seed(9))
    f2 = fake_quantize(x, "block16", rounding="stochastic", generator=torch.Generator().manual_seed(9))
    assert f1.dtype == torch.bfloat16 and torch.equal(f1, f2)
    # Without a generator torch's global RNG draws the noise: manual_seed reproduces it.
    torch.manual_seed(77)
    g1 = quantize_gradient(x, "e2m1", "block16", rounding="stochastic")
    torch.manual_seed(77)
    g2 = quantize_gradient(x, "e2m1", "block16", rounding="stochastic")
    assert torch.equal(g1[0], g2[0])


@pytest.mark.parametrize("fmt", ["e5m2", "e2m1"])
def test_quantize_gradient_stochastic_tensor_matches_oracle(fmt):
    g = torch.randn(5, 3, 24, dtype=torch.float32) * 1e-3
    values, scale = quantize_gradient(g, fmt, "tensor", "stochastic", torch.Generator().manual_seed(3))
    nearest_values, nearest_scale = quantize_gradient(g, fmt)
    assert torch.equal(scale, nearest_scale) and scale.shape == (1, 1, 1)
    # A power of two (the same rule as round-to-nearest): dividing by it is exact.
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)
    expected = stochastic_round_oracle((g / scale).double().numpy(), _draws(3, g.shape).double().numpy(), GRIDS[fmt])
    _assert_same(values, expected)
    assert not torch.equal(values, nearest_values)


def test_bad_rounding_arguments_raise_clear_errors():
    v = torch.randn(4, 32)
    with pytest.raises(ValueError, match="rounding"):
        quantize(v, rounding="up")
    with pytest.raises(ValueError, match="rounding"):
        round_to_format(v, "e2m1", "truncate")
    with pytest.raises(ValueError, match="noise"):
        round_to_format(v, "e2m1", "stochastic")
    with pytest.raises(ValueError, match="noise"):
        stochastic_round(v, "e4m3", torch.rand(4, 31))
    with pytest.raises(ValueError, match="noise"):
        round_to_format(v, "e2m1", "nearest", torch.rand(4, 32))
    with pytest.raises(ValueError, match="format"):
        stochastic_round(v, "e3m2", torch.rand(4, 32))
    with pytest.raises(ValueError, match="generator"):
        quantize(v, rounding="stochastic", generator=5)
    with pytest.raises(ValueError, match="granularity"):
        quantize_gradient(v, "e2m1", "row")
    with pytest.raises(ValueError, match="fmt"):
        quantize_gradient(v, "e3m2")
    with pytest.raises(ValueError, match="floating"):
        quantize_gradient(torch.ones(4, 32, dtype=torch.int32))


@pytest.mark.parametrize("granularity", ["block16", "block32", "block16x16"])
def test_stochastic_block_scales_are_the_smallest_that_do_not_saturate(granularity):
    """block32: the power of two at or above amax / 6; block16(x16): the E4M3 value at or above
    amax / 6 / tensor_scale (oracle: the explicit E4M3 grid), so the block max lands in (fmax / 2, fmax]."""
    import numpy as np

    from .oracles import E4M3

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(32, 64, generator=gen, dtype=torch.float64) * torch.rand(32, 1, generator=gen,
                                                                               dtype=torch.float64) * 10
    _, scale = quantize(x, granularity, "e2m1", rounding="stochastic", generator=gen)
    if granularity == "block16x16":
        amax = x.reshape(2, 16, 4, 16).abs().amax(dim=(1, 3), keepdim=True).expand(2, 16, 4, 16).reshape(32, 64)
    else:
        b = int(granularity.removeprefix("block"))
        amax = x.reshape(32, -1, b).abs().amax(-1, keepdim=True).expand(32, 64 // b, b).reshape(32, 64)
    if granularity == "block32":
        expected = torch.tensor([2.0 ** math.ceil(math.log2(a / 6)) for a in amax.flatten().tolist()],
                                dtype=torch.float64).reshape(32, 64)
    else:
        tensor_scale = x.abs().max() / (6 * 448)
        grid = np.array(sorted(v for v, _ in E4M3))
        expected = torch.tensor([grid[np.searchsorted(grid, a / 6 / tensor_scale.item() * (1 - 1e-15))]
                                 for a in amax.flatten().tolist()], dtype=torch.float64).reshape(32, 64) * tensor_scale
    torch.testing.assert_close(scale, expected, rtol=1e-14, atol=0)
    assert ((x / scale).abs() <= 6).all()
