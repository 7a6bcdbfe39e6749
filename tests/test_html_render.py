"""Tests for the HTML graph view (fp4compile.inspection.html and .html_overview).

The structural tests read the page as text: one drawn element per FX node, the
legend, the site table, escaping, and no resource that would need a network.
The layout tests read node positions back from the SVG. The overview tests fold
the demo model's captured graph (the one `python -m fp4compile inspect --model
demo` dumps; captured once per module, nothing compiled) and check the boxes.
The browser tests open written pages in headless Chromium: the page renders
without errors, opens at the module overview, a block expands into its inserted
nodes, and the search filters the boxes; they need scripts/install_browser.sh.
With FP4COMPILE_SCREENSHOT_DIR set they save screenshots of the demo overview
there (docs/graph_view.png is one).
"""

from __future__ import annotations

import argparse
import builtins
import io
import operator
import os
import pathlib
import re

import pytest
import torch
import torch.fx
import torch.nn as nn
from PIL import Image

from fp4compile.inspection import cli, dump
from fp4compile.inspection.html import NODE_KINDS, render_graph_html, write_graph_html
from fp4compile.inspection.html_overview import (
    MAX_SITES_PER_BOX,
    build_overview,
    module_path,
    site_is_quantized,
)
from fp4compile.inspection.inspect import inspect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
INSTALL_HINT = "run scripts/install_browser.sh to install headless Chromium and playwright"
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
NODE_TRANSFORM = re.compile(
    r'<g class="node kind-[a-z_]+" data-node="([^"]+)" data-kind="[a-z_]+" '
    r'transform="translate\(([-\d.]+),([-\d.]+)\)"'
)


