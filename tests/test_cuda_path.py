"""The CUDA path: FP8 tensor-core GEMMs (`lowering.cuda_gemm`), the channel
compensation (`lowering.cuda_compensation`) and the compiled graph.

On CPU (always run):
- the GEMMs of one quantized linear, traced to aten ops (AOTAutograd) from the
  graph the CUDA lowering produces, with `_scaled_mm` admitted on CPU tensors:
  exactly three `_scaled_mm` (forward, input gradient, weight gradient), and
  for `paper` exactly two more GEMMs, the channel compensation's (forward and
  weight gradient), and no other `mm`: a quantized site that fell back to a
  float32 GEMM fails here;
- the channel compensation against the reference `compensate_op` on random
  sparse residuals of several shapes (row and tensor scope, ragged, channels
  concentrated or scattered): float64 to rounding, and the bf16 hi/lo split
  within its stated bound;
- the formulas of `cuda_gemm` where torch's CPU build implements `_scaled_mm`;
- `benchmarks/gpu_check.py` refuses cleanly without CUDA.

Tests marked cuda need a GPU with FP8 tensor cores and are skipped without one.
They compile small models with backend="fp4" and read Inductor's generated code
(`_scaled_mm` in the forward and backward, the float8 casts, the OCC Triton
kernel). Tolerances come from FP8 accumulation: products of FP8 grid values are
exact, but Hopper's FP8 tensor cores add them in an accumulator with about 14
significant bits and promote to float32 every 128 products of the reduction
(no fast accumulation). Within one chunk a sum of 128 products is formed in
about log2(128) = 7 reduced-precision additions, so each output may be off by
up to 7 * 2**-13 of the sum of the magnitudes of its products (the float32
promotions add a further 2**-24 per chunk): `_fp8_accumulation_bound` is that
elementwise bound, `|A| @ |B| * 7 * 2**-13`, plus the output's own rounding.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fp4compile import Fp4Config
from fp4compile.lowering import cuda_compensation, cuda_gemm
from fp4compile.runtime.gemm import forward_gemm, gradient_gemm
from fp4compile.runtime.linear_ops import compensate_op
from fp4compile.runtime.quantize import quantize

from .toy_models import with_reference_linears

HAS_FP8_GPU = cuda_gemm.supports_fp8_gemm() if torch.cuda.is_available() else False
needs_fp8_gpu = pytest.mark.skipif(
    not HAS_FP8_GPU,
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)",
)


# FP8 tensor-core accumulation (see the module docstring): ~7 additions at 2**-13 per chunk.
FP8_ACCUMULATION_EPS = 7 * 2.0**-13
BF16_ROUNDING = 2.0**-8  # a bfloat16 output: round to nearest, 8-bit significand


def _fp8_accumulation_bound(a_abs_b_abs: torch.Tensor, want: torch.Tensor, out_dtype) -> torch.Tensor:
    """Elementwise |got - want| allowed for an FP8 GEMM whose exact products sum to `want`."""
    bound = FP8_ACCUMULATION_EPS * a_abs_b_abs + 2.0**-24 * want.abs()
    if out_dtype == torch.bfloat16:
        bound = bound + BF16_ROUNDING * want.abs()
    return bound


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grid_operands(m, k, n, device, fmt="e2m1", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(m, 1, generator=gen))
    w = torch.randn(n, k, generator=gen) * 0.05
    x_q, x_s = quantize(x, "row", fmt)
    w_q, w_s = quantize(w, "row", fmt)
    return [t.to(device) for t in (x_q, x_s, w_q, w_s)]


def _cpu_scaled_mm_available() -> bool:
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        torch._scaled_mm(a.to(torch.float8_e5m2), a.t(), scale_a=torch.ones(()), scale_b=torch.ones(()),
                         out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


# ---------------------------------------------------------------------------
# Device-independent checks (CPU).
# ---------------------------------------------------------------------------


def test_fp8_gemm_does_not_apply_to_cpu_tensors():
    x_q, x_s, w_q, w_s = _grid_operands(32, 64, 48, "cpu")
    assert not cuda_gemm.fp8_gemm_applies(x_q, x_s, w_q, w_s)
    assert not cuda_gemm.supports_fp8_gemm("cpu")
    if not torch.cuda.is_available():
        assert not cuda_gemm.supports_fp8_gemm()


@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["e2m1", "e4m3"])
def test_scaled_fp8_gemm_formula_equals_forward_gemm_on_cpu(out_dtype, fmt):
    x_q, x_s, w_q, w_s = _grid_operands(40, 64, 48, "cpu", fmt)
    bias = torch.randn(48)
    want = forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
    got = cuda_gemm.fp8_forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert got.dtype == out_dtype and got.shape == want.shape
    # Products of grid values are exact; float32 output: summation order only.
    # bfloat16: the row-wise kernel rounds once more (bias added after it).
    assert _rel(got, want) < (1e-6 if out_dtype == torch.float32 else 1e-2)
    # Tensor-wise scales expand to rows and columns.
    got_t = cuda_gemm.fp8_forward_gemm(x_q, x_s.amax().reshape(1, 1), w_q, w_s, None, torch.float32)
    want_t = forward_gemm(x_q, x_s.amax().reshape(1, 1), w_q, w_s, None, torch.float32)
    assert _rel(got_t, want_t) < 1e-6


@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("m", [64, 30])  # 30 rows: the weight gradient's reduction is unaligned -> fallback
def test_fp8_gradient_gemm_formula_equals_gradient_gemm_on_cpu(m):
    x_q, x_s, w_q, w_s = _grid_operands(m, 64, 48, "cpu")
    g = torch.randn(m, 48).to(torch.bfloat16)
    # Input gradient g @ dequant(w); weight gradient g.T @ dequant(x).
    for gg, q, s in [(g, w_q, w_s), (g.t(), x_q, x_s)]:
        want = gradient_gemm(gg, q, s, "e5m2")
        got = cuda_gemm.fp8_gradient_gemm(gg, q, s, "e5m2")
        assert got.shape == want.shape and got.dtype == torch.float32
        assert _rel(got, want) < 1e-6


# ---------------------------------------------------------------------------
# The GEMMs of one quantized linear, as aten ops (CPU).
# ---------------------------------------------------------------------------

_GEMM_OPS = ("_scaled_mm", "mm", "bmm", "addmm", "matmul", "baddbmm", "dot", "mv")


def _aten_gemms_of_lowered_linear(recipe, m=32, k=256, n=48, overrides=None, all_ops=None):
    """[(op name, input shapes)] of every GEMM in the fwd and bwd aten graphs of one
    bf16 `nn.Linear(k, n)` under `recipe`, lowered for CUDA as on an FP8 GPU and run
    on CPU tensors (torch's CPU `_scaled_mm` stands in for the tensor cores)."""
    from torch._dynamo.backends.common import aot_autograd

    import fp4compile
    from fp4compile.backend import prepare
    from fp4compile.lowering import cuda

    graphs = []

    def keep(gm, _inputs):
        from functorch.compile import make_boxed_func

        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        with cuda.assume_fp8_tensor_cores(True):
            prepare(gm, example_inputs, {"recipe": recipe, "target": "cuda", "cuda_size_policy": False,
                                         **(overrides or {})}, "fp4", lower=True)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    torch._dynamo.reset()
    fp4compile.reset()
    torch.manual_seed(0)
    layer = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    with cuda_gemm.admit_cpu_tensors():
        torch.compile(layer, backend=backend, dynamic=False)(x).float().square().sum().backward()
    torch._dynamo.reset()
    gemms = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if all_ops is not None and node.op == "call_function":
                all_ops.append(getattr(node.target, "__name__", str(node.target)))
            if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _GEMM_OPS:
                shapes = [tuple(a.meta["val"].shape) for a in node.args[:2] if isinstance(a, torch.fx.Node)]
                gemms.append((node.target.__name__.split(".")[0], shapes))
    assert len(graphs) == 2, "expected one forward and one backward graph"
    return gemms


@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("recipe,compensation", [("fp8", None), ("fp4-direct", None), ("paper", "fp8_folded"),
                                                 ("paper", "channels")])
def test_quantized_linear_has_three_fp8_gemms_and_only_the_designed_others(recipe, compensation):
    m, k, n = 32, 256, 48
    overrides = {"cuda_compensation": compensation} if compensation else None
    ops = []
    gemms = _aten_gemms_of_lowered_linear(recipe, m, k, n, overrides, ops)
    scaled = [g for g in gemms if g[0] == "_scaled_mm"]
    others = [g for g in gemms if g[0] != "_scaled_mm"]
    # Forward [M, K] x [K, N]; input gradient [M, N] x [N, K]; weight gradient [N, M] x [M, K].
    assert sorted(s for _, s in scaled) == sorted([[(m, k), (k, n)], [(m, n), (n, k)], [(n, m), (m, k)]]), gemms
    if compensation != "channels":
        # fp8, fp4-direct, and paper with the compensation folded into the activation codes:
        # exactly the three FP8 GEMMs, no compensation GEMM, no float32 mm.
        assert others == [], f"a quantized site runs a non-FP8 GEMM: {others}"
        sparse = [op for op in ops if op.split(".")[0] in ("gather", "scatter", "scatter_add", "index_add",
                                                            "index_put", "index", "index_select")]
        assert sparse == [], f"no gather or scatter without a sparse compensation: {sparse}"
        return
    # channels: exactly the channel compensation's two GEMMs, over |C| = 128 < K channels
    # (on CPU float32 they run unsplit: [M, |C|] x [|C|, N] and [N, M] x [M, |C|]).
    cap = cuda_compensation.channel_cap(k)
    assert cap == 128 < k
    assert sorted(s for _, s in others) == sorted([[(m, cap), (cap, n)], [(n, m), (m, cap)]]), gemms


# ---------------------------------------------------------------------------
# The folded compensation (cuda_compensation="fp8_folded") against the reference (CPU).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,n", [((37, 100), 48), ((64, 256), 32), ((2, 19, 160), 24)])
def test_folded_lowering_matches_reference_within_the_e4m3_bound_float64(x_shape, n):
    """`folded_activation_op` + `folded_fp8_gemm_op` against the semantic ops, float64.

    y: the folded product must equal (codes * scale) @ dequant(W).T to float64
    rounding (the GEMM wiring), and differ from the exact compensation by at most
    the fold's error, |y - y_ref| <= fold_error_bound(v, 2**e) * x_s @ |dequant(W)|.T
    (outliers only; non-outliers are exact). dx: the same input-gradient GEMM
    (float64 rounding). dW (before DGE): the same E5M2 gradient operand (no row
    falls back here, asserted) times codes instead of x_q + r / x_s: at most
    (|g_op| @ fold_error_bound) * g_scale. A dropped compensation exceeds these.
    """
    from fp4compile.lowering import cuda
    from fp4compile.runtime import folded
    from fp4compile.runtime.gemm import gradient_operand
    from fp4compile.runtime.linear_ops import fp4_gemm_op, occ_clamp_op, quantize_activation_op
    from fp4compile.runtime.occ import occ_split, occ_thresholds

    gen = torch.Generator().manual_seed(sum(x_shape) + n)
    k = x_shape[-1]
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    x[..., torch.randperm(k, generator=gen)[: max(1, k // 40)]] *= 20
    w_q, w_s = quantize(torch.randn(n, k, generator=gen, dtype=torch.float64) * 0.05, "row", "e2m1")
    bias = torch.randn(n, generator=gen, dtype=torch.float64)
    grad_y = torch.randn(*x_shape[:-1], n, generator=gen, dtype=torch.float64)

    def run(fn):
        xx = x.clone().requires_grad_()
        ww = w_q.clone().requires_grad_()
        y = fn(xx, ww)
        y.backward(grad_y)
        return y.detach(), xx.grad, ww.grad

    def semantic(xx, ww):
        clamped, values, index = occ_clamp_op(xx, 99, 100, "row")
        x_q, x_s = quantize_activation_op(clamped, "e2m1", "row")
        y = fp4_gemm_op(x_q, x_s, ww, w_s, bias, "e5m2", torch.float64, True)
        return y + compensate_op(values, index, xx.shape, x_s, ww, w_s, "e5m2", torch.float64)

    def lowered(xx, ww):
        codes, scale = cuda.folded_activation_op(xx, 99, 100, "row", "e2m1", "row", True)
        assert codes.dtype == torch.float64  # float64 keeps float64 codes (reference products)
        return cuda.folded_fp8_gemm_op(xx, codes, scale, ww, w_s, bias, "e5m2", torch.float64)

    y_ref, dx_ref, dw_ref = run(semantic)
    y, dx, dw = run(lowered)
    codes, scale = cuda.folded_activation_op(x, 99, 100, "row", "e2m1", "row", True)
    w_deq = w_q * w_s
    oracle = (codes * scale) @ w_deq.t() + bias
    assert torch.allclose(y, oracle, rtol=1e-12, atol=1e-12 * oracle.abs().max().item())
    upper, lower = occ_thresholds(x, 99, 100, "row")
    clamped, residual = occ_split(x, upper, lower)
    x_q, x_s = quantize(clamped, "row", "e2m1")
    factor = scale / x_s
    assert bool((factor == 1).all())
    v = x_q + residual / x_s
    entry_bound = folded.fold_error_bound(v, factor) * (residual != 0)
    slack = 1e-12 * (x.abs() @ w_deq.abs().t())
    bound_y = (entry_bound * x_s) @ w_deq.abs().t() + slack
    assert ((y - y_ref).abs() <= bound_y).all()
    # Not vacuous: dropping the compensation (x_q alone) breaks the bound.
    dropped = (x_q * x_s) @ w_deq.t() + bias
    assert not ((dropped - y_ref).abs() <= bound_y).all()
    assert torch.allclose(dx, dx_ref, rtol=1e-12, atol=1e-12 * dx_ref.abs().max().item())
    g2 = grad_y.reshape(-1, n)
    g_op, g_scale, _ = gradient_operand(g2.t(), x_s.reshape(-1, 1), "e5m2", torch.float64)
    bound_w = (g_op.abs() @ entry_bound.reshape(-1, k)) * g_scale + 1e-12 * dw_ref.abs().max()
    assert ((dw - dw_ref).abs() <= bound_w).all()


@pytest.mark.skipif(not _cpu_scaled_mm_available(), reason="this torch build has no CPU torch._scaled_mm")
@pytest.mark.parametrize("m,k,n", [(48, 128, 32), (30, 256, 64)])  # 30 tokens: unaligned weight-gradient fallback
def test_folded_fp8_gemms_on_cpu_scaled_mm_equal_their_float64_oracle(m, k, n, monkeypatch):
    """The folded path with float8 codes through torch's CPU `_scaled_mm` (as on an FP8 GPU).

    Its three products must be those of the codes: y = (codes * scale) @ dequant(W).T,
    dx = E5M2 gradient GEMM against W (returned in x's dtype), dW = E5M2(dY.T * scale) @ codes
    (then the gradient scale); float32 outputs, so float32 summation only (rel 1e-5).
    """
    from fp4compile.lowering import cuda
    from fp4compile.runtime.gemm import gradient_gemm as reference_gradient

    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen)
    x[:, :3] *= 40
    w_q, w_s = quantize(torch.randn(n, k, generator=gen) * 0.05, "row", "e2m1")
    grad_y = torch.randn(m, n, generator=gen)
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(a[0].dtype) or scaled_mm(*a, **kw))
    with cuda_gemm.admit_cpu_tensors():
        codes, scale = cuda.folded_activation_op(x, 99, 100, "row", "e2m1", "row", True)
        assert codes.dtype == torch.float8_e4m3fn
        xx = x.clone().requires_grad_()
        ww = w_q.clone().requires_grad_()
        y = cuda.folded_fp8_gemm_op(xx, codes, scale, ww, w_s, None, "e5m2", torch.float32)
        y.backward(grad_y)
    # Forward (E4M3 codes) and input gradient (E5M2) always; the weight gradient reduces over
    # the M tokens, so an unaligned M (30) takes the float32 path.
    assert calls == [torch.float8_e4m3fn, torch.float8_e5m2] + ([torch.float8_e5m2] if m % 16 == 0 else [])
    c64, s64, w64 = codes.double(), scale.double(), (w_q * w_s).double()
    assert _rel(y, (c64 * s64) @ w64.t()) < 1e-5
    assert xx.grad.dtype == x.dtype
    assert _rel(xx.grad, reference_gradient(grad_y.double(), w_q.double(), w_s.double(), "e5m2")) < 1e-5
    assert _rel(ww.grad, reference_gradient(grad_y.t().double(), c64, s64, "e5m2")) < 1e-5


# ---------------------------------------------------------------------------
# The channel compensation against the reference compensate_op (CPU).
# ---------------------------------------------------------------------------


def _sparse_residual(x_shape, scope, concentrated, seed, dtype=torch.float64):
    """(values, index, x_scale, w_q, w_scale) of a random activation with OCC applied.

    `concentrated`: a few outlier channels dominate (real activations); else the
    2c entries of each row fall wherever the row's extremes are.
    """
    from fp4compile.runtime.linear_ops import occ_clamp_op, quantize_activation_op

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen, dtype=dtype)
    k = x_shape[-1]
    if concentrated:
        channels = torch.randperm(k, generator=gen)[: max(1, k // 40)]
        x[..., channels] *= 30
    clamped, values, index = occ_clamp_op(x, 99, 100, scope)
    _, x_s = quantize_activation_op(clamped, "e2m1", "row")
    n = 16 + 8 * (seed % 3)
    w_q, w_s = quantize(torch.randn(n, k, generator=gen, dtype=dtype) * 0.05, "row", "e2m1")
    return values, index, x_s, w_q, w_s


CASES = [  # (x_shape, scope, concentrated)
    ((37, 100), "row", True),
    ((64, 256), "row", True),
    ((64, 256), "row", False),
    ((2, 19, 160), "row", True),
    ((17000, 24), "row", False),  # rows beyond 16k
    ((48, 200), "tensor", True),
    ((33, 300), "tensor", False),
]


def _compensation_and_grad(op, values, index, x_shape, x_s, w_q, w_s, grad_y):
    w = w_q.detach().clone().requires_grad_()
    y = op(values, index, torch.Size(x_shape), x_s, w, w_s, "e5m2", values.dtype)
    y.backward(grad_y)
    return y.detach(), w.grad


@pytest.mark.parametrize("x_shape,scope,concentrated", CASES)
def test_channel_compensation_equals_reference_float64(x_shape, scope, concentrated):
    for seed in range(2):
        values, index, x_s, w_q, w_s = _sparse_residual(x_shape, scope, concentrated, seed)
        grad_y = torch.randn(*x_shape[:-1], w_q.shape[0], dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed + 10))
        want_y, want_g = _compensation_and_grad(compensate_op, values, index, x_shape, x_s, w_q, w_s, grad_y)
        got_y, got_g = _compensation_and_grad(cuda_compensation.channel_compensate_op, values, index, x_shape,
                                              x_s, w_q, w_s, grad_y)
        # Same products, reordered sums (and (v * w_q) * w_s for v * (w_q * w_s)): float64 rounding only.
        assert torch.allclose(got_y, want_y, rtol=1e-12, atol=1e-12 * want_y.abs().max().item())
        assert torch.allclose(got_g, want_g, rtol=1e-12, atol=1e-12 * want_g.abs().max().item())


def test_channel_selection_covers_concentrated_outliers_and_leaves_the_rest_sparse():
    values, index, _, _, _ = _sparse_residual((64, 4096), "row", True, 0)
    rows, cols, vals, m, k = cuda_compensation.residual_entries(values, index, (64, 4096))
    counts = cuda_compensation.residual_column_counts(cols, vals, k)
    channels = cuda_compensation.select_channels(counts, cuda_compensation.channel_cap(k))
    assert channels.shape == (128,) and bool((channels[1:] > channels[:-1]).all())
    r_c, rest = cuda_compensation.split_residual(rows, cols, vals, channels, m, k)
    # Nothing lost, nothing counted twice: the two parts hold every entry once.
    assert torch.isclose(r_c.sum() + rest.sum(), vals.sum(), rtol=1e-12)
    assert int((rest != 0).sum()) + int((r_c != 0).sum()) == int((vals != 0).sum())
    # The 102 outlier channels are all in C, and hold most of the residual's mass.
    assert float(r_c.abs().sum()) > 0.9 * float(vals.abs().sum())


@pytest.mark.parametrize("x_shape,scope,concentrated", [c for c in CASES if c[0][0] < 10000])
def test_channel_compensation_bf16_split_within_stated_bound(x_shape, scope, concentrated):
    """The tensor-core form (R[:, C] as bf16 hi + lo, float32 accumulation) run on CPU.

    Bound (lowering/cuda_compensation.py): |y - y_ref| <= (2**-16 + (J + 2) * 2**-24)
    * (|R| @ |dequant(W)|.T) with J the number of terms summed; the same for the
    weight gradient with the gradient operand. float32 here, against float64.
    """
    values, index, x_s, w_q, w_s = _sparse_residual(x_shape, scope, concentrated, 3, torch.float32)
    rows, cols, vals, m, k = cuda_compensation.residual_entries(values, index, x_shape)
    y, saved = cuda_compensation.channel_compensation(values, index, x_shape, w_q, w_s, bf16_split=True)
    dense = torch.zeros(m, k, dtype=torch.float64).index_put_((rows, cols), vals.double(), accumulate=True)
    w_deq = w_q.double() * w_s.double()
    want = dense @ w_deq.t()
    j = 2 * cuda_compensation.channel_cap(k) + vals.numel() // max(m, 1) + 2
    bound = (2.0**-16 + (j + 2) * 2.0**-24) * (dense.abs() @ w_deq.abs().t())
    assert ((y.double() - want).abs() <= bound).all()
    # The split is not a no-op: the unsplit bf16 product would miss this bound on float32 residuals.
    hi_only = dense.to(torch.bfloat16).double() @ w_deq.t()
    assert not ((hi_only - want).abs() <= 2.0**-16 * (dense.abs() @ w_deq.abs().t())).all()
    # Weight gradient.
    grad_y = torch.randn(m, w_q.shape[0], generator=torch.Generator().manual_seed(7))
    got_g = cuda_compensation.channel_weight_gradient(grad_y, *saved, x_s, k, "e5m2", bf16_split=True)
    want_g = cuda_compensation.channel_weight_gradient(grad_y, *saved, x_s, k, "e5m2", bf16_split=False)
    from fp4compile.runtime.gemm import gradient_operand

    g_op, g_scale, _ = gradient_operand(grad_y.t(), x_s.reshape(-1, x_s.shape[-1]), "e5m2", torch.float32)
    r_scaled = dense / x_s.reshape(-1, 1).double()
    magnitude = (g_op.double().abs() @ r_scaled.abs()) * g_scale.double()
    bound_g = (2.0**-16 + 2 * (m + 2) * 2.0**-24) * magnitude
    assert ((got_g.double() - want_g.double()).abs() <= bound_g).all()


def test_channel_compensation_has_no_data_dependent_shape():
    """C has |C| = cap(K) entries whatever the residual: no recompile, no host sync."""
    for concentrated in (True, False):
        values, index, _, _, _ = _sparse_residual((40, 300), "row", concentrated, 1)
        rows, cols, vals, m, k = cuda_compensation.residual_entries(values, index, (40, 300))
        channels = cuda_compensation.select_channels(cuda_compensation.residual_column_counts(cols, vals, k),
                                                     cuda_compensation.channel_cap(k))
        assert channels.shape == (128,)
    zero = torch.zeros(5, 6, dtype=torch.float64)
    channels = cuda_compensation.select_channels(
        cuda_compensation.residual_column_counts(torch.zeros(30, dtype=torch.int64), zero.reshape(-1), 300), 128)
    assert channels.shape == (128,)


# ---------------------------------------------------------------------------
# The prepared GPU check refuses cleanly without CUDA.
# ---------------------------------------------------------------------------


def test_gpu_check_refuses_without_cuda():
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu-check: no CUDA GPU on this machine")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------
# GPU checks.
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(256, 512, 384), (1024, 4096, 512)])
def test_cuda_fp8_gemms_equal_runtime_gemms_within_fp8_accumulation(out_dtype, m, k, n):
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 emulation must be exact per product
    x_q, x_s, w_q, w_s = _grid_operands(m, k, n, "cuda")
    bias = torch.randn(n, device="cuda")
    want = forward_gemm(x_q.double(), x_s.double(), w_q.double(), w_s.double(), bias.double(), torch.float64)
    got = cuda_gemm.fp8_forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert cuda_gemm.fp8_gemm_applies(x_q, x_s, w_q, w_s)
    magnitude = (x_q.abs().double() @ w_q.abs().double().t()) * x_s.double() * w_s.double().reshape(1, -1)
    # Beyond the accumulation: the scale multiplications and the bias add round
    # once each in the output dtype (bf16: the bias is also rounded to bf16 first).
    output_rounding = (BF16_ROUNDING if out_dtype == torch.bfloat16 else 4 * 2.0**-24) * (
        want.abs() + 2 * bias.double().abs())
    err = (got.double() - want).abs()
    assert (err <= _fp8_accumulation_bound(magnitude, want, torch.float32) + output_rounding).all(), err.max()
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    for gg, q, s in [(g, w_q, w_s), (g.t(), x_q, x_s)]:
        # Same fold and E5M2 cast as the FP8 path (float32), then an exact-product
        # float32 GEMM (TF32 off): only the two summation orders differ.
        want = gradient_gemm(gg, q, s, "e5m2").double()
        got = cuda_gemm.fp8_gradient_gemm(gg, q, s).double()
        g_op = (gg.float() * s.float().reshape(1, -1)).double()
        magnitude = 1.125 * g_op.abs() @ q.abs().double()  # |E5M2(v)| <= 1.125 |v| (2-bit mantissa)
        bound = _fp8_accumulation_bound(magnitude, want, torch.float32) + q.shape[0] * 2.0**-24 * magnitude
        assert ((got - want).abs() <= bound).all()


