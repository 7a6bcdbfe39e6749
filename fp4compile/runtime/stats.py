"""FP4 training telemetry: the per-site statistics, their reference formulas, and the probes.

Why this exists: `inspect().numerics` studies one batch once; training needs to
see, every N steps, how each quantized layer's tensors sit on the FP4 grid
(how much flushes to zero, how much OCC clamps, how much signal survives).

The rewrite pass (with `stats_interval=N > 0`) inserts two probes per site:

- `site_probe(x, w, w_q, w_s, ...)` in the forward, an opaque custom op whose
  result (a 0-dim 1.0) multiplies the weight scale the GEMM reads. Multiplying
  by exactly 1 changes no value (NaN, Inf and -0 included); it keeps the probe
  alive and ordered in the compiled graph without copying any large tensor.
- `grad_probe(y, w, ...)` on the site's output, an autograd function that is
  the identity forward and, in the backward, multiplies dY by the 1.0 of the
  opaque `grad_probe_op`, which sees dY.

The decision "is this a statistics step?" is made on the host, from a Python
step counter per site instance (one per weight tensor: a block compiled once
and run for every layer has one instance per layer). On other steps each probe
returns at once: no tensor is read, nothing is synchronized, nothing is
recompiled. On a statistics step the probe computes the statistics below in
plain PyTorch on the tensors it was handed (the activation's clamp and
quantization are recomputed from the site input x with the reference ops, so
the CPU lowering, which never materializes the clamped or quantized activation,
needs no change), and the record is read back to the host once, when the
step's backward reaches the site. Steps are counted by backward passes, so
evaluation forwards between training steps do not advance the counter.

Why not compute the statistics inside the quantization kernels on every step
and keep one step in N: that variant was built and measured on the demo model
(CPU, Inductor, N = 10): +23% mean step time, against +10% for this one, because
Inductor turns each full-tensor reduction over the clamped and quantized
activation into extra kernels that recompute the quantization
(docs/telemetry.md, benchmarks/results/step_time_cpu_demo_stats10*.json).

Definitions (per site, every statistic over the whole tensor):

- amax: max |v| of the weight w, of the activation x (the site input, before
  clamping) and of the output gradient dY; a NaN propagates (amax is NaN).
- underflow: the share of all elements that are non-zero at the quantizer's
  input and zero on the grid (w vs w_q; the clamped activation vs x_q).
- clamp: the share of the activation's elements that OCC changed (x_c != x,
  NaN entries excluded); 0 without OCC.
- SNR (dB): 10 log10(sum v^2 / sum (v - v_hat)^2), v_hat the operand the forward
  GEMM effectively multiplies: w_q * w_s for the weight; x_q * x_s for the
  activation, plus the OCC residual when it is compensated (then the error is
  x_c - x_q * x_s, as in SPEC.md section 4's fidelity table). +inf when exact.
"""
from __future__ import annotations

import logging
import math
import statistics as _pystats
import threading
from dataclasses import dataclass, field

import torch

from .occ import occ_split, occ_thresholds
from .quantize import compute_dtype, quantize

logger = logging.getLogger("fp4compile")

# A site whose SNR (activation or weight) falls this many dB below the median
# of its own earlier records is named in a warning. 10 dB is a tenfold rise of
# the quantization noise power relative to the signal.
SNR_DROP_DB = 10.0
# Earlier records needed before the median means anything.
SNR_MIN_HISTORY = 3

STAT_FIELDS = (
    "act_amax", "weight_amax", "grad_amax",
    "act_underflow", "weight_underflow", "act_clamp",
    "act_snr_db", "weight_snr_db",
)


# ---- the reference statistics ------------------------------------------------------


def snr_db(signal_power: torch.Tensor, noise_power: torch.Tensor) -> torch.Tensor:
    """10 log10(signal / noise) in float64; +inf for zero noise, NaN for 0/0."""
    return 10.0 * torch.log10(signal_power.double() / noise_power.double())


def weight_stats(w: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor) -> dict:
    """amax, underflow share and SNR of a weight [out, in] against its quantized (w_q, w_s)."""
    w_hp = w.to(w_q.dtype)
    n = w_hp.numel()
    return {
        "weight_amax": w_hp.abs().amax().double(),
        "weight_underflow": ((w_hp != 0) & (w_q == 0)).sum().double() / n,
        "weight_snr_db": snr_db(w_hp.square().sum(), (w_hp - w_q * w_s).square().sum()),
    }


