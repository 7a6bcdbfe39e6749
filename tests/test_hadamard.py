"""Random Hadamard transform (runtime/hadamard.py) against float64 oracles built
from the entry formula H[i, j] = (-1)**popcount(i & j) / sqrt(n): orthogonality,
exact inversion, the GEMM identity the weight-gradient rotation relies on, seeded
signs, bad sizes; plus one Inductor compile of RHT + stochastic quantization."""
import math

import numpy as np
import pytest
import torch

from fp4compile.runtime.hadamard import (
    hadamard_matrix,
    inverse_random_hadamard_transform,
    random_hadamard_transform,
    rht_signs,
)
from fp4compile.runtime.quantize import quantize

from .oracles import E2M1, E4M3, hadamard_oracle, rht_oracle


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128])
def test_hadamard_matrix_is_the_orthonormal_popcount_matrix(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    np.testing.assert_allclose(h.numpy(), hadamard_oracle(n), rtol=0, atol=1e-15)
    np.testing.assert_allclose((h @ h.T).numpy(), np.eye(n), rtol=0, atol=1e-15)
    # +-1 entries: every |entry| is the same number, the signs are the oracle's exactly.
    assert torch.equal(torch.sign(h), torch.from_numpy(np.sign(hadamard_oracle(n))))
    assert h.abs().unique().numel() == 1
    h32 = hadamard_matrix(n, dtype=torch.float32)
    assert h32.dtype == torch.float32
    np.testing.assert_allclose(h32.double().numpy(), hadamard_oracle(n), rtol=1e-7, atol=0)


@pytest.mark.parametrize("n", [0, 3, 12, -4, 2.0, True])
def test_hadamard_matrix_rejects_non_powers_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(n)


def test_signs_reproducible_from_the_seed():
    for block in (16, 32):
        for seed in (0, 1, 12345):
            signs = rht_signs(block, seed)
            assert isinstance(signs, tuple) and len(signs) == block
            assert all(type(s) is int and s in (-1, 1) for s in signs)
            assert rht_signs(block, seed) == signs
            # The documented recipe: torch's CPU generator seeded with `seed`.
            bits = torch.randint(0, 2, (block,), generator=torch.Generator().manual_seed(seed))
            assert signs == tuple((1 - 2 * bits).tolist())
    assert len({rht_signs(32, seed) for seed in range(8)}) == 8  # seeds matter
    # Both signs occur in about equal numbers (binomial(4096, 1/2): sd 32).
    assert abs(sum(rht_signs(4096, 3))) < 6 * 32
    with pytest.raises(ValueError, match="power of two"):
        rht_signs(24, 0)
    with pytest.raises(ValueError, match="seed"):
        rht_signs(16, "7")


# (shape, dim): ragged leading dims, the transformed dim first, middle and last.
CASES = [((32,), -1), ((3, 64), -1), ((5, 7, 32), -1), ((64, 3), 0), ((2, 96, 5), 1), ((4, 32, 1), -2)]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape, dim", CASES)
def test_transform_matches_oracle_and_inverts_float64(block, shape, dim):
    gen = torch.Generator().manual_seed(block * 1000 + len(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.rand(1, generator=gen, dtype=torch.float64) * 100
    signs = rht_signs(block, seed=len(shape) + block)
    y = random_hadamard_transform(x, signs, dim=dim)
    assert y.shape == x.shape and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), rht_oracle(x.numpy(), signs, dim), rtol=0, atol=1e-12 * x.abs().max().item())
    back = inverse_random_hadamard_transform(y, signs, dim=dim)
    np.testing.assert_allclose(back.numpy(), x.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        inverse_random_hadamard_transform(x, signs, dim=dim).numpy(),
        rht_oracle(x.numpy(), signs, dim, inverse=True), rtol=0, atol=1e-12 * x.abs().max().item(),
    )
    # Orthogonal: the norm of every block is kept.
    np.testing.assert_allclose(y.norm().item(), x.norm().item(), rtol=1e-13)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_transform_low_precision_dtypes(dtype, rtol):
    x = torch.randn(3, 5, 64).to(dtype)
    signs = rht_signs(16, 4)
    y = random_hadamard_transform(x, signs)
    assert y.dtype == dtype
    expected = rht_oracle(x.double().numpy(), signs, -1)
    # float32 arithmetic inside, one rounding to the output dtype at the end.
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    back = inverse_random_hadamard_transform(y, signs)
    np.testing.assert_allclose(back.double().numpy(), x.double().numpy(), rtol=0, atol=4 * rtol * x.abs().max().item())


@pytest.mark.parametrize("block", [16, 32])
def test_rotating_both_gemm_inputs_keeps_the_product(block):
    gen = torch.Generator().manual_seed(block)
    a = torch.randn(7, 4 * block, generator=gen, dtype=torch.float64)
    b = torch.randn(4 * block, 9, generator=gen, dtype=torch.float64)
    signs = rht_signs(block, seed=99)
    ar = random_hadamard_transform(a, signs, dim=-1)  # A R
    rb = random_hadamard_transform(b, signs, dim=0)  # R^T B
    np.testing.assert_allclose((ar @ rb).numpy(), (a @ b).numpy(), rtol=0, atol=1e-10)
    assert not torch.allclose(ar, a)  # the operands themselves did change
    # The weight-gradient GEMM dW = dY^T X reduces over tokens: rotate both along dim 0.
    dy = torch.randn(2 * block, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(2 * block, 5, generator=gen, dtype=torch.float64)
    dw = random_hadamard_transform(dy, signs, dim=0).T @ random_hadamard_transform(x, signs, dim=0)
    np.testing.assert_allclose(dw.numpy(), (dy.T @ x).numpy(), rtol=0, atol=1e-10)


def test_an_outlier_is_spread_over_its_block():
    # One outlier c in a block of zeros becomes c * s_k * H[k, :]: all magnitudes c / sqrt(16).
    x = torch.zeros(2, 32, dtype=torch.float64)
    x[0, 5] = 64.0
    x[1, 20] = -8.0
    y = random_hadamard_transform(x, rht_signs(16, 0))
    assert torch.equal(y[0, :16].abs(), torch.full((16,), 16.0, dtype=torch.float64))
    assert torch.equal(y[1, 16:].abs(), torch.full((16,), 2.0, dtype=torch.float64))
    assert torch.equal(y[0, 16:], torch.zeros(16, dtype=torch.float64))


def test_bad_arguments_raise_clear_errors():
    signs = rht_signs(16, 0)
    with pytest.raises(ValueError, match=r"multiple of the block size 16"):
        random_hadamard_transform(torch.randn(4, 40), signs)
    with pytest.raises(ValueError, match=r"\(40, 16\)"):
        inverse_random_hadamard_transform(torch.randn(40, 16), signs, dim=0)
    with pytest.raises(ValueError, match="-1 or \\+1"):
        random_hadamard_transform(torch.randn(4, 16), (1, 2) * 8)
    with pytest.raises(ValueError, match="power of two"):
        random_hadamard_transform(torch.randn(4, 24), (1, -1, 1) * 4)
    with pytest.raises(ValueError, match="floating"):
        random_hadamard_transform(torch.ones(4, 16, dtype=torch.int64), signs)
    with pytest.raises(ValueError, match="out of range"):
        random_hadamard_transform(torch.randn(4, 16), signs, dim=2)


def test_inductor_compiles_rht_and_stochastic_quantization():
    """The one compile: Inductor traces the transform and the stochastic rounding
    (noise from torch's global RNG inside the graph); the values land on the E2M1
    grid next to the scaled input."""
    signs = rht_signs(16, 7)

    def rotate_and_quantize(g):
        rotated = random_hadamard_transform(g, signs, dim=0)
        values, scale = quantize(rotated, "block16", rounding="stochastic")
        # E4M3 takes the frexp/ldexp path of stochastic rounding (E2M1 does not).
        values_e4m3, _ = quantize(rotated, "row", "e4m3", rounding="stochastic")
        return rotated, values, scale, values_e4m3

    compiled = torch.compile(rotate_and_quantize, backend="inductor", fullgraph=True)
    g = torch.randn(64, 48)
    g[3, 5] = 50.0
    rotated, values, scale, values_e4m3 = compiled(g)
    np.testing.assert_allclose(rotated.double().numpy(), rht_oracle(g.double().numpy(), signs, 0), rtol=0, atol=1e-4)
    grid = torch.tensor(sorted({math.copysign(v, s) for v, _ in E2M1 for s in (1.0, -1.0)}))
    assert torch.isin(values, grid).all()
    # Stochastic rounding picks one of the two neighbours: within one grid step (<= 2).
    scaled = rotated / scale
    assert ((values - scaled).abs() <= torch.where(scaled.abs() < 2, 0.5, torch.where(scaled.abs() < 4, 1.0, 2.0))).all()
    assert not torch.equal(values, quantize(rotated, "block16")[0])  # not round-to-nearest
    e4m3_grid = torch.tensor([math.copysign(v, s) for v, _ in E4M3 for s in (1.0, -1.0)])
    assert torch.isin(values_e4m3, e4m3_grid).all()
    assert not torch.equal(values_e4m3, quantize(rotated, "row", "e4m3")[0])
