"""Read a run directory into typed dataclasses for the report: no Ray, no plotting, no writing.

What a run directory may hold (all optional but at least one must be there)::

    <run>/config.yaml                        the resolved config (recipe, model)
    <run>/metrics.jsonl                      one line per stage run (pipeline/driver.py)
    <run>/<stage>/manifest.json              status, counts, reject reasons, timings, metrics
    <run>/<stage>/{data,rejects}/*.parquet   committed shards (counted when the stage is running)
    <run>/<stage>/*.jsonl                    step logs: loss_curve, train_log, rm_log, ppo_steps
    <run>/<stage>/model/config.json          a model the stage produced
    <run>/isheep/metrics.jsonl               one line per I-SHEEP iteration
    <run>/isheep/iter_<k>/                   each iteration a nested run dir (+ manifest.json)
    <run>/eval/<label>/<suite>.json          `dromedary eval --run-dir RUN --name LABEL`

A run still in progress or killed part-way is a normal input: anything missing or half-written
becomes a status or a note on the report, never an exception. Only a path that holds none of the
above raises `NotARunDirError`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from dromedary_ray.data.store import StageStore
from dromedary_ray.errors import DromedaryError

# Step logs shown first, in this order; any other top-level *.jsonl with a `step` key follows.
KNOWN_STEP_LOGS = ("loss_curve.jsonl", "rm_log.jsonl", "ppo_steps.jsonl", "train_log.jsonl")
EVAL_SUITE_ORDER = ("hhh", "truthfulqa", "ifeval", "pairwise")


class NotARunDirError(DromedaryError):
    """The path given to `dromedary report` is not a run directory."""


@dataclass(frozen=True)
class Series:
    """Numeric fields of a JSONL log against one x key (`step`, or `iteration` for I-SHEEP)."""

    name: str  # the log's name, e.g. loss_curve
    x_key: str
    fields: dict[str, tuple[list[float], list[float]]]  # field -> (xs, ys), sorted by x


@dataclass(frozen=True)
class StageInfo:
    name: str
    status: str  # done | running | pending | unknown | whatever the manifest says
    kept: int | None = None
    rejected: int | None = None
    reject_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    started: float | None = None
    finished: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # flattened: train/final_loss
    curves: list[Series] = field(default_factory=list)
    has_model: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float | None:
        if self.seconds and self.kept is not None:
            return (self.kept + (self.rejected or 0)) / self.seconds
        return None

    @property
    def throughput(self) -> dict[str, float]:
        """Every tokens-per-second figure the stage reported (generation, training)."""
        return {k: v for k, v in self.metrics.items() if k.endswith("tokens_per_second")}


@dataclass(frozen=True)
class HistoryEntry:
    """One line of <run>/metrics.jsonl: a stage run (or skip) by the driver."""

    time: float | None
    stage: str
    status: str
    kept: int | None
    rejected: int | None
    seconds: float | None
    tokens_per_second: float | None


@dataclass(frozen=True)
class EvalResult:
    label: str  # the folder under <run>/eval/
    suite: str  # the file's stem: hhh, truthfulqa, ifeval, pairwise-vs-OTHER
    model: str
    metrics: dict[str, dict[str, Any]]  # subset -> metric -> value
    seconds: float | None = None


@dataclass(frozen=True)
class IterationInfo:
    """One I-SHEEP iteration: its own manifest (isheep/iter_<k>/manifest.json) and run."""

    k: int
    status: str  # from the iteration's manifest; running when it has none yet
    seconds: float | None
    model_in: str | None
    model_out: str | None
    run: RunInfo


@dataclass(frozen=True)
class IsheepInfo:
    metrics: Series | None  # numeric keys per iteration
    hists: dict[str, dict[int, dict[str, float]]]  # key -> iteration -> bucket -> count
    iterations: list[IterationInfo]


@dataclass(frozen=True)
class RunInfo:
    path: str
    recipe: str | None
    model: str | None
    stages: list[StageInfo]
    history: list[HistoryEntry]
    evals: list[EvalResult]
    isheep: IsheepInfo | None
    notes: list[str]

    @property
    def produced_models(self) -> list[str]:
        """Each saved model's folder relative to the run, less `/model`: `engrave`, and for
        I-SHEEP iterations `isheep/iter_1/sft`."""
        out = [s.name for s in self.stages if s.has_model]
        for it in self.isheep.iterations if self.isheep else []:
            out += [f"isheep/iter_{it.k}/{m}" for m in it.run.produced_models]
        return out


# --- small readers --------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def flatten_numbers(obj: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts, keyed `a/b`; booleans, strings and lists are left out."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten_numbers(value, f"{prefix}{key}/"))
        elif _number(value) is not None:
            out[f"{prefix}{key}"] = value  # ints stay ints: counts print without decimals
    return out


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file. A bad line (a writer killed mid-line) becomes a note."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        notes.append(f"{path.name}: unreadable ({err.strerror})")
        return rows
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) not a JSON object, skipped")
    return rows


def read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"{path.parent.name}/{path.name}: unreadable ({type(err).__name__})")
        return None
    if not isinstance(doc, dict):
        notes.append(f"{path.parent.name}/{path.name}: not a JSON object")
        return None
    return doc


def series_from_rows(name: str, rows: list[dict[str, Any]], x_key: str) -> Series | None:
    """Every numeric field against `x_key`; for a repeated x (a resumed run logging a step
    again) the last value wins. None when no row has a numeric x."""
    points: dict[str, dict[float, float]] = {}
    for row in rows:
        x = _number(row.get(x_key))
        if x is None:
            continue
        for key, y in flatten_numbers({k: v for k, v in row.items() if k != x_key}).items():
            points.setdefault(key, {})[x] = y
    if not points:
        return None
    fields = {k: (sorted(v), [v[x] for x in sorted(v)]) for k, v in points.items()}
    return Series(name, x_key, fields)


# --- stages ---------------------------------------------------------------------------------


def _is_stage_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("manifest.json", "data", "rejects"))


def _count_shards(run_dir: Path, name: str, notes: list[str]) -> tuple[int, int, dict[str, int]]:
    """Kept and rejected rows in the committed shards, each id once (as StageStore.read)."""
    store = StageStore(str(run_dir), name)
    kept: set[str] = set()
    rejected: dict[str, str] = {}
    for shard in store.committed_shards():
        try:
            ids = pq.read_table(f"{store.root}/data/{shard}.parquet", columns=["id"])
            rej = pq.read_table(f"{store.root}/rejects/{shard}.parquet", columns=["id", "reason"])
        except Exception as err:  # a shard being replaced right now, or foreign files
            notes.append(f"shard {shard}: unreadable ({type(err).__name__})")
            continue
        kept.update(ids["id"].to_pylist())
        for rid, reason in zip(rej["id"].to_pylist(), rej["reason"].to_pylist(), strict=True):
            rejected.setdefault(rid, "(no reason)" if reason is None else str(reason))
    reasons: dict[str, int] = {}
    for reason in rejected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    return len(kept), len(rejected), reasons


def _step_logs(stage_dir: Path, notes: list[str]) -> list[Series]:
    """Step logs of a stage; a field already plotted from an earlier log (train_log's loss
    repeats loss_curve's) is dropped so that each curve is drawn once."""
    files = [stage_dir / n for n in KNOWN_STEP_LOGS if (stage_dir / n).is_file()]
    files += sorted(p for p in stage_dir.glob("*.jsonl") if p.name not in KNOWN_STEP_LOGS)
    seen: dict[str, tuple[list[float], list[float]]] = {}
    curves = []
    for path in files:
        series = series_from_rows(path.stem, read_jsonl(path, notes), "step")
        if series is None:
            continue
        fields = {k: v for k, v in series.fields.items() if seen.get(k) != v}
        seen.update(fields)
        if fields:
            curves.append(Series(series.name, "step", fields))
    return curves


def collect_stage(run_dir: Path, name: str) -> StageInfo:
    stage_dir = run_dir / name
    if not stage_dir.is_dir():
        return StageInfo(name, "pending")
    notes: list[str] = []
    if (stage_dir / "manifest.json").exists():
        manifest = read_json(stage_dir / "manifest.json", notes) or {}
        status = str(manifest.get("status", "unknown"))
    else:  # the folder exists, so the stage has begun writing (or died before its manifest)
        manifest, status = {}, "running"
        notes.append("no manifest.json yet")
    rows = manifest.get("rows") if isinstance(manifest.get("rows"), dict) else {}
    if status == "done" and _number(rows.get("data")) is not None:
        kept, rejected = int(rows["data"]), int(_number(rows.get("rejects")) or 0)
        reasons = flatten_numbers(manifest.get("reject_reasons") or {}) if isinstance(
            manifest.get("reject_reasons"), dict) else {}
        reasons = {k: int(v) for k, v in reasons.items()}
    else:  # running, failed or foreign: what its committed shards say so far
        kept, rejected, reasons = _count_shards(run_dir, name, notes)
    metrics = manifest.get("metrics")
    return StageInfo(
        name=name, status=status, kept=kept, rejected=rejected, reject_reasons=reasons,
        seconds=_number(manifest.get("seconds")), started=_number(manifest.get("started")),
        finished=_number(manifest.get("finished")),
        metrics=flatten_numbers(metrics) if isinstance(metrics, dict) else {},
        curves=_step_logs(stage_dir, notes),
        has_model=(stage_dir / "model" / "config.json").is_file(), notes=notes,
    )


def _recipe_stages(config: dict[str, Any]) -> list[str]:
    """The stages the config's recipe names: a list, or a name from config.RECIPES."""
    recipe = config.get("recipe")
    if isinstance(recipe, list):
        return [str(s) for s in recipe]
    if isinstance(config.get("stages"), list):
        return [str(s) for s in config["stages"]]
    from dromedary_ray import config as cfg  # pure: dataclasses and yaml

    # An iterated recipe (I-SHEEP) runs its stages inside isheep/iter_<k>/, not at the top.
    if str(recipe) in getattr(cfg, "ITERATED_RECIPES", ()):
        return []
    return list(cfg.RECIPES.get(str(recipe), ()))


def _stage_order(run_dir: Path, recipe: list[str]) -> list[str]:
    """The recipe's stages in recipe order, then any other stage folder by start time."""
    found = [p.name for p in sorted(run_dir.iterdir()) if _is_stage_dir(p)]
    extra = [n for n in found if n not in recipe]

    def started(name: str) -> float:
        try:
            return float(json.loads((run_dir / name / "manifest.json").read_text())["started"])
        except Exception:
            return math.inf

    return recipe + sorted(extra, key=lambda n: (started(n), n))


# --- history, evals, I-SHEEP ----------------------------------------------------------------


def _history(path: Path, notes: list[str]) -> list[HistoryEntry]:
    out = []
    for row in read_jsonl(path, notes) if path.is_file() else []:
        raw = row.get("metrics")
        metrics = flatten_numbers(raw) if isinstance(raw, dict) else {}
        tps = metrics.get("tokens_per_second") or metrics.get("train_tokens_per_second")
        kept, rejected = _number(row.get("kept")), _number(row.get("rejected"))
        out.append(HistoryEntry(
            time=_number(row.get("time")), stage=str(row.get("name", row.get("stage", "?"))),
            status=str(row.get("status", "?")), kept=None if kept is None else int(kept),
            rejected=None if rejected is None else int(rejected),
            seconds=_number(row.get("seconds")), tokens_per_second=tps))
    return out


def suite_rank(suite: str) -> tuple[int, str]:
    base = suite.split("-vs-")[0]
    rank = EVAL_SUITE_ORDER.index(base) if base in EVAL_SUITE_ORDER else len(EVAL_SUITE_ORDER)
    return rank, suite


def _evals(eval_dir: Path, notes: list[str]) -> list[EvalResult]:
    out = []
    labels = sorted(p for p in eval_dir.iterdir() if p.is_dir()) if eval_dir.is_dir() else []
    for label_dir in labels:
        for path in sorted(label_dir.glob("*.json"), key=lambda p: suite_rank(p.stem)):
            doc = read_json(path, notes)
            if doc is None:
                continue
            metrics = doc.get("metrics")
            if not isinstance(metrics, dict):
                notes.append(f"eval/{label_dir.name}/{path.name}: no metrics")
                continue
            rows = {str(k): v for k, v in metrics.items() if isinstance(v, dict)}
            out.append(EvalResult(label_dir.name, path.stem, str(doc.get("model", "")), rows,
                                  _number(doc.get("seconds"))))
    return out


def _hist(value: Any) -> dict[str, float] | None:
    """A histogram value: {bucket: count} or [count, ...] (bucket = index)."""
    if isinstance(value, dict) and value:
        nums = {str(k): _number(v) for k, v in value.items()}
    elif isinstance(value, list) and value:
        nums = {str(i): _number(v) for i, v in enumerate(value)}
    else:
        return None
    if any(v is None for v in nums.values()):
        return None
    return {k: v for k, v in nums.items() if v is not None}


def _iter_number(path: Path) -> int | None:
    m = re.fullmatch(r"iter_?(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def _iteration(k: int, path: Path, depth: int) -> IterationInfo:
    run = collect_run(path, depth=depth + 1, strict=False)
    manifest = read_json(path / "manifest.json", run.notes) if (
        path / "manifest.json").is_file() else None
    manifest = manifest or {}

    def text(key: str) -> str | None:
        return None if manifest.get(key) is None else str(manifest[key])

    return IterationInfo(k, text("status") or "running", _number(manifest.get("seconds")),
                         text("model_in"), text("model_out"), run)


def _isheep(root: Path, notes: list[str], depth: int) -> IsheepInfo | None:
    if not root.is_dir():
        return None
    rows = read_jsonl(root / "metrics.jsonl", notes) if (root / "metrics.jsonl").is_file() else []
    hists: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        k = _number(row.get("iteration"))
        for key, value in row.items():
            if k is not None and (h := _hist(value)) is not None:
                hists.setdefault(key, {})[int(k)] = h
    iters = sorted((n, p) for p in root.iterdir() if (n := _iter_number(p)) is not None)
    nested = [_iteration(n, p, depth) for n, p in iters]
    scalars = [{k: v for k, v in row.items() if k not in hists} for row in rows]
    return IsheepInfo(series_from_rows("isheep", scalars, "iteration"), hists, nested)


# --- the run --------------------------------------------------------------------------------


def _looks_like_run(path: Path) -> bool:
    marks = ("config.yaml", "metrics.jsonl", "isheep", "eval")
    return any((path / m).exists() for m in marks) or any(
        _is_stage_dir(p) for p in path.iterdir())


def collect_run(run_dir: str | Path, depth: int = 0, strict: bool = True) -> RunInfo:
    """Everything the report shows about one run directory (I-SHEEP iterations nested).

    strict: raise NotARunDirError when the path holds nothing a run writes (the top level);
    nested iteration folders are collected as they are, empty or not.
    """
    path = Path(run_dir).expanduser().resolve()
    if not path.exists():
        raise NotARunDirError(f"{run_dir}: no such directory")
    if not path.is_dir():
        raise NotARunDirError(f"{run_dir}: not a directory")
    if strict and not _looks_like_run(path):
        raise NotARunDirError(f"{run_dir}: not a run directory (no config.yaml, metrics.jsonl "
                              "or <stage>/manifest.json inside)")
    notes: list[str] = []
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            notes.append(f"config.yaml: unreadable ({type(err).__name__})")
    stages = [collect_stage(path, n) for n in _stage_order(path, _recipe_stages(config))]
    isheep = _isheep(path / "isheep", notes, depth) if depth < 3 else None
    recipe = config.get("recipe")
    return RunInfo(
        path=str(path), recipe=None if recipe is None else str(recipe),
        model=None if config.get("model") is None else str(config["model"]), stages=stages,
        history=_history(path / "metrics.jsonl", notes), evals=_evals(path / "eval", notes),
        isheep=isheep, notes=notes)
