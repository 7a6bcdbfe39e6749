"""`inspect(model, *example_args)`: what the fp4 backend would do to a model, without compiling it.

    from fp4compile.inspection.inspect import inspect
    insp = inspect(model, idx, options={"recipe": "paper"})
    print(insp)                      # site table + per-graph summaries
    print(insp.numerics(idx))        # per-site FP4 fidelity on real operands
    print(insp.numerics(idx).occ_study())
    print(insp.cost())               # theoretical speedup of the captured graph
    insp.save("fp4compile_dump")     # before/after code, site tables, graph.html

The model is captured by dynamo exactly as `torch.compile(model, backend="fp4",
dynamic=True)` would capture it, and each graph goes through the same passes
(`fp4compile.passes.run_passes`), but the capturing backend then runs the
rewritten graph op by op, so nothing is compiled. The capture uses its own
dynamo cache region (`isolate_recompiles`): the user's compiled models keep
their compiled code and their recompile budget, and the reports of
`fp4compile.reports()` are left alone. A graph break gives one entry per graph.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

# The backend's own option validation and target choice, so that inspect()
# decides exactly as torch.compile(..., backend="fp4") would.
from ..backend import Fp4OptionsError
from ..backend import resolve_config as backend_config
from ..backend import resolve_target as backend_target
from ..config import Fp4Config
from ..passes import run_passes
from ..passes.policy import check_policy_applies, check_skip_patterns
from ..report import GraphReport, format_table
from . import dump


@dataclass
class CapturedGraph:
    """One graph dynamo captured, before and after the passes, and the passes' report."""

    index: int
    before: fx.GraphModule  # as captured; its nodes keep dynamo's example values (symbolic shapes)
    after: fx.GraphModule  # rewritten: the quantized sites are clamp / quantize / GEMM / compensate nodes
    report: GraphReport
    example_inputs: list = field(repr=False)  # what dynamo passed for the placeholders

    @property
    def sites(self) -> list:
        return self.report.sites

    @property
    def before_code(self) -> str:
        return dump.graph_module_code(self.before)

    @property
    def after_code(self) -> str:
        return dump.graph_module_code(self.after)

    @property
    def top_level_sites(self) -> list:
        """The sites whose matmul is a node of the graph itself, not of a higher-order-op body."""
        return [site for site in self.sites if dump.in_graph(site, self.after)]

    def shape_symbols(self) -> dict[str, str]:
        """Dynamo's shape symbols and what they stand for: {'s77': "x.size(0) = 4"}."""
        described = {}
        for node in self.before.graph.nodes:
            value = node.meta.get("example_value")
            if node.op != "placeholder" or not isinstance(value, torch.SymInt):
                continue
            sym = value.node.expr
            shape_env = value.node.shape_env
            sources = shape_env.var_to_sources.get(sym, [])
            values = getattr(shape_env, "backed_var_to_val", None)  # var_to_val before torch 2.12
            hint = (values if values is not None else shape_env.var_to_val).get(sym)
            if sources:
                name = re.sub(r"L\['([^']+)'\]", r"\1", sources[0].name)
                name = re.sub(r"\.size\(\)\[(\d+)\]", r".size(\1)", name)
                described[str(sym)] = f"{name} = {hint}" if hint is not None else name
        return described

    def symbol_names(self, dim_names=("b", "s")) -> dict[str, str]:
        """Names for the symbolic dims of the first input tensor that has any: {'s77': 'b', 's27': 's'}."""
        from .cost_model import name_input_dims

        for node in self.before.graph.nodes:
            value = node.meta.get("example_value")
            if node.op == "placeholder" and isinstance(value, torch.Tensor):
                if any(isinstance(d, torch.SymInt) for d in value.shape):
                    return name_input_dims(self.before, node.name, list(dim_names)[: value.dim()])
        return {}

    def summary(self) -> str:
        line = dump.summary_line(self.index, self.sites, self.report.config)
        skipped = [s for s in self.sites if not s.quantized]
        if skipped:
            line += "; high precision: " + ", ".join(f"{dump.site_label(s)} ({s.reason})" for s in skipped)
        if self.report.activation_matmuls:
            line += f"; {self.report.activation_matmuls} activation x activation matmuls left alone"
        symbols = self.shape_symbols()
        if symbols:
            line += "; shapes: " + ", ".join(f"{sym} = {what}" for sym, what in symbols.items())
        return line


