"""The CPU lowering's OCC thresholds by selection equal the runtime's top-k ones, bit for bit."""
from __future__ import annotations

import zlib

import pytest
import torch

from fp4compile.lowering.cpu import compensated_activation_op
from fp4compile.lowering.cpu_thresholds import (
    MAX_SELECTED,
    cpu_occ_thresholds,
    largest_with_multiplicity,
    uses_selection,
)
from fp4compile.runtime.occ import alpha_fraction, occ_split, occ_thresholds, outliers_per_side
from fp4compile.runtime.quantize import quantize

from .code_markers import occ_selection_in_code

ALPHAS = (0.99, 0.97, 0.9, 0.999)
# Row widths, odd ones included; each alpha takes those on its selection path (c + 1 <= MAX_SELECTED).
WIDTHS = (1, 2, 3, 7, 16, 33, 64, 100, 256, 384, 704, 1000)


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
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "heavy", "nan", "constant"])
def test_selection_equals_topk_thresholds(kind, dtype):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{kind} {dtype}".encode()))
    for alpha in ALPHAS:
        num, den = alpha_fraction(alpha)
        widths = [n for n in WIDTHS if uses_selection(n, num, den, "row")]
        assert len(widths) >= 6, (alpha, widths)  # the test exercises the selection on many widths
        for n in widths:
            x = _rows(kind, (3, 5, n), dtype, generator)
            expected = occ_thresholds(x, num, den, "row")
            got = cpu_occ_thresholds(x, num, den, "row")
            for e, g in zip(expected, got):
                assert g.shape == e.shape and g.dtype == e.dtype
                # Exact, NaN where the reference has NaN (an Inf-only interpolation, inf - inf).
                torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=f"{kind} {alpha} {n}")


def test_kth_largest_counts_multiplicity_against_sorting():
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(0, 5, (200, 12), generator=generator).double()
    ordered = x.sort(dim=-1, descending=True).values
    for k in range(1, 11):
        previous, kth = largest_with_multiplicity(x, k, nan_first=True)
        assert torch.equal(kth[..., 0], ordered[:, k - 1])
        assert torch.equal(previous[..., 0], ordered[:, max(k - 2, 0)])


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


def test_wide_rows_and_tensor_scope_keep_topk():
    num, den = alpha_fraction(0.99)
    assert outliers_per_side(1536, num, den) + 1 > MAX_SELECTED
    assert not uses_selection(1536, num, den, "row")
    assert not uses_selection(256, num, den, "tensor")
    x = torch.randn(4, 1536, generator=torch.Generator().manual_seed(5))
    for e, g in zip(occ_thresholds(x, num, den, "row"), cpu_occ_thresholds(x, num, den, "row")):
        assert torch.equal(e, g)
    y = torch.randn(4, 256, generator=torch.Generator().manual_seed(6))
    for e, g in zip(occ_thresholds(y, num, den, "tensor"), cpu_occ_thresholds(y, num, den, "tensor")):
        assert torch.equal(e, g)


def test_inductor_code_selects_without_topk_and_equals_the_reference():
    """Compiled by Inductor: no ATen top-k call is left, and the thresholds are the reference's."""
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
    assert occ_selection_in_code("\n".join(code))
    torch.testing.assert_close(got, torch.cat(occ_thresholds(x, num, den, "row"), dim=-1), rtol=0, atol=0,
                               equal_nan=True)
    fresh = torch.randn(96, 704, generator=generator)  # same shape: the same compiled code
    assert torch.equal(compiled(fresh), torch.cat(occ_thresholds(fresh, num, den, "row"), dim=-1))


def test_benchmark_script_checks_equality_and_writes_its_table(tmp_path):
    """`benchmarks/occ_thresholds.py`: runs, checks both forms agree, and records the lowering's choice."""
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
    assert [r["lowering_selects"] for r in result["rows"]] == [True, False]
    assert all(r["topk_ms"] > 0 and r["selection_ms"] > 0 for r in result["rows"])
