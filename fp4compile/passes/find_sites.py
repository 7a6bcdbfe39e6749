"""Find the matmul sites of a captured graph: matmuls with a weight parameter operand.

Dynamo hands the backend torch-level ops. The forms found here:
  - `torch._C._nn.linear(x, W[, b])` (nn.Linear, F.linear)
  - `x @ W.t()`, `torch.matmul(x, W.T)` (weight [out, in])
  - `x @ W`, `torch.matmul(x, W)` and `torch.addmm(b, x, W)` (weight [in, out],
    e.g. HF GPT-2's Conv1D: its output channel is a column)
  - `torch.addmm(b, x, W.t())`, also with `alpha`/`beta` other than 1
  - `torch.mm(x, W.t())`, `torch.mm(x, W)`
  - the weight as the left operand: `W @ x`, `torch.matmul(W, x)`, `W.t() @ x`
    (x is [..., K, tokens]; the rewrite transposes it, so the weight is still
    scaled per output channel and the activation per token)
Products of two activations (attention scores, attention-weighted values) are
not sites: they stay in high precision.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from ..report import MatmulSite

_LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
_MATMUL = {operator.matmul, torch.matmul, torch.mm}
_ADDMM = {torch.addmm}
_MATMUL_METHODS = {"matmul", "__matmul__", "mm"}


def _example(node):
    return node.meta.get("example_value")


def _parameter_placeholders(gm: fx.GraphModule, example_inputs) -> dict:
    """Map parameter nodes to their qualified names ("layers.0.fc.weight")."""
    params = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        value = example_inputs[i] if i < len(example_inputs) else None
        grapharg = node.meta.get("grapharg")
        source = getattr(getattr(grapharg, "source", None), "name", None)
        source = source() if callable(source) else source
        is_param = isinstance(value, torch.nn.Parameter) or (
            isinstance(source, str) and "_parameters[" in source
        )
        if is_param:
            params[node] = _qualified_name(source) if isinstance(source, str) else node.name
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = gm.get_submodule("").get_parameter(node.target)
            except (AttributeError, TypeError):
                continue
            params[node] = str(node.target)
    return params


_KEY = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]|\.([A-Za-z_][A-Za-z0-9_]*)")


# The compiled root module's own source: L['self'], or L['args'][0] when its
# forward is wrapped by a (*args, **kwargs) decorator, as Hugging Face's are.
ROOT_SOURCE = re.compile(r"^L\[['\"]([^'\"]+)['\"]\](?:\[(\d+)\])?")


def _qualified_name(source: str) -> str:
    """"L['self']._modules['fc']._parameters['weight']" -> "fc.weight" (also from "L['args'][0]...")."""
    body = ROOT_SOURCE.sub("", source, count=1)
    parts = []
    for key, attr in _KEY.findall(body):
        name = key or attr
        if name in ("_modules", "_parameters"):
            continue
        parts.append(name)
    return ".".join(parts) or source


def _transposed_param(node, params):
    """If `node` is W.t() / W.T / W.transpose(0, 1) of a 2-D parameter W, return W."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target in ("t", "transpose", "permute"):
        src = node.args[0]
        ok = node.target == "t" or (node.target == "transpose" and set(node.args[1:3]) in ({0, 1}, {-1, -2}, {0, -1}, {1, -2})) or (
            node.target == "permute" and tuple(node.args[1:]) in ((1, 0),)
        )
        return src if ok and src in params else None
    if node.op == "call_function":
        if node.target in (torch.t,) and node.args[0] in params:
            return node.args[0]
        if node.target is torch.transpose and node.args[0] in params:
            return node.args[0]
        if node.target is getattr and node.args[1] in ("T", "mT") and node.args[0] in params:
            return node.args[0]
    return None


def _weight_operand(node, params, side: str = "right"):
    """(weight node, layout) for one operand of a matmul, or (None, None).

    On the right (`x @ W`) a plain parameter is [in, out]; on the left
    (`W @ x`) it is [out, in], as nn.Linear stores it.
    """
    plain, transposed = ("in_out", "out_in") if side == "right" else ("out_in", "in_out")
    if node in params:
        return node, plain
    src = _transposed_param(node, params)
    if src is not None:
        return src, transposed
    return None, None


def _swap_last_two(shape: tuple) -> tuple:
    return (*shape[:-2], shape[-1], shape[-2]) if len(shape) >= 2 else shape


