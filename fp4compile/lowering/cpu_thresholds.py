"""OCC row thresholds on CPU: the c-th and (c+1)-th extremes from one C++ kernel, no `aten.topk`.

The runtime reference (`runtime.occ.occ_thresholds`) finds the alpha quantile
of each row from a top-k of c + 1 values per side: two ATen calls per distinct
activation per step, each copying every row into (value, index) pairs and
partially sorting it. The interpolation needs only two values per side, the
c-th and (c+1)-th largest (and smallest) of each row counted with multiplicity,
and `cpu_row_extremes` finds exactly those in one vectorized pass per row, the
same floats as the top-k's bit for bit (ties, signed infinities, NaN ordered as
`topk` orders it). The interpolation and the clamp stay in Inductor's fused code.

History, for the next engineer: these values were first computed by c + 1 passes
of max and count reductions per side, fused by Inductor into the quantization
kernel. That ran as fast as this kernel (2.55 ms against 2.44 ms on 1024 rows of
704, one quiet core) but every level is generated code: one OCC site took 31 s to
compile alone against 11 s with the kernel, and a `cpu`-preset block 81 s against
66 s (`benchmarks/compile_time.py --regional`, same machine, back to back).

The per-tensor scope (c of the order of the tensor's size), and any machine where
the kernel does not build, keep the top-k.
"""
from __future__ import annotations

import torch

from ..runtime.occ import _interpolate, occ_thresholds, outliers_per_side
from . import cpu_row_extremes


def uses_kernel(scope: str) -> bool:
    """Whether `cpu_occ_thresholds` takes its order statistics from the C++ kernel (else top-k)."""
    return scope == "row" and cpu_row_extremes.available()


def cpu_occ_thresholds(x: torch.Tensor, alpha_num: int, alpha_den: int, scope: str = "row"):
    """`runtime.occ.occ_thresholds(x, ...)`: the same values, from the row kernel where it applies."""
    if not uses_kernel(scope):
        return occ_thresholds(x, alpha_num, alpha_den, scope)
    n = x.shape[-1]
    c = outliers_per_side(n, alpha_num, alpha_den)
    frac_num = (alpha_num * (n - 1)) % alpha_den
    # [..., 2] each, sorted outward as topk returns them: (c-th, (c+1)-th) extreme.
    top, bottom = cpu_row_extremes.row_extremes(x, c + 1)
    upper = _interpolate(top, 1, frac_num, alpha_den).clamp(min=0)
    lower = _interpolate(bottom, 1, frac_num, alpha_den).clamp(max=0)
    # One [..., 2] buffer for both, as in the reference (each consumer loads two floats per row).
    bounds = torch.cat([upper, lower], dim=-1)
    return bounds[..., :1], bounds[..., 1:]