def activation_stats(x: torch.Tensor, alpha_num, alpha_den, scope, fmt, granularity, compensate: bool) -> dict:
    """amax, underflow, clamp share and SNR of an activation, recomputed with the reference ops.

    `alpha_num=None`: no OCC; `fmt=None`: the activation is not quantized.
    """
    x_hp = x.to(compute_dtype(x.dtype))
    n = x_hp.numel()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    if alpha_num is not None:
        upper, lower = occ_thresholds(x_hp, alpha_num, alpha_den, scope)
        x_c, _ = occ_split(x_hp, upper, lower)
        clamp = ((x_c != x_hp) & (x_hp == x_hp)).sum().double() / n
    else:
        x_c, clamp = x_hp, zero
    if fmt is not None:
        x_q, x_s = quantize(x_c, granularity=granularity, fmt=fmt)
        x_deq = x_q * x_s
        underflow = ((x_c != 0) & (x_q == 0)).sum().double() / n
    else:
        x_q, x_deq, underflow = x_c, x_c, zero
    # With compensation the GEMM sees x_q * x_s + (x - x_c): its error is x_c - x_q * x_s.
    error = (x_c - x_deq) if (alpha_num is not None and compensate) else (x_hp - x_deq)
    return {
        "act_amax": x_hp.abs().amax().double(),
        "act_underflow": underflow,
        "act_clamp": clamp,
        "act_snr_db": snr_db(x_hp.square().sum(), error.square().sum()),
    }


def grad_stats(grad: torch.Tensor) -> dict:
    """amax of the output gradient dY (before its E5M2 cast)."""
    return {"grad_amax": grad.abs().amax().double()}


# ---- the store: which steps record, and the records -------------------------------


@dataclass
class SiteSpec:
    """What a probe needs to know about its site (registered by the rewrite pass)."""

    graph_id: int
    module_path: str
    interval: int
    occ: tuple | None  # (alpha_num, alpha_den, scope) or None
    act_fmt: str | None
    act_granularity: str
    compensate: bool
    weight_transposed: bool  # stored [in, out] (Conv1D, x @ W): quantized as its transpose
    act_key: int = -1  # sites reading one activation node (q/k/v) share its key and its statistics


@dataclass
class _Instance:
    """One site run on one weight tensor: the step counter and the forward half of a record."""

    key: int
    weight_ptr: int
    index: int  # order of first appearance among the instances of this site
    step: int = 0
    pending: dict | None = None
    snr_history: dict = field(default_factory=lambda: {"act_snr_db": [], "weight_snr_db": []})


_lock = threading.Lock()
_sites: dict[int, SiteSpec] = {}
_instances: dict[tuple[int, int], _Instance] = {}
_records: list[dict] = []
# act_key -> (the activation tensor, its statistics), held from the first of its
# sites' forward probes to their backward on a statistics step: q/k/v read one
# activation, whose statistics are computed once. Identity (`is`), not address:
# the held tensor cannot be freed, so no other tensor can pass for it.
_act_cache: dict[int, tuple] = {}
_act_keys = [0]


def new_activation_key() -> int:
    with _lock:
        _act_keys[0] += 1
        return _act_keys[0]


def register_site(spec: SiteSpec) -> int:
    """A new key for a rewritten site; the probes carry it as a constant."""
    with _lock:
        key = len(_sites)
        _sites[key] = spec
        return key


def _instance(key: int, weight: torch.Tensor) -> _Instance:
    ptr = weight.data_ptr()
    inst = _instances.get((key, ptr))
    if inst is None:
        with _lock:
            index = sum(1 for k, _ in _instances if k == key)
            inst = _instances.setdefault((key, ptr), _Instance(key, ptr, index))
    return inst


def _is_stats_step(inst: _Instance) -> bool:
    return inst.step % _sites[inst.key].interval == 0


