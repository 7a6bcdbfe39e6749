"""Traffic and roofline model of one quantized linear layer (fwd + bwd) on CUDA.

Why it exists: the CUDA path cannot be timed without a GPU, but whether it can
beat BF16 is mostly arithmetic. For each recipe this module builds, on a CPU,
the graph that the CUDA lowering produces for one `nn.Linear` (`target="cuda"`,
lowered as if the device had FP8 tensor cores), walks its nodes, and maps each
node to the kernels it runs on CUDA: the bytes each kernel must move through
device memory and the FLOPs each GEMM does. Each kernel's time is
max(bytes / copy bandwidth, FLOPs / matrix rate); the layer's time is their sum
(no overlap between kernels, no launch overhead). The ratio to BF16 is the
prediction.

The node -> kernels table (`_PLANS`) is the model: it states what Inductor and
the launchers do with each node (which passes read what, which layouts are
copied) for the code as it stands; each entry says its assumptions. A node the
table does not know raises, so a change in the lowered graph forces the model
(and its pinned pass counts in tests/test_roofline.py) to follow.

Bytes are lower bounds where an access pattern is irregular: a gathered
element costs its own size, as if perfectly coalesced. That makes the sparse
compensation's predicted time optimistic; its real cost can only be higher.

    python -m fp4compile.inspection.roofline            # the five standard shapes
    python -m fp4compile.inspection.roofline --json benchmarks/results/roofline_h200.json \
        --markdown benchmarks/results/roofline_h200.md
    python -m fp4compile.inspection.roofline --compensation channels --coverage 0.435   # the exact channel path
"""
from __future__ import annotations

import argparse
import json
import operator
from dataclasses import asdict, dataclass, field

# H200 rates the prediction uses (stated, not measured here): dense BF16 matrix
# rate as measured on the lent H200 (.library/device/README.md: about 790
# TFLOP/s), FP8 at twice that (Hopper's FP8 tensor-core rate is 2x BF16),
# plain float32 (no tensor cores) at the datasheet's 67 TFLOP/s, and a
# device-to-device copy at about 4.3 TB/s (bytes read + bytes written).
H200_RATES = {"bf16": 790e12, "fp8": 1580e12, "fp32": 67e12, "copy": 4.3e12}

