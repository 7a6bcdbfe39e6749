"""FX passes: what the backend computes. One pass per file; `run_passes` lists the order."""
from __future__ import annotations

from ..report import GraphReport
from .find_sites import find_matmul_sites
from .policy import apply_policy
from .rewrite import rewrite_sites


def run_passes(gm, example_inputs, config, target: str, report: GraphReport, root=None) -> GraphReport:
    """The pass order: find the sites, decide each, rewrite the quantized ones.

    `root`: the nn.Module the graph was captured from, when known (the per-layer policy reads it).
    """
    report.sites, report.activation_matmuls = find_matmul_sites(gm, example_inputs)
    apply_policy(report.sites, config, target, root)
    rewrite_sites(gm, report.sites, config, report.graph_id)
    return report
