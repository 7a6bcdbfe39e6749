"""The random Hadamard transform (RHT) of the NVFP4 and Quartet recipes.

Why it exists: block quantization gives all elements of a block the scale of its
largest one, so a single outlier pushes its 15 (or 31) neighbours down toward
zero. Before the weight-gradient GEMM's inputs are block-quantized, the NVFP4
recipe multiplies each block (along the GEMM's reduction dimension) by a
normalized Hadamard matrix with a seeded random sign flip: an orthogonal
rotation that spreads an outlier's magnitude evenly over the block, so the block
max shrinks relative to the rest and fewer elements round to zero.

The rotation does not change the GEMM's result in exact arithmetic. Write the
block-diagonal rotation along a dimension of size M as R = blockdiag(D H, ..., D H),
D = diag(signs), H the orthonormal Hadamard matrix (`hadamard_matrix`), so
R R^T = I. `random_hadamard_transform(A, signs, dim=-1)` is A R (each row block
b -> (b * signs) @ H) and `random_hadamard_transform(B, signs, dim=0)` is R^T B
(each column block likewise), hence for A [P, M] and B [M, Q]

    random_hadamard_transform(A, s, -1) @ random_hadamard_transform(B, s, 0)
        = (A R)(R^T B) = A (R R^T) B = A B.

The weight-gradient GEMM dW = dY^T X (dY [T, N], X [T, K]) reduces over the
tokens T, so both inputs may be rotated along T, with the same signs:
dW = (R^T dY)^T (R^T X). Only the quantization error sees the rotation.

Everything here is plain torch ops built from Python constants (no numpy), so
torch.compile traces it and Inductor turns it into small GEMMs.
"""
from __future__ import annotations

import math

import torch


def _check_power_of_two(n, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1) != 0:
        raise ValueError(f"{what} must be a power of two >= 1, got {n!r}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order `n` (a power of two):
    H_1 = [1], H_2k = [[H_k, H_k], [H_k, -H_k]], divided by sqrt(n), so H @ H.T = I.

    Entry (i, j) is (-1)**popcount(i & j) / sqrt(n); the matrix is symmetric. The
    +-1 entries are exact in every float dtype; 1/sqrt(n) is exact for n a power
    of four and correctly rounded otherwise.
    """
    _check_power_of_two(n, "the Hadamard order n")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h * (1.0 / math.sqrt(n))


def rht_signs(block: int, seed: int) -> tuple[int, ...]:
    """`block` random signs in {-1, +1} for `random_hadamard_transform`, from `seed`.

    Drawn as `1 - 2 * torch.randint(0, 2, (block,), generator=g)` with
    `g = torch.Generator().manual_seed(seed)`: torch's CPU generator (Mersenne
    Twister), whatever device the transform later runs on, so the same seed gives
    the same signs on every machine and in every run. A plain tuple of Python
    ints, so it can sit in a config and be traced as a constant.
    """
    _check_power_of_two(block, "the RHT block size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"the RHT seed must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (block,), generator=generator)
    return tuple(int(s) for s in (1 - 2 * bits).tolist())


def _prepare(x: torch.Tensor, signs, dim: int, name: str):
    """Validate, then return (x's blocks along `dim`, moved last, in the compute dtype:
    [..., size // block, block]; the sign tensor; H; the shape to reshape back to)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} needs a floating-point tensor, got {got}")
    signs = tuple(signs)
    block = len(signs)
    _check_power_of_two(block, "len(signs) (the RHT block size)")
    if any(s not in (-1, 1) for s in signs):
        raise ValueError(f"{name}: signs must all be -1 or +1, got {signs}")
    if x.dim() == 0:
        raise ValueError(f"{name} needs a tensor with at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{name}: dim={dim} is out of range for a {x.dim()}-D tensor")
    size = x.shape[dim]
    if size % block != 0:
        raise ValueError(
            f"{name}: the size along dim {dim} ({size}, shape {tuple(x.shape)}) is not a "
            f"multiple of the block size {block}"
        )
    # float64 stays float64 (exact tests); bfloat16/float16/float32 compute in
    # float32, so the rotation itself adds no low-precision rounding.
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    moved = x.movedim(dim, -1).to(compute)
    blocks = moved.reshape(*moved.shape[:-1], size // block, block)
    sign_tensor = torch.tensor(signs, dtype=compute, device=x.device)
    h = hadamard_matrix(block, dtype=compute, device=x.device)
    return blocks, sign_tensor, h, moved.shape


def random_hadamard_transform(x: torch.Tensor, signs, dim: int = -1) -> torch.Tensor:
    """Rotate `x` blockwise along `dim`: each run of len(signs) consecutive elements
    b becomes (b * signs) @ H (H = `hadamard_matrix(len(signs))`).

    The size along `dim` must be a multiple of len(signs) (a power of two). Any
    leading shape; float32, float64, bfloat16 or float16, returned in x's dtype
    (computed in float32, float64 for float64). Inverse:
    `inverse_random_hadamard_transform` with the same signs.
    """
    blocks, sign_tensor, h, moved_shape = _prepare(x, signs, dim, "random_hadamard_transform")
    rotated = (blocks * sign_tensor) @ h
    return rotated.reshape(moved_shape).movedim(-1, dim).to(x.dtype)


def inverse_random_hadamard_transform(y: torch.Tensor, signs, dim: int = -1) -> torch.Tensor:
    """The inverse of `random_hadamard_transform`: each block b becomes (b @ H.T) * signs."""
    blocks, sign_tensor, h, moved_shape = _prepare(y, signs, dim, "inverse_random_hadamard_transform")
    restored = (blocks @ h.T) * sign_tensor
    return restored.reshape(moved_shape).movedim(-1, dim).to(y.dtype)
