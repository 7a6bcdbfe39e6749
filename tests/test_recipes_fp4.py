"""The NVFP4 and MXFP4 recipes: the compiled graph against the per-layer reference, in float64.

Their backward GEMMs quantize their own operands (FP4 gradients in blocks,
stochastic rounding, a random Hadamard transform along the tokens for the
weight gradient; docs/recipes.md). Checked here:

- the semantic graph (`fp4_aot_eager`) equals `fp4_linear_reference` composed per
  layer, forward and every gradient, in float64, stochastic rounding included
  (both draw from torch's generator in the same order after the same seed);
- the weight-gradient route equals an explicit construction: a dense
  block-diagonal Hadamard matrix from the +-1 popcount formula, zero padding of
  the tokens, quantization along the tokens;
- stochastic rounding makes the layer's input gradient unbiased;
- under Inductor (`fp4`): the site runs the requantized route (report and
  generated code), a seeded training run is bit-reproducible, another seed differs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fp4compile
from fp4compile import Fp4Config
from fp4compile.runtime.gemm import requantized_input_gradient, requantized_weight_gradient
from fp4compile.runtime.hadamard import rht_signs
from fp4compile.runtime.quantize import quantize, quantize_gradient

from .test_branches import (ReferenceTwoLinears, _assert_all_close, _assert_differs, _compiled_run,
                            _forward_backward, _inputs, _model)

RECIPE_CASES = {
    "nvfp4": {"recipe": "nvfp4"},
    "mxfp4": {"recipe": "mxfp4"},
    "nvfp4, nearest gradients": {"recipe": "nvfp4", "grad_rounding": "nearest"},
    "nvfp4 without Hadamard": {"recipe": "nvfp4", "hadamard": 0},
    # paper (OCC, DGE, row scales) with NVFP4's FP4 gradients: the compensation
    # then adds to the forward only, the weight gradient sees the whole input.
    "paper, FP4 block16 gradients": {"recipe": "paper", "grad_fmt": "e2m1", "grad_granularity": "block16",
                                     "grad_rounding": "stochastic", "hadamard": 16},
}


def _seeded(run, seed):
    def go(x):
        torch.manual_seed(seed)
        return run(x)
    return go


@pytest.fixture(scope="module")
def paper_results():
    model = _model(0)
    x, dy = _inputs(0)
    return _forward_backward(model, ReferenceTwoLinears(model, Fp4Config.from_recipe("paper")), x, dy)


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_semantic_graph_equals_reference_float64(case, paper_results):
    options = RECIPE_CASES[case]
    config = Fp4Config.from_options(dict(options))
    model = _model(0)
    x, dy = _inputs(0)  # 15 tokens: the weight gradient pads them to whole Hadamard/scale blocks
    compiled = _compiled_run(model, "fp4_aot_eager", dict(options))
    # Stochastic rounding draws happen in the backward, inside _forward_backward's
    # backward() call, after the seed set before the forward.
    got = _forward_backward(model, _seeded(compiled, 7), x, dy)
    sites = [s for r in fp4compile.reports() for s in r.quantized]
    assert sorted(s.weight_name for s in sites) == ["down.weight", "up.weight"]
    expected = _forward_backward(model, _seeded(ReferenceTwoLinears(model, config), 7), x, dy)
    _assert_all_close(got, expected, case)
    # Every gradient moves away from paper's; so does the output unless only the backward changed.
    same_forward = options["recipe"] == "paper"
    _assert_differs(got[1:] if same_forward else got, paper_results[1:] if same_forward else paper_results, case)
    if same_forward:
        torch.testing.assert_close(got[0], paper_results[0], rtol=1e-10, atol=1e-12)
    for name, g in zip(["output", "grad x", "grad up.weight", "grad up.bias", "grad down.weight"], got):
        assert torch.isfinite(g).all(), name
    fp4compile.reset()


def test_stochastic_gradients_change_with_the_seed():
    options = {"recipe": "nvfp4"}
    model = _model(1)
    x, dy = _inputs(1)
    compiled = _compiled_run(model, "fp4_aot_eager", options)
    a = _forward_backward(model, _seeded(compiled, 1), x, dy)
    b = _forward_backward(model, _seeded(compiled, 1), x, dy)
    c = _forward_backward(model, _seeded(compiled, 2), x, dy)
    for t_a, t_b in zip(a, b):
        assert torch.equal(t_a, t_b)
    assert torch.equal(a[0], c[0])  # the forward rounds to nearest
    assert not torch.equal(a[2], c[2])  # the weight gradient rounds stochastically
    fp4compile.reset()


def _popcount_hadamard(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j) / sqrt(n): the Sylvester matrix, written independently."""
    h = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=torch.float64)
    return h / math.sqrt(n)


@pytest.mark.parametrize("m, block, granularity", [(15, 16, "block16"), (64, 16, "block16"), (40, 32, "block32"),
                                                   (33, 0, "block16")])
