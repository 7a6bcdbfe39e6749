"""Render an FX graph, annotated with what the FP4 rewrite did to it, as one HTML page.

The FP4 backend rewrites linear-layer matmuls into clamp / quantize / FP4 GEMM /
compensate nodes and leaves some matmul sites alone. Reading that from
``graph.print_tabular()`` is painful once a graph has hundreds of nodes, so this
module draws the graph instead, at two levels:

* the **module overview** the page opens at (:mod:`fp4compile.inspection.html_overview`):
  one box per module, listing its matmul sites and their decisions, each box
  expandable into a drawing of its nodes with getitem and view/reshape/cast
  nodes folded into their producers; a search field filters the boxes by
  module name;
* the **full drawing**, collapsed below it: every FX node becomes a box in an
  inline SVG, coloured and shaped by what the rewrite made of it;

with the per-site table underneath.

The page is fully self-contained (inline CSS, SVG and one inline script; no
fonts, images or other resources fetched from anywhere), so it can be attached
to a CI run or opened from a machine without network access. Without
JavaScript everything but the search still works (the boxes expand natively).

Layout: networkx holds the structure (one vertex per FX node, one edge per input
use) and supplies the layers (``nx.topological_generations``) and the longest
path. That path, the model's main flow, is drawn as a straight vertical spine;
the other nodes are placed around it with a small layered-drawing heuristic
(barycentre sweeps, least-squares row packing), weights sit next to the node
that uses them, long edges run in lanes of their own and wide layers wrap onto
several rows. The SVG grows with the node count and sits in a scrollable box.
The overview's per-module drawings use the same layout.
"""

from __future__ import annotations

import html
import math
import os
import pathlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
import torch.fx

__all__ = ["NODE_KINDS", "render_graph_html", "write_graph_html"]


@dataclass(frozen=True)
class _KindStyle:
    label: str
    fill: str
    stroke: str
    shape: str  # one of: rect, round, pill, hexagon, parallelogram, octagon, double
    stroke_width: float = 1.2
    dash: str | None = None
    text_color: str = "#1a1a1a"
    highlighted: bool = False  # drawn with a halo: the nodes the FP4 rewrite is about


# Order here is the legend order.
_KIND_STYLES: dict[str, _KindStyle] = {
    "quantized_matmul": _KindStyle(
        "Quantized matmul (rewritten to FP4)", "#a5d6a7", "#1b5e20", "rect",
        stroke_width=3.0, highlighted=True,
    ),
    "skipped_matmul": _KindStyle(
        "Matmul site skipped (kept in high precision)", "#ffcdd2", "#b71c1c", "rect",
        stroke_width=2.5, dash="6 3", highlighted=True,
    ),
    "occ_clamp": _KindStyle(
        "Inserted OCC clamp", "#ffe082", "#e65100", "hexagon",
        stroke_width=2.0, highlighted=True,
    ),
    "quantize": _KindStyle(
        "Inserted FP4 quantize", "#d1c4e9", "#4527a0", "parallelogram",
        stroke_width=2.0, highlighted=True,
    ),
    "fp4_gemm": _KindStyle(
        "Inserted FP4 GEMM", "#90caf9", "#0d47a1", "double",
        stroke_width=2.0, highlighted=True,
    ),
    "compensate": _KindStyle(
        "Inserted outlier compensation", "#80deea", "#006064", "octagon",
        stroke_width=2.0, highlighted=True,
    ),
    "placeholder": _KindStyle("Graph input (placeholder)", "#eeeeee", "#616161", "pill"),
    "output": _KindStyle(
        "Graph output", "#37474f", "#102027", "pill", stroke_width=2.0, text_color="#ffffff"
    ),
    "other": _KindStyle("Other node", "#ffffff", "#9e9e9e", "round"),
}

#: The node kinds ``render_graph_html`` understands, in legend order.
NODE_KINDS: tuple[str, ...] = tuple(_KIND_STYLES)

