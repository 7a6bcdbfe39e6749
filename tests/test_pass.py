"""The site finder, the policy and the rewrite, run through the cheap fp4_eager backend."""
import copy

import pytest
import torch
import torch.nn as nn

import fp4compile
from fp4compile import Fp4Config

from .toy_models import AllForms, NanoGPT, with_reference_linears


@pytest.fixture(autouse=True)
def _fresh():
    fp4compile.reset()
    yield
    fp4compile.reset()


def _only_report():
    reps = fp4compile.reports()
    assert len(reps) == 1
    return reps[0]


def test_every_matmul_form_is_found_and_attention_is_not():
    torch.manual_seed(0)
    model = AllForms()
    x = torch.randn(2, 5, 32)
    y = torch.compile(model, backend="fp4_eager")(x)
    rep = _only_report()
    by_weight = {s.weight_name: s for s in rep.sites}
    assert set(by_weight) == {"lin.weight", "w_t", "w_T", "conv1d_w", "w_io", "fn_w"}
    assert by_weight["conv1d_w"].op == "addmm" and by_weight["conv1d_w"].weight_layout == "in_out"
    assert by_weight["w_io"].weight_layout == "in_out" and by_weight["w_t"].weight_layout == "out_in"
    assert by_weight["conv1d_w"].mkn()[1:] == (32, 64)
    assert rep.activation_matmuls == 2
    assert all(s.quantized for s in rep.sites)
    assert torch.isfinite(y).all()


def test_in_out_weights_are_scaled_per_output_column():
    # addmm(b, x, W[in, out]) must equal the reference on W.T (scales per output channel).
    torch.manual_seed(1)
    cfg = Fp4Config.from_recipe("fp4-direct")

    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32, 48, dtype=torch.float64))
            self.bias = nn.Parameter(torch.randn(48, dtype=torch.float64))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    m = Conv1D()
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    y = torch.compile(m, backend="fp4_eager", options={"recipe": "fp4-direct"})(x)
    y_ref = fp4compile.fp4_linear_reference(x, m.weight.t(), m.bias, cfg)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, m.weight, g)[0], torch.autograd.grad(y_ref, m.weight, g)[0])


def test_nanogpt_counts_and_graph_shows_inserted_nodes():
    torch.manual_seed(0)
    model = NanoGPT(n_layer=2)
    idx = torch.randint(0, 64, (2, 16))
    torch.compile(model, backend="fp4_eager")(idx)
    rep = _only_report()
    assert len(rep.sites) == 2 * 4 + 1
    assert len(rep.quantized) == 8
    lm_head = [s for s in rep.sites if s.module_path == "lm_head"][0]
    assert not lm_head.quantized and "skip list" in lm_head.reason
    assert rep.activation_matmuls == 4
    paths = {s.module_path for s in rep.quantized}
    assert "h.0.attn.c_attn" in paths and "h.1.c_proj" in paths
    inserted = [n for s in rep.quantized for n in s.inserted]
    assert any("occ_clamp" in n for n in inserted) and any("compensate" in n for n in inserted)
    assert any("quantize_weight" in n for n in inserted) and any("fp4_gemm" in n for n in inserted)


def test_policy_skip_min_features_and_cuda_alignment():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(64, 64)
            self.small = nn.Linear(64, 8)
            self.odd = nn.Linear(8, 24)

        def forward(self, x):
            return self.odd(self.small(self.big(x)))

    m, x = M(), torch.randn(4, 64)
    torch.compile(m, backend="fp4_eager", options={"min_features": 16, "skip": ("big",)})(x)
    reasons = {s.module_path: s.reason for s in _only_report().sites}
    assert reasons["big"].startswith("skip list")
    assert "min_features" in reasons["small"] and "min_features" in reasons["odd"]
    fp4compile.reset()
    torch.compile(m, backend="fp4_eager", options={"target": "cuda", "cuda_size_policy": False})(x)
    reasons = {s.module_path: s.reason for s in _only_report().sites}
    assert reasons["big"] == "" and "multiple" in reasons["small"] and "multiple" in reasons["odd"]


def test_eager_ladder_matches_reference_model_float64():
    torch.manual_seed(3)
    model = NanoGPT().double()
    ref_model = with_reference_linears(copy.deepcopy(model), Fp4Config.from_recipe("paper"))
    idx = torch.randint(0, 64, (2, 16))
    out = {}
    for name, m in (("fp4_eager", model), ("fp4_aot_eager", model), ("reference", ref_model)):
        m.zero_grad()
        run = m if name == "reference" else torch.compile(m, backend=name)
        loss = run(idx).logsumexp(-1).mean()
        loss.backward()
        out[name] = [p.grad.clone() for p in m.parameters()]
        torch._dynamo.reset()
    for name in ("fp4_aot_eager", "reference"):
        for a, b in zip(out["fp4_eager"], out[name]):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_state_dict_and_parameters_unchanged():
    model = NanoGPT()
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    compiled = torch.compile(model, backend="fp4_eager")
    compiled(torch.randint(0, 64, (1, 8)))
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    plain = NanoGPT()
    plain.load_state_dict(compiled.state_dict() if not hasattr(compiled, "_orig_mod") else compiled._orig_mod.state_dict())


def test_options_errors_name_the_option():
    m = nn.Linear(16, 16)
    with pytest.raises(fp4compile.Fp4OptionsError, match=r"occ_alpha=1\.5.*\(0\.5, 1\)"):
        torch.compile(m, backend="fp4_eager", options={"occ_alpha": 1.5})(torch.randn(2, 16))
    with pytest.raises(fp4compile.Fp4OptionsError, match="recipe='nope'.*valid recipes: paper"):
        torch.compile(m, backend="fp4_eager", options={"recipe": "nope"})(torch.randn(2, 16))
    with pytest.raises(fp4compile.Fp4OptionsError, match="unknown option.*'colour'.*valid options: recipe"):
        torch.compile(m, backend="fp4_eager", options={"colour": 1})(torch.randn(2, 16))
