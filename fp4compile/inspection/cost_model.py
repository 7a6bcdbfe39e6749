"""Theoretical FLOP cost of FP4 training, for one LLaMA layer and for a captured FX graph.

FP4 tensor cores are not on the machines this project is tested on, so nothing
here measures time. What it gives instead is the paper's kind of estimate: count
the FLOPs of every operation, let the FP4 GEMMs go ``gemm_speedup`` times faster
than BF16, and read off the ratio of the two totals. Two levels:

* :func:`llama_layer_cost` / :func:`speedup` reproduce the paper's closed form
  for one transformer layer as sympy expressions in ``h`` (hidden size) and
  ``s`` (sequence length);
* :func:`graph_cost` applies the same rules to a graph captured by dynamo,
  node by node, with dynamic dimensions kept as symbols.

The model is a FLOP count, not a timing model: memory traffic, kernel launches
and casts are ignored, which is why the paper's simulated runs (about 1.08x)
land far below these figures.

Counting rules
==============

Per-token FLOPs of one transformer layer (forward pass), as in Wang et al.,
"Optimizing Large Language Model Training Using FP4 Quantization" (ICML 2025,
arXiv 2501.17116), where a layer costs ``24 h^2 + 5 s h + 36 h`` FLOPs per token:

* linear-layer GEMMs, ``24 h^2``: Q, K, V and output projections ``4 x 2h^2``
  plus an MLP with a ``4h`` intermediate, ``2 x 2 * 4h^2`` (LLaMA's SwiGLU MLP
  with an ``8h/3`` intermediate and three matrices costs the same ``16 h^2``);
* attention products, ``4 s h``: ``Q K^T`` and ``P V``, ``2 s h`` each, over the
  full ``s x s`` score matrix (no causal halving);
* score-side elementwise work (scale, mask, softmax), ``s h``: the paper's fifth
  ``s`` term, kept as it counts it so that its figures come out;
* the rest of the layer's elementwise work (norms, residual adds, activation,
  rotary embedding), ``36 h``: the paper's lumped constant.

Only the linear-layer GEMMs change precision. With FP4 GEMMs ``g`` times as fast
as BF16 the layer's speedup is

    (24 h^2 + 5 s h + 36 h) / (24 h^2 / g + 5 s h + 36 h)
      = (24 h + 5 s + 36) / (24 h / g + 5 s + 36),

3.12 at ``h = 4096, s = 2048`` for native FP4 (``g = 4``) and 1.83 when the FP4
GEMMs run on FP8 tensor cores (``g = 2``). Backward GEMMs cost twice the forward
ones; if every term of the layer triples in training, the ratio is the same, so
the paper's forward-pass figure is also its training figure.

Overheads (ours where the paper gives no number)
------------------------------------------------

The paper reports that OCC at ``alpha = 0.99`` lowers the native figure to
2.95x. The publicly reachable text states the figure but not the arithmetic,
so the counting below is this module's, chosen to be defensible and to
reproduce that figure to two decimals:

* OCC compensation: the residual ``A - clamp(A)`` has about ``2 (1 - alpha)``
  non-zero entries, so the compensation GEMM does ``2 (1 - alpha)`` of the dense
  GEMM's FLOPs. It runs in FP8 (2x BF16 throughput), but as a sparse operation:
  an unstructured-sparse (or gathered-column) FP8 GEMM is taken to reach half
  the dense FP8 rate, so its FLOPs cost the same as dense BF16 FLOPs. For the
  layer that adds ``2 (1 - alpha) * 24 h^2``, i.e.
  ``(24h + 5s + 36) / (6h + 5s + 36 + 0.48 h) = 2.949`` at ``alpha = 0.99``.
  (At the full FP8 rate the same count gives 3.03, not 2.95.) The compensation
  GEMM is counted on the GEMMs that read the activation: the forward one and,
  in training, the weight-gradient one (the compensated activation is what the
  weight gradient uses); the input-gradient GEMM does not touch it.
* DGE: about 8 FLOPs per weight element (scale, distance to the grid point,
  normalise, absolute value, power, ``1/k``, clamp, multiply into the weight
  gradient), once per backward call. Per token that is ``8 * 12 h^2 / T`` for a
  micro-batch of ``T`` tokens: ``192 h`` for one 2048-token sequence at
  ``h = 4096`` (2.95 becomes 2.93), negligible from a few sequences on.
* Quantization elementwise work (off in the layer model, as in the paper; on in
  the graph model): see :class:`OverheadCosts`. Non-GEMM FLOPs of every kind are
  costed at the BF16 GEMM rate, as the paper's formula does.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import sympy
import torch
import torch.fx

__all__ = [
    "HIDDEN",
    "SEQ",
    "OverheadCosts",
    "LayerCost",
    "Speedup",
    "SiteCost",
    "GraphCost",
    "llama_layer_cost",
    "paper_speedup_expr",
    "speedup",
    "graph_cost",
    "name_input_dims",
]

# Hidden size and sequence length of the layer model.
HIDDEN = sympy.Symbol("h", positive=True, integer=True)
SEQ = sympy.Symbol("s", positive=True, integer=True)

# The paper's example shapes (LLaMA-7B-like layer).
PAPER_HIDDEN = 4096
PAPER_SEQ = 2048


@dataclasses.dataclass(frozen=True)
class OverheadCosts:
    """FLOP charges for the work FP4 training adds around its GEMMs.

    Element counts are per call of the quantized GEMM; every charge except the
    compensation GEMM is elementwise work, costed at the BF16 rate.
    """

    # FP8 tensor cores run 2x BF16.
    compensation_gemm_speedup: float = 2.0
    # Fraction of the dense FP8 rate a 2(1 - alpha)-dense compensation GEMM
    # reaches (ours: unstructured sparsity or a gather of the outlier columns
    # leaves a skinny GEMM; 1/2 makes the layer model give the paper's 2.95).
    compensation_sparse_efficiency: float = 0.5
    # DGE derivative per weight element, once per backward call.
    dge_flops_per_weight: int = 8
    # Vector-wise absmax, multiply by the scale, round to the grid.
    activation_quant_flops: int = 3
    weight_quant_flops: int = 3
    # The upstream gradient's FP8 cast for the two backward GEMMs (same three steps).
    grad_quant_flops: int = 3
    # OCC on the activation: a one-pass quantile estimate, the clamp and the
    # residual ``A - A_c``. (An exact quantile needs a sort, O(n log n).)
    occ_clamp_flops: int = 3
    # Two scale multiplications per GEMM output element (row and column scales).
    epilogue_flops: int = 2

    @property
    def compensation_rate(self) -> sympy.Expr:
        """Throughput of the compensation GEMM relative to dense BF16."""
        return _rational(self.compensation_gemm_speedup) * _rational(self.compensation_sparse_efficiency)


def _rational(x: float | int | sympy.Expr) -> sympy.Expr:
    """Exact sympy number for a user-supplied factor (0.99 -> 99/100)."""
    if isinstance(x, sympy.Expr):
        return x
    return sympy.nsimplify(x, rational=True)


def _occ_density(occ_alpha: float | None) -> sympy.Expr:
    """Fraction of non-zero residual entries after clamping at the alpha / 1-alpha quantiles."""
    if occ_alpha is None:
        return sympy.Integer(0)
    alpha = _rational(occ_alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"occ_alpha must lie in (0, 1), got {occ_alpha}")
    return 2 * (1 - alpha)


def _check_factor(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


# ---------------------------------------------------------------------------
# One transformer layer
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Per-token forward FLOPs of one transformer layer, term by term."""

    linear_gemm: sympy.Expr
    attention_gemm: sympy.Expr
    attention_softmax: sympy.Expr
    elementwise: sympy.Expr
    # Element counts the overhead charges are applied to.
    weight_elements: sympy.Expr  # per layer (not per token)
    linear_input_elements: sympy.Expr  # per token, summed over the linear layers
    linear_output_elements: sympy.Expr  # per token, summed over the linear layers

    @property
    def total(self) -> sympy.Expr:
        return sympy.expand(self.linear_gemm + self.attention_gemm + self.attention_softmax + self.elementwise)

    def terms(self) -> dict[str, sympy.Expr]:
        return {
            "linear GEMMs": self.linear_gemm,
            "attention QK^T, PV": self.attention_gemm,
            "attention scale/mask/softmax": self.attention_softmax,
            "other elementwise": self.elementwise,
        }


