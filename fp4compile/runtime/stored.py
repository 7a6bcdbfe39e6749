"""`fp4compile::stored`: a small value that compiled code computes once and then reads.

The E5M2 gradient cast scales a whole tensor by one power of two, a one-element
expression of the tensor's amax (`quantize.power_of_two_scale`, about 25 scalar
operations on the float's bits). Inductor inlines a pointwise expression into
every loop that reads it. In the `paper` demo block's backward that was 29
inlined copies for its 14 scales, a sixth of the generated C++ lines, each
lowered, compiled and evaluated again in its loop.

Passing such a value through `stored` marks it for storage. Eagerly, and under
any compiler that does not know the op, it is a copy (the same values). Under
`backend="fp4"`, the lowering (`fp4compile/lowering/inductor_ops.py`) has
Inductor write it to a buffer once, in the kernel that reduces the amax, and
every consumer loads it. Nothing here imports from the lowering.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("fp4compile::stored", mutates_args=())
def stored(x: torch.Tensor) -> torch.Tensor:
    """x, computed once into its own buffer under `backend="fp4"` (eagerly: a copy)."""
    return x.clone()


@stored.register_fake
def _(x):
    return torch.empty_like(x)


def _backward(ctx, grad):
    return grad


stored.register_autograd(_backward)
