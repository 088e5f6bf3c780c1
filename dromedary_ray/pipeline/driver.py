"""The pipeline driver: run a recipe's stages in order, each skipped when already done.

A stage's fingerprint covers its own config, the files it reads and its inputs' fingerprints.
The same fingerprint with status "done" skips the stage; the same fingerprint with status
"running" resumes it from its committed shards; a different fingerprint clears it first.
The run holds `<run>/.lock` throughout (data/run_lock.py): a second run on the same directory
stops at once instead of undoing this one's work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from dromedary_ray.config import ITERATED_RECIPES, RunConfig, dump_config
from dromedary_ray.data.run_lock import run_lock
from dromedary_ray.data.schemas import RejectRow
from dromedary_ray.data.store import UNREADABLE, StageStore, fingerprint, write_run_file
from dromedary_ray.pipeline.evaluate import evaluate_model, stage_model
from dromedary_ray.runtime.faults import maybe_die
from dromedary_ray.runtime.generate import Engines
from dromedary_ray.stages import STAGES
from dromedary_ray.stages.base import StageContext

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    name: str
    status: str  # ran | skipped
    kept: int
    rejected: int
    reject_reasons: dict[str, int]
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def run_pipeline(config: RunConfig, upstream: str | None = None) -> list[StageReport]:
    """Run every stage of `config.recipe`; return one report per stage.

    `upstream`: the fingerprint of whatever made `config.model` when an earlier run did (an
    I-SHEEP iteration's model), so that a change upstream reruns these stages too.
    """
    with run_lock(config.run_dir):  # before anything is read or written; I-SHEEP nests runs
        return _run_recipe(config, upstream)


def _run_recipe(config: RunConfig, upstream: str | None) -> list[StageReport]:
    if config.recipe in ITERATED_RECIPES:
        from dromedary_ray.pipeline.isheep import run_isheep

        return run_isheep(config)
    check_stages(config)
    _write_resolved_config(config)
    fingerprints = stage_fingerprints(config, upstream)
    reports = []
    if any(STAGES[name].uses_ray for name in config.stages):
        from dromedary_ray.runtime.cluster import connect

        connect(config.ray)
    if config.evaluate.suites and config.evaluate.include_base:
        evaluate_model(config, config.model, "base", made_by=f"base:{config.model}")
    with Engines() as engines:  # one model's engines, up across the stages that sample from it
        for name in config.stages:
            if STAGES[name].trains:
                engines.close()
            report = run_stage(config, name, fingerprints, engines)
            _log_metrics(config, report)
            reports.append(report)
            maybe_die("driver_stage")  # fault tests: the driver dies between two stages
            spec = stage_model(config, name) if config.evaluate.suites else None
            if spec:
                engines.close()  # the evaluation task starts an engine of its own
                evaluate_model(config, spec, name, made_by=fingerprints[name])
    return reports


def check_stages(config: RunConfig) -> None:
    """Bad files fail here, before Ray starts or a stage is touched."""
    for name in config.stages:
        STAGES[name].check(config)


def stage_fingerprints(config: RunConfig, upstream: str | None = None) -> dict[str, str]:
    """Each stage's fingerprint: its own config payload, its inputs' fingerprints (and the
    upstream model's, when there is one)."""
    fps: dict[str, str] = {}
    for name in config.stages:
        fps[name] = stage_fingerprint(config, name, fps, upstream)
    return fps


def stage_fingerprint(config: RunConfig, name: str, input_fps: dict[str, str],
                      upstream: str | None = None) -> str:
    stage = STAGES[name]
    key = {"stage": name, "payload": stage.fingerprint_payload(config),
           "inputs": {i: input_fps[i] for i in stage.input_stages(config)}}
    if upstream is not None:
        key["upstream"] = upstream
    return fingerprint(key)


def _write_resolved_config(config: RunConfig) -> None:
    write_run_file(config.run_dir, "config.yaml", dump_config(config).encode())


def _log_metrics(config: RunConfig, report: StageReport) -> None:
    """One JSON line per stage run in <run>/metrics.jsonl, and scalars for TensorBoard."""
    record = {"time": time.time(), **dataclasses.asdict(report)}
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    write_run_file(config.run_dir, "metrics.jsonl", line.encode(), append=True)
    if "://" in config.run_dir or report.status == "skipped":
        return
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(Path(config.run_dir) / "tensorboard" / report.name)) as tb:
        scalars = {"rows/kept": report.kept, "rows/rejected": report.rejected,
                   "time/seconds": report.seconds}
        scalars.update({f"rejects/{k}": v for k, v in report.reject_reasons.items()})
        scalars.update({f"metrics/{k}": v for k, v in _flat(report.metrics).items()})
        for key, value in scalars.items():
            tb.add_scalar(key, value, global_step=0)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def run_stage(config: RunConfig, name: str, fingerprints: dict[str, str],
              engines: Engines | None = None) -> StageReport:
    stage = STAGES[name]
    store = StageStore(config.run_dir, name)
    inputs = stage.input_stages(config)
    input_fps = {i: fingerprints[i] for i in inputs}
    fp = fingerprints.get(name) or stage_fingerprint(config, name, fingerprints)
    manifest = store.read_manifest()
    if manifest and manifest.get("fingerprint") == fp and manifest.get("status") == "done":
        report = _report(stage, store, "skipped", manifest["seconds"], manifest.get("metrics", {}))
        rows = manifest.get("rows", {"data": report.kept, "rejects": report.rejected})
        if (report.kept, report.rejected) == (rows["data"], rows["rejects"]):
            log.info("stage %s: done with the same fingerprint, skipped", name)
            return report
        # A shard found unreadable was quarantined: resume the stage to make its rows again.
        log.warning("stage %s: done, but %d of its rows are in no readable shard; resuming it",
                    name, rows["data"] + rows["rejects"] - report.kept - report.rejected)
    if manifest and manifest.get("fingerprint") != fp:
        # A torn manifest hides which config made the shards: rerun rather than mix in stale rows.
        why = ("its manifest is unreadable" if manifest.get("status") == UNREADABLE
               else "config or inputs changed since the last run")
        log.warning("stage %s: %s; starting it afresh", name, why)
        store.clear()
    elif manifest:
        dropped = store.drop_uncommitted()
        log.info("stage %s: resuming (%d committed shards, %d half-written dropped)",
                 name, len(store.committed_shards()), dropped)
    started = time.time()
    base = {"stage": name, "fingerprint": fp, "input_fingerprints": input_fps,
            "config": stage.fingerprint_payload(config), "started": started}
    store.write_manifest({**base, "status": "running"})
    ctx = StageContext(config, store, {i: StageStore(config.run_dir, i) for i in inputs},
                       engines=engines)
    stage.run(ctx)
    seconds = round(time.time() - started, 2)
    report = _report(stage, store, "ran", seconds, ctx.metrics)
    store.write_manifest({
        **base, "status": "done", "finished": time.time(), "seconds": seconds,
        "rows": {"data": report.kept, "rejects": report.rejected},
        "reject_reasons": report.reject_reasons, "metrics": report.metrics,
    })
    return report


def skipped_report(config: RunConfig, name: str) -> StageReport:
    """The report of a stage finished earlier, read from its manifest and tables."""
    stage, store = STAGES[name], StageStore(config.run_dir, name)
    manifest = store.read_manifest() or {}
    return _report(stage, store, "skipped", manifest.get("seconds", 0.0),
                   manifest.get("metrics", {}))


def _report(stage: Any, store: StageStore, status: str, seconds: float,
            metrics: dict[str, Any]) -> StageReport:
    kept = store.read("data", stage.data_schema, columns=["id"]).num_rows
    rejects = store.read("rejects", RejectRow.SCHEMA)
    reasons = {}
    if rejects.num_rows:
        counts = pc.value_counts(rejects["reason"]).to_pylist()
        reasons = {c["values"]: c["counts"] for c in counts}
    metrics = dict(metrics)
    if metrics.get("completion_tokens") and seconds:
        metrics["tokens_per_second"] = round(metrics["completion_tokens"] / seconds, 1)
    return StageReport(stage.name, status, kept, rejects.num_rows, reasons, seconds, metrics,
                       store.root)


def format_summary(reports: list[StageReport]) -> str:
    lines = ["", "stage        status    kept  rejected  seconds  tok/s  output"]
    for r in reports:
        tps = r.metrics.get("tokens_per_second", "")
        lines.append(f"{r.name:<12} {r.status:<8} {r.kept:>5} {r.rejected:>9} {r.seconds:>8.1f} "
                     f"{tps!s:>6}  {r.path}")
        for reason, count in sorted(r.reject_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"{'':<12}   rejected {count:>4}  {reason}")
    return "\n".join(lines)
