"""`dromedary report`: a synthetic run directory (real StageStore shards and manifests, step
logs, metrics.jsonl, an I-SHEEP tree, eval results) rendered to HTML and Markdown; the page is
parsed, its figures decoded, and opened in headless Chromium when it is installed."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dromedary_ray.cli import main
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore
from dromedary_ray.report import write_report
from dromedary_ray.report.collect import NotARunDirError, collect_run
from dromedary_ray.report.tables import eval_summary_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"  # a reject reason that must come out as text
RECIPE = ["synthesize", "self_align", "engrave", "verbose_clone"]


# --- the synthetic run ----------------------------------------------------------------------


def _shard(store: StageStore, name: str, kept: int, reasons: list[str], start: int = 0) -> None:
    ids = [f"{store.stage}-{i}" for i in range(start, start + kept + len(reasons))]
    rows = [PromptRow(i, "seed", f"query {i}") for i in ids[:kept]]
    rejects = [RejectRow(i, store.stage, r, "text") for i, r in zip(ids[kept:], reasons,
                                                                    strict=True)]
    store.write_shard(PromptRow.to_table(rows), RejectRow.to_table(rejects), name)


def _done(store: StageStore, started: float, seconds: float, metrics: dict) -> None:
    kept = store.read("data", PromptRow.SCHEMA).num_rows
    rejects = store.read("rejects", RejectRow.SCHEMA)["reason"].to_pylist()
    store.write_manifest({
        "stage": store.stage, "status": "done", "fingerprint": "f" * 16, "started": started,
        "finished": started + seconds, "seconds": seconds,
        "rows": {"data": kept, "rejects": len(rejects)},
        "reject_reasons": {r: rejects.count(r) for r in set(rejects)}, "metrics": metrics})


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _model(run: Path, stage: str) -> None:
    (run / stage / "model").mkdir(parents=True)
    (run / stage / "model" / "config.json").write_text("{}")


def _eval(run: Path, label: str, suite: str, model: str, metrics: dict) -> None:
    path = run / "eval" / label / f"{suite}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": suite, "model": model, "seconds": 1.5,
                                "metrics": metrics, "items": []}))


def _iteration(run: Path, k: int, running: bool) -> None:
    it = run / "isheep" / f"iter_{k}"
    for n, stage in enumerate(["answer", "sft"]):
        store = StageStore(str(it), stage)
        _shard(store, "part-a", 3 + k, ["truncated"] * k)
        if stage == "sft" and running:
            store.write_manifest({"stage": "sft", "status": "running", "started": 200.0})
        else:
            _done(store, 100.0 * k + n, 30.0, {"steps": 4})
    _jsonl(it / "sft" / "loss_curve.jsonl",
           [{"step": s, "loss": 2.0 / (s + k)} for s in range(1, 5)])
    if not running:  # the iteration's own manifest and model, as pipeline/isheep.py writes them
        _model(it, "sft")
        (it / "manifest.json").write_text(json.dumps({
            "iteration": k, "status": "done", "seconds": 61.0, "model_in": "builtin:tiny-llama",
            "model_out": str(it / "sft" / "model")}))


def make_run(root: Path) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run_dir: x\nrecipe: dromedary\nmodel: builtin:tiny-llama\n")
    t0 = 1_700_000_000.0
    synth = StageStore(str(run), "synthesize")
    _shard(synth, "part-1", 5, ["near_duplicate", "near_duplicate", "empty"])
    _shard(synth, "part-2", 4, ["non_text"], start=10)
    _done(synth, t0, 120.0, {"completion_tokens": 900, "tokens_per_second": 7.5})
    align = StageStore(str(run), "self_align")
    _shard(align, "part-1", 6, ["truncated", "thoughts_runaway", EVIL])
    _done(align, t0 + 120, 60.0, {"completion_tokens": 600, "tokens_per_second": 10.0})
    engrave = StageStore(str(run), "engrave")
    engrave.write_table(PromptRow.to_table([PromptRow("m", "seed", "q")]), RejectRow.empty())
    _done(engrave, t0 + 180, 90.0, {"final_loss": 0.9, "train_tokens_per_second": 50.0})
    _model(run, "engrave")
    _jsonl(run / "engrave" / "loss_curve.jsonl",
           [{"step": s, "loss": 1.5 - 0.1 * s} for s in range(1, 9)])
    _jsonl(run / "engrave" / "train_log.jsonl",
           [{"step": s, "loss": 1.5 - 0.1 * s, "lr": 1e-5 * s} for s in range(1, 9)])
    # verbose_clone died part-way: a running manifest, one committed shard, one orphan reject.
    clone = StageStore(str(run), "verbose_clone")
    clone.write_manifest({"stage": "verbose_clone", "status": "running", "started": t0 + 270})
    _shard(clone, "part-1", 2, ["repetition"])
    clone._write_table("rejects", "part-orphan", RejectRow.to_table(
        [RejectRow("o", "verbose_clone", "answer_too_short", "")]))
    # Stages beyond the recipe (being built elsewhere): an RM and PPO with their step logs.
    for name, log, fields in (("reward_model", "rm_log.jsonl", ("loss", "accuracy")),
                              ("ppo", "ppo_steps.jsonl", ("reward", "kl", "response_length"))):
        store = StageStore(str(run), name)
        store.write_table(PromptRow.empty(), RejectRow.empty())
        _done(store, t0 + 400 + len(name), 50.0, {})
        _jsonl(run / name / log, [{"step": s, **{f: s * 0.5 for f in fields}, "note": "x"}
                                  for s in range(1, 6)], tail='{"step": 6, "rew')
    _model(run, "ppo")
    lines = [{"time": t0 + 120, "name": "synthesize", "status": "ran", "kept": 9, "rejected": 4,
              "seconds": 120.0, "metrics": {"tokens_per_second": 7.5}},
             {"time": t0 + 999, "name": "synthesize", "status": "skipped", "kept": 9,
              "rejected": 4, "seconds": 120.0, "metrics": {}}]
    _jsonl(run / "metrics.jsonl", lines, tail='{"time": 1')  # a line cut off mid-write
    _iteration(run, 1, running=False)
    _iteration(run, 2, running=True)
    _jsonl(run / "isheep" / "metrics.jsonl", [
        {"iteration": k, "prompts": 10 * k, "kept_fraction": 0.4 + 0.1 * k,
         "mean_answer_length": 50.0 + k, "final_loss": 1.0 / k, "model": f"iter_{k}",
         "quality_hist": {"7": 3, "8": 5 + k, "9": 2}, "following_hist": [1, 2, 3 + k]}
        for k in (1, 2)])
    _eval(run, "engrave", "hhh", "run:engrave", {"helpful": {"n": 2, "accuracy": 0.5},
                                                 "overall": {"n": 4, "accuracy": 0.75}})
    _eval(run, "engrave", "ifeval", "run:engrave", {
        "detectable_format": {"n": 3, "strict": 0.3, "loose": 0.6},
        "prompt_level": {"n": 5, "strict": 0.2, "loose": 0.4},
        "instruction_level": {"n": 8, "strict": 0.25, "loose": 0.5}})
    _eval(run, "base", "truthfulqa", "builtin:tiny-llama", {"mc1": {"n": 3, "score": 0.333},
                                                            "mc2": {"n": 3, "score": 0.41}})
    return run


# --- reading the HTML -----------------------------------------------------------------------


class Page(HTMLParser):
    """Headings, status badges after each heading, images, table rows and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.status: dict[str, str] = {}
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        self._in: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.headings.append("")
            self._in = "h"
        elif tag == "span" and "status" in (a.get("class") or ""):
            self._in = "status"
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None
        if tag.startswith("h") or tag == "span":
            self._in = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in == "h":
            self.headings[-1] += data
        elif self._in == "status":
            self.status[self.headings[-1]] = data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, object]:
    run = make_run(tmp_path_factory.mktemp("report"))
    return run, write_report(run)


