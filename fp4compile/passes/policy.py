"""Decide which matmul sites run quantized, with a one-line reason for each that does not.

Order of the checks: the recipe, the user's per-layer policy (`skip`,
`keep_modules`, `filter_fn`, `keep_first_last`), what the pass can take (2-D
floating weights, block sizes), the size policy, and the target hardware's GEMM
constraints, then on CUDA the modelled size policy (`lowering/cuda_policy.py`:
a site whose recipe is predicted slower than BF16 stays in high precision). The
first failing check is the reason reported.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from ..config import Fp4OptionsError

# FP8 GEMMs on CUDA (cuBLASLt, Inductor's scaled-mm templates) need K and N to be
# multiples of 16 bytes' worth of FP8 elements.
CUDA_GEMM_ALIGNMENT = 16
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK = {"block32": 32, "block16": 16}


def skip_pattern(module_path: str, patterns) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(module_path, pattern):
            return pattern
    return None


def _static(v):
    return isinstance(v, int)


def repeated_blocks(root: torch.nn.Module) -> tuple[str, int] | None:
    """(path, count) of the model's repeated blocks, or None.

    The blocks are the children of the largest `nn.ModuleList` or `nn.Sequential`
    whose children (at least two) all share one class: `layers` in LLaMA, `h` in
    GPT-2, `model.layers` in Hugging Face's LlamaForCausalLM.
    """
    best = None
    for path, module in root.named_modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) >= 2 and len({type(c) for c in children}) == 1:
            if best is None or len(children) > best[1]:
                best = (path, len(children))
    return best


@dataclass
class ModelContext:
    """The module tree the captured graph came from, for the per-layer policy.

    `root` is None when it is unknown (a plain function, or dynamo internals
    that moved): `filter_fn` then receives `module=None`, and `keep_first_last`
    cannot place a site in a block (the site is quantized, and the report's
    reason for the other sites is unchanged).
    """

    root: torch.nn.Module | None = None

    def __post_init__(self):
        self.blocks = repeated_blocks(self.root) if self.root is not None else None

    def module(self, path: str):
        if self.root is None:
            return None
        try:
            return self.root.get_submodule(path)
        except AttributeError:
            return None

    def block_index(self, path: str) -> int | None:
        if self.blocks is None:
            return None
        prefix = f"{self.blocks[0]}." if self.blocks[0] else ""
        if not path.startswith(prefix):
            return None
        head = path[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def _filter_fn_keeps(config, site, context: ModelContext) -> bool:
    """Whether the user's `filter_fn(module, fqn)` keeps the site in high precision."""
    module = context.module(site.module_path)
    try:
        choice = config.filter_fn(module, site.module_path)
    except Exception as exc:
        raise Fp4OptionsError(f"filter_fn raised {type(exc).__name__}: {exc} on module {site.module_path!r}") from exc
    if not isinstance(choice, bool):
        raise Fp4OptionsError(f"filter_fn returned {choice!r} for module {site.module_path!r}; it must return True "
                         "(quantize) or False (keep in high precision)")
    return not choice


def _policy_reason(site, config, context: ModelContext) -> str:
    """The user's per-layer choice for this site, or ""."""
    pattern = skip_pattern(site.module_path, config.skip)
    if pattern is not None:
        return f"skip list ({pattern})"
    for path, reason in config.keep_modules:
        if site.module_path == path:
            return reason
    if config.filter_fn is not None and _filter_fn_keeps(config, site, context):
        return "filter_fn returned False"
    if config.keep_first_last and context.blocks is not None:
        index, n = context.block_index(site.module_path), (context.blocks or ("", 0))[1]
        if index is not None and (index < config.keep_first_last or index >= n - config.keep_first_last):
            return f"keep_first_last={config.keep_first_last} (block {index} of {n})"
    return ""


def decide(site, config, target: str, context: ModelContext | None = None) -> str:
    """The reason this site stays in high precision, or "" if it is quantized."""
    if not config.quantizes:
        return f"recipe {config.recipe}: no quantization"
    reason = _policy_reason(site, config, context or ModelContext())
    if reason:
        return reason
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
    if target == "cuda" and config.cuda_size_policy:
        from ..lowering.cuda_policy import size_policy_reason

        return size_policy_reason(config, site.act_shape[:-1], k, n)
    return ""


def apply_policy(sites, config, target: str, root: torch.nn.Module | None = None) -> None:
    """Set `quantized` and `reason` on every site.

    `root`: the module the graph was captured from, when known (for `filter_fn`
    and `keep_first_last`).
    """
    context = ModelContext(root)
    for site in sites:
        # A reason set while finding the site (e.g. inside a user's autograd.Function) stands.
        site.reason = site.reason or decide(site, config, target, context)
        site.quantized = not site.reason


def check_policy_applies(config, root: torch.nn.Module | None) -> None:
    """`keep_first_last` needs the model's repeated blocks in the captured graph: say so if absent."""
    if config.keep_first_last and config.quantizes and (root is None or repeated_blocks(root) is None):
        what = "a plain function" if root is None else f"a {type(root).__name__} without repeated blocks"
        raise Fp4OptionsError(
            f"keep_first_last={config.keep_first_last} needs the whole model (its repeated blocks) in one "
            f"compile, but the compiled code is {what}; for block-by-block compiles use "
            "fp4compile.compile_model(model, regional=True, keep_first_last=...)"
        )


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
