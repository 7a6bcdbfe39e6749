"""Tests for the HTML graph view (fp4compile.inspection.html).

The structural tests read the page as text: one drawn element per FX node, the
legend, the site table, escaping, and no resource that would need a network.
The layout tests read node positions back from the SVG. The browser test opens
the written page in headless Chromium and checks that it renders without errors
and produces a real picture; it needs scripts/install_browser.sh.
"""

from __future__ import annotations

import io
import os
import re

import pytest
import torch
import torch.fx
import torch.nn as nn
from PIL import Image

from fp4compile.inspection.html import NODE_KINDS, render_graph_html, write_graph_html

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
    for needle in ("<script", "<link", "<img", "<iframe", "@import", "src=", "href="):
        assert needle not in tiny_page.lower(), needle


def test_everything_user_supplied_is_escaped() -> None:
    graph = torch.fx.Graph()
    hostile = graph.placeholder("x")
    weird = graph.call_function(torch.add, (hostile, 1))
    weird.name = 'n"<b>&'  # names come from user code; do not trust them
    graph.output(weird)
    site_rows = [{"<k>": "<script>alert(1)</script>"}]
    page = render_graph_html(graph, {weird.name: "compensate"}, site_rows, "</title><script>")
    assert "<script" not in page
    assert "<b>" not in page
    assert 'data-node="n&quot;&lt;b&gt;&amp;"' in page
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


# --------------------------------------------------------------------------- browser


@pytest.mark.browser
def test_page_renders_in_headless_chromium(tmp_path, tiny_graph: torch.fx.Graph) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason=f"playwright is not installed; {INSTALL_HINT}"
    )
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):  # CI installs the browser (make test): its absence is a failure there
            pytest.fail(f"{CHROMIUM} is not installed in CI; {INSTALL_HINT}")
        pytest.skip(f"{CHROMIUM} is not installed; {INSTALL_HINT}")

    path = write_graph_html(tmp_path / "graph.html", tiny_graph, TINY_NODE_KINDS, SITE_ROWS, "Tiny")
    problems: list[str] = []

    def on_console(message) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    def on_page_error(error) -> None:
        problems.append(f"page error: {error}")

    def on_request(request) -> None:  # the page must not fetch anything
        if not request.url.startswith(("file:", "data:")):
            problems.append(f"request: {request.url}")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            page.on("request", on_request)
            page.goto(path.as_uri(), wait_until="load")

            drawn_nodes = page.locator("svg.fx-graph g.node").count()
            tooltips = page.locator("svg.fx-graph g.node > title").count()
            svg_box = page.locator("svg.fx-graph").bounding_box()
            table_rows = page.locator("table.sites tbody tr").count()
            screenshot = page.screenshot(full_page=True)
        finally:
            browser.close()

    assert problems == []
    node_count = len(list(tiny_graph.nodes))
    assert drawn_nodes == tooltips == node_count
    assert svg_box is not None and svg_box["width"] > 100 and svg_box["height"] > 100
    assert table_rows == len(SITE_ROWS)

    assert len(screenshot) > 1000
    image = Image.open(io.BytesIO(screenshot)).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)  # None: more colours than that
    assert colours is None or len(colours) > 20, "screenshot is (nearly) a single flat colour"
