"""Graph dumps: the files that show what the FP4 rewrite did to one captured graph.

A dump folder holds one subfolder per graph (`graph_0/`, `graph_1/`, ...):

    before.py    the graph dynamo captured (`GraphModule.code`), when known
    after.py     the same graph after the passes: the inserted clamp / quantize /
                 FP4 GEMM / compensate calls are plain lines of Python
    lowered.py   the graph after the target's lowering step (the `fp4` backend
                 only): what Inductor receives, e.g. on CPU one GEMM per product
                 on the compensated activation
    sites.md     the site table, one row per matmul site, with the decision
    sites.csv    the same, machine-readable (M, K, N in separate columns)
    graph.html   the rewritten graph: a module overview (each module's sites and decisions,
                 expandable to the inserted nodes) and, collapsed, the full drawing
                 (the top-level graph; higher-order-op bodies are in the code files)

and an `index.md` listing the graphs with their summaries.

`Inspection.save(dir)` writes such a folder on demand. `maybe_dump` writes one
for every graph any fp4 backend compiles when the environment variable
FP4COMPILE_DUMP_DIR is set, so a training script can be inspected without
changing it.
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import torch.fx as fx

from ..report import describe_gradient, format_table
from ..lowering import cpu as lowering_cpu
from ..lowering import cuda as lowering_cuda
from ..lowering import cuda_compensation as lowering_cuda_compensation
from ..runtime import linear_ops

DUMP_DIR_ENV = "FP4COMPILE_DUMP_DIR"

# Node kinds of the HTML view (inspection/html.py) for the ops the rewrite inserts.
INSERTED_KINDS = {
    linear_ops.occ_clamp_op: "occ_clamp",
    linear_ops.quantize_activation_op: "quantize",
    linear_ops.quantize_weight_op: "quantize",
    linear_ops.fp4_gemm_op: "fp4_gemm",
    linear_ops.compensate_op: "compensate",
}
# ... and the ops a lowering puts in their place.
INSERTED_KINDS.update({
    lowering_cpu.compensated_activation_op: "quantize",
    lowering_cuda.fp8_gemm_op: "fp4_gemm",
    lowering_cuda.triton_occ_clamp_op: "occ_clamp",
    lowering_cuda.folded_activation_op: "quantize",
    lowering_cuda.folded_fp8_gemm_op: "fp4_gemm",
    lowering_cuda_compensation.channel_compensate_op: "compensate",
})
INSERTED_KINDS[linear_ops.requantized_gemm_op] = "fp4_gemm"


def describe_formats(config) -> str:
    """One line: how weights, activations and gradients are quantized under `config`."""
    if not config.quantizes:
        return f"recipe {config.recipe}: no quantization"
    dge = f"DGE k={config.dge_k:g}, clamp {config.dge_clamp:g}" if config.dge_clamp is not None else "STE"
    if config.occ_alpha is None:
        occ = "no OCC"
    else:
        occ = f"OCC alpha={config.occ_alpha} per {config.occ_scope}, {'compensated' if config.occ_compensate else 'not compensated'}"
    weights = f"{config.weight_fmt}/{config.weight_granularity} ({dge})" if config.weight_fmt else "high precision"
    acts = f"{config.act_fmt}/{config.act_granularity} ({occ})" if config.act_fmt else "high precision"
    return f"recipe {config.recipe}: weights {weights}, activations {acts}, gradients {describe_gradient(config)}"


def site_label(site) -> str:
    """The module path of a site, or its weight's name for a parameter of the root module."""
    return site.module_path or site.weight_name or site.node


def site_row(site, config) -> dict:
    """One site as a table row: what it is, its GEMM shape, formats and the decision."""
    m, k, n = site.mkn()
    occ = "-"
    if site.quantized and config.occ_alpha is not None:
        occ = f"{config.occ_alpha:g}/{config.occ_scope}{'+comp' if config.occ_compensate else ''}"
    fmt = lambda f, g: f"{f}/{g}" if f else "high precision"
    return {
        "module": site_label(site),
        "op": site.op,
        "M x K x N": " x ".join(str(d) for d in (m, k, n)),
        "weight": fmt(config.weight_fmt, config.weight_granularity) if site.quantized else "-",
        "activation": fmt(config.act_fmt, config.act_granularity) if site.quantized else "-",
        "gradient": describe_gradient(config) if site.quantized else "-",
        "OCC": occ,
        "decision": "quantized" if site.quantized else "high precision",
        "reason": site.reason,
    }


def graph_module_code(gm) -> str:
    """`gm.code`, followed by the code of every higher-order-op body it holds (checkpoint regions).

    The site finder also quantizes matmuls inside such bodies; their code lives
    in submodules, not in the top-level code.
    """
    parts = [gm.code]
    for name, sub in gm.named_modules():
        if name and isinstance(sub, fx.GraphModule):
            parts.append(f"\n# ---- {name}: body of a higher-order op (e.g. an activation-checkpoint region) ----\n"
                         + sub.code)
    return "".join(parts)