def llama_layer_cost(
    h: sympy.Expr | int = HIDDEN,
    s: sympy.Expr | int = SEQ,
    *,
    elementwise_per_hidden: int = 36,
) -> LayerCost:
    """Per-token forward FLOPs of one LLaMA-style layer, as the paper counts them.

    ``h`` and ``s`` may be numbers or sympy expressions (the symbols ``h``, ``s``
    by default). ``elementwise_per_hidden`` is the paper's lumped 36.
    """
    h = sympy.sympify(h)
    s = sympy.sympify(s)
    mlp_hidden = 4 * h
    # 2 FLOPs per multiply-add: QKV + output projection, then MLP up + down.
    qkvo = 4 * (2 * h * h)
    mlp = 2 * (2 * h * mlp_hidden)
    return LayerCost(
        linear_gemm=qkvo + mlp,
        attention_gemm=2 * (2 * s * h),
        attention_softmax=s * h,
        elementwise=elementwise_per_hidden * h,
        weight_elements=4 * h * h + 2 * h * mlp_hidden,
        # Inputs: QKV (one read of x), output projection, MLP up, MLP down.
        linear_input_elements=h + h + h + mlp_hidden,
        # Outputs: Q, K, V, output projection, MLP up, MLP down.
        linear_output_elements=3 * h + h + mlp_hidden + h,
    )


