"""What the OCC thresholds look like in Inductor's generated code, for tests that prove OCC ran.

Two forms (fp4compile/lowering/cpu_thresholds.py): a call to ATen's `topk`
(wide rows, per-tensor scope), or the selection, which Inductor fuses into a C++
kernel whose name lists the aten ops it computes: the level maxima (`amax`),
the running candidate (`maximum`) and the counts (`sum`). A compile that fell
back to the plain model, or dropped the clamp, has neither.
"""
from __future__ import annotations

import re

_SELECTION_KERNEL = re.compile(r"cpp_fused\w*?_amax_\w*?_maximum_\w*?_sum_\w*")


def occ_thresholds_in_code(text: str) -> bool:
    """Whether generated code `text` computes OCC clamp thresholds (top-k call or fused selection)."""
    return "topk" in text or _SELECTION_KERNEL.search(text) is not None


def occ_selection_in_code(text: str) -> bool:
    """Whether generated code `text` computes them by the fused selection (no top-k call)."""
    return "topk" not in text and _SELECTION_KERNEL.search(text) is not None