# --- tests ----------------------------------------------------------------------------------


def test_collect_reads_counts_statuses_and_logs(tmp_path):
    run = collect_run(make_run(tmp_path))
    stages = {s.name: s for s in run.stages}
    assert list(stages)[:4] == RECIPE  # recipe order first, then the others
    assert {"reward_model", "ppo"} <= set(stages)
    assert (stages["synthesize"].kept, stages["synthesize"].rejected) == (9, 4)
    assert stages["synthesize"].reject_reasons == {"near_duplicate": 2, "empty": 1,
                                                   "non_text": 1}
    clone = stages["verbose_clone"]  # counted from committed shards; the orphan is not
    assert clone.status == "running"
    assert (clone.kept, clone.rejected, clone.reject_reasons) == (2, 1, {"repetition": 1})
    engrave = stages["engrave"]
    assert engrave.has_model and [c.name for c in engrave.curves] == ["loss_curve", "train_log"]
    assert list(engrave.curves[1].fields) == ["lr"]  # train_log's loss repeats loss_curve's
    ppo = stages["ppo"].curves[0]
    assert ppo.name == "ppo_steps" and set(ppo.fields) == {"reward", "kl", "response_length"}
    assert len(ppo.fields["kl"][0]) == 5 and any("ppo_steps.jsonl" in n
                                                 for n in stages["ppo"].notes)
    assert [h.status for h in run.history] == ["ran", "skipped"]
    assert any("metrics.jsonl" in n for n in run.notes)
    assert run.isheep is not None and [it.k for it in run.isheep.iterations] == [1, 2]
    assert [it.status for it in run.isheep.iterations] == ["done", "running"]
    assert run.isheep.iterations[0].model_in == "builtin:tiny-llama"
    assert set(run.isheep.metrics.fields) == {"prompts", "kept_fraction", "mean_answer_length",
                                              "final_loss"}
    assert run.isheep.hists["following_hist"][2] == {"0": 1, "1": 2, "2": 5}
    it2 = {s.name: s.status for s in run.isheep.iterations[1].run.stages}
    assert it2 == {"answer": "done", "sft": "running"}
    assert run.produced_models == ["engrave", "ppo", "isheep/iter_1/sft"]


