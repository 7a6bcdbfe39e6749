"""Lowering: how the semantic nodes of a rewritten graph run on each target.

The passes (`fp4compile/passes/`) say *what* a quantized layer computes: OCC
clamp, quantize, GEMM, compensate, as separate nodes with the reference
numerics of `runtime/`. This package is the one place that knows targets and
decides *how* those nodes run there:

- `cpu`: one float32 GEMM per product on the compensated activation (no
  compensation GEMM, gather or scatter), for Inductor's C++ backend;
- `cuda`: FP8 tensor-core GEMMs (`cuda_gemm`) and Triton kernels
  (`triton_kernels`);
- `inductor_ops`: Inductor lowerings of our own ops, for both targets (a
  per-tensor scale computed once into a buffer);
- `cache_key`: our source hash in Inductor's cache key.

Only the product backend (`fp4`) lowers; the debug backends `fp4_eager` and
`fp4_aot_eager` run the semantic graph, so comparing them with `fp4` isolates
the lowering. Nothing in `runtime/` imports from here.
"""
from __future__ import annotations

import torch.fx as fx

TARGETS = ("cpu", "cuda")


def lower(gm: fx.GraphModule, report, target: str) -> None:
    """Lower every quantized site of `report` for `target`, in place."""
    if target == "cpu":
        from .cpu import lower_graph
    elif target == "cuda":
        from .cuda import lower_graph
    else:
        raise ValueError(f"target={target!r} has no lowering; valid: {', '.join(TARGETS)}")
    by_owner = {}
    for site in report.sites:
        if site.quantized and site.rewritten:
            owner = site.graph_module or gm  # the top graph or a higher-order op's body
            by_owner.setdefault(id(owner), (owner, []))[1].append(site)
    for owner, sites in by_owner.values():
        lower_graph(owner.graph, sites, report.config)
        owner.graph.lint()
        owner.recompile()
