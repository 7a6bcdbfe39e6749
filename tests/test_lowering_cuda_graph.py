"""The CUDA lowering's graph surgery, runnable without a GPU.

`target="cuda"` forces the CUDA lowering on CPU tensors: the GEMM stays the
reference op (no FP8 tensor cores here, and the report says so) and the OCC clamp
becomes the Triton-threshold op, which falls back to the reference forward off
CUDA, and the compensation becomes the channel-GEMM op (`cuda_compensation`),
which computes the reference's sums in another order. The compiled model must then equal the semantic graph in float64, and the
report must name the lowering. (On a GPU, `tests/test_cuda_path.py` checks the
FP8 GEMMs themselves.)
"""
import pytest
import torch

import fp4compile

from .toy_models import NanoGPT

pytestmark = pytest.mark.slow


def _loss_and_grads(model, backend, options, idx):
    torch._dynamo.reset()
    fp4compile.reset()
    model.zero_grad()
    loss = torch.compile(model, backend=backend, options=options)(idx).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()], fp4compile.reports()


def test_cuda_lowering_on_cpu_tensors_equals_semantic_graph_float64():
    torch.manual_seed(3)
    model = NanoGPT(n_layer=1).double()
    idx = torch.randint(0, 64, (2, 16))
    options = {"recipe": "paper", "target": "cuda", "cuda_size_policy": False}
    loss, grads, reports = _loss_and_grads(model, "fp4", options, idx)
    ref_loss, ref_grads, _ = _loss_and_grads(model, "fp4_aot_eager", {"recipe": "paper"}, idx)
    sites = reports[0].quantized
    assert sites and all(site.lowering.startswith("cuda: float32 GEMMs") for site in sites)
    assert all("Triton OCC thresholds" in site.lowering for site in sites)
    assert all("channel-GEMM OCC compensation" in site.lowering for site in sites)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for g, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)
