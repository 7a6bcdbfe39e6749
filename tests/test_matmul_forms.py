"""Every matmul form the site finder takes, value-checked against the reference.

Non-square weights (a transposed weight then has the wrong shape and fails, or
multiplies the wrong dimension and differs), float64 so that the comparison
is to summation order (FP4 with DGE is discontinuous: float32 would prove
nothing), forward output and the gradients of the activation, every weight and
every bias. The semantic graph (`fp4_eager`) and the CPU-lowered Inductor graph
(`fp4`) are both checked, on `paper` (OCC + DGE) and `fp4-direct`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4compile
from fp4compile import Fp4Config, fp4_linear_reference

K, TOKENS = 48, 12
# (name, out features, weight stored as [out, in] or [in, out])
FORMS = {
    "linear": (40, "out_in"),  # F.linear(x, W, b)
    "matmul_t": (56, "out_in"),  # x @ W.t()
    "torch_matmul_T": (24, "out_in"),  # torch.matmul(x, W.T)
    "matmul_io": (72, "in_out"),  # x @ W, W [in, out]
    "addmm_io": (32, "in_out"),  # addmm(b, x, W)
    "addmm_t": (64, "out_in"),  # addmm(b, x, W.t())
    "addmm_alpha_beta": (80, "in_out"),  # addmm(b, x, W, beta=0.5, alpha=2)
    "mm_t": (88, "out_in"),  # torch.mm(x, W.t())
    "left": (104, "out_in"),  # W @ x^T
    "left_t": (120, "in_out"),  # W.t() @ x^T, W [in, out]
    "left_torch_matmul": (16, "out_in"),  # torch.matmul(W, x^T)
}
HAS_BIAS = {"linear", "addmm_io", "addmm_t", "addmm_alpha_beta"}


class AllFormsNonSquare(nn.Module):
    def __init__(self, forms=tuple(FORMS)):
        super().__init__()
        self.forms = forms
        gen = torch.Generator().manual_seed(0)
        for name, (n, layout) in FORMS.items():
            shape = (n, K) if layout == "out_in" else (K, n)
            self.register_parameter(name, nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) / K**0.5))
            if name in HAS_BIAS:
                self.register_parameter(f"{name}_b", nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)))

    def forward(self, x):  # x: [batch, tokens, K]
        x2d = x.reshape(-1, K)
        x_t = x.transpose(-2, -1)  # [batch, K, tokens]
        p = dict(self.named_parameters())
        outs = {
            "linear": lambda: F.linear(x, p["linear"], p["linear_b"]),
            "matmul_t": lambda: x @ p["matmul_t"].t(),
            "torch_matmul_T": lambda: torch.matmul(x, p["torch_matmul_T"].T),
            "matmul_io": lambda: x @ p["matmul_io"],
            "addmm_io": lambda: torch.addmm(p["addmm_io_b"], x2d, p["addmm_io"]),
            "addmm_t": lambda: torch.addmm(p["addmm_t_b"], x2d, p["addmm_t"].t()),
            "addmm_alpha_beta": lambda: torch.addmm(p["addmm_alpha_beta_b"], x2d, p["addmm_alpha_beta"],
                                                    beta=0.5, alpha=2.0),
            "mm_t": lambda: torch.mm(x2d, p["mm_t"].t()),
            "left": lambda: p["left"] @ x_t,
            "left_t": lambda: p["left_t"].t() @ x_t,
            "left_torch_matmul": lambda: torch.matmul(p["left_torch_matmul"], x_t),
        }
        return {name: outs[name]() for name in self.forms}


def reference_outputs(model: AllFormsNonSquare, x, config):
    """Each form as fp4_linear_reference on (activation [..., K], weight [out, in])."""
    p = dict(model.named_parameters())
    x2d = x.reshape(-1, K)

    def ref(act, name, bias=None):
        w = p[name] if FORMS[name][1] == "out_in" else p[name].t()
        return fp4_linear_reference(act, w, bias, config)

    return {
        "linear": ref(x, "linear", p["linear_b"]),
        "matmul_t": ref(x, "matmul_t"),
        "torch_matmul_T": ref(x, "torch_matmul_T"),
        "matmul_io": ref(x, "matmul_io"),
        "addmm_io": ref(x2d, "addmm_io", p["addmm_io_b"]),
        "addmm_t": ref(x2d, "addmm_t", p["addmm_t_b"]),
        "addmm_alpha_beta": 2.0 * ref(x2d, "addmm_alpha_beta") + 0.5 * p["addmm_alpha_beta_b"],
        "mm_t": ref(x2d, "mm_t"),
        "left": ref(x, "left").transpose(-2, -1),
        "left_t": ref(x, "left_t").transpose(-2, -1),
        "left_torch_matmul": ref(x, "left_torch_matmul").transpose(-2, -1),
    }


def _outputs_and_grads(fn, model, x, cotangents):
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    outs = fn(x)
    loss = sum((outs[name] * cotangents[name]).sum() for name in model.forms)
    loss.backward()
    grads = {"x": x.grad.clone(), **{n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}}
    return {k: v.detach().clone() for k, v in outs.items()}, grads


@pytest.fixture(autouse=True)
def _fresh():
    fp4compile.reset()
    yield
    fp4compile.reset()


# Under Inductor only the forms whose rewrite adds nodes around the GEMM (the left
# operand's transposes, addmm's alpha/beta) and one plain form: the CPU lowering
# treats every GEMM alike, and each extra site costs compile time.
INDUCTOR_FORMS = ("linear", "addmm_alpha_beta", "left_t")


@pytest.mark.parametrize("backend, recipe, forms", [
    ("fp4_eager", "paper", tuple(FORMS)), ("fp4_eager", "fp4-direct", tuple(FORMS)), ("fp4", "paper", INDUCTOR_FORMS)])
def test_every_form_matches_the_reference_forward_and_gradients(backend, recipe, forms):
    torch.manual_seed(3)
    model = AllFormsNonSquare(forms)
    # Heavy-tailed rows so that OCC clamps something in every row.
    x = torch.randn(2, TOKENS, K, dtype=torch.float64) * torch.exp(torch.randn(2, TOKENS, 1, dtype=torch.float64))
    x[0, 3, 5] = 40.0
    cotangents = {name: torch.randn_like(out) for name, out in model(x).items()}
    config = Fp4Config.from_recipe(recipe)
    compiled = torch.compile(model, backend=backend, options={"recipe": recipe})
    outs, grads = _outputs_and_grads(compiled, model, x, cotangents)
    ref_outs, ref_grads = _outputs_and_grads(
        lambda t: {n: o for n, o in reference_outputs(model, t, config).items() if n in forms}, model, x, cotangents)
    assert set(grads) == set(ref_grads) and len(ref_grads) == 1 + len(forms) + len(HAS_BIAS & set(forms))

    (report,) = fp4compile.reports()
    by_weight = {s.weight_name: s for s in report.sites}
    assert set(by_weight) == set(forms)
    assert all(s.quantized for s in report.sites), [(s.weight_name, s.reason) for s in report.sites]
    assert {n for n, s in by_weight.items() if s.weight_side == "left"} == {"left", "left_t", "left_torch_matmul"} & set(forms)
    for name, out in ref_outs.items():
        assert outs[name].shape == out.shape, name
        torch.testing.assert_close(outs[name], out, rtol=1e-10, atol=1e-10, msg=f"forward of {name}")
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")
    # Against the unquantized model the outputs differ by FP4 error, far above the tolerance above.
    plain = model(x)
    assert max((plain[n] - ref_outs[n]).abs().max().item() for n in forms) > 1e-3


def test_left_operand_times_a_vector_is_reported_not_quantized():
    class WeightTimesVector(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(24, K))

        def forward(self, v):
            return self.w @ v

    model = WeightTimesVector()
    v = torch.randn(K)
    out = torch.compile(model, backend="fp4_eager")(v)
    torch.testing.assert_close(out, model.w @ v)
    (site,) = fp4compile.reports()[0].sites
    assert not site.quantized and "vector" in site.reason


def test_addmm_alpha_zero_is_reported_with_its_reason():
    class AlphaZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(K, 24))
            self.b = nn.Parameter(torch.randn(24))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w, alpha=0.0)

    model = AlphaZero()
    x = torch.randn(5, K)
    torch.testing.assert_close(torch.compile(model, backend="fp4_eager")(x), model(x))
    (site,) = fp4compile.reports()[0].sites
    assert not site.quantized and "alpha=0" in site.reason
