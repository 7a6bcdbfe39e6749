"""OCC compensation on CUDA as a dense GEMM over a bounded set of outlier channels.

The semantic compensation (`runtime.linear_ops.compensate_op`) adds
`R @ dequant(W).T` from a sparse residual R (2c entries per row) with a
gather-reduce in the forward and an `index_add` (atomics) in the backward:
M * 2c * N indirect loads and as many atomic adds, off the tensor cores. This
op computes the same sums with most of the work in two small dense GEMMs:

    C    = the |C| columns of x holding the most residual entries (|C| <= cap(K))
    y   += (R[:, C] @ w_q[:, C].T) * w_s.T     +  sparse term of the entries outside C
    dW[:, C] += (g_op.T @ (R[:, C] / x_s)) * g_scale  +  sparse term of the rest

where g_op, g_scale are the E5M2 gradient operand of the main weight-gradient
GEMM (`runtime.gemm.gradient_operand`, the activation's row scale folded in),
exactly as the reference's backward uses them. Entries outside C keep the
reference's sparse path, so the op is exact for any residual: C is a choice of
how to split the work, not an approximation. When the residual concentrates in
outlier channels (|C| covers it) the sparse term has no non-zero entry left;
when it does not (row-scope OCC puts 2c entries in every row, some outside
any small C), the sparse term carries the rest. On CUDA that term runs in
Triton kernels (`triton_kernels.sparse_rows_matmul` / `sparse_rows_scatter`)
whose loads and atomics are masked by value != 0: its traffic follows the
entries outside C, not the fixed [M, 2c] shape (docs/cuda.md has the measured
coverage and the roofline).

No host synchronisation and no data-dependent shapes: C is a fixed-size
selection (a stable sort of per-column counts, on the device), |C| = cap(K)
depends on K only, the split is a scatter with a mask. So the compiled graph
neither syncs nor recompiles when the outliers move.

Precision. The channel GEMMs run on BF16 tensor cores with float32 output when
the residual is float32 on CUDA (`split_bf16`): R[:, C] is split into
hi = bf16(r) and lo = bf16(r - hi), and [hi | lo] (2|C| columns) multiplies
[w_q | w_q] (E2M1/E4M3 grid values, exact in bf16). Each product is exact in
float32, so the only error beyond float32 summation order is the part of r
that hi + lo misses: |r - hi| <= 2**-8 |r| (bf16's 8-bit significand, round
to nearest), r - hi is exact in float32, so |r - hi - lo| <= 2**-16 |r|. The
stated bound, tested in tests/test_cuda_path.py, is

    |y - y_ref| <= (2**-16 + (J + 2) * 2**-24) * (|R| @ |dequant(W)|.T)

elementwise, J the number of terms either sum adds (float32 summation in any
order, u = 2**-24 each, plus the scale's rounding), and the same with |g_op|
for the weight gradient. Float64 (exact comparisons) and CPU tensors
take an unsplit GEMM in the compute dtype: products exact, summation order only.
"""
from __future__ import annotations

import torch

from ..runtime.gemm import gradient_operand

__all__ = [
    "CHANNEL_CAP",
    "channel_cap",
    "residual_entries",
    "residual_column_counts",
    "select_channels",
    "split_residual",
    "split_bf16",
    "channel_compensation",
    "channel_weight_gradient",
    "channel_compensate_op",
]

# |C| bound: 128 channels, a multiple of 16 (so 2|C| is a valid GEMM reduction
# for the tensor cores). At K = 4096 that is 3% of the channels; the roofline
# (inspection/roofline.py) puts the two channel GEMMs under 5% of the layer.
CHANNEL_CAP = 128


def channel_cap(k: int) -> int:
    """|C| for activations with K channels: min(K, CHANNEL_CAP). Depends on K only."""
    return min(int(k), CHANNEL_CAP)


def residual_entries(values: torch.Tensor, index: torch.Tensor, x_shape):
    """The sparse residual as flat (rows, cols, values) over the 2-D activation [M, K].

    Row scope: values/index [..., J] (index along the row); tensor scope:
    values/index [J] (index into the flattened activation). Padding entries
    (value 0) are kept: they add nothing.
    """
    k = x_shape[-1]
    m = 1
    for d in x_shape[:-1]:
        m = m * d
    if values.dim() == len(x_shape):  # row scope
        cols = index.reshape(m, index.shape[-1])
        rows = torch.arange(m, device=values.device).unsqueeze(-1).expand_as(cols)
        return rows.reshape(-1), cols.reshape(-1), values.reshape(-1), m, k
    return index // k, index % k, values, m, k


