"""fp4compile: FP4 (E2M1) training as a torch.compile backend.

    import fp4compile
    model = torch.compile(model, backend="fp4", options={"recipe": "paper"})

The backend finds the linear-layer matmuls in the graph dynamo captures, rewrites
each into OCC clamp, quantize, FP4 GEMM and compensation nodes with the DGE
backward rule (SPEC.md), and hands the result to AOTAutograd and Inductor.
"""
from .config import RECIPES, Fp4Config
from .runtime.dge import dge_grad_scale
from .runtime.occ import occ_clamp
from .runtime.quantize import fake_quantize, quantize
from .runtime.reference import fp4_linear_reference

__all__ = [
    "Fp4Config",
    "RECIPES",
    "quantize",
    "fake_quantize",
    "dge_grad_scale",
    "occ_clamp",
    "fp4_linear_reference",
]

from .api import compile_model
from .backend import OPTIONS_ENV, register_backends
from .config import Fp4OptionsError
from .inspection.inspect import inspect
from .precision_switch import PrecisionSwitch, SwitchEvent, switch_events
from .report import reports, reset
from .stats import stats  # the function; the module stays importable as fp4compile.stats via sys.modules

__all__ += ["compile_model", "Fp4OptionsError", "OPTIONS_ENV", "reports", "reset", "inspect", "stats",
            "PrecisionSwitch", "SwitchEvent", "switch_events"]

register_backends()
