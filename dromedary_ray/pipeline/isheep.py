"""The I-SHEEP loop (Liang et al. 2024): iterations of self-made data, self-assessment and SFT.

Iteration k (1-based) is an ordinary run of the `isheep_iteration` recipe (synthesize, answer,
assess, sft) in its own run directory `<run>/isheep/iter_<k>/`, with the model iteration k-1
made (the base model for k = 1). Its stages resume and skip as any run's do; on top of that the
iteration writes its own manifest, whose fingerprint chains the previous iteration's, so a
finished iteration is skipped whole (no Ray, no engine) and a change in iteration 1 reruns
every later one.

Across iterations: `<run>/isheep/metrics.jsonl` (one line per iteration), TensorBoard scalars
and histograms under `<run>/tensorboard/isheep`, and a plot `<run>/isheep/metrics.png`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dromedary_ray.config import RunConfig, build
from dromedary_ray.data.store import fingerprint, write_run_file
from dromedary_ray.pipeline.driver import (
    StageReport,
    check_stages,
    run_pipeline,
    skipped_report,
    stage_fingerprints,
)
from dromedary_ray.pipeline.evaluate import evaluate_model

log = logging.getLogger(__name__)

ITERATION_RECIPE = "isheep_iteration"
MANIFEST = "manifest.json"
# Sampling seeds offset by the iteration number (isheep.reseed), so each iteration draws anew.
SEED_KEYS = (
    ("synthesize", "self_instruct", "sampling"),
    ("synthesize", "red_team", "sampling"),
    ("isheep", "answer", "sampling"),
    ("isheep", "assess", "sampling"),
    ("isheep", "train"),
)


def iteration_dir(config: RunConfig, k: int) -> Path:
    return Path(config.run_dir) / "isheep" / f"iter_{k}"


def iteration_model(config: RunConfig, k: int) -> str:
    """The model iteration k generates with: the base for k = 1, else iteration k-1's."""
    return config.model if k == 1 else str(iteration_dir(config, k - 1) / "sft" / "model")


def iteration_config(config: RunConfig, k: int) -> RunConfig:
    """The run config of iteration k: its own run directory, model and (optionally) seeds."""
    data = config.to_dict()
    data.update(run_dir=str(iteration_dir(config, k)), recipe=ITERATION_RECIPE,
                model=iteration_model(config, k))
    data["isheep"]["base_model"] = config.isheep.base_model or config.model
    data["evaluate"]["suites"] = []  # the loop evaluates each iteration's model under <run>
    if config.isheep.reseed:
        for path in SEED_KEYS:
            node = data
            for key in path:
                node = node[key]
            node["seed"] += k - 1
    return build(RunConfig, data, prefix="")


def run_isheep(config: RunConfig) -> list[StageReport]:
    """Run `config.isheep.iterations` iterations; finished ones are skipped."""
    check_stages(iteration_config(config, 1))
    write_run_file(config.run_dir, "config.yaml", _dump(config))
    reports: list[StageReport] = []
    upstream: str | None = None
    if config.evaluate.suites and config.evaluate.include_base:
        evaluate_model(config, config.model, "base", made_by=f"base:{config.model}")
    for k in range(1, config.isheep.iterations + 1):
        it_config = iteration_config(config, k)
        it_fp = fingerprint(stage_fingerprints(it_config, upstream))
        manifest = read_manifest(config, k)
        if manifest and manifest["fingerprint"] == it_fp and manifest["status"] == "done":
            log.info("I-SHEEP iteration %d: done with the same fingerprint, skipped", k)
            stage_reports = [skipped_report(it_config, s) for s in it_config.stages]
        else:
            stage_reports = _run_iteration(config, k, it_config, it_fp, upstream)
        reports += [_prefixed(r, k) for r in stage_reports]
        upstream = it_fp
        if config.evaluate.suites:
            model = str(iteration_dir(config, k) / "sft" / "model")
            evaluate_model(config, model, f"iter{k}", made_by=it_fp)
    write_iteration_metrics(config)
    return reports


def _run_iteration(config: RunConfig, k: int, it_config: RunConfig, it_fp: str,
                   upstream: str | None) -> list[StageReport]:
    log.info("I-SHEEP iteration %d of %d with model %s", k, config.isheep.iterations,
             it_config.model)
    started = time.time()
    base = {"iteration": k, "fingerprint": it_fp, "model_in": it_config.model,
            "model_out": str(iteration_dir(config, k) / "sft" / "model"), "started": started}
    _write_manifest(config, k, {**base, "status": "running"})
    stage_reports = run_pipeline(it_config, upstream=upstream)
    metrics = iteration_metrics(k, stage_reports)
    _write_manifest(config, k, {**base, "status": "done", "finished": time.time(),
                                "seconds": round(time.time() - started, 2), "metrics": metrics})
    return stage_reports


