"""The ``dge-only`` control of the training benchmark: DGE's gradient factor on an unquantized model.

``paper`` differs from the float32 baseline in two ways at once: its GEMMs run on
FP4/FP8 values, and the gradient of every quantized weight is multiplied by the
DGE factor f'(w / scale_row) (SPEC.md section 3). To tell the two apart, this
control keeps the baseline's unquantized forward and backward and applies only
the second: each weight the recipe would quantize gets its gradient multiplied
by the factor the recipe's weight quantizer would give it, with the same block
scale (row absmax / 6 for ``paper``), the same k and the same cap.

The factor is applied by a hook on the weight's incoming gradient (before it is
accumulated into ``.grad``), so it multiplies each backward pass once, as the
recipe's backward rule does, and gradient clipping sees the scaled gradient.
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from fp4compile.config import Fp4Config
from fp4compile.runtime.dge import dge_grad_scale
from fp4compile.runtime.quantize import quantize

__all__ = ["dge_factor", "quantized_weights", "attach_dge_only"]


def dge_factor(weight: torch.Tensor, config: Fp4Config) -> torch.Tensor:
    """The DGE factor f'(w / scale) of ``weight`` under ``config``'s weight format and block scale.

    Computed in float32 (float64 for a float64 weight), whatever the weight's dtype.
    """
    if config.weight_fmt is None or config.dge_clamp is None:
        raise ValueError("dge_factor needs a recipe that quantizes weights with DGE "
                         f"(weight_fmt={config.weight_fmt!r}, dge_clamp={config.dge_clamp!r})")
    w_hp = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    _, scale = quantize(w_hp, granularity=config.weight_granularity, fmt=config.weight_fmt)
    return dge_grad_scale(w_hp / scale, k=config.dge_k, clamp=config.dge_clamp)


def quantized_weights(model: nn.Module, config: Fp4Config) -> list[tuple[str, nn.Parameter]]:
    """The weights of the ``nn.Linear`` layers that ``config`` quantizes (its ``skip`` patterns left out)."""
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(fnmatch(name, pattern) for pattern in config.skip):
            chosen.append((f"{name}.weight", module.weight))
    if not chosen:
        raise ValueError("attach_dge_only: the model has no nn.Linear layer that the recipe quantizes")
    return chosen


def attach_dge_only(model: nn.Module, config: Fp4Config) -> list[torch.utils.hooks.RemovableHandle]:
    """Multiply the gradient of each weight ``config`` quantizes by its DGE factor; returns the hook handles.

    The factor is evaluated on the weight's current value at each backward pass,
    as the recipe's backward rule evaluates it on the weight it quantized.
    """
    handles = []
    for _, weight in quantized_weights(model, config):
        def scale_gradient(grad: torch.Tensor, weight: nn.Parameter = weight) -> torch.Tensor:
            return grad * dge_factor(weight, config).to(grad.dtype)

        handles.append(weight.register_hook(scale_gradient))
    return handles
