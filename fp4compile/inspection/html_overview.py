"""The module overview at the top of the HTML graph view: one box per module, not one per node.

A captured transformer graph has hundreds of FX nodes, a third of them
``getitem`` and view/reshape/cast plumbing. Drawn node by node (the full drawing
in :mod:`fp4compile.inspection.html`), its first screen shows a few weights and
long edges, and the matmul sites that the FP4 rewrite is about are lost among
them. This module builds the view a person reads first:

* **Folding.** ``getitem`` / ``getattr`` nodes, and view, reshape and dtype-cast
  nodes, are folded into the node that produces their input (a "group"); a
  group is drawn once, its folded members listed in its tooltip. Marked nodes
  (inserted clamp / quantize / GEMM / compensate, sites, graph inputs and the
  output) are never folded. A view or cast is folded only into a producer of
  the same module branch, so a block's first op is not drawn in the block
  before it.
* **Boxes.** Every group belongs to the innermost module of its node's
  ``nn_module_stack`` meta. The module tree is cut into boxes from the root
  down: a module is one box unless it is the root, a container without nodes
  of its own and with several numbered children (a ``ModuleList`` of blocks), or its
  subtree holds more than :data:`MAX_SITES_PER_BOX` matmul sites; then its
  children are cut in turn and its own nodes, if any, make a box of their own
  (the root's: "(top level)", the graph inputs and output).
* **Sites.** Each site row goes to the box of the longest module path that
  prefixes its module (the root box when none does), and is listed there with
  its decision: quantized, or high precision and the reason.

:func:`build_overview` returns that structure (a plain-data
:class:`GraphOverview`, tested without a browser); :func:`render_overview`
turns it into HTML: a grid of boxes in graph order, each expandable
(``<details>``) into an SVG of its folded nodes, drawn with the layered layout
of :mod:`fp4compile.inspection.html`. :data:`OVERVIEW_SCRIPT` is the page's
only script (inline): search by module name, and widening an expanded box.
"""

from __future__ import annotations

import builtins
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import networkx as nx
import torch
import torch.fx

__all__ = [
    "MAX_SITES_PER_BOX",
    "GraphOverview",
    "ModuleBox",
    "NodeGroup",
    "build_overview",
    "module_path",
    "render_overview",
]

#: A module whose subtree holds more matmul sites than this is split into one box per child.
#: 12 keeps a transformer block (4 attention + 3 MLP linears) in one box and splits a stack of them.
MAX_SITES_PER_BOX = 12

#: The label of the box holding the nodes outside every submodule (graph inputs, output, ...).
TOP_LEVEL_LABEL = "(top level)"

# Kinds of the inserted nodes an expanded box is about, in the order the summary counts them.
_INSERTED_KINDS = ("occ_clamp", "quantize", "fp4_gemm", "compensate")
_INSERTED_NAMES = {"occ_clamp": "clamp", "quantize": "quantize", "fp4_gemm": "GEMM", "compensate": "compensate"}

# Always folded into their producer: they only pick an element out of it.
_SELECTORS = {operator.getitem, builtins.getattr}
# Folded when their producer is in the same module branch: layout and dtype plumbing.
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "contiguous",
    "unsqueeze", "squeeze", "flatten", "unflatten", "expand", "expand_as", "size", "dim", "item",
    "to", "float", "half", "bfloat16", "double", "type", "type_as",
})
_VIEW_FUNCTIONS = {
    torch.reshape, torch.transpose, torch.permute, torch.t, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.Tensor.view, torch.Tensor.contiguous,
}
for _name in ("view.default", "_unsafe_view.default", "reshape.default", "transpose.int",
              "permute.default", "t.default", "unsqueeze.default", "squeeze.dim", "expand.default",
              "_to_copy.default", "sym_size.int"):
    _packet, _overload = _name.split(".")
    _op = getattr(getattr(torch.ops.aten, _packet, None), _overload, None)
    if _op is not None:
        _VIEW_FUNCTIONS.add(_op)


