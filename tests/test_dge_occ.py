"""DGE against its closed form and finite differences; OCC against a sort-based oracle."""
import math

import numpy as np
import pytest
import torch

from fp4compile import dge_grad_scale, occ_clamp

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def surrogate(x: float, k: float) -> float:
    """The smooth step f(x) of SPEC.md section 3, written independently."""
    a = abs(x)
    for lo, hi in zip(GRID, GRID[1:]):
        if lo <= a <= hi:
            d = hi - lo
            t = 2 * (a - lo) / d - 1
            f = lo + d / 2 * (1 + math.copysign(abs(t) ** (1 / k), t))
            return math.copysign(f, x)
    return math.copysign(6.0, x)


@pytest.mark.parametrize("k", [3.0, 5.0, 8.0])
def test_dge_at_grid_points_is_one_over_k(k):
    pts = torch.tensor([g * s for g in GRID[1:] for s in (1, -1)], dtype=torch.float64)
    assert torch.allclose(dge_grad_scale(pts, k=k), torch.full_like(pts, 1 / k), rtol=0, atol=1e-15)


def test_dge_cap_at_midpoints_and_zero_outside():
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25], dtype=torch.float64)
    assert torch.equal(dge_grad_scale(mids, k=5.0, clamp=3.0), torch.full_like(mids, 3.0))
    near = mids + 1e-9
    assert torch.equal(dge_grad_scale(near, k=5.0, clamp=3.0), torch.full_like(mids, 3.0))
    outside = torch.tensor([6.0001, -7.0, 100.0], dtype=torch.float64)
    assert torch.equal(dge_grad_scale(outside), torch.zeros(3, dtype=torch.float64))
    assert math.isnan(dge_grad_scale(torch.tensor([float("nan")])).item())
    assert math.isinf(dge_grad_scale(torch.tensor([0.25]), clamp=None).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dge_products_by_the_reciprocal_spacing_give_the_divisions_bits(dtype):
    """DGE multiplies by 1/d (d = 0.5, 1, 2) where SPEC divides by d: the same bits, everywhere."""

    def spec_form(x, k=5.0, cap=3.0):  # SPEC section 3 as written, with its divisions
        a = x.abs()
        a6 = a.clamp(max=6.0)
        d = torch.where(a6 < 2, 0.5, torch.where(a6 < 4, 1.0, 2.0)).to(dtype)
        lo = torch.where(a6 < 4, torch.floor(a6 / d) * d, torch.full_like(a6, 4.0))
        slope = ((2.0 * (a - lo) / d - 1.0).abs().pow(1.0 / k - 1.0) / k).clamp(max=cap)
        slope = torch.where(a > 6.0, torch.zeros_like(slope), slope)
        return torch.where(x != x, x, slope)

    gen = torch.Generator().manual_seed(3)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    x = torch.cat([torch.linspace(-7, 7, 100001, dtype=dtype), torch.randn(50000, generator=gen, dtype=dtype) * 3,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), tiny, 2.0, 4.0, 6.0], dtype=dtype)])
    got, want = dge_grad_scale(x), spec_form(x)
    int_dtype = torch.int32 if dtype == torch.float32 else torch.int64
    same = (got.view(int_dtype) == want.view(int_dtype)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:5]


def test_dge_matches_finite_differences_of_surrogate():
    gen = torch.Generator().manual_seed(0)
    xs = (torch.rand(400, generator=gen, dtype=torch.float64) * 12 - 6)
    h = 1e-7
    for k in (5.0, 3.0):
        got = dge_grad_scale(xs, k=k, clamp=None)
        for x, g in zip(xs.tolist(), got.tolist()):
            a = abs(x)
            if any(abs(a - m) < 1e-3 for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)) or any(abs(a - p) < 1e-6 for p in GRID):
                continue  # derivative singular at midpoints; one-sided at grid points
            fd = (surrogate(x + h, k) - surrogate(x - h, k)) / (2 * h)
            assert abs(fd - g) <= 1e-4 * max(1.0, abs(g)), (x, fd, g)