# Geometry, in SVG user units (pixels at 100% zoom).
_NODE_WIDTH = 150.0
_NODE_HEIGHT = 30.0
_COLUMN_GAP = 24.0
_ROW_GAP = 46.0
_MARGIN = 24.0
_WAYPOINT_WIDTH = 4.0  # lane reserved for a long edge crossing a row
_WAYPOINT_GAP = 6.0
# How hard an item resists being moved when a row is packed, relative to a computed node.
_WAYPOINT_WEIGHT = 1e-4  # tiny: even hundreds of lanes in a row must not push a node
_SIDE_WEIGHT = 0.1  # hanging nodes (see _hanging_nodes)
_MAX_NODES_PER_ROW = 14
_LABEL_CHARS = 20
_SWEEPS = 5  # odd: the last sweep goes downwards, aligning nodes under their inputs


def render_graph_html(
    graph: torch.fx.Graph,
    node_kinds: Mapping[str, str],
    site_rows: Sequence[Mapping[str, Any]],
    title: str,
) -> str:
    """Return a self-contained HTML page drawing ``graph`` with the FP4 rewrite marked.

    Args:
        graph: the FX graph to draw (before or after the rewrite).
        node_kinds: node name -> one of :data:`NODE_KINDS`; nodes not listed are
            drawn as ``"other"``. Names that are not in the graph are ignored.
        site_rows: one dict per matmul site; every key becomes a table column.
        title: page heading and ``<title>``.

    Raises:
        ValueError: if ``node_kinds`` names a kind that is not in :data:`NODE_KINDS`.
    """
    unknown = sorted({kind for kind in node_kinds.values() if kind not in _KIND_STYLES})
    if unknown:
        raise ValueError(f"unknown node kind(s) {unknown}; expected one of {list(NODE_KINDS)}")

    fx_nodes = list(graph.nodes)
    kinds = {node.name: node_kinds.get(node.name, "other") for node in fx_nodes}
    dag = _graph_to_digraph(fx_nodes)
    svg = _render_svg(fx_nodes, dag, _layout(dag), kinds)

    kind_counts = {kind: 0 for kind in NODE_KINDS}
    for kind in kinds.values():
        kind_counts[kind] += 1

    from .html_overview import OVERVIEW_CSS, OVERVIEW_SCRIPT, build_overview, render_overview

    overview = build_overview(graph, kinds, site_rows, describe_target=_describe_target)
    escaped_title = _escape(title)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{escaped_title}</title>",
            f"<style>{_PAGE_CSS}\n{OVERVIEW_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{escaped_title}</h1>",
            render_overview(overview),
            _render_legend(kind_counts),
            '<details class="full-graph">',
            f"<summary>Full graph: every FX node ({len(fx_nodes)} nodes, "
            f"{dag.number_of_edges()} edges)</summary>",
            '<p class="summary">Hover a node for its full name, op and target.</p>',
            f'<div class="graph-scroll">{svg}</div>',
            "</details>",
            "<h2>Matmul sites</h2>",
            _render_site_table(site_rows),
            f"<script>{OVERVIEW_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )


