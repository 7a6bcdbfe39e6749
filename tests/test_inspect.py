"""Tests of the inspection feature: inspect(), dumps, per-site numerics, cost, the CLI.

Everything here runs the passes only (a capturing backend or fp4_eager), never
Inductor. The tiny LLaMA is captured once per module and shared.
"""
from __future__ import annotations

import csv
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import fp4compile
from fp4compile.__main__ import main
from fp4compile.inspection import dump
from fp4compile.inspection.inspect import inspect
from fp4compile.training.models.llama import Llama, preset
from fp4compile.runtime.occ import occ_clamp
from fp4compile.runtime.quantize import fake_quantize
from fp4compile.runtime.reference import fp4_linear_reference

from .toy_models import AllForms

LINEARS_PER_BLOCK = 7  # q, k, v, o projections and the three SwiGLU matrices


class TwoLayerMLP(nn.Module):
    """The model the `module:factory` CLI tests import as tests.test_inspect:factory."""

    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def factory():
    torch.manual_seed(0)
    return TwoLayerMLP(), (torch.randn(4, 8, 32),)


def model_only_factory():
    torch.manual_seed(0)
    return TwoLayerMLP()


class WithGraphBreak(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, 2 * d)

    def forward(self, x):
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(torch.relu(h))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Llama(preset("tiny"))
    idx = torch.randint(0, 256, (2, 16))
    return model, idx, inspect(model, idx, options={"recipe": "paper"})


def _site(insp, module_path):
    return next(s for s in insp.sites if s.module_path == module_path)


# --------------------------------------------------------------------------- site table


def test_site_table_of_tiny_llama(tiny):
    model, _, insp = tiny
    n_layers = model.config.n_layers
    assert len(insp.graphs) == 1
    assert len(insp.sites) == n_layers * LINEARS_PER_BLOCK + 1
    assert len(insp.quantized_sites) == n_layers * LINEARS_PER_BLOCK
    lm_head = _site(insp, "lm_head")
    assert not lm_head.quantized and "skip list" in lm_head.reason
    assert insp.graphs[0].report.activation_matmuls == 2 * n_layers  # QK^T and PV stay high precision

    text = str(insp)
    lines = text.splitlines()
    for site in insp.sites:
        row = next(line for line in lines if line.startswith(site.module_path + " "))
        assert ("quantized" in row) == site.quantized
        assert " x 64 x " in row or " x 128 x " in row  # M x K x N with the weight's K
    assert re.search(r"lm_head .*high precision\s+skip list \(lm_head\)", text)
    assert "graph 0: quantized 14/15 matmul sites" in text
    assert "idx.size(0) = 2" in text and "idx.size(1) = 16" in text


def test_inspect_leaves_reports_and_compiled_models_alone():
    fp4compile.reset()
    torch.manual_seed(0)
    model, (x,) = factory()
    compiled = torch.compile(model, backend="fp4_eager")
    compiled(x)
    assert len(fp4compile.reports()) == 1
    insp = inspect(model, x)
    assert len(insp.quantized_sites) == 2
    compiled(x)  # still served by its own cache entry: no recompile, no new report
    assert len(fp4compile.reports()) == 1
    assert len(inspect(model, x).sites) == 2  # a second inspection captures again
    fp4compile.reset()


def test_graph_breaks_give_one_entry_per_graph(tmp_path):
    torch.manual_seed(0)
    model = WithGraphBreak()
    insp = inspect(model, torch.randn(3, 5, 32), options={"recipe": "w4a8"})
    assert [len(g.sites) for g in insp.graphs] == [1, 1]
    assert [s.module_path for s in insp.sites] == ["first", "second"]
    assert insp.config.act_fmt == "e4m3"
    assert "graph 1: quantized 1/1" in str(insp)
    insp.save(tmp_path)
    assert (tmp_path / "graph_0" / "after.py").exists() and (tmp_path / "graph_1" / "after.py").exists()
    numerics = insp.numerics()
    assert [s.module for s in numerics.sites] == ["first", "second"] and not numerics.missing