def paper_speedup_expr(gemm_speedup: float = 4) -> sympy.Expr:
    """The paper's closed form ``(24h + 5s + 36) / (24h/g + 5s + 36)``."""
    g = _rational(gemm_speedup)
    return (24 * HIDDEN + 5 * SEQ + 36) / (24 * HIDDEN / g + 5 * SEQ + 36)


class Speedup(NamedTuple):
    """A theoretical speedup over BF16: the sympy expression and its value."""

    expr: sympy.Expr
    value: float


def speedup(
    h: int = PAPER_HIDDEN,
    s: int = PAPER_SEQ,
    *,
    gemm_speedup: float = 4,
    occ_alpha: float | None = None,
    dge: bool = False,
    tokens_per_batch: int | sympy.Expr | None = None,
    quantization: bool = False,
    costs: OverheadCosts = OverheadCosts(),
) -> Speedup:
    """Theoretical speedup of one FP4 layer over BF16 (expression in ``h``, ``s``; value at ``h``, ``s``).

    ``gemm_speedup``: FP4 GEMM throughput over BF16 (4 native FP4, 2 on FP8
    tensor cores). ``occ_alpha``: OCC quantile, None for no OCC. ``dge``: charge
    the DGE derivative, shared over ``tokens_per_batch`` tokens (default ``s``,
    a micro-batch of one sequence). ``quantization``: also charge the
    quantization elementwise work (the paper does not).
    """
    _check_factor("gemm_speedup", gemm_speedup)
    layer = llama_layer_cost()
    g = _rational(gemm_speedup)
    rest = layer.attention_gemm + layer.attention_softmax + layer.elementwise
    bf16 = layer.linear_gemm + rest
    fp4 = layer.linear_gemm / g + rest
    density = _occ_density(occ_alpha)
    fp4 += density * layer.linear_gemm / costs.compensation_rate
    tokens = SEQ if tokens_per_batch is None else sympy.sympify(tokens_per_batch)
    if dge:
        fp4 += costs.dge_flops_per_weight * layer.weight_elements / tokens
    if quantization:
        act = costs.activation_quant_flops + (costs.occ_clamp_flops if occ_alpha is not None else 0)
        fp4 += act * layer.linear_input_elements
        fp4 += costs.epilogue_flops * layer.linear_output_elements
        fp4 += costs.weight_quant_flops * layer.weight_elements / tokens
    expr = sympy.cancel(bf16 / fp4)
    value = float(expr.subs({HIDDEN: h, SEQ: s}))
    return Speedup(expr, value)


# ---------------------------------------------------------------------------
# Captured FX graphs
# ---------------------------------------------------------------------------

_LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
# Plain products: out = a @ b, contraction over a's last dimension.
_MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.mm, torch.bmm}
# out = beta * c + alpha * (a @ b), arguments (c, a, b).
_ADD_MATMUL_TARGETS = {torch.addmm, torch.baddbmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_ADD_MATMUL_METHODS = {"addmm", "baddbmm"}

_aten = torch.ops.aten
_MATMUL_TARGETS |= {_aten.mm.default, _aten.bmm.default, _aten.matmul.default}
_ADD_MATMUL_TARGETS |= {_aten.addmm.default, _aten.baddbmm.default}
_LINEAR_TARGETS |= {_aten.linear.default}

# Shape and data-movement operations: no arithmetic. Dtype casts count here
# too (they move data; the quantization charges cover the casts FP4 adds).
_FREE_NAMES = {
    "view", "reshape", "transpose", "permute", "contiguous", "expand", "expand_as",
    "unsqueeze", "squeeze", "flatten", "unflatten", "t", "view_as", "reshape_as",
    "narrow", "select", "split", "chunk", "unbind", "cat", "stack", "clone", "detach",
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "int", "long",
    "getitem", "size", "dim", "numel", "repeat", "repeat_interleave", "movedim",
    "swapaxes", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
    "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full",
    "_set_grad_enabled", "slice", "index_select", "gather", "as_strided", "_to_copy",
}
# Reductions: one FLOP per *input* element (n - 1 additions for a sum of n).
_REDUCTION_NAMES = {
    "sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "var", "std",
    "logsumexp", "argmax", "argmin", "all", "any", "var_mean", "std_mean",
}
# FLOPs per element for a few composite operations (ours): softmax = max,
# subtract, exp, sum, divide; layer norm = mean, subtract, square-and-sum,
# rsqrt-and-scale, affine; RMS norm = square-and-sum, rsqrt-and-scale, affine.
_PER_ELEMENT_FLOPS = {
    "softmax": 5, "log_softmax": 5, "_softmax": 5, "_log_softmax": 5,
    "layer_norm": 5, "native_layer_norm": 5, "group_norm": 5,
    "rms_norm": 4, "_fused_rms_norm": 4,
}


def _op_name(node: torch.fx.Node) -> str:
    """Short name of a node's operation: 'linear', 'matmul', 'softmax', 'add', ..."""
    target = node.target
    if node.op in ("call_method", "call_module"):
        return str(target)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    name = getattr(target, "__name__", str(target))
    return name.strip("_") if name.startswith("__") else name


class _ShapeReader:
    """Turns (fake) tensor shapes into sympy expressions and remembers the example values."""

    def __init__(self) -> None:
        self.example_values: dict[sympy.Symbol, int] = {}

    def dim(self, d: int | torch.SymInt) -> sympy.Expr:
        if isinstance(d, torch.SymInt):
            node = d.node
            expr = node.expr
            shape_env = getattr(node, "shape_env", None)
            if shape_env is not None:
                expr = shape_env.replace(expr)
                values = getattr(shape_env, "backed_var_to_val", None)
                if values is None:
                    values = shape_env.var_to_val
                for sym in expr.free_symbols:
                    if sym in values:
                        self.example_values[sym] = int(values[sym])
            return sympy.sympify(expr)
        return sympy.Integer(int(d))

    def shape(self, value: Any) -> tuple[sympy.Expr, ...]:
        return tuple(self.dim(d) for d in value.shape)

    def numel(self, value: Any) -> sympy.Expr:
        return sympy.Mul(*self.shape(value))


def _example(arg: Any) -> Any:
    """The example value of an FX argument (a tensor for tensor arguments)."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _matmul_operands(node: torch.fx.Node) -> tuple[Any, Any, str] | None:
    """(activation operand, weight operand, kind) of a matmul site, or None for other nodes.

    For ``linear`` the weight is ``[N, K]``; for the products it is the right
    operand ``[..., K, N]``. ``kind`` is 'linear', 'matmul' or 'addmm'.
    """
    name = node.target
    args = node.args
    if node.op == "call_function":
        if name in _LINEAR_TARGETS:
            return args[0], args[1], "linear"
        if name in _MATMUL_TARGETS:
            return args[0], args[1], "matmul"
        if name in _ADD_MATMUL_TARGETS:
            return args[1], args[2], "addmm"
    elif node.op == "call_method":
        # args[0] is self.
        if name in _MATMUL_METHODS:
            return args[0], args[1], "matmul"
        if name in _ADD_MATMUL_METHODS:
            return args[1], args[2], "addmm"
    return None


@dataclasses.dataclass(frozen=True)
class SiteCost:
    """One matmul site of the graph.

    ``forward_flops`` is the dense GEMM alone (``2 M K N`` with batch dimensions
    multiplied in); bias adds and ``addmm``'s ``beta * c`` are counted with the
    rest of the graph.
    """

    name: str
    op: str
    quantized: bool
    m: sympy.Expr  # output rows, batch dimensions multiplied in
    k: sympy.Expr  # contraction length
    n: sympy.Expr  # output columns
    forward_flops: sympy.Expr
    activation_elements: sympy.Expr
    weight_elements: sympy.Expr
    output_elements: sympy.Expr

    @property
    def training_flops(self) -> sympy.Expr:
        """Forward plus backward: the input- and weight-gradient GEMMs cost one forward each."""
        return 3 * self.forward_flops


@dataclasses.dataclass(frozen=True)
class GraphCost:
    """FLOP accounting of one captured graph, BF16 against the FP4 scheme.

    All ``*_time`` expressions are in BF16-FLOP equivalents: a GEMM FLOP at
    ``gemm_speedup`` costs ``1/gemm_speedup``, every other FLOP costs 1.
    """

    sites: tuple[SiteCost, ...]
    # Non-GEMM FLOPs of the graph, by operation name (forward pass).
    other_forward: dict[str, sympy.Expr]
    # Extra work of the FP4 scheme, by kind (forward and backward separately).
    overhead_forward: dict[str, sympy.Expr]
    overhead_backward: dict[str, sympy.Expr]
    bf16_forward_time: sympy.Expr
    fp4_forward_time: sympy.Expr
    bf16_training_time: sympy.Expr
    fp4_training_time: sympy.Expr
    example_values: dict[sympy.Symbol, int]
    gemm_speedup: float
    backward_gemm_speedup: float
    occ_alpha: float | None
    dge: bool
    elementwise_backward_factor: float

    @property
    def other_forward_flops(self) -> sympy.Expr:
        return sympy.Add(*self.other_forward.values())

    @property
    def site_forward_flops(self) -> sympy.Expr:
        return sympy.Add(*(site.forward_flops for site in self.sites))

    @property
    def speedup_expr(self) -> sympy.Expr:
        """Training (forward + backward) speedup over BF16."""
        return sympy.cancel(self.bf16_training_time / self.fp4_training_time)

    @property
    def forward_speedup_expr(self) -> sympy.Expr:
        return sympy.cancel(self.bf16_forward_time / self.fp4_forward_time)

    @property
    def speedup_value(self) -> float:
        """Training speedup at the shapes the graph was captured with."""
        return self.evaluate(self.speedup_expr)

    @property
    def forward_speedup_value(self) -> float:
        return self.evaluate(self.forward_speedup_expr)

    def evaluate(self, expr: sympy.Expr, values: Mapping[sympy.Symbol | str, int] | None = None) -> float:
        """Value of ``expr`` at the example shapes, or at ``values`` where given."""
        expr = sympy.sympify(expr)
        by_name = {str(sym): sym for sym in [*self.example_values, *expr.free_symbols]}
        subs = dict(self.example_values)
        for key, val in (values or {}).items():
            subs[by_name.get(str(key), key)] = val
        result = expr.subs(subs)
        if result.free_symbols:
            names = ", ".join(sorted(str(sym) for sym in result.free_symbols))
            raise ValueError(f"no example value for symbol(s) {names}")
        return float(result)

    def table(self) -> str:
        """Readable text table: one row per matmul site, the rest of the graph, overheads, totals."""
        ev = self.evaluate
        rows: list[tuple[str, ...]] = []
        header = ("site", "op", "precision", "M x K x N", "fwd FLOPs", "fwd", "fwd+bwd")
        for site in self.sites:
            rows.append((
                site.name,
                site.op,
                "FP4" if site.quantized else "BF16",
                f"{site.m} x {site.k} x {site.n}",
                str(site.forward_flops),
                _fmt(ev(site.forward_flops)),
                _fmt(ev(site.training_flops)),
            ))
        rows.append(("",) * len(header))
        for op, flops in sorted(self.other_forward.items()):
            rows.append((
                "(rest)", op, "BF16", "", str(flops), _fmt(ev(flops)),
                _fmt(ev(flops * (1 + _rational(self.elementwise_backward_factor)))),
            ))
        for kind in sorted(set(self.overhead_forward) | set(self.overhead_backward)):
            fwd = self.overhead_forward.get(kind, sympy.Integer(0))
            bwd = self.overhead_backward.get(kind, sympy.Integer(0))
            rows.append(("(fp4 overhead)", kind, "", "", str(fwd), _fmt(ev(fwd)), _fmt(ev(fwd + bwd))))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        # Long symbolic columns are capped so the table stays readable.
        widths = [min(w, 40) for w in widths]

        def line(cells: Sequence[str]) -> str:
            out = []
            for cell, width in zip(cells, widths):
                cell = cell if len(cell) <= width else cell[: width - 1] + "~"
                out.append(cell.ljust(width))
            return "  ".join(out).rstrip()

        lines = [line(header), line(["-" * w for w in widths])]
        lines += [line(r) for r in rows]
        values = ", ".join(f"{sym}={val}" for sym, val in sorted(self.example_values.items(), key=lambda kv: str(kv[0])))
        occ = "off" if self.occ_alpha is None else f"alpha={self.occ_alpha}"
        lines.append("")
        lines.append(
            f"FP4 GEMMs {self.gemm_speedup}x BF16 (backward {self.backward_gemm_speedup}x), "
            f"OCC {occ}, DGE {'on' if self.dge else 'off'}; example shapes: {values or 'static'}"
        )
        lines.append(f"BF16-equivalent FLOPs, fwd+bwd: BF16 {_fmt(ev(self.bf16_training_time))}, "
                     f"FP4 scheme {_fmt(ev(self.fp4_training_time))}")
        lines.append(f"speedup over BF16: forward {self.forward_speedup_value:.3f}x, "
                     f"fwd+bwd {self.speedup_value:.3f}x = {self.speedup_expr}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _rename_map(
    symbol_names: Mapping[str | sympy.Symbol, str | sympy.Symbol] | None,
    symbols: Iterable[sympy.Symbol],
) -> dict[sympy.Symbol, sympy.Symbol]:
    """sympy substitution for user-chosen symbol names ({'s77': 'b'} -> {s77: b}).

    Matched by name, so the caller need not know the assumptions dynamo gave
    its symbols; names that do not occur in the graph are ignored.
    """
    wanted = {str(old): new for old, new in (symbol_names or {}).items()}
    mapping: dict[sympy.Symbol, sympy.Symbol] = {}
    for sym in symbols:
        new = wanted.get(str(sym))
        if new is not None:
            mapping[sym] = new if isinstance(new, sympy.Symbol) else sympy.Symbol(str(new), positive=True, integer=True)
    return mapping


def name_input_dims(
    gm: torch.fx.GraphModule, input_name: str | int, dim_names: Sequence[str | None]
) -> dict[str, str]:
    """``symbol_names`` entries naming the symbolic dims of one graph input.

    ``input_name`` is a placeholder name (dynamo names the input ``x`` of
    ``forward`` ``'l_x_'``) or an index among the graph's tensor placeholders,
    parameters included, in graph order; ``dim_names[i]`` names dimension ``i``
    (None skips it).
    Returns e.g. ``{'s77': 'b', 's27': 's'}``; dims that are not plain symbols
    (static, or expressions of other symbols) are skipped.
    """
    tensor_inputs = [
        node for node in gm.graph.nodes
        if node.op == "placeholder" and isinstance(_example(node), torch.Tensor)
    ]
    if isinstance(input_name, int):
        node = tensor_inputs[input_name]
    else:
        matches = [n for n in tensor_inputs if input_name in (n.name, n.target)]
        if not matches:
            raise ValueError(f"no tensor input named {input_name!r}: {[n.name for n in tensor_inputs]}")
        node = matches[0]
    reader = _ShapeReader()
    shape = reader.shape(_example(node))
    names: dict[str, str] = {}
    for dim, name in zip(shape, dim_names):
        if name is not None and isinstance(dim, sympy.Symbol):
            names[str(dim)] = name
    return names


def graph_cost(
    gm: torch.fx.GraphModule,
    quantized_sites: Mapping[str, bool],
    symbol_names: Mapping[str | sympy.Symbol, str | sympy.Symbol] | None = None,
    *,
    gemm_speedup: float = 4,
    backward_gemm_speedup: float | None = None,
    occ_alpha: float | None = 0.99,
    dge: bool = True,
    quantization_overhead: bool = True,
    elementwise_backward_factor: float = 1,
    costs: OverheadCosts = OverheadCosts(),
) -> GraphCost:
    """FLOP table and theoretical FP4 speedup of a dynamo-captured graph.

    ``quantized_sites`` maps matmul node names to whether they run in FP4
    (sites not listed stay BF16; a name that is not a matmul site is an error).
    ``symbol_names`` renames shape symbols (``{'s0': 'b', 's1': 's'}``; see
    :func:`name_input_dims`). ``gemm_speedup`` / ``backward_gemm_speedup``: FP4
    GEMM throughput over BF16 for the forward and the two backward GEMMs (the
    backward one defaults to the forward one, as in the paper's count).
    ``occ_alpha``, ``dge``: charge OCC compensation and the DGE derivative;
    ``quantization_overhead``: charge the quantization elementwise work.
    ``elementwise_backward_factor``: backward FLOPs of a non-GEMM op relative to
    its forward (1: its gradient is one elementwise pass of the same size).
    """
    _check_factor("gemm_speedup", gemm_speedup)
    if backward_gemm_speedup is None:
        backward_gemm_speedup = gemm_speedup
    _check_factor("backward_gemm_speedup", backward_gemm_speedup)
    reader = _ShapeReader()
    sites: list[SiteCost] = []
    other: dict[str, sympy.Expr] = {}

    def add_other(op: str, flops: sympy.Expr) -> None:
        if flops != 0:
            other[op] = other.get(op, sympy.Integer(0)) + flops

    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        outputs = _tensors_of(_example(node))
        if not outputs:
            continue  # shape arithmetic, sizes, None
        op = _op_name(node)
        operands = _matmul_operands(node)
        if operands is not None:
            site = _site_cost(node, op, operands, reader, bool(quantized_sites.get(node.name, False)))
            sites.append(site)
            # Bias add of linear / beta * c of addmm: one FLOP per output element.
            has_bias = (operands[2] == "linear" and _linear_bias(node) is not None) or operands[2] == "addmm"
            if has_bias:
                add_other(f"{op} bias", site.output_elements)
            continue
        if op in _FREE_NAMES:
            continue
        if op in _REDUCTION_NAMES:
            source = _tensors_of(_example(node.args[0])) if node.args else []
            elements = reader.numel(source[0]) if source else sum(map(reader.numel, outputs))
            add_other(op, elements)
            continue
        per_element = _PER_ELEMENT_FLOPS.get(op, 1)
        add_other(op, per_element * sympy.Add(*(reader.numel(t) for t in outputs)))

    site_names = {site.name for site in sites}
    unknown = sorted(name for name in quantized_sites if name not in site_names)
    if unknown:
        raise ValueError(f"not matmul sites of this graph: {unknown}; sites are {sorted(site_names)}")

    graph_symbols: set[sympy.Symbol] = set(reader.example_values)
    for site in sites:
        graph_symbols |= site.forward_flops.free_symbols | site.weight_elements.free_symbols
    for flops in other.values():
        graph_symbols |= flops.free_symbols
    rename = _rename_map(symbol_names, graph_symbols)

    def renamed(expr: sympy.Expr) -> sympy.Expr:
        return sympy.expand(sympy.sympify(expr).xreplace(rename)) if rename else sympy.expand(expr)

    sites = [
        dataclasses.replace(
            site, m=renamed(site.m), k=renamed(site.k), n=renamed(site.n),
            forward_flops=renamed(site.forward_flops),
            activation_elements=renamed(site.activation_elements),
            weight_elements=renamed(site.weight_elements),
            output_elements=renamed(site.output_elements),
        )
        for site in sites
    ]
    other = {op: renamed(flops) for op, flops in other.items()}
    example_values = {rename.get(sym, sym): val for sym, val in reader.example_values.items()}

    # Overheads of the FP4 scheme, per quantized site.
    density = _occ_density(occ_alpha)
    overhead_fwd: dict[str, sympy.Expr] = {}
    overhead_bwd: dict[str, sympy.Expr] = {}

    def charge(table: dict[str, sympy.Expr], kind: str, flops: sympy.Expr) -> None:
        if flops != 0:
            table[kind] = sympy.expand(table.get(kind, sympy.Integer(0)) + flops)

    rate = costs.compensation_rate
    for site in sites:
        if not site.quantized:
            continue
        if occ_alpha is not None:
            # Forward dA @ W^T and weight-gradient dY^T @ dA, both 2(1 - alpha)-dense.
            charge(overhead_fwd, "OCC compensation GEMM", density * site.forward_flops / rate)
            charge(overhead_bwd, "OCC compensation GEMM", density * site.forward_flops / rate)
            if quantization_overhead:
                charge(overhead_fwd, "OCC clamp", costs.occ_clamp_flops * site.activation_elements)
        if quantization_overhead:
            charge(overhead_fwd, "quantize activation", costs.activation_quant_flops * site.activation_elements)
            charge(overhead_fwd, "quantize weight", costs.weight_quant_flops * site.weight_elements)
            charge(overhead_fwd, "GEMM epilogue scales", costs.epilogue_flops * site.output_elements)
            charge(overhead_bwd, "quantize gradient", costs.grad_quant_flops * site.output_elements)
            # Input-gradient output has the activation's shape, weight-gradient output the weight's.
            charge(overhead_bwd, "GEMM epilogue scales",
                   costs.epilogue_flops * (site.activation_elements + site.weight_elements))
        if dge:
            charge(overhead_bwd, "DGE", costs.dge_flops_per_weight * site.weight_elements)

    g_fwd = _rational(gemm_speedup)
    g_bwd = _rational(backward_gemm_speedup)
    eb = _rational(elementwise_backward_factor)
    other_total = sympy.Add(*other.values())
    gemm_fwd = sympy.Add(*(s.forward_flops for s in sites))
    fp4_gemm_fwd = sympy.Add(*(s.forward_flops / g_fwd if s.quantized else s.forward_flops for s in sites))
    fp4_gemm_bwd = sympy.Add(*(2 * s.forward_flops / g_bwd if s.quantized else 2 * s.forward_flops for s in sites))
    over_fwd = sympy.Add(*overhead_fwd.values())
    over_bwd = sympy.Add(*overhead_bwd.values())

    bf16_forward = sympy.expand(gemm_fwd + other_total)
    fp4_forward = sympy.expand(fp4_gemm_fwd + other_total + over_fwd)
    bf16_training = sympy.expand(3 * gemm_fwd + (1 + eb) * other_total)
    fp4_training = sympy.expand(fp4_gemm_fwd + fp4_gemm_bwd + (1 + eb) * other_total + over_fwd + over_bwd)

    return GraphCost(
        sites=tuple(sites),
        other_forward=other,
        overhead_forward=overhead_fwd,
        overhead_backward=overhead_bwd,
        bf16_forward_time=bf16_forward,
        fp4_forward_time=fp4_forward,
        bf16_training_time=bf16_training,
        fp4_training_time=fp4_training,
        example_values=example_values,
        gemm_speedup=gemm_speedup,
        backward_gemm_speedup=backward_gemm_speedup,
        occ_alpha=occ_alpha,
        dge=dge,
        elementwise_backward_factor=elementwise_backward_factor,
    )


def _linear_bias(node: torch.fx.Node) -> Any:
    if len(node.args) > 2:
        return node.args[2]
    return node.kwargs.get("bias")


def _site_cost(
    node: torch.fx.Node,
    op: str,
    operands: tuple[Any, Any, str],
    reader: _ShapeReader,
    quantized: bool,
) -> SiteCost:
    """FLOPs and operand sizes of one matmul node: 2 * M * K * N."""
    activation, weight, kind = operands
    act_value, weight_value = _example(activation), _example(weight)
    out_value = _tensors_of(_example(node))[0]
    act_shape = reader.shape(act_value)
    out_shape = reader.shape(out_value)
    # Contraction length: the activation's last dimension (a 1-D left operand is a single row).
    k = act_shape[-1]
    n = out_shape[-1] if out_shape else sympy.Integer(1)
    out_elements = sympy.Mul(*out_shape)
    m = sympy.cancel(out_elements / n)
    return SiteCost(
        name=node.name,
        op=op,
        quantized=quantized,
        m=m,
        k=k,
        n=n,
        forward_flops=2 * out_elements * k,
        activation_elements=sympy.Mul(*act_shape),
        weight_elements=reader.numel(weight_value),
        output_elements=out_elements,
    )