def _shape(node):
    value = _example(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _module_path(node, weight_name: str) -> str:
    if "." in weight_name:
        return weight_name.rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        path = re.sub(r"^L\['[^']*'\]\.?", "", path)
        return re.sub(r"\[(\d+)\]", r".\1", path)
    return ""


def site_operands(node, weight_side: str = "right"):
    """(activation, bias) of a matmul node, read from its current arguments."""
    if node.target in _ADDMM:
        return node.args[1], node.args[0]
    if node.target in _LINEAR:
        return node.args[0], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return (node.args[1] if weight_side == "left" else node.args[0]), None


# Higher-order ops whose body runs exactly as traced, so its matmuls can be
# quantized in place: activation checkpointing recomputes the same body.
_TRANSPARENT_HOPS = ("tag_activation_checkpoint", "wrap")
# Bodies whose gradient the user defines: quantizing inside would change their math.
_HOP_REASONS = {"autograd_function_apply": "inside a custom autograd.Function (its backward is the user's)"}


def _hop_name(node) -> str | None:
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def _find_in_graph(gm, params, sites, hop_context):
    """Collect sites of one graph (recursing into higher-order op bodies)."""
    activation_matmuls = 0
    for node in gm.graph.nodes:
        hop = _hop_name(node)
        if hop is not None:
            activation_matmuls += _find_in_hop(gm, node, hop, params, sites, hop_context)
            continue
        form, side, reason = None, "right", ""
        if node.op == "call_function" and node.target in _LINEAR:
            x, w = node.args[0], node.args[1]
            weight, layout, form = (w, "out_in", "linear") if w in params else (None, None, "linear")
        elif (node.op == "call_function" and node.target in _MATMUL) or (
            node.op == "call_method" and node.target in _MATMUL_METHODS
        ):
            x, rhs = node.args[0], node.args[1]
            form = "matmul"
            weight, layout = _weight_operand(rhs, params)
            if weight is None:  # the weight as the left operand: W @ x
                weight, layout = _weight_operand(x, params, side="left")
                if weight is not None:
                    x, side = rhs, "left"
        elif node.op == "call_function" and node.target in _ADDMM:
            x, rhs = node.args[1], node.args[2]
            form = "addmm"
            weight, layout = _weight_operand(rhs, params)
            if weight is not None and node.kwargs.get("alpha", 1) == 0:
                reason = "addmm with alpha=0: no product to quantize"
        if form is None:
            continue
        if weight is None:
            activation_matmuls += 1
            continue
        _, bias = site_operands(node, side)
        name = params[weight]
        act_shape = _shape(x)
        if side == "left":
            if len(act_shape) < 2:
                reason = reason or "weight times a vector (left operand): no token dimension to scale"
            act_shape = _swap_last_two(act_shape)  # as the rewrite multiplies it: [..., tokens, K]
        site = MatmulSite(
            node=node.name,
            op=form,
            module_path=_module_path(node, name),
            weight_name=name,
            act_shape=act_shape,
            weight_shape=_shape(weight),
            weight_layout=layout,
            has_bias=bias is not None,
            dtype=getattr(_example(weight), "dtype", None),
            fx_nodes=(node, None, weight, None),
            graph_module=gm,
            weight_side=side,
            addmm_alpha_beta=(node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)) if form == "addmm" else (1, 1),
            reason=reason,
        )
        if hop_context is not None and hop_context not in _TRANSPARENT_HOPS:
            site.reason = _HOP_REASONS.get(hop_context, f"inside higher-order op {hop_context}")
        sites.append(site)
    return activation_matmuls


def _find_in_hop(gm, node, hop, params, sites, hop_context):
    """Map a higher-order op's body placeholders to its operands and search the body."""
    bodies = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
    operands = [a for a in node.args if not (isinstance(a, fx.Node) and a.op == "get_attr")]
    operands = [a for group in operands for a in (group if isinstance(group, (list, tuple)) else [group])]
    found = 0
    for body_node in bodies:
        body = getattr(gm, body_node.target, None)
        if not isinstance(body, fx.GraphModule):
            continue
        body_params = {}
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for placeholder, operand in zip(placeholders, operands):
            if isinstance(operand, fx.Node) and operand in params:
                body_params[placeholder] = params[operand]
        context = hop if hop_context is None or hop_context in _TRANSPARENT_HOPS else hop_context
        found += _find_in_graph(body, body_params, sites, context)
    return found


def find_matmul_sites(gm: fx.GraphModule, example_inputs) -> tuple[list[MatmulSite], int]:
    """All weight matmul sites of `gm` (and of its higher-order op bodies), and the
    number of activation x activation matmuls left alone."""
    params = _parameter_placeholders(gm, example_inputs)
    sites: list[MatmulSite] = []
    activation_matmuls = _find_in_graph(gm, params, sites, None)
    return sites, activation_matmuls