def in_graph(site, gm) -> bool:
    """Whether `site`'s matmul is a node of `gm`'s own graph (not of a higher-order-op body)."""
    owner = getattr(site, "graph_module", None)
    return owner is None or owner is gm


def node_kinds(graph, sites) -> dict:
    """Node name -> HTML node kind: inserted ops by their target, skipped sites' matmuls.

    `sites` should be those of `graph` itself (see `in_graph`): a body's node
    names may repeat the top graph's. For a graph before the rewrite (the site
    matmuls still in it) quantized sites are marked "quantized_matmul".
    """
    kinds = {}
    site_by_node = {site.node: site for site in sites}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            kinds[node.name] = node.op
        elif node.op == "call_function" and node.target in INSERTED_KINDS:
            kinds[node.name] = INSERTED_KINDS[node.target]
        elif node.name in site_by_node:
            kinds[node.name] = "quantized_matmul" if site_by_node[node.name].quantized else "skipped_matmul"
    return kinds


def summary_line(graph_index: int, sites, config) -> str:
    quantized = sum(site.quantized for site in sites)
    return f"graph {graph_index}: quantized {quantized}/{len(sites)} matmul sites (recipe {config.recipe})"


def _markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    escape = lambda v: str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(escape(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def write_graph_dump(folder, after_gm, sites, config, graph_index: int, before_code: str | None = None,
                     lowered_code: str | None = None) -> Path:
    """Write before.py and lowered.py (if given), after.py, sites.md, sites.csv and graph.html into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, code in (("before.py", before_code), ("lowered.py", lowered_code)):
        if code is not None:
            (folder / name).write_text(code, encoding="utf-8")
        else:
            (folder / name).unlink(missing_ok=True)  # never leave an older graph's code next to this one
    (folder / "after.py").write_text(graph_module_code(after_gm), encoding="utf-8")

    rows = [site_row(site, config) for site in sites]
    heading = f"# {summary_line(graph_index, sites, config)}\n\n{describe_formats(config)}\n\n"
    (folder / "sites.md").write_text(heading + (_markdown_table(rows) if rows else "(no matmul sites)") + "\n",
                                     encoding="utf-8")
    with open(folder / "sites.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["graph", "node", "module", "weight_name", "op", "M", "K", "N", "weight_layout",
                         "weight", "activation", "OCC", "decision", "reason", "inserted", "lowering"])
        for site, row in zip(sites, rows):
            m, k, n = site.mkn()
            writer.writerow([graph_index, site.node, site.module_path, site.weight_name, site.op, m, k, n,
                             site.weight_layout, row["weight"], row["activation"], row["OCC"], row["decision"],
                             site.reason, " ".join(site.inserted), site.lowering])
    from .html import write_graph_html  # networkx: imported only when a dump is written

    top_level = [site for site in sites if in_graph(site, after_gm)]
    write_graph_html(folder / "graph.html", after_gm.graph, node_kinds(after_gm.graph, top_level), rows,
                     f"fp4compile graph {graph_index}: {describe_formats(config)}")
    return folder


_GRAPH_FOLDER = re.compile(r"graph_(\d+)$")


def write_index(root) -> Path:
    """(Re)write `root/index.md` from the graph_<i>/ folders present, with each one's summary."""
    root = Path(root)
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and _GRAPH_FOLDER.match(p.name)),
        key=lambda p: int(_GRAPH_FOLDER.match(p.name).group(1)),
    )
    lines = ["# fp4compile graph dump", ""]
    for folder in folders:
        sites_md = folder / "sites.md"
        first = sites_md.read_text(encoding="utf-8").splitlines()[0].lstrip("# ") if sites_md.exists() else ""
        files = " ".join(f"[{f.name}]({folder.name}/{f.name})" for f in sorted(folder.iterdir()) if f.is_file())
        lines.append(f"- **{folder.name}**: {first}  \n  {files}")
    lines.append("")
    path = root / "index.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def dumping() -> bool:
    """Whether $FP4COMPILE_DUMP_DIR asks for a dump of every compiled graph."""
    return bool(os.environ.get(DUMP_DIR_ENV))


def maybe_dump(gm, report, before_code: str | None = None, lowered_code: str | None = None) -> None:
    """Write the dump of one compiled graph into $FP4COMPILE_DUMP_DIR/graph_<id>/, if the variable is set.

    Called by the backend with `gm` as the passes left it; `before_code` is the
    graph's code before them and `lowered_code` after the lowering step (each
    file is skipped when the backend does not pass it).
    """
    root = os.environ.get(DUMP_DIR_ENV)
    if not root:
        return
    write_graph_dump(Path(root) / f"graph_{report.graph_id}", gm, report.sites, report.config,
                     report.graph_id, before_code, lowered_code)
    write_index(root)


def format_site_table(sites, config) -> str:
    """The site table as aligned plain text."""
    return format_table([site_row(site, config) for site in sites]) if sites else "(no matmul sites)"