def write_graph_html(
    path: str | os.PathLike[str],
    graph: torch.fx.Graph,
    node_kinds: Mapping[str, str],
    site_rows: Sequence[Mapping[str, Any]],
    title: str,
) -> pathlib.Path:
    """Render the page (see :func:`render_graph_html`) and write it to ``path``.

    Missing parent directories are created. Returns the path written.
    """
    out_path = pathlib.Path(path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(render_graph_html(graph, node_kinds, site_rows, title), encoding="utf-8")
    return out_path


# --------------------------------------------------------------------------- structure


def _graph_to_digraph(fx_nodes: Sequence[torch.fx.Node]) -> nx.DiGraph:
    """One vertex per FX node (in graph order), one edge input -> user per distinct input."""
    dag = nx.DiGraph()
    for order, node in enumerate(fx_nodes):
        dag.add_node(node.name, order=order)
    for node in fx_nodes:
        for input_node in node.all_input_nodes:
            dag.add_edge(input_node.name, node.name)
    return dag


# --------------------------------------------------------------------------- layout

# A lane that long edges use to cross one row: (("from"|"to", node name), row index).
_Waypoint = tuple[tuple[str, str], int]


@dataclass
class _Layout:
    """Where everything goes: node centres, and for each edge the lane x per crossed row."""

    centres: dict[str, tuple[float, float]]
    edge_waypoints: dict[tuple[str, str], list[tuple[float, float]]]
    width: float
    height: float


def _layout(dag: nx.DiGraph) -> _Layout:
    """Layered placement: one band of rows per topological generation, edges point down.

    An edge that spans more than one row crosses the rows in between through
    thin virtual vertices (waypoints). Waypoints take part in the ordering like
    nodes, so long edges (residual connections, saved activations) get a lane of
    their own instead of being drawn through the nodes they pass. Long edges are
    bundled: all of them leaving one node share its lanes ("from"), or, for a node
    that many long edges enter (a graph output, a concat), all of those share the
    lanes leading into it ("to"). That keeps fan-outs and fan-ins one lane wide.
    """
    hanging = _hanging_nodes(dag)
    rows: list[list[str | _Waypoint]] = list(_assign_rows(dag, hanging))
    if not rows:
        return _Layout({}, {}, 0.0, 0.0)
    row_of = {name: index for index, row in enumerate(rows) for name in row}
    long_edges = [(u, v) for u, v in dag.edges if row_of[v] - row_of[u] > 1]
    long_out = Counter(u for u, _ in long_edges)
    long_in = Counter(v for _, v in long_edges)

    layout_graph = nx.DiGraph()
    layout_graph.add_nodes_from(dag.nodes)
    chains: dict[tuple[str, str], list[_Waypoint]] = {}
    for source, target in dag.edges:
        bundle = ("from", source) if long_out[source] >= long_in[target] else ("to", target)
        chain: list[_Waypoint] = []
        previous: str | _Waypoint = source
        for row_index in range(row_of[source] + 1, row_of[target]):
            waypoint = (bundle, row_index)
            if waypoint not in layout_graph:
                rows[row_index].append(waypoint)
            layout_graph.add_edge(previous, waypoint)
            chain.append(waypoint)
            previous = waypoint
        layout_graph.add_edge(previous, target)
        chains[(source, target)] = chain

    x_of = _order_within_rows(dag, layout_graph, rows, hanging)
    row_pitch = _NODE_HEIGHT + _ROW_GAP
    y_of_row = [_MARGIN + _NODE_HEIGHT / 2 + index * row_pitch for index in range(len(rows))]

    centres = {name: (x_of[name], y_of_row[row_of[name]]) for name in dag.nodes}
    edge_waypoints = {
        edge: [(x_of[waypoint], y_of_row[waypoint[1]]) for waypoint in chain]
        for edge, chain in chains.items()
    }
    width = max((x_of[item] + _item_width(item) / 2 for row in rows for item in row), default=0.0)
    height = y_of_row[-1] + _NODE_HEIGHT / 2 if rows else 0.0
    return _Layout(centres, edge_waypoints, width + _MARGIN, height + _MARGIN)


def _hanging_nodes(dag: nx.DiGraph) -> set[str]:
    """Graph inputs and the single-input chains hanging off them.

    A weight, its transpose and its quantization hang off the graph; a node that
    combines two inputs (the GEMM using that weight) belongs to the main flow.
    """
    hanging: set[str] = set()
    for name in nx.topological_sort(dag):
        inputs = list(dag.predecessors(name))
        if not inputs or (len(inputs) == 1 and inputs[0] in hanging):
            hanging.add(name)
    return hanging


def _assign_rows(dag: nx.DiGraph, hanging: set[str]) -> list[list[str]]:
    """Split the nodes into rows, top to bottom; every edge points to a lower row.

    Layers come from ``nx.topological_generations``. Hanging nodes (a weight,
    its transpose, its quantization) are then moved down to sit just above their
    first user, otherwise every parameter of a model and everything computed
    from it alone would crowd into the first layers, far from where it is used.
    Layers wider than ``_MAX_NODES_PER_ROW`` wrap onto several rows; there are
    no edges within a layer, so wrapping keeps all edges pointing downwards.
    """
    if dag.number_of_nodes() == 0:
        return []
    layer_of: dict[str, int] = {}
    for depth, generation in enumerate(nx.topological_generations(dag)):
        for name in generation:
            layer_of[name] = depth
    for name in reversed(list(nx.topological_sort(dag))):  # users are final before their inputs
        users = list(dag.successors(name))
        if name in hanging and users:
            layer_of[name] = min(layer_of[user] for user in users) - 1

    layers: list[list[str]] = [[] for _ in range(max(layer_of.values()) + 1)]
    for name in sorted(dag.nodes, key=lambda n: dag.nodes[n]["order"]):
        layers[layer_of[name]].append(name)

    rows: list[list[str]] = []
    for layer in layers:
        for start in range(0, len(layer), _MAX_NODES_PER_ROW):
            rows.append(layer[start : start + _MAX_NODES_PER_ROW])
    return [row for row in rows if row]


def _order_within_rows(
    dag: nx.DiGraph, layout_graph: nx.DiGraph, rows: list[list[Any]], hanging: set[str]
) -> dict[Any, float]:
    """Horizontal centre of every node and waypoint.

    The longest path through the graph, the model's main flow, is the spine: it
    is drawn as one straight vertical line at x = 0 and never moves. Everything
    else is placed around it by alternating barycentre sweeps: each sweep pulls
    an item towards the mean x of its neighbours on the side already visited
    (inputs on the way down, users on the way up), then packs the row without
    overlaps (see :func:`_pack_row`). Without a fixed spine, every repeated block
    of a deep model adds the same small sideways offset and the drawing drifts
    far off to one side.

    Nodes are pulled by the FX nodes they are connected to (``dag``), however
    many rows away, never by waypoints; waypoints follow their neighbours along
    the edge (``layout_graph``). Hanging nodes (weights and single-input chains
    off them) do not pull their users, and when a row is packed they and the
    waypoints step aside for the nodes that carry the flow on.
    """
    spine = set(nx.dag_longest_path(dag))
    weight_of: dict[Any, float] = {}
    for row in rows:
        for item in row:
            if _is_waypoint(item):
                weight_of[item] = _WAYPOINT_WEIGHT
            elif item in hanging:
                weight_of[item] = _SIDE_WEIGHT
            else:
                weight_of[item] = 1.0

    # Start with every row packed around x = 0, its spine node (if any) in the middle.
    x_of: dict[Any, float] = {}
    for row in rows:
        others = [item for item in row if item not in spine]
        middle = len(others) // 2
        row[:] = others[:middle] + [item for item in row if item in spine] + others[middle:]
        x_of.update(dict.fromkeys(row, 0.0))
        _pack_row(row, dict.fromkeys(row, 0.0), weight_of, x_of, spine)

    for sweep in range(_SWEEPS):
        downwards = sweep % 2 == 0
        for row in rows if downwards else reversed(rows):
            desired: dict[Any, float] = {}
            for item in row:
                if item in spine:
                    desired[item] = 0.0
                    continue
                pulling = _pulling_neighbours(item, downwards, dag, layout_graph, hanging)
                if pulling:
                    desired[item] = sum(x_of[n] for n in pulling) / len(pulling)
                else:
                    desired[item] = x_of[item]
            _pack_row(row, desired, weight_of, x_of, spine)

    # Last, move every hanging node as close to its users as its row allows,
    # bottom-up so that a weight follows its transpose, which follows its user.
    for row in reversed(rows):
        attached = [
            item for item in row if item in hanging and item not in spine and dag.out_degree(item)
        ]
        if attached:
            desired = {item: x_of[item] for item in row}
            for item in attached:
                users = list(dag.successors(item))
                desired[item] = sum(x_of[user] for user in users) / len(users)
            _pack_row(row, desired, weight_of, x_of, spine)

    left = min(x_of[item] - _item_width(item) / 2 for row in rows for item in row)
    return {item: x - left + _MARGIN for item, x in x_of.items()}


def _pulling_neighbours(
    item: Any, downwards: bool, dag: nx.DiGraph, layout_graph: nx.DiGraph, hanging: set[str]
) -> list[Any]:
    """The items whose x pulls ``item`` in a sweep (see :func:`_order_within_rows`)."""
    if _is_waypoint(item):
        return list(layout_graph.predecessors(item) if downwards else layout_graph.successors(item))
    if not downwards:
        return list(dag.successors(item))
    inputs = list(dag.predecessors(item))
    return [n for n in inputs if n not in hanging] or inputs


def _pack_row(
    row: list[Any],
    desired: dict[Any, float],
    weight_of: dict[Any, float],
    x_of: dict[Any, float],
    pinned: set[Any] | frozenset[Any] = frozenset(),
) -> None:
    """Place ``row`` in ``desired`` order, without overlaps, as close to ``desired`` as possible.

    "As close as possible" is weighted least squares, solved exactly by
    pool-adjacent-violators: subtracting each item's minimum offset from the
    row's first item turns "no overlaps" into "non-decreasing", and the best
    non-decreasing fit is a run of blocks, each at its weighted mean. Light
    items (waypoints, hanging nodes) step aside for heavy ones rather than
    pushing them around, and nothing is shifted that did not have to move. A
    ``pinned`` item (at most one per row: the spine crosses each row once) stays
    exactly at its desired x, and its block is laid out around it.
    """
    # Rounded keys: float noise must not decide the order of items that want the same x.
    row.sort(key=lambda item: (round(desired[item], 3), round(x_of[item], 3)))
    offsets = [0.0]
    for left, right in zip(row, row[1:]):
        offsets.append(offsets[-1] + _min_distance(left, right))

    blocks: list[_Block] = []
    for item, offset in zip(row, offsets):
        weight = weight_of[item]
        target = desired[item] - offset
        blocks.append(_Block(weight, weight * target, 1, target if item in pinned else None))
        while len(blocks) > 1 and blocks[-2].position > blocks[-1].position:
            blocks[-2].absorb(blocks.pop())

    index = 0
    for block in blocks:
        for _ in range(block.count):
            x_of[row[index]] = block.position + offsets[index]
            index += 1


@dataclass
class _Block:
    """A run of items in :func:`_pack_row` that are packed tightly and move together."""

    weight: float
    weighted_sum: float
    count: int
    pinned_at: float | None

    @property
    def position(self) -> float:
        return self.pinned_at if self.pinned_at is not None else self.weighted_sum / self.weight

    def absorb(self, other: _Block) -> None:
        self.weight += other.weight
        self.weighted_sum += other.weighted_sum
        self.count += other.count
        if self.pinned_at is None:
            self.pinned_at = other.pinned_at


def _is_waypoint(item: Any) -> bool:
    return isinstance(item, tuple)


def _item_width(item: Any) -> float:
    return _WAYPOINT_WIDTH if _is_waypoint(item) else _NODE_WIDTH


def _min_distance(left: Any, right: Any) -> float:
    """Smallest centre-to-centre distance between two neighbours in a row."""
    gap = _COLUMN_GAP if not (_is_waypoint(left) or _is_waypoint(right)) else _WAYPOINT_GAP
    return (_item_width(left) + _item_width(right)) / 2 + gap


# --------------------------------------------------------------------------- SVG


def _render_svg(
    fx_nodes: Sequence[torch.fx.Node],
    dag: nx.DiGraph,
    layout: _Layout,
    kinds: Mapping[str, str],
) -> str:
    if not fx_nodes:
        return '<p class="empty">The graph has no nodes.</p>'

    width, height = layout.width, layout.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="fx-graph" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="FX graph with {len(fx_nodes)} nodes">',
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#78909c"/></marker>'
        "</defs>",
        '<g class="edges">',
    ]
    for source, target in dag.edges:
        parts.append(
            _edge_path(
                layout.centres[source],
                layout.centres[target],
                layout.edge_waypoints[(source, target)],
                source,
                target,
            )
        )
    parts.append("</g>")

    parts.append('<g class="nodes">')
    for node in fx_nodes:
        parts.append(_node_group(node, kinds[node.name], layout.centres[node.name]))
    parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts)


