"""CUDA lowering: the semantic GEMM on FP8 tensor cores, OCC from Triton.

The rewritten graph's `fp4_gemm_op` multiplies grid values in float32 (the
reference). On a GPU with FP8 tensor cores this lowering swaps it for the same
autograd rule built on `cuda_gemm`'s `torch._scaled_mm` products, where both
operands sit on an FP8 grid (`fp8_grid`) with vector scales; the products fall
back to the reference per call where `_scaled_mm` does not apply (float64, an
unaligned token count in the weight gradient).

How a site with OCC compensation runs depends on `Fp4Config.cuda_compensation`:

- "fp8_folded" (default): as the CPU lowering merges `x_comp = x_q + r / x_s`
  for its single GEMM (`cpu.py`), the clamp, the quantization and the
  compensation of each activation become one `folded_activation_op`, which
  writes `E4M3(x_comp / 2**e)` codes and the scale `x_s * 2**e`
  (`runtime/folded.py`; one Triton kernel per activation on CUDA,
  `triton_kernels.folded_rows`). Every site reading the activation runs
  `folded_fp8_gemm_op`: the forward and the weight gradient on those codes,
  the input gradient as before; three FP8 GEMMs, no compensation GEMM,
  gather or scatter. Numerics: non-outlier entries exact, outliers within
  E4M3's rounding (2**-4 relative), saturation beyond 448 * 256 x_s.
- "channels": the clamp takes its thresholds and sparse residual from one
  Triton pass (`triton_occ_clamp_op`) and the compensation becomes
  `cuda_compensation.channel_compensate_op`: the reference's sums, with the
  residual on its most populated channels multiplied by dense BF16 GEMMs and
  the rest left to the sparse gather/scatter (docs/cuda.md). Exact.

Only sites whose GEMM is `linear_ops.fp4_gemm_op` are lowered; other GEMM ops
(the block-scaled FP4-gradient route) run as the reference, emulated.
"""
from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx as fx

from ..runtime import gemm as reference_gemm
from ..runtime import linear_ops
from ..runtime.folded import folded_activation_reference
from ..runtime.occ import occ_split
from ..runtime.quantize import compute_dtype
from . import cuda_gemm
from .cuda_compensation import channel_compensate_op


def _forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    if cuda_gemm.fp8_gemm_applies(x_q, x_scale, w_q, w_scale):
        return cuda_gemm.fp8_forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return reference_gemm.forward_gemm(_as_compute(x_q), x_scale, w_q, w_scale, bias, out_dtype)


def _gradient_gemm(g, q, scale, grad_fmt, out_dtype=None):
    """A gradient GEMM (FP8 where it applies), written in `out_dtype` (default: q's dtype)."""
    out_dtype = out_dtype or q.dtype
    if grad_fmt == "e5m2" and cuda_gemm.fp8_gradient_applies(q, scale):
        return cuda_gemm.fp8_gradient_gemm(g, q, scale, grad_fmt, out_dtype=out_dtype)
    return reference_gemm.gradient_gemm(g, _as_compute(q), scale, grad_fmt).to(out_dtype)


_Fp8Gemm = linear_ops.make_gemm_function(_forward_gemm, _gradient_gemm, "_Fp8Gemm")


def fp8_gemm_op(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype: torch.dtype, fp8_grid: bool = True):
    """`fp4_gemm_op` with its three products on FP8 tensor cores (`torch._scaled_mm`)."""
    return _Fp8Gemm.apply(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype, fp8_grid)


