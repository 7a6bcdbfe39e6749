"""CUDA lowering: the semantic GEMM on FP8 tensor cores, OCC thresholds from Triton.

The rewritten graph's `fp4_gemm_op` multiplies grid values in float32 (the
reference). On a GPU with FP8 tensor cores this lowering swaps it for the same
autograd rule built on `cuda_gemm`'s `torch._scaled_mm` products, where both
operands sit on an FP8 grid (`fp8_grid`) with vector scales; the products fall
back to the reference per call where `_scaled_mm` does not apply (float64, an
unaligned token count in the weight gradient). The row-scope OCC clamp takes its
thresholds and sparse residual from one Triton pass (`triton_kernels`) instead
of two aten top-k calls and a gather.

The OCC compensation becomes `cuda_compensation.channel_compensate_op`: the
same sums, with the residual on its most populated channels multiplied by dense
BF16 GEMMs (forward and weight gradient) and only the entries outside those
channels left to the sparse gather/scatter (docs/cuda.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from ..runtime import gemm as reference_gemm
from ..runtime import linear_ops
from ..runtime.occ import occ_split
from ..runtime.quantize import compute_dtype
from . import cuda_gemm
from .cuda_compensation import channel_compensate_op


def _forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    if cuda_gemm.fp8_gemm_applies(x_q, x_scale, w_q, w_scale):
        return cuda_gemm.fp8_forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return reference_gemm.forward_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def _gradient_gemm(g, q, scale, grad_fmt):
    if grad_fmt == "e5m2" and cuda_gemm.fp8_gradient_applies(q, scale):
        return cuda_gemm.fp8_gradient_gemm(g, q, scale, grad_fmt, out_dtype=q.dtype)
    return reference_gemm.gradient_gemm(g, q, scale, grad_fmt)


_Fp8Gemm = linear_ops.make_gemm_function(_forward_gemm, _gradient_gemm, "_Fp8Gemm")


def fp8_gemm_op(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype: torch.dtype, fp8_grid: bool = True):
    """`fp4_gemm_op` with its three products on FP8 tensor cores (`torch._scaled_mm`)."""
    return _Fp8Gemm.apply(x_q, x_scale, w_q, w_scale, bias, grad_fmt, out_dtype, fp8_grid)


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
    """Lower the rewritten sites of one graph for CUDA."""
    for site in sites:
        _lower_site(site)


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
