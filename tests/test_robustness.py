"""What must hold for any model a user brings: bad values, ops the pass cannot take,
bad configuration, dynamic shapes, graph breaks, inference, activation checkpointing.

Most tests use `fp4_aot_eager` (the same pass and AOTAutograd tracing as `fp4`,
without Inductor's slow CPU compile); one runs the full backend.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import fp4compile
from fp4compile import Fp4Config

BACKEND = "fp4_aot_eager"


@pytest.fixture(autouse=True)
def _fresh():
    fp4compile.reset()
    yield
    fp4compile.reset()


class MLP(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _quantized_count():
    return sum(len(r.quantized) for r in fp4compile.reports())


# ---- bad values ---------------------------------------------------------------

def test_nan_and_inf_propagate_never_become_finite():
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=BACKEND)
    x = torch.randn(6, 32)
    x[1, 3] = float("nan")
    x[4, 7] = float("inf")
    y = compiled(x)
    assert _quantized_count() == 2
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[4]).all()
    assert torch.isfinite(y[[0, 2, 3, 5]]).all()  # other tokens unaffected
    with torch.no_grad():
        model.up.weight[5, 2] = float("nan")
    y = compiled(torch.randn(6, 32))
    assert not torch.isfinite(y).all()


@pytest.mark.parametrize("backend", [BACKEND, "fp4"])
def test_nan_weight_gets_a_nan_gradient_through_dge(backend):
    """DGE's factor is NaN where the scaled weight is NaN, by propagation alone
    (runtime/dge.py keeps no NaN mask): under Inductor's generated backward too.
    The loss leaves out the NaN output column, so dY there is 0 and only the
    factor can make that weight's gradient NaN; every other gradient stays finite."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        layer.weight[5, 2] = float("nan")
    compiled = torch.compile(layer, backend=backend, options={"recipe": "paper"})
    y = compiled(torch.randn(8, 32))
    keep = [c for c in range(16) if c != 5]
    y[:, keep].square().sum().backward()
    grad = layer.weight.grad
    assert math.isnan(grad[5, 2].item())
    finite = torch.ones_like(grad, dtype=torch.bool)
    finite[5, 2] = False
    assert torch.isfinite(grad[finite]).all()