class TinyBlock(nn.Module):
    """Two linears and a matmul, plus the elementwise ops a rewrite would insert."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.clamp(self.up(x), -4.0, 4.0)
        scores = torch.matmul(hidden, hidden.transpose(-1, -2))
        out = self.down(torch.round(hidden))
        return out + scores.sum(-1, keepdim=True)


# Node kinds as the rewrite would report them; `transpose` and `sum_1` are left
# out on purpose and must be drawn as "other".
TINY_NODE_KINDS = {
    "x": "placeholder",
    "up": "quantized_matmul",
    "clamp": "occ_clamp",
    "matmul": "skipped_matmul",
    "round_1": "quantize",
    "down": "fp4_gemm",
    "add": "compensate",
    "output": "output",
}

SITE_ROWS = [
    {"site": "up", "status": "quantized", "weight_shape": (16, 8), "rel_error": 0.0123456789},
    {"site": "down", "status": "quantized", "weight_shape": (8, 16), "rel_error": 0.02},
    {
        "site": "matmul",
        "status": "skipped: <not a linear> & no weight",
        "weight_shape": None,
        "rel_error": None,
    },
]


@pytest.fixture
def tiny_graph() -> torch.fx.Graph:
    return torch.fx.symbolic_trace(TinyBlock()).graph


@pytest.fixture
def tiny_page(tiny_graph: torch.fx.Graph) -> str:
    return render_graph_html(tiny_graph, TINY_NODE_KINDS, SITE_ROWS, "TinyBlock <after rewrite>")


def _node_centres(page: str) -> dict[str, tuple[float, float]]:
    return {name: (float(x), float(y)) for name, x, y in NODE_TRANSFORM.findall(page)}


def _svg_size(page: str) -> tuple[float, float]:
    match = re.search(r'<svg xmlns="[^"]+" class="fx-graph" width="(\d+)" height="(\d+)"', page)
    assert match, "no graph SVG in the page"
    return float(match.group(1)), float(match.group(2))


# --------------------------------------------------------------------------- structure


def test_page_is_html_with_an_svg_drawing(tiny_page: str) -> None:
    assert tiny_page.startswith("<!DOCTYPE html>")
    assert tiny_page.count('<svg xmlns="http://www.w3.org/2000/svg" class="fx-graph"') == 1
    assert tiny_page.count("</svg>") >= 1
    assert "<title>TinyBlock &lt;after rewrite&gt;</title>" in tiny_page
    assert "<h1>TinyBlock &lt;after rewrite&gt;</h1>" in tiny_page


def test_every_node_is_drawn_once_with_its_kind(tiny_graph: torch.fx.Graph, tiny_page: str) -> None:
    names = [node.name for node in tiny_graph.nodes]
    assert tiny_page.count('<g class="node ') == len(names)
    for name in names:
        kind = TINY_NODE_KINDS.get(name, "other")
        assert tiny_page.count(f'data-node="{name}"') == 1, name
        assert f'<g class="node kind-{kind}" data-node="{name}" data-kind="{kind}"' in tiny_page


def test_every_edge_is_drawn(tiny_graph: torch.fx.Graph, tiny_page: str) -> None:
    edges = {(inp.name, node.name) for node in tiny_graph.nodes for inp in node.all_input_nodes}
    drawn = set(re.findall(r'data-source="([^"]+)" data-target="([^"]+)"', tiny_page))
    assert drawn == edges


@pytest.mark.parametrize(
    "name, op, target, kind",
    [
        ("up", "call_module", "up", "quantized_matmul"),
        ("matmul", "call_function", "torch.matmul", "skipped_matmul"),
        ("add", "call_function", "operator.add", "compensate"),
        ("transpose", "call_method", "transpose", "other"),
    ],
)
def test_nodes_have_tooltips_with_name_op_and_target(
    tiny_page: str, name: str, op: str, target: str, kind: str
) -> None:
    assert f"<title>{name}\nop: {op}\ntarget: {target}\nkind: {kind}</title>" in tiny_page


def test_legend_lists_every_kind_with_its_count(tiny_page: str) -> None:
    assert tiny_page.count('class="legend-item"') == len(NODE_KINDS)
    for kind in NODE_KINDS:
        assert f'<li class="legend-item" data-kind="{kind}">' in tiny_page
    other_item = re.search(r'data-kind="other">.*?class="legend-count">\((\d+)\)</span>', tiny_page)
    assert other_item and other_item.group(1) == "2"  # transpose, sum_1


def test_marked_kinds_look_different(tiny_page: str) -> None:
    """Each kind's node outline (shape + colours + dashes) is unique."""
    outlines = {}
    for kind in NODE_KINDS:
        legend_item = re.search(rf'class="legend-item" data-kind="{kind}">(.*?)</svg>', tiny_page)
        assert legend_item, kind
        outlines[kind] = legend_item.group(1)  # all swatches have the same size
    assert len(set(outlines.values())) == len(NODE_KINDS)


def test_site_table_has_a_column_per_key_and_a_row_per_site(tiny_page: str) -> None:
    header = re.search(r'<table class="sites"><thead><tr>(.*?)</tr></thead>', tiny_page)
    assert header
    assert re.findall(r"<th[^>]*>(.*?)</th>", header.group(1)) == list(SITE_ROWS[0])
    rows = re.findall(r'<tr class="site-row">(.*?)</tr>', tiny_page)
    assert len(rows) == len(SITE_ROWS)
    assert re.findall(r"<td>(.*?)</td>", rows[0]) == ["up", "quantized", "(16, 8)", "0.0123457"]
    assert re.findall(r"<td>(.*?)</td>", rows[2]) == [
        "matmul",
        "skipped: &lt;not a linear&gt; &amp; no weight",
        "",
        "",
    ]


def test_site_table_takes_the_union_of_keys(tiny_graph: torch.fx.Graph) -> None:
    page = render_graph_html(tiny_graph, {}, [{"a": 1}, {"a": 2, "b": "x"}], "t")
    assert re.findall(r'<th scope="col">(.*?)</th>', page) == ["a", "b"]
    assert "<td>1</td><td></td>" in page


def test_empty_site_table_says_so(tiny_graph: torch.fx.Graph) -> None:
    page = render_graph_html(tiny_graph, {}, [], "t")
    assert "<table" not in page
    assert "No matmul sites recorded." in page


