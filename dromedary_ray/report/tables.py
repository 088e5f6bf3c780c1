"""The report's tables as plain strings, shared by the HTML and Markdown renderers."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from dromedary_ray.report.collect import (
    EvalResult,
    HistoryEntry,
    RunInfo,
    StageInfo,
    suite_rank,
)

# Suites without an `overall` row: the rows that stand for the whole suite.
HEADLINE_ROWS = {"ifeval": ("prompt_level", "instruction_level")}


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits else f"{value:.3g}"
    return str(value)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_time(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else ""


def stages_table(stages: list[StageInfo]) -> Table:
    rows = []
    for s in stages:
        tps = "; ".join(f"{fmt(v, 1)} ({k})" if k != "tokens_per_second" else fmt(v, 1)
                        for k, v in s.throughput.items())
        rows.append([s.name, s.status, fmt(s.kept), fmt(s.rejected), fmt_seconds(s.seconds),
                     fmt(s.rows_per_second, 2), tps, "yes" if s.has_model else ""])
    return Table(["stage", "status", "kept", "rejected", "time", "rows/s", "tokens/s", "model"],
                 rows)


def rejects_table(stage: StageInfo) -> Table:
    total = sum(stage.reject_reasons.values()) or 1
    ordered = sorted(stage.reject_reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return Table(["reason", "rows", "share"],
                 [[r, str(n), f"{100 * n / total:.1f}%"] for r, n in ordered])


def metrics_table(stage: StageInfo) -> Table:
    return Table(["metric", "value"], [[k, fmt(v)] for k, v in sorted(stage.metrics.items())])


def timing_rows(stage: StageInfo) -> list[tuple[str, str]]:
    pairs = [("kept", fmt(stage.kept)),
             ("rejected", fmt(stage.rejected)), ("started", fmt_time(stage.started)),
             ("finished", fmt_time(stage.finished)), ("time", fmt_seconds(stage.seconds))]
    return [(k, v) for k, v in pairs if v]


def history_table(history: list[HistoryEntry]) -> Table:
    return Table(["time", "stage", "status", "kept", "rejected", "seconds", "tokens/s"],
                 [[fmt_time(h.time), h.stage, h.status, fmt(h.kept), fmt(h.rejected),
                   fmt(h.seconds, 1), fmt(h.tokens_per_second, 1)] for h in history])


def _headline(result: EvalResult) -> dict[str, float]:
    """The numbers that summarise one suite result: its `overall` row, the suite's headline
    rows, or every row; rates and scores only (counts stay in the detail table)."""
    base = result.suite.split("-vs-")[0]
    if "overall" in result.metrics:
        picked = {"": result.metrics["overall"]}
    elif base in HEADLINE_ROWS:
        picked = {r: result.metrics[r] for r in HEADLINE_ROWS[base] if r in result.metrics}
    else:
        picked = dict(result.metrics)
    out = {}
    for row, values in picked.items():
        floats = {k: v for k, v in values.items() if isinstance(v, float)}
        counts = {k: v for k, v in values.items()
                  if isinstance(v, int) and not isinstance(v, bool) and k != "n"}
        for k, v in (floats or counts).items():
            out[" ".join(p for p in (result.suite, row, k) if p)] = v
    return out


def _names_for(rel: str) -> set[str]:
    """What an eval label or model spec for the model saved under `<run>/<rel>/model` may be:
    the stage (`engrave`, `run:engrave`, its slug `run-engrave`), or for an I-SHEEP
    iteration's model `iter_<k>` too."""
    names = {rel, f"run:{rel}", f"run-{rel}", rel.replace("/", "-")}
    if m := re.fullmatch(r"isheep/(iter_\d+)/[^/]+", rel):
        names.add(m.group(1))
    return names


def _model_labels(run: RunInfo) -> list[tuple[str, str]]:
    """(label, spec): each eval label, then each model the run saved that no result names."""
    rows = {r.label: r.model for r in run.evals}
    taken = set(rows) | set(rows.values())
    paths = {p.rstrip("/").removesuffix("/model") for p in rows.values()}
    out = list(rows.items())
    for rel in run.produced_models:
        covered = _names_for(rel) & taken or any(p.endswith(f"/{rel}") for p in paths)
        if not covered:
            out.append((rel, f"run:{rel}" if "/" not in rel else f"{rel}/model"))
    return out


def eval_summary_table(run: RunInfo) -> Table:
    """One row per model (evaluated or produced by the run), one column per headline metric."""
    per_label: dict[str, dict[str, float]] = {}
    columns: list[tuple[tuple[int, str], str]] = []  # (suite rank, column), suites in order
    for result in run.evals:
        head = _headline(result)
        columns += [(suite_rank(result.suite), c) for c in head
                    if (suite_rank(result.suite), c) not in columns]
        per_label.setdefault(result.label, {}).update(head)
    names = [c for _, c in sorted(columns, key=lambda rc: rc[0])]  # stable within a suite
    rows = []
    for label, spec in _model_labels(run):
        values = per_label.get(label)
        if values:
            cells = [fmt(values.get(c)) for c in names]
        else:
            cells = ["not evaluated"] + [""] * (len(names) - 1) if names else []
        rows.append([label, spec, *cells])
    return Table(["model", "spec", *names], rows)


def eval_detail_tables(run: RunInfo) -> dict[str, Table]:
    """Per suite: a row per (model, subset), every metric."""
    out: dict[str, Table] = {}
    by_suite: dict[str, list[EvalResult]] = {}
    for r in run.evals:
        by_suite.setdefault(r.suite, []).append(r)
    for suite, results in by_suite.items():
        cols: list[str] = []
        for r in results:
            for values in r.metrics.values():
                cols += [k for k in values if k not in cols]
        rows = [[r.label, subset, *[fmt(values.get(c)) for c in cols]]
                for r in results for subset, values in r.metrics.items()]
        out[suite] = Table(["model", "subset", *cols], rows)
    return out


def isheep_table(run: RunInfo) -> Table | None:
    """Iterations (rows) by the numeric keys of isheep/metrics.jsonl (columns)."""
    if run.isheep is None or run.isheep.metrics is None:
        return None
    fields = run.isheep.metrics.fields
    iterations = sorted({x for xs, _ in fields.values() for x in xs})
    rows = []
    for it in iterations:
        row = [fmt(int(it) if it.is_integer() else it)]
        for xs, ys in fields.values():
            row.append(fmt(ys[xs.index(it)]) if it in xs else "")
        rows.append(row)
    return Table(["iteration", *fields], rows)