def iteration_metrics(k: int, reports: list[StageReport]) -> dict[str, Any]:
    """What the paper tracks per iteration: prompts made, share kept, grades, length, loss."""
    by_name = {r.name: r for r in reports}
    assess = by_name["assess"].metrics
    sft = by_name["sft"].metrics
    out: dict[str, Any] = {
        "iteration": k,
        "prompts": by_name["synthesize"].kept,
        "answers": by_name["answer"].kept,
        "graded": assess.get("graded", 0),
        "grade_rejects": by_name["assess"].rejected,
        "kept": assess.get("kept", 0),
        "kept_fraction": assess.get("kept_fraction", 0.0),
        "mean_answer_tokens": assess.get("mean_answer_tokens", 0.0),
        "first_loss": sft.get("first_loss"),
        "final_loss": sft.get("final_loss"),
    }
    out.update({key: v for key, v in assess.items() if key.endswith(("_mean", "_hist"))})
    return out


def _prefixed(report: StageReport, k: int) -> StageReport:
    report.name = f"iter{k}/{report.name}"
    return report


def read_manifest(config: RunConfig, k: int) -> dict[str, Any] | None:
    path = iteration_dir(config, k) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(config: RunConfig, k: int, manifest: dict[str, Any]) -> None:
    blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_run_file(str(iteration_dir(config, k)), MANIFEST, blob)


def _dump(config: RunConfig) -> bytes:
    from dromedary_ray.config import dump_config

    return dump_config(config).encode()


def write_iteration_metrics(config: RunConfig) -> list[dict[str, Any]]:
    """metrics.jsonl, TensorBoard and the PNG plot, rebuilt from every finished iteration."""
    records = []
    for k in range(1, config.isheep.iterations + 1):
        manifest = read_manifest(config, k)
        if manifest and manifest.get("status") == "done":
            records.append(manifest["metrics"])
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    out = Path(config.run_dir) / "isheep"
    write_run_file(str(out), "metrics.jsonl", lines.encode())
    if records:
        _tensorboard(Path(config.run_dir) / "tensorboard" / "isheep", records)
        plot_iterations(records, out / "metrics.png")
    return records


def _tensorboard(folder: Path, records: list[dict[str, Any]]) -> None:
    import numpy as np
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(folder)) as tb:
        for rec in records:
            k = rec["iteration"]
            for key, value in rec.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    tb.add_scalar(f"isheep/{key}", value, global_step=k)
                elif key.endswith("_hist") and sum(value.values()):
                    grades = np.repeat([float(g) for g in value], list(value.values()))
                    tb.add_histogram(f"isheep/{key}", grades, global_step=k)


def grade_order(hist: dict[str, int]) -> list[str]:
    """A histogram's grades in numeric order: manifests are written with sorted keys, which puts
    "10" straight after "1"."""
    return sorted(hist, key=float)


def plot_iterations(records: list[dict[str, Any]], path: Path) -> None:
    """One figure: counts, kept share, answer length, loss and each rubric's grade histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in records]
    rubrics = sorted(k.removesuffix("_hist") for k in records[-1] if k.endswith("_hist"))
    fig, axes = plt.subplots(2, 2 + max(1, len(rubrics) // 2 + len(rubrics) % 2),
                             figsize=(13, 7), squeeze=False)
    flat = list(axes.flat)
    panels = [("prompts / kept pairs", ["prompts", "kept"]), ("kept fraction", ["kept_fraction"]),
              ("mean answer tokens", ["mean_answer_tokens"]),
              ("training loss", ["first_loss", "final_loss"])]
    for ax, (title, keys) in zip(flat, panels, strict=False):
        for key in keys:
            ax.plot(its, [r.get(key) for r in records], marker="o", label=key)
        ax.set_title(title)
        ax.set_xticks(its)  # whole iterations, not 1.25, 1.5, ...
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    for ax, name in zip(flat[len(panels):], rubrics, strict=False):
        hists = [r[f"{name}_hist"] for r in records]
        grades = grade_order(hists[0])
        width = 0.8 / len(hists)
        for j, (k, hist) in enumerate(zip(its, hists, strict=True)):
            ax.bar([g + j * width for g in range(len(grades))], [hist[g] for g in grades], width,
                   label=f"iter {k}")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(grades))], grades)
        ax.set_title(f"{name} grades")
        ax.legend(fontsize=8)
    for ax in flat[len(panels) + len(rubrics):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