def residual_column_counts(cols: torch.Tensor, vals: torch.Tensor, k: int) -> torch.Tensor:
    """How many non-zero residual entries each of the K columns holds (int32 [K])."""
    counts = torch.zeros(k, dtype=torch.int32, device=cols.device)
    return counts.scatter_add(0, cols, (vals != 0).to(torch.int32))


def select_channels(counts: torch.Tensor, cap: int) -> torch.Tensor:
    """C: the `cap` columns with the most residual entries, ascending (int64 [cap]).

    A stable sort, so ties go to the lower column index: the same C for the
    same counts on every device. Fixed size: no data-dependent shape.
    """
    order = torch.sort(counts, descending=True, stable=True).indices[:cap]
    return torch.sort(order).values


def split_residual(rows, cols, vals, channels: torch.Tensor, m: int, k: int):
    """(R_C [m, |C|], rest values): the residual on the channels C, dense; the rest, sparse.

    R_C sums the entries at (row, c) for c in C (as the reference's sum does);
    `rest` is `vals` with the entries inside C zeroed, same (rows, cols).
    """
    cap = channels.shape[0]
    slot = torch.full((k,), -1, dtype=torch.int64, device=vals.device)
    slot = slot.scatter(0, channels, torch.arange(cap, device=vals.device))
    entry_slot = slot[cols]
    inside = entry_slot >= 0
    zero = torch.zeros_like(vals)
    dense = torch.zeros(m * cap, dtype=vals.dtype, device=vals.device)
    dense = dense.scatter_add(0, rows * cap + entry_slot.clamp(min=0), torch.where(inside, vals, zero))
    return dense.reshape(m, cap), torch.where(inside, zero, vals)


def split_bf16(r: torch.Tensor) -> torch.Tensor:
    """[hi | lo] along the last dim: hi = bf16(r), lo = bf16(r - hi), as float32 values.

    r - hi is exact in float32 (hi is r rounded to 8 significant bits: the
    difference is r's low bits), so hi + lo misses at most 2**-16 |r|
    (2**-8 of |r - hi| <= 2**-8 |r|).
    """
    hi = r.to(torch.bfloat16).to(r.dtype)
    lo = (r - hi).to(torch.bfloat16).to(r.dtype)
    return torch.cat([hi, lo], dim=-1)