@dataclass
class NodeGroup:
    """One drawn node of the overview: an FX node and the plumbing folded into it."""

    name: str  # the FX node that stays (the producer)
    kind: str  # its kind in the HTML view (fp4compile.inspection.html.NODE_KINDS)
    module: str  # innermost module path of that node ("" outside every submodule)
    order: int  # position of that node in the graph
    op: str  # FX op of that node
    target: str  # readable target of that node
    members: list[str] = field(default_factory=list)  # folded nodes, in graph order (not `name`)


@dataclass
class ModuleBox:
    """One box of the overview: a module, its sites and its folded nodes."""

    path: str  # module path ("" for the top level)
    class_name: str  # the module's class, from nn_module_stack ("" if unknown)
    groups: list[str] = field(default_factory=list)  # NodeGroup names, graph order
    sites: list[Mapping[str, Any]] = field(default_factory=list)  # site rows, in the caller's order
    submodules: list[str] = field(default_factory=list)  # module paths inside the box, for search
    inputs_from: list[str] = field(default_factory=list)  # paths of the boxes feeding this one

    @property
    def label(self) -> str:
        return self.path or TOP_LEVEL_LABEL


@dataclass
class GraphOverview:
    """Folded nodes, their edges, and the boxes they are grouped into (in graph order)."""

    groups: dict[str, NodeGroup]
    edges: list[tuple[str, str]]  # group -> group, each once
    boxes: list[ModuleBox]
    node_count: int  # FX nodes in the graph
    box_of_group: dict[str, str]  # group name -> box path

    def box(self, path: str) -> ModuleBox:
        """The box with module path ``path``; KeyError if there is none."""
        for box in self.boxes:
            if box.path == path:
                return box
        raise KeyError(f"no overview box for module {path!r}; boxes: {[b.path for b in self.boxes]}")


# --------------------------------------------------------------------------- building


def module_path(node: torch.fx.Node) -> str:
    """Innermost module of ``node`` as a dotted path ("layers.0.attn"), "" when it has none.

    Dynamo writes ``L['self'].layers[0].attn`` (older releases ``L['self']._modules['layers']...``);
    the prefix naming the root is dropped, item and ``_modules`` subscripts become dots.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, (tuple, list)) else str(entry)
    return _normalise_path(path)


def _normalise_path(path: str) -> str:
    path = re.sub(r"^L\['[^']*'\]", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def _module_class(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    cls = entry[1] if isinstance(entry, (tuple, list)) and len(entry) > 1 else None
    if isinstance(cls, type):
        return cls.__name__
    return str(cls).rsplit(".", 1)[-1] if cls is not None else ""


def _is_selector(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SELECTORS


def _is_view(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        try:
            return node.target in _VIEW_FUNCTIONS
        except TypeError:  # an unhashable target
            return False
    return False


def _same_branch(a: str, b: str) -> bool:
    """Whether one module path contains the other (a module and its submodules)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or not a or not b


def _first_input(node: torch.fx.Node) -> torch.fx.Node | None:
    if node.args and isinstance(node.args[0], torch.fx.Node):
        return node.args[0]
    inputs = node.all_input_nodes
    return inputs[0] if inputs else None


def _site_module(row: Mapping[str, Any]) -> str:
    value = row.get("module", row.get("site", ""))
    return "" if value is None or value == "(root)" else str(value)


def site_is_quantized(row: Mapping[str, Any]) -> bool:
    """A site row's decision: a "decision"/"status" text starting with "quantized", or quantized=True."""
    if isinstance(row.get("quantized"), bool):
        return row["quantized"]
    decision = row.get("decision", row.get("status", ""))
    return str(decision).strip().lower().startswith("quantized")


