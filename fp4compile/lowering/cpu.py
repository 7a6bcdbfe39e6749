"""CPU lowering: one GEMM per product, on the compensated activation.

On a CPU every GEMM of a quantized layer already runs in float32 on grid values
(`runtime.gemm`), so the OCC compensation needs no GEMM, gather or scatter of
its own. With row (or tensor) activation scales x_s and the residual r:

    y  = (x_q @ w_q.T) * x_s * w_s  +  r @ (w_q * w_s).T
       = ((x_q + r / x_s) @ w_q.T) * x_s * w_s
    dW = E5M2(dY.T * x_s.T) @ x_q  +  E5M2(dY.T * x_s.T) @ (r / x_s)      (then DGE)
       = E5M2(dY.T * x_s.T) @ (x_q + r / x_s)

so one tensor, `x_comp = x_q + r / x_s` (the compensated activation in the
scaled domain), feeds the unchanged `fp4_gemm_op` for the forward and the weight
gradient; the input gradient is unchanged. Block scales (along K) merge the same
way on the dequantized values, `x_q * x_s + r`, with a unit scale. The residual
is the dense `x - x_c`, which Inductor computes inside the kernel that clamps
and quantizes, so no index tensor is ever built. The clamp thresholds come from
`cpu_thresholds` (the same values as the runtime's top-k, from the C++ row
kernel `fp4compile::row_extremes`).

The merge reorders float32 sums and rounds `r / x_s` once: the lowered graph
matches the semantic one (`fp4_aot_eager`) to float32 rounding, and exactly in
real arithmetic. One limit of the scaled domain: `r / x_s` overflows when a
row's clamped values lie some 38 decades below its outlier (x_s near float32's
smallest normal), where an FP4 code could not hold them anyway.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime.gemm import is_vector_scale
from ..runtime.linear_ops import fp4_gemm_op
from ..runtime.occ import occ_split
from ..runtime.quantize import compute_dtype, quantize
from .cpu_thresholds import cpu_occ_thresholds

LOWERING_NAME = "cpu: one GEMM per product on the compensated activation"


class _CompensatedActivation(torch.autograd.Function):
    """OCC clamp, quantize and add back the residual: the operand both GEMMs take."""

    @staticmethod
    def forward(ctx, x, alpha_num, alpha_den, scope, fmt, granularity):
        x_hp = x.to(compute_dtype(x.dtype))
        upper, lower = cpu_occ_thresholds(x_hp, alpha_num, alpha_den, scope)
        clamped, residual = occ_split(x_hp, upper, lower)
        x_q, x_s = quantize(clamped, granularity=granularity, fmt=fmt)
        if is_vector_scale(x_s):
            x_comp = x_q + residual / x_s
        else:  # block scales lie along K: merge on the dequantized values, unit scale
            x_comp = x_q * x_s + residual
            x_s = torch.ones([1] * x_comp.dim(), dtype=x_comp.dtype, device=x_comp.device)
        ctx.in_dtype = x.dtype
        ctx.mark_non_differentiable(x_s)
        return x_comp, x_s

    @staticmethod
    def backward(ctx, grad_comp, grad_scale):
        # Straight through, as the semantic clamp and quantize ops are: the
        # compensation restores x exactly, so the layer is the identity in x.
        return grad_comp.to(ctx.in_dtype), None, None, None, None, None


def compensated_activation_op(x, alpha_num: int, alpha_den: int, scope: str, fmt: str, granularity: str):
    """(x_comp, x_s): the OCC-clamped, quantized activation with its residual added back."""
    return _CompensatedActivation.apply(x, alpha_num, alpha_den, scope, fmt, granularity)


def _getitems(node: fx.Node) -> dict:
    return {user.args[1]: user for user in node.users if user.target is operator.getitem}


def _erase(graph: fx.Graph, nodes) -> None:
    """Erase nodes that no longer have users, consumers before producers."""
    pending = [n for n in nodes if n is not None]
    while pending:
        progress = False
        for node in list(pending):
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                progress = True
        if not progress:
            raise RuntimeError(f"CPU lowering left nodes in use: {[n.name for n in pending]}")


def _fuse_activation(graph: fx.Graph, roles: dict):
    """Insert the compensated-activation op in place of one activation's clamp + quantize."""
    clamp, act = roles["clamp"], roles["act"]
    x, alpha_num, alpha_den, scope = clamp.args
    _, fmt, granularity = act.args
    with graph.inserting_before(act):
        fused = graph.call_function(
            compensated_activation_op, (x, alpha_num, alpha_den, scope, fmt, granularity)
        )
        x_comp = graph.call_function(operator.getitem, (fused, 0))
        x_s = graph.call_function(operator.getitem, (fused, 1))
    for node in (fused, x_comp, x_s):
        node.meta.update({k: act.meta[k] for k in ("nn_module_stack", "fp4_site") if k in act.meta})
    return fused, x_comp, x_s


def _merge_compensation(graph: fx.Graph, roles: dict, fused_nodes) -> None:
    """Point one site's GEMM at the compensated activation; drop its compensation."""
    fused, x_comp, x_s = fused_nodes
    gemm, comp, add = roles["gemm"], roles["compensate"], roles["add"]
    # The GEMM keeps its weight, bias and gradient format; its activation is now
    # off the FP8 grid (grid values plus residual), so `fp8_grid` goes False.
    _, _, w_q, w_s, bias, grad_fmt, out_dtype, _ = gemm.args
    gemm.args = (x_comp, x_s, w_q, w_s, bias, grad_fmt, out_dtype, False)
    add.replace_all_uses_with(gemm)
    _erase(graph, [add, comp, roles.get("shape")])
    # The shared clamp and quantize nodes go once every site sharing them is merged.
    roles.update(fused=fused, clamp=None, act=None, compensate=None, add=None, shape=None)


def lower_graph(graph: fx.Graph, sites, config) -> None:
    """Lower the rewritten sites of one graph for the CPU.

    Sites that share an activation (q/k/v, gate/up) share its clamp and
    quantize nodes after the rewrite, and so share one compensated activation.
    """
    fused_by_act = {}
    for site in sites:
        roles = site.rewritten
        if roles["gemm"].target is not fp4_gemm_op:
            # The NVFP4/MXFP4 route: its backward GEMMs quantize their own operands,
            # so the forward's compensated activation has nothing to merge into.
            site.lowering = "cpu: float32 GEMMs on dequantized blocks, backward operands re-quantized"
            continue
        if roles.get("compensate") is None:
            site.lowering = "cpu: float32 GEMMs on grid values"
            continue
        act = roles["act"]
        if act not in fused_by_act:
            fused_by_act[act] = (roles["clamp"], _fuse_activation(graph, roles))
        _merge_compensation(graph, roles, fused_by_act[act][1])
        site.lowering = LOWERING_NAME
    for act, (clamp, _) in fused_by_act.items():
        _erase(graph, [*_getitems(act).values(), act, *_getitems(clamp).values(), clamp])
