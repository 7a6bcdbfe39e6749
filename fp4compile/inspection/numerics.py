"""Per-site numerics: what FP4 quantization does to the real tensors of each quantized matmul.

The site table says which matmuls run in FP4; it does not say what that costs in
accuracy on a given model and batch. This module answers that. It runs the
uncompiled model once in high precision, records the real operands of every
quantized site (activation, weight, bias), and measures against them:

- activation fidelity (cosine similarity, MSE, SNR in dB) of the FP4
  fake-quantized activation, with OCC clamping and compensation as the config
  sets them, and without OCC;
- weight fidelity of the FP4 fake-quantized weight;
- the SNR of the quantized GEMM's output (`fp4_linear_reference` under the
  config) against the high-precision `F.linear`;
- the fraction of activation entries OCC clamps, and amax / median(|x|) of the
  activation (median over its non-zero entries), a direct measure of how
  outlier-heavy it is.

`NumericsReport.occ_study()` runs the paper's OCC fidelity study (SPEC.md
section 4) on the same captured activations, averaged over sites, next to the
paper's own figures for LLaMA-1.3B.

How operands are captured: a `TorchFunctionMode` watches every linear, matmul
and addmm call of the eager forward pass and keeps those whose weight operand is
a quantized site's parameter. This sees exactly the operands the captured graph
multiplies, in every form the site finder supports: `nn.Linear`/`F.linear`,
`x @ W.t()`, `x @ W.T`, `torch.matmul(x, W)` and `torch.addmm(b, x, W)` with W a
parameter of the model, whichever module owns it. The k-th call that uses a
parameter is matched to the k-th site (in graph order) with that weight, so a
layer called twice yields two sites and two captures. A site whose weight is
not a parameter of the model (a plain function was inspected), or that the
eager run never reaches, is listed as not captured.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..report import format_table
from ..runtime.fidelity import OCC_STUDY, fidelity, occ_study
from ..runtime.occ import occ_clamp
from ..runtime.quantize import compute_dtype, fake_quantize
from ..runtime.reference import fp4_linear_reference
from .dump import site_label

# The paper's OCC fidelity table on LLaMA-1.3B activations (SPEC.md section 4),
# in the row order of `runtime.fidelity.OCC_STUDY`.
PAPER_OCC_TABLE = (
    {"setting": "no clamp", "cos": 0.9219, "mse": 0.1055, "snr_db": 8.31},
    {"setting": "clamp 99.9", "cos": 0.9883, "mse": 0.0366, "snr_db": 14.25},
    {"setting": "clamp+comp 99.9", "cos": 0.9961, "mse": 0.0245, "snr_db": 15.31},
    {"setting": "clamp+comp 99", "cos": 1.0, "mse": 0.0099, "snr_db": 18.38},
    {"setting": "clamp+comp 97", "cos": 1.0, "mse": 0.0068, "snr_db": 20.88},
)
assert [r["setting"] for r in PAPER_OCC_TABLE] == [row[0] for row in OCC_STUDY]

_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}
_ADDMM_FUNCS = {torch.addmm, torch.Tensor.addmm}


@dataclass
class SiteOperands:
    """The real operands one quantized site multiplied in the eager run."""

    graph: int  # index of the captured graph the site belongs to
    site: object  # the MatmulSite
    activation: torch.Tensor  # as the matmul saw it: [..., K]
    weight: torch.Tensor  # [out, in] (N x K), whatever the parameter's layout
    bias: torch.Tensor | None

    @property
    def activation_2d(self) -> torch.Tensor:
        """[tokens, K]: one row per token, the layout the quantizers scale by row."""
        return self.activation.reshape(-1, self.activation.shape[-1])


class _OperandRecorder(TorchFunctionMode):
    """Records (activation, weight [out, in], bias) of every matmul against a watched parameter."""

    def __init__(self, watched: dict[int, torch.nn.Parameter]):
        super().__init__()
        self.watched = watched  # id(parameter) -> parameter
        self.calls: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _parameter_of(self, rhs):
        """(parameter, weight as [out, in]) if `rhs` is a watched parameter or its transpose."""
        if not isinstance(rhs, torch.Tensor) or rhs.dim() != 2:
            return None, None
        if id(rhs) in self.watched:
            return self.watched[id(rhs)], rhs.t()  # x @ W: W is [in, out]
        base = rhs._base
        if base is not None and id(base) in self.watched and base.dim() == 2:
            is_transpose = tuple(rhs.shape) == tuple(base.shape)[::-1] and rhs.stride() == base.stride()[::-1]
            if is_transpose and rhs.data_ptr() == base.data_ptr():
                return base, base  # x @ W.t(): W is [out, in]
        return None, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.watched:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                self._record(weight, args[0], weight, bias)
        elif func in _MATMUL_FUNCS and len(args) == 2:
            param, weight = self._parameter_of(args[1])
            if param is not None:
                self._record(param, args[0], weight, None)
            else:  # W @ x: the site multiplies x^T by W^T, W as stored is [out, in]
                param, weight_t = self._parameter_of(args[0])
                if param is not None and isinstance(args[1], torch.Tensor) and args[1].dim() >= 2:
                    self._record(param, args[1].transpose(-2, -1), weight_t.t(), None)
        elif func in _ADDMM_FUNCS and len(args) >= 3:
            param, weight = self._parameter_of(args[2])
            if param is not None:
                self._record(param, args[1], weight, args[0])
        return func(*args, **kwargs)

    def _record(self, param, activation, weight, bias):
        detach = lambda t: None if t is None else t.detach().clone()
        self.calls.append((param, detach(activation), detach(weight), detach(bias)))


def capture_site_operands(model: torch.nn.Module, sites, args=(), kwargs=None):
    """Run `model(*args, **kwargs)` once, without grad, and record each site's operands.

    `sites` is a list of (graph index, MatmulSite). Returns (captured, missing):
    a list of SiteOperands in site order, and the (graph, site) pairs that were
    not reached or whose weight is not a parameter of `model`.
    """
    by_name: dict[str, torch.nn.Parameter] = (
        dict(model.named_parameters(remove_duplicate=False)) if isinstance(model, torch.nn.Module) else {}
    )
    pending: dict[int, deque] = defaultdict(deque)  # id(parameter) -> sites using it, in order
    missing = []
    for graph, site in sites:
        param = by_name.get(site.weight_name)
        if param is None:
            missing.append((graph, site))
        else:
            pending[id(param)].append((graph, site))
    recorder = _OperandRecorder({id(p): p for p in by_name.values() if id(p) in pending})
    with torch.no_grad(), recorder:
        model(*args, **(kwargs or {}))
    found = {}
    for param, activation, weight, bias in recorder.calls:
        queue = pending[id(param)]
        if queue:
            graph, site = queue.popleft()
            found[id(site)] = SiteOperands(graph, site, activation, weight, bias)
    captured = [found[id(site)] for graph, site in sites if id(site) in found]
    missing += [pair for queue in pending.values() for pair in queue]
    return captured, missing


def _fake_quantize_or_keep(x: torch.Tensor, fmt, granularity) -> torch.Tensor:
    return x if fmt is None else fake_quantize(x, granularity=granularity, fmt=fmt)


def reconstruct_activation(x2d: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the quantized GEMM effectively multiplies, as a dense tensor, and the OCC residual.

    OCC clamp (if the config enables it), then fake quantization, then the
    residual added back if the config compensates: the activation the forward
    GEMM plus its compensation term together see.
    """
    x = x2d.to(compute_dtype(x2d.dtype))
    residual = None
    if config.occ_alpha is not None:
        x, residual = occ_clamp(x, alpha=config.occ_alpha, scope=config.occ_scope)
    x_hat = _fake_quantize_or_keep(x, config.act_fmt, config.act_granularity)
    if residual is not None and config.occ_compensate:
        x_hat = x_hat + residual
    return x_hat, residual