def test_page_is_self_contained(tiny_page: str) -> None:
    urls = re.findall(r"[a-z]+://[^\s\"'<>)]*", tiny_page, flags=re.IGNORECASE)
    assert set(urls) == {SVG_NAMESPACE}
    for needle in ("<link", "<img", "<iframe", "@import", "src=", "href=", "url(http"):
        assert needle not in tiny_page.lower(), needle
    # One script, inline, that fetches nothing.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", tiny_page, flags=re.DOTALL)
    assert len(scripts) == 1 and scripts[0][0] == ""
    for needle in ("fetch(", "XMLHttpRequest", "import(", "WebSocket", "document.write"):
        assert needle not in scripts[0][1], needle


def test_everything_user_supplied_is_escaped() -> None:
    graph = torch.fx.Graph()
    hostile = graph.placeholder("x")
    weird = graph.call_function(torch.add, (hostile, 1))
    weird.name = 'n"<b>&'  # names come from user code; do not trust them
    weird.meta["nn_module_stack"] = {"m": ("L['self'].<i>", nn.Linear)}
    graph.output(weird)
    site_rows = [{"<k>": "<script>alert(1)</script>", "module": "<i>"}]
    page = render_graph_html(graph, {weird.name: "compensate"}, site_rows, "</title><script>")
    assert page.count("<script") == 1  # the page's own
    assert "<b>" not in page and "<i>" not in page
    assert 'data-node="n&quot;&lt;b&gt;&amp;"' in page
    assert 'data-group="n&quot;&lt;b&gt;&amp;"' in page
    assert 'data-module="&lt;i&gt;"' in page
    assert "<th scope=\"col\">&lt;k&gt;</th>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_long_names_are_truncated_but_kept_in_the_tooltip() -> None:
    graph = torch.fx.Graph()
    long_name = "decoder_layers_11_self_attention_query_projection"
    node = graph.placeholder(long_name)
    graph.output(node)
    page = render_graph_html(graph, {}, [], "t")
    label = re.search(rf'data-node="{long_name}".*?<text[^>]*>(.*?)</text>', page, flags=re.DOTALL)
    assert label and label.group(1).endswith("\u2026") and len(label.group(1)) < len(long_name)
    assert f"<title>{long_name}\nop: placeholder" in page


def test_unknown_kind_is_rejected(tiny_graph: torch.fx.Graph) -> None:
    with pytest.raises(ValueError, match="unknown node kind"):
        render_graph_html(tiny_graph, {"up": "quantised"}, [], "t")


def test_empty_graph_renders() -> None:
    page = render_graph_html(torch.fx.Graph(), {}, [], "empty")
    assert "The graph has no nodes." in page


def test_write_graph_html_creates_the_file(tmp_path, tiny_graph: torch.fx.Graph) -> None:
    path = write_graph_html(
        tmp_path / "nested" / "graph.html", tiny_graph, TINY_NODE_KINDS, SITE_ROWS, "t"
    )
    assert path.is_file()
    expected = render_graph_html(tiny_graph, TINY_NODE_KINDS, SITE_ROWS, "t")
    assert path.read_text(encoding="utf-8") == expected


# --------------------------------------------------------------------------- layout


def _deep_residual_graph(blocks: int) -> torch.fx.Graph:
    """A transformer-like chain: per block two linears, a matmul and a residual add."""
    graph = torch.fx.Graph()
    hidden = graph.placeholder("x")
    for index in range(blocks):
        weight = graph.placeholder(f"w{index}")
        query = graph.call_function(torch.nn.functional.linear, (hidden, weight))
        key = graph.call_function(torch.nn.functional.linear, (hidden, weight))
        scores = graph.call_function(torch.matmul, (query, key))
        hidden = graph.call_function(torch.add, (hidden, scores))
    graph.output(hidden)
    return graph


def _fan_graph(width: int) -> torch.fx.Graph:
    """One input used by ``width`` nodes that all feed the output."""
    graph = torch.fx.Graph()
    source = graph.placeholder("x")
    graph.output(tuple(graph.call_function(torch.relu, (source,)) for _ in range(width)))
    return graph


