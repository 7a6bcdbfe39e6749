"""The CPU lowering's OCC thresholds from the row kernel equal the runtime's top-k ones, bit for bit."""
from __future__ import annotations

import zlib

import pytest
import torch

from fp4compile.lowering.cpu import compensated_activation_op
from fp4compile.lowering import cpu_row_extremes
from fp4compile.lowering.cpu_row_extremes import row_extremes
from fp4compile.lowering.cpu_thresholds import cpu_occ_thresholds, uses_kernel
from fp4compile.runtime.occ import alpha_fraction, occ_split, occ_thresholds, outliers_per_side
from fp4compile.runtime.quantize import quantize

from .code_markers import occ_kernel_in_code

ALPHAS = (0.99, 0.97, 0.9, 0.999, 0.5)
# Row widths, odd ones included. Over the alphas, k = c + 1 runs from 1 to 768, through
# every lane count of the kernel (16, 32, 64, 128 lanes), rows narrower than one
# stride of lanes, and tails that fill no lane's whole stride.
WIDTHS = (1, 2, 3, 7, 16, 33, 64, 100, 256, 384, 704, 1000, 1536)


def _rows(kind: str, shape, dtype, generator):
    if kind == "normal":
        return torch.randn(shape, generator=generator, dtype=dtype)
    if kind == "ties":  # a handful of distinct values: every level has many members
        return torch.randint(-3, 4, shape, generator=generator).to(dtype)
    if kind == "heavy":  # outliers of both signs, and infinities
        x = torch.randn(shape, generator=generator, dtype=dtype) * torch.rand(shape, generator=generator,
                                                                              dtype=dtype).pow(-4)
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=generator)
        flat[picks[0::2]] = float("inf")
        flat[picks[1::2]] = float("-inf")
        return x
    if kind == "nan":  # NaN scattered, and rows mostly NaN
        x = torch.randn(shape, generator=generator, dtype=dtype)
        x[torch.rand(shape, generator=generator) < 0.05] = float("nan")
        x[..., 0, : shape[-1] - 1] = float("nan")
        return x
    if kind == "constant":  # rows of one value (zero among them)
        values = torch.randint(-2, 3, shape[:-1] + (1,), generator=generator).to(dtype)
        return values.expand(shape).clone()
    if kind == "channels":  # outlier channels 16 apart: one lane of the kernel holds them all (its rescan)
        x = torch.randn(shape, generator=generator, dtype=dtype)
        x[..., ::16] *= 50
        x[..., 5::32] *= -50
        return x
    if kind == "sorted":  # ascending and descending rows: every value enters a lane's list
        x = torch.randn(shape, generator=generator, dtype=dtype).sort(dim=-1).values
        x[..., 1::2, :] = x[..., 1::2, :].flip(-1)
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "heavy", "nan", "constant", "channels", "sorted"])
def test_kernel_equals_topk_thresholds(kind, dtype):
    assert uses_kernel("row")  # the kernel built here: the comparison below is not top-k against itself
    generator = torch.Generator().manual_seed(zlib.crc32(f"{kind} {dtype}".encode()))
    for alpha in ALPHAS:
        num, den = alpha_fraction(alpha)
        for n in WIDTHS:
            x = _rows(kind, (3, 5, n), dtype, generator)
            expected = occ_thresholds(x, num, den, "row")
            got = cpu_occ_thresholds(x, num, den, "row")
            for e, g in zip(expected, got):
                assert g.shape == e.shape and g.dtype == e.dtype
                # Exact, NaN where the reference has NaN (an Inf-only interpolation, inf - inf).
                torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=f"{kind} {alpha} {n}")


def test_row_extremes_count_multiplicity_against_sorting():
    """Every k of rows with heavy ties, against a sort: positions k - 1 and k from each end."""
    generator = torch.Generator().manual_seed(7)
    for n in (12, 40, 300):
        x = torch.randint(0, 5, (200, n), generator=generator).double()
        descending = x.sort(dim=-1, descending=True).values
        ascending = x.sort(dim=-1).values
        for k in range(1, n + 1):
            top, bottom = row_extremes(x, k)
            previous = max(k - 2, 0)
            assert torch.equal(top, descending[:, [previous, k - 1]]), (n, k)
            assert torch.equal(bottom, ascending[:, [previous, k - 1]]), (n, k)


def test_row_extremes_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="outside 1..8"):
        row_extremes(torch.randn(3, 8), 9)
    with pytest.raises(ValueError, match="float32 or float64"):
        row_extremes(torch.randn(3, 8).half(), 2)