def test_html_has_stages_rejects_plots_and_eval_table(report):
    run, files = report
    assert files.html == run / "report" / "report.html"
    page = parse(files.html)
    for stage in [*RECIPE, "reward_model", "ppo", "answer", "sft"]:
        assert stage in page.headings, stage
    assert {"Iteration 1", "Iteration 2", "I-SHEEP iterations", "Evaluation"} <= set(
        page.headings)
    assert page.status["verbose_clone"] == "running"
    assert page.status["engrave"] == "done"
    assert (page.status["Iteration 1"], page.status["Iteration 2"]) == ("done", "running")
    text = " ".join(page.text)
    for reason in ("near_duplicate", "empty", "non_text", "truncated", "thoughts_runaway",
                   "repetition", EVIL):
        assert reason in text, reason
    assert "script" not in page.tags  # the reason was escaped, not run
    # One <img> per figure, each a PNG data: URI identical to the Markdown twin's file.
    assert len(page.images) == len(files.images) >= 10
    for src, path in zip(page.images, files.images, strict=True):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC) and png == path.read_bytes()
    names = {p.name for p in files.images}
    assert {"stage-engrave-loss_curve.png", "stage-ppo-ppo_steps.png",
            "stage-reward_model-rm_log.png", "isheep-metrics.png", "isheep-quality_hist.png",
            "iter_1-stage-sft-loss_curve.png", "overview-rows.png"} <= names
    # The eval summary: one row per model, the produced-but-unevaluated ppo included.
    header = next(r for r in page.rows if r[:2] == ["model", "spec"])
    assert "hhh accuracy" in header and "truthfulqa mc1 score" in header
    assert "ifeval prompt_level strict" in header
    rows = {r[0]: r for r in page.rows if len(r) == len(header) and r[0] != "model"}
    assert rows["engrave"][header.index("hhh accuracy")] == "0.750"
    assert rows["base"][header.index("truthfulqa mc2 score")] == "0.410"
    assert rows["ppo"][2] == "not evaluated"
    assert rows["isheep/iter_1/sft"][2] == "not evaluated"


def test_html_is_self_contained(report):
    _, files = report
    html = files.html.read_text()
    assert "<script" not in html and "<link rel=\"stylesheet\"" not in html
    assert "http://" not in html and "https://" not in html and "@import" not in html
    assert "Content-Security-Policy" in html


def test_markdown_twin_lists_the_same_stages_and_images(report):
    run, files = report
    md = files.markdown.read_text()
    headings = [line.lstrip("#").strip().replace("\\_", "_") for line in md.splitlines()
                if line.startswith("#")]
    html_headings = parse(files.html).headings
    assert headings == html_headings
    for image in files.images:
        assert f"]({image.name})" in md and image.parent == files.markdown.parent
    assert "status: **running**" in md
    assert "&lt;script&gt;" in md


