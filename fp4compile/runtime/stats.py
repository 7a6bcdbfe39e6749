"""FP4 training telemetry: the per-site statistics, their reference formulas, and the probes.

Why this exists: `inspect().numerics` studies one batch once; training needs to
see, every N steps, how each quantized layer's tensors sit on the FP4 grid
(how much flushes to zero, how much OCC clamps, how much signal survives).

With `stats_interval=N > 0` the rewrite pass inserts, per quantized site:

- `activation_stats_op(x, x_c, x_q, x_s)` once per activation (q/k/v share
  it) and `weight_stats_op(w, w_q, w_s)`: small reductions over tensors the
  quantization kernels already read, so Inductor computes them inside those
  kernels, every step, into a vector of nine float64 numbers. (The CPU
  lowering, which fuses clamp + quantize + residual into one op, computes the
  activation's vector inside that op: `lowering/cpu.py`.)
- `site_probe`, an opaque custom op that receives the vector. Its result (a
  0-dim 1.0) multiplies the weight scale the GEMM reads; multiplying by exactly
  1 changes no value (NaN, Inf and -0 included) and keeps the probe alive and
  ordered in the compiled graph.
- `grad_probe` on the site's output: the identity forward; its backward reduces
  amax(|dY|) in the graph, hands it to the opaque `grad_probe_op` and
  multiplies dY by that op's 1.0.

"Is this a statistics step?" is decided on the host, from a Python step counter
per site instance (one per weight tensor: a block compiled once and run for
every layer has one instance per layer). On other steps the probes return at
once and the vectors are dropped: no host read, no recompile. On a statistics
step the forward probe keeps its vector (a device-side copy) and the record is
read to the host once, when the step's backward reaches the site. Steps are
counted by backward passes, so evaluation forwards do not advance the counter.
Computing every step and keeping one step in N costs less than recomputing on
statistics steps only (benchmarks/stats_variants.py, docs/telemetry.md).

Definitions (per site, every statistic over the whole tensor):

- amax: max |v| of the weight w, of the activation x (the site input, before
  clamping) and of the output gradient dY; a NaN propagates (amax is NaN).
- underflow: the share of all elements that are non-zero at the quantizer's
  input and zero on the grid (w vs w_q; the clamped activation x_c vs x_q).
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


# ---- the statistics (plain PyTorch: in the graph, Inductor fuses them) ---------------

ACT_VECTOR = ("act_amax", "act_underflow", "act_clamp", "act_signal", "act_noise")
WEIGHT_VECTOR = ("weight_amax", "weight_underflow", "weight_signal", "weight_noise")


def activation_stats_vector(x, x_c, x_q, x_s, clamped: bool, compensated: bool) -> torch.Tensor:
    """[amax, underflow share, clamp share, signal power, noise power] of one activation, float64.

    x: the site input; x_c: the quantizer's input (x itself without OCC);
    (x_q, x_s): the quantized activation. Shares are exact counts over numel.
    """
    x_hp = x.detach().to(x_c.dtype)
    x_c, x_q, x_s = x_c.detach(), x_q.detach(), x_s.detach()
    n = x_hp.numel()
    clamp = ((x_c != x_hp) & (x_hp == x_hp)).sum() if clamped else torch.zeros((), dtype=torch.int64,
                                                                               device=x.device)
    # With compensation the GEMM sees x_q * x_s + (x - x_c): its error is x_c - x_q * x_s.
    error = (x_c if (clamped and compensated) else x_hp) - x_q * x_s
    return torch.stack([
        x_hp.abs().amax().double(),
        ((x_c != 0) & (x_q == 0)).sum().double() / n,
        clamp.double() / n,
        x_hp.square().sum().double(),
        error.square().sum().double(),
    ])


def weight_stats_vector(w, w_q, w_s) -> torch.Tensor:
    """[amax, underflow share, signal power, noise power] of a weight [out, in], float64."""
    w_hp, w_q, w_s = w.detach().to(w_q.dtype), w_q.detach(), w_s.detach()
    return torch.stack([
        w_hp.abs().amax().double(),
        ((w_hp != 0) & (w_q == 0)).sum().double() / w_hp.numel(),
        w_hp.square().sum().double(),
        (w_hp - w_q * w_s).square().sum().double(),
    ])


def activation_stats_op(x, x_c, x_q, x_s, clamped: bool, compensated: bool):
    """Graph node: the activation's statistics vector (shared by the sites reading it)."""
    return activation_stats_vector(x, x_c, x_q, x_s, clamped, compensated)


def site_stats_op(act_vector, w, w_q, w_s):
    """Graph node: one site's nine statistics, the activation's then the weight's."""
    return torch.cat([act_vector, weight_stats_vector(w, w_q, w_s)])


