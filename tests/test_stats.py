"""Live FP4 telemetry (`stats_interval`, `fp4compile.stats()`).

- Off (the default, or 0): the lowered graph is the same code as without the
  option, and turning it on adds only the probe nodes.
- On: every statistic equals a float64 recomputation, written here from the
  definitions in `runtime/stats.py` (E2M1 nearest-grid search, torch.quantile
  clamp), from the tensors the step used: the input x, the weight before the
  step, and dY (the gradient the test feeds each output). amax and the
  underflow/clamp shares must match exactly; SNRs within 1e-3 dB (the
  pipeline sums squares in float32: relative error ~1e-6, i.e. ~1e-5 dB).
- Records land at steps 0, N, 2N, ... only; forwards without a backward
  (evaluation) do not count as steps.
- One graph compiled for several blocks keeps one row per block; a sharp SNR
  drop is named in a warning; CSV round-trips; TensorBoard when installed.

Compiles: fp4_aot_eager throughout, and one Inductor compile (`fp4`).
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile.runtime import stats as telemetry
from fp4compile.stats import CSV_FIELDS, STAT_FIELDS, StatsTable

E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
SNR_TOL_DB = 1e-3


@pytest.fixture(autouse=True)
def _fresh():
    fp4compile.reset()
    fp4compile.stats(clear=True)
    yield
    fp4compile.reset()
    fp4compile.stats(clear=True)


class TwoHeads(nn.Module):
    """Two linears reading one activation (shared clamp/quantize), one with a bias."""

    def __init__(self, k: int):
        super().__init__()
        self.a = nn.Linear(k, 48)
        self.b = nn.Linear(k, 32, bias=False)

    def forward(self, x):
        return self.a(x), self.b(x)


# ---- float64 oracle --------------------------------------------------------------------


def _e2m1(v):
    """Nearest E2M1 value (random data has no exact ties), saturating at 6, sign kept."""
    mag = v.abs().clamp(max=6.0)
    return torch.copysign(E2M1_GRID[(mag.unsqueeze(-1) - E2M1_GRID).abs().argmin(-1)], v)


def _quantize_rows(t):
    amax = t.abs().amax(-1, keepdim=True)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 6.0)
    return _e2m1(t / scale), scale


def _snr(signal, error):
    return 10.0 * math.log10(signal.square().sum().item() / error.square().sum().item())


def expected_stats(x, w, g, occ: bool) -> dict:
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    w64 = w.detach().double()
    if occ:  # the 0.99 and 0.01 quantiles per token, never crossing zero
        upper = torch.quantile(x64, 0.99, dim=-1, keepdim=True).clamp(min=0)
        lower = torch.quantile(x64, 0.01, dim=-1, keepdim=True).clamp(max=0)
        x_c = torch.minimum(torch.maximum(x64, lower), upper)
    else:
        x_c = x64
    x_q, x_s = _quantize_rows(x_c)
    w_q, w_s = _quantize_rows(w64)
    return {
        "act_amax": x64.abs().max().item(),
        "weight_amax": w64.abs().max().item(),
        "grad_amax": g.double().abs().max().item(),
        "act_underflow": ((x_c != 0) & (x_q == 0)).sum().item() / x64.numel(),
        "weight_underflow": ((w64 != 0) & (w_q == 0)).sum().item() / w64.numel(),
        "act_clamp": (x_c != x64).sum().item() / x64.numel(),
        # Compensated OCC: the GEMM sees x_q * x_s + (x - x_c), so the error is x_c - x_q * x_s.
        "act_snr_db": _snr(x64, x_c - x_q * x_s),
        "weight_snr_db": _snr(w64, w64 - w_q * w_s),
    }


def assert_row_matches(row, expected):
    for name in ("act_amax", "weight_amax", "grad_amax", "act_underflow", "weight_underflow", "act_clamp"):
        assert row[name] == expected[name], (row["layer"], row["step"], name, row[name], expected[name])
    for name in ("act_snr_db", "weight_snr_db"):
        assert abs(row[name] - expected[name]) < SNR_TOL_DB, (row["layer"], row["step"], name)


def train_and_capture(compiled, model, shape, steps, seed=0, eval_forwards=True):
    """Run `steps` SGD steps; return, per step, the tensors each site used: x, weights, dY."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    captured, outputs = [], []
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen)
        x[..., 3] *= 20.0  # an outlier channel, so OCC has something to clamp
        weights = {"a": model.a.weight.detach().clone(), "b": model.b.weight.detach().clone()}
        ya, yb = compiled(x)
        ga, gb = torch.randn(ya.shape, generator=gen), torch.randn(yb.shape, generator=gen) * 3
        (ya * ga).sum().add((yb * gb).sum()).backward()
        outputs.append((ya.detach().clone(), yb.detach().clone(), model.a.weight.grad.clone()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if eval_forwards:  # an evaluation forward between steps: not a step
            compiled(torch.randn(*shape, generator=gen))
        captured.append({"x": x, "w": weights, "g": {"a": ga, "b": gb}})
    return captured, outputs


def check_against_oracle(table, captured, interval, occ):
    steps = len(captured)
    assert sorted({row["step"] for row in table}) == list(range(0, steps, interval))
    assert sorted(table.layers()) == ["a", "b"]
    assert len(table) == 2 * len(range(0, steps, interval))
    for row in table:
        used = captured[row["step"]]
        layer = row["layer"]
        assert_row_matches(row, expected_stats(used["x"], used["w"][layer], used["g"][layer], occ))


# ---- tests -------------------------------------------------------------------------------


def _lowered_code(options, x):
    """The CPU-lowered graph (what Inductor would receive), without running Inductor."""
    from fp4compile.backend import prepare

    graphs = []

    def backend(gm, example_inputs):
        prepare(gm, example_inputs, options, "fp4", lower=True)
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    torch.compile(TwoHeads(64), backend=backend)(x)
    assert len(graphs) == 1
    return graphs[0]


def test_stats_off_leaves_the_lowered_graph_unchanged():
    from fp4compile.inspection.dump import graph_module_code

    x = torch.randn(2, 5, 64)
    today = graph_module_code(_lowered_code({"recipe": "paper"}, x))
    off = graph_module_code(_lowered_code({"recipe": "paper", "stats_interval": 0}, x))
    assert off == today
    assert "probe" not in today
    on_gm = _lowered_code({"recipe": "paper", "stats_interval": 4}, x)
    on = graph_module_code(on_gm)
    assert on != today and on.count("probed_weight_scale(") == 2 and on.count("grad_probe(") == 2
    # Removing the probes gives back today's graph exactly: they are the only change.
    for node in list(on_gm.graph.nodes):
        if node.target is telemetry.probed_weight_scale:
            node.replace_all_uses_with(node.args[3])
            on_gm.graph.erase_node(node)
        elif node.target is telemetry.grad_probe:
            node.replace_all_uses_with(node.args[0])
            on_gm.graph.erase_node(node)
    on_gm.recompile()
    assert graph_module_code(on_gm) == today


@pytest.mark.parametrize("recipe, shape, interval, steps", [
    ("paper", (2, 5, 64), 3, 7),
    ("fp4-direct", (9, 96), 2, 5),
])
def test_statistics_match_float64_and_the_interval_is_honoured(recipe, shape, interval, steps):
    torch.manual_seed(1)
    model = TwoHeads(shape[-1])
    reference = TwoHeads(shape[-1])
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="fp4_aot_eager", options={"recipe": recipe, "stats_interval": interval})
    captured, outputs = train_and_capture(compiled, model, shape, steps)
    table = fp4compile.stats(model)
    check_against_oracle(table, captured, interval, occ=recipe == "paper")
    # The probes change no value: same outputs and gradients as without them.
    plain = torch.compile(reference, backend="fp4_aot_eager", options={"recipe": recipe})
    _, plain_outputs = train_and_capture(plain, reference, shape, steps)
    for got, want in zip(outputs, plain_outputs):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert len(fp4compile.stats(model)) == len(table)  # the stats-off model recorded nothing


def test_statistics_under_inductor():
    torch.manual_seed(2)
    model = TwoHeads(64)
    compiled = torch.compile(model, backend="fp4", options={"recipe": "paper", "stats_interval": 2})
    captured, _ = train_and_capture(compiled, model, (2, 5, 64), 3)
    check_against_oracle(fp4compile.stats(model), captured, 2, occ=True)
    assert fp4compile.reports()[0].backend == "fp4"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        return x + self.proj(torch.relu(x))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_one_graph_for_many_blocks_keeps_a_row_per_block_and_csv_round_trips(tmp_path):
    torch.manual_seed(3)
    model = Stack()
    for block in model.blocks:
        block.compile(backend="fp4_aot_eager", options={"recipe": "paper", "stats_interval": 1})
    for _ in range(2):
        # An input that requires grad, like the embeddings a block receives: both
        # blocks then match one set of dynamo guards.
        model(torch.randn(4, 64, requires_grad=True)).square().sum().backward()
    assert len(fp4compile.reports()) == 1  # one graph serves both blocks
    named = fp4compile.stats(model)
    assert named.layers() == ["blocks.0.proj", "blocks.1.proj"]
    assert [row["step"] for row in named] == [0, 0, 1, 1]
    first = {row["layer"]: row for row in named if row["step"] == 1}
    for index, block in enumerate(model.blocks):  # no optimizer: the weights stay put
        assert first[f"blocks.{index}.proj"]["weight_amax"] == block.proj.weight.abs().max().item()
    assert fp4compile.stats().layers() == ["proj#0", "proj#1"]  # without the model: by order of appearance

    named.to_csv(tmp_path / "stats.csv")
    assert StatsTable.read_csv(tmp_path / "stats.csv").rows == named.rows
    special = StatsTable([{**named.rows[0], "act_snr_db": math.inf, "weight_snr_db": math.nan,
                           "act_amax": 1e-45, "grad_amax": 0.1 + 0.2}])
    special.to_csv(tmp_path / "special.csv")
    back = StatsTable.read_csv(tmp_path / "special.csv").rows[0]
    assert set(back) == set(CSV_FIELDS)
    for name in CSV_FIELDS:
        want = special.rows[0][name]
        assert (math.isnan(back[name]) and math.isnan(want)) if name == "weight_snr_db" else back[name] == want


def test_a_sharp_snr_drop_names_the_site(caplog):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide_proj = nn.Linear(256, 32)

        def forward(self, x):
            return self.wide_proj(x)

    model = Wrapper()
    compiled = torch.compile(model, backend="fp4_aot_eager", options={"recipe": "fp4-direct", "stats_interval": 1})
    gen = torch.Generator().manual_seed(4)
    # One value of 1 per token and the rest at 0.041: on the E2M1 grid of a row
    # scaled to 1/6 they round to 0, and their power is ~30% of the signal (~5 dB).
    bad = torch.full((8, 256), 0.041)
    bad[:, 0] = 1.0
    inputs = [torch.randn(8, 256, generator=gen) for _ in range(4)] + [bad]
    with caplog.at_level(logging.WARNING, logger="fp4compile"):
        for step, x in enumerate(inputs):
            compiled(x).sum().backward()
            warned = [r for r in caplog.records if "SNR" in r.getMessage()]
            assert bool(warned) == (step == 4), step
    assert "activation SNR of wide_proj" in warned[0].getMessage()
    assert "at step 4" in warned[0].getMessage()
    act_snr = fp4compile.stats(model).series("wide_proj", "act_snr_db")[1]
    assert act_snr[4] < min(act_snr[:4]) - telemetry.SNR_DROP_DB


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [{"step": s, "layer": "h.0.mlp", "site": "mlp", "graph": 0, "instance": 0,
             **{name: 0.25 * (s + 1) for name in STAT_FIELDS}} for s in (0, 10)]
    StatsTable(rows).to_tensorboard(tmp_path)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Scalars("fp4/act_underflow/h.0.mlp")
    assert [(e.step, e.value) for e in scalars] == [(0, 0.25), (10, 2.75)]  # 0.25 * (step + 1)
    assert len(events.Tags()["scalars"]) == len(STAT_FIELDS)


def test_stats_interval_validation():
    with pytest.raises(ValueError, match=r"stats_interval=2\.0 is invalid: an integer >= 0"):
        fp4compile.Fp4Config(stats_interval=2.0)
    assert fp4compile.Fp4Config.from_options({"stats_interval": 10}).stats_interval == 10