def _edge_path(
    source_xy: tuple[float, float],
    target_xy: tuple[float, float],
    waypoints: Sequence[tuple[float, float]],
    source: str,
    target: str,
) -> str:
    """A downward edge from the bottom of ``source`` to the top of ``target``.

    Between rows the edge is an S-curve; through every row it crosses it runs
    straight down its waypoint's lane.
    """
    half = _NODE_HEIGHT / 2
    x, y = source_xy[0], source_xy[1] + half
    commands = [f"M{x:.1f},{y:.1f}"]
    for lane_x, lane_y in waypoints:
        commands.append(_s_curve(x, y, lane_x, lane_y - half))
        x, y = lane_x, lane_y + half
        commands.append(f"L{x:.1f},{y:.1f}")
    commands.append(_s_curve(x, y, target_xy[0], target_xy[1] - half))
    css_class = "edge long-edge" if waypoints else "edge"
    return (
        f'<path class="{css_class}" d="{" ".join(commands)}" marker-end="url(#arrow)" '
        f'data-source="{_escape(source)}" data-target="{_escape(target)}"/>'
    )


def _s_curve(x0: float, y0: float, x1: float, y1: float) -> str:
    """Path command for a cubic curve from the current point (x0, y0) down to (x1, y1)."""
    bend = (y1 - y0) / 2
    return f"C{x0:.1f},{y0 + bend:.1f} {x1:.1f},{y1 - bend:.1f} {x1:.1f},{y1:.1f}"


