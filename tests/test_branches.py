"""Config branches of a quantized linear layer, through the backend, against the reference.

Most tests run the model with row scales on both operands, OCC compensation on,
and both operands quantized. This file drives the other branches through
`torch.compile` and compares forward and gradients with `fp4_linear_reference`
(the specification) in float64:

- block32 / block16 / tensor granularities: block scales lie along K, so the
  GEMMs dequantize first and the gradient operand cannot fold the scale
  (`runtime/gemm.py`'s non-vector branches); tensor scales are vector scales of
  shape [1, 1]. Mixed granularities (row activations, block16 weights) take the
  folded branch for one backward GEMM and the unfolded one for the other.
- a passthrough operand (`act_fmt=None` or `weight_fmt=None`);
- `occ_compensate=False` (clamp without adding the outliers back).

The semantic graph (`fp4_aot_eager`) shows the branch itself; one Inductor
compile (`fp4`) covers the CPU lowering of block scales, which merges the OCC
residual on the dequantized values (`lowering/cpu.py`).

Each comparison also checks that the option changed the result (against the
row-scaled, fully quantized, compensated default), so an option the pass
silently ignored would fail. Tolerances: float64, where the graph and the
reference differ only by summation order (~1e-16 relative); 1e-10 leaves room
for that and for the generated C++ kernels' reassociation.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4compile
from fp4compile import Fp4Config, fp4_linear_reference

RTOL, ATOL = 1e-10, 1e-12


class TwoLinears(nn.Module):
    """Two non-square linear layers; in-features 64 and 96 are multiples of 32 (block scales)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 32, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class ReferenceTwoLinears(nn.Module):
    """The same layers through `fp4_linear_reference` under one config."""

    def __init__(self, model: TwoLinears, config: Fp4Config):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x):
        m = self.model
        h = fp4_linear_reference(x, m.up.weight, m.up.bias, self.config)
        return fp4_linear_reference(F.gelu(h), m.down.weight, None, self.config)


def _inputs(seed: int, shape=(3, 5, 64)):
    """Activations with a few large outliers per token, so OCC clamps something."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    outliers = torch.rand(*shape, generator=gen) < 0.03
    x = torch.where(outliers, 25 * torch.randn(*shape, generator=gen, dtype=torch.float64), x)
    return x.requires_grad_(), torch.randn(*shape[:-1], 32, generator=gen, dtype=torch.float64)


def _model(seed: int = 0) -> TwoLinears:
    torch.manual_seed(seed)
    return TwoLinears().double()


def _forward_backward(model, run, x, dy):
    """Output and gradients (input, then every parameter) of `(run(x) * dy).sum()`."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = run(x)
    (y * dy).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]


def _compiled_run(model, backend, options):
    torch._dynamo.reset()
    fp4compile.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    return compiled


def _assert_all_close(actual, expected, what):
    names = ["output", "grad x", "grad up.weight", "grad up.bias", "grad down.weight"]
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {name}\n{m}")


def _assert_differs(actual, other, what):
    # Forward and weight gradients must move by far more than the tolerance.
    for a, o in zip(actual, other):
        assert not torch.allclose(a, o, rtol=1e-6, atol=1e-8), f"{what} made no difference"


BRANCHES = {
    "block32": {"weight_granularity": "block32", "act_granularity": "block32"},
    "block16": {"weight_granularity": "block16", "act_granularity": "block16"},
    "tensor": {"weight_granularity": "tensor", "act_granularity": "tensor"},
    "row act, block16 weight": {"weight_granularity": "block16"},
    "block32 act, tensor weight": {"act_granularity": "block32", "weight_granularity": "tensor"},
    "act passthrough": {"act_fmt": None, "occ_alpha": None},
    "weight passthrough": {"weight_fmt": None, "dge_clamp": None},
    "e4m3 weight passthrough act": {"weight_fmt": "e4m3", "dge_clamp": None, "act_fmt": None, "occ_alpha": None},
    "no compensation": {"occ_compensate": False},
    "no compensation, block16": {"occ_compensate": False, "weight_granularity": "block16", "act_granularity": "block16"},
}


@pytest.fixture(scope="module")
def default_results():
    """The paper recipe's results (row scales, compensated) per seed: what each branch must differ from."""
    results = {}
    for seed in (0, 1):
        model = _model(seed)
        x, dy = _inputs(seed)
        reference = ReferenceTwoLinears(model, Fp4Config.from_recipe("paper"))
        results[seed] = _forward_backward(model, reference, x, dy)
    return results


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("seed", [0, 1])
def test_branch_semantic_graph_equals_reference_float64(branch, seed, default_results):
    options = {"recipe": "paper", **BRANCHES[branch]}
    config = Fp4Config.from_options(options)
    model = _model(seed)
    x, dy = _inputs(seed, shape=(3, 5, 64) if seed == 0 else (7, 64))
    compiled = _compiled_run(model, "fp4_aot_eager", options)
    got = _forward_backward(model, compiled, x, dy)
    # Both layers reported quantized (a passthrough operand still makes a site).
    sites = [s for r in fp4compile.reports() for s in r.sites]
    assert sorted((s.weight_name, s.quantized) for s in sites) == [("down.weight", True), ("up.weight", True)]
    expected = _forward_backward(model, ReferenceTwoLinears(model, config), x, dy)
    _assert_all_close(got, expected, branch)
    if seed == 0:
        _assert_differs(got, default_results[0], branch)
    fp4compile.reset()


def test_reference_options_reach_the_quantizers():
    """The reference itself honours each option: block32 output equals a hand-composed block32 layer."""
    from fp4compile.runtime.quantize import quantize

    torch.manual_seed(3)
    x = torch.randn(6, 64, dtype=torch.float64)
    w = torch.randn(40, 64, dtype=torch.float64)
    config = Fp4Config.from_recipe("fp4-direct", weight_granularity="block32", act_granularity="block16")
    x_q, x_s = quantize(x, "block16")
    w_q, w_s = quantize(w, "block32")
    torch.testing.assert_close(fp4_linear_reference(x, w, None, config), (x_q * x_s) @ (w_q * w_s).t(),
                               rtol=1e-14, atol=0)


@pytest.mark.slow
def test_block_scales_through_the_cpu_lowering_and_inductor(default_results):
    """One Inductor compile: block32 activations, block16 weights, OCC compensation merged by the CPU lowering."""
    from fp4compile.lowering.cpu import LOWERING_NAME

    options = {"recipe": "paper", "act_granularity": "block32", "weight_granularity": "block16"}
    model = _model(0)
    x, dy = _inputs(0)
    compiled = _compiled_run(model, "fp4", options)
    got = _forward_backward(model, compiled, x, dy)
    reports = fp4compile.reports()
    assert [sorted(s.weight_name for s in r.quantized) for r in reports] == [["down.weight", "up.weight"]]
    # The lowering merged each site's compensation into its GEMM (block scales: on the dequantized values).
    assert {s.lowering for r in reports for s in r.quantized} == {LOWERING_NAME}
    expected = _forward_backward(model, ReferenceTwoLinears(model, Fp4Config.from_options(options)), x, dy)
    _assert_all_close(got, expected, "inductor block32/block16")
    _assert_differs(got, default_results[0], "block scales under Inductor")
    fp4compile.reset()