# The five standard shapes of benchmarks/linear.py: (M tokens, K in, N out).
STANDARD_SHAPES = ((4096, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (16384, 8192, 8192),
                   (1024, 2048, 1024))
RECIPES = ("bf16", "fp8", "fp4-direct", "paper")

BF16, FP8, F32, I64 = 2, 1, 4, 8


@dataclass
class Kernel:
    """One kernel of the layer: what it reads and writes, and its FLOPs (GEMMs)."""

    name: str
    node: str  # the lowered graph's node kind it comes from
    phase: str  # "fwd" or "bwd"
    read: float = 0.0  # bytes
    written: float = 0.0  # bytes
    flops: float = 0.0
    unit: str = "copy"  # "copy" (memory pass) or the matrix rate: "bf16", "fp8", "fp32"

    @property
    def is_gemm(self) -> bool:
        return self.flops > 0

    def seconds(self, rates=H200_RATES) -> float:
        memory = (self.read + self.written) / rates["copy"]
        compute = self.flops / rates[self.unit] if self.is_gemm else 0.0
        return max(memory, compute)


@dataclass
class LayerShape:
    m: int
    k: int
    n: int
    outliers_per_side: int = 0  # c of the row-scope OCC (0 without OCC)
    channel_cap: int = 0  # |C| of the channel compensation (lowering/cuda_compensation.py)
    coverage: float = 1.0  # share of residual entries inside C (the rest take the sparse path)


@dataclass
class Prediction:
    recipe: str
    shape: tuple
    kernels: list = field(default_factory=list)

    def seconds(self, rates=H200_RATES) -> float:
        return sum(k.seconds(rates) for k in self.kernels)

    def memory_passes(self) -> int:
        return sum(1 for k in self.kernels if not k.is_gemm)

    def gemms(self) -> list:
        return [k for k in self.kernels if k.is_gemm]

    def bytes_moved(self) -> float:
        return sum(k.read + k.written for k in self.kernels)

    def non_gemm_seconds(self, rates=H200_RATES) -> float:
        return sum(k.seconds(rates) for k in self.kernels if not k.is_gemm)


# ---------------------------------------------------------------------------
# Node -> kernels. Each function gets the node and the layer's shape.
# ---------------------------------------------------------------------------


def _gemm(name, node, phase, m, n, k, a_bytes, b_bytes, out_bytes, unit):
    """C[m, n] = A[m, k] @ B[k, n]: reads both operands once, writes C once."""
    return Kernel(name, node, phase, read=m * k * a_bytes + k * n * b_bytes, written=m * n * out_bytes,
                  flops=2.0 * m * n * k, unit=unit)


def _plan_bf16_linear(node, s: LayerShape):
    # Inductor's BF16 linear: three cuBLAS GEMMs, bf16 in and out, nothing else.
    m, k, n = s.m, s.k, s.n
    return [_gemm("y = x @ W.T", node, "fwd", m, n, k, BF16, BF16, BF16, "bf16"),
            _gemm("dx = dy @ W", node, "bwd", m, k, n, BF16, BF16, BF16, "bf16"),
            _gemm("dW = dy.T @ x", node, "bwd", n, k, m, BF16, BF16, BF16, "bf16")]


def _plan_occ_clamp_triton(node, s: LayerShape):
    # One Triton pass over each row (lowering/triton_kernels._occ_rows_kernel,
    # sparse variant): reads x, writes the sparse residual (float32 values,
    # int64 index, 2c per row) and upper/lower/count. The clamp itself is
    # recomputed from x and the thresholds inside the quantization kernel.
    m, k, c = s.m, s.k, s.outliers_per_side
    return [Kernel("OCC thresholds + sparse residual (Triton)", node, "fwd",
                   read=m * k * BF16, written=m * 2 * c * (F32 + I64) + 3 * m * F32)]


def _plan_occ_clamp_reference(node, s: LayerShape):
    # Two aten top-k selections over x (one per side), then the gather.
    m, k, c = s.m, s.k, s.outliers_per_side
    return [Kernel("OCC top-k (largest)", node, "fwd", read=m * k * BF16, written=m * (c + 1) * (F32 + I64)),
            Kernel("OCC top-k (smallest)", node, "fwd", read=m * k * BF16, written=m * (c + 1) * (F32 + I64))]


def _plan_quantize_activation(node, s: LayerShape):
    # Inductor: the row amax is a looped reduction for K > 1024 (no persistent
    # reduction), so x is read twice: once for the amax, once for the cast to
    # the E4M3 codes the FP8 GEMM takes (the clamp, if any, is recomputed in
    # both). The partitioner saves the 1-byte codes for the backward.
    m, k = s.m, s.k
    reads = 1 if k <= 1024 else 2
    kernels = [Kernel("x: [OCC clamp +] row amax + FP8 codes (Inductor)", node, "fwd",
                      read=reads * m * k * BF16, written=m * k * FP8 + m * F32)]
    return kernels


def _plan_quantize_weight(node, s: LayerShape):
    # Same as the activation: W read for the amax and again for the codes.
    n, k = s.n, s.k
    reads = 1 if k <= 1024 else 2
    kernels = [Kernel("W: row amax + FP8 codes (Inductor)", node, "fwd",
                      read=reads * n * k * BF16, written=n * k * FP8 + n * F32)]
    dge = node.args[4] is not None  # dge_clamp: the backward multiplies by the DGE slope
    # Backward: the float32 weight gradient (the wgrad GEMM's output) is read,
    # times the DGE slope of W (W re-read) when DGE is on, cast to W's dtype.
    kernels.append(Kernel("dW: DGE slope + cast to bf16" if dge else "dW: cast to bf16", node, "bwd",
                          read=n * k * F32 + (n * k * BF16 if dge else 0), written=n * k * BF16))
    return kernels


def _plan_fp8_gemm(node, s: LayerShape):
    # lowering/cuda.py's fp8_gemm_op (cuda_gemm): forward row-wise scaled
    # _scaled_mm with bf16 out; each gradient GEMM first casts its gradient
    # operand (fold of the other operand's row scale, per-tensor amax pass,
    # then the E5M2 cast pass, Inductor), and copies its FP8 right operand to
    # column-major (`q.t().contiguous().t()`); gradient GEMMs write float32
    # (their out_dtype is the grid values' dtype), cast to bf16 afterwards.
    m, k, n = s.m, s.k, s.n
    return [
        _gemm("y = x8 @ W8.T (_scaled_mm, row-wise)", node, "fwd", m, n, k, FP8, FP8, BF16, "fp8"),
        Kernel("dy * w_s: amax pass", node, "bwd", read=m * n * BF16),
        Kernel("dy * w_s: E5M2 cast", node, "bwd", read=m * n * BF16, written=m * n * FP8),
        Kernel("W8 column-major copy", node, "bwd", read=n * k * FP8, written=n * k * FP8),
        _gemm("dx = dy8 @ W8 (_scaled_mm)", node, "bwd", m, k, n, FP8, FP8, F32, "fp8"),
        Kernel("dx: float32 -> bf16", node, "bwd", read=m * k * F32, written=m * k * BF16),
        Kernel("dy.T * x_s: amax pass", node, "bwd", read=m * n * BF16),
        Kernel("dy.T * x_s: E5M2 cast (transposed)", node, "bwd", read=m * n * BF16, written=m * n * FP8),
        Kernel("x8 column-major copy", node, "bwd", read=m * k * FP8, written=m * k * FP8),
        _gemm("dW = dy8.T @ x8 (_scaled_mm)", node, "bwd", n, k, m, FP8, FP8, F32, "fp8"),
    ]


def _plan_folded_activation(node, s: LayerShape):
    # lowering/cuda.py's folded_activation_op on CUDA: one Triton kernel per
    # activation (triton_kernels.folded_rows). Rows up to 16384 elements are
    # held in registers: thresholds, clamp, E2M1 quantization and the folded
    # E4M3 codes from one read of x; writes the codes (1 byte) and the row scale.
    # Longer rows: thresholds from the two aten top-k passes, then the kernel's
    # three chunked sweeps, of which only the first is counted as a read from
    # device memory (the row was just read by the same program: assumed cached).
    m, k, c = s.m, s.k, s.outliers_per_side
    kernels = []
    if k > 16384:
        kernels += [Kernel("OCC top-k (largest)", node, "fwd", read=m * k * BF16, written=m * (c + 1) * (F32 + I64)),
                    Kernel("OCC top-k (smallest)", node, "fwd", read=m * k * BF16, written=m * (c + 1) * (F32 + I64))]
    kernels.append(Kernel("x: OCC + E2M1 + folded E4M3 codes (Triton, one pass)", node, "fwd",
                          read=m * k * BF16 + (2 * m * F32 if k > 16384 else 0), written=m * k * FP8 + m * F32))
    return kernels


def _plan_folded_fp8_gemm(node, s: LayerShape):
    # lowering/cuda.py's folded_fp8_gemm_op: fp8_gemm_op's kernels on the folded
    # codes, except that the input-gradient GEMM writes dx in x's dtype (bf16)
    # itself, so no float32 -> bf16 pass follows it.
    m, k = s.m, s.k
    kernels = [kern for kern in _plan_fp8_gemm(node, s) if kern.name != "dx: float32 -> bf16"]
    for kern in kernels:
        if kern.name.startswith("dx = dy8 @ W8"):
            kern.name, kern.written = "dx = dy8 @ W8 (_scaled_mm, bf16 out)", m * k * BF16
    return kernels


def _plan_fp32_gemm(node, s: LayerShape):
    # fp4_gemm_op as is: float32 GEMMs on grid values (no FP8 tensor cores).
    m, k, n = s.m, s.k, s.n
    return [
        _gemm("y = x_q @ w_q.T (float32)", node, "fwd", m, n, k, F32, F32, F32, "fp32"),
        _gemm("dx (float32)", node, "bwd", m, k, n, F32, F32, F32, "fp32"),
        _gemm("dW (float32)", node, "bwd", n, k, m, F32, F32, F32, "fp32"),
    ]


def _plan_sparse_compensate(node, s: LayerShape):
    # runtime.linear_ops.compensate_op: forward gather-reduce over the 2c
    # entries of each row (each gathers a column of dequantized W, N values),
    # fused with the `y + comp` add; backward scatters 2c rows of the float32
    # gradient operand per token into a float32 [K, N] buffer (index_add
    # atomics), then scales, transposes and adds it to dW. Gathered and
    # scattered elements are counted at their own size: a lower bound.
    m, k, n, c = s.m, s.k, s.n, s.outliers_per_side
    entries = m * 2 * c
    return [
        Kernel("compensation gather-reduce (sparse)", node, "fwd",
               read=entries * (F32 + I64) + entries * n * BF16, written=m * n * F32),
        Kernel("compensation index_add (sparse, atomics)", node, "bwd",
               read=entries * (F32 + I64) + entries * n * F32, written=k * n * F32 + entries * n * F32),
        Kernel("compensation dW: scale, transpose, add", node, "bwd", read=2 * n * k * F32, written=n * k * F32),
    ]


def _plan_channel_compensate(node, s: LayerShape):
    # lowering/cuda_compensation.channel_compensate_op on CUDA:
    # forward: per-column counts of the sparse residual (scatter of the M*2c
    # entries into [K]) and a top-|C| sort; R[:, C] (scatter into a dense
    # [M, |C|], then the bf16 hi/lo split [M, 2|C|]); the dequantized W
    # (float32 [N, K], read by the sparse kernel through a transposed view);
    # one BF16 GEMM (float32 out) against [w_q[:, C] w_q[:, C]]; the Triton
    # sparse kernel over the entries outside C: every value is read, but only
    # the share 1 - coverage loads an index and a W row (masked loads), and it
    # writes its full float32 [M, N] output.
    # backward: the E5M2 gradient operand again, as bf16 values (exact) [N, M]
    # (its amax is assumed shared with the main weight-gradient cast); one BF16
    # GEMM against [R_hi R_lo] / x_s; the Triton scatter (zero-initialised
    # float32 [K, N], atomics for the entries outside C only); the sum of both,
    # scaled, transposed and added to the main dW.
    m, k, n, c, cap = s.m, s.k, s.n, s.outliers_per_side, s.channel_cap
    entries = m * 2 * c
    rest = entries * (1.0 - s.coverage)
    return [
        Kernel("residual column counts + top-|C|", node, "fwd", read=entries * (F32 + I64), written=k * F32),
        Kernel("R[:, C] scatter + bf16 hi/lo split", node, "fwd",
               read=entries * (F32 + I64) + m * cap * F32, written=m * cap * F32 + m * 2 * cap * BF16),
        Kernel("dequantized W (float32)", node, "fwd", read=n * k * BF16, written=n * k * F32),
        _gemm("y_C = [R_hi R_lo] @ [W_C W_C].T", node, "fwd", m, n, 2 * cap, BF16, BF16, F32, "bf16"),
        Kernel("sparse rest, masked (Triton)", node, "fwd",
               read=entries * F32 + rest * (I64 + n * F32), written=m * n * F32),
        Kernel("gradient operand as bf16 [N, M]", node, "bwd", read=m * n * BF16, written=m * n * BF16),
        Kernel("[R_hi R_lo] / x_s", node, "bwd", read=entries * (F32 + I64) + m * F32, written=m * 2 * cap * BF16),
        _gemm("dW_C = dy8.T @ [R_hi R_lo]/x_s", node, "bwd", n, 2 * cap, m, BF16, BF16, F32, "bf16"),
        Kernel("sparse rest scatter, masked (Triton atomics)", node, "bwd",
               read=entries * F32 + rest * (I64 + n * BF16 + n * F32), written=k * n * F32 + rest * n * F32),
        Kernel("compensation dW: + dW_C, scale, transpose, add to dW", node, "bwd",
               read=2 * n * k * F32 + n * 2 * cap * F32, written=n * k * F32),
    ]


def _plan_add(node, s: LayerShape):
    # y + compensation, with the compensation's own epilogue fused (y_C * w_s +
    # sparse rest, cast): reads the FP8 GEMM's bf16 output and the two float32
    # terms (one for the reference compensation, whose sum is fused here), writes bf16.
    m, n = s.m, s.n
    terms = 2 if node.args[1].target.__name__ == "channel_compensate_op" else 1
    return [Kernel("y + compensation", node, "fwd", read=m * n * (BF16 + terms * F32), written=m * n * BF16)]


def _plans():
    from torch._C._nn import linear

    from ..lowering import cuda, cuda_compensation
    from ..runtime import linear_ops

    return {
        linear: _plan_bf16_linear,
        cuda.triton_occ_clamp_op: _plan_occ_clamp_triton,
        linear_ops.occ_clamp_op: _plan_occ_clamp_reference,
        linear_ops.quantize_activation_op: _plan_quantize_activation,
        linear_ops.quantize_weight_op: _plan_quantize_weight,
        cuda.fp8_gemm_op: _plan_fp8_gemm,
        cuda.folded_activation_op: _plan_folded_activation,
        cuda.folded_fp8_gemm_op: _plan_folded_fp8_gemm,
        linear_ops.fp4_gemm_op: _plan_fp32_gemm,
        linear_ops.compensate_op: _plan_sparse_compensate,
        cuda_compensation.channel_compensate_op: _plan_channel_compensate,
        operator.add: _plan_add,
    }


# Nodes that move no bytes of their own (views, tuple access, shape reads).
_FREE = {operator.getitem, getattr}


def _node_kind(node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def kernels_of_graph(graph, shape: LayerShape) -> list:
    """The kernels the nodes of a lowered single-linear graph run on CUDA, in graph order."""
    plans = _plans()
    kernels = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target in _FREE:
            continue
        plan = plans.get(node.target)
        if plan is None:
            raise ValueError(f"the roofline model has no CUDA plan for node {node.name} "
                             f"({_node_kind(node)}): extend inspection/roofline.py")
        for kernel in plan(node, shape):
            kernel.node = _node_kind(node)
            kernels.append(kernel)
    return kernels


def lowered_linear_graph(recipe: str, fp8_tensor_cores: bool = True, m: int = 32, k: int = 64, n: int = 48,
                         overrides: dict | None = None):
    """(graph, report) of one bf16 `nn.Linear(k, n)` as the CUDA lowering produces it, built on CPU.

    The graph's structure does not depend on the sizes, so a small layer is
    traced (with the CUDA size policy off, which would keep it in BF16);
    `bf16` is the unquantized graph (no fp4 pass). `overrides`: config fields
    on top of the recipe.
    """
    import torch

    from .. import backend as fp4_backend_module
    from ..lowering import cuda

    captured = {}

    def capture(gm, example_inputs):
        if recipe == "bf16":
            captured["report"] = None
        else:
            with cuda.assume_fp8_tensor_cores(fp8_tensor_cores):
                captured["report"] = fp4_backend_module.prepare(
                    gm, example_inputs, {"recipe": recipe, "target": "cuda", "cuda_size_policy": False,
                                         **(overrides or {})}, "fp4", lower=True)
        captured["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    layer = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
    torch.compile(layer, backend=capture, dynamic=False)(x)
    torch._dynamo.reset()
    return captured["gm"].graph, captured["report"]


def layer_shape(recipe: str, m: int, k: int, n: int, coverage: float = 1.0) -> LayerShape:
    from ..config import Fp4Config
    from ..lowering.cuda_compensation import channel_cap
    from ..runtime.occ import alpha_fraction, outliers_per_side

    shape = LayerShape(m, k, n, coverage=coverage)
    if recipe != "bf16":
        config = Fp4Config.from_recipe(recipe)
        if config.occ_alpha is not None:
            num, den = alpha_fraction(config.occ_alpha)
            shape.outliers_per_side = outliers_per_side(k, num, den)
            shape.channel_cap = channel_cap(k)
    return shape


# How `paper`'s OCC compensation is lowered (Fp4Config.cuda_compensation): the
# built default folds it into the FP8 activation codes; "channels" is the exact
# channel-GEMM path.
COMPENSATIONS = ("fp8_folded", "channels")


def predict(recipes=RECIPES, shapes=STANDARD_SHAPES, coverage: float = 1.0, graphs=None,
            compensation: str = "fp8_folded") -> list:
    """One Prediction per (recipe, shape). `graphs` maps recipe -> lowered graph (built if absent).

    `compensation`: the `cuda_compensation` the graphs are lowered with; `coverage`
    matters for "channels" only (the folded path has no channel set).
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation={compensation!r}; valid: {', '.join(COMPENSATIONS)}")
    graphs = dict(graphs or {})
    out = []
    for recipe in recipes:
        if recipe not in graphs:
            overrides = {"cuda_compensation": compensation} if recipe != "bf16" else None
            graphs[recipe] = lowered_linear_graph(recipe, overrides=overrides)[0]
        for m, k, n in shapes:
            shape = layer_shape(recipe, m, k, n, coverage)
            out.append(Prediction(recipe, (m, k, n), kernels_of_graph(graphs[recipe], shape)))
    return out


def ratio_table(predictions, rates=H200_RATES) -> list:
    """Rows: shape, predicted ms per recipe, ratio to bf16, and what bounds each recipe."""
    by_shape = {}
    for p in predictions:
        by_shape.setdefault(p.shape, {})[p.recipe] = p
    rows = []
    for shape, preds in by_shape.items():
        base = preds["bf16"].seconds(rates) if "bf16" in preds else None
        row = {"shape": list(shape), "recipes": {}}
        for recipe, p in preds.items():
            t = p.seconds(rates)
            gemm = sum(k.seconds(rates) for k in p.gemms())
            row["recipes"][recipe] = {
                "ms": t * 1e3,
                "gemm_ms": gemm * 1e3,
                "non_gemm_ms": p.non_gemm_seconds(rates) * 1e3,
                "ratio_to_bf16": (base / t) if base else None,
                "memory_passes": p.memory_passes(),
                "gemms": len(p.gemms()),
                "gbytes": p.bytes_moved() / 1e9,
            }
        rows.append(row)
    return rows


def markdown(rows, coverage: float, compensation: str = "fp8_folded") -> str:
    recipes = list(rows[0]["recipes"])
    head = ["M, K, N"] + [f"{r} ms (x BF16)" for r in recipes] + ["paper: GEMM / other ms", "passes fp8 / paper"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [",".join(map(str, row["shape"]))]
        for r in recipes:
            d = row["recipes"][r]
            cells.append(f"{d['ms']:.3f}" + (f" ({d['ratio_to_bf16']:.2f}x)" if r != "bf16" else ""))
        p = row["recipes"].get("paper")
        f = row["recipes"].get("fp8")
        cells.append(f"{p['gemm_ms']:.3f} / {p['non_gemm_ms']:.3f}" if p else "")
        cells.append(f"{f['memory_passes']} / {p['memory_passes']}" if p and f else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    where = ("paper's OCC compensation folded into the E4M3 activation codes (cuda_compensation=fp8_folded)"
             if compensation == "fp8_folded" else
             f"paper's OCC compensation on channel GEMMs (cuda_compensation=channels), channel coverage "
             f"{coverage:g} (share of OCC residual entries in the |C| channels)")
    lines.append(f"PREDICTION at H200 rates {json.dumps({k: f'{v:.3g}' for k, v in H200_RATES.items()})}; {where}.")
    return "\n".join(lines)


def kernel_listing(prediction: Prediction, rates=H200_RATES) -> str:
    lines = [f"{prediction.recipe} {prediction.shape}:"]
    for k in prediction.kernels:
        what = f"{k.flops / 1e9:.1f} GFLOP {k.unit}" if k.is_gemm else "memory pass"
        lines.append(f"  {k.phase} {k.name:48s} {(k.read + k.written) / 1e6:9.1f} MB  {what:20s} "
                     f"{k.seconds(rates) * 1e3:7.3f} ms  [{k.node}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compensation", choices=COMPENSATIONS, default="fp8_folded",
                        help="how paper's OCC compensation is lowered (Fp4Config.cuda_compensation; default "
                             "fp8_folded, the default of the lowering)")
    parser.add_argument("--coverage", type=float, default=1.0,
                        help="with --compensation channels: share of OCC residual entries inside the |C| "
                             "channels (default 1)")
    parser.add_argument("--kernels", action="store_true", help="also list every kernel of each recipe at 4096^3")
    parser.add_argument("--json", default=None, help="write the predictions as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as Markdown here")
    args = parser.parse_args(argv)
    predictions = predict(coverage=args.coverage, compensation=args.compensation)
    rows = ratio_table(predictions)
    table = markdown(rows, args.coverage, args.compensation)
    print(table)
    if args.kernels:
        for p in predictions:
            if p.shape == STANDARD_SHAPES[0]:
                print()
                print(kernel_listing(p))
    if args.json:
        payload = {"kind": "PREDICTION (roofline model, not a measurement)", "rates": H200_RATES,
                   "compensation": args.compensation, "coverage": args.coverage, "rows": rows,
                   "kernels": [{"recipe": p.recipe, "shape": list(p.shape), "kernels": [asdict(k) for k in p.kernels]}
                               for p in predictions]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            command = "python -m fp4compile.inspection.roofline" + (
                "" if args.compensation == "fp8_folded" else f" --compensation {args.compensation}") + (
                f" --coverage {args.coverage:g}" if args.coverage != 1.0 else "")
            f.write("# Roofline prediction: one linear layer fwd+bwd on an H200 (PREDICTION)\n\n"
                    f"`{command}`\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