@pytest.mark.parametrize("shape", ["deep_residual", "fan"])
def test_layout_is_layered_without_overlaps(shape: str) -> None:
    graph = _deep_residual_graph(120) if shape == "deep_residual" else _fan_graph(300)
    page = render_graph_html(graph, {}, [], "layout")
    centres = _node_centres(page)
    assert len(centres) == len(graph.nodes)

    for node in graph.nodes:  # every edge points downwards
        for inp in node.all_input_nodes:
            assert centres[inp.name][1] < centres[node.name][1], (inp.name, node.name)

    rows: dict[float, list[float]] = {}
    for x, y in centres.values():
        rows.setdefault(y, []).append(x)
    for xs in rows.values():
        xs.sort()
        assert all(right - left >= 150.0 for left, right in zip(xs, xs[1:]))

    width, height = _svg_size(page)
    assert all(0 <= x <= width and 0 <= y <= height for x, y in centres.values())


def test_svg_grows_with_the_graph_but_deep_chains_do_not_drift() -> None:
    small_page = render_graph_html(_deep_residual_graph(3), {}, [], "small")
    large_page = render_graph_html(_deep_residual_graph(120), {}, [], "large")
    small_width, small_height = _svg_size(small_page)
    large_width, large_height = _svg_size(large_page)
    assert large_height > 20 * small_height
    # The main flow is one straight column; repeated blocks must not walk sideways.
    centres = _node_centres(large_page)
    residual_xs = {x for name, (x, _) in centres.items() if name.startswith("add")}
    assert len(residual_xs) == 1
    assert large_width == small_width


def test_weight_chain_sits_beside_its_gemm() -> None:
    """weight -> quantize -> GEMM deep in the graph: the weight's chain is drawn beside the GEMM."""
    graph = torch.fx.Graph()
    hidden = graph.placeholder("x")
    for _ in range(10):
        hidden = graph.call_function(torch.relu, (hidden,))
    weight = graph.placeholder("weight")
    quantized_weight = graph.call_function(torch.round, (weight,))
    gemm = graph.call_function(torch.matmul, (hidden, quantized_weight))
    graph.output(gemm)
    centres = _node_centres(render_graph_html(graph, {}, [], "weight chain"))

    row_pitch = centres["relu_1"][1] - centres["relu"][1]
    assert centres["round_1"][1] == pytest.approx(centres["matmul"][1] - row_pitch)
    assert centres["weight"][1] == pytest.approx(centres["matmul"][1] - 2 * row_pitch)
    assert abs(centres["round_1"][0] - centres["matmul"][0]) <= 200
    assert centres["relu_9"][0] == centres["matmul"][0]  # the activation chain stays straight


def test_wide_layers_wrap() -> None:
    width, height = _svg_size(render_graph_html(_fan_graph(300), {}, [], "fan"))
    assert width < 4000  # 300 nodes side by side would be ~52000 px
    assert height > width / 4


# --------------------------------------------------------------------------- overview

BLOCK_LINEARS = 7  # q, k, v, o projections and the three SwiGLU matrices of a demo block
FOLDABLE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "size", "float", "to",
                    "unsqueeze", "expand", "item", "t", "flatten", "type_as"}


class DemoDump:
    """The demo model's graph as `python -m fp4compile inspect --model demo` captures and dumps it."""

    def __init__(self, root: pathlib.Path) -> None:
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        self.args = parser.parse_args([])  # the CLI's defaults: preset cpu, batch 4, seq 128, recipe paper
        model, example_args = cli.demo_model_and_batch(self.args)
        self.n_layers = model.config.n_layers
        self.inspection = inspect(model, *example_args, options={"recipe": self.args.recipe})
        self.inspection.save(root)
        self.page_path = root / "graph_0" / "graph.html"
        self.captured = self.inspection.graphs[0]
        self.graph = self.captured.after.graph
        self.sites = self.captured.sites
        self.node_kinds = dump.node_kinds(self.graph, self.captured.top_level_sites)
        self.site_rows = [dump.site_row(site, self.inspection.config) for site in self.sites]

    def overview(self):
        return build_overview(self.graph, self.node_kinds, self.site_rows)

    def inserted_kinds_in(self, prefix: str) -> dict[str, int]:
        """How many inserted nodes of each kind the rewrite made for the sites under ``prefix``.

        Read from the sites' own record of what was inserted, not from the overview.
        """
        names = {name for site in self.sites if site.module_path.startswith(prefix + ".")
                 for name in site.inserted}
        counts: dict[str, int] = {}
        for name in names:
            counts[self.node_kinds[name]] = counts.get(self.node_kinds[name], 0) + 1
        return counts


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoDump:
    return DemoDump(tmp_path_factory.mktemp("demo_dump"))


