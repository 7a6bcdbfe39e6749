"""Inductor lowerings of fp4compile's own ops, shared by both targets.

`fp4compile::stored` (`runtime/stored.py`) marks a small value, a per-tensor
scale, that generated code should compute once. Its lowering realizes the
value: Inductor then writes it to a buffer (in the kernel of the reduction that
feeds it) and every consumer loop loads it, instead of inlining its scalar
expression into each loop. The value is the same bit for bit; only where it is
computed changes. Registered once, at the first `backend="fp4"` compile.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def register() -> None:
    """Register the lowerings with Inductor (idempotent)."""
    from torch._inductor.lowering import register_lowering

    from ..runtime.stored import stored  # noqa: F401  (defines torch.ops.fp4compile.stored)

    @register_lowering(torch.ops.fp4compile.stored.default, type_promotion_kind=None)
    def _stored(x):
        x.realize()
        return x