def _node_group(node: torch.fx.Node, kind: str, centre: tuple[float, float]) -> str:
    style = _KIND_STYLES[kind]
    x, y = centre
    tooltip = f"{node.name}\nop: {node.op}\ntarget: {_describe_target(node.target)}\nkind: {kind}"
    label = _truncate(node.name, _LABEL_CHARS)
    return (
        f'<g class="node kind-{kind}" data-node="{_escape(node.name)}" data-kind="{kind}" '
        f'transform="translate({x:.1f},{y:.1f})">'
        f"<title>{_escape(tooltip)}</title>"
        f"{_node_shape(style)}"
        f'<text class="label" y="4" fill="{style.text_color}">{_escape(label)}</text>'
        "</g>"
    )


def _node_shape(style: _KindStyle, width: float = _NODE_WIDTH, height: float = _NODE_HEIGHT) -> str:
    """The outline of one node, centred on the origin."""
    w, h = width / 2, height / 2
    paint = f'fill="{style.fill}" stroke="{style.stroke}" stroke-width="{style.stroke_width}"'
    if style.dash:
        paint += f' stroke-dasharray="{style.dash}"'

    halo = ""
    if style.highlighted:
        pad = 4.0
        halo = (
            f'<rect class="halo" x="{-w - pad:.1f}" y="{-h - pad:.1f}" '
            f'width="{width + 2 * pad:.1f}" height="{height + 2 * pad:.1f}" rx="6" '
            f'fill="{style.stroke}" fill-opacity="0.18" stroke="none"/>'
        )

    if style.shape == "rect":
        shape = f'<rect x="{-w}" y="{-h}" width="{width}" height="{height}" rx="2" {paint}/>'
    elif style.shape == "round":
        shape = f'<rect x="{-w}" y="{-h}" width="{width}" height="{height}" rx="8" {paint}/>'
    elif style.shape == "pill":
        shape = f'<rect x="{-w}" y="{-h}" width="{width}" height="{height}" rx="{h}" {paint}/>'
    elif style.shape == "double":
        inset = 3.5
        shape = (
            f'<rect x="{-w}" y="{-h}" width="{width}" height="{height}" {paint}/>'
            f'<rect x="{-w + inset}" y="{-h + inset}" width="{width - 2 * inset}" '
            f'height="{height - 2 * inset}" fill="none" stroke="{style.stroke}" stroke-width="1"/>'
        )
    elif style.shape == "hexagon":
        cut = h
        shape = _polygon(
            [(-w, 0), (-w + cut, -h), (w - cut, -h), (w, 0), (w - cut, h), (-w + cut, h)], paint
        )
    elif style.shape == "parallelogram":
        slant = 10.0
        shape = _polygon([(-w + slant, -h), (w, -h), (w - slant, h), (-w, h)], paint)
    elif style.shape == "octagon":
        cut = 8.0
        shape = _polygon(
            [(-w + cut, -h), (w - cut, -h), (w, -h + cut), (w, h - cut),
             (w - cut, h), (-w + cut, h), (-w, h - cut), (-w, -h + cut)],
            paint,
        )
    else:  # pragma: no cover - _KIND_STYLES only uses the shapes above
        raise ValueError(f"unknown shape {style.shape!r}")
    return halo + shape


