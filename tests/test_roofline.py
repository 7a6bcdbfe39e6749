"""The traffic and roofline model (`fp4compile.inspection.roofline`) on the CUDA-lowered graph.

The model walks the graph the CUDA lowering produces (built here on CPU, as an
FP8 GPU would lower it) and maps each node to its kernels. These tests pin
what the graph must contain per quantized linear: the number of memory passes
(non-GEMM kernels) and the kind and number of GEMMs. A lowering change that
adds a pass (a lost fusion, an extra cast) or drops the FP8 GEMMs changes these
counts and fails here, without a GPU. They also check the model's arithmetic
against hand counts for one shape.
"""
import pytest
import torch

from fp4compile.inspection import roofline

SHAPE = (4096, 4096, 4096)


@pytest.fixture(scope="module")
def graphs():
    out = {recipe: roofline.lowered_linear_graph(recipe)[0] for recipe in roofline.RECIPES}
    out["paper-channels"] = roofline.lowered_linear_graph("paper", overrides={"cuda_compensation": "channels"})[0]
    return out


def _kinds(graph):
    return [getattr(n.target, "__name__", str(n.target)) for n in graph.nodes if n.op == "call_function"]


def _predict(graphs, recipe, shape=SHAPE, coverage=1.0):
    """`recipe` may be "paper-channels": paper lowered with cuda_compensation="channels"."""
    base = recipe.split("-channels")[0]
    p = roofline.predict([base], [shape], coverage=coverage, graphs={base: graphs[recipe]})[0]
    p.recipe = recipe
    return p


# Memory passes per quantized linear, fwd + bwd, of the CUDA lowering as it stands:
#   fp8 / fp4-direct: x amax+codes, W amax+codes, dW cast (3) + the FP8 GEMM op's backward:
#     two (amax, cast) pairs for the E5M2 gradient operands, two column-major FP8 copies,
#     the float32 -> bf16 cast of dx (7)                                            = 10
#   paper (cuda_compensation="fp8_folded", the default): one Triton pass per activation
#     (OCC + E2M1 + folded E4M3 codes from one read of x), W amax+codes, dW (DGE) cast (3)
#     + the folded GEMM op's backward: two (amax, cast) pairs, two column-major FP8
#     copies; dx is written in bf16 by its GEMM (6)                                  = 9
#   paper-channels (cuda_compensation="channels"): fp8's 10 + the Triton OCC pass (1) +
#     the channel compensation: forward counts/top-|C|, R[:, C] hi/lo, dequantized W, the
#     masked sparse rest; backward the bf16 gradient operand, R[:, C] / x_s, the masked
#     scatter, the dW sum (8) + the `y + compensation` add (1)                       = 20
# Lower these numbers when a fusion lands.
PINNED_PASSES = {"fp8": 10, "fp4-direct": 10, "paper": 9, "paper-channels": 20}


@pytest.mark.parametrize("recipe", ["fp8", "fp4-direct", "paper", "paper-channels"])
def test_memory_passes_per_quantized_linear_are_pinned(graphs, recipe):
    p = _predict(graphs, recipe)
    listing = roofline.kernel_listing(p)
    assert p.memory_passes() == PINNED_PASSES[recipe], listing


@pytest.mark.parametrize("recipe", ["fp8", "fp4-direct", "paper", "paper-channels"])
def test_three_fp8_gemms_and_no_float32_gemm_per_quantized_linear(graphs, recipe):
    kinds = _kinds(graphs[recipe])
    gemm_op = "folded_fp8_gemm_op" if recipe == "paper" else "fp8_gemm_op"
    assert kinds.count(gemm_op) == 1 and "fp4_gemm_op" not in kinds
    m, k, n = SHAPE
    gemms = _predict(graphs, recipe).gemms()
    fp8 = [g for g in gemms if g.unit == "fp8"]
    assert len(fp8) == 3 and all(g.flops == 2 * m * n * k for g in fp8)
    assert not [g for g in gemms if g.unit == "fp32"]
    if recipe == "paper-channels":  # the two channel GEMMs: bf16 hi/lo over 2|C| columns
        bf16 = [g for g in gemms if g.unit == "bf16"]
        cap = 128
        assert len(bf16) == 2 and all(g.flops == 2 * m * n * 2 * cap for g in bf16)
        assert kinds.count("channel_compensate_op") == 1 and "compensate_op" not in kinds
    else:  # the folded compensation: no compensation op, no clamp, no gather/scatter
        assert len(gemms) == 3
        assert not {"channel_compensate_op", "compensate_op", "occ_clamp_op", "triton_occ_clamp_op"} & set(kinds)
    if recipe == "paper":
        assert kinds.count("folded_activation_op") == 1 and "quantize_activation_op" not in kinds


def test_bf16_baseline_is_three_bf16_gemms_at_the_h200_rate(graphs):
    p = _predict(graphs, "bf16")
    m, k, n = SHAPE
    assert p.memory_passes() == 0 and len(p.gemms()) == 3
    # 3 GEMMs of 2MNK at 790 TFLOP/s each (compute-bound at this shape).
    assert p.seconds() == pytest.approx(3 * 2 * m * n * k / 790e12, rel=1e-12)


def test_fp8_activation_pass_bytes_by_hand(graphs):
    p = _predict(graphs, "fp8")
    m, k, n = SHAPE
    act = [kern for kern in p.kernels if kern.node == "quantize_activation_op"]
    # x (bf16) read twice (amax, then codes; K > 1024), codes (1 byte) and row scales written.
    assert len(act) == 1 and act[0].read == 2 * 2 * m * k and act[0].written == m * k + 4 * m


def test_sparse_rest_of_the_compensation_costs_by_its_share(graphs):
    """The masked sparse kernels always run (static graph); their gathers follow 1 - coverage."""
    full, half = _predict(graphs, "paper-channels", coverage=1.0), _predict(graphs, "paper-channels", coverage=0.5)
    assert half.memory_passes() == full.memory_passes()
    m, k, n = SHAPE
    c = full.kernels and roofline.layer_shape("paper", m, k, n).outliers_per_side
    rest_entries = 0.5 * m * 2 * c
    # Forward gathers a float32 W row and an index per live entry; backward a bf16 gradient
    # row, an index and one float32 atomic row.
    extra = rest_entries * ((8 + 4 * n) + (8 + 2 * n + 4 * n) + 4 * n)
    assert half.bytes_moved() - full.bytes_moved() == pytest.approx(extra, rel=1e-12)


def test_unknown_node_raises():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.sin, (x,)))
    with pytest.raises(ValueError, match="no CUDA plan"):
        roofline.kernels_of_graph(graph, roofline.LayerShape(16, 16, 16))


def test_sites_of_another_gemm_op_stay_unlowered_and_say_so():
    """The CUDA lowering touches only `fp4_gemm_op` sites; the block-scaled FP4-gradient route
    (`requantized_gemm_op`, recipe nvfp4) keeps its reference ops, and the report names them."""
    graph, report = roofline.lowered_linear_graph("nvfp4")
    (site,) = report.quantized
    assert site.lowering == "cuda: not lowered: its GEMMs run as the reference, emulated (requantized_gemm_op)"
    kinds = _kinds(graph)
    assert "requantized_gemm_op" in kinds and not {"fp8_gemm_op", "folded_fp8_gemm_op"} & set(kinds)