@dataclass
class SiteNumerics:
    """Fidelity of one quantized site on real operands. SNRs in dB; cos as a fraction."""

    graph: int
    module: str  # module path, or the weight's name for a parameter of the root module
    node: str
    mkn: tuple  # (tokens, K, N) of this batch
    activation: dict  # cos / mse / snr_db, OCC as configured
    activation_no_occ: dict  # cos / mse / snr_db, plain FP4 quantization
    weight: dict  # cos / mse / snr_db
    output: dict  # cos / mse / snr_db of the quantized GEMM vs high-precision F.linear
    clamped_fraction: float | None  # entries changed by the OCC clamp; None without OCC
    amax_over_median: float  # max |x| / median of the non-zero |x| of the activation

    def row(self) -> dict:
        m, k, n = self.mkn
        clamped = "-" if self.clamped_fraction is None else f"{100 * self.clamped_fraction:.2f}%"
        return {
            "module": self.module,
            "M x K x N": f"{m} x {k} x {n}",
            "act cos": _pct(self.activation["cos"]),
            "act SNR": _db(self.activation["snr_db"]),
            "act SNR no OCC": _db(self.activation_no_occ["snr_db"]),
            "act MSE": f"{self.activation['mse']:.3g}",
            "w cos": _pct(self.weight["cos"]),
            "w SNR": _db(self.weight["snr_db"]),
            "w MSE": f"{self.weight['mse']:.3g}",
            "out SNR": _db(self.output["snr_db"]),
            "clamped": clamped,
            "amax/median": f"{self.amax_over_median:.1f}",
        }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def measure_site(operands: SiteOperands, config) -> SiteNumerics:
    """All per-site figures for one site's captured operands."""
    site = operands.site
    x2d = operands.activation_2d
    x = x2d.to(compute_dtype(x2d.dtype))
    x_hat, residual = reconstruct_activation(x2d, config)
    x_plain = _fake_quantize_or_keep(x, config.act_fmt, config.act_granularity)
    w = operands.weight.to(compute_dtype(operands.weight.dtype))
    w_hat = _fake_quantize_or_keep(w, config.weight_fmt, config.weight_granularity)
    bias = operands.bias
    exact = F.linear(x2d.double(), operands.weight.double(), None if bias is None else bias.double())
    quantized = fp4_linear_reference(x2d, operands.weight, bias, config)
    magnitudes = x.abs().reshape(-1)
    # Median of the non-zero entries: after a ReLU most entries are zero and the plain median would be 0.
    nonzero = magnitudes[magnitudes > 0]
    median = nonzero.median().item() if nonzero.numel() else 0.0
    amax = magnitudes.max().item()
    return SiteNumerics(
        graph=operands.graph,
        module=site_label(site),
        node=site.node,
        mkn=(x2d.shape[0], w.shape[1], w.shape[0]),
        activation=fidelity(x, x_hat),
        activation_no_occ=fidelity(x, x_plain),
        weight=fidelity(w, w_hat),
        output=fidelity(exact, quantized),
        clamped_fraction=None if residual is None else (residual != 0).double().mean().item(),
        amax_over_median=amax / median if median > 0 else math.inf,
    )