def test_overview_folds_getitem_and_view_nodes_into_producers(demo: DemoDump) -> None:
    overview = demo.overview()
    fx_nodes = {node.name: node for node in demo.graph.nodes}
    getitems = [n for n in fx_nodes.values() if n.op == "call_function" and n.target is operator.getitem]
    assert len(getitems) > 100  # the noise this view is about is there to fold

    # The groups partition the graph's nodes; no getitem is drawn, every folded node is plumbing.
    members = [name for group in overview.groups.values() for name in (group.name, *group.members)]
    assert sorted(members) == sorted(fx_nodes)
    for name, group in overview.groups.items():
        assert fx_nodes[name].target not in (operator.getitem, builtins.getattr), name
        for member in group.members:
            node = fx_nodes[member]
            assert node.target in (operator.getitem, builtins.getattr) or (
                node.op == "call_method" and node.target in FOLDABLE_METHODS), (member, node.target)
            assert demo.node_kinds.get(member, "other") == "other"  # marked nodes are never folded
    assert len(overview.groups) < 0.6 * len(fx_nodes)

    # Every group edge stands for at least one FX edge between the two groups.
    group_of = {name: group.name for group in overview.groups.values() for name in (group.name, *group.members)}
    fx_edges = {(group_of[i.name], group_of[n.name]) for n in fx_nodes.values() for i in n.all_input_nodes}
    assert set(overview.edges) == {(a, b) for a, b in fx_edges if a != b}


def test_overview_has_a_box_per_block_holding_its_sites_and_inserted_nodes(demo: DemoDump) -> None:
    overview = demo.overview()
    paths = [box.path for box in overview.boxes]
    blocks = [f"layers.{i}" for i in range(demo.n_layers)]
    flow = ["embed", *blocks, "norm", "lm_head"]
    assert set(paths) == {"", *flow}
    assert [p for p in paths if p in flow] == flow  # boxes in graph order

    # Every site exactly once, in the box of its block, with its decision.
    placed = [(box.path, row["module"]) for box in overview.boxes for row in box.sites]
    assert sorted(module for _, module in placed) == sorted(site.module_path for site in demo.sites)
    for box_path, module in placed:
        assert module == box_path or module.startswith(box_path + "."), (box_path, module)
    for block in blocks:
        box = overview.box(block)
        assert len(box.sites) == BLOCK_LINEARS and all(site_is_quantized(row) for row in box.sites)
        assert box.class_name == "Block"
    lm_head = overview.box("lm_head").sites
    assert len(lm_head) == 1 and not site_is_quantized(lm_head[0]) and "skip list" in lm_head[0]["reason"]

    # The nodes the rewrite inserted for a site are drawn (not folded) in that site's box.
    for site in demo.sites:
        for name in site.inserted:
            assert name in overview.groups, name
            assert overview.box_of_group[name] == site.module_path.split(".mlp")[0].split(".attn")[0]


def _module_graph(layout: dict[str, tuple[str, str]]) -> torch.fx.Graph:
    """A graph whose nodes carry dynamo-style nn_module_stack meta: name -> (module path, op)."""
    graph = torch.fx.Graph()
    previous = graph.placeholder("x")
    for name, (path, op) in layout.items():
        if op == "float":
            node = graph.call_method("float", (previous,))
        else:
            node = graph.call_function(torch.relu, (previous,))
        node.name = name
        if path:
            dynamo_path = "L['self']" + "".join(
                f"[{part}]" if part.isdigit() else f".{part}" for part in path.split("."))
            node.meta["nn_module_stack"] = {path: (dynamo_path, nn.Linear)}
        previous = node
    graph.output(previous)
    return graph


