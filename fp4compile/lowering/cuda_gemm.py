"""The GEMMs of a quantized linear layer on CUDA FP8 tensor cores (`torch._scaled_mm`).

On CPU, `runtime.gemm` multiplies grid values in float32: products of E2M1 and
E4M3 values are exact there. On a GPU that would be a float32 GEMM, slower than
the BF16 baseline. But every E2M1 (and E4M3) grid value is a float8_e4m3fn
number and every E5M2-cast gradient a float8_e5m2 number, so the same sums of
products run on FP8 tensor cores (Hopper, Ada: compute capability >= 8.9), with
the scales applied in the epilogue (SPEC.md section 5):

    forward      y  = (x_fp8 @ w_fp8.T) * scale_x[M, 1] * scale_w[1, N]   row-wise scaled
    input grad   dx = (g_fp8 @ w_fp8) * scale_g                           per-tensor scaled
    weight grad  dw = (g_fp8.T @ x_fp8) * scale_g                         per-tensor scaled

(the gradient's operand row scale is folded into g before its E5M2 cast, as
`gemm.gradient_gemm` does, so both gradient GEMMs are pure FP8 with one scalar).

Why `torch._scaled_mm` and not a Triton matmul template: it is an aten op, so
AOTAutograd traces it as is and Inductor lowers it (cuBLASLt / CUTLASS row-wise
kernels as an extern call, or Inductor's own Triton scaled-mm template under
`max_autotune`), with no custom-op plumbing; and its row-wise kernels are
NVIDIA's tuned ones. Its constraints, checked by `fp8_gemm_applies`:

- row-wise scaling (one fp32 scale per row of A and per column of B) needs a
  bfloat16 output; other output dtypes take a per-tensor unit-scaled FP8 GEMM
  with float32 output, and the row scales multiply that (Inductor fuses it);
- the reduction and output dimensions must be multiples of 16; the left
  operand row-major, the right one column-major;
- E5M2 x E4M3 is allowed (the gradient GEMMs), E5M2 x E5M2 is not.

Everything here is numerically `runtime.gemm`'s computation; only the
summation order of the tensor cores and the output rounding differ.

What the compiled model calls: `lowering/cuda.py`'s `fp8_gemm_op` runs
`fp8_forward_gemm` (forward, bf16 output with a bf16 model) and
`fp8_gradient_gemm` (both gradient GEMMs, float32 output, then cast by
Inductor), with `use_fast_accum` off. `admit_cpu_tensors` lets the same path
take CPU tensors (torch's CPU `_scaled_mm`), so tests can trace and run the FP8
GEMM graph without a GPU.
"""
from __future__ import annotations

import contextlib

import torch

from ..runtime.quantize import quantize_gradient

__all__ = [
    "FP8_MIN_CAPABILITY",
    "GEMM_ALIGNMENT",
    "supports_fp8_gemm",
    "fp8_gemm_applies",
    "fp8_gradient_applies",
    "to_e4m3",
    "scaled_fp8_gemm",
    "scaled_gradient_gemm",
    "fp8_forward_gemm",
    "fp8_gradient_gemm",
]

# FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards.
FP8_MIN_CAPABILITY = (8, 9)
# cuBLASLt FP8 GEMMs need 16-byte aligned leading dimensions: multiples of 16 elements.
GEMM_ALIGNMENT = 16


# Set only by `admit_cpu_tensors`: CPU tensors then count as FP8-capable where
# this torch build has a CPU `_scaled_mm`, so that the aten graph of the FP8
# path can be traced and run on a CPU (tests, inspection).
_ADMIT_CPU_TENSORS = False


@contextlib.contextmanager
def admit_cpu_tensors():
    """Let the FP8 GEMM path take CPU tensors (torch's CPU `_scaled_mm`): for tests on CPU."""
    global _ADMIT_CPU_TENSORS
    previous, _ADMIT_CPU_TENSORS = _ADMIT_CPU_TENSORS, True
    try:
        yield
    finally:
        _ADMIT_CPU_TENSORS = previous