def _as_compute(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes as float32 numbers (exact), for the reference products; other tensors as they are."""
    return t.to(torch.float32) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _triton_folds(x, scope, fmt, granularity) -> bool:
    if not (x.is_cuda and scope == "row" and fmt == "e2m1" and granularity == "row"):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.shape[-1] < 1:
        return False
    try:
        from . import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def folded_activation_op(x, alpha_num: int, alpha_den: int, scope: str, fmt: str, granularity: str,
                         fp8_codes: bool):
    """(codes, scale): OCC clamp, quantize and the compensation folded into E4M3 codes (`runtime.folded`).

    `codes * scale` is the compensated activation both GEMMs take. No gradient
    flows through here: `folded_fp8_gemm_op` takes x itself and returns its
    (straight-through) gradient. `fp8_codes`: the codes are float8_e4m3fn, as
    `_scaled_mm` takes them (float64 inputs keep float64 codes: those models are
    for exact comparisons and their GEMMs run as the reference). On CUDA, row
    scope and row E2M1 scales, one Triton kernel (`triton_kernels.folded_rows`);
    elsewhere the reference ops.
    """
    x = x.detach()
    fp8 = fp8_codes and x.dtype != torch.float64
    if fp8 and _triton_folds(x, scope, fmt, granularity):
        from . import triton_kernels

        lead, k = x.shape[:-1], x.shape[-1]
        codes, scale = triton_kernels.folded_rows(x.reshape(-1, k).contiguous(), alpha_num, alpha_den,
                                                  torch.float8_e4m3fn)
        return codes.reshape(*lead, k), scale.reshape(*lead, 1)
    codes, scale = folded_activation_reference(x, alpha_num, alpha_den, scope, fmt, granularity)
    return (codes.to(torch.float8_e4m3fn) if fp8 else codes), scale  # grid values: the cast is exact


class _FoldedFp8Gemm(torch.autograd.Function):
    """y = (codes * scale) @ dequant(w).T + b; input gradient to x, weight gradient on the codes.

    The forward and the weight-gradient GEMMs take the folded codes (the
    compensated activation, SPEC.md section 5); the input gradient is
    `fp8_gemm_op`'s, written in x's dtype by the GEMM itself, and goes straight
    through to x, as the semantic clamp and quantize ops pass it.
    """

    @staticmethod
    def forward(ctx, x, codes, scale, w_q, w_scale, bias, grad_fmt, out_dtype):
        lead = codes.shape[:-1]
        c2 = codes.reshape(-1, codes.shape[-1])
        s2 = scale.reshape(-1, scale.shape[-1])
        y = _forward_gemm(c2, s2, w_q, w_scale, bias, out_dtype)
        ctx.save_for_backward(c2, s2, w_q, w_scale)
        ctx.grad_fmt, ctx.x_shape, ctx.x_dtype = grad_fmt, x.shape, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        c2, s2, w_q, w_scale = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gradient_gemm(g2, w_q, w_scale, ctx.grad_fmt, out_dtype=ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            grad_w = _gradient_gemm(g2.t(), c2, s2, ctx.grad_fmt, out_dtype=w_q.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_w, None, grad_b, None, None


def folded_fp8_gemm_op(x, codes, scale, w_q, w_scale, bias, grad_fmt, out_dtype: torch.dtype):
    """The GEMMs of a site whose activation is folded (`folded_activation_op`): three FP8 GEMMs.

    `x` is the activation before OCC: only its gradient is produced here.
    """
    return _FoldedFp8Gemm.apply(x, codes, scale, w_q, w_scale, bias, grad_fmt, out_dtype)


def _triton_occ_rows(x, alpha_num, alpha_den):
    """Row-scope thresholds and sparse residual from one Triton pass, or None.

    None when the kernel does not apply (no Triton, float64, rows over 16k).
    """
    if not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        from . import triton_kernels
    except ImportError:
        return None
    if not triton_kernels.supports_row_kernel(x.shape[-1]):
        return None
    lead = x.shape[:-1]
    upper, lower, values, index, _ = triton_kernels.occ_residual_rows(
        x.reshape(-1, x.shape[-1]).contiguous(), alpha_num, alpha_den
    )
    return (upper.reshape(*lead, 1), lower.reshape(*lead, 1),
            values.reshape(*lead, values.shape[-1]), index.reshape(*lead, index.shape[-1]))


class _TritonOccClamp(linear_ops._OccClamp):
    """`occ_clamp_op` with the thresholds and residual from the Triton row kernel.

    Falls back to the reference forward where the kernel does not apply; the
    backward (straight through) is the reference's.
    """

    @staticmethod
    def forward(ctx, x, alpha_num, alpha_den, scope):
        fast = _triton_occ_rows(x, alpha_num, alpha_den) if scope == "row" else None
        if fast is None:
            return linear_ops._OccClamp.forward(ctx, x, alpha_num, alpha_den, scope)
        # Same thresholds and non-zero residual entries as the top-k path, bit for
        # bit; the clamp stays in torch so Inductor fuses it into the quantization.
        upper, lower, values, index = fast
        clamped, _ = occ_split(x.to(compute_dtype(x.dtype)), upper, lower)
        ctx.in_dtype = x.dtype
        ctx.mark_non_differentiable(values, index)
        return clamped, values, index


def triton_occ_clamp_op(x, alpha_num: int, alpha_den: int, scope: str):
    """`occ_clamp_op` whose row thresholds come from one Triton pass."""
    return _TritonOccClamp.apply(x, alpha_num, alpha_den, scope)


# None: ask the current device whether it has FP8 tensor cores. True/False:
# lower as if it had (or had not) them, so that the graph an H100/H200 would run
# can be built and inspected on a CPU (`inspection/roofline.py`, the tests).
_ASSUME_FP8_TENSOR_CORES: bool | None = None


@contextlib.contextmanager
def assume_fp8_tensor_cores(value: bool = True):
    """Lower as if the device had (value=True) or lacked FP8 tensor cores.

    Only the graph changes: the FP8 GEMM op still checks each call's tensors
    (`cuda_gemm.fp8_gemm_applies`) and runs the reference where they do not fit.
    """
    global _ASSUME_FP8_TENSOR_CORES
    previous, _ASSUME_FP8_TENSOR_CORES = _ASSUME_FP8_TENSOR_CORES, bool(value)
    try:
        yield
    finally:
        _ASSUME_FP8_TENSOR_CORES = previous


def _has_fp8_tensor_cores() -> bool:
    if _ASSUME_FP8_TENSOR_CORES is not None:
        return _ASSUME_FP8_TENSOR_CORES
    return cuda_gemm.supports_fp8_gemm()


def lower_graph(graph: fx.Graph, sites, config) -> None:
    """Lower the rewritten sites of one graph for CUDA.

    Sites that share an activation (q/k/v, gate/up) share its clamp and
    quantize nodes, and so, folded, one `folded_activation_op`.
    """
    folded_by_act = {}
    for site in sites:
        roles = site.rewritten
        if roles["gemm"].target is not linear_ops.fp4_gemm_op:
            site.lowering = ("cuda: not lowered: its GEMMs run as the reference, emulated "
                             f"({getattr(roles['gemm'].target, '__name__', roles['gemm'].target)})")
            continue
        if _folds(roles, config):
            _fold_site(graph, roles, folded_by_act)
            site.lowering = ("cuda: " + ("FP8 tensor-core GEMMs" if _has_fp8_tensor_cores() else
                                         "float32 GEMMs on grid values (no FP8 tensor cores here)")
                             + ", OCC compensation folded into the E4M3 activation codes (one Triton pass)")
            continue
        _lower_site(site)
    for act, (clamp, *_rest) in folded_by_act.items():
        _erase_unused([*_getitems(act).values(), act, *_getitems(clamp).values(), clamp])


def _folds(roles, config) -> bool:
    """Whether this site's compensation folds into the activation codes."""
    if getattr(config, "cuda_compensation", "fp8_folded") != "fp8_folded":
        return False
    if roles.get("compensate") is None or roles.get("clamp") is None or roles.get("add") is None:
        return False
    act = roles["act"]
    # Row or tensor activation scales (a block scale lies along K: it does not factor out of the GEMM).
    return act.target is linear_ops.quantize_activation_op and act.args[2] in ("row", "tensor")


def _getitems(node: fx.Node) -> dict:
    return {user.args[1]: user for user in node.users if user.target is operator.getitem}


def _erase_unused(nodes) -> None:
    """Erase the nodes left without users, consumers before producers; keep the rest."""
    pending = [n for n in nodes if n is not None]
    progress = True
    while pending and progress:
        progress = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.remove(node)
                progress = True


def _fold_site(graph: fx.Graph, roles: dict, folded_by_act: dict) -> None:
    clamp, act = roles["clamp"], roles["act"]
    if act not in folded_by_act:
        x, alpha_num, alpha_den, scope = clamp.args
        _, fmt, granularity = act.args
        fp8 = bool(roles["gemm"].args[7]) and _has_fp8_tensor_cores()
        with graph.inserting_before(act):
            fused = graph.call_function(folded_activation_op, (x, alpha_num, alpha_den, scope, fmt, granularity, fp8))
            codes = graph.call_function(operator.getitem, (fused, 0))
            scale = graph.call_function(operator.getitem, (fused, 1))
        for node in (fused, codes, scale):
            node.meta.update({k: act.meta[k] for k in ("nn_module_stack", "fp4_site") if k in act.meta})
        folded_by_act[act] = (clamp, x, codes, scale)
    _, x, codes, scale = folded_by_act[act]
    gemm, comp, add = roles["gemm"], roles["compensate"], roles["add"]
    _, _, w_q, w_s, bias, grad_fmt, out_dtype, _ = gemm.args
    gemm.target = folded_fp8_gemm_op
    gemm.args = (x, codes, scale, w_q, w_s, bias, grad_fmt, out_dtype)
    add.replace_all_uses_with(gemm)
    _erase_unused([add, comp, roles.get("shape")])
    roles.update(folded=codes.args[0], clamp=None, act=None, compensate=None, add=None, shape=None)


def _lower_site(site) -> None:
    roles = site.rewritten
    gemm = roles["gemm"]
    parts = []
    if gemm.args[7] and _has_fp8_tensor_cores():
        gemm.target = fp8_gemm_op
        parts.append("FP8 tensor-core GEMMs")
    else:
        parts.append("float32 GEMMs on grid values (no FP8 tensor cores here)")
    if roles.get("clamp") is not None:
        roles["clamp"].target = triton_occ_clamp_op
        parts.append("Triton OCC thresholds")
    if roles.get("compensate") is not None:
        # Same arguments, same sums (tests/test_cuda_path.py checks it against the reference).
        roles["compensate"].target = channel_compensate_op
        parts.append("channel-GEMM OCC compensation")
    site.lowering = "cuda: " + ", ".join(parts)
