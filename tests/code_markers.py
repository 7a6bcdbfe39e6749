"""What the OCC thresholds look like in Inductor's generated code, for tests that prove OCC ran.

Two forms (fp4compile/lowering/cpu_thresholds.py): a call to ATen's `topk`
(the runtime reference, the per-tensor scope, CUDA), or on CPU an extern call to
the row kernel `fp4compile::row_extremes`. A compile that fell back to the plain
model, or dropped the clamp, has neither.
"""
from __future__ import annotations

_KERNEL_CALL = "torch.ops.fp4compile.row_extremes"


def occ_thresholds_in_code(text: str) -> bool:
    """Whether generated code `text` computes OCC clamp thresholds (top-k or the row kernel)."""
    return "topk" in text or _KERNEL_CALL in text


def occ_kernel_in_code(text: str) -> bool:
    """Whether generated code `text` takes them from the row kernel (no top-k call)."""
    return "topk" not in text and _KERNEL_CALL in text
