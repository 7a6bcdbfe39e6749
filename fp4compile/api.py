"""`compile_model`: FP4 training for code that never calls `torch.compile` itself.

The Hugging Face `Trainer`, Accelerate and Lightning take a model and run it;
they cannot pass `options=` to a backend (Accelerate even rejects backend names
outside its own list). `compile_model(model, "paper")` compiles the model in
place (`nn.Module.compile`), so it keeps its class, its `forward` signature and
its `state_dict`, and goes into any of those unchanged.

`regional=True` compiles the model's repeated blocks one at a time instead
(`block.compile`): one graph serves every identical block, so a cold compile
covers one block. The per-layer policy (`skip`, `filter_fn`, `keep_first_last`)
is decided here on the whole model's module names and handed to each block's
compile as `keep_modules`, so that reports give the same reasons as a
whole-model compile.
"""
from __future__ import annotations

import torch

from .backend import resolve_config
from .config import Fp4OptionsError
from .passes.policy import check_policy_applies, check_skip_patterns, repeated_blocks, skip_pattern
from .report import logger

# Fields decided on the whole model's names before a regional compile; the
# blocks receive the decisions as `keep_modules` instead.
_WHOLE_MODEL_FIELDS = ("skip", "filter_fn", "keep_first_last", "keep_modules")


def compile_model(model: torch.nn.Module, recipe: str | None = None, *, regional: bool = False,
                  options: dict | None = None, dynamic: bool | None = None, fullgraph: bool = False,
                  **overrides) -> torch.nn.Module:
    """Compile `model` in place with `backend="fp4"`; returns `model` itself.

    `recipe` and `overrides` are `options` keys (`compile_model(m, "paper",
    skip=("head",))` equals `options={"recipe": "paper", "skip": ("head",)}`).
    They are validated now: a bad value raises `Fp4OptionsError` (a
    ValueError naming the option) before anything is compiled.

    `regional`: compile each of the repeated blocks (`layers`, `h`,
    `model.layers`) on its own; the modules outside them (embeddings, final
    norm, output head) then run uncompiled, and a warning names any of those
    that the policy would have quantized.
    """
    if not isinstance(model, torch.nn.Module):
        raise Fp4OptionsError(f"compile_model takes an nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, dict):
        raise Fp4OptionsError(f"options must be a dict of Fp4Config fields, got {type(options).__name__}")
    merged = {**(options or {}), **overrides}
    if recipe is not None:
        merged["recipe"] = recipe
    config = resolve_config(merged)  # validates every field
    names = [name for name, _ in model.named_modules()]
    try:
        check_skip_patterns(config, names)
    except ValueError as exc:
        raise Fp4OptionsError(str(exc)) from None
    if not regional:
        check_policy_applies(config, model)
        model.compile(backend="fp4", options=merged, dynamic=dynamic, fullgraph=fullgraph)
        return model
    _compile_blocks(model, config, merged, dynamic, fullgraph)
    return model


def _compile_blocks(model, config, merged: dict, dynamic, fullgraph) -> None:
    found = repeated_blocks(model)
    if found is None:
        raise Fp4OptionsError(
            f"regional=True needs repeated blocks (an nn.ModuleList of identical modules); "
            f"{type(model).__name__} has none: use regional=False"
        )
    path, count = found
    container = model.get_submodule(path)
    base = {k: v for k, v in merged.items() if k not in _WHOLE_MODEL_FIELDS}
    variants: dict[tuple, dict] = {}
    for index, block in enumerate(container.children()):
        prefix = f"{path}.{index}" if path else str(index)
        kept = _block_decisions(block, prefix, index, count, config)
        options = variants.setdefault(kept, {**base, "skip": (), "keep_modules": kept})
        block.compile(backend="fp4", options=options, dynamic=dynamic, fullgraph=fullgraph)
    limit = _recompile_limit()
    if len(variants) > limit:
        raise Fp4OptionsError(
            f"the per-layer policy gives {len(variants)} different block configurations; dynamo compiles at "
            f"most {limit} for one block class, and the rest would run uncompiled: simplify filter_fn, or use "
            "regional=False"
        )
    in_blocks = lambda name: name == path or name.startswith(f"{path}.")  # noqa: E731
    outside = [name for name, module in model.named_modules()
               if not in_blocks(name) and _has_matrix_weight(module) and skip_pattern(name, config.skip) is None]
    if outside and config.quantizes:
        logger.warning("fp4compile: compile_model(regional=True) compiles only the blocks under %r; these "
                       "modules run uncompiled, in high precision: %s", path, ", ".join(outside))


def _block_decisions(block, prefix: str, index: int, count: int, config) -> tuple:
    """((path in block, reason), ...) for every module of one block kept in high precision."""
    kept = []
    for rel, module in block.named_modules():
        if not rel or not _has_matrix_weight(module):
            continue
        full = f"{prefix}.{rel}"
        pattern = skip_pattern(full, config.skip)
        reason = f"skip list ({pattern})" if pattern is not None else ""
        for kept_path, kept_reason in config.keep_modules:
            if not reason and kept_path == full:
                reason = kept_reason
        if not reason and config.filter_fn is not None:
            choice = config.filter_fn(module, full)
            if not isinstance(choice, bool):
                raise Fp4OptionsError(f"filter_fn returned {choice!r} for module {full!r}; it must return "
                                      "True (quantize) or False (keep in high precision)")
            reason = "" if choice else "filter_fn returned False"
        n = config.keep_first_last
        if not reason and n and (index < n or index >= count - n):
            # No block index in the reason: every kept block then shares one compiled graph.
            reason = f"keep_first_last={n} (the first and last {n} of {count} blocks)"
        if reason:
            kept.append((rel, reason))
    return tuple(kept)


def _has_matrix_weight(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, torch.nn.Embedding)


def _recompile_limit() -> int:
    import torch._dynamo.config as dynamo_config

    return int(getattr(dynamo_config, "recompile_limit", getattr(dynamo_config, "cache_size_limit", 8)))