class _Mlp(nn.Module):
    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _run_step(model, fn, x, grad_out):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad_out)
    return [y.detach(), x.grad] + [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("recipe", ["paper", "fp8"])
def test_compiled_model_runs_fp8_gemms_and_quantize_kernels(recipe):
    from torch._inductor.utils import run_and_get_code

    import fp4compile

    torch.manual_seed(0)
    model = _Mlp().to("cuda", torch.bfloat16)
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)
    x[..., [5, 77]] *= 40  # outlier channels: OCC has something to clamp
    grad_out = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)

    fp4compile.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fp4", options={"recipe": recipe, "cuda_size_policy": False})
    outs, code = run_and_get_code(lambda: _run_step(model, compiled, x, grad_out))
    reports = fp4compile.reports()
    assert reports and len(reports[0].quantized) == 2, "both linears must be quantized"

    import re

    forward, backward = code[0], code[-1]
    calls = re.compile(r"\b_scaled_mm(?:\.default)?\(")
    # Two linears: one FP8 forward GEMM each, two FP8 gradient GEMMs each.
    assert len(calls.findall(forward)) == 2, "forward GEMMs are not all FP8 (_scaled_mm)"
    assert len(calls.findall(backward)) == 4, "gradient GEMMs are not all FP8 (_scaled_mm)"
    assert "float8e4nv" in forward or "float8_e4m3fn" in forward, "no E4M3 cast in the forward"
    assert "float8e5" in backward or "float8_e5m2" in backward, "no E5M2 gradient cast in the backward"
    if recipe == "paper":  # cuda_compensation="fp8_folded" (default): one folded activation kernel
        assert "_folded_rows_kernel" in forward, "the folded OCC Triton kernel is not in the forward"
        assert "_occ_rows_kernel" not in forward and "index_add" not in backward

    config = Fp4Config.from_recipe(recipe)
    reference = with_reference_linears(copy.deepcopy(model), config)
    want = _run_step(reference, reference, x, grad_out)
    plain = _run_step(model, model, x, grad_out)
    names = ["y", "grad x"] + [f"grad {n}" for n, _ in model.named_parameters()]
    for name, got, ref, unquantized in zip(names, outs, want, plain):
        err = _rel(got, ref)
        assert err < 1e-2, f"{recipe} {name}: relative error {err:.2e} to fp4_linear_reference"
        if name in ("y", "grad x"):
            assert err < 0.2 * _rel(unquantized, ref), f"{recipe} {name}: no closer to the reference than BF16"
