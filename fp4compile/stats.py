"""`fp4compile.stats()`: the live FP4 telemetry as a table, a CSV file, or TensorBoard scalars.

Why this exists: with `options={"stats_interval": N}` the backend records, every
N training steps and for every quantized site, the amax of weight, activation
and output gradient, the share of values FP4 flushes to zero, the share OCC
clamps, and the quantization SNR (definitions: `runtime/stats.py`). This module
is how a user reads them back: one row per (step, site instance).

    model = torch.compile(model, backend="fp4", options={"recipe": "paper", "stats_interval": 10})
    ...train...
    table = fp4compile.stats(model)       # `model` names each row by its weight's module
    print(table); table.to_csv("fp4_stats.csv"); table.to_tensorboard("runs/fp4")

A late precision switch (`fp4compile.PrecisionSwitch`) changes which sites are
quantized mid-run; the table lists its events (`table.events`, and one line
each under the table), so that rows stopping at a step have their reason next
to them.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import torch

from .report import format_table
from .runtime import stats as _runtime

STAT_FIELDS = _runtime.STAT_FIELDS
KEY_FIELDS = ("step", "layer", "site", "graph", "instance")
CSV_FIELDS = KEY_FIELDS + STAT_FIELDS


@dataclass
class StatsTable:
    """Telemetry rows, one per (step, site instance), ordered by step then layer.

    `layer`: the module owning the weight, resolved through the model given to
    `fp4compile.stats(model)`; without a model, the site's module path in its
    graph, with `#k` for its k-th weight when one graph serves several blocks.
    """

    rows: list[dict] = field(default_factory=list)
    # Precision switches (`fp4compile.precision_switch.SwitchEvent`) made while recording.
    events: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        if not self.rows:
            text = "(no FP4 statistics recorded: compile with options={'stats_interval': N} and train)"
        else:
            text = format_table([{k: _format(row[k]) for k in CSV_FIELDS} for row in self.rows])
        return "\n".join([text, *(str(event) for event in self.events)])

    def layers(self) -> list[str]:
        return sorted({row["layer"] for row in self.rows})

    def series(self, layer: str, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one statistic of one layer."""
        rows = [row for row in self.rows if row["layer"] == layer]
        return [row["step"] for row in rows], [row[name] for row in rows]

    def hardest(self, name: str = "act_underflow", count: int = 4) -> list[str]:
        """The `count` layers with the highest mean of `name` (e.g. underflow or clamp share)."""
        means = {}
        for layer in self.layers():
            values = [v for v in self.series(layer, name)[1] if not math.isnan(v)]
            means[layer] = sum(values) / len(values) if values else -math.inf
        return sorted(means, key=lambda layer: -means[layer])[:count]

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in self.rows:
                # repr() of a float round-trips exactly (also inf and nan).
                writer.writerow({k: (repr(row[k]) if isinstance(row[k], float) else row[k]) for k in CSV_FIELDS})

    @classmethod
    def read_csv(cls, path: str | os.PathLike) -> "StatsTable":
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {k: raw[k] for k in ("layer", "site")}
                row.update({k: int(raw[k]) for k in ("step", "graph", "instance")})
                row.update({k: float(raw[k]) for k in STAT_FIELDS})
                rows.append(row)
        return cls(rows)

    def to_tensorboard(self, writer_or_logdir) -> None:
        """Every statistic as a scalar `fp4/<statistic>/<layer>` at its step.

        Takes a `torch.utils.tensorboard.SummaryWriter` or a log folder; needs
        the `tensorboard` package (not a dependency of fp4compile).
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises this when tensorboard is missing
            raise ImportError("to_tensorboard needs the tensorboard package: pip install tensorboard") from exc
        owned = not hasattr(writer_or_logdir, "add_scalar")
        writer = SummaryWriter(str(writer_or_logdir)) if owned else writer_or_logdir
        for row in self.rows:
            for name in STAT_FIELDS:
                if math.isfinite(row[name]):  # TensorBoard cannot plot inf (an exact operand's SNR)
                    writer.add_scalar(f"fp4/{name}/{row['layer']}", row[name], row["step"])
        for event in self.events:
            writer.add_text("fp4/precision_switch", str(event), event.step)
        writer.flush()
        if owned:
            writer.close()


def plot_rates(table: StatsTable, path: str | os.PathLike, count: int = 4, title: str = "") -> list[str]:
    """PNG: underflow (activation, weight) and OCC clamp share over training for the hardest layers.

    The hardest layers: the `count` with the highest mean activation underflow,
    and (clamp panel) the highest mean clamp share. Returns the layers plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plotted = []
    for layer in table.hardest("act_underflow", count):
        steps, act = table.series(layer, "act_underflow")
        line, = left.plot(steps, [100 * v for v in act], marker="o", markersize=3, label=f"{layer} (activation)")
        left.plot(steps, [100 * v for v in table.series(layer, "weight_underflow")[1]], linestyle="--",
                  color=line.get_color(), label=f"{layer} (weight)")
        plotted.append(layer)
    for layer in table.hardest("act_clamp", count):
        steps, clamp = table.series(layer, "act_clamp")
        right.plot(steps, [100 * v for v in clamp], marker="o", markersize=3, label=layer)
        plotted.append(layer)
    left.set(title="FP4 underflow (non-zero -> 0), hardest layers", xlabel="step", ylabel="% of elements")
    right.set(title="OCC clamp rate, hardest layers", xlabel="step", ylabel="% of activation elements")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return sorted(set(plotted))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _weight_names(model: torch.nn.Module | None) -> dict[int, str]:
    """data_ptr of each parameter -> the name of the module owning it."""
    if model is None:
        return {}
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), name.rsplit(".", 1)[0] if "." in name else "(root)")
    return names


def stats(model: torch.nn.Module | None = None, clear: bool = False) -> StatsTable:
    """The FP4 statistics recorded since the last clear, as a `StatsTable`.

    `model`: names each row by the module that owns its weight (a compiled
    model or the module you compiled). `clear=True` empties the records and
    restarts the step counters after reading them, and forgets the precision
    switch events (`table.events`).
    """
    from .precision_switch import clear_switch_events, switch_events

    names = _weight_names(model)
    records = _runtime.records()
    multi = {}
    for record in records:
        multi.setdefault((record["graph"], record["site"]), set()).add(record["instance"])
    rows = []
    for record in records:
        layer = names.get(record["weight_ptr"])
        if layer is None:
            layer = record["site"] or "(root)"
            if len(multi[(record["graph"], record["site"])]) > 1:
                layer += f"#{record['instance']}"
        row = {"step": record["step"], "layer": layer, "site": record["site"], "graph": record["graph"],
               "instance": record["instance"]}
        row.update({name: record[name] for name in STAT_FIELDS})
        rows.append(row)
    rows.sort(key=lambda row: (row["step"], row["layer"]))
    events = switch_events()
    if clear:
        _runtime.clear()
        clear_switch_events()
    return StatsTable(rows, events)
