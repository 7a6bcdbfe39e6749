"""The `fp4` torch.compile backends and their registration with dynamo.

    torch.compile(model, backend="fp4", options={"recipe": "paper", ...})

`fp4` runs the passes, the target's lowering step, then AOTAutograd + Inductor.
Two debug backends narrow a numerics difference down, like dynamo's own
eager/aot_eager; both run the semantic graph (no lowering):
  - `fp4_eager`: the passes, then the rewritten graph runs op by op in Python;
  - `fp4_aot_eager`: the passes plus AOTAutograd, no lowering, no Inductor.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import Fp4Config, Fp4OptionsError
from .passes import run_passes
from .report import GraphReport, add_report, next_graph_id

BACKEND_NAMES = ("fp4", "fp4_eager", "fp4_aot_eager")
# JSON with the keys of `options`, read when a compile passes no options, so that
# a script that calls torch.compile(model, backend="fp4") can be switched unmodified.
OPTIONS_ENV = "FP4COMPILE_OPTIONS"

__all__ = ["Fp4OptionsError", "resolve_config", "prepare", "register_backends", "OPTIONS_ENV"]


def options_from_env() -> dict | None:
    """The options in FP4COMPILE_OPTIONS, or None when it is unset or empty."""
    text = os.environ.get(OPTIONS_ENV, "").strip()
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Fp4OptionsError(f"{OPTIONS_ENV} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise Fp4OptionsError(f"{OPTIONS_ENV} must be a JSON object of Fp4Config fields, got {text!r}")
    return options


def resolve_config(options) -> Fp4Config:
    """The Fp4Config for `options` (a dict, a config, or None: then FP4COMPILE_OPTIONS, then `paper`)."""
    if isinstance(options, Fp4Config):
        return options
    if options is not None and not isinstance(options, dict):
        raise Fp4OptionsError(f"options must be a dict of Fp4Config fields, got {type(options).__name__}")
    source = ""
    if not options:
        env_options = options_from_env()
        if env_options is not None:
            options, source = env_options, f" (from {OPTIONS_ENV})"
    try:
        return Fp4Config.from_options(options)
    except Fp4OptionsError:
        raise
    except ValueError as exc:
        raise Fp4OptionsError(f"{exc}{source}") from None


def resolve_target(config: Fp4Config, example_inputs) -> str:
    if config.target != "auto":
        return config.target
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return "cuda"
    return "cpu"


def _root_modules(gm):
    """The modules dynamo is compiling (usually one, the model), or None.

    The parameters' sources name the root local (L['self'], or L['args'][0] under a
    `(*args, **kwargs)` wrapper); the frame being traced holds it. Returns None
    when that cannot be found (a plain function).
    """
    from .passes.find_sites import ROOT_SOURCE

    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        roots = set()
        for node in gm.graph.nodes:
            source = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
            match = ROOT_SOURCE.match(source) if isinstance(source, str) else None
            if match and "_parameters[" in source:
                roots.add((match.group(1), match.group(2)))
        modules = []
        for local, index in roots:
            value = tx.f_locals.get(local)
            modules.append(value[int(index)] if index is not None and isinstance(value, (tuple, list)) else value)
    except Exception:  # dynamo internals moved: skip the check rather than fail
        return None
    modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    return modules or None


def prepare(gm, example_inputs, options, backend: str, lower: bool = False):
    """Validate options, run the passes (and the target's lowering), record, log and return the report.

    `lower`: run the lowering step (`fp4compile.lowering`) after the passes; only
    the product backend does, so the debug backends run the semantic graph.
    """
    import copy

    from .inspection.dump import dumping, graph_module_code, maybe_dump
    from .passes.policy import check_policy_applies, check_skip_patterns

    config = resolve_config(options)
    roots = _root_modules(gm)
    root = roots[0] if roots and len(roots) == 1 else None
    try:
        check_skip_patterns(config, None if roots is None else [n for m in roots for n, _ in m.named_modules()])
    except ValueError as exc:
        raise Fp4OptionsError(str(exc)) from None
    check_policy_applies(config, root)
    report = GraphReport(graph_id=next_graph_id(), backend=backend, config=config)
    before_code = graph_module_code(gm) if dumping() else None
    target = resolve_target(config, example_inputs)
    run_passes(gm, example_inputs, config, target, report, root)
    semantic_gm, lowered_code = gm, None
    if lower:
        from .lowering import lower as lower_graph

        if dumping():  # the dump shows the graph both before and after lowering
            semantic_gm = copy.deepcopy(gm)
        lower_graph(gm, report, target)
        lowered_code = graph_module_code(gm) if dumping() else None
    add_report(report)
    maybe_dump(semantic_gm, report, before_code, lowered_code)  # writes only when FP4COMPILE_DUMP_DIR is set
    return report


def fp4_backend(gm, example_inputs, options=None, mode=None):
    """The product backend: passes, the target's lowering, then AOTAutograd + Inductor."""
    from torch._inductor.compile_fx import compile_fx

    from .lowering import inductor_ops
    from .lowering.cache_key import inductor_config_patches
    from .report import logger

    inductor_ops.register()
    report = prepare(gm, example_inputs, options, "fp4", lower=True)
    config = report.config
    logger.info("fp4compile: compiling graph %d (%d/%d matmul sites quantized, recipe %s) with Inductor; "
                "on a CPU this takes a minute or two", report.graph_id, len(report.quantized),
                len(report.sites), config.recipe)
    start = time.perf_counter()
    compiled = compile_fx(gm, example_inputs, config_patches=inductor_config_patches(config))
    logger.info("fp4compile: graph %d: Inductor compile returned after %.1f s", report.graph_id,
                time.perf_counter() - start)
    return compiled


def fp4_eager_backend(gm, example_inputs, options=None, mode=None):
    """Debug: the passes, then Python execution of the rewritten graph."""
    prepare(gm, example_inputs, options, "fp4_eager")
    return gm.forward


def fp4_aot_eager_backend(gm, example_inputs, options=None, mode=None):
    """Debug: the passes plus AOTAutograd, without Inductor."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_compiler

    prepare(gm, example_inputs, options, "fp4_aot_eager")

    def run_graph(fx_module, _inputs):
        return fx_module

    compiler = make_boxed_compiler(run_graph)
    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)(gm, example_inputs)


_BACKENDS = {"fp4": fp4_backend, "fp4_eager": fp4_eager_backend, "fp4_aot_eager": fp4_aot_eager_backend}


def register_backends() -> None:
    """Register the backends with dynamo, once.

    Dynamo also finds `fp4` through the `torch_dynamo_backends` entry point; a
    second `register_backend` of the same name raises "duplicate name", so each
    name is registered only if dynamo does not know it yet.
    """
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    for name, fn in _BACKENDS.items():
        if name not in _COMPILER_FNS:
            register_backend(compiler_fn=fn, name=name)