def build_overview(
    graph: torch.fx.Graph,
    node_kinds: Mapping[str, str],
    site_rows: Sequence[Mapping[str, Any]],
    describe_target=str,
) -> GraphOverview:
    """Fold the plumbing nodes of ``graph`` and group what is left into module boxes.

    Args:
        graph: the FX graph (its nodes' ``nn_module_stack`` meta says which module they run in).
        node_kinds: node name -> HTML node kind, as for ``render_graph_html``; nodes with a
            kind other than "other" are never folded.
        site_rows: one dict per matmul site; its "module" (or "site") value places it in a box.
        describe_target: turns an FX target into the text shown in tooltips.
    """
    fx_nodes = list(graph.nodes)
    groups: dict[str, NodeGroup] = {}
    group_of: dict[str, str] = {}
    for order, node in enumerate(fx_nodes):
        kind = node_kinds.get(node.name, "other")
        own_module = module_path(node)
        producer = _first_input(node) if kind == "other" and node.op not in ("placeholder", "output") else None
        if producer is not None:
            into = group_of[producer.name]
            if _is_selector(node) or (_is_view(node) and _same_branch(own_module, groups[into].module)):
                groups[into].members.append(node.name)
                group_of[node.name] = into
                continue
        groups[node.name] = NodeGroup(node.name, kind, own_module, order, node.op,
                                      describe_target(node.target))
        group_of[node.name] = node.name

    edges: dict[tuple[str, str], None] = {}
    for node in fx_nodes:
        for input_node in node.all_input_nodes:
            source, target = group_of[input_node.name], group_of[node.name]
            if source != target:
                edges[(source, target)] = None

    # The module tree: every module any group or site names, and all its ancestors.
    class_of: dict[str, str] = {}
    for node in fx_nodes:
        path = module_path(node)
        if path and path not in class_of and node.name in groups:
            class_of[path] = _module_class(node)
    paths = {group.module for group in groups.values()} | {_site_module(row) for row in site_rows}
    tree_paths = {""}
    for path in paths:
        parts = path.split(".") if path else []
        tree_paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    children: dict[str, list[str]] = {path: [] for path in tree_paths}
    for path in tree_paths:
        if path:
            children[path.rsplit(".", 1)[0] if "." in path else ""].append(path)

    def owner(path: str, candidates) -> str:
        """The longest path in ``candidates`` that is ``path`` or one of its ancestors ("" last)."""
        while path and path not in candidates:
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return path

    sites_in: Counter[str] = Counter()
    for row in site_rows:
        path = owner(_site_module(row), tree_paths)
        while True:  # count the site in every ancestor's subtree
            sites_in[path] += 1
            if not path:
                break
            path = path.rsplit(".", 1)[0] if "." in path else ""
    own_groups: Counter[str] = Counter(group.module for group in groups.values())

    box_paths: list[str] = []

    def cut(path: str) -> None:
        kids = children[path]
        # A ModuleList or Sequential: numbered children and no nodes of its own.
        container = not own_groups[path] and len(kids) > 1 and all(
            kid.rsplit(".", 1)[-1].isdigit() for kid in kids)
        if kids and (not path or container or sites_in[path] > MAX_SITES_PER_BOX):
            if own_groups[path] or not path:
                box_paths.append(path)
            for kid in kids:
                cut(kid)
        else:
            box_paths.append(path)

    cut("")
    box_set = set(box_paths)
    boxes = {path: ModuleBox(path, class_of.get(path, "")) for path in box_paths}
    for path in tree_paths:
        boxes[owner(path, box_set)].submodules.append(path)
    box_of_group = {name: owner(group.module, box_set) for name, group in groups.items()}
    for name in groups:  # graph order
        boxes[box_of_group[name]].groups.append(name)
    for row in site_rows:
        boxes[owner(_site_module(row), box_set)].sites.append(row)
    for source, target in edges:
        source_box, target_box = box_of_group[source], box_of_group[target]
        if source_box != target_box and source_box not in boxes[target_box].inputs_from:
            boxes[target_box].inputs_from.append(source_box)

    order_of = {node.name: index for index, node in enumerate(fx_nodes)}

    def position(box: ModuleBox) -> tuple[int, str]:
        """Where a box's computation starts: its first node that is not a graph input.

        All placeholders come first in a graph, so a box holding only inputs (the
        top level: the token ids, the rotary tables) is placed by the first node
        folded into one of them (``rope_cos[:s]``), i.e. where it is first used.
        """
        starts = []
        for name in box.groups:
            group = groups[name]
            if group.op != "placeholder":
                starts.append(group.order)
            elif group.members:
                starts.append(order_of[group.members[0]])
        return (min(starts) if starts else len(fx_nodes), box.path)

    kept = [box for box in boxes.values() if box.groups or box.sites]
    for box in kept:
        box.submodules.sort()
        box.inputs_from.sort(key=box_paths.index)
    kept.sort(key=position)
    return GraphOverview(groups, list(edges), kept, len(fx_nodes), box_of_group)