def record_forward(key: int, x, weight, w_q, w_s) -> None:
    """Forward half of a record, on statistics steps only."""
    inst = _instance(key, weight)
    if not _is_stats_step(inst):
        return
    spec = _sites[key]
    occ = spec.occ or (None, None, None)
    with torch.no_grad():
        cached = _act_cache.get(spec.act_key)
        if cached is not None and cached[0] is x:
            pending = dict(cached[1])
        else:
            pending = activation_stats(x, *occ, spec.act_fmt, spec.act_granularity, spec.compensate)
            _act_cache[spec.act_key] = (x, dict(pending))
        # The weight as the quantizer saw it, [out, in] (a Conv1D stores [in, out]).
        pending.update(weight_stats(weight.t() if spec.weight_transposed else weight, w_q, w_s))
    inst.pending = pending


def record_backward(key: int, grad, weight) -> None:
    """Backward half: on a statistics step, complete the record; always count the step."""
    inst = _instance(key, weight)
    if _is_stats_step(inst):
        with torch.no_grad():
            values = {**(inst.pending or {}), **grad_stats(grad)}
        inst.pending = None
        _act_cache.pop(_sites[key].act_key, None)
        _finish(inst, values)
    inst.step += 1


def _finish(inst: _Instance, values: dict) -> None:
    spec = _sites[inst.key]
    names = [name for name in STAT_FIELDS if name in values]
    # The one host read of a statistics step.
    floats = dict(zip(names, torch.stack([values[n].double().cpu() for n in names]).tolist()))
    record = {"step": inst.step, "graph": spec.graph_id, "site": spec.module_path, "instance": inst.index,
              "weight_ptr": inst.weight_ptr}
    record.update({name: floats.get(name, math.nan) for name in STAT_FIELDS})
    for name in ("act_snr_db", "weight_snr_db"):
        history, value = inst.snr_history[name], record[name]
        if len(history) >= SNR_MIN_HISTORY and math.isfinite(value):
            median = _pystats.median(history)
            if value < median - SNR_DROP_DB:
                logger.warning(
                    "fp4compile: %s SNR of %s (graph %d, instance %d) fell to %.1f dB at step %d, %.1f dB below "
                    "its running median %.1f dB", name.split("_")[0].replace("act", "activation"), spec.module_path,
                    spec.graph_id, inst.index, value, inst.step, median - value, median)
        if math.isfinite(value):
            history.append(value)
    with _lock:
        _records.append(record)


def records() -> list[dict]:
    with _lock:
        return [dict(r) for r in _records]


def clear() -> None:
    """Forget the records and restart every step counter (the registered sites stay)."""
    with _lock:
        _records.clear()
        _instances.clear()
        _act_cache.clear()


# ---- the graph ops -------------------------------------------------------------------


@torch.library.custom_op("fp4compile::site_probe", mutates_args=())
def site_probe_op(x: torch.Tensor, weight: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor,
                  key: int) -> torch.Tensor:
    """Forward probe: records on statistics steps; returns 1.0 (multiplied into the weight scale)."""
    record_forward(key, x, weight, w_q, w_s)
    return torch.ones((), dtype=w_s.dtype, device=w_s.device)


@site_probe_op.register_fake
def _(x, weight, w_q, w_s, key):
    return w_s.new_ones(())


def _no_grad_backward(ctx, grad):
    return None, None, None, None, None


site_probe_op.register_autograd(_no_grad_backward)


@torch.library.custom_op("fp4compile::grad_probe", mutates_args=())
def grad_probe_op(grad: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    """Backward probe: completes the record on statistics steps; returns 1.0 (multiplied into dY)."""
    record_backward(key, grad, weight)
    return torch.ones((), dtype=grad.dtype, device=grad.device)


@grad_probe_op.register_fake
def _(grad, weight, key):
    return grad.new_ones(())


class _GradProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, key):
        ctx.key = key
        ctx.save_for_backward(weight)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * grad_probe_op(grad, weight.detach(), ctx.key), None, None


def grad_probe(y, weight, key: int):
    """Identity on the site's output y; its backward hands dY to the telemetry."""
    return _GradProbe.apply(y, weight, key)


def probed_weight_scale(x, weight, w_q, w_s, key: int):
    """The weight scale times the forward probe's 1.0 (what the GEMM then reads)."""
    return w_s * site_probe_op(x, weight, w_q, w_s, key)
