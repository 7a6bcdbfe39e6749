"""Fp4Config: every numeric and policy knob of fp4compile, with named recipes.

A frozen dataclass, validated on construction, so a bad option fails before any
compilation or computation runs. `Fp4Config.from_recipe("paper", **overrides)`
builds the published method or one of its baselines and ablations.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Callable

from .runtime.formats import FORMATS
from .runtime.occ import OCC_SCOPES
from .runtime.quantize import GRANULARITIES

try:  # dynamo re-raises these as they are, instead of wrapping them in BackendCompilerFailed
    from torch._dynamo.exc import ShortenTraceback as _PropagatedByDynamo
except ImportError:  # pragma: no cover - older or newer dynamo: the error arrives wrapped
    _PropagatedByDynamo = None


class Fp4OptionsError(ValueError, *((_PropagatedByDynamo,) if _PropagatedByDynamo else ())):
    """A bad fp4compile option (from `options=`, `FP4COMPILE_OPTIONS` or `compile_model`).

    A `ValueError` whose message names the option and its valid values. Raised
    at the first call of a `torch.compile`d model, before any pass or
    computation runs. It also derives from dynamo's `ShortenTraceback` (where
    that exists), the exceptions dynamo passes through unwrapped: so the caller
    receives this exception itself, not a `BackendCompilerFailed` around it.
    """

    def __init__(self, message: str):
        if _PropagatedByDynamo is not None:
            _PropagatedByDynamo.__init__(self, message, first_useful_frame=None)
        else:  # pragma: no cover
            ValueError.__init__(self, message)


GRAD_FORMATS = ("e5m2", "e2m1")
# Gradient scaling groups: "tensor" is the power-of-two rule of
# `runtime.quantize.quantize_gradient` (split-invariant, docs/distributed.md);
# the block granularities are NVFP4's and MXFP4's (docs/recipes.md).
GRAD_GRANULARITIES = ("tensor", "block16", "block32")
ROUNDINGS = ("nearest", "stochastic")
# Random Hadamard transform on both inputs of the weight-gradient GEMM: the
# block length along the reduced (token) dimension, 0 for none.
HADAMARD_BLOCKS = (0, 16, 32)
CUDA_COMPENSATIONS = ("fp8_folded", "channels")
TARGETS = ("auto", "cpu", "cuda")
# Embeddings are lookups, not matmuls, so they never reach the pass; the output
# projection is kept in high precision by default, as most FP8/FP4 recipes do.
DEFAULT_SKIP = ("lm_head", "*.lm_head", "output", "*.output")


@dataclass(frozen=True)
class Fp4Config:
    """How each linear-layer GEMM is quantized, and which layers are.

    Formats are None for "no quantization" (high precision). `dge_clamp=None`
    disables DGE (plain straight-through estimator); `occ_alpha=None` disables
    outlier clamping.

    Per-layer policy, checked in this order after the recipe: `skip` (module-name
    globs), `keep_modules` (exact module paths, each with the reason to report),
    `filter_fn(module, fqn) -> bool` (as torchao's `module_filter_fn`: False keeps
    the layer in high precision), `keep_first_last` (the first and last N of the
    model's repeated blocks), then `min_features`.
    """

    recipe: str = "paper"
    weight_fmt: str | None = "e2m1"
    weight_granularity: str = "row"
    act_fmt: str | None = "e2m1"
    act_granularity: str = "row"
    grad_fmt: str | None = "e5m2"
    grad_granularity: str = "tensor"
    grad_rounding: str = "nearest"
    hadamard: int = 0
    # Seeds the Hadamard sign vector (the same signs every step, so the seed
    # alone reproduces it; it is in the config, so in the compiled-graph key).
    hadamard_seed: int = 0
    dge_k: float = 5.0
    dge_clamp: float | None = 3.0
    occ_alpha: float | None = 0.99
    occ_scope: str = "row"
    occ_compensate: bool = True
    skip: tuple[str, ...] = DEFAULT_SKIP
    keep_modules: tuple[tuple[str, str], ...] = ()
    # Not in repr (so not in the compiled-graph cache key, which holds the repr):
    # its decisions are already in the rewritten graph it keys on.
    filter_fn: Callable | None = field(default=None, repr=False)
    keep_first_last: int = 0
    min_features: int = 0
    target: str = "auto"
    # Telemetry (fp4compile.stats()): record per-site statistics every N training
    # steps; 0 (the default) inserts nothing, so the compiled graph is unchanged.
    stats_interval: int = 0
    # On target "cuda", keep in high precision the sites whose quantized recipe
    # is modelled slower than BF16 at their size (lowering/cuda_policy.py).
    cuda_size_policy: bool = True
    # How the CUDA lowering adds the OCC compensation (docs/cuda.md):
    # "fp8_folded" rides in the FP8 activation codes, E4M3(x_q + r / x_s), so the
    # layer runs fp4-direct's three FP8 GEMMs; "channels" multiplies the residual
    # exactly, on dense BF16 GEMMs over its most populated channels.
    cuda_compensation: str = "fp8_folded"

    def __post_init__(self):
        if isinstance(self.skip, (list, str)):
            object.__setattr__(self, "skip", (self.skip,) if isinstance(self.skip, str) else tuple(self.skip))
        _check_choice("weight_fmt", self.weight_fmt, FORMATS + (None,))
        _check_choice("act_fmt", self.act_fmt, FORMATS + (None,))
        _check_choice("grad_fmt", self.grad_fmt, GRAD_FORMATS + (None,))
        _check_choice("grad_granularity", self.grad_granularity, GRAD_GRANULARITIES)
        _check_choice("grad_rounding", self.grad_rounding, ROUNDINGS)
        _check_choice("hadamard", self.hadamard, HADAMARD_BLOCKS)
        _check_choice("cuda_compensation", self.cuda_compensation, CUDA_COMPENSATIONS)
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        _check_choice("act_granularity", self.act_granularity, GRANULARITIES)
        _check_choice("occ_scope", self.occ_scope, OCC_SCOPES)
        _check_choice("target", self.target, TARGETS)
        if not _is_number(self.dge_k) or not self.dge_k > 1:
            raise ValueError(f"dge_k={self.dge_k!r} is invalid: it must be a number > 1 (the paper uses 5)")
        if self.dge_clamp is not None and (not _is_number(self.dge_clamp) or not self.dge_clamp > 0):
            raise ValueError(f"dge_clamp={self.dge_clamp!r} is invalid: a number > 0 (3.0 by default), or None for STE")
        if self.dge_clamp is not None and self.weight_fmt != "e2m1":
            raise ValueError(
                f"dge_clamp={self.dge_clamp!r} needs weight_fmt='e2m1' (DGE is defined on the E2M1 grid); "
                f"got weight_fmt={self.weight_fmt!r}: set dge_clamp=None"
            )
        if self.occ_alpha is not None and (not _is_number(self.occ_alpha) or not 0.5 < self.occ_alpha < 1):
            raise ValueError(
                f"occ_alpha={self.occ_alpha!r} is invalid: it must lie in (0.5, 1), e.g. 0.99, or be None to disable OCC"
            )
        if self.occ_alpha is not None and self.act_fmt is None:
            raise ValueError("occ_alpha needs a quantized activation format (act_fmt); set occ_alpha=None")
        if not isinstance(self.occ_compensate, bool):
            raise ValueError(f"occ_compensate={self.occ_compensate!r} is invalid: True or False")
        if not isinstance(self.skip, tuple) or not all(isinstance(p, str) and p for p in self.skip):
            raise ValueError(f"skip={self.skip!r} is invalid: a tuple of module-name glob patterns")
        if isinstance(self.keep_modules, list):
            object.__setattr__(self, "keep_modules", tuple(tuple(p) if isinstance(p, list) else p
                                                           for p in self.keep_modules))
        if not isinstance(self.keep_modules, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(v, str) and v for v in p)
            for p in self.keep_modules
        ):
            raise ValueError(f"keep_modules={self.keep_modules!r} is invalid: a tuple of (module path, reason) "
                             "string pairs")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn={self.filter_fn!r} is invalid: a callable (module, fqn) -> bool, or None")
        if not _is_int(self.keep_first_last) or self.keep_first_last < 0:
            raise ValueError(f"keep_first_last={self.keep_first_last!r} is invalid: an integer >= 0 (blocks kept "
                             "in high precision at each end)")
        if not _is_int(self.min_features) or self.min_features < 0:
            raise ValueError(f"min_features={self.min_features!r} is invalid: an integer >= 0")
        if self.grad_fmt is None and (self.grad_rounding != "nearest" or self.grad_granularity != "tensor"):
            raise ValueError(f"grad_rounding={self.grad_rounding!r} and grad_granularity={self.grad_granularity!r} "
                             "need a gradient format: set grad_fmt ('e5m2' or 'e2m1')")
        if self.hadamard and (self.grad_fmt is None or self.act_fmt is None):
            raise ValueError(f"hadamard={self.hadamard!r} needs quantized gradients and activations (grad_fmt and "
                             "act_fmt): it rotates the weight-gradient GEMM's inputs before they are quantized")
        if not _is_int(self.hadamard_seed) or self.hadamard_seed < 0:
            raise ValueError(f"hadamard_seed={self.hadamard_seed!r} is invalid: an integer >= 0")
        if not isinstance(self.cuda_size_policy, bool):
            raise ValueError(f"cuda_size_policy={self.cuda_size_policy!r} is invalid: True or False")
        if not _is_int(self.stats_interval) or self.stats_interval < 0:
            raise ValueError(f"stats_interval={self.stats_interval!r} is invalid: an integer >= 0 (record FP4 "
                             "statistics every N training steps; 0 turns them off)")

    @property
    def requantizes_weight_gradient(self) -> bool:
        """True when the weight-gradient GEMM quantizes its own operands along the tokens.

        The NVFP4/MXFP4 route (docs/recipes.md): both inputs of dW = dY^T X are
        (optionally Hadamard-rotated and) block-quantized along the token
        dimension it reduces, X from the layer's high-precision input. Otherwise
        the weight gradient reuses the forward's quantized activation (SPEC.md
        section 5).
        """
        return self.hadamard > 0 or self.grad_granularity != "tensor" or self.grad_fmt == "e2m1"

    @property
    def quantizes(self) -> bool:
        """False for the high-precision recipe: the pass then rewrites nothing."""
        return self.weight_fmt is not None or self.act_fmt is not None

    @classmethod
    def from_recipe(cls, name: str = "paper", **overrides) -> "Fp4Config":
        """The named recipe, with any field overridden by keyword."""
        if name not in RECIPES:
            raise ValueError(f"recipe={name!r} does not exist; valid recipes: {', '.join(RECIPES)}")
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(field_names())}"
            )
        return cls(**{**RECIPES[name], "recipe": name, **overrides})

    @classmethod
    def from_options(cls, options: dict | None) -> "Fp4Config":
        """Config from `torch.compile(..., options={...})`: a recipe plus field overrides."""
        options = dict(options or {})
        return cls.from_recipe(options.pop("recipe", "paper"), **options)

    def replace(self, **changes) -> "Fp4Config":
        return dataclasses.replace(self, **changes)


def field_names() -> list[str]:
    return [f.name for f in fields(Fp4Config)]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_choice(name, value, valid):
    if value not in valid:
        shown = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{name}={value!r} is invalid; valid values: {shown}")


# The recipes. "paper" is the published method; the rest are its baselines and
# ablations, so that every comparison in the paper is one option away.
_HIGH_PRECISION = dict(weight_fmt=None, act_fmt=None, grad_fmt=None, dge_clamp=None, occ_alpha=None)
RECIPES: dict[str, dict] = {
    "paper": dict(),
    "fp4-direct": dict(dge_clamp=None, occ_alpha=None),
    "w4a8": dict(act_fmt="e4m3", occ_alpha=None),
    "w8a4": dict(weight_fmt="e4m3", dge_clamp=None),
    "fp8": dict(weight_fmt="e4m3", act_fmt="e4m3", dge_clamp=None, occ_alpha=None),
    "bf16": _HIGH_PRECISION,
    # NVFP4 (NVIDIA, 2025): 1x16 blocks with E4M3 scales times an FP32 tensor
    # scale, 16x16 weight tiles (W and W^T quantize alike), FP4 gradients with
    # stochastic rounding, a 16-point random Hadamard transform on the
    # weight-gradient GEMM's inputs. No DGE, no OCC (docs/recipes.md).
    "nvfp4": dict(weight_granularity="block16x16", act_granularity="block16", grad_fmt="e2m1",
                  grad_granularity="block16", grad_rounding="stochastic", hadamard=16,
                  dge_clamp=None, occ_alpha=None),
    # MXFP4 (OCP MX; Quartet's training recipe): 1x32 blocks with power-of-two
    # E8M0 scales everywhere, FP4 gradients with stochastic rounding, a
    # 32-point random Hadamard transform on the weight-gradient GEMM's inputs.
    "mxfp4": dict(weight_granularity="block32", act_granularity="block32", grad_fmt="e2m1",
                  grad_granularity="block32", grad_rounding="stochastic", hadamard=32,
                  dge_clamp=None, occ_alpha=None),
}
