"""`fp4_linear_reference`: one quantized linear layer as a single autograd.Function.

This is the specification of a quantized linear layer in one place, SPEC.md
section 5: the forward GEMM on OCC-clamped, row-quantized activations and
row-quantized weights plus the compensation term; the input gradient from the
E5M2 gradient and the quantized weight; the weight gradient from the E5M2
gradient and the compensated activation, times DGE. The FX pass emits the same
computation as separate graph nodes (`linear_ops`); tests hold the two equal.
"""
from __future__ import annotations

import torch

from .dge import dge_grad_scale
from .gemm import forward_gemm, gradient_gemm, requantized_input_gradient, requantized_weight_gradient
from .linear_ops import requantized_gemm_specs
from .occ import alpha_fraction, occ_split, occ_thresholds
from .quantize import compute_dtype, quantize


def _quantize_or_pass(t_hp, fmt, granularity):
    if fmt is None:
        return t_hp, torch.ones([1] * t_hp.dim(), dtype=t_hp.dtype, device=t_hp.device)
    return quantize(t_hp, granularity=granularity, fmt=fmt)


class Fp4LinearReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, config):
        out_dtype = x.dtype
        hp = compute_dtype(x.dtype)
        lead = x.shape[:-1]
        x_hp = x_in_hp = x.reshape(-1, x.shape[-1]).to(hp)
        residual = None
        if config.occ_alpha is not None:
            num, den = alpha_fraction(config.occ_alpha)
            upper, lower = occ_thresholds(x_hp, num, den, config.occ_scope)
            x_hp, residual = occ_split(x_hp, upper, lower)
            if not config.occ_compensate:
                residual = None
        x_q, x_s = _quantize_or_pass(x_hp, config.act_fmt, config.act_granularity)
        w_q, w_s = _quantize_or_pass(w.to(hp), config.weight_fmt, config.weight_granularity)
        y = forward_gemm(x_q, x_s, w_q, w_s, bias, out_dtype)
        if residual is not None:
            y = y + (residual @ (w_q * w_s).t()).to(out_dtype)
        ctx.save_for_backward(x_q, x_s, w_q, w_s, w, residual, x_in_hp)
        ctx.config = config
        ctx.shapes = (x.shape, x.dtype, w.dtype, None if bias is None else bias.dtype)
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x_q, x_s, w_q, w_s, w, residual, x_in_hp = ctx.saved_tensors
        config = ctx.config
        x_shape, x_dtype, w_dtype, b_dtype = ctx.shapes
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if config.requantizes_weight_gradient:
            # NVFP4/MXFP4 route (docs/recipes.md): each backward GEMM quantizes its
            # operands along the dim it reduces; the weight gradient takes the
            # layer's high-precision input (outliers included, so no compensation term).
            grad_spec, act_spec, signs = requantized_gemm_specs(config)
            g = g.to(x_in_hp.dtype)
            grad_x = requantized_input_gradient(g, w_q, w_s, grad_spec).reshape(x_shape).to(x_dtype)
            grad_w = requantized_weight_gradient(g, x_in_hp, grad_spec, act_spec, signs)
        else:
            # Input gradient: STE through the activation quantizer and the clamp.
            grad_x = gradient_gemm(g, w_q, w_s, config.grad_fmt).reshape(x_shape).to(x_dtype)
            # Weight gradient against the compensated activation (x_q * x_s + residual),
            # the E5M2 gradient operand shared by both terms (SPEC.md section 5).
            grad_w = gradient_gemm(g.t(), x_q, x_s, config.grad_fmt, residual=residual)
        if config.dge_clamp is not None:
            grad_w = grad_w * dge_grad_scale(w.to(w_s.dtype) / w_s, k=config.dge_k, clamp=config.dge_clamp)
        grad_b = g.sum(0).to(b_dtype) if b_dtype is not None else None
        return grad_x, grad_w.to(w_dtype), grad_b, None


def fp4_linear_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, config) -> torch.Tensor:
    """Quantized `F.linear(x, w, b)` under `config` (an Fp4Config), forward and backward.

    With all formats None (the "bf16" recipe) it is plain high-precision linear.
    """
    if not config.quantizes:
        return torch.nn.functional.linear(x, w, b)
    return Fp4LinearReference.apply(x, w, b, config)