def test_report_command_and_non_run_dirs(tmp_path, capsys):
    run = tmp_path / "run"
    _shard(StageStore(str(run), "seeds"), "part-1", 2, ["empty"])
    _done(StageStore(str(run), "seeds"), 1.0, 2.0, {})
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert (out / "report.html").exists() and (out / "report.md").exists()
    assert str(out / "report.html") in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    assert main(["report", str(empty)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(NotARunDirError, match="no such directory"):
        collect_run(tmp_path / "missing")
    proc = subprocess.run([sys.executable, "-m", "dromedary_ray.cli", "report",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no such directory" in proc.stderr


def test_half_written_run_renders(tmp_path):
    """A run killed right after its first manifest, and a stage folder with no manifest."""
    run = tmp_path / "run"
    (run / "seeds").mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: self_align\n")
    StageStore(str(run), "seeds").write_manifest({"status": "running", "started": 1.0})
    _shard(StageStore(str(run), "extra"), "part-1", 1, [])
    (run / "metrics.jsonl").write_text("{\"time\": ")
    files = write_report(run)
    page = parse(files.html)
    assert page.status == {"seeds": "running", "self_align": "pending", "extra": "running"}
    assert "no manifest.json yet" in " ".join(page.text)


def test_malformed_files_become_notes_not_crashes(tmp_path):
    run = tmp_path / "run"
    (run / "a").mkdir(parents=True)
    (run / "a" / "manifest.json").write_text("[1, 2]")
    StageStore(str(run), "b").write_manifest({"status": "done", "rows": {"data": "many"},
                                              "reject_reasons": {"x": "y"}, "metrics": [1]})
    _jsonl(run / "b" / "loss_curve.jsonl", [{"step": "one", "loss": 1.0}, {"loss": 2.0}])
    (run / "eval" / "m").mkdir(parents=True)
    (run / "eval" / "m" / "hhh.json").write_text("{not json")
    _jsonl(run / "isheep" / "metrics.jsonl", [{"prompts": 3}, {"iteration": 1, "h": [1, "x"]}])
    (run / "isheep" / "iter_1").mkdir()
    (run / "config.yaml").write_text("recipe: [a, b\n")
    page = parse(write_report(run).html)
    assert page.status == {"a": "unknown", "b": "done", "Iteration 1": "running"}
    text = " ".join(page.text)
    assert "a/manifest.json: not a JSON object" in text and "hhh.json: unreadable" in text
    assert "config.yaml: unreadable" in text and "No iteration folders yet." not in text


def test_eval_name_files_the_result_under_the_label(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path)
    fake = {"suite": "ifeval", "model": "run:ppo", "metrics": {
        "prompt_level": {"n": 2, "strict": 0.5, "loose": 1.0}}, "items": []}
    monkeypatch.setattr("dromedary_ray.eval.run_eval", lambda opts: dict(fake))
    argv = ["eval", "run:ppo", "--suite", "ifeval", "--run-dir", str(run)]
    assert main([*argv, "--name", "ppo"]) == 0
    saved = json.loads((run / "eval" / "ppo" / "ifeval.json").read_text())
    assert saved["label"] == "ppo" and saved["metrics"] == fake["metrics"]
    assert main(["eval", "run:ppo", "--suite", "ifeval", "--name", "ppo"]) == 2
    assert "give --run-dir" in capsys.readouterr().err
    assert main([*argv, "--name", "a/b"]) == 2
    iter_model = str(run / "isheep" / "iter_1" / "sft" / "model")
    monkeypatch.setattr("dromedary_ray.eval.run_eval",
                        lambda opts: {**fake, "model": iter_model})
    assert main(["eval", iter_model, "--suite", "ifeval", "--run-dir", str(run),
                 "--name", "iter_1"]) == 0
    table = eval_summary_table(collect_run(run))
    column = table.headers.index("ifeval prompt_level strict")
    rows = {r[0]: r for r in table.rows}
    assert rows["ppo"][column] == rows["iter_1"][column] == "0.500"
    assert "isheep/iter_1/sft" not in rows  # its eval row, labelled iter_1, stands for it


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_page_opens_in_headless_chromium_without_console_errors(report):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} absent (apt-get install chromium "
                    "chromium-driver; scripts/setup.sh does it in CI)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed "
                                    "(pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    _, files = report
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(files.html.resolve().as_uri())
        headings = driver.execute_script(
            "return Array.from(document.querySelectorAll('h1,h2,h3,h4,h5,h6'))"
            ".map(h => h.textContent)")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        logs = driver.get_log("browser")
    finally:
        driver.quit()
    # Any blocked fetch (CSP), broken image or script error would be logged here.
    assert [e for e in logs if e.get("level") in ("SEVERE", "WARNING")] == [], logs
    for stage in [*RECIPE, "reward_model", "ppo", "sft"]:
        assert stage in headings, stage
    assert len(images) == len(files.images)
    assert all(complete and width > 0 for complete, width in images), images
