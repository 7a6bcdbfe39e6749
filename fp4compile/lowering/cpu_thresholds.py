"""OCC row thresholds on CPU by selection: no `aten.topk`.

The runtime reference (`runtime.occ.occ_thresholds`) finds the alpha quantile
of each row from a top-k of c + 1 values per side. Inductor cannot generate code
for `topk`: it calls ATen's kernel, which copies every row into (value, index)
pairs and partially sorts them, two calls per distinct activation per step.

For the row widths of real layers c is small (alpha = 0.99: c = 3 at n = 256,
8 at n = 704, 16 at n = 1536), and the two values the interpolation needs, the
c-th and (c+1)-th largest of the row counted with multiplicity, can be found
with c + 1 passes of plain reductions, which Inductor fuses and vectorizes:

    level_0 = max(x)                      count_i = #{x >= level_i}
    level_i = max{x : x < level_(i-1)}    (the next distinct value down)

The levels are the row's distinct values from the top; the k-th largest is the
first level whose count reaches k, i.e. the largest level with count_i >= k.
Each level adds at least one to the count, so c + 1 levels always reach k = c + 1.
The result is the same float as the top-k's, bit for bit (ties, zeros, signed
infinities included: only comparisons and max are involved), and NaN is ordered
as `topk` orders it (above every number, on both sides), so the thresholds and
everything downstream are unchanged.

Cost: c + 1 passes per side over a row that stays in cache, against ATen's
top-k; the selection's cost grows with c + 1, the top-k's barely.
`benchmarks/occ_thresholds.py` times both (1024 rows, one thread, Inductor-
compiled; benchmarks/results/occ_thresholds_cpu.json, BENCHMARKS.md): the
selection was 2.7x faster at c + 1 = 4 (rows of 256), 1.5x at 9 (704), 1.2x
at 12 (1024) and 0.84x at 17 (1536). Each level also adds code for Inductor to
generate and compile, so the cut-off, `MAX_SELECTED` values per side, stops
short of the break-even; wider rows, and the per-tensor scope (c of the order
of the tensor size), keep the top-k.
"""
from __future__ import annotations

import torch

from ..runtime.occ import _interpolate, occ_thresholds, outliers_per_side

# The largest c + 1 (values per side) computed by selection: below the measured
# break-even with ATen's top-k (between 12 and 17), with a margin for the compile
# time that every level adds (see the module docstring).
MAX_SELECTED = 10


def uses_selection(n, alpha_num: int, alpha_den: int, scope: str) -> bool:
    """Whether `cpu_occ_thresholds` selects rather than calls top-k for rows of n values."""
    if scope != "row" or not isinstance(n, int):  # a symbolic width would unroll per size
        return False
    return outliers_per_side(n, alpha_num, alpha_den) + 1 <= MAX_SELECTED


def largest_with_multiplicity(x: torch.Tensor, k: int, nan_first: bool,
                              nan_count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(k-1)-th and k-th largest values along the last dim, counted with multiplicity, [..., 1] each.

    NaN is ordered as `topk` orders it: above every number for the top side
    (`nan_first=True`; m NaNs in a row take the first m places) and, for the
    bottom side taken on -x, below every number (`nan_first=False`: a NaN is
    selected only when the row has fewer than k numbers). For k = 1 the first
    value is the k-th itself (what `_interpolate` uses for c = 0). `nan_count`:
    the NaNs per row, [..., 1], when the caller already has it (both sides share it).
    """
    minus_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    is_nan = x != x
    if nan_count is None:
        nan_count = row_nan_count(x)
    numbers = torch.where(is_nan, minus_inf, x)  # NaN out of the max reductions
    level = numbers.amax(dim=-1, keepdim=True)
    kth = previous = None
    for i in range(k):
        if i:
            level = torch.where(numbers < level, numbers, minus_inf).amax(dim=-1, keepdim=True)
        count = (x >= level).to(x.dtype).sum(dim=-1, keepdim=True)  # NaN compares false: numbers only (float, exact)
        if nan_first:
            count = count + nan_count
        kth_candidate = torch.where(count >= k, level, minus_inf)
        previous_candidate = torch.where(count >= k - 1, level, minus_inf)
        kth = kth_candidate if kth is None else torch.maximum(kth, kth_candidate)
        previous = previous_candidate if previous is None else torch.maximum(previous, previous_candidate)
    if nan_first:  # the first nan_count places are NaN
        kth = torch.where(nan_count >= k, nan, kth)
        previous = torch.where(nan_count >= k - 1, nan, previous)
    else:  # NaN fills the places after the row's numbers
        numbers_count = x.shape[-1] - nan_count
        kth = torch.where(numbers_count < k, nan, kth)
        previous = torch.where(numbers_count < k - 1, nan, previous)
    if k == 1:
        previous = kth
    return previous, kth


def row_nan_count(x: torch.Tensor) -> torch.Tensor:
    """NaNs per row, [..., 1], as a float count: exact for rows of up to 2^24 values, and a float
    reduction vectorizes better than an int64 one (the selection's counts are floats too)."""
    return (x != x).to(x.dtype).sum(dim=-1, keepdim=True)


def cpu_occ_thresholds(x: torch.Tensor, alpha_num: int, alpha_den: int, scope: str = "row"):
    """`runtime.occ.occ_thresholds(x, ...)`, the same values, by selection where that is cheaper on CPU."""
    if not uses_selection(x.shape[-1], alpha_num, alpha_den, scope):
        return occ_thresholds(x, alpha_num, alpha_den, scope)
    return selection_thresholds(x, alpha_num, alpha_den)


def selection_thresholds(x: torch.Tensor, alpha_num: int, alpha_den: int):
    """Row thresholds by selection, whatever the row width (rows of a static width `x.shape[-1]`)."""
    n = x.shape[-1]
    c = outliers_per_side(n, alpha_num, alpha_den)
    frac_num = (alpha_num * (n - 1)) % alpha_den
    nan_count = row_nan_count(x)
    top_outer, top_inner = largest_with_multiplicity(x, c + 1, nan_first=True, nan_count=nan_count)
    # The lower side on -x: negation is exact, and -max(-x) is min(x).
    bottom_outer, bottom_inner = largest_with_multiplicity(-x, c + 1, nan_first=False, nan_count=nan_count)
    top = torch.cat([top_outer, top_inner], dim=-1)  # sorted outward, as topk returns them
    bottom = -torch.cat([bottom_outer, bottom_inner], dim=-1)
    upper = _interpolate(top, 1, frac_num, alpha_den).clamp(min=0)
    lower = _interpolate(bottom, 1, frac_num, alpha_den).clamp(max=0)
    # One [..., 2] buffer for both, as in the reference (each consumer loads two floats per row).
    bounds = torch.cat([upper, lower], dim=-1)
    return bounds[..., :1], bounds[..., 1:]
