"""The roofline model of `paper` with its compensation folded into the FP8 activation codes.

`cuda_compensation="fp8_folded"` (the default) lowers each OCC activation to one
Triton pass (`folded_activation_op`) feeding `folded_fp8_gemm_op`. Its kernels
must be fp4-direct's with the activation's quantization pass replaced by that
pass, and the input gradient written in bf16 by its GEMM (no cast pass); rows
over 16384 elements add the two top-k threshold passes. The time must not
depend on the channel coverage (there is no channel set). These tests pin that,
so the predicted `paper` column (docs/cuda.md, BENCHMARKS.md) moves with the
lowered graph.
"""
import pytest

from fp4compile.inspection import roofline

SHAPES = [(4096, 4096, 4096), (1024, 2048, 1024), (3000, 5120, 1536), (512, 20000, 256)]


@pytest.fixture(scope="module")
def predictions():
    graphs = {"paper": roofline.lowered_linear_graph("paper")[0],
              "fp4-direct": roofline.lowered_linear_graph("fp4-direct")[0]}
    return (roofline.predict(["paper", "fp4-direct"], SHAPES, graphs=graphs),
            roofline.predict(["paper"], SHAPES, coverage=0.3, graphs=graphs))


def test_folded_paper_is_fp4_direct_with_one_activation_pass_and_no_dx_cast(predictions):
    both, _ = predictions
    for m, k, n in SHAPES:
        paper = next(p for p in both if p.recipe == "paper" and p.shape == (m, k, n))
        direct = next(p for p in both if p.recipe == "fp4-direct" and p.shape == (m, k, n))
        kept = [kern for kern in direct.kernels
                if kern.node != "quantize_activation_op" and kern.name != "dx: float32 -> bf16"]
        folded = [kern for kern in paper.kernels if kern.node != "folded_activation_op"]
        assert [(kern.name.split(" ")[0], kern.flops, kern.unit) for kern in folded] == \
            [(kern.name.split(" ")[0], kern.flops, kern.unit) for kern in kept]
        act = [kern for kern in paper.kernels if kern.node == "folded_activation_op"]
        topk = 2 if k > 16384 else 0
        assert len(act) == 1 + topk
        # One read of x (bf16), the 1-byte codes and the float32 row scale written.
        assert act[-1].read == 2 * m * k + (8 * m if topk else 0) and act[-1].written == m * k + 4 * m
        assert paper.memory_passes() == 9 + topk
        assert [g.unit for g in paper.gemms()] == ["fp8"] * 3
        dx = [g for g in paper.gemms() if g.name.startswith("dx")]
        assert len(dx) == 1 and dx[0].written == 2 * m * k  # bf16 out


def test_folded_paper_does_not_depend_on_coverage(predictions):
    both, low = predictions
    for p in low:
        full = next(q for q in both if q.recipe == "paper" and q.shape == p.shape)
        assert p.seconds() == full.seconds()


def test_three_largest_standard_shapes_predicted_at_least_1_3x_bf16():
    """The target the folded design was built for (a PREDICTION of the model, not a measurement)."""
    rows = roofline.ratio_table(roofline.predict(["bf16", "paper"], roofline.STANDARD_SHAPES[1:4]))
    assert all(row["recipes"]["paper"]["ratio_to_bf16"] >= 1.3 for row in rows), rows