def test_without_the_kernel_the_thresholds_come_from_topk(monkeypatch):
    """A machine where the kernel does not build: one warning, then the reference's top-k, same values."""
    num, den = alpha_fraction(0.99)
    x = torch.randn(4, 704, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(cpu_row_extremes, "_compiler", lambda: "/nonexistent/c++")
    cpu_row_extremes._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="did not build.*uses top-k"):
            assert not uses_kernel("row")
        for e, g in zip(occ_thresholds(x, num, den, "row"), cpu_occ_thresholds(x, num, den, "row")):
            assert torch.equal(e, g)
    finally:
        cpu_row_extremes._library.cache_clear()


def test_nan_is_ordered_as_topk_orders_it():
    """NaN entries (one, a few, most of a row, all of it): the same thresholds and compensated activation."""
    num, den = alpha_fraction(0.99)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(3))
    x[1, 17] = float("nan")  # one NaN: the row's other values still quantize
    x[2, :3] = float("nan")  # NaN fills the top places (c + 1 = 4)
    x[3, :5] = float("nan")  # more NaN than places
    x[4, :] = float("nan")
    x[5, 2:] = float("nan")  # fewer numbers than places: NaN on the bottom side too
    for e, g in zip(occ_thresholds(x, num, den, "row"), cpu_occ_thresholds(x, num, den, "row")):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
    ref_upper, ref_lower = occ_thresholds(x, num, den, "row")
    assert not ref_upper[1].isnan().any()  # the case that matters: one NaN leaves finite thresholds

    x_comp, x_s = compensated_activation_op(x, num, den, "row", "e2m1", "row")
    clamped, residual = occ_split(x, ref_upper, ref_lower)
    ref_q, ref_s = quantize(clamped, granularity="row", fmt="e2m1")
    ref_comp = ref_q + residual / ref_s
    torch.testing.assert_close(x_comp, ref_comp, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x_s, ref_s, rtol=0, atol=0, equal_nan=True)
    assert x_comp[1].isnan().sum() == 1  # NaN stays NaN, where it was


def test_tensor_scope_keeps_topk():
    assert uses_kernel("row") and not uses_kernel("tensor")
    num, den = alpha_fraction(0.99)
    y = torch.randn(4, 256, generator=torch.Generator().manual_seed(6))
    for e, g in zip(occ_thresholds(y, num, den, "tensor"), cpu_occ_thresholds(y, num, den, "tensor")):
        assert torch.equal(e, g)


def test_inductor_code_calls_the_kernel_without_topk_and_equals_the_reference():
    """Compiled by Inductor: one extern call to the kernel, no ATen top-k, the reference's thresholds."""
    from torch._inductor.utils import run_and_get_code

    num, den = alpha_fraction(0.99)

    def thresholds(x):
        return torch.cat(cpu_occ_thresholds(x, num, den, "row"), dim=-1)

    torch._dynamo.reset()
    compiled = torch.compile(thresholds, backend="inductor")
    generator = torch.Generator().manual_seed(11)
    x = torch.randint(-20, 21, (96, 704), generator=generator).float() / 4  # ties in most rows
    x[5, 3] = float("inf")
    x[7, :4] = float("nan")
    x[9, 100] = float("nan")
    got, code = run_and_get_code(compiled, x)
    assert occ_kernel_in_code("\n".join(code))
    torch.testing.assert_close(got, torch.cat(occ_thresholds(x, num, den, "row"), dim=-1), rtol=0, atol=0,
                               equal_nan=True)
    fresh = torch.randn(96, 704, generator=generator)  # same shape: the same compiled code
    assert torch.equal(compiled(fresh), torch.cat(occ_thresholds(fresh, num, den, "row"), dim=-1))


def test_symbolic_row_width_calls_the_kernel_in_one_graph():
    """Compiled with dynamic shapes, the width (and so k) is symbolic: one graph serves every width."""
    from torch._dynamo.testing import CompileCounter

    num, den = alpha_fraction(0.99)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.cat(cpu_occ_thresholds(x, num, den, "row"), dim=-1),
                             backend=counter, dynamic=True)
    generator = torch.Generator().manual_seed(12)
    for n in (100, 257, 1000):  # k = 2, 4, 11
        x = torch.randn(7, n, generator=generator)
        assert torch.equal(compiled(x), torch.cat(occ_thresholds(x, num, den, "row"), dim=-1)), n
    assert counter.frame_count == 1


def test_benchmark_script_checks_equality_and_writes_its_table(tmp_path):
    """`benchmarks/occ_thresholds.py`: runs, checks both forms agree, and writes both timings."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "occ_thresholds.py"
    spec = importlib.util.spec_from_file_location("occ_thresholds_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "occ.json"
    assert module.main(["--rows", "8", "--widths", "16,2000", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["width"] for r in result["rows"]] == [16, 2000]
    assert [r["values_per_side"] for r in result["rows"]] == [2, 21]
    assert all(r["topk_ms"] > 0 and r["kernel_ms"] > 0 for r in result["rows"])
