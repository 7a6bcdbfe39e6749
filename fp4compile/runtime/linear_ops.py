"""The graph-level ops of a quantized linear layer, each with its backward rule.

The FX pass rewrites every selected matmul into these five calls, so a graph
dump shows what was inserted and Inductor can fuse each with its neighbours:

    x_c, r_val, r_idx = occ_clamp_op(x, ...)     # straight-through; sparse residual
    x_q, x_s   = quantize_activation_op(x_c, ...) # straight-through
    w_q, w_s   = quantize_weight_op(w, ...)       # backward multiplies by DGE
    y          = fp4_gemm_op(x_q, x_s, w_q, w_s, b, ...)  # FP8 E5M2 gradient GEMMs
    y          = y + compensate_op(r_val, r_idx, w_q, w_s)  # sparse outlier term

Convention: a (values, scale) pair stands for the dequantized tensor
`values * scale`. The backward of an op consuming such a pair returns, in the
`values` slot, the gradient with respect to that dequantized tensor (and None for
the scale); the producing quantize op then applies its estimator (identity or
DGE). Composed, these ops compute exactly `fp4_linear_reference`.

The functions take only tensors and Python scalars/strings, so AOTAutograd
traces forward and backward into aten ops that Inductor lowers and fuses.
"""
from __future__ import annotations

import torch

from .dge import dge_grad_scale
from .hadamard import rht_signs
from .gemm import (forward_gemm, gradient_gemm, gradient_operand, requantized_input_gradient,
                   requantized_weight_gradient)
from .occ import occ_split, occ_thresholds
from .quantize import compute_dtype, quantize


class _OccClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha_num, alpha_den, scope):
        x_hp = x.to(compute_dtype(x.dtype))
        upper, lower, index = occ_thresholds(x_hp, alpha_num, alpha_den, scope, with_index=True)
        clamped, residual = occ_split(x_hp, upper, lower)
        # The residual leaves as (values, index): at most 2c entries per row (or
        # per tensor) can be non-zero, at the top-k positions of the thresholds.
        flat = residual if scope == "row" else residual.reshape(-1)
        values = flat.gather(-1, index)
        ctx.in_dtype = x.dtype
        ctx.mark_non_differentiable(values, index)
        return clamped, values, index

    @staticmethod
    def backward(ctx, grad_clamped, grad_values, grad_index):
        # Clamp is straight-through: x = clamped + residual and the compensation
        # adds the residual back, so the layer is the identity in x. The residual
        # carries no gradient of its own (see compensate_op).
        return grad_clamped.to(ctx.in_dtype), None, None, None


class _QuantizeActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, granularity):
        ctx.in_dtype = x.dtype
        return quantize(x, granularity=granularity, fmt=fmt)

    @staticmethod
    def backward(ctx, grad_values, grad_scale):
        return grad_values.to(ctx.in_dtype), None, None


class _QuantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt, granularity, dge_k, dge_clamp):
        values, scale = quantize(w, granularity=granularity, fmt=fmt)
        ctx.dge = (dge_k, dge_clamp)
        ctx.in_dtype = w.dtype
        if dge_clamp is not None:
            ctx.save_for_backward(w, scale)
        return values, scale

    @staticmethod
    def backward(ctx, grad_values, grad_scale):
        dge_k, dge_clamp = ctx.dge
        if dge_clamp is None:
            return grad_values.to(ctx.in_dtype), None, None, None, None
        w, scale = ctx.saved_tensors
        w_scaled = w.to(scale.dtype) / scale
        grad_w = grad_values * dge_grad_scale(w_scaled, k=dge_k, clamp=dge_clamp)
        return grad_w.to(ctx.in_dtype), None, None, None, None


def make_gemm_function(forward_fn, gradient_fn, name: str):
    """The autograd.Function of a quantized GEMM, given how its three products run.

    `forward_fn(x_q, x_s, w_q, w_s, bias, out_dtype)` and `gradient_fn(g, q, scale,
    grad_fmt)` follow `gemm.forward_gemm` and `gemm.gradient_gemm`, which define
    them here. A lowering (e.g. CUDA's FP8 tensor cores) builds its own function
    from faster products with the same numerics; the autograd plumbing is shared.
    """

    def forward(ctx, x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype, fp8_grid=False):
        lead = x_q.shape[:-1]
        x2 = x_q.reshape(-1, x_q.shape[-1])
        # Row [..., 1] -> [M, 1]; tensor [1, ..., 1] -> [1, 1]; block (full) -> [M, K].
        xs2 = x_scale.reshape(-1, x_scale.shape[-1])
        y = forward_fn(x2, xs2, w_q, w_scale, bias, out_dtype)
        ctx.save_for_backward(x2, xs2, w_q, w_scale)
        ctx.grad_fmt = grad_fmt
        ctx.has_bias = bias is not None
        ctx.x_shape = x_q.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*lead, y.shape[-1])

    def backward(ctx, grad_y):
        x2, xs2, w_q, w_scale = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gradient_fn(g2, w_q, w_scale, ctx.grad_fmt).reshape(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_w = gradient_fn(g2.t(), x2, xs2, ctx.grad_fmt)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_w, None, grad_b, None, None, None

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": make_gemm_function.__doc__,
    })


