"""The report's figures as PNG bytes, drawn with matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas, never through
pyplot: no global figure registry, no GUI backend, safe in a headless process. The PNGs carry no
timestamp, so the same run gives the same bytes.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

from dromedary_ray.report.collect import IsheepInfo, RunInfo, Series, StageInfo

MAX_FIELDS = 24  # a step log with more numeric fields than this shows its first 24


@dataclass(frozen=True)
class Plot:
    key: str  # unique within a report; also the Markdown twin's file name (key.png)
    title: str
    png: bytes


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "plot"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def series_plot(key: str, title: str, series: Series) -> Plot:
    """One small panel per numeric field against the series' x key."""
    from matplotlib.ticker import MaxNLocator

    names = list(series.fields)[:MAX_FIELDS]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(4.0 * cols, 2.8 * rows)
    fig.suptitle(title)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        xs, ys = series.fields[name]
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(series.x_key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if all(float(x).is_integer() for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return Plot(key, title, _png(fig))


def stage_rows_plot(key: str, stages: list[StageInfo]) -> Plot | None:
    """Kept and rejected rows per stage, stacked."""
    shown = [s for s in stages if s.kept is not None]
    if not shown:
        return None
    fig = _figure(max(5.0, 1.1 * len(shown) + 2), 3.2)
    ax = fig.add_subplot()
    names = [s.name for s in shown]
    kept = [s.kept or 0 for s in shown]
    ax.bar(names, kept, label="kept", color="#4c8c4a")
    ax.bar(names, [s.rejected or 0 for s in shown], bottom=kept, label="rejected",
           color="#c0504d")
    ax.set_ylabel("rows")
    ax.set_title("Rows per stage")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    return Plot(key, "Rows per stage", _png(fig))


def stage_time_plot(key: str, stages: list[StageInfo]) -> Plot | None:
    """Wall time per stage, as bars along the run's own clock when start times are known."""
    timed = [s for s in stages if s.seconds is not None]
    if not timed:
        return None
    fig = _figure(7.0, 0.45 * len(timed) + 1.4)
    ax = fig.add_subplot()
    origin = min((s.started for s in timed if s.started is not None), default=None)
    for i, s in enumerate(timed):
        known = origin is not None and s.started is not None
        left = (s.started - origin) / 60 if known else 0.0
        ax.barh(i, (s.seconds or 0) / 60, left=left, color="#4f81bd")
    ax.set_yticks(range(len(timed)), [s.name for s in timed], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the first stage started" if origin else "minutes")
    ax.set_title("Stage timings")
    ax.grid(axis="x", alpha=0.3)
    return Plot(key, "Stage timings", _png(fig))


def hist_plot(key: str, name: str, per_iter: dict[int, dict[str, float]]) -> Plot:
    """A histogram per iteration, grouped by bucket."""
    buckets = list(dict.fromkeys(b for h in per_iter.values() for b in h))
    iterations = sorted(per_iter)
    width = 0.8 / max(1, len(iterations))
    fig = _figure(max(5.0, 0.5 * len(buckets) * max(1, len(iterations)) ** 0.5 + 2), 3.2)
    ax = fig.add_subplot()
    for j, it in enumerate(iterations):
        xs = [i + j * width for i in range(len(buckets))]
        ax.bar(xs, [per_iter[it].get(b, 0) for b in buckets], width=width,
               label=f"iteration {it}")
    ax.set_xticks([i + width * (len(iterations) - 1) / 2 for i in range(len(buckets))],
                  buckets, fontsize=8)
    ax.set_title(name)
    ax.legend(fontsize=7)
    return Plot(key, f"I-SHEEP {name}", _png(fig))


def stage_plots(prefix: str, stage: StageInfo) -> list[Plot]:
    return [series_plot(f"{prefix}stage-{slug(stage.name)}-{slug(c.name)}",
                        f"{stage.name}: {c.name}", c) for c in stage.curves]


def isheep_plots(prefix: str, isheep: IsheepInfo) -> list[Plot]:
    plots = []
    if isheep.metrics is not None:
        plots.append(series_plot(f"{prefix}isheep-metrics", "I-SHEEP metrics per iteration",
                                 isheep.metrics))
    for name, per_iter in isheep.hists.items():
        plots.append(hist_plot(f"{prefix}isheep-{slug(name)}", name, per_iter))
    return plots


def run_plots(run: RunInfo, prefix: str = "") -> dict[str, list[Plot]]:
    """Every figure of a run, grouped by where the report shows it: "overview", "stage:NAME",
    "isheep", and for each I-SHEEP iteration the same groups under "iter_K/"."""
    groups: dict[str, list[Plot]] = {"overview": []}
    for plot in (stage_rows_plot(f"{prefix}overview-rows", run.stages),
                 stage_time_plot(f"{prefix}overview-time", run.stages)):
        if plot is not None:
            groups["overview"].append(plot)
    for stage in run.stages:
        groups[f"stage:{stage.name}"] = stage_plots(prefix, stage)
    if run.isheep is not None:
        groups["isheep"] = isheep_plots(prefix, run.isheep)
        for it in run.isheep.iterations:
            for group, plots in run_plots(it.run, f"{prefix}iter_{it.k}-").items():
                groups[f"iter_{it.k}/{group}"] = plots
    return groups
