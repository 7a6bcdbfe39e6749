"""The three GEMMs of a quantized linear layer, on quantized operands.

Operands arrive as (grid values, scale) pairs. With row- or tensor-wise scales
both scales lie on non-reduced dimensions, so the GEMM multiplies pure grid
values and applies the scales in its epilogue: exactly what FP8 tensor cores
do. Block scales lie along K and cannot be factored out: those operands are
dequantized first (emulation; only the row/tensor path has a fast kernel).

On CPU the GEMM on grid values runs in float32 (float64 for float64 models):
products of E2M1/E4M3 values are exact there, so only the summation order
differs from an FP8 tensor core. On CUDA, with both operands on an FP8 grid
(`fp8_grid`: the caller knows the formats) and vector scales, the same GEMMs
run on FP8 tensor cores (`lowering.cuda_gemm`).
"""
from __future__ import annotations

import torch

from .quantize import quantize_gradient


def is_vector_scale(scale: torch.Tensor) -> bool:
    """Row- or tensor-wise scale (shape [..., 1]): factorable out of the GEMM."""
    return scale.shape[-1] == 1


def forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, fp8_grid: bool = False):
    """y = dequant(x) @ dequant(w).T + bias for 2-D x_q [M, K] and w_q [N, K].

    `fp8_grid`: x_q and w_q hold E2M1/E4M3 grid values (exact in float8_e4m3fn).
    """
    if fp8_grid and x_q.is_cuda:
        from ..lowering import cuda_gemm

        if cuda_gemm.fp8_gemm_applies(x_q, x_scale, w_q, w_scale):
            return cuda_gemm.fp8_forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if is_vector_scale(x_scale) and is_vector_scale(w_scale):
        acc = x_q @ w_q.t()
        y = acc * x_scale * w_scale.reshape(1, -1)
    else:
        y = (x_q * x_scale) @ (w_q * w_scale).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def gradient_gemm(g, q, scale, grad_fmt, fp8_grid: bool = False):
    """g @ dequant(q, scale), with g cast to `grad_fmt` (None: high precision).

    `q` is [R, C] and g is [P, R]: the operand's vector scale lies along R, the
    reduced dimension, so it cannot go to the epilogue. It is folded into the
    gradient before the FP8 cast instead (g * scale.T is the same product), which
    keeps both GEMM operands pure FP8 with one scalar in the epilogue.
    `fp8_grid`: q holds E2M1/E4M3 grid values; on CUDA the GEMM then runs in FP8.
    """
    if fp8_grid and grad_fmt == "e5m2" and q.is_cuda:
        from ..lowering import cuda_gemm

        if cuda_gemm.fp8_gradient_applies(q, scale):
            return cuda_gemm.fp8_gradient_gemm(g, q, scale, grad_fmt, out_dtype=q.dtype)
    g = g.to(q.dtype)
    if is_vector_scale(scale):
        g = g * scale.reshape(1, -1)
        rhs = q
    else:
        rhs = q * scale
    if grad_fmt is None:
        return g @ rhs
    g_q, g_scale = quantize_gradient(g, grad_fmt)
    return (g_q @ rhs) * g_scale
