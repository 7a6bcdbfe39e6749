"""Triton kernels for the quantization steps of an FP4 linear layer on CUDA.

The runtime ops (`occ`, `quantize`, `dge`, `gemm`) are plain PyTorch, and
Inductor fuses most of them well. One step it cannot: the OCC thresholds are
per-row quantiles (torch.quantile's linear interpolation between the (c+1)-th
and c-th largest value, and the same at the bottom), which the runtime finds
with `topk` and Inductor leaves to the aten `topk` kernel (one selection per
side, then a gather for the sparse residual).

What the compiled model calls: with `cuda_compensation="fp8_folded"` (the
default), `folded_rows`: per activation row, the OCC thresholds, the clamp,
the E2M1 row quantization and the compensation folded into E4M3 codes
(`runtime/folded.py`), x read once for rows up to 16384 elements and swept in
chunks beyond (`lowering/cuda.py`, `folded_activation_op`). With
`cuda_compensation="channels"`, `occ_residual_rows`: each activation's row
thresholds and sparse residual (`triton_occ_clamp_op`); the clamp and the
quantization are then Inductor kernels that re-read x, and the channel
compensation uses `sparse_rows_matmul` / `sparse_rows_scatter`.

The other kernels here are built, tested and benchmarked, but not wired into
the compiled model yet: the fused activation path of SPEC.md sections 2 and 4
in one pass over each row, held in registers (`occ_quantize_rows[_sparse]`),

    selection of the (c+1)-th and c-th largest and smallest values
    (bitwise bisection on an order-preserving integer key, NaN ordered as torch
    orders it) -> interpolated, zero-clamped thresholds
    -> exact clamp/residual split (dense, or sparse as (values, index))
    -> row amax -> scale -> E2M1 (or E4M3) grid

and the weight rows (`quantize_rows`), the DGE backward (`dge_backward`) and the
per-tensor E5M2 gradient cast (`cast_gradient`). docs/cuda.md says what wiring
them would save (the roofline model's memory passes).

Every kernel computes bit for bit what its `*_reference` function computes with
the runtime ops, on the same float32 arithmetic:

- divisions use `tl.math.div_rn` (IEEE round-to-nearest; Triton's plain `/`
  is an approximate division on NVIDIA GPUs);
- grid rounding is written as exact arithmetic (the E2M1 step functions of
  `formats.round_e2m1`; FP8 grids by round-half-even on the float32 bit
  pattern), so the final store to a float8 tensor converts a value that is
  already on the grid and is exact whatever the hardware's conversion;
- the only exception is the DGE power `|t| ** (1/k - 1)`, computed with
  libdevice `pow` on GPU (the function Inductor calls for `torch.pow`) and in
  float64 under the interpreter; the CPU reference's `pow` is itself not
  correctly rounded, so the two agree to one float32 ulp, not bit for bit.

Values can be written as float8 (what the FP8 GEMM consumes) or as float32:
under the Triton interpreter (`TRITON_INTERPRET=1`, how the CPU tests run
these kernels) the float32 output is what the tests compare, since the grid
values, not the interpreter's float8 conversion, are under test.

Each launcher is registered with `torch.library.triton_op` (namespace
`fp4compile`), so a compiled graph can call it: AOTAutograd traces through the
`wrap_triton` calls and Inductor emits the kernels into its generated code.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice  # GPU only: the interpreter takes a float64 branch

from ..runtime.dge import dge_grad_scale
from ..runtime.formats import E2M1_MAX, E4M3_MAX
from ..runtime.occ import occ_split, occ_thresholds, outliers_per_side
from ..runtime.quantize import quantize, quantize_gradient

__all__ = [
    "MAX_ROW_LENGTH",
    "VALUE_FORMATS",
    "interpreting",
    "supports_row_kernel",
    "occ_thresholds_rows",
    "occ_residual_rows",
    "occ_quantize_rows",
    "occ_quantize_rows_sparse",
    "folded_rows",
    "folded_launch_config",
    "quantize_rows",
    "dge_backward",
    "cast_gradient",
    "sparse_rows_matmul",
    "sparse_rows_scatter",
    "occ_thresholds_reference",
    "occ_residual_rows_reference",
    "occ_quantize_rows_reference",
    "folded_rows_reference",
    "sparse_to_dense",
    "quantize_rows_reference",
    "dge_backward_reference",
    "cast_gradient_reference",
    "sparse_rows_matmul_reference",
    "sparse_rows_scatter_reference",
]

# The row kernels hold whole rows in registers, which is what makes the
# selection a single pass. A 16k-element row is 32 float32 per thread at 16
# warps; longer rows stay with the torch ops.
MAX_ROW_LENGTH = 16384
# Formats the row kernels quantize to: E2M1 (FP4) and E4M3 (the FP8 recipe).
VALUE_FORMATS = {"e2m1": 0, "e4m3": 1}
_FORMAT_MAX = {"e2m1": E2M1_MAX, "e4m3": E4M3_MAX}
# Store dtypes the kernels accept for grid values.
_VALUE_DTYPES = (torch.float8_e4m3fn, torch.float32)
_GRAD_DTYPES = (torch.float8_e5m2, torch.float32)
# Tile of the 2-D element-wise kernels (DGE, gradient cast).
_TILE_R, _TILE_C = 32, 128


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports_row_kernel(k: int) -> bool:
    """Whether a row of length `k` fits the one-row-per-program kernels."""
    return 1 <= k <= MAX_ROW_LENGTH


# ---------------------------------------------------------------------------
# Device helpers (inlined into the kernels).
# ---------------------------------------------------------------------------


@triton.jit
def _float_key(x, LOW_BITS: tl.constexpr):
    """An int32 key per float32 that orders like the floats under torch's sort order.

    Non-negative floats keep their bit pattern (monotonic); a negative float of
    magnitude bits m maps to -m - 2**LOW_BITS (decreasing in m, below every
    non-negative key, -0.0 just below +0.0). NaN gets 0x7FC00000, above +Inf, as
    torch's sort and topk put NaN above every number. Every key is a multiple of
    2**LOW_BITS when the low LOW_BITS mantissa bits of x are zero.
    """
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, -(bits & 0x7FFFFFFF) - (1 << LOW_BITS), bits)
    return tl.where(x != x, 0x7FC00000, key)


@triton.jit
def _key_to_float(key, LOW_BITS: tl.constexpr):
    """Inverse of `_float_key` (NaN comes back as the canonical quiet NaN)."""
    magnitude = -key - (1 << LOW_BITS)
    # Negative: magnitude bits with the sign bit set, i.e. magnitude - 2**31 in int32.
    bits = tl.where(key >= 0, key, (magnitude - 2147483647) - 1)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kth_largest_key(key, k, LOW_BITS: tl.constexpr):
    """Per row of `key` [BLOCK_M, BLOCK_K]: the k-th largest key (masked lanes hold INT_MIN).

    Bitwise bisection, no sort: the sign of the answer is whether at least k
    keys are >= 0; then the answer is built from bit 30 down, keeping a bit if
    at least k keys are >= the prefix with that bit set. Each step is one
    compare and one row reduction over the rows in registers. The result is the
    largest v with count(key >= v) >= k, which is exactly the k-th largest key.
    Bits below LOW_BITS are zero in every key (bf16 and fp16 inputs leave 16
    and 13 zero mantissa bits in float32), so the search stops there: 31 -
    LOW_BITS steps (15 for bf16, 31 for float32). Needs 1 <= k <= valid lanes.
    """
    n_nonneg = tl.sum((key >= 0).to(tl.int32), axis=1)
    found = tl.where(n_nonneg >= k, 0, -2147483647 - 1)
    for bit in tl.static_range(30, LOW_BITS - 1, -1):
        trial = found | (1 << bit)
        keep = tl.sum((key >= trial[:, None]).to(tl.int32), axis=1) >= k
        found = tl.where(keep, trial, found)
    return found


@triton.jit
def _inner_outer_keys(key, c, LOW_BITS: tl.constexpr):
    """Per row: the (c + 1)-th and the c-th largest key (the c-th is the (c + 1)-th when c = 0).

    One selection: at most c keys lie above the (c + 1)-th largest; if exactly
    c do, the c-th largest is the smallest of them (one min reduction), and if
    fewer do, the c-th largest ties with the (c + 1)-th.
    """
    inner = _kth_largest_key(key, c + 1, LOW_BITS)
    above = key > inner[:, None]
    n_above = tl.sum(above.to(tl.int32), axis=1)
    min_above = tl.min(tl.where(above, key, 2147483647), axis=1)
    outer = tl.where((n_above == c) & (c > 0), min_above, inner)
    return inner, outer


@triton.jit
def _interpolate(inner_key, outer_key, frac_num, frac_den, LOW_BITS: tl.constexpr):
    """`occ._interpolate`: inner + (outer - inner) * frac_num / frac_den, same rounding order."""
    inner = _key_to_float(inner_key, LOW_BITS)
    outer = _key_to_float(outer_key, LOW_BITS)
    return inner + tl.math.div_rn((outer - inner) * frac_num, frac_den)


@triton.jit
def _occ_row_thresholds(x, mask, c, frac_num, frac_den, LOW_BITS: tl.constexpr):
    """Per-row OCC thresholds [BLOCK_M]: `occ_thresholds(x, ..., "row")`, bit for bit.

    upper: the alpha quantile (torch.quantile's linear interpolation between the
    (c + 1)-th and the c-th largest value, in torch's order with NaN above
    everything), clamped at >= 0; lower: the 1 - alpha quantile between the
    (c + 1)-th and c-th smallest, the same selection on order-reversed keys,
    clamped at <= 0. A NaN threshold stays NaN (torch.clamp keeps NaN).
    """
    key = _float_key(x, LOW_BITS)
    up_inner, up_outer = _inner_outer_keys(tl.where(mask, key, -2147483647 - 1), c, LOW_BITS)
    upper = _interpolate(up_inner, up_outer, frac_num, frac_den, LOW_BITS)
    # Reversed order with the same key spacing (an involution): the k-th largest
    # reversed key is the reversed k-th smallest key.
    down_key = tl.where(mask, -key - (1 << LOW_BITS), -2147483647 - 1)
    dn_inner, dn_outer = _inner_outer_keys(down_key, c, LOW_BITS)
    lower = _interpolate(-dn_inner - (1 << LOW_BITS), -dn_outer - (1 << LOW_BITS), frac_num, frac_den, LOW_BITS)
    upper = tl.where(upper < 0.0, 0.0, upper)
    lower = tl.where(lower > 0.0, 0.0, lower)
    return upper, lower


@triton.jit
def _occ_row_split(x, upper, lower):
    """`occ_split` element-wise: (clamped, residual, above, below), clamped + residual == x.

    The same expressions in the same order as the runtime op, so the residual
    fl(x - t) and the clamped value x - residual are bit-identical to it. A
    clamped Inf keeps the threshold (its residual is the Inf); an unclamped one
    (an Inf that is itself the threshold) stays. `above`/`below` mark the
    entries clamped to the upper/lower threshold (never both: upper >= 0 >= lower).
    """
    above = x > upper
    below = x < lower
    is_clamped = above | below
    threshold = tl.where(above, upper, lower)
    residual = tl.where(is_clamped, x - threshold, 0.0)
    clamped = tl.where(is_clamped, x - residual, x)
    is_inf = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) == 0x7F800000
    clamped = tl.where(is_clamped & is_inf, threshold, clamped)
    return clamped, residual, above, below


@triton.jit
def _finish_scale(amax, FMAX: tl.constexpr):
    """`quantize._finish_scale(amax / fmax)` for one float32 amax >= 0 (or +Inf).

    An all-zero row gets scale 1, an Inf row scale Inf; a subnormal amax whose
    quotient underflows to 0 gets the smallest subnormal instead.
    """
    scale = tl.math.div_rn(amax, FMAX)
    tiny = tl.full([], 1, tl.int32).to(tl.float32, bitcast=True)  # smallest subnormal, 2**-149
    scale = tl.where((scale == 0.0) & (amax > 0.0), tiny, scale)
    scale = tl.where(amax == 0.0, 1.0, scale)
    is_inf = amax.to(tl.int32, bitcast=True) == 0x7F800000
    return tl.where(is_inf, amax, scale)


@triton.jit
def _power_of_two_scale(amax, FMAX: tl.constexpr):
    """`quantize.power_of_two_scale`: the smallest power of two >= amax / FMAX, on the bit pattern.

    ratio = amax / FMAX (IEEE). A normal ratio that is a power of two is its
    own answer; otherwise the next exponent up (what frexp + exp2 give). A
    subnormal ratio, mant * 2**-149, rounds up to the next power of two of the
    integer mant (exactly a float32 power of two, at most 2**-126). A zero
    ratio (an amax too small to divide) gives 1, as frexp(0) does; then the
    finishing rules of `_finish_scale`: zero amax -> 1, infinite amax -> Inf.
    """
    ratio = tl.math.div_rn(amax, FMAX)
    bits = ratio.to(tl.int32, bitcast=True)
    exp_field = bits >> 23
    mant = bits & 0x7FFFFF
    normal = tl.where(mant == 0, bits, (exp_field + 1) << 23)
    # Subnormal: floor(log2(mant)) from the exponent of mant as a float (exact, mant < 2**23).
    mant_bits = mant.to(tl.float32).to(tl.int32, bitcast=True)
    log2_floor = (mant_bits >> 23) - 127
    log2_ceil = tl.where((mant_bits & 0x7FFFFF) == 0, log2_floor, log2_floor + 1)
    subnormal = tl.full(log2_ceil.shape, 1, tl.int32) << tl.maximum(log2_ceil, 0)
    scale = tl.where(exp_field == 0, subnormal, normal).to(tl.float32, bitcast=True)
    scale = tl.where(bits == 0, 1.0, scale)
    scale = tl.where(amax == 0.0, 1.0, scale)
    is_inf = amax.to(tl.int32, bitcast=True) == 0x7F800000
    return tl.where(is_inf, amax, scale)


@triton.jit
def _nan_aware_abs(v, mask):
    """|v| with NaN and masked-off lanes as 0, ready for a max reduction."""
    return tl.where(mask & (v == v), tl.abs(v), 0.0)


@triton.jit
def _round_e2m1(v):
    """`formats.round_e2m1`: nearest E2M1 value, ties to even, saturating at +-6, NaN kept.

    The magnitude is the same sum of step functions; every partial sum is a
    small dyadic number, so the result is exact in any evaluation order. The
    sign bit of v is copied onto it (so -0.0 stays -0.0, like torch.copysign).
    """
    a = tl.abs(v)
    q = (
        0.5 * (a > 0.25).to(tl.float32)
        + 0.5 * (a >= 0.75).to(tl.float32)
        + 0.5 * (a > 1.25).to(tl.float32)
        + 0.5 * (a >= 1.75).to(tl.float32)
        + 1.0 * (a > 2.5).to(tl.float32)
        + 1.0 * (a >= 3.5).to(tl.float32)
        + 2.0 * (a > 5.0).to(tl.float32)
    )
    v_bits = v.to(tl.int32, bitcast=True)
    sign = v_bits ^ (v_bits & 0x7FFFFFFF)
    q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, q)


@triton.jit
def _round_fp8_grid(v, FMAX: tl.constexpr, SHIFT: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr):
    """`formats.round_fp8` without a float8 conversion: saturate, then round half to even.

    SHIFT = 23 - mantissa bits of the format. Normal numbers: round the float32
    bit pattern to SHIFT fewer mantissa bits, half to even (a carry into the
    exponent is the correct result). Below the format's smallest normal number
    the grid is uniform with step MIN_NORMAL * 2**-mbits; adding MAGIC =
    step * 2**23 puts that step at the float32 ulp, so (|v| + MAGIC) - MAGIC is
    the round-half-even subnormal. Saturation first, as `round_fp8` clamps; NaN
    passes through. Exact in float32, hence equal to torch's own cast.
    """
    v = tl.where(v > FMAX, FMAX, tl.where(v < -FMAX, -FMAX, v))  # keeps NaN
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = bits ^ mag
    half = (1 << (SHIFT - 1)) - 1
    normal = (mag + half + ((mag >> SHIFT) & 1)) & ~((1 << SHIFT) - 1)
    a = mag.to(tl.float32, bitcast=True)
    subnormal = ((a + MAGIC) - MAGIC).to(tl.int32, bitcast=True)
    r = tl.where(a < MIN_NORMAL, subnormal, normal)
    out = (r | sign).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, out)


@triton.jit
def _round_to_format(v, FMT: tl.constexpr):
    """Grid rounding of an already-scaled value: FMT 0 = E2M1, 1 = E4M3."""
    if FMT == 0:
        return _round_e2m1(v)
    else:
        # E4M3 (float8_e4m3fn): 3 mantissa bits, max 448, smallest normal 2**-6.
        return _round_fp8_grid(v, 448.0, 20, 0.015625, 16384.0)


@triton.jit
def _load_rows(x_ptr, M, K, stride_x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_M rows as float32 [BLOCK_M, BLOCK_K] (0 outside), their
    row indices, the column indices (broadcast to the block), the flat offsets of
    a contiguous [M, K] output, and the masks.

    The widening to float32 is exact when compiled, bf16 subnormals included.
    Triton's CPU interpreter (TRITON_INTERPRET=1, 3.x) widens nonzero bf16
    subnormals wrongly (0x0001 -> 0.0, 0x0003 -> 2**-127): an artefact of its
    emulation, accounted for in tests/test_triton_kernels.py."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_offs = rows64[:, None] * K + cols[None, :]
    cols2d = out_offs - rows64[:, None] * K
    return x, rows64, cols2d, row_mask, out_offs, mask


# ---------------------------------------------------------------------------
# Kernels. The row kernels give each program BLOCK_M whole rows.
# ---------------------------------------------------------------------------


@triton.jit
def _quantize_store_rows(x, values_ptr, scale_ptr, rows, row_mask, out_offs, mask,
                         FMT: tl.constexpr, FMAX: tl.constexpr):
    """Row absmax scale, grid rounding, and the stores of values and scales."""
    amax = tl.max(_nan_aware_abs(x, mask), axis=1)
    scale = _finish_scale(amax, FMAX)
    values = _round_to_format(tl.math.div_rn(x, scale[:, None]), FMT)
    tl.store(values_ptr + out_offs, values.to(values_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=row_mask)


@triton.jit
def _occ_rows_kernel(x_ptr, values_ptr, scale_ptr, residual_ptr, r_values_ptr, r_index_ptr,
                     upper_ptr, lower_ptr, count_ptr,
                     M, K, stride_x, c_outliers, frac_num, frac_den,
                     QUANTIZE: tl.constexpr, DENSE_RESIDUAL: tl.constexpr, SPARSE_RESIDUAL: tl.constexpr,
                     FMT: tl.constexpr, FMAX: tl.constexpr, LOW_BITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OCC of activation rows, and optionally their quantization, in one pass over each row.

    Always: per-row thresholds (the selection above) -> upper/lower [M] and the
    number of clamped entries count [M] (int32). Then, as the constexprs ask:

    - SPARSE_RESIDUAL: the residual as (values, index) [M, 2c], the form
      `_OccClamp` hands to the compensation. Entries clamped to the upper
      threshold fill slots [0, c), those clamped to the lower one slots
      [c, 2c), each in column order (a prefix count gives the slot); unused
      slots keep the launcher's zeros (value 0, index 0). Clamped entries lie
      strictly beyond the quantile, hence beyond the (c + 1)-th value: at most
      c per side, so they fit.
    - DENSE_RESIDUAL: the residual [M, K] in the output's dtype.
    - QUANTIZE: amax of the clamped row, scale = amax / FMAX [M], and the grid
      values of clamped / scale [M, K] (float8_e4m3fn or float32 store).
    """
    x, rows, cols, row_mask, out_offs, mask = _load_rows(x_ptr, M, K, stride_x, BLOCK_M, BLOCK_K)
    upper, lower = _occ_row_thresholds(x, mask, c_outliers, frac_num, frac_den, LOW_BITS)
    clamped, residual, above, below = _occ_row_split(x, upper[:, None], lower[:, None])
    above = above & mask
    below = below & mask
    is_clamped = above | below
    tl.store(upper_ptr + rows, upper, mask=row_mask)
    tl.store(lower_ptr + rows, lower, mask=row_mask)
    tl.store(count_ptr + rows, tl.sum(is_clamped.to(tl.int32), axis=1), mask=row_mask)
    if SPARSE_RESIDUAL:
        up_slot = tl.cumsum(above.to(tl.int32), axis=1) - 1
        lo_slot = c_outliers + tl.cumsum(below.to(tl.int32), axis=1) - 1
        slot_offs = rows[:, None] * (2 * c_outliers) + tl.where(above, up_slot, lo_slot)
        tl.store(r_values_ptr + slot_offs, residual.to(r_values_ptr.dtype.element_ty), mask=is_clamped)
        tl.store(r_index_ptr + slot_offs, cols.to(tl.int64), mask=is_clamped)
    if DENSE_RESIDUAL:
        tl.store(residual_ptr + out_offs, residual.to(residual_ptr.dtype.element_ty), mask=mask)
    if QUANTIZE:
        _quantize_store_rows(clamped, values_ptr, scale_ptr, rows, row_mask, out_offs, mask, FMT, FMAX)