def test_zero_rows_and_tensors_give_zeros_and_finite_gradients():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.up.bias.zero_()
        model.down.bias.zero_()
    compiled = torch.compile(model, backend=BACKEND)
    x = torch.randn(4, 32)
    x[2] = 0
    y = compiled(x)
    assert torch.equal(y[2], torch.zeros(32))
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()
    with torch.no_grad():
        model.up.weight.zero_()
    y = compiled(torch.randn(4, 32))
    y.square().sum().backward()
    assert torch.isfinite(model.up.weight.grad).all()


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
def test_huge_and_tiny_magnitudes_do_not_overflow(magnitude):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 32) * magnitude
    y = torch.compile(model, backend=BACKEND)(x)
    ref = model(x)
    assert torch.isfinite(y).all()
    rel = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < 0.5  # FP4 error, not garbage
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_trains(dtype):
    torch.manual_seed(0)
    model = MLP().to(dtype)
    y = torch.compile(model, backend=BACKEND)(torch.randn(8, 32, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters())
    assert _quantized_count() == 2


# ---- shapes and ops the pass cannot take --------------------------------------

class Untakeable(nn.Module):
    class UserFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.t()

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w, g.t() @ x

    def __init__(self):
        super().__init__()
        self.ok = nn.Linear(32, 32)
        self.user = nn.Linear(32, 32)
        self.w3 = nn.Parameter(torch.randn(2, 32, 32) * 0.1)
        self.complex_w = nn.Parameter(torch.randn(8, 32, dtype=torch.complex64), requires_grad=False)
        self.odd = nn.Linear(32, 24)

    def forward(self, x):
        h = self.ok(x)
        h = self.UserFn.apply(h, self.user.weight)
        z = torch.matmul(h.to(torch.complex64), self.complex_w.t()).real.sum()
        h3 = torch.matmul(h, self.w3).mean(0)
        return self.odd(h3) + z


def test_untakeable_sites_stay_high_precision_with_reasons_and_no_graph_break():
    torch.manual_seed(0)
    model = Untakeable()
    x = torch.randn(4, 32)
    y = torch.compile(model, backend=BACKEND, options={"target": "cuda", "cuda_size_policy": False})(x)
    reports = fp4compile.reports()
    assert len(reports) == 1  # no graph break of ours
    reasons = {s.weight_name: s.reason for s in reports[0].sites}
    assert reasons["ok.weight"] == ""
    assert "autograd.Function" in reasons["user.weight"]
    assert "3-D" in reasons["w3"]
    assert "complex64" in reasons["complex_w"]
    assert "multiples of 16" in reasons["odd.weight"]
    assert torch.isfinite(y).all()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0


# ---- bad configuration --------------------------------------------------------

BAD_OPTIONS = [
    ({"colour": "red"}, r"unknown option.*'colour'.*valid options: recipe"),
    ({"occ_alpha": 1.0}, r"occ_alpha=1\.0.*\(0\.5, 1\)"),
    ({"occ_alpha": 0.3}, r"occ_alpha=0\.3.*\(0\.5, 1\)"),
    ({"dge_k": 1.0}, r"dge_k=1\.0.*> 1"),
    ({"recipe": "fp3"}, r"recipe='fp3' does not exist; valid recipes: paper, fp4-direct, w4a8, w8a4, fp8, bf16"),
    ({"weight_granularity": "col"}, r"weight_granularity='col' is invalid; valid values: 'row', 'tensor'"),
    ({"skip": ("decoder.*",)}, r"skip pattern 'decoder\.\*' matches no module.*up, down"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_options_fail_at_first_compile_naming_option_and_valid_values(options, message):
    model = MLP()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    compiled = torch.compile(model, backend=BACKEND, options=options)  # nothing runs yet
    with pytest.raises(fp4compile.Fp4OptionsError, match=message) as caught:
        compiled(torch.randn(2, 32))
    assert type(caught.value) is fp4compile.Fp4OptionsError  # not dynamo's BackendCompilerFailed
    assert isinstance(caught.value, ValueError)
    assert fp4compile.reports() == []  # failed before any pass or computation
    if "skip" not in options:
        with pytest.raises(ValueError, match=message):
            Fp4Config.from_options(options)


def test_config_validates_eagerly():
    with pytest.raises(ValueError, match="dge_clamp"):
        Fp4Config(dge_clamp=-1.0)
    with pytest.raises(ValueError, match="occ_scope"):
        Fp4Config(occ_scope="column")
    with pytest.raises(ValueError, match="dge_clamp=3.0 needs weight_fmt='e2m1'"):
        Fp4Config(weight_fmt="e4m3")
    with pytest.raises(dataclass_frozen_error()):
        Fp4Config().occ_alpha = 0.5


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ---- dynamic shapes and recompiles --------------------------------------------

@pytest.mark.parametrize("dynamic", [None, True])
def test_varying_batch_and_sequence_compile_at_most_twice(dynamic):
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=BACKEND, dynamic=dynamic)
    for b, s in [(2, 8), (3, 17), (5, 9), (6, 33), (4, 64), (7, 5), (16, 128)]:
        compiled(torch.randn(b, s, 32)).sum().backward()
    assert 1 <= len(fp4compile.reports()) <= (1 if dynamic else 2)


def test_no_recompiles_beyond_dynamos_own():
    # Size-1 dimensions are specialised by dynamo itself (its "0/1 specialization"),
    # whatever the backend: the fp4 pass must add no compile of its own.
    from torch._dynamo.testing import CompileCounterWithBackend

    shapes = [(2, 8), (3, 17), (1, 33), (5, 1), (4, 64)]
    torch.manual_seed(0)
    model = MLP()
    plain = CompileCounterWithBackend("aot_eager")
    compiled_plain = torch.compile(model, backend=plain)
    for b, s in shapes:
        compiled_plain(torch.randn(b, s, 32)).sum().backward()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=BACKEND)
    for b, s in shapes:
        compiled(torch.randn(b, s, 32)).sum().backward()
    assert len(fp4compile.reports()) == plain.frame_count


def test_recipe_change_recompiles_and_reset_leaves_no_state():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(4, 32)
    y_paper = torch.compile(model, backend=BACKEND, options={"recipe": "paper"})(x)
    y_fp8 = torch.compile(model, backend=BACKEND, options={"recipe": "fp8"})(x)
    recipes = [r.config.recipe for r in fp4compile.reports()]
    assert recipes == ["paper", "fp8"]
    assert not torch.equal(y_paper, y_fp8)
    fp4compile.reset()
    assert fp4compile.reports() == []
    torch.compile(model, backend=BACKEND, options={"recipe": "w4a8"})(x)
    assert [r.config.recipe for r in fp4compile.reports()] == ["w4a8"]
    assert fp4compile.reports()[0].graph_id == 0


# ---- graph breaks in the user's model -----------------------------------------

class Breaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 32)

    def forward(self, x):
        x = self.a(x)
        print("fp4compile test: a graph break")  # noqa: T201
        x = self.b(x)
        if x.sum() > 0:  # data-dependent control flow: another break
            x = x * 2
        return self.c(x)