_Fp4Gemm = make_gemm_function(forward_gemm, gradient_gemm, "_Fp4Gemm")


class _RequantizedGemm(torch.autograd.Function):
    """y = dequant(x) @ dequant(w).T + b whose backward GEMMs quantize their own operands.

    The NVFP4/MXFP4 route (`gemm.requantized_weight_gradient`): the input
    gradient quantizes dY along N, the weight gradient quantizes dY^T and the
    layer's high-precision input X^T along the tokens, after an optional random
    Hadamard transform. `x_hp` is that input; it carries no gradient of its own
    (the input gradient reaches x through x_q, straight through its quantizer).
    """

    @staticmethod
    def forward(ctx, x_q, x_scale, w_q, w_scale, bias, x_hp, grad_spec, act_spec, hadamard_signs, out_dtype):
        lead = x_q.shape[:-1]
        x2 = x_q.reshape(-1, x_q.shape[-1])
        y = forward_gemm(x2, x_scale.reshape(-1, x_scale.shape[-1]), w_q, w_scale, bias, out_dtype)
        ctx.save_for_backward(x_hp.reshape(-1, x_hp.shape[-1]).to(x2.dtype), w_q, w_scale)
        ctx.specs = (grad_spec, act_spec, hadamard_signs)
        ctx.x_shape = x_q.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2_hp, w_q, w_scale = ctx.saved_tensors
        grad_spec, act_spec, hadamard_signs = ctx.specs
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x2_hp.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = requantized_input_gradient(g2, w_q, w_scale, grad_spec).reshape(ctx.x_shape)
        if ctx.needs_input_grad[2]:
            grad_w = requantized_weight_gradient(g2, x2_hp, grad_spec, act_spec, hadamard_signs)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_w, None, grad_b, None, None, None, None, None


class _Compensate(torch.autograd.Function):
    """y += residual @ dequant(w).T with the residual given as (values, index).

    Row scope: values/index are [..., J] along each token's features, and the
    term is a gather-reduce over J per output (Inductor fuses it into one kernel
    with indirect loads). Tensor scope: the index runs over the flattened
    activation; rows and columns are recovered from it.

    Backward: the residual's share of the weight gradient, against the same
    E5M2 gradient operand as the main weight-gradient GEMM (`gemm.gradient_operand`,
    the activation scale folded in), so that GEMM and this term together are
    `gradient_gemm(g.T, x_q, x_s, residual=r)`: the weight gradient of the
    compensated activation (SPEC.md section 5).
    """

    @staticmethod
    def forward(ctx, values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype):
        k_features = x_shape[-1]
        m = 1
        for d in x_shape[:-1]:
            m = m * d
        w_deq_t = (w_q * w_scale).t()  # [K, N]
        if values.dim() == len(x_shape):  # row scope
            v2 = values.reshape(m, values.shape[-1])
            i2 = index.reshape(m, index.shape[-1])
            y = (v2.unsqueeze(-1) * w_deq_t[i2]).sum(-2)
            rows = torch.arange(v2.shape[0], device=values.device).unsqueeze(-1).expand_as(i2)
            cols = i2
        else:  # tensor scope: one flat index over the whole activation
            rows, cols = index // k_features, index % k_features
            y = w_deq_t.new_zeros(m, w_deq_t.shape[1]).index_add(0, rows, values.unsqueeze(-1) * w_deq_t[cols])
            v2 = values
        ctx.save_for_backward(v2, rows, cols, x_scale.reshape(-1, x_scale.shape[-1]))
        ctx.k_features = k_features
        ctx.grad_fmt = grad_fmt
        return y.to(out_dtype).reshape(*x_shape[:-1], w_deq_t.shape[1])

    @staticmethod
    def backward(ctx, grad_y):
        v2, rows, cols, xs2 = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        g_op, g_scale, folded = gradient_operand(g2.t(), xs2, ctx.grad_fmt, v2.dtype)  # [N, M]
        rows_f, cols_f, v_f = rows.reshape(-1), cols.reshape(-1), v2.reshape(-1)
        if folded:  # the operand is g * x_s (a row or tensor scale): divide the residual by it
            v_f = v_f / xs2.reshape(-1).expand(g2.shape[0])[rows_f]
        # Scatter over the residual's entries: grad_w.T[k, :] += v * g_op.T[m, :].
        contrib = v_f.reshape(-1, 1) * g_op.t()[rows_f]
        grad_w_t = contrib.new_zeros(ctx.k_features, g2.shape[1]).index_add(0, cols_f, contrib)
        if g_scale is not None:
            grad_w_t = grad_w_t * g_scale
        return None, None, None, None, grad_w_t.t(), None, None, None