# --------------------------------------------------------------------------- rendering


def render_overview(overview: GraphOverview) -> str:
    """The overview section: toolbar (search, expand/collapse all) and the grid of boxes."""
    from . import html as graph_html  # the layout, shapes and kind styles of the full drawing

    folded = overview.node_count - len(overview.groups)
    n_sites = sum(len(box.sites) for box in overview.boxes)
    n_quantized = sum(site_is_quantized(row) for box in overview.boxes for row in box.sites)
    parts = [
        '<section class="overview" aria-label="Module overview">',
        '<div class="toolbar">'
        '<label>Search modules <input type="search" id="module-search" '
        'placeholder="e.g. layers.2 or q_proj" autocomplete="off" spellcheck="false"></label>'
        '<button type="button" id="expand-all">Expand all</button>'
        '<button type="button" id="collapse-all">Collapse all</button>'
        f'<span id="search-status">{len(overview.boxes)} modules</span>'
        "</div>",
        f'<p class="overview-summary">{len(overview.boxes)} modules, {n_quantized} of {n_sites} '
        f"matmul sites quantized. Each box lists its sites and their decision; open it for its "
        f"nodes ({overview.node_count} FX nodes drawn as {len(overview.groups)}: {folded} getitem, "
        "view, reshape and cast nodes are folded into their producers).</p>",
        _ARROW_DEFS,
        '<div class="module-grid">',
    ]
    if not overview.boxes:
        parts.append('<p class="empty">The graph has no nodes.</p>')
    for box in overview.boxes:
        parts.append(_render_box(overview, box, graph_html))
    parts += ["</div>", "</section>"]
    return "\n".join(parts)


def _render_box(overview: GraphOverview, box: ModuleBox, graph_html) -> str:
    esc = graph_html._escape
    quantized = sum(site_is_quantized(row) for row in box.sites)
    if not box.sites:
        badge = '<span class="badge none">no matmul sites</span>'
    else:
        state = "all" if quantized == len(box.sites) else ("some" if quantized else "none-q")
        badge = f'<span class="badge {state}">{quantized}/{len(box.sites)} quantized</span>'
    header = (
        f'<header><span class="module-name">{esc(box.label)}</span>'
        + (f' <span class="module-class">{esc(box.class_name)}</span>' if box.class_name else "")
        + f" {badge}</header>"
    )
    site_items = [_render_site(row, box.path, esc) for row in box.sites]
    sites = f'<ul class="site-list">{"".join(site_items)}</ul>' if site_items else ""
    inputs = ""
    if box.inputs_from:
        names = ", ".join(esc(TOP_LEVEL_LABEL if not p else p) for p in box.inputs_from)
        inputs = f'<p class="inputs-from">inputs from {names}</p>'

    kinds = Counter(overview.groups[name].kind for name in box.groups)
    inserted = [f"{kinds[k]} {_INSERTED_NAMES[k]}" for k in _INSERTED_KINDS if kinds[k]]
    summary = f"{len(box.groups)} nodes" + (f" ({', '.join(inserted)})" if inserted else "")
    detail = (
        f'<details class="module-detail"><summary>{esc(summary)}</summary>'
        f'<div class="module-graph-scroll">{_render_box_svg(overview, box, graph_html)}</div>'
        "</details>"
        if box.groups else ""
    )
    search_text = " ".join([box.label, *box.submodules])
    return (
        f'<section class="module-box" data-module="{esc(box.path)}" data-search="{esc(search_text)}">'
        f"{header}{sites}{inputs}{detail}</section>"
    )