def _polygon(points: Iterable[tuple[float, float]], paint: str) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polygon points="{coords}" {paint}/>'


# --------------------------------------------------------------------------- HTML parts


def _render_legend(kind_counts: Mapping[str, int]) -> str:
    swatch_w, swatch_h = 44.0, 20.0
    items = []
    for kind, style in _KIND_STYLES.items():
        swatch = (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="swatch" width="{swatch_w + 10:.0f}" '
            f'height="{swatch_h + 10:.0f}" viewBox="{-(swatch_w + 10) / 2} {-(swatch_h + 10) / 2} '
            f'{swatch_w + 10:.0f} {swatch_h + 10:.0f}" aria-hidden="true">'
            f"{_node_shape(style, swatch_w, swatch_h)}</svg>"
        )
        items.append(
            f'<li class="legend-item" data-kind="{kind}">{swatch}'
            f'<span class="legend-label">{_escape(style.label)}</span> '
            f'<span class="legend-count">({kind_counts[kind]})</span></li>'
        )
    return '<ul class="legend">' + "".join(items) + "</ul>"


def _render_site_table(site_rows: Sequence[Mapping[str, Any]]) -> str:
    if not site_rows:
        return '<p class="empty">No matmul sites recorded.</p>'
    columns: list[str] = []
    for row in site_rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    header = "".join(f'<th scope="col">{_escape(str(column))}</th>' for column in columns)
    body = []
    for row in site_rows:
        cells = "".join(f"<td>{_escape(_format_cell(row.get(column)))}</td>" for column in columns)
        body.append(f'<tr class="site-row">{cells}</tr>')
    return (
        '<table class="sites">'
        f"<thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody>"
        "</table>"
    )


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _describe_target(target: Any) -> str:
    """Readable FX target: ``layer.weight``, ``aten.mm.default``, ``torch.matmul``, ..."""
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    name = getattr(target, "__name__", None)
    qualname = getattr(target, "__qualname__", None) or name
    module = getattr(target, "__module__", None)
    if not qualname:
        return str(target)
    if qualname.startswith("_VariableFunctionsClass.") and name:  # torch.clamp, torch.matmul, ...
        return f"torch.{name}"
    if module == "_operator":
        module = "operator"
    return f"{module}.{qualname}" if module else qualname


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)


_PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem; color: #1a1a1a; }
h1 { font-size: 1.4rem; margin-bottom: 0.3rem; }
h2 { font-size: 1.15rem; margin-top: 1.5rem; }
.summary { color: #555; margin-top: 0.3rem; }
details.full-graph { margin-top: 1rem; }
details.full-graph > summary { cursor: pointer; font-size: 1.15rem; font-weight: 600; }
.legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem; }
.legend-item { display: flex; align-items: center; gap: 0.35rem; font-size: 0.9rem; }
.legend-count { color: #666; }
.graph-scroll { overflow: auto; max-height: 80vh; border: 1px solid #cfd8dc; background: #fafafa; }
svg.fx-graph { display: block; }
svg.fx-graph .edge { fill: none; stroke: #90a4ae; stroke-width: 1.1; stroke-opacity: 0.85; }
svg.fx-graph .long-edge { stroke: #b0bec5; }
svg .label { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 11px; text-anchor: middle; pointer-events: none; }
svg.fx-graph .node:hover polygon, svg.fx-graph .node:hover rect:not(.halo) { stroke: #000; stroke-width: 3; }
table.sites { border-collapse: collapse; font-size: 0.85rem; }
table.sites th, table.sites td { border: 1px solid #cfd8dc; padding: 0.25rem 0.5rem; text-align: left; }
table.sites thead th { background: #eceff1; position: sticky; top: 0; }
table.sites tbody tr:nth-child(even) { background: #f5f7f8; }
.empty { color: #666; font-style: italic; }
""".strip()