def _use_split(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.float32


def _matmul(a: torch.Tensor, b: torch.Tensor, bf16_operands: bool) -> torch.Tensor:
    """a @ b in a's dtype; with bf16_operands, on BF16 tensor cores with float32 output.

    Both operands then hold bf16-representable values, so the bf16 casts are
    exact and every product is exact in the float32 accumulator.
    """
    if not bf16_operands:
        return a @ b
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    try:
        return torch.mm(a16, b16, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        # No bf16 -> float32 GEMM here (CPU): float32 on the same values, exact products.
        return a16.to(torch.float32) @ b16.to(torch.float32)


def _triton_sparse(vals: torch.Tensor, per_row):
    """The Triton sparse kernels (masked by value != 0), or None where they do not apply."""
    if per_row is None or not vals.is_cuda or vals.dtype != torch.float32:
        return None
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _sparse_forward(rows, cols, vals, w_deq_t, m, per_row=None):
    """sum over entries of vals * dequant(W).T[col] into row `row` (the reference's term).

    On CUDA (row scope, float32) a Triton kernel whose loads are masked by
    value != 0, so the entries the channel GEMM took cost nothing; elsewhere
    the reference's gather and index_add over every entry.
    """
    kernels = _triton_sparse(vals, per_row)
    if kernels is not None:
        return kernels.sparse_rows_matmul(vals.reshape(m, per_row), cols.reshape(m, per_row), w_deq_t)
    contrib = vals.unsqueeze(-1) * w_deq_t[cols]
    return w_deq_t.new_zeros(m, w_deq_t.shape[1]).index_add(0, rows, contrib)


def _sparse_weight_gradient(rows, cols, vals, g_rows, m, k, per_row=None):
    """[K, N]: sum over entries of vals * g_rows[row] into row `col` (the reference's index_add)."""
    kernels = _triton_sparse(vals, per_row)
    if kernels is not None:
        return kernels.sparse_rows_scatter(vals.reshape(m, per_row), cols.reshape(m, per_row), g_rows, k)
    contrib = vals.reshape(-1, 1) * g_rows[rows]
    return contrib.new_zeros(k, g_rows.shape[1]).index_add(0, cols, contrib)


def _entries_per_row(values: torch.Tensor, x_shape):
    """J for a row-scope residual ([..., J]), None for tensor scope."""
    return values.shape[-1] if values.dim() == len(x_shape) else None


def channel_compensation(values, index, x_shape, w_q, w_scale, cap: int | None = None,
                         bf16_split: bool | None = None):
    """Forward term R @ dequant(W).T (float compute dtype [M, N]) and what the backward needs.

    Returns (y [M, N], saved) with saved = (rows, cols, vals, channels).
    """
    rows, cols, vals, m, k = residual_entries(values, index, x_shape)
    per_row = _entries_per_row(values, x_shape)
    cap = channel_cap(k) if cap is None else cap
    use_split = _use_split(vals) if bf16_split is None else bf16_split
    channels = select_channels(residual_column_counts(cols, vals, k), cap)
    r_c, rest = split_residual(rows, cols, vals, channels, m, k)
    w_c = w_q.to(vals.dtype).index_select(1, channels)  # [N, |C|] grid values
    if use_split:
        y = _matmul(split_bf16(r_c), torch.cat([w_c, w_c], dim=1).t(), True)
    else:
        y = _matmul(r_c, w_c.t(), False)
    y = y * w_scale.to(vals.dtype).reshape(1, -1)
    w_deq_t = (w_q.to(vals.dtype) * w_scale.to(vals.dtype)).t()
    y = y + _sparse_forward(rows, cols, rest, w_deq_t, m, per_row)
    return y, (rows, cols, vals, channels)


def channel_weight_gradient(grad_y, rows, cols, vals, channels, x_scale, k: int, grad_fmt,
                            bf16_split: bool | None = None, per_row: int | None = None):
    """The residual's share of dW [N, K]: the reference `_Compensate.backward`, by channels.

    The residual entries are divided by the folded activation scale first (as
    the reference divides them), then split into R_C (one GEMM against the
    gradient operand) and the rest (index_add), then scaled by g_scale.
    """
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    m = g2.shape[0]
    xs2 = x_scale.reshape(-1, x_scale.shape[-1])
    g_op, g_scale, folded = gradient_operand(g2.t(), xs2, grad_fmt, vals.dtype)  # [N, M]
    if folded:
        vals = vals / xs2.reshape(-1).expand(m)[rows]
    use_split = _use_split(vals) if bf16_split is None else bf16_split
    r_c, rest = split_residual(rows, cols, vals, channels, m, k)
    cap = channels.shape[0]
    if use_split and g_scale is not None:
        # E5M2 grid values are exact in bf16 (2-bit mantissa, exponents inside
        # bf16's range): one half-size copy serves the GEMM and the sparse kernel.
        g_op = g_op.to(torch.bfloat16)
    if use_split:
        both = _matmul(g_op, split_bf16(r_c), True)  # [N, 2|C|]: hi and lo halves
        dw_c = both[:, :cap] + both[:, cap:]
    else:
        dw_c = _matmul(g_op, r_c, False)
    grad_w_t = _sparse_weight_gradient(rows, cols, rest, g_op.t(), m, k, per_row)
    if grad_w_t.dtype != vals.dtype:  # the CPU path with a bf16 operand: back to the compute dtype
        grad_w_t = grad_w_t.to(vals.dtype)
    grad_w_t = grad_w_t.index_add(0, channels, dw_c.t().to(grad_w_t.dtype))
    if g_scale is not None:
        grad_w_t = grad_w_t * g_scale
    return grad_w_t.t()


class _ChannelCompensate(torch.autograd.Function):
    """`compensate_op` with the work on the outlier channels done by dense GEMMs."""

    @staticmethod
    def forward(ctx, values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype):
        y, (rows, cols, vals, channels) = channel_compensation(values, index, x_shape, w_q, w_scale)
        ctx.save_for_backward(rows, cols, vals, channels, x_scale)
        ctx.k_features = x_shape[-1]
        ctx.per_row = _entries_per_row(values, x_shape)
        ctx.grad_fmt = grad_fmt
        return y.to(out_dtype).reshape(*x_shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        rows, cols, vals, channels, x_scale = ctx.saved_tensors
        grad_w = channel_weight_gradient(grad_y, rows, cols, vals, channels, x_scale, ctx.k_features, ctx.grad_fmt,
                                         per_row=ctx.per_row)
        return None, None, None, None, grad_w, None, None, None


def channel_compensate_op(values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype: torch.dtype):
    """`runtime.linear_ops.compensate_op` computed by outlier channels (same arguments, same sums)."""
    return _ChannelCompensate.apply(values, index, x_shape, x_scale, w_q, w_scale, grad_fmt, out_dtype)
