"""The report as a flat list of blocks (headings, text, tables, figures), built once from a
`RunInfo` and its plots; html.py and markdown.py only render these blocks, so the two files
always say the same things in the same order."""

from __future__ import annotations

from dataclasses import dataclass

from dromedary_ray.report import tables as t
from dromedary_ray.report.collect import RunInfo, StageInfo
from dromedary_ray.report.plots import Plot, slug


@dataclass(frozen=True)
class Heading:
    level: int  # 1..6
    text: str
    anchor: str


@dataclass(frozen=True)
class Text:
    text: str
    kind: str = "p"  # p | note | muted


@dataclass(frozen=True)
class Status:
    status: str  # done | running | pending | failed | unknown ...


@dataclass(frozen=True)
class Facts:
    pairs: list[tuple[str, str]]


@dataclass(frozen=True)
class TableBlock:
    table: t.Table
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    plot: Plot


Block = Heading | Text | Status | Facts | TableBlock | Figure


def _h(level: int, text: str, anchor: str) -> Heading:
    return Heading(min(level, 6), text, slug(anchor))


def _stage_blocks(stage: StageInfo, plots: list[Plot], level: int, prefix: str) -> list[Block]:
    blocks: list[Block] = [_h(level, stage.name, f"{prefix}stage-{stage.name}"),
                           Status(stage.status), Facts(t.timing_rows(stage))]
    if stage.throughput or stage.rows_per_second:
        pairs = [(k, t.fmt(v, 1)) for k, v in stage.throughput.items()]
        if stage.rows_per_second:
            pairs.append(("rows per second", t.fmt(stage.rows_per_second, 2)))
        blocks += [Text("Throughput"), Facts(pairs)]
    if stage.reject_reasons:
        blocks.append(TableBlock(t.rejects_table(stage), "Rejects by reason"))
    elif stage.status != "pending":
        blocks.append(Text("No rejected rows.", "muted"))
    if stage.metrics:
        blocks.append(TableBlock(t.metrics_table(stage), "Stage metrics (manifest)"))
    blocks += [Figure(p) for p in plots]
    blocks += [Text(f"note: {n}", "note") for n in stage.notes]
    return blocks


def _eval_blocks(run: RunInfo, level: int, prefix: str) -> list[Block]:
    # An I-SHEEP iteration's models are listed in the top-level table, not again here.
    if not run.evals and (prefix or not run.produced_models):
        return []
    blocks: list[Block] = [_h(level, "Evaluation", f"{prefix}evaluation")]
    if not run.evals:
        return blocks + [Text("No eval results yet: `dromedary eval MODEL --suite NAME "
                              "--run-dir RUN --name LABEL` writes them here.", "muted"),
                         TableBlock(t.eval_summary_table(run))]
    blocks.append(TableBlock(t.eval_summary_table(run), "Headline metrics, one row per model"))
    for suite, table in t.eval_detail_tables(run).items():
        blocks.append(TableBlock(table, f"{suite}: every subset"))
    return blocks


def _isheep_blocks(run: RunInfo, plots: dict[str, list[Plot]], level: int,
                   prefix: str) -> list[Block]:
    if run.isheep is None:
        return []
    blocks: list[Block] = [_h(level, "I-SHEEP iterations", f"{prefix}isheep")]
    table = t.isheep_table(run)
    if table is not None:
        blocks.append(TableBlock(table, "isheep/metrics.jsonl"))
    blocks += [Figure(p) for p in plots.get(f"{prefix}isheep", [])]
    for it in run.isheep.iterations:
        facts = [("model in", it.model_in or ""), ("model out", it.model_out or ""),
                 ("time", t.fmt_seconds(it.seconds))]
        blocks += [_h(level + 1, f"Iteration {it.k}", f"{prefix}iter_{it.k}"), Status(it.status),
                   Facts([(k, v) for k, v in facts if v])]
        blocks += run_blocks(it.run, plots, level + 2, f"{prefix}iter_{it.k}/")
    if not run.isheep.iterations:
        blocks.append(Text("No iteration folders yet.", "muted"))
    return blocks


def run_blocks(run: RunInfo, plots: dict[str, list[Plot]], level: int,
               prefix: str = "") -> list[Block]:
    """Stages, history, I-SHEEP and evals of one run; `prefix` keys nested iterations' plots
    and anchors (plots come from `plots.run_plots`, grouped the same way)."""
    blocks: list[Block] = [Text(f"note: {n}", "note") for n in run.notes]
    blocks.append(_h(level, "Stages", f"{prefix}stages"))
    if run.stages:
        blocks.append(TableBlock(t.stages_table(run.stages)))
    elif run.isheep is not None:
        blocks.append(Text("Each I-SHEEP iteration runs its own stages: see below.", "muted"))
    else:
        blocks.append(Text("No stages yet.", "muted"))
    blocks += [Figure(p) for p in plots.get(f"{prefix}overview", [])]
    for stage in run.stages:
        blocks += _stage_blocks(stage, plots.get(f"{prefix}stage:{stage.name}", []),
                                level + 1, prefix)
    if run.history:
        blocks += [_h(level, "Run history", f"{prefix}history"),
                   Text("Every stage run or skip the driver logged (metrics.jsonl).", "muted"),
                   TableBlock(t.history_table(run.history))]
    blocks += _isheep_blocks(run, plots, level, prefix)
    blocks += _eval_blocks(run, level, prefix)
    return blocks


def build_document(run: RunInfo, plots: dict[str, list[Plot]], generated: str) -> list[Block]:
    facts = [("run directory", run.path), ("recipe", run.recipe or ""),
             ("model", run.model or ""), ("generated", generated)]
    return [Heading(1, f"Run report: {run.path.rstrip('/').rsplit('/', 1)[-1]}", "top"),
            Facts([(k, v) for k, v in facts if v]), *run_blocks(run, plots, 2)]
