"""Reference models for training with the FP4 backend.

The benchmarks and examples need a model whose linear layers carry nearly all
of the compute, shaped like the LLaMA models the FP4 training method was
measured on; :mod:`fp4compile.training.models.llama` provides it, at sizes from unit-test
tiny to about a billion parameters.
"""

from fp4compile.training.models.llama import (
    PRESETS,
    Block,
    Llama,
    LlamaConfig,
    param_count,
    preset,
)

__all__ = ["PRESETS", "Block", "Llama", "LlamaConfig", "param_count", "preset"]