def test_weight_gradient_route_equals_explicit_construction(m, block, granularity):
    """dW = Q(dY^T R) @ Q(X^T R)^T with R = diag(signs) H per block, tokens zero-padded: built by hand."""
    gen = torch.Generator().manual_seed(m)
    g = torch.randn(m, 48, generator=gen, dtype=torch.float64)
    x = torch.randn(m, 64, generator=gen, dtype=torch.float64)
    signs = rht_signs(block, seed=3) if block else None
    spec = ("e2m1", granularity, "nearest")
    got = requantized_weight_gradient(g, x, spec, ("e2m1", granularity), signs)

    blk = int(granularity.removeprefix("block"))
    padded = -(-m // max(blk, block or 1)) * max(blk, block or 1)
    g_t = torch.zeros(48, padded, dtype=torch.float64)
    g_t[:, :m] = g.t()
    x_t = torch.zeros(64, padded, dtype=torch.float64)
    x_t[:, :m] = x.t()
    if block:
        r_block = torch.diag(torch.tensor(signs, dtype=torch.float64)) @ _popcount_hadamard(block)
        rotation = torch.block_diag(*[r_block] * (padded // block))
        g_t, x_t = g_t @ rotation, x_t @ rotation
    g_values, g_scale = quantize(g_t, granularity, "e2m1")
    x_values, x_scale = quantize(x_t, granularity, "e2m1")
    expected = (g_values * g_scale) @ (x_values * x_scale).t()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Quantization is what separates it from the exact product, and only by FP4 error.
    exact = g.t() @ x
    assert not torch.allclose(got, exact, rtol=1e-3)
    assert (got - exact).norm() < 0.5 * exact.norm()


def test_stochastic_rounding_makes_the_input_gradient_unbiased():
    """E[Q_sr(dY)] = dY inside the range, so the mean of many draws of dX approaches dY @ W.

    Each element of dX is a sum of 64 independent bounded rounding errors; with
    2000 draws its standard error is measured, and |mean - exact| < 6 standard
    errors for all 48*40 elements fails by chance with probability below 2e-6
    (Gaussian tail, union bound). Round-to-nearest on the same inputs is biased
    far beyond that bound (checked, so the test can fail).
    """
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    w_q, w_s = quantize(torch.randn(64, 40, generator=gen, dtype=torch.float64), "row", "e2m1")
    exact = g @ (w_q * w_s)
    torch.manual_seed(0)
    draws = torch.stack([requantized_input_gradient(g, w_q, w_s, ("e2m1", "block16", "stochastic"))
                         for _ in range(2000)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() < 6 * stderr + 1e-12).all()
    nearest = requantized_input_gradient(g, w_q, w_s, ("e2m1", "block16", "nearest"))
    assert ((nearest - exact).abs() > 6 * stderr + 1e-12).float().mean() > 0.5


def test_gradient_quantizer_reached_by_the_route():
    """The route's dY operand is exactly quantize_gradient's block16 FP4 values times scales."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    w = torch.eye(32, dtype=torch.float64)
    ones = torch.ones(32, 1, dtype=torch.float64)
    values, scale = quantize_gradient(g, "e2m1", granularity="block16", rounding="nearest")
    got = requantized_input_gradient(g, w, ones, ("e2m1", "block16", "nearest"))
    assert torch.equal(got, values * scale)


@pytest.mark.slow
def test_nvfp4_under_inductor_is_seeded_and_reported():
    """One Inductor compile of the cpu-preset block shape: report, generated code, seeded reproducibility."""
    from torch._inductor.utils import run_and_get_code

    def train(seed: int, compiled, model, steps: int = 3):
        torch.manual_seed(0)
        for p, init in zip(model.parameters(), initial):
            p.data.copy_(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(seed)
        losses = []
        x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(0))
        for _ in range(steps):
            loss = compiled(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
    initial = [p.detach().clone() for p in model.parameters()]
    compiled = _compiled_run(model, "fp4", {"recipe": "nvfp4"})
    (losses_a, params_a), code = run_and_get_code(lambda: train(11, compiled, model))
    losses_b, params_b = train(11, compiled, model)
    losses_c, params_c = train(12, compiled, model)
    assert all(math.isfinite(v) for v in losses_a) and losses_a[-1] < losses_a[0]
    assert losses_a == losses_b and all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert any(not torch.equal(a, c) for a, c in zip(params_a, params_c))
    sites = [s for r in fp4compile.reports() for s in r.quantized]
    assert len(sites) == 2
    row = fp4compile.reports()[0].sites[0].row(fp4compile.reports()[0].config)
    assert row["weight"] == "e2m1/block16x16" and row["activation"] == "e2m1/block16"
    assert row["gradient"] == "e2m1/block16/stochastic, RHT16 (seed 0)"
    assert all("re-quantized" in s.lowering for s in sites)
    # Inductor generated the stochastic rounding (its RNG) and no high-precision fallback ran.
    text = "\n".join(code)
    assert "rand" in text
    fp4compile.reset()


def test_recipes_train_the_llama_model():
    """Our LLaMA (tiny preset: dim 64, ffn 128, every block size divides them): one step per recipe, finite."""
    from fp4compile.training.models import Llama, preset

    for recipe in ("nvfp4", "mxfp4"):
        torch.manual_seed(0)
        model = Llama(preset("tiny"))
        compiled = torch.compile(model, backend="fp4_eager", options={"recipe": recipe})
        idx = torch.randint(0, 256, (2, 24))
        logits = compiled(idx)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx.reshape(-1))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        report = fp4compile.reports()[-1]
        assert len(report.quantized) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 blocks
        torch._dynamo.reset()
        fp4compile.reset()


def test_recipes_train_a_hugging_face_llama():
    """A Hugging Face LlamaForCausalLM (random init): one step per recipe, finite gradients, sites reported."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    for recipe in ("nvfp4", "mxfp4"):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        compiled = torch.compile(model, backend="fp4_eager", options={"recipe": recipe})
        idx = torch.randint(0, 128, (2, 24))
        loss = compiled(input_ids=idx, labels=idx).loss
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        sites = [s for r in fp4compile.reports() for s in r.quantized]
        assert len(sites) == 7 * 2
        assert {s.module_path for s in sites} >= {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
        torch._dynamo.reset()
        fp4compile.reset()
