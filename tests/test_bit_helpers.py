"""The bit-pattern helpers of runtime/formats.py against Python's math.frexp, and under Inductor.

`floor_log2`, `power_of_two_ceil` and `power_of_two_scale` replace frexp/exp2
arithmetic (which Inductor's C++ backend runs as scalar libm calls) with integer
ops on the float's bits. Exactness is the point, so the oracle is Python's
`math.frexp` on every binade of float32 and float64, subnormals included, and the
compiled form must give the same bits with no frexp left in its code.
"""
import math

import pytest
import torch

from fp4compile.runtime.formats import floor_log2, power_of_two, power_of_two_ceil, stochastic_round
from fp4compile.runtime.quantize import divide_by_power_of_two, power_of_two_scale, quantize_gradient

# (smallest subnormal exponent, largest finite binade exponent) per dtype.
_RANGE = {torch.float32: (-149, 127), torch.float64: (-1074, 1023)}


def _every_binade(dtype, seed):
    """Magnitudes > 0 in every binade of `dtype`: its power of two, one random mantissa, and the top."""
    lo, hi = _RANGE[dtype]
    gen = torch.Generator().manual_seed(seed)
    exps = torch.arange(lo, hi + 1, dtype=torch.float64)
    powers = torch.exp2(exps)
    inside = powers * (1 + torch.rand(exps.shape, generator=gen, dtype=torch.float64))
    top = powers * (2 - 2.0 ** -20)
    values = torch.cat([powers, inside, top]).to(dtype)
    return values[(values > 0) & torch.isfinite(values)]


def _oracle_floor_log2(v: float) -> int:
    mantissa, exponent = math.frexp(v)  # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    return exponent - 1


def _oracle_ceil(v: float, dtype) -> float:
    if v == 0 or math.isinf(v) or math.isnan(v):
        return v
    mantissa, exponent = math.frexp(v)
    exponent = exponent - 1 if mantissa == 0.5 else exponent
    # One binade past the dtype's largest is Inf, as exp2 overflows.
    return math.ldexp(1.0, exponent) if exponent <= _RANGE[dtype][1] else float("inf")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 differs from 0.0), any NaN equal to any NaN."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.masked_fill(nan, 0).view(ints), b.masked_fill(nan, 0).view(ints))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_floor_log2_is_frexps_exponent_in_every_binade(dtype):
    values = _every_binade(dtype, seed=1)
    got = floor_log2(values)
    assert got.dtype == (torch.int32 if dtype == torch.float32 else torch.int64)
    assert got.tolist() == [_oracle_floor_log2(v) for v in values.tolist()]
    # The sign is ignored, and 0, Inf and NaN land outside the finite range.
    assert floor_log2(-values).tolist() == got.tolist()
    lo, hi = _RANGE[dtype]
    special = floor_log2(torch.tensor([0.0, float("inf"), float("nan")], dtype=dtype)).tolist()
    assert special[0] < lo and special[1] == special[2] == hi + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_of_two_ceil_matches_frexp_in_every_binade(dtype):
    values = torch.cat([_every_binade(dtype, seed=2), torch.tensor([0.0, float("inf"), float("nan")], dtype=dtype)])
    got = power_of_two_ceil(values).tolist()
    expected = [_oracle_ceil(v, dtype) for v in values.tolist()]
    assert got[:-1] == expected[:-1] and math.isnan(got[-1])
    # Above the largest power of two, the next one up overflows to Inf (as 2.0 ** 128 does in float32).
    top = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    assert power_of_two_ceil(top).item() == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_of_two_builds_every_normal_exponent(dtype):
    lo, hi = _RANGE[dtype]
    normal_lo = -126 if dtype == torch.float32 else -1022
    exps = torch.arange(normal_lo, hi + 1)
    assert power_of_two(exps, dtype).tolist() == [math.ldexp(1.0, e) for e in exps.tolist()]