def _on_fp8_device(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return supports_fp8_gemm(t.device)
    return _ADMIT_CPU_TENSORS and t.device.type == "cpu" and hasattr(torch, "_scaled_mm")


def supports_fp8_gemm(device=None) -> bool:
    """Whether `device` (default: the current CUDA device) runs `torch._scaled_mm` on FP8 tensor cores."""
    if not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def _is_vector_scale(scale: torch.Tensor, rows: int) -> bool:
    return scale.shape[-1] == 1 and scale.numel() in (1, rows)


def fp8_gemm_applies(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """Whether the forward and both gradient GEMMs of this layer can run on FP8 tensor cores.

    x_q [M, K] and w_q [N, K] must hold FP8-representable grid values (the caller
    knows: both operands quantized to E2M1 or E4M3) with row or tensor scales,
    on a CUDA device with FP8 tensor cores; K and N multiples of 16. (M is the
    weight gradient's reduction dimension: see `scaled_gradient_gemm`.)
    """
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.device != w_q.device:
        return False
    if torch.float64 in (x_q.dtype, w_q.dtype):
        return False  # float64 models are for exact comparisons: keep the float64 emulation
    (m, k), n = x_q.shape, w_q.shape[0]
    if not (_is_vector_scale(x_scale, m) and _is_vector_scale(w_scale, n)):
        return False
    if k % GEMM_ALIGNMENT or n % GEMM_ALIGNMENT:
        return False
    return _on_fp8_device(x_q)


def fp8_gradient_applies(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether `gradient_gemm(g, q, scale, "e5m2")` can run in FP8: q [R, C] grid values
    (caller's knowledge) on an FP8-capable CUDA device, a row or tensor scale, not
    float64. Unaligned R or C are handled inside `fp8_gradient_gemm` (float32 path)."""
    if q.dim() != 2 or q.dtype == torch.float64:
        return False
    return _is_vector_scale(scale, q.shape[0]) and _on_fp8_device(q)


def to_e4m3(values: torch.Tensor) -> torch.Tensor:
    """Grid values as float8_e4m3fn: an exact conversion for E2M1 and E4M3 grid values."""
    return values if values.dtype == torch.float8_e4m3fn else values.to(torch.float8_e4m3fn)


def _column_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A row or tensor scale as a contiguous float32 [n, 1] column (what _scaled_mm wants)."""
    scale = scale.to(torch.float32).reshape(-1, 1)
    return scale.expand(n, 1).contiguous() if scale.shape[0] == 1 else scale.contiguous()


def _unit_scale(device) -> torch.Tensor:
    return torch.ones((), device=device, dtype=torch.float32)


def scaled_fp8_gemm(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """y = (x_fp8 @ w_fp8.T) * x_scale * w_scale.T + bias, on FP8 tensor cores.

    x_fp8 [M, K] and w_fp8 [N, K] are float8_e4m3fn, row-major (w_fp8.T is then
    the column-major right operand _scaled_mm wants, with no copy); x_scale
    [M, 1] and w_scale [N, 1] (or one element each) are dequantization scales.
    bfloat16 output: one row-wise scaled GEMM with the scales in its epilogue.
    Other dtypes: a unit-scaled FP8 GEMM with float32 output, times the scales
    in float32 (as `runtime.gemm.forward_gemm` applies them), then cast.
    `use_fast_accum` trades the periodic FP32 promotion of Hopper's FP8
    accumulation for speed; off by default (the grid sums are then exact in
    FP32 up to summation order).
    """
    m, n = x_fp8.shape[0], w_fp8.shape[0]
    scale_a = _column_scale(x_scale, m)
    scale_b = _column_scale(w_scale, n).reshape(1, n)
    if out_dtype == torch.bfloat16:
        y = torch._scaled_mm(
            x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
            use_fast_accum=use_fast_accum,
        )
        # Bias after the GEMM: the row-wise kernels' bias support varies across
        # builds, and Inductor fuses the add with the consumer anyway.
        return y if bias is None else y + bias.to(y.dtype)
    one = _unit_scale(x_fp8.device)
    acc = torch._scaled_mm(
        x_fp8, w_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=use_fast_accum
    )
    y = acc * scale_a * scale_b
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def scaled_gradient_gemm(
    g_fp8: torch.Tensor, g_scale: torch.Tensor, q_fp8: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(g_fp8 @ q_fp8) * g_scale for an E5M2 gradient g [P, R] and E4M3 grid values q [R, C].

    Per-tensor scaled (the operand's row scale is already folded into g).
    `q_fp8` is made column-major (one transposed FP8 copy, R * C bytes: a
    row-major [R, C] operand is the transpose of what _scaled_mm takes).
    R and C must be multiples of 16; `fp8_gradient_gemm` checks and falls back.
    """
    q_col_major = q_fp8.t().contiguous().t()
    return torch._scaled_mm(
        g_fp8.contiguous(),
        q_col_major,
        scale_a=g_scale.to(torch.float32).reshape(()),
        scale_b=_unit_scale(g_fp8.device),
        out_dtype=out_dtype,
    )


def fp8_forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """`runtime.gemm.forward_gemm` for grid-valued operands with vector scales, on FP8 tensor cores."""
    return scaled_fp8_gemm(to_e4m3(x_q), x_scale, to_e4m3(w_q), w_scale, bias, out_dtype)


def fp8_gradient_gemm(g, q, scale, grad_fmt: str = "e5m2", out_dtype: torch.dtype = torch.float32):
    """`runtime.gemm.gradient_gemm(g, q, scale, "e5m2")` with both operands in FP8.

    g [P, R] (any dtype/layout, e.g. a transposed view), q [R, C] grid values,
    scale the operand's row scale [R, 1] (or one element). The fold and the
    E5M2 cast are the runtime's (`quantize_gradient`), so the FP8 operands hold
    exactly the values the CPU path multiplies; Inductor fuses them into the
    GEMM's producers. A reduction dimension R that is not a multiple of 16 (an
    odd token count, for the weight gradient) takes the runtime's float32 path.
    """
    if grad_fmt != "e5m2":
        raise ValueError(f"fp8_gradient_gemm casts gradients to e5m2, got grad_fmt={grad_fmt!r}")
    g32 = g.to(torch.float32) * scale.to(torch.float32).reshape(1, -1)
    g_values, g_scale = quantize_gradient(g32, grad_fmt)
    r, c = q.shape
    if r % GEMM_ALIGNMENT or c % GEMM_ALIGNMENT:
        return ((g_values @ q.to(torch.float32)) * g_scale).to(out_dtype)
    # g_values are on the E5M2 grid already: this cast is exact.
    return scaled_gradient_gemm(g_values.to(torch.float8_e5m2), g_scale, to_e4m3(q), out_dtype)
