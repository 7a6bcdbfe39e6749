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

from .hadamard import random_hadamard_transform
from .quantize import quantize, quantize_gradient


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


# ---- The NVFP4/MXFP4 route: each backward GEMM quantizes its own operands -----------
#
# NVFP4 and MXFP4 training (docs/recipes.md) quantize a GEMM's operands in blocks
# along the dimension that GEMM reduces. The forward reduces K, so the forward's
# activation and weight blocks lie along K. The input gradient dX = dY @ W
# reduces N: dY is quantized in blocks along N (its rows) and W reuses its
# forward quantization (16x16 weight tiles are the same for W and W^T). The
# weight gradient dW = dY^T @ X reduces the tokens M: both dY^T and X^T are
# quantized in blocks along M, X from the layer's high-precision input (not the
# forward's FP4 activation, so nothing is quantized twice), after an optional
# random Hadamard transform R along M: (dY^T R)(R^T X) = dY^T X in exact
# arithmetic, and R spreads a block's outliers over the whole block first.

_BLOCK_ALONG_LAST = {"block16": 16, "block32": 32, "block16x16": 16}


def _block_length(granularity: str) -> int:
    return _BLOCK_ALONG_LAST.get(granularity, 1)


def _pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple: zeros add nothing to a product over it,
    raise no block's amax, and stay zero under quantization."""
    pad = (-t.shape[-1]) % multiple
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def dequantized_gradient(g: torch.Tensor, grad_spec: tuple) -> torch.Tensor:
    """g quantized along its last dim under `grad_spec` = (fmt, granularity, rounding), dequantized.

    Stochastic rounding draws from torch's global generator (seeded by
    `torch.manual_seed`; under torch.compile, Inductor's seeded RNG).
    """
    fmt, granularity, rounding = grad_spec
    values, scale = quantize_gradient(g, fmt, granularity=granularity, rounding=rounding)
    return values * scale


def requantized_input_gradient(g, w_q, w_scale, grad_spec):
    """dX = Q_g(dY) @ dequant(W): dY [M, N] quantized in blocks along N, W [N, K] as in the forward."""
    return dequantized_gradient(g, grad_spec) @ (w_q * w_scale)


def requantized_weight_gradient(g, x_hp, grad_spec, act_spec, hadamard_signs):
    """dW = Q_g(dY^T R) @ Q_a(X^T R)^T, both quantized in blocks along the tokens M.

    g is dY [M, N], x_hp the layer's high-precision input [M, K]; `act_spec` =
    (fmt, granularity) quantizes X^T (fmt None: X stays high precision);
    `hadamard_signs` (a tuple of +-1, or None) defines R, block-diagonal along M.
    The token dim is zero-padded to a whole number of blocks (exact, see `_pad_last`).
    Stochastic rounding draws happen after the input gradient's (a fixed order,
    so a seeded run reproduces).
    """
    act_fmt, act_granularity = act_spec
    multiple = max(len(hadamard_signs) if hadamard_signs else 1, _block_length(grad_spec[1]),
                   _block_length(act_granularity))
    # Contiguous copies along the tokens: the block reshapes that follow then read
    # rows, and Inductor tiles them without tripping over a transposed view.
    g_t = _pad_last(g.t().to(x_hp.dtype), multiple).contiguous()  # [N, M']
    x_t = _pad_last(x_hp.t(), multiple).contiguous()  # [K, M']
    if hadamard_signs:
        g_t = random_hadamard_transform(g_t, hadamard_signs, dim=-1)
        x_t = random_hadamard_transform(x_t, hadamard_signs, dim=-1)
    g_deq = dequantized_gradient(g_t, grad_spec)
    if act_fmt is not None:
        x_values, x_scale = quantize(x_t, granularity=act_granularity, fmt=act_fmt)
        x_t = x_values * x_scale
    return g_deq @ x_t.t()
