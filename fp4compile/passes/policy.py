"""Decide which matmul sites run quantized, with a one-line reason for each that does not.

Order of the checks: the recipe, the user's skip list, what the pass can take
(2-D floating weights, block sizes), the size policy, and the target hardware's
GEMM constraints. The first failing check is the reason reported.
"""
from __future__ import annotations

import fnmatch

import torch

# FP8 GEMMs on CUDA (cuBLASLt, Inductor's scaled-mm templates) need K and N to be
# multiples of 16 bytes' worth of FP8 elements.
CUDA_GEMM_ALIGNMENT = 16
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK = {"block32": 32, "block16": 16}


def _skip_pattern(module_path: str, patterns) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(module_path, pattern):
            return pattern
    return None


def _static(v):
    return isinstance(v, int)


def decide(site, config, target: str) -> str:
    """The reason this site stays in high precision, or "" if it is quantized."""
    if not config.quantizes:
        return f"recipe {config.recipe}: no quantization"
    pattern = _skip_pattern(site.module_path, config.skip)
    if pattern is not None:
        return f"skip list ({pattern})"
    if len(site.weight_shape) != 2:
        return f"weight is {len(site.weight_shape)}-D, not 2-D"
    if site.dtype not in _FLOAT_DTYPES:
        return f"dtype {site.dtype} is not a floating-point type the pass takes"
    if len(site.act_shape) < 1:
        return "activation shape unknown"
    m, k, n = site.mkn()
    if site.act_shape[-1] != k:
        return "activation and weight inner dimensions differ"
    if not (_static(k) and _static(n)):
        return "weight dimensions are not static"
    for name, gran in (("weight", config.weight_granularity), ("activation", config.act_granularity)):
        block = _BLOCK.get(gran)
        if block and k % block:
            return f"K={k} not a multiple of {block} ({name} granularity {gran})"
    if min(k, n) < config.min_features:
        return f"smaller than min_features={config.min_features} (K={k}, N={n})"
    if target == "cuda" and (k % CUDA_GEMM_ALIGNMENT or n % CUDA_GEMM_ALIGNMENT):
        return f"K={k}, N={n} not multiples of {CUDA_GEMM_ALIGNMENT} (FP8 GEMM alignment)"
    return ""


def apply_policy(sites, config, target: str) -> None:
    """Set `quantized` and `reason` on every site; check user skip patterns match something."""
    for site in sites:
        # A reason set while finding the site (e.g. inside a user's autograd.Function) stands.
        site.reason = site.reason or decide(site, config, target)
        site.quantized = not site.reason


def check_skip_patterns(config, module_names) -> None:
    """A user skip pattern that names no module of the model is a typo: say so.

    `module_names` are all module paths of the model being compiled (None when
    the model is not known, e.g. a plain function: then nothing is checked).
    The default patterns are exempt: a model without an `lm_head` is fine.
    """
    from ..config import DEFAULT_SKIP

    if module_names is None:
        return
    names = list(module_names)
    for pattern in config.skip:
        if pattern in DEFAULT_SKIP:
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(n for n in names[:12] if n) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"skip pattern {pattern!r} matches no module of the model; module names are: {shown}"
            )