@pytest.mark.parametrize("fmax", [6.0, 448.0, 57344.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_of_two_scale_rules(fmax, dtype):
    amax = _every_binade(dtype, seed=3)
    ratio = (amax / fmax).tolist()  # the division rounds in `dtype`, as the scale's does
    # A ratio that underflows to 0 (amax too small to divide) gives 1.
    expected = [1.0 if r == 0 else _oracle_ceil(r, dtype) for r in ratio]
    assert power_of_two_scale(amax, fmax).tolist() == expected
    special = power_of_two_scale(torch.tensor([0.0, float("inf"), float("nan")], dtype=dtype), fmax).tolist()
    assert special[:2] == [1.0, float("inf")] and math.isnan(special[2])  # NaN stays NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_division_by_a_power_of_two_as_products_gives_the_quotients_bits(dtype):
    # Every power-of-two scale of the dtype, subnormal ones included, against quotients
    # from far below the subnormal range up to the E5M2 max (and 0, -0, NaN, Inf).
    gen = torch.Generator().manual_seed(6)
    lo, hi = _RANGE[dtype]
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for e in range(lo, hi + 1):
        scale = torch.tensor([math.ldexp(1.0, e)], dtype=torch.float64)
        quotients = torch.exp2(torch.randint(-170, 17, (64,), generator=gen).double()) * torch.randn(64, generator=gen,
                                                                                                  dtype=torch.float64)
        x = torch.cat([(quotients * scale).to(dtype), specials])
        scale = scale.to(dtype)
        assert _same_bits(divide_by_power_of_two(x, scale), x / scale), e
    x = torch.cat([torch.randn(8, generator=gen, dtype=torch.float64).to(dtype), specials])
    for special in (1.0, float("inf"), float("nan")):
        scale = torch.tensor([special], dtype=dtype)
        assert _same_bits(divide_by_power_of_two(x, scale), x / scale)


def test_other_dtypes_get_a_clear_error():
    for fn in (floor_log2, power_of_two_ceil):
        with pytest.raises(ValueError, match="float32 or float64"):
            fn(torch.ones(3, dtype=torch.bfloat16))


@pytest.mark.slow
def test_inductor_gives_the_same_bits_without_frexp():
    """The compiled gradient quantization and stochastic rounding equal eager, with no frexp in the code."""
    from torch._inductor.utils import run_and_get_code

    def fn(g, noise):
        values, scale = quantize_gradient(g, "e5m2")
        return values, scale, floor_log2(g), stochastic_round(g, "e4m3", noise)

    from fp4compile.lowering import inductor_ops

    inductor_ops.register()  # as backend="fp4" does: the tensor scale is stored once, not inlined
    gen = torch.Generator().manual_seed(4)
    compiled = torch.compile(fn, backend="inductor", dynamic=False)
    for lo, hi in ((-3, 3), (-44, -38), (30, 37)):  # ordinary, subnormal and huge magnitudes
        mant = torch.randn(24, 80, generator=gen)
        g = mant * torch.exp2(torch.randint(lo, hi, (24, 80), generator=gen).float())
        g[0, :3] = torch.tensor([0.0, float("nan"), -0.0])
        noise = torch.rand(g.shape, generator=gen)
        eager = fn(g, noise)
        got, code = run_and_get_code(compiled, g, noise)
        for a, b in zip(got, eager):
            assert _same_bits(a, b), (lo, hi)
    text = "\n".join(code)
    assert "cpp_fused" in text and "frexp" not in text and "ldexp" not in text
    assert "fp4compile.stored" not in text  # lowered into the kernel, not called


def test_stored_is_a_copy_with_the_same_bits_and_gradient():
    """`fp4compile::stored` eagerly: the same values in a new tensor, gradient passed through."""
    from fp4compile.runtime.stored import stored

    x = torch.tensor([1.5, -0.0, float("nan"), float("inf"), 2.0 ** -140], requires_grad=True)
    y = stored(x)
    assert _same_bits(y.detach(), x.detach()) and y.data_ptr() != x.data_ptr()
    y.backward(torch.arange(5.0))
    assert torch.equal(x.grad, torch.arange(5.0))
