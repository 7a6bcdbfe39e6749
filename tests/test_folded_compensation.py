"""The folded OCC compensation (`fp4compile.runtime.folded`) against float64 oracles.

`fold_compensation_e4m3(x_q, x_s, r)` rounds the compensated activation
x_q + r / x_s to E4M3 codes with a per-row power-of-two fallback scale. Checked
here: the E4M3 rounding against a nearest-value search over every E4M3 number
(ties to even); non-outlier entries exact; outlier entries within 2**-4 of
their value; rows with huge synthetic outliers take the smallest power of two
that fits them; the cap at 2**8 and the saturation beyond 448 * 256 * x_s; NaN.
"""
import pytest
import torch

from fp4compile.runtime import folded
from fp4compile.runtime.occ import occ_split, occ_thresholds
from fp4compile.runtime.quantize import quantize


def _e4m3_grid() -> torch.Tensor:
    """Every finite non-negative float8_e4m3fn value, from its bit patterns, in float64."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    return codes.view(torch.float8_e4m3fn).double()


def _oracle_round(v: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value by exhaustive search, ties to the even code, saturating; float64."""
    grid = _e4m3_grid()
    a = v.abs().clamp(max=448.0).reshape(-1, 1)
    dist = (a - grid.reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    candidates = dist == best
    # Of two equidistant codes, the one with an even bit pattern (even mantissa).
    even = (torch.arange(grid.numel()) % 2 == 0).reshape(1, -1)
    pick = torch.where(candidates.sum(1, keepdim=True) > 1, candidates & even, candidates)
    q = grid[pick.float().argmax(dim=1)].reshape(v.shape)
    return torch.where(v != v, v, torch.copysign(q, v))


def test_round_e4m3_equals_nearest_value_search_ties_included():
    grid = _e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # every tie
    gen = torch.Generator().manual_seed(0)
    rand = torch.exp(torch.empty(5000, dtype=torch.float64).uniform_(-12, 7, generator=gen))
    v = torch.cat([grid, mids, rand, torch.tensor([0.0, 447.9, 448.0, 463.9, 464.0, 1e6, float("inf")],
                                                   dtype=torch.float64)])
    v = torch.cat([v, -v])
    want = _oracle_round(v)
    for dtype in (torch.float64, torch.float32):
        vv = v.to(dtype)
        got = folded.round_e4m3(vv).double()
        ref = _oracle_round(vv.double()) if dtype == torch.float32 else want
        assert torch.equal(got, ref)
    # torch's own cast (round to nearest even) agrees where it does not overflow.
    finite = v.abs() <= 448
    assert torch.equal(folded.round_e4m3(v[finite].float()),
                       v[finite].float().to(torch.float8_e4m3fn).float())
    nan = folded.round_e4m3(torch.tensor([float("nan")]))
    assert torch.isnan(nan).all()


def _fold_inputs(m, k, seed, dtype, outlier_scale=30.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(m, 1, generator=gen,
                                                                                      dtype=torch.float64))
    channels = torch.randperm(k, generator=gen)[: max(1, k // 50)]
    x[:, channels] *= outlier_scale
    x = x.to(dtype)
    upper, lower = occ_thresholds(x, 99, 100, "row")
    clamped, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(clamped, "row", "e2m1")
    return x, x_q, x_s, residual


@pytest.mark.parametrize("m,k", [(7, 100), (64, 256), (33, 1000), (3, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_non_outliers_exact_outliers_within_e4m3_bound(m, k, dtype):
    for seed in range(2):
        x, x_q, x_s, residual = _fold_inputs(m, k, seed, dtype)
        codes, scale = folded.fold_compensation_e4m3(x_q, x_s, residual)
        assert codes.dtype == dtype and scale.shape == x_s.shape
        assert torch.equal(_oracle_round(codes.double()), codes.double())  # on the E4M3 grid
        factor = (scale / x_s).double()
        # The factor is a power of two 2**e, 0 <= e <= 8.
        e = torch.log2(factor)
        assert torch.equal(e, e.round()) and bool((e >= 0).all()) and bool((e <= 8).all())
        got = codes.double() * factor  # x_comp / x_s as the codes carry it
        want = x_q.double() + residual.double() / x_s.double()  # exact value, float64
        outlier = residual != 0
        assert outlier.any() and (~outlier).any()
        # Non-outliers: the E2M1 grid value itself, bit for bit.
        assert torch.equal(got[~outlier], x_q.double()[~outlier])
        # Outliers: E4M3 rounding of the (compute-dtype) sum, half an ulp of 2**-3, plus the
        # sum's own rounding in `dtype`.
        eps = torch.finfo(dtype).eps
        bound = folded.fold_error_bound(want, factor) + 2 * eps * want.abs()
        assert ((got - want).abs()[outlier] <= bound[outlier]).all()
        # The folded activation against x itself (float64 oracle: x = clamped + residual exactly).
        x_comp = codes.double() * scale.double()
        clamped_q = x_q.double() * x_s.double()
        assert torch.equal(x_comp[~outlier], clamped_q[~outlier])
        # Rows here hold outliers of at most ~200 x_s: no fallback needed.
        assert bool((factor == 1).all()) or outlier_rows_exceed(want, factor)


def outlier_rows_exceed(want, factor):
    """Every row with a factor above 1 has max|v| > 448 (the fallback fired for a reason)."""
    rows = factor.reshape(-1) > 1
    return bool((want.abs().amax(-1)[rows] > 448).all())


def test_fallback_takes_the_smallest_power_of_two_and_caps_at_eight():
    k = 64
    x_q = torch.zeros(12, k, dtype=torch.float64)
    x_q[:, :8] = torch.tensor([0.5, -0.5, 1.0, 6.0, -6.0, 1.5, 3.0, 4.0], dtype=torch.float64)
    x_s = torch.full((12, 1), 0.25, dtype=torch.float64)
    residual = torch.zeros_like(x_q)
    # Row i: one outlier with v = 6 + r / x_s chosen so that max|v| lands around 448 * 2**j.
    peaks = [100.0, 448.0, 448.5, 896.0, 897.0, 448 * 8 + 1, 448 * 64, 448 * 128 + 3, 448 * 256,
             448 * 256 + 10, 448 * 1024, float("inf")]
    for i, peak in enumerate(peaks):
        x_q[i, 10] = 6.0
        residual[i, 10] = (peak - 6.0) * 0.25 if peak != float("inf") else float("inf")
    codes, scale = folded.fold_compensation_e4m3(x_q, x_s, residual)
    factor = (scale / x_s).reshape(-1)
    want_e = [0, 0, 1, 1, 2, 4, 6, 8, 8, 8, 8, 8]
    assert factor.tolist() == [2.0**e for e in want_e]
    # Grid values stay exact at every factor, the cap included (2**-9 is E4M3's smallest subnormal).
    assert torch.equal(codes[:, :8] * factor.reshape(-1, 1), x_q[:, :8])
    v = x_q[:, 10] + residual[:, 10] / x_s.reshape(-1)
    got = codes[:, 10] * factor
    in_range = v <= 448 * 256
    assert ((got - v).abs()[in_range] <= folded.fold_error_bound(v, factor)[in_range]).all()
    # Beyond 448 * 256 * x_s the code saturates at 448 (the stated bound): error |v| - 448 * 256.
    assert bool((got[~in_range] == 448 * 256).all()) and (~in_range).sum() == 3


def test_fallback_on_real_clamped_rows_with_huge_outliers():
    x, x_q, x_s, residual = _fold_inputs(16, 256, 5, torch.float32)
    x[3, 17] = 5000 * x_s[3, 0] * 6  # far beyond 448 x_s: row 3 must fall back
    x[9, 40] = -1e6 * x_s[9, 0]  # beyond 448 * 256 x_s: row 9 capped and saturated
    upper, lower = occ_thresholds(x, 99, 100, "row")
    clamped, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(clamped, "row", "e2m1")
    codes, scale = folded.fold_compensation_e4m3(x_q, x_s, residual)
    factor = (scale / x_s).reshape(-1)
    v = (x_q.double() + residual.double() / x_s.double())
    amax = v.abs().amax(-1)
    for row in range(16):
        e = int(torch.log2(factor[row]))
        # The smallest e >= 0 (capped at 8) with max|v| / 2**e <= 448.
        smallest = next((j for j in range(9) if amax[row] / 2**j <= 448), 8)
        assert e == smallest
    assert factor[3] > 1 and factor[9] == 256
    outlier = residual != 0
    got = codes.double() * factor.double().reshape(-1, 1)
    assert torch.equal(got[~outlier], x_q.double()[~outlier])
    ok = outlier & (v.abs() <= 448 * 256)
    bound = folded.fold_error_bound(v, factor.double().reshape(-1, 1)) + 2**-23 * v.abs()
    assert ((got - v).abs()[ok] <= bound[ok]).all()
    # The subnormal term is needed: a fallen-back row has outliers below 2**(e - 6).
    assert ((got - v).abs()[ok] > 2.0**-4 * v.abs()[ok]).any()
    assert got[9, 40] == -448 * 256


def test_tensor_scale_uses_one_factor_and_nan_stays_nan():
    x_q = torch.tensor([[6.0, 0.5, float("nan")], [1.0, -6.0, 2.0]])
    x_s = torch.full((1, 1), 2.0)
    residual = torch.tensor([[1000.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    codes, scale = folded.fold_compensation_e4m3(x_q, x_s, residual)
    assert scale.shape == (1, 1) and scale.item() == 4.0  # max|v| = 506 -> e = 1
    assert torch.isnan(codes[0, 2]) and codes[0, 0] * 2 == 512.0 and codes[0, 1] * 2 == 0.5
    with pytest.raises(ValueError, match="row or tensor scale"):
        folded.fold_compensation_e4m3(x_q, torch.ones(2, 3), residual)


def test_folded_activation_reference_composes_the_semantic_steps():
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(1)) * 3
    codes, scale = folded.folded_activation_reference(x, 99, 100)
    upper, lower = occ_thresholds(x, 99, 100, "row")
    clamped, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(clamped, "row", "e2m1")
    want_codes, want_scale = folded.fold_compensation_e4m3(x_q, x_s, residual)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
