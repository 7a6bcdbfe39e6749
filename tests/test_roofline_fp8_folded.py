"""The roofline model's `paper-fp8-folded` design (prediction only; the lowering does not build it).

The design folds the OCC compensation into the FP8 activation operand, so its
kernels must be exactly `paper`'s without the compensation op and its add,
with an OCC pass that writes thresholds only. These tests pin that, so the
design's predicted column (docs/cuda.md, BENCHMARKS.md) moves with the model.
"""
import pytest

from fp4compile.inspection import roofline

SHAPES = [(4096, 4096, 4096), (1024, 2048, 1024), (3000, 5120, 1536)]


@pytest.fixture(scope="module")
def predictions():
    paper = roofline.lowered_linear_graph("paper")[0]
    return (roofline.predict_fp8_folded(SHAPES),
            roofline.predict(["paper", "fp4-direct"], SHAPES, graphs={"paper": paper}))


def test_folded_design_is_paper_without_the_compensation(predictions):
    folded, others = predictions
    for design in folded:
        m, k, n = design.shape
        paper = next(p for p in others if p.recipe == "paper" and p.shape == design.shape)
        kept = [kern for kern in paper.kernels if kern.node not in ("channel_compensate_op", "add")]
        assert [(kern.name.split(" ")[0], kern.flops, kern.unit) for kern in design.kernels] == \
            [(kern.name.split(" ")[0], kern.flops, kern.unit) for kern in kept]
        occ = [kern for kern in design.kernels if kern.node == "triton_occ_clamp_op"]
        assert len(occ) == 1 and occ[0].read == 2 * m * k and occ[0].written == 3 * 4 * m
        # 11 memory passes: fp4-direct's 10 and the OCC threshold pass; the three FP8 GEMMs only.
        assert design.memory_passes() == 11
        assert [g.unit for g in design.gemms()] == ["fp8"] * 3


def test_folded_design_costs_between_fp4_direct_and_paper(predictions):
    folded, others = predictions
    for design in folded:
        direct = next(p for p in others if p.recipe == "fp4-direct" and p.shape == design.shape)
        paper = next(p for p in others if p.recipe == "paper" and p.shape == design.shape)
        assert direct.seconds() < design.seconds() < paper.seconds()
        # The extra over fp4-direct: the OCC pass (x read, thresholds written) and DGE's re-read of W.
        m, k, n = design.shape
        extra = (2 * m * k + 12 * m) / roofline.H200_RATES["copy"] + 2 * n * k / roofline.H200_RATES["copy"]
        assert design.seconds() - direct.seconds() == pytest.approx(extra, rel=1e-9)