def _render_site(row: Mapping[str, Any], box_path: str, esc) -> str:
    module = _site_module(row)
    shown = module[len(box_path) + 1:] if box_path and module.startswith(box_path + ".") else module
    shown = shown or module or "(site)"
    quantized = site_is_quantized(row)
    reason = "" if quantized else str(row.get("reason") or row.get("status") or "")
    # The weight's K x N: M is the same symbolic batch size for every site of a graph.
    shape = str(row.get("M x K x N") or "")
    in_out = " x ".join(shape.split(" x ")[-2:]) if shape.count(" x ") >= 2 else shape
    tooltip = "\n".join(f"{key}: {'' if value is None else value}" for key, value in row.items())
    return (
        f'<li class="site {"quantized" if quantized else "skipped"}" data-site="{esc(module)}" '
        f'title="{esc(tooltip)}"><span class="site-name">{esc(shown)}</span>'
        + (f'<span class="site-shape">{esc(in_out)}</span>' if in_out else "")
        + f'<span class="decision">{"FP4" if quantized else "high precision"}</span>'
        + (f'<span class="site-reason">{esc(reason)}</span>' if reason else "")
        + "</li>"
    )


_EXTERNAL_PREFIX = "from:"  # stub names for inputs from other boxes; ':' is never in an FX name


def _render_box_svg(overview: GraphOverview, box: ModuleBox, graph_html) -> str:
    """The box's groups as a layered drawing, with a stub for each input from another box."""
    esc = graph_html._escape
    members = set(box.groups)
    dag = nx.DiGraph()
    for name in box.groups:
        dag.add_node(name, order=overview.groups[name].order)
    for source, target in overview.edges:
        if target not in members:
            continue
        if source in members:
            dag.add_edge(source, target)
        else:
            stub = _EXTERNAL_PREFIX + source
            if stub not in dag:
                dag.add_node(stub, order=overview.groups[source].order)
            dag.add_edge(stub, target)
    layout = graph_html._layout(dag)
    width, height = layout.width, layout.height
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="module-graph" width="{width:.0f}" '
        f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="nodes of {esc(box.label)}">',
        '<g class="edges">',
    ]
    half = graph_html._NODE_HEIGHT / 2
    for source, target in dag.edges:
        x, y = layout.centres[source][0], layout.centres[source][1] + half
        commands = [f"M{x:.1f},{y:.1f}"]
        for lane_x, lane_y in layout.edge_waypoints[(source, target)]:
            commands.append(graph_html._s_curve(x, y, lane_x, lane_y - half))
            x, y = lane_x, lane_y + half
            commands.append(f"L{x:.1f},{y:.1f}")
        tx, ty = layout.centres[target]
        commands.append(graph_html._s_curve(x, y, tx, ty - half))
        parts.append(f'<path class="oedge" d="{" ".join(commands)}" marker-end="url(#ov-arrow)"/>')
    parts += ["</g>", '<g class="nodes">']
    for name in dag.nodes:
        x, y = layout.centres[name]
        if name.startswith(_EXTERNAL_PREFIX):
            source = name[len(_EXTERNAL_PREFIX):]
            from_box = overview.box_of_group[source] or TOP_LEVEL_LABEL
            tooltip = f"input from {from_box}: {source}"
            shown = display_name(overview.groups[source], overview.box_of_group[source])
            label = "\u2191 " + graph_html._truncate(shown, graph_html._LABEL_CHARS - 2)
            parts.append(
                f'<g class="onode external" data-group="{esc(name)}" data-kind="external" '
                f'transform="translate({x:.1f},{y:.1f})"><title>{esc(tooltip)}</title>'
                f"{_external_shape(graph_html)}"
                f'<text class="label" y="4" fill="#546e7a">{esc(label)}</text></g>'
            )
            continue
        group = overview.groups[name]
        style = graph_html._KIND_STYLES[group.kind]
        tooltip = f"{group.name}\nop: {group.op}\ntarget: {group.target}\nkind: {group.kind}"
        if group.module:
            tooltip += f"\nmodule: {group.module}"
        if group.members:
            tooltip += "\nfolded: " + ", ".join(group.members)
        shown = display_name(group, box.path)
        label = graph_html._truncate(shown, graph_html._LABEL_CHARS)
        if group.members:
            label = graph_html._truncate(shown, graph_html._LABEL_CHARS - 3) + f" +{len(group.members)}"
        parts.append(
            f'<g class="onode kind-{group.kind}" data-group="{esc(name)}" data-kind="{group.kind}" '
            f'transform="translate({x:.1f},{y:.1f})"><title>{esc(tooltip)}</title>'
            f"{graph_html._node_shape(style)}"
            f'<text class="label" y="4" fill="{style.text_color}">{esc(label)}</text></g>'
        )
    parts += ["</g>", "</svg>"]
    return "".join(parts)


