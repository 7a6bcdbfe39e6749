"""The training application built on the fp4 backend: models, data, loop, benchmark, demo.

None of it is part of the compiler: it is what the project uses to show and
measure FP4 training end to end. `loop` trains any compiled model with one
schedule and data order; `bench` runs recipes side by side (`python -m fp4compile
bench train`); `demo` is the README's main job; `data` is the embedded corpus;
`models` holds the LLaMA presets. It reads the compiler's public reports, never
pass internals.

The loop's names are re-exported here, so `from fp4compile.training import
TrainConfig, build_model, train` works as it did when the loop was one module.
"""
from .loop import (
    StepRecord,
    TrainConfig,
    TrainResult,
    build_model,
    evaluate,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
    train,
)

__all__ = [
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "lr_at",
    "make_optimizer",
    "save_checkpoint",
    "train",
]
