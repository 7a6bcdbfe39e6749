"""Rewrite each quantized matmul site into explicit quantize/GEMM/compensate nodes.

After this pass a dump of the graph shows exactly what runs (see
`runtime/linear_ops.py` for the ops and their backward rules), and Inductor sees
every node, so it can fuse the clamp and quantization with their producers.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime import linear_ops
from ..runtime import stats as telemetry
from .find_sites import site_operands
from ..runtime.occ import alpha_fraction


def _pair(graph: fx.Graph, fn, args, outputs: int = 2):
    call = graph.call_function(fn, args)
    return (call, *(graph.call_function(operator.getitem, (call, i)) for i in range(outputs)))


def _quantize_activation(graph: fx.Graph, x, config, inserted: list, roles: dict):
    """OCC clamp (if configured) and quantize one activation: (x_q, x_s, residual)."""
    x_in, residual = x, None
    if config.occ_alpha is not None:
        num, den = alpha_fraction(config.occ_alpha)
        clamp, x_in, r_values, r_index = _pair(
            graph, linear_ops.occ_clamp_op, (x, num, den, config.occ_scope), outputs=3
        )
        residual = (r_values, r_index)
        inserted.append(clamp)
        roles["clamp"] = clamp
    if config.act_fmt is not None:
        act, x_q, x_s = _pair(
            graph, linear_ops.quantize_activation_op, (x_in, config.act_fmt, config.act_granularity)
        )
    else:
        act, x_q, x_s = _pair(graph, linear_ops._passthrough, (x_in,))
    inserted.append(act)
    roles["act"] = act
    return x_q, x_s, residual


def _register_stats(site, config, graph_id: int, act_key: int) -> int:
    """The telemetry key of one site: what its probes need to recompute its statistics."""
    occ = (*alpha_fraction(config.occ_alpha), config.occ_scope) if config.occ_alpha is not None else None
    return telemetry.register_site(telemetry.SiteSpec(
        graph_id=graph_id, module_path=site.module_path, interval=config.stats_interval, occ=occ,
        act_fmt=config.act_fmt, act_granularity=config.act_granularity, compensate=config.occ_compensate,
        weight_transposed=site.weight_layout != "out_in", act_key=act_key,
    ))


def _rewrite_one(graph: fx.Graph, site, config, shared: dict, graph_id: int = -1) -> tuple:
    """Rewrite one site's matmul; returns the names of the nodes it uses.

    `shared` maps an activation node to its clamp/quantize nodes, so that sites
    reading the same activation (q/k/v, gate/up) clamp and quantize it once:
    the same values either way, and the backward sums their gradients before
    the straight-through estimator rather than after it.
    """
    matmul, _, weight, _ = site.fx_nodes
    # Read the operands now: an earlier rewrite may have replaced the activation's producer.
    x, bias = site_operands(matmul, site.weight_side)
    alpha, beta = site.addmm_alpha_beta
    gemm_bias = bias if (alpha, beta) == (1, 1) else None  # else applied after the product, below
    out_dtype = matmul.meta["example_value"].dtype if "example_value" in matmul.meta else torch.float32
    inserted, roles, new_nodes = [], {}, []
    with graph.inserting_before(matmul):
        if site.weight_side == "left":
            # W @ x == (x^T @ W^T)^T: x^T's rows are the tokens, so it is quantized
            # per token and W per output channel, as for x @ W^T.
            x = graph.call_method("transpose", (x, -2, -1))
            new_nodes.append(x)
        if x in shared:
            x_q, x_s, residual, act_roles = shared[x]
            roles.update(act_roles)
            inserted += list(act_roles.values())
        else:
            x_q, x_s, residual = _quantize_activation(graph, x, config, inserted, roles)
            shared[x] = (x_q, x_s, residual, dict(roles))
            new_nodes += inserted
        # The quantizers take weights as [out, in]: per-output-channel scales are rows.
        w_out_in = weight if site.weight_layout == "out_in" else graph.call_function(torch.t, (weight,))
        if config.weight_fmt is not None:
            wq, w_q, w_s = _pair(
                graph,
                linear_ops.quantize_weight_op,
                (w_out_in, config.weight_fmt, config.weight_granularity, config.dge_k, config.dge_clamp),
            )
        else:
            wq, w_q, w_s = _pair(graph, linear_ops._passthrough, (w_out_in,))
        roles["weight"] = wq
        stats_key, gemm_w_s, probes = None, w_s, []
        if config.stats_interval:
            # Telemetry (runtime/stats.py): the forward probe's 1.0 multiplies the
            # weight scale the GEMM reads, which keeps the probe in the compiled graph.
            act_keys = shared.setdefault("stats_act_keys", {})
            if x not in act_keys:
                act_keys[x] = telemetry.new_activation_key()
            stats_key = _register_stats(site, config, graph_id, act_keys[x])
            gemm_w_s = graph.call_function(telemetry.probed_weight_scale, (x, weight, w_q, w_s, stats_key))
            roles["stats_forward"] = gemm_w_s
            probes.append(gemm_w_s)
        if config.requantizes_weight_gradient:
            # NVFP4/MXFP4 route: the backward GEMMs quantize their own operands, the
            # weight gradient from the high-precision activation x (docs/recipes.md).
            y = graph.call_function(
                linear_ops.requantized_gemm_op,
                (x_q, x_s, w_q, gemm_w_s, gemm_bias, x, *linear_ops.requantized_gemm_specs(config), out_dtype),
            )
        else:
            # Both operands on an FP8-representable grid: CUDA may run the GEMMs in FP8.
            fp8_grid = config.act_fmt is not None and config.weight_fmt is not None
            y = graph.call_function(
                linear_ops.fp4_gemm_op, (x_q, x_s, w_q, gemm_w_s, gemm_bias, config.grad_fmt, out_dtype, fp8_grid)
            )
        roles["gemm"] = y
        site_nodes = [wq, *probes, y]
        if residual is not None and config.occ_compensate:
            x_shape = graph.call_function(getattr, (x, "shape"))
            w_comp = w_q
            if config.requantizes_weight_gradient:  # its weight gradient already holds the outliers
                w_comp = graph.call_method("detach", (w_q,))
                site_nodes.append(w_comp)
            comp = graph.call_function(
                linear_ops.compensate_op, (*residual, x_shape, x_s, w_comp, w_s, config.grad_fmt, out_dtype)
            )
            y = graph.call_function(operator.add, (y, comp))
            roles.update(compensate=comp, add=y, shape=x_shape)
            site_nodes += [comp]
        if (alpha, beta) != (1, 1):  # addmm(b, x, W, beta=, alpha=) = beta * b + alpha * (x @ W)
            if alpha != 1:
                y = graph.call_function(operator.mul, (y, alpha))
                site_nodes.append(y)
            if beta != 0 and bias is not None:  # beta == 0 ignores b, NaN included (as addmm does)
                y = graph.call_function(torch.add, (y, bias), {"alpha": beta})
                site_nodes.append(y)
        if site.weight_side == "left":
            y = graph.call_method("transpose", (y, -2, -1))
            site_nodes.append(y)
        if stats_key is not None:  # its backward hands dY to the telemetry
            y = graph.call_function(telemetry.grad_probe, (y, weight, stats_key))
            roles["stats_backward"] = y
            site_nodes.append(y)
    inserted += site_nodes
    for node in new_nodes + site_nodes + [y]:
        node.meta["nn_module_stack"] = matmul.meta.get("nn_module_stack", {})
        node.meta["fp4_site"] = site.module_path
    matmul.replace_all_uses_with(y)
    graph.erase_node(matmul)
    site.rewritten = roles
    return tuple(n.name for n in inserted)


def rewrite_sites(gm: fx.GraphModule, sites, config, graph_id: int = -1) -> None:
    """Replace every quantized site's matmul by the quantized-linear nodes.

    With `config.stats_interval > 0` each site also gets its telemetry probes
    (`runtime/stats.py`), registered under `graph_id`; with 0 nothing else changes.
    """
    dead_candidates, touched, shared = [], {id(gm): gm}, {}
    for site in sites:
        if site.quantized:
            owner = site.graph_module or gm  # the top graph or a higher-order op's body
            matmul = site.fx_nodes[0]
            dead_candidates += [a for a in matmul.all_input_nodes if a.op != "placeholder"]
            site.inserted = _rewrite_one(owner.graph, site, config, shared.setdefault(id(owner), {}), graph_id)
            touched[id(owner)] = owner
    # Drop the W.t() nodes that only fed the replaced matmuls.
    for node in dead_candidates:
        if not node.users and node.op in ("call_method", "call_function"):
            if node.target in ("t", "transpose", "permute", torch.t, torch.transpose, getattr):
                node.graph.erase_node(node)
    for owner in touched.values():
        owner.recompile()
