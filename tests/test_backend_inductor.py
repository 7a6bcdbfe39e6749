"""The `fp4` backend through AOTAutograd + Inductor: numerics, generated code, caching.

Inductor compiles are slow on CPU, so each test compiles at most a couple of tiny
models; the float64 gradient comparison and the generated-code check share one.
"""
import copy
import uuid

import pytest
import torch

import fp4compile
from fp4compile import Fp4Config
from fp4compile.lowering import cache_key

from .code_markers import occ_thresholds_in_code
from .toy_models import NanoGPT, with_reference_linears

pytestmark = pytest.mark.slow


def _grads(model, run, idx):
    model.zero_grad()
    loss = run(idx).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def float64_run():
    """One Inductor compile of a float64 nanoGPT under the paper recipe, with its code."""
    from torch._inductor.utils import run_and_get_code

    fp4compile.reset()
    torch.manual_seed(0)
    model = NanoGPT().double()
    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, backend="fp4", options={"recipe": "paper"})
    (loss, grads), code = run_and_get_code(lambda: _grads(model, compiled, idx))
    reports = fp4compile.reports()
    yield model, idx, loss, grads, code, reports
    fp4compile.reset()


def test_inductor_gradients_equal_eager_ladder_and_reference_float64(float64_run):
    model, idx, loss, grads, _, _ = float64_run
    torch._dynamo.reset()
    eager_loss, eager_grads = _grads(model, torch.compile(model, backend="fp4_eager"), idx)
    ref_model = with_reference_linears(copy.deepcopy(model), Fp4Config.from_recipe("paper"))
    ref_loss, ref_grads = _grads(ref_model, ref_model, idx)
    assert torch.allclose(loss, eager_loss, rtol=1e-12) and torch.allclose(loss, ref_loss, rtol=1e-12)
    for g, ge, gr in zip(grads, eager_grads, ref_grads):
        assert torch.allclose(g, ge, rtol=1e-9, atol=1e-12)
        assert torch.allclose(g, gr, rtol=1e-9, atol=1e-12)


def test_generated_code_holds_the_quantization(float64_run):
    """A silent fallback to high precision must fail: look for our math in Inductor's code."""
    *_, code, reports = float64_run
    assert len(reports) == 1 and len(reports[0].quantized) == 8
    forward, backward = code[0], code[-1]
    assert occ_thresholds_in_code(forward)  # the OCC clamp thresholds
    assert "cpp_fused" in forward  # quantization fused into generated C++ kernels
    assert "Float8_e5m2" in backward  # E5M2 gradient casts in the backward GEMMs
    assert forward.count("extern_kernels.mm") + forward.count("extern_kernels.addmm") >= 8


def test_bf16_recipe_equals_plain_inductor():
    torch.manual_seed(1)
    model = NanoGPT(n_layer=1)  # one block: the claim does not depend on depth, and each compile halves
    idx = torch.randint(0, 64, (2, 16))
    fp4compile.reset()
    loss_a, grads_a = _grads(model, torch.compile(model, backend="fp4", options={"recipe": "bf16"}), idx)
    assert not fp4compile.reports()[0].quantized
    torch._dynamo.reset()
    loss_b, grads_b = _grads(model, torch.compile(model, backend="inductor"), idx)
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_source_hash_is_in_the_cache_key(monkeypatch):
    from torch._dynamo.utils import counters

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.fc(x).relu()

    torch.manual_seed(2)
    model, x = Tiny(), torch.randn(4, 32)

    def compile_once():
        torch._dynamo.reset()
        counters.clear()
        torch.compile(model, backend="fp4")(x).sum().backward()
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]

    compile_once()
    hits, misses = compile_once()
    assert hits >= 1 and misses == 0  # unchanged source: served from the cache
    edited = f"an edited fp4compile {uuid.uuid4()}"  # unique: the disk cache outlives a test run
    monkeypatch.setattr(cache_key, "source_hash", lambda: edited)
    hits, misses = compile_once()
    assert misses >= 1 and hits == 0  # an edit to the package invalidates it