def display_name(group: NodeGroup, box_path: str) -> str:
    """The label of a group in a box drawing: its FX name, or for a dynamo graph input the
    parameter it stands for, relative to the box (``attn.q_proj.weight`` rather than
    ``l_self_modules_layers_modules_0_modules_attn_modules_q_proj_parameters_weight_``).
    """
    name = group.name
    if group.op == "placeholder":
        readable = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", group.target)
        readable = re.sub(r"^L_(self[._])?", "", readable).strip("._")
        if readable != group.target.strip("._") and readable:
            name = readable
            if box_path and name.startswith(box_path + "."):
                name = name[len(box_path) + 1:]
    return name


def _external_shape(graph_html) -> str:
    w, h = graph_html._NODE_WIDTH / 2, graph_html._NODE_HEIGHT / 2
    return (f'<rect x="{-w}" y="{-h}" width="{2 * w}" height="{2 * h}" rx="{h}" fill="#ffffff" '
            'stroke="#90a4ae" stroke-width="1.2" stroke-dasharray="4 3"/>')


# One marker for every box drawing (ids must be unique in the page).
_ARROW_DEFS = (
    '<svg xmlns="http://www.w3.org/2000/svg" class="defs-only" width="0" height="0" aria-hidden="true">'
    '<defs><marker id="ov-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
    'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#78909c"/>'
    "</marker></defs></svg>"
)

OVERVIEW_CSS = """
.overview .toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: 0.6rem; margin: 0.4rem 0; }
.overview .toolbar input { font: inherit; padding: 0.2rem 0.4rem; width: 16rem; }
.overview .toolbar button { font: inherit; padding: 0.15rem 0.6rem; }
#search-status { color: #555; font-size: 0.9rem; }
.overview-summary { color: #555; margin: 0.2rem 0 0.6rem; font-size: 0.9rem; }
svg.defs-only { position: absolute; width: 0; height: 0; }
.module-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); gap: 0.7rem; align-items: start; }
.module-box { border: 1px solid #b0bec5; border-radius: 6px; background: #fafafa; padding: 0.45rem 0.6rem; min-width: 0; }
.module-box[hidden] { display: none !important; }
.module-box.expanded { grid-column: 1 / -1; background: #ffffff; }
.module-box header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0.2rem 0.5rem; }
.module-name { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-weight: 700; font-size: 0.95rem; }
.module-class { color: #607d8b; font-size: 0.8rem; }
.badge { margin-left: auto; font-size: 0.75rem; border-radius: 9px; padding: 0 0.45rem; border: 1px solid; white-space: nowrap; }
.badge.all { background: #a5d6a7; border-color: #1b5e20; }
.badge.some { background: #fff59d; border-color: #f57f17; }
.badge.none-q { background: #ffcdd2; border-color: #b71c1c; }
.badge.none { background: #eceff1; border-color: #b0bec5; color: #546e7a; }
.site-list { list-style: none; margin: 0.35rem 0 0; padding: 0; font-size: 0.82rem; }
.site { display: flex; flex-wrap: wrap; align-items: baseline; gap: 0 0.5rem; padding: 0.05rem 0.35rem; margin: 0.12rem 0; border-left: 4px solid; border-radius: 2px; }
.site.quantized { border-color: #1b5e20; background: #e8f5e9; }
.site.skipped { border-color: #b71c1c; background: #ffebee; border-left-style: dashed; }
.site.match { outline: 2px solid #ff6f00; }
.site-name { font-family: ui-monospace, "DejaVu Sans Mono", monospace; flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.site .decision { font-weight: 600; white-space: nowrap; }
.site.quantized .decision { color: #1b5e20; }
.site.skipped .decision { color: #b71c1c; }
.site-shape { color: #555; font-size: 0.76rem; white-space: nowrap; }
.site-reason { flex-basis: 100%; color: #555; font-size: 0.76rem; }
.inputs-from { margin: 0.3rem 0 0; font-size: 0.76rem; color: #607d8b; }
.module-detail { margin-top: 0.3rem; font-size: 0.82rem; }
.module-detail summary { cursor: pointer; color: #37474f; }
.module-graph-scroll { overflow: auto; max-height: 75vh; border: 1px solid #cfd8dc; background: #fafafa; margin-top: 0.3rem; }
svg.module-graph { display: block; }
svg.module-graph .oedge { fill: none; stroke: #90a4ae; stroke-width: 1.1; }
svg.module-graph .onode:hover polygon, svg.module-graph .onode:hover rect:not(.halo) { stroke: #000; stroke-width: 3; }
""".strip()

