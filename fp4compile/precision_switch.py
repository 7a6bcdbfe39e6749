"""Late precision switch: train the last part of a run under a higher-precision recipe.

Why this exists: low-precision training error hurts most at the end of a run.
Once the learning rate has decayed, the weight updates are small and the
quantization noise of the forward and backward GEMMs is no longer small next
to them, so an FP4 run's loss gap to the high-precision run tends to stop
shrinking there. Several FP4 pretraining recipes (NVIDIA's NVFP4 recipe among
them) therefore move to a higher-precision format near the end of the
learning-rate decay. With fp4compile that is a recompile: the recipe lives in
the compiled graph, not in the parameters, so compiling the same module again
in place with another recipe changes the numerics of every following step and
nothing else (same parameter objects, same optimizer state, same `state_dict`
keys).

    switch = fp4compile.PrecisionSwitch(total_steps=1000, last_fraction=0.1, to_recipe="bf16",
                                        from_recipe="paper")
    fp4compile.compile_model(model, "paper")
    for step in range(1000):                 # step: optimizer steps taken so far
        switch.maybe_switch(model, step)     # recompiles in place before step 900
        loss = model(batch).loss; ...

Each switch is logged on the `fp4compile` logger and recorded as a
`SwitchEvent` (`switch_events()`); `fp4compile.stats()` lists the events with
the telemetry. `PrecisionSwitch.hf_callback()` adapts it to a Hugging Face
`TrainerCallback` (transformers is imported only then).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

import torch

from .backend import BACKEND_NAMES, resolve_config
from .report import logger

__all__ = ["PrecisionSwitch", "SwitchEvent", "switch_step_for", "switch_events", "clear_switch_events"]


@dataclass(frozen=True)
class SwitchEvent:
    """One precision switch: after `step` optimizer steps, `from_recipe` became `to_recipe`."""

    step: int  # optimizer steps taken before the switch (the first step of the new recipe is step + 1, 1-based)
    total_steps: int
    from_recipe: str
    to_recipe: str
    unix_time: float
    to_label: str | None = None  # how the message names the new recipe (default: to_recipe)

    def __str__(self) -> str:
        return (f"precision switch at step {self.step}: {self.from_recipe} -> {self.to_label or self.to_recipe} "
                f"(the last {self.total_steps - self.step} of {self.total_steps} steps)")


_EVENTS: list[SwitchEvent] = []
_EVENTS_LOCK = threading.Lock()


def switch_events() -> list[SwitchEvent]:
    """Every precision switch made in this process since the last clear, oldest first."""
    with _EVENTS_LOCK:
        return list(_EVENTS)


def clear_switch_events() -> None:
    with _EVENTS_LOCK:
        _EVENTS.clear()


def _exact_fraction(value, name: str) -> Fraction:
    """`value` as an exact fraction of the decimal the user wrote (0.1 is 1/10, not the binary double)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    # repr() of a float is the shortest decimal that round-trips, which is what was typed.
    return value if isinstance(value, Fraction) else Fraction(repr(value) if isinstance(value, float) else value)