def test_module_tree_is_cut_into_boxes_by_site_count() -> None:
    many = MAX_SITES_PER_BOX + 1
    layout = {"stem": ("stem", "op")}
    layout.update({f"wide_{i}": (f"wide.lin{i}", "op") for i in range(many)})
    layout.update({"small_a": ("blocks.0.a", "op"), "small_b": ("blocks.0.b", "op"),
                   "cast": ("blocks.1", "float"), "head": ("", "op")})
    graph = _module_graph(layout)
    rows = [{"module": f"wide.lin{i}", "decision": "quantized"} for i in range(many)]
    rows += [{"module": "blocks.0.a", "decision": "quantized"},
             {"module": "blocks.0.b", "decision": "high precision", "reason": "too small"},
             {"module": "weight", "decision": "high precision", "reason": "a root parameter"}]
    overview = build_overview(graph, {}, rows)
    paths = [box.path for box in overview.boxes]
    # "wide" holds more sites than a box may: one box per child. "blocks" is a container
    # (no nodes of its own): its children are boxes as long as they are small.
    assert set(paths) == {"", "stem", *(f"wide.lin{i}" for i in range(many)), "blocks.0", "blocks.1", "weight"}
    assert paths.index("stem") < paths.index("wide.lin0") < paths.index("blocks.0") < paths.index("blocks.1")
    assert [row["module"] for row in overview.box("blocks.0").sites] == ["blocks.0.a", "blocks.0.b"]
    assert overview.box("blocks.0").submodules == ["blocks.0", "blocks.0.a", "blocks.0.b"]
    assert overview.box("wide.lin3").class_name == "Linear"
    # A cast is folded only into a producer of its own module branch.
    assert "cast" in overview.groups and overview.box_of_group["cast"] == "blocks.1"
    assert overview.box("blocks.1").inputs_from == ["blocks.0"]
    assert overview.box("").groups == ["x", "head", "output"]


@pytest.mark.parametrize(
    "dynamo_path, expected",
    [
        ("L['self'].layers[0].attn", "layers.0.attn"),
        ("L['self']._modules['layers']._modules['0'].mlp", "layers.0.mlp"),
        ("L['model'].encoder.block['3']", "encoder.block.3"),
        ("L['self']", ""),
    ],
)
def test_module_path_reads_dynamo_spellings(dynamo_path: str, expected: str) -> None:
    node = torch.fx.Graph().placeholder("x")
    node.meta["nn_module_stack"] = {"key": (dynamo_path, nn.Linear)}
    assert module_path(node) == expected


def test_demo_page_has_the_overview_first_and_the_full_drawing_kept(demo: DemoDump) -> None:
    page = demo.page_path.read_text(encoding="utf-8")
    overview = demo.overview()
    boxes = re.findall(r'<section class="module-box" data-module="([^"]*)"', page)
    assert boxes == [box.path for box in overview.boxes]
    assert page.index('class="module-box"') < page.index('class="fx-graph"')
    assert page.count('<g class="node ') == len(list(demo.graph.nodes))  # the full drawing, collapsed
    assert '<details class="full-graph">' in page
    assert len(re.findall(r'<g class="onode kind-', page)) == len(overview.groups)
    assert len(re.findall(r'<li class="site (?:quantized|skipped)"', page)) == len(demo.sites)


# --------------------------------------------------------------------------- browser