@triton.jit
def _fold_row_chunk(x, upper, lower, x_s, mask):
    """Per element of a row chunk: v = E2M1(clamped / x_s) + residual / x_s (`runtime.folded`).

    The clamp/residual split, the E2M1 rounding and the divisions are those of
    `occ_split`, `quantize` and `fold_compensation_e4m3`, in the same order, so v
    is bit-identical to the reference's float32 value.
    """
    clamped, residual, _, _ = _occ_row_split(x, upper[:, None], lower[:, None])
    x_q = _round_e2m1(tl.math.div_rn(clamped, x_s[:, None]))
    return tl.where(mask, x_q + tl.math.div_rn(residual, x_s[:, None]), 0.0)


@triton.jit
def _clamped_abs(x, upper, lower, mask):
    clamped, _, _, _ = _occ_row_split(x, upper[:, None], lower[:, None])
    return _nan_aware_abs(clamped, mask)


@triton.jit
def _fold_factor(vmax):
    """2**e, e = smallest integer >= 0 with vmax / 2**e <= 448, capped at 8 (`folded.fold_exponent`).

    Eight exact comparisons against 448 * 2**j; no logarithm, no rounding.
    """
    factor = tl.full(vmax.shape, 1.0, tl.float32)
    for j in tl.static_range(8):
        factor = tl.where(vmax > 448.0 * (2.0 ** j), 2.0 ** (j + 1), factor)
    return factor


