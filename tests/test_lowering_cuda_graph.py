"""The CUDA lowering's graph surgery, runnable without a GPU.

`target="cuda"` forces the CUDA lowering on CPU tensors: the GEMMs run as the
reference products (no FP8 tensor cores here, and the report says so).

- `cuda_compensation="channels"`: the OCC clamp becomes the Triton-threshold op
  (the reference forward off CUDA) and the compensation the channel-GEMM op,
  which computes the reference's sums in another order: the lowered model
  must equal the semantic graph in float64.
- `cuda_compensation="fp8_folded"` (default): each activation's clamp,
  quantize and compensation become one folded-activation op (E4M3 codes of
  x_q + r / x_s) feeding the folded GEMM op. Not exact by design (outlier
  entries carry E4M3 rounding, bounded per op in tests/test_cuda_path.py): at
  model level its gradients must lie at least 2x closer to the exactly compensated
  semantic graph than the semantic graph without compensation does.

The report must name the lowering. (On a GPU, `tests/test_cuda_path.py` checks
the FP8 GEMMs themselves.)
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


@pytest.fixture(scope="module")
def model_and_reference():
    torch.manual_seed(3)
    model = NanoGPT(n_layer=1).double()
    idx = torch.randint(0, 64, (2, 16))
    return model, idx, _loss_and_grads(model, "fp4_aot_eager", {"recipe": "paper"}, idx)


def test_cuda_lowering_channels_on_cpu_tensors_equals_semantic_graph_float64(model_and_reference):
    model, idx, (ref_loss, ref_grads, _) = model_and_reference
    options = {"recipe": "paper", "target": "cuda", "cuda_size_policy": False, "cuda_compensation": "channels"}
    loss, grads, reports = _lowered_eager_loss_and_grads(model, options, idx)
    sites = reports[0].quantized
    assert sites and all(site.lowering.startswith("cuda: float32 GEMMs") for site in sites)
    assert all("Triton OCC thresholds" in site.lowering for site in sites)
    assert all("channel-GEMM OCC compensation" in site.lowering for site in sites)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    for g, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def _lowered_eager_loss_and_grads(model, options, idx):
    """The fp4 backend's CUDA-lowered graph run by AOTAutograd without Inductor (no C++ compile).

    The lowering is what is under test here, for both compensations; Inductor compiling the
    folded graph is covered by the float32 `target="cuda"` compile of tests/test_robustness.py,
    and both compensations through Inductor on a GPU by tests/test_cuda_path.py.
    """
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fp4compile.backend import prepare

    def backend(gm, example_inputs):
        prepare(gm, example_inputs, options, "fp4", lower=True)
        keep = lambda g, _inputs: make_boxed_func(g.forward)  # noqa: E731
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    return _loss_and_grads(model, backend, None, idx)


def test_cuda_lowering_folded_on_cpu_tensors_close_to_semantic_graph_float64(model_and_reference):
    model, idx, (ref_loss, ref_grads, _) = model_and_reference
    options = {"recipe": "paper", "target": "cuda", "cuda_size_policy": False}
    loss, grads, reports = _lowered_eager_loss_and_grads(model, options, idx)
    sites = reports[0].quantized
    assert sites and all("folded into the E4M3 activation codes" in site.lowering for site in sites)
    _, nocomp_grads, _ = _loss_and_grads(model, "fp4_aot_eager", {"recipe": "paper", "occ_compensate": False}, idx)

    def rel(gs):
        num = sum(float((g - r).norm() ** 2) for g, r in zip(gs, ref_grads))
        return (num / sum(float(r.norm() ** 2) for r in ref_grads)) ** 0.5

    assert torch.isfinite(loss) and abs(float(loss - ref_loss)) <= 1e-2 * abs(float(ref_loss))
    # The folded compensation keeps the gradients at least 2x closer to the exactly compensated
    # ones than no compensation does (about 2.5x on this model: the E4M3 rounding of the outliers
    # also flips downstream FP4/E5M2 codes, which a whole-model gradient accumulates).
    assert rel(grads) < 0.5 * rel(nocomp_grads), (rel(grads), rel(nocomp_grads))
