"""The three GEMMs of a quantized linear layer, on quantized operands (the reference).

Operands arrive as (grid values, scale) pairs. With row- or tensor-wise scales
both scales lie on non-reduced dimensions, so the GEMM multiplies pure grid
values and applies the scales in its epilogue: exactly what FP8 tensor cores
do. Block scales lie along K and cannot be factored out: those operands are
dequantized first.

Here the GEMMs on grid values run in float32 (float64 for float64 models):
products of E2M1/E4M3 values are exact there, so only the summation order
differs from an FP8 tensor core. How a target runs them faster (FP8 tensor
cores on CUDA, one merged GEMM per product on CPU) is `lowering/`'s business;
this module is the plain-PyTorch definition they are tested against.

The weight-gradient GEMM multiplies the E5M2 gradient with the *compensated*
activation, `x_q * x_s + residual` (SPEC.md section 5): the OCC residual's
share of the weight gradient goes through the same E5M2 gradient operand as the
main term. `gradient_gemm(..., residual=r)` computes it in one product.
"""
from __future__ import annotations

import torch

from .quantize import quantize_gradient


def is_vector_scale(scale: torch.Tensor) -> bool:
    """Row- or tensor-wise scale (shape [..., 1]): factorable out of the GEMM."""
    return scale.shape[-1] == 1


def forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """y = dequant(x) @ dequant(w).T + bias for 2-D x_q [M, K] and w_q [N, K]."""
    if is_vector_scale(x_scale) and is_vector_scale(w_scale):
        acc = x_q @ w_q.t()
        y = acc * x_scale * w_scale.reshape(1, -1)
    else:
        y = (x_q * x_scale) @ (w_q * w_scale).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def gradient_operand(g: torch.Tensor, scale: torch.Tensor, grad_fmt, dtype: torch.dtype):
    """The gradient operand of a backward GEMM against an operand scaled by `scale`.

    g is [P, R]; the other operand is [R, C] with `scale` on R, the reduced
    dimension, so a vector scale cannot go to the epilogue. It is folded into
    the gradient before the cast instead (g * scale.T times the grid values is
    the same product), which keeps both GEMM operands pure FP8 with one scalar
    in the epilogue. Returns `(g_values, g_scale, folded)`: g_scale is None when
    grad_fmt is None (no cast); `folded` says whether the scale went into g.
    """
    g = g.to(dtype)
    folded = is_vector_scale(scale)
    if folded:
        g = g * scale.reshape(1, -1)
    if grad_fmt is None:
        return g, None, folded
    g_values, g_scale = quantize_gradient(g, grad_fmt)
    return g_values, g_scale, folded


def gradient_gemm(g, q, scale, grad_fmt, residual=None):
    """g @ (dequant(q, scale) + residual), g cast to `grad_fmt` (None: high precision).

    `q` is [R, C] and g is [P, R]. `residual` (optional, [R, C]) is the OCC
    residual of an activation: it joins the product against the same gradient
    operand. With a folded vector scale that is `g_op @ (q + residual / scale)`.
    """
    g_op, g_scale, folded = gradient_operand(g, scale, grad_fmt, q.dtype)
    if folded:
        rhs = q if residual is None else q + residual / scale
    else:
        rhs = q * scale if residual is None else q * scale + residual
    out = g_op @ rhs
    return out if g_scale is None else out * g_scale
