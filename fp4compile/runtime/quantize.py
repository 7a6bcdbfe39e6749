"""Scaled quantization of whole tensors: absmax scaling at a chosen granularity.

`quantize` returns the grid values and the scale separately because the fast GEMM
runs on the grid values and applies vector-wise scales in its epilogue; the
dequantized tensor is `values * scale`. The arithmetic runs in float32, or in
float64 for float64 inputs so that tests can compare against a float64 oracle
exactly.
"""
from __future__ import annotations

import torch

from .formats import (
    FORMAT_MAX,
    ROUNDING_FORMATS,
    ROUNDING_MODES,
    floor_log2,
    is_inf,
    is_nan,
    power_of_two_ceil,
    round_fp8,
    round_to_format,
)
from .stored import stored

GRANULARITIES = ("row", "tensor", "block32", "block16", "block16x16")
_BLOCK_SIZE = {"block32": 32, "block16": 16}
# Side of the square NVFP4 weight tiles ("block16x16").
_TILE = 16
# floor(log2(format max)): the element exponent MX scaling aligns the block max to.
_EMAX_ELEMENT = {"e2m1": 2, "e4m3": 8, "e5m2": 15}
# What quantize_gradient accepts: one tensor scale (a power of two) or quantize's 1-D blocks.
GRADIENT_GRANULARITIES = ("tensor", "block16", "block32")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact oracle comparisons); everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nan_aware_amax(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Max of |x| ignoring NaN, keeping dims (so a NaN stays local to its element).

    Inf is kept: a group holding an Inf gets an infinite scale, and its values
    dequantize to NaN, so the non-finite input stays non-finite downstream.
    """
    a = torch.where(is_nan(x), torch.zeros_like(x), x.abs())
    if dim is None:
        return a.amax().reshape([1] * x.dim())
    return a.amax(dim=dim, keepdim=True)


def _finish_scale(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """All-zero groups get scale 1 (they quantize to zeros, no 0/0); Inf groups get Inf.

    A subnormal amax divided by the format max can underflow to 0; the scale is then
    the smallest subnormal instead, so x / scale stays finite.
    """
    tiny = torch.finfo(scale.dtype).tiny * torch.finfo(scale.dtype).eps  # smallest subnormal
    scale = torch.where((scale == 0) & (amax > 0), torch.full_like(scale, tiny), scale)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    return torch.where(is_inf(amax), amax, scale)


def _check_rounding(rounding: str, generator) -> None:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding={rounding!r} is unknown; valid: {', '.join(ROUNDING_MODES)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check(x: torch.Tensor, granularity: str, fmt: str, rounding: str = "nearest", generator=None) -> None:
    if fmt not in ROUNDING_FORMATS:
        raise ValueError(
            f"fmt={fmt!r} is not a quantization format; valid: {', '.join(ROUNDING_FORMATS)}"
        )
    _check_rounding(rounding, generator)
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity={granularity!r} is unknown; valid: {', '.join(GRANULARITIES)}"
        )
    if not (x.is_floating_point()):
        raise ValueError(f"quantize needs a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("quantize needs a tensor with at least one dimension")
    if granularity == "block16x16" and (
        x.dim() < 2 or x.shape[-1] % _TILE != 0 or x.shape[-2] % _TILE != 0
    ):
        raise ValueError(
            f"granularity='block16x16' needs at least two dimensions with the last two "
            f"multiples of {_TILE}, got shape {tuple(x.shape)}"
        )
    block = _BLOCK_SIZE.get(granularity)
    if block is not None and x.shape[-1] % block != 0:
        raise ValueError(
            f"granularity={granularity!r} needs the last dimension to be a multiple of "
            f"{block}, got {x.shape[-1]}"
        )


def _uniform_noise(x: torch.Tensor, rounding: str, generator, dtype: torch.dtype):
    """The uniforms of one stochastic rounding: drawn once per call, in x's shape.

    One `torch.rand` of the whole shape, so a generator seeded alike reproduces the
    call bit for bit; with generator None (as inside torch.compile) torch's global
    RNG draws them. None for round-to-nearest.
    """
    if rounding != "stochastic":
        return None
    return torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)


def quantize(
    x: torch.Tensor,
    granularity: str = "row",
    fmt: str = "e2m1",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
):
    """Quantize `x` to `fmt` with one absmax scale per group.

    Returns `(values, scale)`: `values` are exact grid values (in the compute
    dtype), `scale` broadcasts against them and `x ~= values * scale`.

    - "row": one scale per vector along the last dim, shape `[..., 1]`;
      `scale = amax / fmt_max` (6 for E2M1).
    - "tensor": one scale, shape `[1, ..., 1]`.
    - "block32" (MX): 32 elements along the last dim share a power-of-two (E8M0)
      scale `2 ** (floor(log2(amax)) - emax_elem)`, the OCP MX rule; the block max
      then lands in [4, 8) and saturates to 6 above 6.
    - "block16" (NVFP4): 16 elements share an E4M3-rounded scale times one FP32
      tensor scale `amax_tensor / (fmt_max * 448)`. A block whose E4M3 scale
      underflows to 0 flushes to zeros (scale 1), as the hardware format does.
    - "block16x16" (NVFP4 weights): the "block16" rule on 16x16 tiles over the
      last two dims (both multiples of 16). Square tiles make the result of
      `x.transpose(-2, -1)` the transpose of the result of `x`, so W (blocks along
      K) and W^T (blocks along N) hold the same quantized values.
    For the block granularities `scale` has the full shape of `values` (each
    element carries its block's scale), so `values * scale` still broadcasts.

    `fmt` is "e2m1" (FP4), "e4m3" or "e5m2" (FP8). `rounding="nearest"` rounds to
    nearest, ties to even; `rounding="stochastic"` rounds each scaled element
    up or down with the probability that makes it unbiased (`formats.stochastic_round`),
    with uniforms drawn once per call by `torch.rand(x.shape, generator=generator)`
    in the compute dtype: the same seeded generator gives the same result bit for
    bit. Stochastic rounding is unbiased only where nothing saturates, so with it
    the block scales never round down: "block32" takes the power of two at or
    above amax / fmt_max, "block16"/"block16x16" round the E4M3 block scale up.
    Row and tensor scales map the max to the format max either way.
    """
    _check(x, granularity, fmt, rounding, generator)
    x_hp = x.to(compute_dtype(x.dtype))
    noise = _uniform_noise(x_hp, rounding, generator, x_hp.dtype)
    fmax = FORMAT_MAX[fmt]
    if granularity in ("row", "tensor"):
        amax = nan_aware_amax(x_hp, dim=-1 if granularity == "row" else None)
        scale = _finish_scale(amax / fmax, amax)
        return round_to_format(x_hp / scale, fmt, rounding, noise), scale

    if granularity == "block16x16":
        # Square tiles over the last two dims: [..., R, C] -> [..., R/16, 16, C/16, 16],
        # one scale per (R/16, C/16) tile. The tile amax does not depend on which of
        # the two dims is the GEMM's reduction dim, so W and W^T quantize alike.
        rows, cols = x_hp.shape[-2], x_hp.shape[-1]
        tile_shape = (*x_hp.shape[:-2], rows // _TILE, _TILE, cols // _TILE, _TILE)
        tiles = x_hp.reshape(tile_shape)
        amax = nan_aware_amax(tiles, dim=(-3, -1))
        tile_noise = None if noise is None else noise.reshape(tile_shape)
        values, scale = _nvfp4_two_level(tiles, amax, fmt, rounding, tile_noise)
        scale = scale.expand_as(tiles).reshape(x_hp.shape)
        return values.reshape(x_hp.shape), scale

    block = _BLOCK_SIZE[granularity]
    block_shape = (*x_hp.shape[:-1], x_hp.shape[-1] // block, block)
    blocks = x_hp.reshape(block_shape)
    block_noise = None if noise is None else noise.reshape(block_shape)
    amax = nan_aware_amax(blocks, dim=-1)
    if granularity == "block32" and rounding == "stochastic":
        # Unbiased rounding needs no element beyond the format max (saturation
        # would pull it in, a bias): the power of two at or above amax / fmax,
        # one binade above the MX rule for most blocks.
        scale = power_of_two_scale(amax, fmax)
        values = round_to_format(blocks / scale, fmt, rounding, block_noise)
    elif granularity == "block32":
        # floor(log2(amax)) exactly, from the bits (a zero amax clamps to -127; _finish_scale sets it to 1).
        shared_exp = (floor_log2(amax) - _EMAX_ELEMENT[fmt]).clamp(-127, 127)
        scale = torch.exp2(shared_exp.to(amax.dtype))
        scale = _finish_scale(scale, amax)
        values = round_to_format(blocks / scale, fmt, rounding, block_noise)
    else:
        values, scale = _nvfp4_two_level(blocks, amax, fmt, rounding, block_noise)
    scale = scale.expand_as(blocks).reshape(x_hp.shape)
    return values.reshape(x_hp.shape), scale


def _round_up_e4m3(t: torch.Tensor) -> torch.Tensor:
    """The smallest E4M3 value >= t, for t in [0, 448] (NaN stays NaN).

    Round to nearest, then step one code up where that went down: for a
    non-negative E4M3 value the next code's bits are its own plus one (the
    format is sign-magnitude with the exponent above the mantissa). A bit
    increment rather than frexp arithmetic, which Inductor cannot fuse.
    """
    nearest = round_fp8(t, "e4m3")
    codes = nearest.to(torch.float8_e4m3fn).view(torch.uint8)
    above = (codes + 1).view(torch.float8_e4m3fn).to(t.dtype)
    return torch.where(nearest < t, above, nearest)


def _nvfp4_two_level(blocks: torch.Tensor, amax: torch.Tensor, fmt: str, rounding: str, noise):
    """NVFP4's two-level scaling of `blocks` whose per-block amax (kept dims) is `amax`.

    Returns `(values, scale)` with `values` shaped like `blocks` and `scale` like
    `amax`. The tensor scale uses the finite amax so that an Inf in one block does
    not flush every other block to zero.
    """
    fmax = FORMAT_MAX[fmt]
    finite_amax = torch.where(is_inf(amax), torch.zeros_like(amax), amax).amax()
    tensor_scale = torch.where(
        finite_amax == 0, torch.ones_like(finite_amax), finite_amax / (fmax * 448.0)
    )
    block_scale_hp = amax / fmax / tensor_scale
    if rounding == "stochastic":
        # Round the block scale UP to E4M3 (a stochastic rounding with zero noise
        # goes up from anything off the grid): the block max then stays within
        # the format max, and unbiased rounding is not undone by saturation.
        # The largest block's ratio is 448 up to float rounding: clamp it there.
        block_scale_e4m3 = _round_up_e4m3(block_scale_hp.clamp(max=448.0))
    else:
        block_scale_e4m3 = round_fp8(block_scale_hp, "e4m3")
    scale = block_scale_e4m3 * tensor_scale
    flushed = scale == 0
    scale = torch.where(flushed, torch.ones_like(scale), scale)
    scale = torch.where(is_inf(amax), amax, scale)
    values = round_to_format(blocks / scale, fmt, rounding, noise)
    values = torch.where(flushed & ~is_nan(blocks), torch.zeros_like(values), values)
    return values, scale


def fake_quantize(
    x: torch.Tensor,
    granularity: str = "row",
    fmt: str = "e2m1",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize and dequantize: `values * scale` in the input's dtype."""
    values, scale = quantize(x, granularity=granularity, fmt=fmt, rounding=rounding, generator=generator)
    return (values * scale).to(x.dtype)


def quantize_gradient(
    g: torch.Tensor,
    fmt: str = "e5m2",
    granularity: str = "tensor",
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
):
    """Scaled cast of a gradient to `fmt`: returns `(values, scale)`, `g ~= values * scale`.

    granularity="tensor" (the default, FP8 E5M2 gradients): one scale, the power
    of two at or above amax / fmt_max (57344 for E5M2, 6 for E2M1), so nothing
    overflows, and dividing by it is exact: each element's code then depends on
    its own value only (subnormals aside), not on the amax of the tensor it
    arrived in. A data-parallel rank holding half the batch therefore rounds
    exactly as one process holding all of it. `scale` has shape `[1, ..., 1]`.

    granularity="block16" / "block32": `quantize`'s NVFP4 / MX block rules with
    `fmt` (E2M1 for the NVFP4 and MXFP4 recipes); `scale` has `values`' shape.

    rounding="stochastic" rounds unbiasedly with uniforms drawn once per call
    from `generator` (see `quantize`); block scales then round up, never down,
    so that no element saturates (the tensor rule already rounds up).
    """
    if granularity not in GRADIENT_GRANULARITIES:
        raise ValueError(
            f"granularity={granularity!r} is not a gradient granularity; "
            f"valid: {', '.join(GRADIENT_GRANULARITIES)}"
        )
    if granularity != "tensor":
        return quantize(g, granularity=granularity, fmt=fmt, rounding=rounding, generator=generator)
    if fmt not in ROUNDING_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a gradient format; valid: {', '.join(ROUNDING_FORMATS)}")
    _check_rounding(rounding, generator)
    if not g.is_floating_point():
        raise ValueError(f"quantize_gradient needs a floating-point tensor, got {g.dtype}")
    g_hp = g.to(compute_dtype(g.dtype))
    noise = _uniform_noise(g_hp, rounding, generator, g_hp.dtype)
    # One scalar read by every loop over g (the cast, and in the backward the DGE
    # and row-scale products): `stored` has compiled code compute it once.
    scale = stored(power_of_two_scale(nan_aware_amax(g_hp), FORMAT_MAX[fmt]))
    return round_to_format(divide_by_power_of_two(g_hp, scale), fmt, rounding, noise), scale


def divide_by_power_of_two(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` for a per-tensor scale that is a power of two (or 1, Inf, NaN): the same bits, as products.

    A vector division costs some twenty times a multiplication, and Inductor
    computes the reciprocal's scalar once per vector iteration, not per element.
    Multiplying by 1 / scale is exact when that reciprocal is a normal power of
    two; for a tiny scale (below 2**-100, where 1 / scale could overflow) x is
    first multiplied by 2**64, exactly (in `quantize_gradient` such a scale means
    |x| < 57344 * 2**-100; elsewhere, where x * 2**64 overflows, x / scale does too).
    Each product then rounds the exact quotient once, as the division does
    (subnormal quotients included); Inf gives 0 and NaN stays NaN, as dividing does.
    """
    lift = torch.where(scale < 2.0 ** -100, 2.0 ** 64, 1.0).to(scale.dtype)
    return x * lift * (1.0 / (scale * lift))


def power_of_two_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Smallest power of two >= amax / fmax (1 for zero amax, Inf for infinite amax, NaN for NaN).

    `power_of_two_ceil` on the bit pattern: exact, unlike log2, and vectorizable,
    unlike frexp, which Inductor's C++ backend calls as libm functions, once per
    vector iteration of each consumer loop for a per-tensor scale. A ratio that
    underflows to 0 (an amax too small to divide) gives 1, as frexp(0) did.
    """
    # Inf and NaN pass through power_of_two_ceil; zero is the one rule left.
    scale = power_of_two_ceil(amax / fmax)
    return torch.where(scale == 0, torch.ones_like(scale), scale)
