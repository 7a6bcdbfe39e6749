"""The CUDA size policy (`fp4compile.lowering.cuda_policy`) against the roofline model and in the pass.

The policy runs inside dynamo, so it predicts from a closed form instead of the
lowered graph the roofline model (`fp4compile.inspection.roofline`) walks. These
tests check that the two agree (per recipe, on the five standard shapes and a
grid of others, at full and partial compensation coverage): a lowering change
that adds or drops a kernel changes the roofline's graph and fails here until
the closed form follows. Then that the pass keeps a small layer in high
precision on target "cuda" with the modelled ratio as its reason, quantizes a
large one, and changes nothing on target "cpu" or with `cuda_size_policy=False`.

The site-level tests trace on the meta device: the policy only needs the
traced shapes, and an 8192-token layer of these widths would take minutes to
run on a CPU.
"""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

import fp4compile
from fp4compile import backend as fp4_backend_module
from fp4compile.config import Fp4Config
from fp4compile.inspection import roofline
from fp4compile.lowering import cuda_policy

# Configs whose CUDA lowering both models cover: the named recipes plus OCC without compensation.
CONFIGS = {
    "fp8": {},
    "fp4-direct": {},
    "paper": {},
    "w4a8": {},
    "w8a4": {},
    "paper, occ_compensate=False": {"occ_compensate": False},
    "paper, channels": {"cuda_compensation": "channels"},
}
GRID = list(itertools.product((256, 1000, 4096, 20000), (512, 2048, 11008), (128, 1024, 5120)))


@pytest.fixture(scope="module")
def graphs():
    out = {"bf16": roofline.lowered_linear_graph("bf16")[0]}
    for name, overrides in CONFIGS.items():
        out[name] = roofline.lowered_linear_graph(name.split(",")[0], overrides=overrides)[0]
    return out


def _config(name):
    return Fp4Config.from_recipe(name.split(",")[0], **CONFIGS[name])


def _graph_seconds(graphs, name, m, k, n, coverage):
    recipe = name.split(",")[0]
    shape = roofline.layer_shape("bf16" if name == "bf16" else recipe, m, k, n, coverage)
    return roofline.Prediction(name, (m, k, n), roofline.kernels_of_graph(graphs[name], shape))


def test_rates_are_the_roofline_models():
    assert cuda_policy.H200_RATES == roofline.H200_RATES


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("coverage", [1.0, 0.435])
def test_closed_form_equals_graph_roofline(graphs, name, coverage):
    config = _config(name)
    assert cuda_policy.modelled(config)
    for m, k, n in list(roofline.STANDARD_SHAPES) + GRID:
        base = _graph_seconds(graphs, "bf16", m, k, n, coverage)
        pred = _graph_seconds(graphs, name, m, k, n, coverage)
        closed = cuda_policy.quantized_kernels(config, m, k, n, coverage)
        where = f"{name} at {(m, k, n)}, coverage {coverage}\n{roofline.kernel_listing(pred)}"
        # The same kernels: as many memory passes and GEMMs, the same bytes and FLOPs in total.
        assert sum(1 for _, f, _ in closed if not f) == pred.memory_passes(), where
        assert sorted((f, u) for _, f, u in closed if f) == sorted((g.flops, g.unit) for g in pred.gemms()), where
        assert sum(b for b, _, _ in closed) == pytest.approx(pred.bytes_moved(), rel=1e-9), where
        assert cuda_policy.seconds(closed) == pytest.approx(pred.seconds(), rel=0.01), where
        ratio = cuda_policy.predicted_ratio(config, m, k, n, coverage)
        assert ratio == pytest.approx(base.seconds() / pred.seconds(), rel=0.01), where


def test_standard_table_ratios_from_the_closed_form(graphs):
    """The published roofline ratios (fp8 1.30-1.64x, 0.70x on the small shape) come out of the closed form."""
    rows = roofline.ratio_table(roofline.predict(["bf16", "fp8", "paper"], graphs=graphs))
    for row in rows:
        m, k, n = row["shape"]
        for recipe in ("fp8", "paper"):
            expected = row["recipes"][recipe]["ratio_to_bf16"]
            got = cuda_policy.predicted_ratio(Fp4Config.from_recipe(recipe), m, k, n)
            assert got == pytest.approx(expected, rel=0.01), (recipe, row["shape"])


def test_break_even_brackets_one():
    config = Fp4Config.from_recipe("fp8")
    for k, n in ((4096, 4096), (4096, 1024), (2048, 2048)):
        m = cuda_policy.break_even_tokens(config, k, n)
        assert m is not None and m > 1
        assert cuda_policy.predicted_ratio(config, m, k, n) >= 1.0
        assert cuda_policy.predicted_ratio(config, m - 1, k, n) < 1.0
    # Narrow layers never reach BF16: the passes over M*K outgrow the GEMM saving over M*K*N.
    for k, n in ((2048, 1024), (4096, 256)):
        assert cuda_policy.break_even_tokens(config, k, n) is None
        assert cuda_policy.predicted_ratio(config, cuda_policy.MAX_BREAK_EVEN_TOKENS, k, n) < 1.0