def _require_browser():
    """playwright's sync API, or skip (fail in CI, which installs the browser: make test)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason=f"playwright is not installed; {INSTALL_HINT}"
    )
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):  # CI installs the browser (make test): its absence is a failure there
            pytest.fail(f"{CHROMIUM} is not installed in CI; {INSTALL_HINT}")
        pytest.skip(f"{CHROMIUM} is not installed; {INSTALL_HINT}")
    return sync_api


class BrowserPage:
    """A headless Chromium page that records console errors, page errors and network requests."""

    def __init__(self, browser, width: int, height: int) -> None:
        self.problems: list[str] = []
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("request", self._on_request)

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _on_request(self, request) -> None:  # the page must not fetch anything
        if not request.url.startswith(("file:", "data:")):
            self.problems.append(f"request: {request.url}")


@pytest.fixture(scope="module")
def chromium():
    sync_api = _require_browser()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _open(browser, url: str, width: int = 1280, height: int = 800) -> BrowserPage:
    opened = BrowserPage(browser, width, height)
    opened.page.goto(url, wait_until="load")
    return opened


def _save_screenshot(png: bytes, name: str) -> None:
    """Keep a screenshot for the docs when $FP4COMPILE_SCREENSHOT_DIR names a folder."""
    folder = os.environ.get("FP4COMPILE_SCREENSHOT_DIR")
    if folder:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(folder) / name).write_bytes(png)


def _colour_count(png: bytes) -> int:
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 16)
    return 1 << 16 if colours is None else len(colours)


def _visible_boxes(page) -> list[str]:
    return page.eval_on_selector_all(
        ".module-box", "boxes => boxes.filter(b => !b.hidden).map(b => b.dataset.module)"
    )


@pytest.mark.browser
def test_page_renders_in_headless_chromium(chromium, tmp_path, tiny_graph: torch.fx.Graph) -> None:
    path = write_graph_html(tmp_path / "graph.html", tiny_graph, TINY_NODE_KINDS, SITE_ROWS, "Tiny")
    opened = _open(chromium, path.as_uri(), 1200, 900)
    page = opened.page
    try:
        assert not page.locator("svg.fx-graph").is_visible()  # collapsed: the page opens at the overview
        page.locator("details.full-graph > summary").click()
        drawn_nodes = page.locator("svg.fx-graph g.node").count()
        tooltips = page.locator("svg.fx-graph g.node > title").count()
        svg_box = page.locator("svg.fx-graph").bounding_box()
        table_rows = page.locator("table.sites tbody tr").count()
        screenshot = page.screenshot(full_page=True)
    finally:
        page.close()

    assert opened.problems == []
    node_count = len(list(tiny_graph.nodes))
    assert drawn_nodes == tooltips == node_count
    assert svg_box is not None and svg_box["width"] > 100 and svg_box["height"] > 100
    assert table_rows == len(SITE_ROWS)
    assert len(screenshot) > 1000
    assert _colour_count(screenshot) > 20, "screenshot is (nearly) a single flat colour"


@pytest.mark.browser
def test_demo_page_opens_at_the_module_overview(chromium, demo: DemoDump) -> None:
    width, height = 1280, 800
    opened = _open(chromium, demo.page_path.as_uri(), width, height)
    page = opened.page
    try:
        boxes = page.locator(".module-box")
        rects = [boxes.nth(i).bounding_box() for i in range(boxes.count())]
        visible = [boxes.nth(i).is_visible() for i in range(boxes.count())]
        names = [boxes.nth(i).get_attribute("data-module") for i in range(boxes.count())]
        # What is painted at each box's centre belongs to that box (nothing covers it).
        on_top = [
            page.evaluate("([x, y, i]) => document.querySelectorAll('.module-box')[i]"
                          ".contains(document.elementFromPoint(x, y))",
                          [r["x"] + r["width"] / 2, r["y"] + r["height"] / 2, i])
            for i, r in enumerate(rects)
        ]
        site_lines = page.locator(".module-box .site").count()
        screenshot = page.screenshot()  # the first viewport only
    finally:
        page.close()

    assert opened.problems == []
    assert names == [box.path for box in demo.overview().boxes]
    assert all(visible) and all(on_top)
    # The whole overview fits the window: every box lies inside the first viewport.
    for name, rect in zip(names, rects):
        assert rect["width"] > 150 and rect["height"] > 20, name
        assert 0 <= rect["x"] and rect["x"] + rect["width"] <= width, name
        assert 0 <= rect["y"] and rect["y"] + rect["height"] <= height, name
    assert site_lines == len(demo.sites)
    assert _colour_count(screenshot) > 50, "the first screen is (nearly) blank"
    _save_screenshot(screenshot, "graph_view.png")


@pytest.mark.browser
def test_expanding_a_block_shows_its_inserted_nodes(chromium, demo: DemoDump) -> None:
    block = "layers.0"
    expected = demo.inserted_kinds_in(block)
    assert all(expected.get(kind, 0) > 0 for kind in ("occ_clamp", "quantize", "fp4_gemm", "compensate"))
    opened = _open(chromium, demo.page_path.as_uri())
    page = opened.page
    try:
        box = page.locator(f'.module-box[data-module="{block}"]')
        inserted = {kind: box.locator(f'g.onode[data-kind="{kind}"]') for kind in expected}
        hidden_before = [locator.first.is_visible() for locator in inserted.values()]
        width_before = box.bounding_box()["width"]

        box.locator("details.module-detail > summary").click()
        counts = {kind: locator.count() for kind, locator in inserted.items()}
        shown = {kind: all(locator.nth(i).is_visible() for i in range(locator.count()))
                 for kind, locator in inserted.items()}
        width_after = box.bounding_box()["width"]
        inside = []
        for kind, locator in inserted.items():
            node = locator.first
            node.scroll_into_view_if_needed()
            node_rect, box_rect = node.bounding_box(), box.bounding_box()
            inside.append(box_rect["x"] <= node_rect["x"] and node_rect["x"] + node_rect["width"]
                          <= box_rect["x"] + box_rect["width"])
        page.locator(f'.module-box[data-module="{block}"] g.onode[data-kind="occ_clamp"]').first.evaluate(
            "node => node.scrollIntoView({block: 'center'})")
        screenshot = page.screenshot()
        other_open = page.locator('.module-box[data-module="layers.1"] details[open]').count()
        page.click("#expand-all")
        open_after_expand_all = page.locator(".module-box details.module-detail[open]").count()
        page.click("#collapse-all")
        open_after_collapse_all = page.locator(".module-box details.module-detail[open]").count()
        expandable = page.locator(".module-box details.module-detail").count()
    finally:
        page.close()

    assert opened.problems == []
    assert not any(hidden_before)  # collapsed before the click
    assert counts == expected
    assert all(shown.values()) and all(inside)
    assert width_after > 2 * width_before  # an open block takes the whole row
    assert other_open == 0
    assert expandable == len(demo.overview().boxes)
    assert (open_after_expand_all, open_after_collapse_all) == (expandable, 0)
    _save_screenshot(screenshot, "graph_view_expanded.png")


@pytest.mark.browser
def test_search_filters_to_the_named_module(chromium, demo: DemoDump) -> None:
    all_boxes = [box.path for box in demo.overview().boxes]
    blocks = [f"layers.{i}" for i in range(demo.n_layers)]
    opened = _open(chromium, demo.page_path.as_uri())
    page = opened.page
    try:
        page.fill("#module-search", "layers.2")
        by_block = _visible_boxes(page)
        page.fill("#module-search", "lm_head")
        by_leaf = _visible_boxes(page)
        page.fill("#module-search", "down_proj")  # a submodule: every block that has one
        by_submodule = _visible_boxes(page)
        highlighted = page.locator(".site.match").count()
        status = page.locator("#search-status").inner_text()
        page.fill("#module-search", "no_such_module")
        by_nothing = _visible_boxes(page)
        page.fill("#module-search", "")
        cleared = _visible_boxes(page)
        page.goto(demo.page_path.as_uri() + "#layers.3", wait_until="load")  # same page, new fragment
        by_fragment = _visible_boxes(page)
    finally:
        page.close()
    linked = _open(chromium, demo.page_path.as_uri() + "#lm_head")  # a link into the page
    try:
        by_link = _visible_boxes(linked.page)
    finally:
        linked.page.close()

    assert opened.problems == []
    assert by_block == ["layers.2"]
    assert by_leaf == ["lm_head"]
    assert by_submodule == blocks and highlighted == len(blocks)
    assert status == f"{len(blocks)} of {len(all_boxes)} modules match"
    assert by_nothing == []
    assert cleared == all_boxes
    assert by_fragment == ["layers.3"]
    assert linked.problems == [] and by_link == ["lm_head"]