class CheckpointedMLP(nn.Module):
    """Two blocks inside activation-checkpoint regions: their sites live in higher-order-op bodies."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TwoLayerMLP() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


def test_sites_inside_checkpoint_regions(tmp_path):
    torch.manual_seed(0)
    insp = inspect(CheckpointedMLP(), torch.randn(6, 32))
    assert len(insp.quantized_sites) == 4 and not insp.graphs[0].top_level_sites
    insp.save(tmp_path)
    after = (tmp_path / "graph_0" / "after.py").read_text()
    before = (tmp_path / "graph_0" / "before.py").read_text()
    assert after.count("fp4_gemm_op(") == 4 and "fp4_gemm_op(" not in before  # bodies copied before the rewrite
    assert before.count("torch._C._nn.linear(") == 4
    assert len(insp.numerics().sites) == 4
    assert "not counted: 4 matmul site(s)" in str(insp.cost())


def test_a_skip_pattern_that_names_no_module_is_an_error():
    model, (x,) = factory()
    with pytest.raises(fp4compile.backend.Fp4OptionsError, match="matches no module"):
        inspect(model, x, options={"skip": ("uq",)})
    insp = inspect(model, x, options={"skip": ("up",)})
    assert [s.quantized for s in insp.sites] == [False, True]


# --------------------------------------------------------------------------- dumps


def test_save_writes_every_file_and_the_code_shows_the_rewrite(tiny, tmp_path):
    _, _, insp = tiny
    root = insp.save(tmp_path / "dump")
    folder = root / "graph_0"
    for name in ("before.py", "after.py", "sites.md", "sites.csv", "graph.html"):
        assert (folder / name).stat().st_size > 0, name
    assert "graph_0" in (root / "index.md").read_text()

    before = (folder / "before.py").read_text()
    after = (folder / "after.py").read_text()
    n_quantized = len(insp.quantized_sites)
    assert before.count("torch._C._nn.linear(") == len(insp.sites)
    assert after.count("torch._C._nn.linear(") == 1  # only lm_head is left
    for op in ("quantize_weight_op(", "fp4_gemm_op(", "compensate_op("):  # one per site
        assert op not in before
        assert after.count(op) == n_quantized, op
    # One clamp and quantize per distinct activation: q/k/v share one, gate/up another,
    # o_proj and down_proj each have their own: 4 per layer.
    n_layers = sum(site.module_path.endswith("down_proj") for site in insp.sites)
    for op in ("occ_clamp_op(", "quantize_activation_op("):
        assert op not in before
        assert after.count(op) == 4 * n_layers, op

    with open(folder / "sites.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(insp.sites)
    assert [r["decision"] for r in rows].count("quantized") == n_quantized
    down = next(r for r in rows if r["module"] == "layers.0.mlp.down_proj")
    assert (down["K"], down["N"]) == ("128", "64") and "fp4_gemm_op" in down["inserted"]
    assert "| lm_head | linear |" in (folder / "sites.md").read_text()


def test_graph_html_marks_inserted_and_skipped_nodes(tiny, tmp_path):
    _, _, insp = tiny
    insp.save(tmp_path)
    page = (tmp_path / "graph_0" / "graph.html").read_text()
    kinds = re.findall(r'<g class="node kind-([a-z0-9_]+)" data-node="([^"]+)"', page)
    count = lambda kind: sum(1 for k, _ in kinds if k == kind)
    n_quantized = len(insp.quantized_sites)
    n_activations = 4 * sum(site.module_path.endswith("down_proj") for site in insp.sites)  # see above
    assert count("fp4_gemm") == n_quantized
    assert count("occ_clamp") == n_activations
    assert count("compensate") == n_quantized
    assert count("quantize") == n_quantized + n_activations  # each weight, each distinct activation
    assert [name for kind, name in kinds if kind == "skipped_matmul"] == [_site(insp, "lm_head").node]


def test_env_var_dumps_every_fp4_compile(tmp_path, monkeypatch):
    monkeypatch.setenv(dump.DUMP_DIR_ENV, str(tmp_path))
    fp4compile.reset()
    model, (x,) = factory()
    torch.compile(model, backend="fp4_eager")(x)
    report = fp4compile.reports()[0]
    folder = tmp_path / f"graph_{report.graph_id}"
    for name in ("after.py", "sites.md", "sites.csv", "graph.html"):
        assert (folder / name).exists(), name
    assert "fp4_gemm_op(" in (folder / "after.py").read_text()
    assert f"graph_{report.graph_id}" in (tmp_path / "index.md").read_text()
    fp4compile.reset()

    # With the code from before the passes (the backend's proposed hook), before.py is written too.
    dump.maybe_dump(torch.fx.symbolic_trace(model), report, before_code="def forward(self, x): ...")
    assert (folder / "before.py").read_text().startswith("def forward")


def test_no_dump_without_the_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv(dump.DUMP_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    fp4compile.reset()
    model, (x,) = factory()
    torch.compile(model, backend="fp4_eager")(x)
    fp4compile.reset()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- numerics


def _snr_db(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return 10 * math.log10(x.pow(2).sum().item() / (x - x_hat).pow(2).sum().item())


def test_numerics_match_an_independent_computation(tiny):
    model, idx, insp = tiny
    numerics = insp.numerics(idx)
    assert [s.module for s in numerics.sites] == [s.module_path for s in insp.quantized_sites]
    assert not numerics.missing

    # Capture down_proj's input with a plain forward hook and redo the arithmetic here.
    captured = {}
    down = model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: captured.update(x=args[0].detach().clone()))
    with torch.no_grad():
        model(idx)
    handle.remove()
    x = captured["x"].reshape(-1, down.in_features)
    w = down.weight.detach()

    clamped, residual = occ_clamp(x, alpha=0.99, scope="row")
    x_hat = fake_quantize(clamped) + residual
    site = next(s for s in numerics.sites if s.module == "layers.0.mlp.down_proj")
    assert site.mkn == (idx.numel(), 128, 64)
    assert site.activation["snr_db"] == pytest.approx(_snr_db(x, x_hat), rel=1e-9)
    assert site.activation_no_occ["snr_db"] == pytest.approx(_snr_db(x, fake_quantize(x)), rel=1e-9)
    assert site.weight["snr_db"] == pytest.approx(_snr_db(w, fake_quantize(w)), rel=1e-9)
    y_exact = x.double() @ w.double().t()
    y_fp4 = fp4_linear_reference(x, w, None, insp.config)
    assert site.output["snr_db"] == pytest.approx(_snr_db(y_exact, y_fp4), rel=1e-6)
    assert site.clamped_fraction == pytest.approx((residual != 0).double().mean().item())
    assert site.clamped_fraction > 0  # K = 128: one entry per side and token is clamped at alpha = 0.99
    nonzero = x.abs()[x != 0]
    assert site.amax_over_median == pytest.approx((x.abs().max() / nonzero.median()).item())

    text = str(numerics)
    assert "layers.0.mlp.down_proj" in text and "mean over 14 sites" in text


def test_numerics_capture_every_matmul_form():
    torch.manual_seed(0)
    model = AllForms()
    insp = inspect(model, torch.randn(2, 5, 32))
    numerics = insp.numerics()
    assert len(numerics.operands) == 6 and not numerics.missing
    for operands in numerics.operands:
        site = operands.site
        param = model.get_parameter(site.weight_name)
        expected = param if site.weight_layout == "out_in" else param.t()
        assert torch.equal(operands.weight, expected), site.weight_name
        assert operands.activation.shape[-1] == operands.weight.shape[1]
    conv1d = next(o for o in numerics.operands if o.site.weight_name == "conv1d_w")
    assert torch.equal(conv1d.bias, model.conv1d_b)


def test_occ_study_on_real_activations(tiny):
    _, idx, insp = tiny
    study = insp.numerics(idx).occ_study()
    assert [r["setting"] for r in study.rows] == [
        "no clamp", "clamp 99.9", "clamp+comp 99.9", "clamp+comp 99", "clamp+comp 97"]
    assert len(study.per_site) == len(insp.quantized_sites)
    for row in study.rows:
        assert 0.9 < row["cos"] <= 1 and row["mse"] > 0 and math.isfinite(row["snr_db"])
    assert study.rows[-1]["snr_db"] > study.rows[0]["snr_db"]  # clamping 3% and compensating helps
    table = study.table()
    assert table.splitlines()[0].startswith("| clamp | compensate | quantile | cos sim | MSE | SNR (dB) | paper")
    assert len(table.splitlines()) == 2 + 5
    assert "92.19%" in table and "20.88" in table  # the paper's figures beside ours


# --------------------------------------------------------------------------- cost model


def test_cost_of_the_captured_graph(tiny):
    _, _, insp = tiny
    cost = insp.cost()
    names = {str(sym) for sym in cost.graph.speedup_expr.free_symbols}
    assert names == {"b", "s"}
    fp4_sites = [s for s in cost.graph.sites if s.quantized]
    assert len(fp4_sites) == len(insp.quantized_sites)
    assert 1 < cost.graph_on_fp8.speedup_value < cost.graph.speedup_value < 4
    text = str(cost)
    for figure in ("3.12x", "2.95x", "1.83x"):
        assert figure in text
    assert "b=2, s=16" in text


# --------------------------------------------------------------------------- CLI


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["inspect", "--model", "demo", "--preset", "tiny", "--batch", "2", "--seq", "32",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14/15 matmul sites quantized" in text
    assert "Per-site numerics" in text and "freshly initialised" in text
    assert "| clamp | compensate | quantile |" in text
    assert "speedup over BF16" in text and "3.12x" in text
    assert (out / "index.md").exists() and (out / "graph_0" / "graph.html").exists()


def test_cli_module_factory(tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["inspect", "--model", "tests.test_inspect:factory", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^up\s+linear", text, re.M) and re.search(r"^down\s+linear", text, re.M)
    assert (out / "graph_0" / "before.py").exists()


def test_cli_model_only_factory_needs_an_input_shape(tmp_path, capsys):
    args = ["inspect", "--model", "tests.test_inspect:model_only_factory", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(args + ["--input-shape", "4,32"]) == 0
    assert "2/2 matmul sites quantized" in capsys.readouterr().out