def test_unmodelled_configs_have_no_prediction():
    for overrides in ({"act_granularity": "block32"}, {"grad_fmt": None}, {"occ_scope": "tensor"}):
        config = Fp4Config.from_recipe("paper", **overrides)
        assert cuda_policy.predicted_ratio(config, 4096, 4096, 4096) is None
        assert cuda_policy.size_policy_reason(config, (4096,), 4096, 4096) == ""


def test_bad_size_hint_falls_back_to_the_default():
    class NoHint:
        node = None

    assert cuda_policy.token_hint((2, 3)) == (6, False)
    assert cuda_policy.token_hint((2, NoHint())) == (cuda_policy.DEFAULT_TOKENS, True)


# ---- the policy in the pass ---------------------------------------------------------


class Widths(nn.Module):
    """Two wide projections (4096 -> 14336 -> 4096) and a narrow head (4096 -> 1024)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4096, 14336, bias=False)
        self.down = nn.Linear(14336, 4096, bias=False)
        self.narrow = nn.Linear(4096, 1024, bias=False)

    def forward(self, x):
        return self.narrow(self.down(torch.relu(self.up(x))))


def _reasons(options, tokens, dynamic=False):
    """{module: reason} of the pass on Widths traced on meta tensors of `tokens` rows."""
    reports = []

    def capture(gm, example_inputs):
        original = copy.deepcopy(gm)  # run the untouched graph on the meta tensors
        reports.append(fp4_backend_module.prepare(gm, example_inputs, options, "fp4"))
        return original.forward

    torch._dynamo.reset()
    fp4compile.reset()
    model = Widths().to(device="meta", dtype=torch.bfloat16)
    x = torch.empty(tokens, 4096, device="meta", dtype=torch.bfloat16)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    torch.compile(model, backend=capture, dynamic=dynamic or None)(x)
    torch._dynamo.reset()
    fp4compile.reset()
    (report,) = reports
    return {s.module_path: s.reason for s in report.sites}


def test_cuda_target_keeps_the_layer_modelled_slower_than_bf16():
    reasons = _reasons({"recipe": "fp8", "target": "cuda"}, tokens=8192)
    assert reasons["up"] == "" and reasons["down"] == ""  # modelled 1.54x and 1.50x BF16
    config = Fp4Config.from_recipe("fp8")
    ratio = cuda_policy.predicted_ratio(config, 8192, 4096, 1024)
    even = cuda_policy.break_even_tokens(config, 4096, 1024)
    assert ratio < 1 and even > 8192
    shown = math.floor(ratio * 100) / 100  # printed rounded down, so never "1.00x"
    assert reasons["narrow"] == (f"CUDA size policy: modelled {shown:.2f}x of BF16 at M=8192, K=4096, N=1024 "
                                 f"(break-even at M >= {even} tokens; cuda_size_policy=False quantizes it)")


def test_symbolic_tokens_use_the_size_hint():
    reasons = _reasons({"recipe": "fp8", "target": "cuda"}, tokens=512, dynamic=True)
    # At 512 tokens even the wide layers are modelled slower than BF16; M is the traced size hint.
    assert all("M=512 (size hint)" in reasons[name] for name in ("up", "down", "narrow")), reasons


def test_paper_channels_is_judged_at_full_coverage():
    reasons = _reasons({"recipe": "paper", "target": "cuda", "cuda_compensation": "channels"}, tokens=8192)
    # Modelled 1.05x (4096 -> 14336) and 1.19x (14336 -> 4096) at coverage 1: quantized.
    assert reasons["up"] == "" and reasons["down"] == ""
    assert reasons["narrow"].startswith("CUDA size policy: modelled ")


def test_paper_folded_is_judged_by_its_own_kernels():
    """The folded compensation costs less than the channel path: at 8192 tokens every layer is
    quantized (the narrow one too, modelled above 1x), at 1536 tokens only the narrow one is kept."""
    config = Fp4Config.from_recipe("paper")
    assert cuda_policy.predicted_ratio(config, 8192, 4096, 1024) > 1.0
    assert _reasons({"recipe": "paper", "target": "cuda"}, tokens=8192) == {"up": "", "down": "", "narrow": ""}
    even = [cuda_policy.break_even_tokens(config, k, n) for k, n in ((4096, 14336), (14336, 4096), (4096, 1024))]
    assert max(even[:2]) <= 1536 < even[2]
    reasons = _reasons({"recipe": "paper", "target": "cuda"}, tokens=1536)
    assert reasons["up"] == "" and reasons["down"] == ""
    assert reasons["narrow"].startswith("CUDA size policy: modelled ")


@pytest.mark.parametrize("options", [{"recipe": "fp8", "target": "cpu"},
                                     {"recipe": "fp8", "target": "cuda", "cuda_size_policy": False}])
def test_cpu_target_or_policy_off_changes_nothing(options):
    reasons = _reasons(options, tokens=8192)
    assert reasons == {"up": "", "down": "", "narrow": ""}