# Search: a box stays visible when the query is part of its module path or of any module or
# site inside it; matching sites are outlined. The query can also come from the URL
# fragment (graph.html#layers.2). Opening a box's nodes widens it to the whole row.
OVERVIEW_SCRIPT = """
(function () {
  "use strict";
  var boxes = Array.prototype.slice.call(document.querySelectorAll(".module-box"));
  var input = document.getElementById("module-search");
  var status = document.getElementById("search-status");
  if (!input) { return; }
  function apply() {
    var query = input.value.trim().toLowerCase();
    var shown = 0;
    boxes.forEach(function (box) {
      var names = box.getAttribute("data-search").toLowerCase().split(" ");
      var visible = !query || names.some(function (name) { return name.indexOf(query) >= 0; });
      box.querySelectorAll(".site").forEach(function (site) {
        var hit = !!query && site.getAttribute("data-site").toLowerCase().indexOf(query) >= 0;
        site.classList.toggle("match", hit);
        if (hit) { visible = true; }
      });
      box.hidden = !visible;
      if (visible) { shown += 1; }
    });
    status.textContent = query ? shown + " of " + boxes.length + " modules match"
                               : boxes.length + " modules";
  }
  input.addEventListener("input", apply);
  boxes.forEach(function (box) {
    var detail = box.querySelector("details.module-detail");
    if (!detail) { return; }
    detail.addEventListener("toggle", function () {
      box.classList.toggle("expanded", detail.open);
      if (detail.open) { box.scrollIntoView({block: "nearest"}); }
    });
  });
  function setAll(open) {
    boxes.forEach(function (box) {
      var detail = box.querySelector("details.module-detail");
      if (detail && !box.hidden) { detail.open = open; }
    });
  }
  document.getElementById("expand-all").addEventListener("click", function () { setAll(true); });
  document.getElementById("collapse-all").addEventListener("click", function () { setAll(false); });
  var full = document.querySelector("details.full-graph");
  if (full) {
    full.addEventListener("toggle", function () {
      // Bring the top of the drawing into view: its first rows may start far to one side.
      var scroller = full.querySelector(".graph-scroll");
      var nodes = full.querySelectorAll("svg.fx-graph g.node");
      if (!full.open || !scroller || !nodes.length) { return; }
      var first = nodes[0].getBoundingClientRect();
      var frame = scroller.getBoundingClientRect();
      scroller.scrollLeft += first.left - frame.left - frame.width / 2;
    });
  }
  function fromFragment() {
    if (location.hash.length > 1) {
      input.value = decodeURIComponent(location.hash.slice(1));
      apply();
    }
  }
  window.addEventListener("hashchange", fromFragment);
  fromFragment();
})();
""".strip()