@triton.jit
def _folded_rows_kernel(x_ptr, bounds_ptr, codes_ptr, scale_ptr, M, K, stride_x, c_outliers, frac_num, frac_den,
                        IN_KERNEL_THRESHOLDS: tl.constexpr, ONE_CHUNK: tl.constexpr, LOW_BITS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OCC + E2M1 quantization + compensation folded into E4M3 codes, per activation row.

    `runtime.folded.folded_activation_reference` for row-scope OCC and row
    scales, bit for bit: codes = E4M3(v / 2**e) [M, K], scale = x_s * 2**e [M].

    ONE_CHUNK (K <= BLOCK_K): the row is loaded once and stays in registers
    for every step; with IN_KERNEL_THRESHOLDS the OCC thresholds are selected
    here too (`_occ_row_thresholds`), so x is read from memory exactly once.
    Otherwise (rows of any length) the thresholds come from `bounds_ptr`
    ([M, 2] float32: upper, lower) and the row is swept three times in chunks
    of BLOCK_K: the clamped row's amax (-> x_s), then max|v| (-> 2**e), then
    the codes. The second and third sweeps re-read a row this program has just
    read (from cache on a GPU: a row of 32k bf16 values is 64 KB).
    """
    if ONE_CHUNK:
        x, rows, cols, row_mask, out_offs, mask = _load_rows(x_ptr, M, K, stride_x, BLOCK_M, BLOCK_K)
        if IN_KERNEL_THRESHOLDS:
            upper, lower = _occ_row_thresholds(x, mask, c_outliers, frac_num, frac_den, LOW_BITS)
        else:
            upper = tl.load(bounds_ptr + rows * 2, mask=row_mask, other=0.0)
            lower = tl.load(bounds_ptr + rows * 2 + 1, mask=row_mask, other=0.0)
        x_s = _finish_scale(tl.max(_clamped_abs(x, upper, lower, mask), axis=1), 6.0)
        v = _fold_row_chunk(x, upper, lower, x_s, mask)
        factor = _fold_factor(tl.max(_nan_aware_abs(v, mask), axis=1))
        codes = _round_to_format(tl.math.div_rn(v, factor[:, None]), 1)
        tl.store(codes_ptr + out_offs, codes.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, x_s * factor, mask=row_mask)
    else:
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        upper = tl.load(bounds_ptr + rows64 * 2, mask=row_mask, other=0.0)
        lower = tl.load(bounds_ptr + rows64 * 2 + 1, mask=row_mask, other=0.0)
        offs = tl.arange(0, BLOCK_K)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = row_mask[:, None] & (cols[None, :] < K)
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(_clamped_abs(x, upper, lower, mask), axis=1))
        x_s = _finish_scale(amax, 6.0)
        vmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = row_mask[:, None] & (cols[None, :] < K)
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = _fold_row_chunk(x, upper, lower, x_s, mask)
            vmax = tl.maximum(vmax, tl.max(_nan_aware_abs(v, mask), axis=1))
        factor = _fold_factor(vmax)
        for start in range(0, K, BLOCK_K):
            cols = start + offs
            mask = row_mask[:, None] & (cols[None, :] < K)
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            v = _fold_row_chunk(x, upper, lower, x_s, mask)
            codes = _round_to_format(tl.math.div_rn(v, factor[:, None]), 1)
            tl.store(codes_ptr + rows64[:, None] * K + cols[None, :], codes.to(codes_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(scale_ptr + rows64, x_s * factor, mask=row_mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, values_ptr, scale_ptr, M, K, stride_x,
                          FMT: tl.constexpr, FMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row quantization without OCC (weights [out, in]: one scale per output channel)."""
    x, rows, cols, row_mask, out_offs, mask = _load_rows(x_ptr, M, K, stride_x, BLOCK_M, BLOCK_K)
    _quantize_store_rows(x, values_ptr, scale_ptr, rows, row_mask, out_offs, mask, FMT, FMAX)


@triton.jit
def _dge_backward_kernel(w_ptr, scale_ptr, grad_ptr, out_ptr, N, K,
                         stride_w, stride_g, exponent, k_value, clamp,
                         HAS_CLAMP: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """DGE weight gradient: out = grad * dge_grad_scale(w / scale[row]), fused.

    The expressions and their order are those of `dge.dge_grad_scale`:
    interval start and width of |x| (clamped at 6), t = |2(|x| - a)/d - 1|,
    slope = t ** (1/k - 1) / k, capped at `clamp`, 0 where |x| > 6, NaN kept.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + rows64[:, None] * stride_w + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rows64, mask=rows < N, other=1.0)
    x = tl.math.div_rn(w, s[:, None])
    a = tl.abs(x)
    a_cap = tl.where(a > 6.0, 6.0, a)
    d = tl.where(a_cap < 2.0, 0.5, tl.where(a_cap < 4.0, 1.0, 2.0))
    start = tl.where(a_cap < 4.0, tl.floor(tl.math.div_rn(a_cap, d)) * d, 4.0)
    t = tl.abs(tl.math.div_rn(2.0 * (a - start), d) - 1.0)
    if USE_LIBDEVICE:
        p = libdevice.pow(t, exponent)
    else:
        # Interpreter: float64 exp2/log2, then one rounding to float32.
        p = tl.exp2(tl.log2(t.to(tl.float64)) * exponent).to(tl.float32)
    slope = tl.math.div_rn(p, k_value)
    if HAS_CLAMP:
        slope = tl.where(slope > clamp, clamp, slope)  # keeps NaN, like torch.clamp
    slope = tl.where(a > 6.0, 0.0, slope)
    slope = tl.where(x != x, x, slope)
    g = tl.load(grad_ptr + rows64[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = g * slope
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_folded(g_ptr, fold_ptr, rows, cols, R, C, stride_r, stride_c, FOLD: tl.constexpr):
    """A tile of g (any strides) as float32, times fold[row] (FOLD=1) or fold[col] (FOLD=2)."""
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if FOLD == 1:
        g = g * tl.load(fold_ptr + rows, mask=rows < R, other=1.0)[:, None]
    elif FOLD == 2:
        g = g * tl.load(fold_ptr + cols, mask=cols < C, other=1.0)[None, :]
    return g, mask


@triton.jit
def _grad_amax_kernel(g_ptr, fold_ptr, partial_ptr, R, C, stride_r, stride_c,
                      FOLD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 1 of the gradient cast: NaN-aware amax of (g * fold) per tile."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    g, mask = _load_folded(g_ptr, fold_ptr, rows, cols, R, C, stride_r, stride_c, FOLD)
    tile_max = tl.max(tl.max(_nan_aware_abs(g, mask), axis=1), axis=0)
    tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_c, tile_max)


@triton.jit
def _grad_cast_kernel(g_ptr, fold_ptr, amax_ptr, values_ptr, scale_ptr, R, C, stride_r, stride_c,
                      FOLD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 2: scale = the power of two >= amax / 57344, values = E5M2 grid of
    (g * fold) / scale, written [R, C] contiguous.

    Reading g through strides and writing contiguously makes the transpose the
    weight-gradient GEMM needs (g.T as its row-major left operand) part of the cast.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    g, mask = _load_folded(g_ptr, fold_ptr, rows, cols, R, C, stride_r, stride_c, FOLD)
    # E5M2 (formats.E5M2_MAX = 57344): 2 mantissa bits, smallest normal 2**-14.
    # A power-of-two scale, so the division below is exact.
    scale = _power_of_two_scale(tl.load(amax_ptr), 57344.0)
    values = _round_fp8_grid(tl.math.div_rn(g, scale), 57344.0, 21, 6.103515625e-05, 128.0)
    out_ptrs = values_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptrs, values.to(values_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale, mask=(pid_r == 0) & (pid_c == 0))


# The sparse part of the channel compensation (lowering/cuda_compensation.py):
# entries outside the channel set C, most of them zero once C covers the
# outliers. Every load and atomic is masked by `value != 0`, so a zero entry
# costs no memory traffic: the work follows the non-zero entries, not the
# fixed [M, J] shape the graph carries.
_SPARSE_BLOCK_M, _SPARSE_BLOCK_N = 16, 128


@triton.jit
def _sparse_rows_matmul_kernel(v_ptr, i_ptr, wt_ptr, out_ptr, M, N, J, stride_wk, stride_wn,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, :] = sum_j v[m, j] * wt[i[m, j], :] (float32), v and i [M, J], wt [K, N] (any strides)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, J):
        v = tl.load(v_ptr + rows64 * J + j, mask=row_mask, other=0.0)
        k = tl.load(i_ptr + rows64 * J + j, mask=row_mask & (v != 0), other=0)
        live = (v != 0)[:, None] & col_mask[None, :]
        w = tl.load(wt_ptr + k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn, mask=live, other=0.0)
        acc += v[:, None] * w.to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * N + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _sparse_rows_scatter_kernel(v_ptr, i_ptr, g_ptr, out_ptr, M, N, J, stride_gm, stride_gn,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i[m, j], :] += v[m, j] * g[m, :] (float32 atomics), out [K, N] zero-initialised, g any strides."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    for j in range(0, J):
        v = tl.load(v_ptr + rows64 * J + j, mask=row_mask, other=0.0)
        k = tl.load(i_ptr + rows64 * J + j, mask=row_mask & (v != 0), other=0)
        live = (v != 0)[:, None] & col_mask[None, :]
        # g's row is read only where this row has a live entry (L1/L2 serve repeats).
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols.to(tl.int64)[None, :] * stride_gn, mask=live,
                    other=0.0)
        tl.atomic_add(out_ptr + k[:, None] * N + cols[None, :], v[:, None] * g.to(tl.float32), mask=live)



# ---------------------------------------------------------------------------
# Launchers (custom ops, traceable by torch.compile).
# ---------------------------------------------------------------------------


def _row_launch_config(row_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) for rows of length row_len: whole rows per program.

    Short rows are batched (up to 16 per program, about 2048 elements) so that
    small K does not leave most lanes of a program idle. The choice depends on
    K only, never on M, so a dynamic token count does not specialise the graph.
    """
    if not supports_row_kernel(row_len):
        raise ValueError(f"row length K={row_len} is outside the row kernels' range 1..{MAX_ROW_LENGTH}")
    block_k = triton.next_power_of_2(row_len)
    block_m = max(1, min(16, 2048 // block_k))
    elements = block_m * block_k
    num_warps = 4 if elements <= 2048 else (8 if elements <= 8192 else 16)
    return block_m, block_k, num_warps


def _low_zero_bits(dtype: torch.dtype) -> int:
    """Mantissa bits that are zero in every float32 converted from `dtype`."""
    return {torch.bfloat16: 16, torch.float16: 13}.get(dtype, 0)


def _as_float32(v: float) -> float:
    """v rounded to float32, as torch rounds a Python scalar used with a float32 tensor."""
    return float(torch.tensor(float(v), dtype=torch.float32))


def _check_rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} takes a 2-D tensor [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} takes float32/bfloat16/float16 input, got {x.dtype}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} needs a row-contiguous input (stride(-1) == 1)")


def _check_choice(name, value, valid):
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; valid: {', '.join(map(str, valid))}")


def _launch_occ(x, alpha_num, alpha_den, *, quantize_fmt=None, values_dtype=None,
                dense_residual_dtype=None, sparse_residual=False):
    """Allocate the outputs the variant needs and run `_occ_rows_kernel` once.

    Returns a dict of outputs; outputs a variant does not produce are not in it.
    """
    M, K = x.shape
    block_m, block_k, num_warps = _row_launch_config(K)
    c = outliers_per_side(K, alpha_num, alpha_den)
    # Interpolation weight of the quantile, (alpha * (K - 1)) mod 1 = frac_num /
    # alpha_den: integers below 2**24, so exact as float32 kernel arguments.
    frac_num = (alpha_num * (K - 1)) % alpha_den
    dev = x.device

    def ptr(name):  # an output, or a stand-in the kernel never touches (its store is compiled out)
        return out[name] if name in out else torch.empty((1,), device=dev, dtype=torch.float32)

    out = {
        "upper": torch.empty((M, 1), device=dev, dtype=torch.float32),
        "lower": torch.empty((M, 1), device=dev, dtype=torch.float32),
        "count": torch.empty((M,), device=dev, dtype=torch.int32),
    }
    if quantize_fmt is not None:
        out["values"] = torch.empty((M, K), device=dev, dtype=values_dtype)
        out["scale"] = torch.empty((M, 1), device=dev, dtype=torch.float32)
    if dense_residual_dtype is not None:
        out["residual"] = torch.empty((M, K), device=dev, dtype=dense_residual_dtype)
    if sparse_residual:
        # Unused slots stay (0.0, index 0): they add nothing to the compensation.
        out["r_values"] = torch.zeros((M, 2 * c), device=dev, dtype=torch.float32)
        out["r_index"] = torch.zeros((M, 2 * c), device=dev, dtype=torch.int64)
    if M > 0:
        wrap_triton(_occ_rows_kernel)[(triton.cdiv(M, block_m),)](
            x, ptr("values"), ptr("scale"), ptr("residual"), ptr("r_values"), ptr("r_index"),
            out["upper"],
            out["lower"],
            out["count"],
            M, K, x.stride(0), c, float(frac_num), float(alpha_den),
            QUANTIZE=quantize_fmt is not None,
            DENSE_RESIDUAL=dense_residual_dtype is not None,
            SPARSE_RESIDUAL=sparse_residual,
            FMT=VALUE_FORMATS.get(quantize_fmt, 0),
            FMAX=_FORMAT_MAX.get(quantize_fmt, 1.0),
            LOW_BITS=_low_zero_bits(x.dtype),
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )
    return out


@triton_op("fp4compile::occ_thresholds_rows", mutates_args=())
def occ_thresholds_rows(x: torch.Tensor, alpha_num: int, alpha_den: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row OCC thresholds of a 2-D tensor: (upper [M, 1], lower [M, 1]) float32.

    Equals `occ_thresholds(x.float(), alpha_num, alpha_den, "row")` exactly.
    """
    _check_rows(x, "occ_thresholds_rows")
    out = _launch_occ(x, alpha_num, alpha_den)
    return out["upper"], out["lower"]


@triton_op("fp4compile::occ_residual_rows", mutates_args=())
def occ_residual_rows(
    x: torch.Tensor, alpha_num: int, alpha_den: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row OCC thresholds and sparse residual: (upper, lower, r_values, r_index, count).

    `r_values` [M, 2c] float32 and `r_index` [M, 2c] int64 hold the
    same non-zero residual entries as `_OccClamp`'s (values, index), each
    exactly; the order of the entries within a row, and the positions of the
    zero padding, differ (column order here, topk order there). The clamped
    activation is then `occ_split(x, upper, lower)[0]`, which Inductor fuses
    into the quantization that reads it.
    """
    _check_rows(x, "occ_residual_rows")
    out = _launch_occ(x, alpha_num, alpha_den, sparse_residual=True)
    return out["upper"], out["lower"], out["r_values"], out["r_index"], out["count"]


@triton_op("fp4compile::occ_quantize_rows", mutates_args=())
def occ_quantize_rows(
    x: torch.Tensor,
    alpha_num: int,
    alpha_den: int,
    fmt: str = "e2m1",
    values_dtype: torch.dtype = torch.float8_e4m3fn,
    residual_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OCC clamp + row quantization of activations [M, K] in one pass, dense residual.

    Returns (values [M, K] in `values_dtype`, scale [M, 1] float32, residual
    [M, K] in `residual_dtype`, upper [M, 1], lower [M, 1], count [M] int32),
    equal to `occ_quantize_rows_reference` (float32 residual: exactly).
    """
    _check_rows(x, "occ_quantize_rows")
    _check_choice("fmt", fmt, tuple(VALUE_FORMATS))
    _check_choice("values_dtype", values_dtype, _VALUE_DTYPES)
    out = _launch_occ(x, alpha_num, alpha_den, quantize_fmt=fmt, values_dtype=values_dtype,
                      dense_residual_dtype=residual_dtype)
    return out["values"], out["scale"], out["residual"], out["upper"], out["lower"], out["count"]


@triton_op("fp4compile::occ_quantize_rows_sparse", mutates_args=())
def occ_quantize_rows_sparse(
    x: torch.Tensor,
    alpha_num: int,
    alpha_den: int,
    fmt: str = "e2m1",
    values_dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """OCC clamp + row quantization in one pass, sparse residual (see `occ_residual_rows`).

    Returns (values, scale, r_values, r_index, upper, lower, count): the
    activation path's whole output, with no [M, K] tensor but the grid values.
    """
    _check_rows(x, "occ_quantize_rows_sparse")
    _check_choice("fmt", fmt, tuple(VALUE_FORMATS))
    _check_choice("values_dtype", values_dtype, _VALUE_DTYPES)
    out = _launch_occ(x, alpha_num, alpha_den, quantize_fmt=fmt, values_dtype=values_dtype, sparse_residual=True)
    return (out["values"], out["scale"], out["r_values"], out["r_index"],
            out["upper"], out["lower"], out["count"])


# Chunk of the folded kernel's sweeps over rows longer than MAX_ROW_LENGTH.
_FOLD_CHUNK = 4096


def folded_launch_config(row_len: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, BLOCK_K, num_warps, one_chunk) of `folded_rows` for rows of length row_len.

    Rows up to MAX_ROW_LENGTH: whole rows in registers (`_row_launch_config`),
    thresholds selected in the kernel, x read once. Longer rows: one row per
    program, swept in chunks of 4096. Depends on K only (no specialisation on M).
    """
    if row_len < 1:
        raise ValueError(f"folded_rows needs rows of at least one element, got K={row_len}")
    if supports_row_kernel(row_len):
        return (*_row_launch_config(row_len), True)
    return 1, _FOLD_CHUNK, 8, False


@triton_op("fp4compile::folded_rows", mutates_args=())
def folded_rows(
    x: torch.Tensor, alpha_num: int, alpha_den: int, codes_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-scope OCC, E2M1 row quantization and the compensation folded into E4M3 codes, in one kernel.

    Returns (codes [M, K] in `codes_dtype`, float8_e4m3fn or float32; scale
    [M, 1] float32), equal to `folded_rows_reference` (codes as numbers: the
    kernel rounds to the E4M3 grid in float32 arithmetic, so the float8 store
    converts a value already on the grid). Any K >= 1: rows up to
    MAX_ROW_LENGTH select their thresholds in the kernel and read x once;
    longer rows take their thresholds from the runtime's top-k
    (`occ_thresholds`, the same numbers) and are swept in chunks.
    """
    _check_rows(x, "folded_rows")
    _check_choice("codes_dtype", codes_dtype, _VALUE_DTYPES)
    M, K = x.shape
    block_m, block_k, num_warps, one_chunk = folded_launch_config(K)
    codes = torch.empty((M, K), device=x.device, dtype=codes_dtype)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    c = outliers_per_side(K, alpha_num, alpha_den)
    frac_num = (alpha_num * (K - 1)) % alpha_den  # as in `_launch_occ`: exact float32 arguments
    if one_chunk:
        bounds = torch.empty((1,), device=x.device, dtype=torch.float32)  # not read
    else:
        upper, lower = occ_thresholds(x.to(torch.float32), alpha_num, alpha_den, "row")
        bounds = torch.cat([upper, lower], dim=-1).contiguous()
    if M > 0:
        wrap_triton(_folded_rows_kernel)[(triton.cdiv(M, block_m),)](
            x, bounds, codes, scale, M, K, x.stride(0), c, float(frac_num), float(alpha_den),
            IN_KERNEL_THRESHOLDS=one_chunk, ONE_CHUNK=one_chunk, LOW_BITS=_low_zero_bits(x.dtype),
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )
    return codes, scale


@triton_op("fp4compile::quantize_rows", mutates_args=())
def quantize_rows(
    x: torch.Tensor, fmt: str = "e2m1", values_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax quantization [M, K] -> (values [M, K], scale [M, 1] float32).

    For weights [out, in] this is the per-output-channel scaling of SPEC.md
    section 2; equal to `quantize(x.float(), "row", fmt)` exactly.
    """
    _check_rows(x, "quantize_rows")
    _check_choice("fmt", fmt, tuple(VALUE_FORMATS))
    _check_choice("values_dtype", values_dtype, _VALUE_DTYPES)
    M, K = x.shape
    block_m, block_k, num_warps = _row_launch_config(K)
    values = torch.empty((M, K), device=x.device, dtype=values_dtype)
    scale = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    if M > 0:
        wrap_triton(_quantize_rows_kernel)[(triton.cdiv(M, block_m),)](
            x, values, scale, M, K, x.stride(0),
            FMT=VALUE_FORMATS[fmt], FMAX=_FORMAT_MAX[fmt], BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps,
        )
    return values, scale


@triton_op("fp4compile::dge_backward", mutates_args=())
def dge_backward(
    w: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, dge_k: float = 5.0, dge_clamp: float | None = 3.0
) -> torch.Tensor:
    """Weight gradient through DGE: `grad * dge_grad_scale(w / scale, dge_k, dge_clamp)` in w's dtype.

    w and grad are [N, K] with contiguous rows, scale is the row scale [N, 1].
    """
    _check_rows(w, "dge_backward")
    if grad.shape != w.shape or grad.stride(-1) != 1:
        raise ValueError(f"dge_backward: grad must be row-contiguous with w's shape {tuple(w.shape)}")
    N, K = w.shape
    scale = scale.reshape(N).to(torch.float32).contiguous()
    out = torch.empty((N, K), device=w.device, dtype=w.dtype)
    if N > 0 and K > 0:
        grid = (triton.cdiv(N, _TILE_R), triton.cdiv(K, _TILE_C))
        wrap_triton(_dge_backward_kernel)[grid](
            w, scale, grad, out, N, K, w.stride(0), grad.stride(0),
            _as_float32(1.0 / dge_k - 1.0), _as_float32(dge_k), _as_float32(0.0 if dge_clamp is None else dge_clamp),
            HAS_CLAMP=dge_clamp is not None, USE_LIBDEVICE=not interpreting(),
            BLOCK_R=_TILE_R, BLOCK_C=_TILE_C,
        )
    return out


@triton_op("fp4compile::cast_gradient", mutates_args=())
def cast_gradient(
    g: torch.Tensor,
    fold: torch.Tensor | None = None,
    fold_dim: int = 1,
    values_dtype: torch.dtype = torch.float8_e5m2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled E5M2 cast of `g * fold`: (values [R, C] contiguous, scale [1, 1]).

    `fold` is a row scale of the GEMM's other operand: along dim 1 it multiplies
    g's columns (`g * fold.reshape(1, -1)`, as `gemm.gradient_gemm` folds it),
    along dim 0 its rows. g may be any 2-D view (e.g. a transpose): the values
    come out contiguous. Equal to `quantize_gradient(g.float() * fold, "e5m2")`.
    """
    if g.dim() != 2:
        raise ValueError(f"cast_gradient takes a 2-D tensor, got shape {tuple(g.shape)}")
    _check_choice("values_dtype", values_dtype, _GRAD_DTYPES)
    _check_choice("fold_dim", fold_dim, (0, 1))
    R, C = g.shape
    fold_mode = 0
    if fold is not None:
        fold = fold.reshape(-1).to(torch.float32).contiguous()
        if fold.numel() != g.shape[fold_dim]:
            raise ValueError(f"fold has {fold.numel()} entries, g has {g.shape[fold_dim]} along dim {fold_dim}")
        fold_mode = 1 if fold_dim == 0 else 2
    else:
        fold = torch.empty((1,), device=g.device, dtype=torch.float32)
    values = torch.empty((R, C), device=g.device, dtype=values_dtype)
    scale = torch.empty((1, 1), device=g.device, dtype=torch.float32)
    grid = (max(triton.cdiv(R, _TILE_R), 1), max(triton.cdiv(C, _TILE_C), 1))
    partial = torch.zeros((grid[0] * grid[1],), device=g.device, dtype=torch.float32)
    if R > 0 and C > 0:
        wrap_triton(_grad_amax_kernel)[grid](
            g, fold, partial, R, C, g.stride(0), g.stride(1),
            FOLD=fold_mode, BLOCK_R=_TILE_R, BLOCK_C=_TILE_C,
        )
    amax = partial.amax().reshape(1)
    wrap_triton(_grad_cast_kernel)[grid](
        g, fold, amax, values, scale, R, C, g.stride(0), g.stride(1),
        FOLD=fold_mode, BLOCK_R=_TILE_R, BLOCK_C=_TILE_C,
    )
    return values, scale


def _check_sparse(values: torch.Tensor, index: torch.Tensor, dense: torch.Tensor, name: str) -> None:
    if values.dim() != 2 or values.shape != index.shape:
        raise ValueError(f"{name}: values and index must be [M, J] of one shape, got "
                         f"{tuple(values.shape)} and {tuple(index.shape)}")
    if values.dtype != torch.float32 or index.dtype != torch.int64 or dense.dtype not in (torch.float32,
                                                                                            torch.bfloat16):
        raise ValueError(f"{name}: needs float32 values, int64 index and a float32 or bfloat16 dense operand")
    if dense.dim() != 2:
        raise ValueError(f"{name}: the dense operand must be 2-D, got shape {tuple(dense.shape)}")


@triton_op("fp4compile::sparse_rows_matmul", mutates_args=())
def sparse_rows_matmul(values: torch.Tensor, index: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """out [M, N] float32, out[m] = sum_j values[m, j] * wt[index[m, j]]; zero entries cost nothing.

    values/index [M, J] (a row-scope sparse residual), wt [K, N] contiguous
    (the dequantized weight, transposed). Equal to `sparse_rows_matmul_reference`
    up to float32 summation order. wt may be any 2-D view (e.g. `w.t()`).
    """
    _check_sparse(values, index, wt, "sparse_rows_matmul")
    m, j = values.shape
    n = wt.shape[1]
    out = torch.empty((m, n), device=values.device, dtype=torch.float32)
    if m > 0 and n > 0:
        grid = (triton.cdiv(m, _SPARSE_BLOCK_M), triton.cdiv(n, _SPARSE_BLOCK_N))
        wrap_triton(_sparse_rows_matmul_kernel)[grid](
            values.contiguous(), index.contiguous(), wt, out, m, n, j, wt.stride(0), wt.stride(1),
            BLOCK_M=_SPARSE_BLOCK_M, BLOCK_N=_SPARSE_BLOCK_N)
    return out


@triton_op("fp4compile::sparse_rows_scatter", mutates_args=())
def sparse_rows_scatter(values: torch.Tensor, index: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """out [K, N] float32, out[index[m, j]] += values[m, j] * g[m]; zero entries cost nothing.

    g [M, N] float32 or bfloat16, any 2-D view (e.g. a transpose). Float32 atomics: equal to
    `sparse_rows_scatter_reference` up to summation order.
    """
    _check_sparse(values, index, g, "sparse_rows_scatter")
    m, j = values.shape
    n = g.shape[1]
    out = torch.zeros((k, n), device=values.device, dtype=torch.float32)
    if m > 0 and n > 0:
        grid = (triton.cdiv(m, _SPARSE_BLOCK_M), triton.cdiv(n, _SPARSE_BLOCK_N))
        wrap_triton(_sparse_rows_scatter_kernel)[grid](
            values.contiguous(), index.contiguous(), g, out, m, n, j, g.stride(0), g.stride(1),
            BLOCK_M=_SPARSE_BLOCK_M, BLOCK_N=_SPARSE_BLOCK_N)
    return out



# ---------------------------------------------------------------------------
# References: what each kernel computes, written with the runtime ops.
# ---------------------------------------------------------------------------


def occ_thresholds_reference(x: torch.Tensor, alpha_num: int, alpha_den: int):
    """`occ_thresholds_rows` with the runtime op (topk)."""
    return occ_thresholds(x.to(torch.float32), alpha_num, alpha_den, "row")


def occ_residual_rows_reference(x: torch.Tensor, alpha_num: int, alpha_den: int):
    """`occ_residual_rows` as `_OccClamp.forward` computes it (topk indices, gather).

    Returns (upper, lower, r_values, r_index, count, dense residual).
    """
    x32 = x.to(torch.float32)
    upper, lower, index = occ_thresholds(x32, alpha_num, alpha_den, "row", with_index=True)
    _, residual = occ_split(x32, upper, lower)
    count = ((x32 > upper) | (x32 < lower)).sum(dim=-1, dtype=torch.int32)
    return upper, lower, residual.gather(-1, index), index, count, residual


def occ_quantize_rows_reference(x: torch.Tensor, alpha_num: int, alpha_den: int, fmt: str = "e2m1"):
    """`occ_quantize_rows` with the runtime ops, as `_OccClamp` then `_QuantizeActivation` run them.

    Values are float32 grid values (the kernel's float32 output; its float8
    output holds the same numbers).
    """
    x32 = x.to(torch.float32)
    upper, lower = occ_thresholds(x32, alpha_num, alpha_den, "row")
    clamped, residual = occ_split(x32, upper, lower)
    values, scale = quantize(clamped, granularity="row", fmt=fmt)
    count = ((x32 > upper) | (x32 < lower)).sum(dim=-1, dtype=torch.int32)
    return values, scale, residual, upper, lower, count


def folded_rows_reference(x: torch.Tensor, alpha_num: int, alpha_den: int):
    """`folded_rows` with the runtime ops: OCC, row quantization and the fold, in float32."""
    from ..runtime.folded import folded_activation_reference

    return folded_activation_reference(x.to(torch.float32), alpha_num, alpha_den, "row", "e2m1", "row")


def sparse_to_dense(r_values: torch.Tensor, r_index: torch.Tensor, k: int) -> torch.Tensor:
    """Scatter a sparse residual (values, index) [M, J] back to a dense [M, K] tensor."""
    dense = torch.zeros((r_values.shape[0], k), dtype=r_values.dtype, device=r_values.device)
    return dense.scatter_add(-1, r_index, r_values)


def quantize_rows_reference(x: torch.Tensor, fmt: str = "e2m1"):
    """`quantize_rows` with the runtime op."""
    return quantize(x.to(torch.float32), granularity="row", fmt=fmt)


def dge_backward_reference(w, scale, grad, dge_k: float = 5.0, dge_clamp: float | None = 3.0):
    """`dge_backward` as `_QuantizeWeight.backward` computes it."""
    w_scaled = w.to(scale.dtype) / scale
    return (grad * dge_grad_scale(w_scaled, k=dge_k, clamp=dge_clamp)).to(w.dtype)


def cast_gradient_reference(g, fold=None, fold_dim: int = 1):
    """`cast_gradient` as `gemm.gradient_gemm` computes it: fold, then per-tensor E5M2."""
    g32 = g.to(torch.float32)
    if fold is not None:
        shape = (1, -1) if fold_dim == 1 else (-1, 1)
        g32 = g32 * fold.to(torch.float32).reshape(shape)
    return quantize_gradient(g32, "e5m2")


def sparse_rows_matmul_reference(values, index, wt):
    """`sparse_rows_matmul` as the reference compensation's gather-reduce computes it."""
    return (values.unsqueeze(-1) * wt[index]).sum(-2)


def sparse_rows_scatter_reference(values, index, g, k: int):
    """`sparse_rows_scatter` as the reference compensation's index_add computes it."""
    contrib = values.reshape(-1, 1) * g.repeat_interleave(values.shape[1], dim=0)
    return contrib.new_zeros(k, g.shape[1]).index_add(0, index.reshape(-1), contrib)