# Graph node targets: plain functions with readable names for graph dumps.
def occ_clamp_op(x, alpha_num: int, alpha_den: int, scope: str):
    """OCC clamp: (clamped, residual values, residual index), in the compute dtype."""
    return _OccClamp.apply(x, alpha_num, alpha_den, scope)


def quantize_activation_op(x, fmt: str, granularity: str):
    """Activation quantization: (values, scale); gradient straight through."""
    return _QuantizeActivation.apply(x, fmt, granularity)


def quantize_weight_op(w, fmt: str, granularity: str, dge_k: float, dge_clamp):
    """Weight quantization [out, in]: (values, scale); backward multiplies by DGE."""
    return _QuantizeWeight.apply(w, fmt, granularity, dge_k, dge_clamp)


def fp4_gemm_op(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype: torch.dtype, fp8_grid: bool = False):
    """Quantized GEMM y = x @ w.T + b with FP8 gradient GEMMs in the backward.

    `fp8_grid`: both operands are quantized to E2M1/E4M3 (not passed through).
    The reference ignores it; it tells a lowering that the operands fit FP8
    tensor cores (`lowering/cuda.py`).
    """
    return _Fp4Gemm.apply(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype, fp8_grid)


def requantized_gemm_op(x_q, x_scale, w_q, w_scale, bias, x_hp, grad_spec: tuple, act_spec: tuple,
                        hadamard_signs, out_dtype: torch.dtype):
    """Quantized GEMM whose backward GEMMs quantize their operands along the dims they reduce.

    `grad_spec` = (fmt, granularity, rounding) of the gradient, `act_spec` =
    (fmt, granularity) of the activation re-quantized for the weight gradient,
    `hadamard_signs` the +-1 vector of the random Hadamard transform (or None).
    """
    return _RequantizedGemm.apply(x_q, x_scale, w_q, w_scale, bias, x_hp, grad_spec, act_spec, hadamard_signs,
                                  out_dtype)


def requantized_gemm_specs(config) -> tuple:
    """(grad_spec, act_spec, hadamard_signs) of `requantized_gemm_op` under an Fp4Config.

    The Hadamard signs are drawn from `config.hadamard_seed` (`hadamard.rht_signs`):
    the same vector for every layer and step, so the seed in the config
    reproduces it and no buffer is added to the model.
    """
    signs = rht_signs(config.hadamard, config.hadamard_seed) if config.hadamard else None
    return ((config.grad_fmt, config.grad_granularity, config.grad_rounding),
            (config.act_fmt, config.act_granularity), signs)


def compensate_op(values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype: torch.dtype):
    """OCC compensation term residual @ dequant(w).T from the sparse residual.

    `x_scale` and `grad_fmt` define its weight gradient (see `_Compensate`).
    """
    return _Compensate.apply(values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype)


def passthrough_op(x):
    """Identity stand-in for an unquantized operand: (x in compute dtype, scale 1)."""
    x_hp = x.to(compute_dtype(x.dtype))
    return x_hp, torch.ones([1] * x.dim(), dtype=x_hp.dtype, device=x.device)


def quantized_linear(x, w, bias, config):
    """Compose the ops above for one linear layer (the pass emits the same sequence)."""
    out_dtype = x.dtype
    residual = None
    x_in, x_shape = x, x.shape
    if config.occ_alpha is not None:
        from .occ import alpha_fraction

        num, den = alpha_fraction(config.occ_alpha)
        x, *residual = occ_clamp_op(x, num, den, config.occ_scope)
    if config.act_fmt is not None:
        x_q, x_s = quantize_activation_op(x, config.act_fmt, config.act_granularity)
    else:
        x_q, x_s = _passthrough(x)
    if config.weight_fmt is not None:
        w_q, w_s = quantize_weight_op(w, config.weight_fmt, config.weight_granularity, config.dge_k, config.dge_clamp)
    else:
        w_q, w_s = _passthrough(w)
    if config.requantizes_weight_gradient:
        y = requantized_gemm_op(x_q, x_s, w_q, w_s, bias, x_in, *requantized_gemm_specs(config), out_dtype)
    else:
        fp8_grid = config.act_fmt is not None and config.weight_fmt is not None
        y = fp4_gemm_op(x_q, x_s, w_q, w_s, bias, config.grad_fmt, out_dtype, fp8_grid)
    if residual is not None and config.occ_compensate:
        # On the requantized route the weight gradient already sees the whole input
        # (outliers included): the compensation then adds to the forward only.
        w_comp = w_q.detach() if config.requantizes_weight_gradient else w_q
        y = y + compensate_op(*residual, x_shape, x_s, w_comp, w_s, config.grad_fmt, out_dtype)
    return y


class _Passthrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.in_dtype = x.dtype
        return passthrough_op(x)

    @staticmethod
    def backward(ctx, grad_values, grad_scale):
        return grad_values.to(ctx.in_dtype)


def _passthrough(x):
    return _Passthrough.apply(x)
