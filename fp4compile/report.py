"""What the backend did to each compiled graph: one report per graph, one row per site.

`fp4compile.reports()` lists them; `fp4compile.reset()` clears them. Every compile
logs one line at INFO on the `fp4compile` logger, so a silent fallback to high
precision is visible without extra tooling.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

logger = logging.getLogger("fp4compile")


@dataclass
class MatmulSite:
    """One matmul whose operand is a weight parameter, and what the pass decided."""

    node: str  # name of the matmul node in the captured graph
    op: str  # "linear", "matmul" or "addmm"
    module_path: str  # e.g. "layers.0.mlp.up_proj"
    weight_name: str  # e.g. "layers.0.mlp.up_proj.weight"
    act_shape: tuple  # input activation shape (ints or symbolic sizes)
    weight_shape: tuple  # as stored in the module
    weight_layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D, x @ W)
    has_bias: bool = False
    quantized: bool = False
    reason: str = ""  # one line, set when not quantized
    inserted: tuple = ()  # names of the nodes the rewrite inserted
    dtype: object = None  # the weight's dtype
    # (matmul, activation, weight, bias) graph nodes, for the rewrite pass only.
    fx_nodes: tuple = field(default=(), repr=False, compare=False)
    graph_module: object = field(default=None, repr=False, compare=False)  # graph holding the node
    # The rewrite's nodes by role ("clamp", "act", "weight", "gemm", "compensate",
    # "add", "shape"), for the lowering step only.
    rewritten: dict = field(default_factory=dict, repr=False, compare=False)
    lowering: str = ""  # how the target runs the site, set by the lowering step
    weight_side: str = "right"  # "left" for W @ x: the rewrite multiplies x^T by W^T
    addmm_alpha_beta: tuple = (1, 1)  # addmm's (alpha, beta): y = beta * b + alpha * (x @ W)

    @property
    def in_features(self):
        return self.weight_shape[1] if self.weight_layout == "out_in" else self.weight_shape[0]

    @property
    def out_features(self):
        return self.weight_shape[0] if self.weight_layout == "out_in" else self.weight_shape[1]

    def mkn(self):
        """(M, K, N) of the forward GEMM; M may be a symbolic expression."""
        m = 1
        for d in self.act_shape[:-1]:
            m = m * d
        if len(self.weight_shape) != 2:
            return m, (self.act_shape[-1] if self.act_shape else "?"), self.weight_shape[-1] if self.weight_shape else "?"
        return m, self.in_features, self.out_features

    def row(self, config=None) -> dict:
        m, k, n = self.mkn()
        row = {
            "module": self.module_path or "(root)",
            "op": self.op + (" (weight left)" if self.weight_side == "left" else ""),
            "M": str(m),
            "K": str(k),
            "N": str(n),
            "quantized": self.quantized,
            "reason": self.reason,
        }
        if config is not None:
            row["weight"] = f"{config.weight_fmt}/{config.weight_granularity}" if self.quantized else "-"
            row["activation"] = f"{config.act_fmt}/{config.act_granularity}" if self.quantized else "-"
            row["gradient"] = describe_gradient(config) if self.quantized else "-"
        return row


def describe_gradient(config) -> str:
    """How a quantized site's backward GEMMs take the output gradient, in a few words.

    "e5m2/tensor" is the paper's FP8 gradient (per-tensor power-of-two scale);
    the NVFP4/MXFP4 route reads e.g. "e2m1/block16/stochastic, RHT16".
    """
    if config.grad_fmt is None:
        return "high precision"
    text = f"{config.grad_fmt}/{config.grad_granularity}"
    if config.grad_rounding != "nearest":
        text += f"/{config.grad_rounding}"
    if config.hadamard:
        text += f", RHT{config.hadamard} (seed {config.hadamard_seed})"
    return text


@dataclass
class GraphReport:
    """The sites of one compiled graph and the config they were decided under."""

    graph_id: int
    backend: str
    config: object
    sites: list = field(default_factory=list)
    activation_matmuls: int = 0  # activation x activation products left alone

    @property
    def quantized(self):
        return [s for s in self.sites if s.quantized]

    def summary(self) -> str:
        skipped = [s for s in self.sites if not s.quantized]
        text = f"quantized {len(self.quantized)}/{len(self.sites)} matmuls"
        if skipped:
            shown = ", ".join(f"{s.module_path or s.node} ({s.reason})" for s in skipped[:6])
            more = f", and {len(skipped) - 6} more" if len(skipped) > 6 else ""
            text += f"; skipped {shown}{more}"
        return f"[graph {self.graph_id}, recipe {self.config.recipe}] {text}"

    def table(self) -> str:
        rows = [s.row(self.config) for s in self.sites]
        return format_table(rows) if rows else "(no matmul sites)"

    def __str__(self):
        return self.summary() + "\n" + self.table()


def format_table(rows: list[dict]) -> str:
    """A plain-text table with aligned columns."""
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


_lock = threading.Lock()
_reports: list[GraphReport] = []


def add_report(report: GraphReport) -> None:
    with _lock:
        _reports.append(report)
    logger.info(report.summary())


def next_graph_id() -> int:
    with _lock:
        return len(_reports)


def reports() -> list[GraphReport]:
    """One report per graph compiled by an fp4 backend since the last reset()."""
    with _lock:
        return list(_reports)


def reset() -> None:
    """Clear the reports, the telemetry records, the precision-switch events and dynamo's
    compiled-code caches (torch.compiler.reset())."""
    import torch

    from .precision_switch import clear_switch_events
    from .runtime import stats as telemetry

    with _lock:
        _reports.clear()
    telemetry.clear()
    clear_switch_events()
    torch.compiler.reset()