def test_graph_breaks_every_piece_quantized(capsys):
    torch.manual_seed(0)
    model = Breaky().double()
    x = torch.randn(4, 32, dtype=torch.float64)
    y = torch.compile(model, backend=BACKEND)(x)
    reports = fp4compile.reports()
    assert len(reports) >= 3
    assert {s.module_path for r in reports for s in r.quantized} == {"a", "b", "c"}
    # Equal to the eager reference model.
    cfg = Fp4Config.from_recipe("paper")
    ref = fp4compile.fp4_linear_reference
    h = ref(x, model.a.weight, model.a.bias, cfg)
    h = ref(h, model.b.weight, model.b.bias, cfg)
    h = h * 2 if h.sum() > 0 else h
    assert torch.allclose(y, ref(h, model.c.weight, model.c.bias, cfg), rtol=1e-12, atol=1e-12)


# ---- inference ----------------------------------------------------------------

def test_no_grad_and_inference_mode_save_nothing_for_backward():
    torch.manual_seed(0)
    model = MLP().eval()
    compiled = torch.compile(model, backend=BACKEND)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        with torch.no_grad():
            y = compiled(torch.randn(4, 32))
        assert y.grad_fn is None and not packed
        with torch.inference_mode():
            y2 = compiled(torch.randn(4, 32))
        assert y2.is_inference() and not packed
    assert _quantized_count() >= 2
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        compiled(torch.randn(4, 32, requires_grad=True))
    assert packed  # the training graph does save activations: the check can fail


# ---- activation checkpointing ---------------------------------------------------

class Checkpointed(nn.Module):
    def __init__(self, use_checkpoint):
        super().__init__()
        self.blocks = nn.ModuleList([MLP() for _ in range(2)])
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = x + (ckpt.checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x))
        return x


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Checkpointed(False).double()
    checkpointed = Checkpointed(True).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(6, 32, dtype=torch.float64)
    grads = []
    for model in (plain, checkpointed):
        fp4compile.reset()
        torch.compile(model, backend=BACKEND)(x).square().sum().backward()
        assert _quantized_count() == 4  # the blocks inside checkpoint regions are quantized too
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_full_backend_inference_mode_on_inductor():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        y = torch.compile(model, backend="fp4")(x)
    ref = fp4compile.fp4_linear_reference
    cfg = Fp4Config.from_recipe("paper")
    with torch.no_grad():
        expected = ref(torch.relu(ref(x, model.up.weight, model.up.bias, cfg)), model.down.weight, model.down.bias, cfg)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert _quantized_count() == 2
