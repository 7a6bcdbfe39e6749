"""The training benchmark's controls: ``dge-only`` (DGE's factor on an unquantized model) and cross-evaluation.

The DGE factor is checked against an independent oracle: the numerical
derivative of the DGE surrogate f (SPEC.md section 3) in float64, capped as the
recipe caps it. The cross-evaluation script is checked by its diagonal: a run
evaluated through its own recipe's forward must give back the loss it logged.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fp4compile.config import Fp4Config
from fp4compile.runtime.dge import dge_surrogate
from fp4compile.training import bench as bench_train
from fp4compile.training.dge_only import attach_dge_only, dge_factor, quantized_weights

from .test_bench_train import bench_args

PAPER = Fp4Config.from_recipe("paper")
REPO = Path(__file__).resolve().parent.parent


def _oracle_factor(w: torch.Tensor, k: float, cap: float) -> torch.Tensor:
    """min(cap, f'(w / scale_row)) by a central difference of the surrogate f, in float64."""
    scale = w.abs().amax(dim=1, keepdim=True) / 6.0  # E2M1's largest magnitude is 6
    x = w / scale
    h = 1e-7
    slope = (dge_surrogate(x + h, k) - dge_surrogate(x - h, k)) / (2 * h)
    # Each row's absmax lands on 6, where the surrogate saturates: its one-sided
    # derivative from inside the range, 1/k (the value at every grid point), applies.
    slope = torch.where(x.abs() > 6 - 2 * h, torch.full_like(slope, 1.0 / k), slope)
    return slope.clamp(max=cap), x


@pytest.mark.parametrize("shape", [(7, 16), (32, 48), (3, 130)])
@pytest.mark.parametrize("k,cap", [(5.0, 3.0), (2.0, 100.0)])
def test_dge_factor_is_the_capped_derivative_of_the_surrogate(shape, k, cap):
    torch.manual_seed(sum(shape) + int(k))
    w = torch.randn(shape, dtype=torch.float64)
    expected, x = _oracle_factor(w, k, cap)
    got = dge_factor(w, Fp4Config.from_recipe("paper", dge_k=k, dge_clamp=cap))
    # The finite difference is exact to ~1e-6 away from interval boundaries and the
    # midpoints (where f' is singular); the row maximum sits on the grid point 6.
    start = torch.where(x.abs() < 2, (x.abs() * 2).floor() / 2, torch.where(x.abs() < 4, x.abs().floor(), 4.0))
    width = torch.where(x.abs() < 2, 0.5, torch.where(x.abs() < 4, 1.0, 2.0))
    position = (x.abs() - start) / width
    smooth = (position > 1e-3) & (position < 1 - 1e-3) & ((position - 0.5).abs() > 1e-3) & (x.abs() < 6)
    assert smooth.float().mean() > 0.9
    torch.testing.assert_close(got[smooth], expected[smooth], rtol=1e-5, atol=1e-6)


def test_dge_factor_keeps_nan_and_rejects_recipes_without_dge():
    w = torch.randn(4, 32)
    w[1, 3] = float("nan")
    factor = dge_factor(w, PAPER)
    # NaN stays NaN; the block scale ignores it, as the weight quantizer's does.
    assert torch.equal(torch.isnan(factor), torch.isnan(w))
    clean = w.clone()
    clean[1, 3] = 0.0  # below the row's absmax: the same scale
    keep = ~torch.isnan(w)
    torch.testing.assert_close(factor[keep], dge_factor(clean, PAPER)[keep], rtol=0, atol=0)
    for recipe in ("bf16", "fp4-direct"):
        with pytest.raises(ValueError, match="DGE"):
            dge_factor(w, Fp4Config.from_recipe(recipe))


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(32, 24, bias=False, dtype=torch.float64)
        self.lm_head = nn.Linear(24, 8, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.body(x)))


def test_attach_dge_only_scales_each_backward_once_and_skips_the_head():
    torch.manual_seed(0)
    model = _TwoLayers()
    assert [name for name, _ in quantized_weights(model, PAPER)] == ["body.weight"]
    x1, x2 = torch.randn(5, 32, dtype=torch.float64), torch.randn(6, 32, dtype=torch.float64)
    plain = [torch.autograd.grad(model(x).square().sum(), model.body.weight)[0] for x in (x1, x2)]
    head_plain = torch.autograd.grad(model(x1).square().sum(), model.lm_head.weight)[0]
    expected_factor, _ = _oracle_factor(model.body.weight.detach(), PAPER.dge_k, PAPER.dge_clamp)

    handles = attach_dge_only(model, PAPER)
    # Two backward passes accumulate into .grad: each is scaled once (not the sum twice).
    model(x1).square().sum().backward()
    model(x2).square().sum().backward()
    torch.testing.assert_close(model.body.weight.grad, (plain[0] + plain[1]) * expected_factor,
                               rtol=1e-5, atol=1e-8)
    model.zero_grad()
    model(x1).square().sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, head_plain, rtol=0, atol=0)
    for handle in handles:
        handle.remove()


def _cross_eval_module():
    spec = importlib.util.spec_from_file_location("cross_eval", REPO / "benchmarks" / "cross_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dge_only_and_cross_eval_through_the_benchmark(tmp_path, capsys):
    """Three recipes on the tiny model (fp4_eager: the passes without Inductor), then every run through two forwards."""
    args = bench_args(tmp_path, "--backend", "fp4_eager", "--recipes", "bf16,dge-only,paper", "--steps", "4",
                      "--eval-every", "4", "--save-weights")
    assert bench_train.run(args) == 0
    results = {name: json.loads((tmp_path / f"{name}_seed0.json").read_text()) for name in ("bf16", "dge-only", "paper")}
    assert results["dge-only"]["key"]["dge_only"] == {"recipe": "paper"}
    # Same initial weights and batches: DGE's factor alone changes the trajectory.
    assert results["dge-only"]["final_val_loss"] != results["bf16"]["final_val_loss"]
    summary = (tmp_path / "summary.md").read_text()
    assert "dge-only" in summary

    cross_eval = _cross_eval_module()
    assert cross_eval.main([str(tmp_path), "--forwards", "bf16,paper"]) == 0  # nonzero if the diagonal is off
    rows = {(row["run"], row["forward"]): float(row["val_loss"])
            for row in csv.DictReader((tmp_path / "cross_eval.csv").open())}
    assert len(rows) == 6
    assert rows[("paper_seed0", "paper")] == pytest.approx(results["paper"]["final_val_loss"], rel=1e-5)
    assert rows[("bf16_seed0", "bf16")] == pytest.approx(results["bf16"]["final_val_loss"], rel=1e-5)
    # The FP4 forward changes the loss of the same weights.
    assert rows[("paper_seed0", "bf16")] != rows[("paper_seed0", "paper")]
    assert rows[("bf16_seed0", "paper")] != rows[("bf16_seed0", "bf16")]
    assert "| paper_seed0 |" in capsys.readouterr().out
