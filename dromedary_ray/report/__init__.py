"""`dromedary report RUN_DIR`: one self-contained HTML page and a Markdown twin for a run.

    collect.py   the run directory -> typed dataclasses (pure: no Ray, no plotting)
    tables.py    the tables both formats show, as strings
    plots.py     the figures, PNG bytes drawn on matplotlib's Agg canvas
    document.py  the report as a list of blocks (headings, tables, figures)
    html.py      blocks -> report.html, figures inlined as data: URIs
    markdown.py  blocks -> report.md, figures as PNG files beside it

Nothing heavy is imported here: matplotlib loads inside `write_report`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    images: list[Path]
    stages: int


def _write(path: Path, data: bytes) -> None:
    # A temporary name, then a rename: a browser reloading the page never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Collect the run, draw its figures, write report.html, report.md and the PNGs."""
    from dromedary_ray.report.collect import collect_run
    from dromedary_ray.report.document import build_document
    from dromedary_ray.report.html import render_html
    from dromedary_ray.report.markdown import render_markdown
    from dromedary_ray.report.plots import run_plots

    run = collect_run(run_dir)
    plots = run_plots(run)
    blocks = build_document(run, plots, time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    out = Path(out_dir) if out_dir else Path(run.path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for plot in (p for group in plots.values() for p in group):
        _write(out / f"{plot.key}.png", plot.png)
        images.append(out / f"{plot.key}.png")
    title = f"dromedary run report: {Path(run.path).name}"
    _write(out / "report.html", render_html(blocks, title).encode())
    _write(out / "report.md", render_markdown(blocks).encode())
    return ReportFiles(out / "report.html", out / "report.md", images, len(run.stages))
