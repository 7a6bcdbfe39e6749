"""fp4_linear_reference: finite-difference checks of the smooth parts (float64),
exact agreement with F.linear in high precision, and the backward formulas of
SPEC.md section 5 written out independently."""
import pytest
import torch
import torch.nn.functional as F

from fp4compile import Fp4Config, dge_grad_scale, fake_quantize, fp4_linear_reference, occ_clamp, quantize
from fp4compile.runtime.reference import Fp4LinearReference

HP = Fp4Config.from_recipe("bf16")


def test_high_precision_config_is_exactly_f_linear():
    x = torch.randn(4, 6, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True)
    y = fp4_linear_reference(x, w, b, HP)
    y_ref = F.linear(x, w, b)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    assert all(torch.equal(a, c) for a, c in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)))


def test_function_plumbing_gradcheck_in_float64():
    # The autograd.Function itself with every quantizer off: its backward must be
    # the exact derivative, which finite differences check.
    cfg = Fp4Config(recipe="bf16", weight_fmt=None, act_fmt=None, grad_fmt=None, dge_clamp=None, occ_alpha=None)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: Fp4LinearReference.apply(x, w, b, cfg), (x, w, b))


def test_dge_weight_gradient_is_finite_difference_of_surrogate():
    # Weight-only FP4 with DGE: dL/dW must equal the derivative of the smooth
    # surrogate f(W / s) * s with the per-row scale s held fixed.
    from fp4compile.runtime.dge import dge_surrogate

    torch.manual_seed(0)
    cfg = Fp4Config(recipe="w", act_fmt=None, grad_fmt=None, occ_alpha=None)
    x = torch.randn(6, 16, dtype=torch.float64)
    w = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 8, dtype=torch.float64)
    (grad_w,) = torch.autograd.grad(fp4_linear_reference(x, w, None, cfg), w, g)
    _, scale = quantize(w.detach())

    def surrogate_loss(w_):
        return (F.linear(x, dge_surrogate(w_ / scale, k=5.0) * scale) * g).sum()

    w_leaf = w.detach().clone().requires_grad_()
    (fd_like,) = torch.autograd.grad(surrogate_loss(w_leaf), w_leaf)
    slope = dge_grad_scale(w.detach() / scale)
    capped = slope >= 3.0  # the cap makes the surrogate's own derivative differ there
    assert torch.allclose(grad_w[~capped], fd_like[~capped], rtol=1e-9, atol=1e-12)
    # And a true central difference on one uncapped element.
    i, j = (~capped).nonzero()[0].tolist()
    h = 1e-6
    wp, wm = w.detach().clone(), w.detach().clone()
    wp[i, j] += h
    wm[i, j] -= h
    fd = (surrogate_loss(wp) - surrogate_loss(wm)) / (2 * h)
    assert abs(fd.item() - grad_w[i, j].item()) < 1e-5 * max(1, abs(fd.item()))


def _e5m2(t):
    # Per-tensor scale: the power of two at or above amax / 57344.
    import math

    amax = t.abs().max().item()
    s = 2.0 ** math.ceil(math.log2(amax / 57344)) if amax > 0 else 1.0
    return (t / s).to(torch.float8_e5m2).to(t.dtype) * s


