"""The CUDA path: FP8 tensor-core GEMMs (`lowering.cuda_gemm`) and the compiled graph.

Tests marked cuda need a GPU with FP8 tensor cores and are skipped without one.
They compile small models with backend="fp4" and read Inductor's generated code:
a silent fallback to BF16 GEMMs (or to the float32 emulation) must fail, so the
code must hold `_scaled_mm` in the forward and backward and the quantization
kernels (float8 casts, the OCC Triton kernel). Numerics: against the one-piece
`fp4_linear_reference` run eagerly on the same GPU, within a tolerance that
only the GEMM's summation order, its BF16 output rounding and the order of the
compensation sum explain (1e-2 relative, in norm), and far closer to it than an
unquantized model is.

The formulas of `cuda_gemm` (scale orientation, the fold, the fallbacks) are
also checked on CPU where torch's CPU build implements `torch._scaled_mm`.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fp4compile import Fp4Config
from fp4compile.lowering import cuda_gemm
from fp4compile.runtime.gemm import forward_gemm, gradient_gemm
from fp4compile.runtime.quantize import quantize

from .toy_models import with_reference_linears

HAS_FP8_GPU = cuda_gemm.supports_fp8_gemm() if torch.cuda.is_available() else False
needs_fp8_gpu = pytest.mark.skipif(
    not HAS_FP8_GPU,
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)",
)


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
# GPU checks.
# ---------------------------------------------------------------------------


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_cuda_fp8_gemms_equal_runtime_gemms(out_dtype):
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 emulation must be exact per product
    x_q, x_s, w_q, w_s = _grid_operands(256, 512, 384, "cuda")
    bias = torch.randn(384, device="cuda")
    want = forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
    got = cuda_gemm.fp8_forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
    assert cuda_gemm.fp8_gemm_applies(x_q, x_s, w_q, w_s)
    assert _rel(got, want) < (1e-5 if out_dtype == torch.float32 else 1e-2)
    g = torch.randn(256, 384, device="cuda", dtype=torch.bfloat16)
    for gg, q, s in [(g, w_q, w_s), (g.t(), x_q, x_s)]:
        assert _rel(cuda_gemm.fp8_gradient_gemm(gg, q, s), gradient_gemm(gg, q, s, "e5m2")) < 1e-5


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
    compiled = torch.compile(model, backend="fp4", options={"recipe": recipe})
    outs, code = run_and_get_code(lambda: _run_step(model, compiled, x, grad_out))
    reports = fp4compile.reports()
    assert reports and len(reports[0].quantized) == 2, "both linears must be quantized"

    forward, backward = code[0], code[-1]
    assert "_scaled_mm" in forward, "forward GEMMs are not FP8 (_scaled_mm missing)"
    assert backward.count("_scaled_mm") >= 2, "gradient GEMMs are not FP8 (_scaled_mm missing)"
    assert "float8e4nv" in forward or "float8_e4m3fn" in forward, "no E4M3 cast in the forward"
    assert "float8e5" in backward or "float8_e5m2" in backward, "no E5M2 gradient cast in the backward"
    if recipe == "paper":
        assert "_occ_rows_kernel" in forward, "the OCC Triton kernel is not in the forward"

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
