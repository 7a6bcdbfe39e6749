"""The CPU lowering: one GEMM per product on the compensated activation.

The lowering replaces OCC clamp + quantize + GEMM + sparse compensation by one
fused activation op and the unchanged GEMM op (`lowering/cpu.py`). It is exact
in real arithmetic, so:

- op level, float64: the lowered layer equals the semantic one (the ops the
  pass emits) to 1e-12 on the output and on every gradient, on fresh random
  inputs of many shapes, both OCC scopes and the block granularities;
- op level, float32: they agree to float32 rounding (the merge reorders sums and
  rounds r / x_s once); the bound below is a few ulps of the output's scale;
- compiled, float32: a model whose quantized sites all read the input (so no
  FP4 code downstream can flip on a rounding difference) compiled with `fp4`
  (lowered, Inductor) matches `fp4_aot_eager` (semantic) on the output and on
  every gradient;
- the generated code has no gather, scatter or index_add left, one GEMM per
  product, and a pinned kernel count, so a silent fallback to the sparse
  compensation or a fusion regression fails here without a GPU.
"""
import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile import Fp4Config
from fp4compile.lowering.cpu import compensated_activation_op
from fp4compile.runtime import linear_ops
from fp4compile.runtime.occ import alpha_fraction

from .code_markers import occ_kernel_in_code


def _semantic(x, w, b, config):
    return linear_ops.quantized_linear(x, w, b, config)


def _lowered(x, w, b, config):
    num, den = alpha_fraction(config.occ_alpha)
    x_comp, x_s = compensated_activation_op(x, num, den, config.occ_scope, config.act_fmt, config.act_granularity)
    w_q, w_s = linear_ops.quantize_weight_op(w, config.weight_fmt, config.weight_granularity, config.dge_k,
                                             config.dge_clamp)
    return linear_ops.fp4_gemm_op(x_comp, x_s, w_q, w_s, b, config.grad_fmt, x.dtype)


def _layer_grads(fn, x, w, b, g, config):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b, config)
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), g))