@pytest.mark.parametrize("shape", [((5, 64), 32), ((2, 3, 128), 48)])
def test_paper_recipe_matches_spec_formulas(shape):
    x_shape, n = shape
    torch.manual_seed(1)
    cfg = Fp4Config.from_recipe("paper")
    x = torch.randn(*x_shape, dtype=torch.float64)
    x[..., 5] *= 25
    x.requires_grad_()
    w = torch.randn(n, x_shape[-1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    y = fp4_linear_reference(x, w, b, cfg)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)

    x2 = x.detach().reshape(-1, x_shape[-1])
    g2 = g.reshape(-1, n)
    clamped, residual = occ_clamp(x2, alpha=0.99)
    xq, xs = quantize(clamped)
    wq, ws = quantize(w.detach())
    y_expected = F.linear(xq * xs, wq * ws, b.detach()) + residual @ (wq * ws).t()
    assert torch.allclose(y.reshape(-1, n), y_expected, rtol=1e-12, atol=1e-12)
    # Input gradient: E5M2 (per-tensor scale) of dY with W's row scale folded in, times W_q.
    assert torch.allclose(gx.reshape(-1, x_shape[-1]), _e5m2(g2 * ws.t()) @ wq, rtol=1e-12, atol=1e-12)
    # Weight gradient: the E5M2 gradient (activation row scale folded in) times the
    # compensated activation in the scaled domain, x_q + residual / x_s, then times DGE.
    # (The residual's term uses the same E5M2 operand as the main term: SPEC.md section 5.)
    g_e5m2 = _e5m2(g2.t() * xs.t())
    gw_expected = (g_e5m2 @ xq + g_e5m2 @ (residual / xs)) * dge_grad_scale(w.detach() / ws)
    # The high-precision gradient on the residual term would differ: the test can tell.
    gw_other = (g_e5m2 @ xq + g2.t() @ residual) * dge_grad_scale(w.detach() / ws)
    assert not torch.allclose(gw_other, gw_expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gw, gw_expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gb, g2.sum(0), rtol=1e-12)


@pytest.mark.parametrize("recipe", ["paper", "fp4-direct", "w4a8", "w8a4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_recipes_run_in_every_dtype_and_approximate_linear(recipe, dtype):
    torch.manual_seed(2)
    x = torch.randn(16, 64).to(dtype).requires_grad_()
    w = (torch.randn(32, 64) * 0.1).to(dtype).requires_grad_()
    y = fp4_linear_reference(x, w, None, Fp4Config.from_recipe(recipe))
    assert y.dtype == dtype and y.shape == (16, 32)
    ref = F.linear(x.float(), w.float())
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel < (0.05 if recipe == "fp8" else 0.3)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_fake_quantize_of_weight_is_what_the_forward_uses():
    cfg = Fp4Config.from_recipe("fp4-direct")
    x = torch.randn(4, 32, dtype=torch.float64)
    w = torch.randn(8, 32, dtype=torch.float64)
    y = fp4_linear_reference(x, w, None, cfg)
    assert torch.allclose(y, F.linear(fake_quantize(x), fake_quantize(w)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope", ["row", "tensor"])
@pytest.mark.parametrize("recipe", ["paper", "w8a4"])
def test_graph_ops_compose_to_the_reference(scope, recipe):
    # The five ops the pass inserts (sparse-residual compensation included) against
    # the one-piece reference, with enough outliers that the compensation matters.
    from fp4compile.runtime.linear_ops import quantized_linear

    torch.manual_seed(4)
    cfg = Fp4Config.from_recipe(recipe, occ_alpha=0.97, occ_scope=scope)
    x = torch.randn(3, 7, 256, dtype=torch.float64)
    x[..., [3, 77]] *= 30
    x.requires_grad_()
    w = torch.randn(48, 256, dtype=torch.float64, requires_grad=True)
    b = torch.randn(48, dtype=torch.float64, requires_grad=True)
    y_ref = fp4_linear_reference(x, w, b, cfg)
    y_ops = quantized_linear(x, w, b, cfg)
    assert torch.allclose(y_ops, y_ref, rtol=1e-12, atol=1e-12)
    comp_off = fp4_linear_reference(x, w, b, cfg.replace(occ_compensate=False))
    assert not torch.allclose(comp_off, y_ref, rtol=1e-3)  # the compensation is non-trivial here
    g = torch.randn_like(y_ref)
    for a, c in zip(torch.autograd.grad(y_ops, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        assert torch.allclose(a, c, rtol=1e-11, atol=1e-11)