def snr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); +inf for zero noise, NaN for 0/0."""
    if noise == 0:
        return math.nan if signal == 0 else math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


# ---- the store: which steps record, and the records -------------------------------


@dataclass
class SiteSpec:
    """What the probes know about their site (registered by the rewrite pass)."""

    graph_id: int
    module_path: str
    interval: int


@dataclass
class _Instance:
    """One site run on one weight tensor: the step counter and the forward half of a record."""

    key: int
    weight_ptr: int
    index: int  # order of first appearance among the instances of this site
    step: int = 0
    pending: torch.Tensor | None = None
    snr_history: dict = field(default_factory=lambda: {"act_snr_db": [], "weight_snr_db": []})


_lock = threading.Lock()
_sites: dict[int, SiteSpec] = {}
_instances: dict[tuple[int, int], _Instance] = {}
_records: list[dict] = []


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


def record_forward(key: int, vector: torch.Tensor, weight: torch.Tensor) -> None:
    """Forward half: keep the site's statistics vector on statistics steps (no host read)."""
    inst = _instance(key, weight)
    if _is_stats_step(inst):
        inst.pending = vector.detach().clone()


def record_backward(key: int, grad_amax: torch.Tensor, weight: torch.Tensor) -> None:
    """Backward half: on a statistics step, complete and read the record; always count the step."""
    inst = _instance(key, weight)
    if _is_stats_step(inst) and inst.pending is not None:
        _finish(inst, torch.cat([inst.pending, grad_amax.detach().double().reshape(1)]))
        inst.pending = None
    inst.step += 1


def _finish(inst: _Instance, vector: torch.Tensor) -> None:
    spec = _sites[inst.key]
    values = dict(zip(ACT_VECTOR + WEIGHT_VECTOR + ("grad_amax",), vector.cpu().tolist()))  # the one host read
    record = {"step": inst.step, "graph": spec.graph_id, "site": spec.module_path, "instance": inst.index,
              "weight_ptr": inst.weight_ptr}
    values["act_snr_db"] = snr_db(values.pop("act_signal"), values.pop("act_noise"))
    values["weight_snr_db"] = snr_db(values.pop("weight_signal"), values.pop("weight_noise"))
    record.update({name: values[name] for name in STAT_FIELDS})
    for name in ("act_snr_db", "weight_snr_db"):
        history, value = inst.snr_history[name], record[name]
        if len(history) >= SNR_MIN_HISTORY and math.isfinite(value):
            median = _pystats.median(history)
            if value < median - SNR_DROP_DB:
                logger.warning(
                    "fp4compile: %s SNR of %s (graph %d, instance %d) fell to %.1f dB at step %d, %.1f dB below "
                    "its running median %.1f dB", "activation" if name.startswith("act") else "weight",
                    spec.module_path, spec.graph_id, inst.index, value, inst.step, median - value, median)
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


# ---- the graph ops -------------------------------------------------------------------


@torch.library.custom_op("fp4compile::site_probe", mutates_args=())
def site_probe_op(vector: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, key: int) -> torch.Tensor:
    """Forward probe: keeps `vector` on statistics steps; returns 1.0 in `like`'s dtype."""
    record_forward(key, vector, weight)
    return torch.ones((), dtype=like.dtype, device=like.device)


@site_probe_op.register_fake
def _(vector, weight, like, key):
    return like.new_ones(())


def _no_grad_backward(ctx, grad):
    return None, None, None, None


site_probe_op.register_autograd(_no_grad_backward)


@torch.library.custom_op("fp4compile::grad_probe", mutates_args=())
def grad_probe_op(grad_amax: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, key: int) -> torch.Tensor:
    """Backward probe: completes the record on statistics steps; returns 1.0 in `like`'s dtype."""
    record_backward(key, grad_amax, weight)
    return torch.ones((), dtype=like.dtype, device=like.device)


@grad_probe_op.register_fake
def _(grad_amax, weight, like, key):
    return like.new_ones(())


class _GradProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, key):
        ctx.key = key
        ctx.save_for_backward(weight)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # amax(|dY|) as a reduction in the backward graph: Inductor fuses it into a kernel reading dY.
        one = grad_probe_op(grad.abs().amax(), weight.detach(), grad, ctx.key)
        return grad * one, None, None


def grad_probe(y, weight, key: int):
    """Identity on the site's output y; its backward hands amax(|dY|) to the telemetry."""
    return _GradProbe.apply(y, weight, key)


def probed_weight_scale(vector, weight, w_s, key: int):
    """The weight scale times the forward probe's 1.0 (what the GEMM then reads)."""
    return w_s * site_probe_op(vector, weight.detach(), w_s, key)