class _GraphRunner:
    """What the capturing backend hands dynamo: runs the rewritten graph, then lets go of it.

    Dynamo keeps the returned callable in the (isolated) cache entry after the
    inspection is over; `release()` drops the graph so that entry holds nothing.
    """

    def __init__(self, gm: fx.GraphModule):
        self.forward = gm.forward

    def __call__(self, *args):
        if self.forward is None:
            raise RuntimeError("this inspection capture is finished; call torch.compile for a compiled model")
        return self.forward(*args)

    def release(self):
        self.forward = None


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` and its higher-order-op bodies, made before the passes rewrite them in place.

    The graphs are copied, the node metadata shallowly: the matmul nodes and
    dynamo's example values (which the cost model reads) survive in the copy.
    """
    snapshot = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for name, child in gm.named_children():
        if isinstance(child, fx.GraphModule):
            setattr(snapshot, name, _snapshot(child))
    return snapshot


def capture(model, example_args, example_kwargs, config, root=None) -> list[CapturedGraph]:
    """Dynamo-capture `model` on the example inputs; run the passes on every graph.

    `root`: the nn.Module behind `model`, for the per-layer policy (`filter_fn`, `keep_first_last`).
    """
    graphs: list[CapturedGraph] = []
    runners: list[_GraphRunner] = []

    def capturing_backend(gm: fx.GraphModule, example_inputs):
        before = _snapshot(gm)
        report = GraphReport(graph_id=len(graphs), backend="inspect", config=config)
        run_passes(gm, example_inputs, config, backend_target(config, example_inputs), report, root)
        graphs.append(CapturedGraph(len(graphs), before, gm, report, list(example_inputs)))
        runners.append(_GraphRunner(gm))
        return runners[-1]

    compiled = torch.compile(model, backend=capturing_backend, dynamic=True, isolate_recompiles=True)
    try:
        with torch.no_grad():
            compiled(*example_args, **example_kwargs)
    finally:
        for runner in runners:
            runner.release()
    return graphs


class Inspection:
    """What the backend does to one model: sites, rewritten graphs, numerics, cost, dumps."""

    def __init__(self, model, example_args, example_kwargs, config: Fp4Config, graphs: list[CapturedGraph]):
        self.model = model
        self.example_args = tuple(example_args)
        self.example_kwargs = dict(example_kwargs)
        self.config = config
        self.graphs = graphs

    @property
    def sites(self) -> list:
        """Every matmul site of every graph, in graph order (MatmulSite objects)."""
        return [site for graph in self.graphs for site in graph.sites]

    @property
    def quantized_sites(self) -> list:
        return [site for site in self.sites if site.quantized]

    def table(self) -> str:
        """One row per matmul site: module, op, M x K x N, formats, decision, reason."""
        rows = []
        for graph in self.graphs:
            for site in graph.sites:
                row = dump.site_row(site, self.config)
                rows.append({"graph": graph.index, **row} if len(self.graphs) > 1 else row)
        return format_table(rows) if rows else "(no matmul sites)"

    def __str__(self) -> str:
        lines = [
            f"fp4compile inspection: {len(self.quantized_sites)}/{len(self.sites)} matmul sites quantized "
            f"in {len(self.graphs)} graph{'s' if len(self.graphs) != 1 else ''}",
            dump.describe_formats(self.config),
            "",
            self.table(),
            "",
        ]
        lines += [graph.summary() for graph in self.graphs]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<Inspection: {len(self.graphs)} graph(s), {len(self.quantized_sites)}/{len(self.sites)} "
                f"sites quantized, recipe {self.config.recipe}>")

    def save(self, directory) -> Path:
        """Write the dump folder (graph_<i>/ per graph, index.md); returns its path."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for graph in self.graphs:
            dump.write_graph_dump(root / f"graph_{graph.index}", graph.after, graph.sites, self.config,
                                  graph.index, graph.before_code)
        dump.write_index(root)
        return root

    def numerics(self, *batch_args, **batch_kwargs):
        """Per-site FP4 fidelity on the real operands of one eager, high-precision forward pass.

        Without arguments the example inputs of the inspection are used. See
        `fp4compile.inspection.numerics` for what is measured and captured.
        """
        from .numerics import site_numerics

        if not batch_args and not batch_kwargs:
            batch_args, batch_kwargs = self.example_args, self.example_kwargs
        model = getattr(self.model, "_orig_mod", self.model)
        pairs = [(graph.index, site) for graph in self.graphs for site in graph.sites]
        return site_numerics(model, pairs, self.config, batch_args, batch_kwargs)

    def cost(self, symbol_names=None, gemm_speedup: float = 4, graph: int = 0) -> "CostReport":
        """Theoretical FP4 training speedup of one captured graph (the first by default).

        `symbol_names` renames dynamo's shape symbols; by default the symbolic
        dims of the first input tensor are named b, s (the demo's idx [b, s]).
        OCC and DGE are charged as the config sets them. The paper's LLaMA-layer
        figures come with it. Matmuls inside higher-order-op bodies (activation
        checkpoint regions) are not counted: the cost model reads the top-level
        graph only.
        """
        from .cost_model import graph_cost

        if not self.graphs:
            raise ValueError("dynamo captured no graph from this model: there is nothing to cost")
        captured = self.graphs[graph]
        if symbol_names is None:
            symbol_names = captured.symbol_names()
        quantized = {site.node: site.quantized for site in captured.top_level_sites}
        kwargs = dict(occ_alpha=self.config.occ_alpha, dge=self.config.dge_clamp is not None)
        return CostReport(
            graph=graph_cost(captured.before, quantized, symbol_names, gemm_speedup=gemm_speedup, **kwargs),
            graph_on_fp8=graph_cost(captured.before, quantized, symbol_names, gemm_speedup=2, **kwargs),
            paper=paper_layer_speedups(),
            uncounted_sites=len(captured.sites) - len(quantized),
        )


def paper_layer_speedups() -> dict:
    """The paper's LLaMA-layer figures from the cost model: label -> (Speedup, the paper's number)."""
    from .cost_model import PAPER_HIDDEN, PAPER_SEQ, speedup

    h, s = PAPER_HIDDEN, PAPER_SEQ
    return {
        "native FP4 GEMMs (4x BF16)": (speedup(h, s, gemm_speedup=4), 3.12),
        "native FP4 GEMMs + OCC alpha=0.99": (speedup(h, s, gemm_speedup=4, occ_alpha=0.99), 2.95),
        "FP4 GEMMs on FP8 tensor cores (2x BF16)": (speedup(h, s, gemm_speedup=2), 1.83),
    }


@dataclass
class CostReport:
    """Theoretical speedup of a captured graph, next to the paper's LLaMA-layer figures."""

    graph: object  # GraphCost at the requested FP4 GEMM speedup
    graph_on_fp8: object  # GraphCost with the FP4 GEMMs on FP8 tensor cores (2x BF16)
    paper: dict
    uncounted_sites: int = 0  # sites inside higher-order-op bodies, which the graph cost does not see

    def __str__(self) -> str:
        lines = [
            "Theoretical cost (FLOP count, no timing): every FLOP at the BF16 rate except FP4 GEMMs.",
            self.graph.table(),
            f"with the FP4 GEMMs on FP8 tensor cores (2x BF16): fwd+bwd {self.graph_on_fp8.speedup_value:.3f}x",
        ]
        if self.uncounted_sites:
            lines.append(f"not counted: {self.uncounted_sites} matmul site(s) inside higher-order-op bodies "
                         "(activation-checkpoint regions)")
        lines += [
            "",
            "The paper's LLaMA layer, h=4096, s=2048, (24h + 5s + 36) / (24h/g + 5s + 36):",
        ]
        for label, (ours, paper) in self.paper.items():
            lines.append(f"  {label}: {ours.value:.2f}x (paper: {paper:.2f}x)")
        return "\n".join(lines)


def inspect(model, *example_args, options=None, **example_kwargs) -> Inspection:
    """Capture `model(*example_args, **example_kwargs)` with dynamo and run the fp4 passes on it.

    `options` are the backend's (`{"recipe": "paper", ...}` or an Fp4Config),
    validated as `torch.compile(..., options=...)` validates them (a skip
    pattern that names no module of the model is an error). The model
    runs once, without grad, through the rewritten graphs.
    """
    config = backend_config(options)
    root = getattr(model, "_orig_mod", model)  # an already compiled model: its modules' own names
    root = root if isinstance(root, torch.nn.Module) else None
    if root is not None:
        try:
            check_skip_patterns(config, [name for name, _ in root.named_modules()])
        except ValueError as exc:
            raise Fp4OptionsError(str(exc)) from None
    check_policy_applies(config, root)
    graphs = capture(model, example_args, example_kwargs, config, root)
    return Inspection(model, example_args, example_kwargs, config, graphs)