def _oracle_thresholds(row: np.ndarray, alpha: float):
    # numpy's default (linear) quantile, never crossing zero.
    return max(np.quantile(row, alpha), 0.0), min(np.quantile(row, 1 - alpha), 0.0)


@pytest.mark.parametrize("alpha", [0.999, 0.99, 0.97])
@pytest.mark.parametrize("shape", [(4, 100), (7, 1024), (3, 333)])
def test_occ_row_matches_sort_oracle_and_sums_exactly(alpha, shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=gen)
    x[:, :3] *= 40
    clamped, residual = occ_clamp(x, alpha=alpha)
    assert torch.equal(clamped + residual, x)
    for r in range(shape[0]):
        hi, lo = _oracle_thresholds(x[r].double().numpy(), alpha)
        row = x[r].double().numpy()
        # Thresholds agree with numpy to rounding; entries within that of a
        # threshold may go either way, so they are left out of the comparison.
        ambiguous = (np.abs(row - hi) < 1e-5 * abs(hi)) | (np.abs(row - lo) < 1e-5 * abs(lo))
        beyond = ((row > hi) | (row < lo)) & ~ambiguous
        assert not ambiguous.any() or ambiguous.sum() <= 2
        np.testing.assert_array_equal((residual[r].numpy() != 0)[~ambiguous], beyond[~ambiguous])
        inside = ~beyond & ~ambiguous
        np.testing.assert_array_equal(clamped[r].numpy()[inside], row[inside].astype(np.float32))
        # Clamped entries sit at the threshold to within half an ulp of x.
        c = clamped[r].double().numpy()[beyond]
        t = np.where(row[beyond] > hi, hi, lo)
        assert np.all(np.abs(c - t) <= np.spacing(np.abs(row[beyond]).astype(np.float32)) + 1e-5 * np.abs(t))
        # About (1 - alpha) of each side is clamped, as with torch.quantile.
        c_side = (shape[1] - 1) - math.floor(alpha * (shape[1] - 1) + 1e-9)
        assert (residual[r] != 0).sum().item() <= 2 * c_side


def test_occ_exact_sum_on_extreme_outliers_float32():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(500, 512, generator=gen)
    x[:, :6] *= torch.logspace(1, 30, 6)
    clamped, residual = occ_clamp(x, alpha=0.99)
    assert torch.equal(clamped + residual, x)
    c_side = 511 - math.floor(0.99 * 511)
    assert (residual != 0).sum(-1).max().item() <= 2 * c_side


def test_occ_tensor_scope_and_special_values():
    x = torch.randn(8, 64)
    clamped, residual = occ_clamp(x, alpha=0.97, scope="tensor")
    assert torch.equal(clamped + residual, x)
    c_side = (x.numel() - 1) - math.floor(0.97 * (x.numel() - 1))
    assert 0 < (residual > 0).sum().item() <= c_side and 0 < (residual < 0).sum().item() <= c_side
    upper = torch.quantile(x.flatten(), 0.97)
    assert torch.allclose(clamped.max(), upper, rtol=1e-6)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    c, r = occ_clamp(x, alpha=0.97)
    assert math.isnan(c[0, 0].item())
    assert math.isinf(r[1, 1].item()) and math.isfinite(c[1, 1].item())
    # Thresholds never cross zero: an all-positive row is never clamped upward.
    pos = torch.rand(4, 100) + 1.0
    c, r = occ_clamp(pos, alpha=0.9)
    assert (r >= 0).all()


def test_occ_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        occ_clamp(torch.randn(2, 8), alpha=1.0)
    with pytest.raises(ValueError, match="scope"):
        occ_clamp(torch.randn(2, 8), scope="col")


def test_occ_index_is_integer_arithmetic_no_recompile_per_shape():
    counts = []

    def backend(gm, example_inputs):
        counts.append(1)
        return gm.forward

    fn = torch.compile(lambda t: occ_clamp(t, alpha=0.99)[0], backend=backend, dynamic=True)
    for n in (64, 100, 300, 1000, 1234, 2000, 4096):
        fn(torch.randn(3, n))
    # At most two graphs (dynamo may specialise a size that equals 1 on the first
    # shapes); a float index would compile once per n.
    assert len(counts) <= 2