def _inputs(shape, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    x[..., 3] *= 40  # an outlier channel, as in real activations
    x.view(-1)[7] = 300.0  # and a lone outlier
    w = torch.randn(n, shape[-1], generator=gen, dtype=dtype) / shape[-1] ** 0.5
    b = torch.randn(n, generator=gen, dtype=dtype)
    g = torch.randn(*shape[:-1], n, generator=gen, dtype=dtype)
    return x, w, b, g


CONFIGS = [
    Fp4Config.from_recipe("paper"),
    Fp4Config.from_recipe("paper", occ_scope="tensor"),
    Fp4Config.from_recipe("paper", act_granularity="block32", weight_granularity="block16"),
    Fp4Config.from_recipe("paper", act_granularity="tensor"),
    Fp4Config.from_recipe("w8a4"),
    Fp4Config.from_recipe("paper", grad_fmt=None),
]
SHAPES = [((5, 64), 32), ((2, 7, 96), 48), ((33, 256), 80), ((4, 3, 160), 16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.recipe}-{c.occ_scope}-{c.act_granularity}-{c.grad_fmt}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lowered_layer_equals_semantic_layer_float64(config, shape):
    x_shape, n = shape
    for seed in range(3):
        x, w, b, g = _inputs(x_shape, n, torch.float64, seed)
        want = _layer_grads(_semantic, x, w, b, g, config)
        got = _layer_grads(_lowered, x, w, b, g, config)
        for name, a, e in zip(("y", "grad_x", "grad_w", "grad_b"), got, want):
            assert torch.allclose(a, e, rtol=1e-12, atol=1e-12 * e.abs().max()), name


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lowered_layer_matches_semantic_layer_float32(shape):
    """Float32: the merge changes summation order and rounds r / x_s once.

    Bound: 64 float32 ulps of the tensor's largest magnitude. A K-term float32
    sum reordered differs by O(K * eps * sum |terms|); with K <= 256 and values
    of unit scale that is well inside it, while a wrong formula (a dropped
    residual, a missed scale) is off by orders of magnitude more.
    """
    x_shape, n = shape
    config = Fp4Config.from_recipe("paper")
    eps = torch.finfo(torch.float32).eps
    for seed in range(3):
        x, w, b, g = _inputs(x_shape, n, torch.float32, seed)
        want = _layer_grads(_semantic, x, w, b, g, config)
        got = _layer_grads(_lowered, x, w, b, g, config)
        for name, a, e in zip(("y", "grad_x", "grad_w", "grad_b"), got, want):
            assert (a - e).abs().max() <= 64 * eps * e.abs().max(), name
        # The residual matters at this bound: dropping it would fail.
        no_comp = Fp4Config.from_recipe("paper", occ_compensate=False)
        y_dropped = _semantic(x, w, b, no_comp)
        assert (y_dropped - want[0]).abs().max() > 1e3 * eps * want[0].abs().max()


class ParallelSites(nn.Module):
    """Quantized sites that all read the inputs, their outputs summed.

    q/k/v-style siblings share one activation; a second input feeds its own
    site. No quantized output is quantized again, and with a loss linear in the
    output every site receives the same gradient in both graphs, so float32
    rounding in the lowering cannot flip an FP4 or E5M2 code: what is left to
    compare is summation order.
    """

    def __init__(self, d=64, n=96):
        super().__init__()
        self.q = nn.Linear(d, n)
        self.k = nn.Linear(d, n, bias=False)
        self.v = nn.Linear(d, n)
        self.other = nn.Linear(2 * d, n)

    def forward(self, x, x2):
        # Distinct factors keep the sites' gradients distinct (Inductor would
        # merge identical weight-gradient GEMMs).
        return self.q(x) + 0.5 * self.k(x) + 3.0 * self.v(x) + self.other(x2)


@pytest.fixture(scope="module")
def compiled_pair(tmp_path_factory):
    """The same float32 model compiled lowered (`fp4`) and semantic (`fp4_aot_eager`).

    The `fp4` compile also writes a graph dump (FP4COMPILE_DUMP_DIR), returned last.
    """
    import os

    from torch._inductor.utils import run_and_get_code

    dump_dir = tmp_path_factory.mktemp("dump")

    torch.manual_seed(0)
    model = ParallelSites()
    x = torch.randn(4, 24, 64)
    x[..., 5] *= 30
    x2 = torch.randn(4, 24, 128)
    x.requires_grad_()
    x2.requires_grad_()
    weights = torch.randn(4, 24, 96)  # the loss's gradient: fixed, whatever the forward rounds to

    def run(backend):
        torch._dynamo.reset()
        fp4compile.reset()
        model.zero_grad()
        x.grad = x2.grad = None
        compiled = torch.compile(model, backend=backend, options={"recipe": "paper"})
        out = compiled(x, x2)
        (out * weights).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone(), x2.grad.clone()]
        return out.detach(), grads, fp4compile.reports()

    os.environ["FP4COMPILE_DUMP_DIR"] = str(dump_dir)
    try:
        (lowered, code) = run_and_get_code(lambda: run("fp4"))
    finally:
        del os.environ["FP4COMPILE_DUMP_DIR"]
    semantic = run("fp4_aot_eager")
    yield lowered, semantic, code, dump_dir
    fp4compile.reset()


@pytest.mark.slow
def test_compiled_lowered_graph_matches_semantic_graph_float32(compiled_pair):
    (out, grads, reports), (out_ref, grads_ref, _), _, _ = compiled_pair
    assert len(reports) == 1 and len(reports[0].quantized) == 4
    eps = torch.finfo(torch.float32).eps
    assert (out - out_ref).abs().max() <= 64 * eps * out_ref.abs().max()
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() <= 64 * eps * g_ref.abs().max()


@pytest.mark.slow
def test_lowered_code_has_one_gemm_per_product_and_no_sparse_compensation(compiled_pair):
    (_, _, reports), _, code, _ = compiled_pair
    forward, backward = code[0], code[-1]
    sites = reports[0].quantized
    assert all(site.lowering.startswith("cpu: one GEMM per product") for site in sites)
    for text in (forward, backward):
        for sparse in ("index_add", "scatter", "gather", "atomic_add"):
            assert sparse not in text, sparse
    # Forward: one GEMM per site. Backward: input and weight gradient per site.
    gemms = lambda text: text.count("extern_kernels.mm(") + text.count("extern_kernels.addmm(")
    assert gemms(forward) == len(sites)
    assert gemms(backward) == 2 * len(sites)
    # The OCC thresholds of both activations (rows of 64 and 128) from the row kernel: no top-k call.
    assert occ_kernel_in_code(forward)
    assert "Float8_e5m2" in backward  # the E5M2 gradient casts are there
    # Their per-tensor scale is bit arithmetic: a frexp here runs as a libm call in every
    # vector iteration of each consumer loop (BENCHMARKS.md: the demo's fp4-direct step
    # at 1.18-1.26x inductor's with it, 1.10-1.14x without).
    assert "frexp" not in backward and "exp2" not in backward
    # Each per-tensor scale (dY's for the input gradient, dY * x_s's for the weight
    # gradient: two per site) is stored once by `fp4compile::stored` and loaded by its
    # loops: its bit arithmetic appears once, and the op is lowered, not called.
    # Inlined into each consumer loop instead, the demo block's backward compiled in
    # 12 s instead of 7.5 s (BENCHMARKS.md).
    assert backward.count("bit_cast<int32_t>") == 2 * len(sites), backward.count("bit_cast<int32_t>")
    assert "fp4compile.stored" not in backward
    # No bool tensor is saved for the backward: Inductor's C++ backend stores and loads
    # bool vectors element by element. A NaN mask per weight element, saved for DGE,
    # cost the demo step about 25 ms of 180 (BENCHMARKS.md, "Where the time goes").
    assert "'bool*'" not in forward and "VecMask<float,1>::from" not in backward
    # Fusion regression guard: the kernel counts of this graph as lowered today.
    kernels = lambda text: text.count("async_compile.cpp_pybinding(")
    assert kernels(forward) <= 4, kernels(forward)
    assert kernels(backward) <= 3, kernels(backward)


@pytest.mark.slow
def test_dump_shows_the_graph_before_and_after_lowering(compiled_pair):
    *_, dump_dir = compiled_pair
    folder = next(dump_dir.glob("graph_*"))
    after = (folder / "after.py").read_text()
    lowered = (folder / "lowered.py").read_text()
    # The semantic graph: sparse compensation per site, one clamp per distinct activation.
    assert after.count("compensate_op(") == 4 and after.count("occ_clamp_op(") == 2
    assert "compensated_activation_op" not in after
    # After lowering: no compensation, one compensated activation per distinct activation.
    assert "compensate_op(" not in lowered and "occ_clamp_op(" not in lowered
    assert lowered.count("compensated_activation_op(") == 2
    assert lowered.count("fp4_gemm_op(") == 4
    with open(folder / "sites.csv", newline="") as f:
        import csv

        rows = list(csv.DictReader(f))
    assert all(row["lowering"].startswith("cpu: one GEMM per product") for row in rows)