@dataclass
class OccStudy:
    """The paper's OCC fidelity table on real activations, averaged over sites."""

    rows: list  # one dict per OCC_STUDY setting: cos / mse / snr_db means over sites
    per_site: dict  # module path -> that site's rows
    granularity: str
    scope: str

    def table(self) -> str:
        """Markdown in the paper's layout, with the paper's own figures in the last three columns."""
        lines = [
            "| clamp | compensate | quantile | cos sim | MSE | SNR (dB) | paper cos sim | paper MSE | paper SNR (dB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for ours, paper in zip(self.rows, PAPER_OCC_TABLE):
            quantile = "-" if ours["alpha"] is None else f"{100 * ours['alpha']:g}"
            compensate = ("yes" if ours["compensate"] else "no") if ours["clamp"] else "-"
            lines.append(
                f"| {'yes' if ours['clamp'] else 'no'} | {compensate} | {quantile} "
                f"| {100 * ours['cos']:.2f}% | {ours['mse']:.4f} | {_db(ours['snr_db'])} "
                f"| {100 * paper['cos']:.2f}% | {paper['mse']:.4f} | {paper['snr_db']:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return (
            f"OCC fidelity on the real activations of {len(self.per_site)} quantized sites "
            f"(FP4 E2M1, {self.granularity} scales, {self.scope} clamp; mean over sites), beside the paper's "
            "LLaMA-1.3B figures. MSE depends on the activations' scale, so only cos sim and SNR compare "
            "across models.\n" + self.table()
        )


@dataclass
class NumericsReport:
    """Per-site fidelity of one batch; printable as a table."""

    config: object
    sites: list  # SiteNumerics, in site order
    missing: list = field(default_factory=list)  # (graph, MatmulSite) pairs not captured
    operands: list = field(default_factory=list, repr=False)  # SiteOperands, for occ_study

    def table(self) -> str:
        if not self.sites:
            return "(no quantized site captured)"
        return format_table([s.row() for s in self.sites])

    def mean(self, key: str, metric: str = "snr_db") -> float:
        """Mean over sites of one figure, e.g. mean("activation", "snr_db")."""
        values = [getattr(s, key)[metric] for s in self.sites]
        return sum(values) / len(values) if values else math.nan

    def occ_study(self) -> OccStudy:
        """The paper's five OCC settings on every captured activation, averaged over sites.

        Runs in FP4 E2M1 with the config's activation granularity and OCC scope
        (the paper's study is about FP4 activations whatever the recipe).
        """
        granularity, scope = self.config.act_granularity, self.config.occ_scope
        per_site = {}
        for operands in self.operands:
            x = operands.activation_2d
            per_site[site_label(operands.site)] = occ_study(
                x.to(compute_dtype(x.dtype)), granularity=granularity, scope=scope
            )
        rows = []
        for i, (label, clamp, compensate, alpha) in enumerate(OCC_STUDY):
            site_rows = [site[i] for site in per_site.values()]
            mean = lambda key: sum(r[key] for r in site_rows) / len(site_rows) if site_rows else math.nan
            rows.append({"setting": label, "clamp": clamp, "compensate": compensate, "alpha": alpha,
                         "cos": mean("cos"), "mse": mean("mse"), "snr_db": mean("snr_db")})
        return OccStudy(rows=rows, per_site=per_site, granularity=granularity, scope=scope)

    def __str__(self) -> str:
        cfg = self.config
        occ = "off" if cfg.occ_alpha is None else (
            f"alpha={cfg.occ_alpha} per {cfg.occ_scope}, {'compensated' if cfg.occ_compensate else 'not compensated'}"
        )
        lines = [
            f"Per-site numerics, recipe {cfg.recipe} (activations {cfg.act_fmt or 'high precision'}/"
            f"{cfg.act_granularity}, OCC {occ}; weights {cfg.weight_fmt or 'high precision'}/"
            f"{cfg.weight_granularity}). 'act' is the activation the GEMM and its compensation see; "
            "'out SNR' compares the quantized GEMM with the float64 F.linear.",
            self.table(),
        ]
        if self.sites:
            lines.append(
                f"mean over {len(self.sites)} sites: act SNR {self.mean('activation'):.2f} dB "
                f"(no OCC {self.mean('activation_no_occ'):.2f} dB), weight SNR {self.mean('weight'):.2f} dB, "
                f"output SNR {self.mean('output'):.2f} dB"
            )
        if self.missing:
            names = ", ".join(site_label(site) for _, site in self.missing)
            lines.append(f"not captured (weight not a parameter of the model, or not reached): {names}")
        return "\n".join(lines)


def site_numerics(model, sites, config, args=(), kwargs=None) -> NumericsReport:
    """Capture the operands of the quantized `sites` ((graph, MatmulSite) pairs) and measure them."""
    quantized = [(graph, site) for graph, site in sites if site.quantized]
    captured, missing = capture_site_operands(model, quantized, args, kwargs)
    return NumericsReport(
        config=config,
        sites=[measure_site(operands, config) for operands in captured],
        missing=missing,
        operands=captured,
    )