def switch_step_for(total_steps: int, last_fraction) -> int:
    """Optimizer steps trained under the first recipe: `total_steps - ceil(total_steps * last_fraction)`.

    Integer arithmetic on the exact decimal fraction (0.1 is 1/10), so that
    for example 1000 steps with 0.1 switch after exactly 900 steps, where a
    float product could land on either side of an integer. The ceiling means
    any positive fraction trains at least one step under the new recipe.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int):
        raise ValueError(f"total_steps must be an int, got {total_steps!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    fraction = _exact_fraction(last_fraction, "last_fraction")
    if not 0 < fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1] (the share of steps under the new recipe), "
                         f"got {last_fraction!r}")
    last_steps = -((-total_steps * fraction.numerator) // fraction.denominator)  # ceil, in integers
    return total_steps - last_steps


class PrecisionSwitch:
    """Recompile a model in place with `to_recipe` once `switch_step` optimizer steps are done.

    `total_steps`: the run's optimizer steps. `last_fraction` in (0, 1]: the
    share of them that trains under `to_recipe` (rounded up to whole steps:
    `switch_step = total_steps - ceil(total_steps * last_fraction)`).
    `to_recipe` and `overrides` (any `Fp4Config` field) or `options` make the
    new compile's options, validated now (a bad value raises `Fp4OptionsError`,
    a ValueError). `from_recipe` only names the old recipe in the log and the
    event. `backend`: `"fp4"` recompiles through `compile_model` (with
    `regional`, as the first compile should have been); the debug backends
    `fp4_eager`/`fp4_aot_eager` through `model.compile`; a stock backend
    (`"eager"`, `"inductor"`, ...) takes no options, so the switch then
    recompiles without changing the numerics (a warning says so; for testing
    a training loop's plumbing). `to_label`: how the log line names the new
    recipe, e.g. "float32 (bf16 recipe on CPU)" where `bf16` computes in float32.
    """

    def __init__(self, total_steps: int, last_fraction: float = 0.1, to_recipe: str = "bf16", *,
                 from_recipe: str | None = None, backend: str = "fp4", regional: bool = False,
                 options: dict | None = None, to_label: str | None = None, **overrides) -> None:
        self.switch_step = switch_step_for(total_steps, last_fraction)
        self.total_steps = total_steps
        self.last_fraction = last_fraction
        if not isinstance(to_recipe, str):
            raise ValueError(f"to_recipe must be a recipe name, got {to_recipe!r}")
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"options must be a dict of Fp4Config fields, got {type(options).__name__}")
        merged = {**(options or {}), **overrides}
        if merged.get("recipe", to_recipe) != to_recipe:
            raise ValueError(f"options name recipe {merged['recipe']!r} but to_recipe is {to_recipe!r}")
        merged["recipe"] = to_recipe
        resolve_config(dict(merged))  # validates every field now, not at the switch
        self.options = merged
        self.to_recipe = to_recipe
        if from_recipe is not None and not isinstance(from_recipe, str):
            raise ValueError(f"from_recipe must be a recipe name or None, got {from_recipe!r}")
        self.from_recipe = from_recipe
        if to_label is not None and not isinstance(to_label, str):
            raise ValueError(f"to_label must be a string or None, got {to_label!r}")
        self.to_label = to_label
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a torch.compile backend name, got {backend!r}")
        if regional and backend != "fp4":
            raise ValueError(f"regional=True needs backend='fp4' (compile_model), got backend={backend!r}")
        self.backend = backend
        self.regional = bool(regional)
        self.event: SwitchEvent | None = None

    @property
    def switched(self) -> bool:
        return self.event is not None

    @property
    def last_steps(self) -> int:
        """Steps trained under `to_recipe`."""
        return self.total_steps - self.switch_step

    def recipe_at(self, step: int) -> str | None:
        """The recipe the optimizer step with 0-based index `step` trains under (None: the first one, unnamed)."""
        return self.to_recipe if step >= self.switch_step else self.from_recipe

    def maybe_switch(self, model: torch.nn.Module, step: int) -> bool:
        """Call before each optimizer step with the steps taken so far; True when it recompiled `model`.

        It switches on the first call with `step >= switch_step` (exactly
        `switch_step` in an uninterrupted run; a run resumed past that point
        switches before its first step) and never again. The model is compiled
        in place, so call `model` afterwards, not a `torch.compile(model)`
        wrapper made before the switch (that wrapper keeps the old recipe).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int (optimizer steps taken), got {step!r}")
        if self.switched or step < self.switch_step:
            return False
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"maybe_switch needs the nn.Module to recompile, got {type(model).__name__}")
        self._recompile(model)
        self.event = SwitchEvent(step=step, total_steps=self.total_steps,
                                 from_recipe=self.from_recipe or "previous recipe", to_recipe=self.to_recipe,
                                 unix_time=time.time(), to_label=self.to_label)
        with _EVENTS_LOCK:
            _EVENTS.append(self.event)
        logger.info("fp4compile: %s", self.event)
        return True

    def _recompile(self, model: torch.nn.Module) -> None:
        if self.backend == "fp4":
            from .api import compile_model

            compile_model(model, regional=self.regional, options=dict(self.options))
        elif self.backend in BACKEND_NAMES:
            model.compile(backend=self.backend, options=dict(self.options))
        else:
            logger.warning("fp4compile: backend %r takes no options; the precision switch recompiles the model "
                           "without changing its numerics", self.backend)
            model.compile(backend=self.backend)

    def hf_callback(self):
        """This switch as a Hugging Face `transformers.TrainerCallback`.

        It switches at `on_step_begin` (the Trainer's `state.global_step` is
        the steps taken so far) on the model the Trainer passes, which must be
        the module compiled in place (`compile_model`), and checks at
        `on_train_begin` that the Trainer's `max_steps` equals `total_steps`.
        """
        return _hf_callback_class()(self)


def _hf_callback_class():
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("PrecisionSwitch.hf_callback() needs transformers: pip install transformers") from exc

    class PrecisionSwitchCallback(TrainerCallback):
        """Recompiles the Trainer's model with the switch's recipe at its switch step."""

        def __init__(self, switch: PrecisionSwitch) -> None:
            self.switch = switch

        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps != self.switch.total_steps:
                raise ValueError(f"PrecisionSwitch(total_steps={self.switch.total_steps}) but the Trainer runs "
                                 f"max_steps={state.max_steps}: build the switch with the Trainer's step count")

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise ValueError("the Trainer passed no model to the precision-switch callback")
            self.switch.maybe_switch(model, state.global_step)

    return PrecisionSwitchCallback
