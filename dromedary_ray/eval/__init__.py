"""`dromedary eval`: benchmark suites for any model spec, one module per suite.

    hhh         BIG-bench hhh_alignment task files, answers ranked by log-likelihood (hhh.py)
    truthfulqa  TruthfulQA MC1/MC2 from BIG-bench or the original mc_task.json (truthfulqa.py)
    pairwise    two models' answers judged under our principles, both orders (pairwise.py)
    ifeval      our own verifiable-instruction prompts, programmatic checks (ifeval.py)

Every suite returns one JSON-able result: `metrics` (a row per subset, `overall` last) and
`items` (per-item detail a report can show). With a run directory the result is written to
`<run>/eval/<model-slug>/<suite>.json`. This module holds what the suites share and imports
nothing heavy: engines are built inside `open_engine`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from dromedary_ray.errors import ConfigError, InputFileError, read_input_text

SUITES = ("hhh", "truthfulqa", "pairwise", "ifeval")
DEFAULT_DATA = {"ifeval": "principles/ifeval_prompts.jsonl",
                "pairwise": "principles/seed_tasks.jsonl"}


@dataclass(frozen=True)
class EvalOptions:
    model: str
    suite: str
    data: str | None = None
    other: str | None = None  # pairwise: the model compared against
    judge: str | None = None  # pairwise: a model spec or an http(s):// OpenAI-compatible URL
    judge_api_key_env: str | None = None
    backend: str = "vllm"
    run_dir: str | None = None
    max_new_tokens: int = 256
    max_model_len: int = 2048
    limit: int | None = None  # first N items only (quick looks, tests)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ConfigError(f"--suite {self.suite!r}: must be one of {', '.join(SUITES)}")
        if self.backend not in ("vllm", "transformers"):
            raise ConfigError(f"--backend {self.backend!r}: must be vllm or transformers")
        if self.suite == "pairwise" and not (self.other and self.judge):
            raise ConfigError("--suite pairwise needs --other MODEL2 and --judge SPEC")
        if self.suite in ("hhh", "truthfulqa") and not self.data:
            raise ConfigError(f"--suite {self.suite} needs --data (the benchmark files are not "
                              "shipped; see the suite's docstring for the formats)")
        if self.max_new_tokens < 1 or self.max_model_len < 64:
            raise ConfigError("--max-new-tokens must be >= 1 and --max-model-len >= 64")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be >= 1")

    @property
    def data_path(self) -> str:
        return self.data or DEFAULT_DATA.get(self.suite, "")


# --- reading input files ------------------------------------------------------------------


def read_json(path: Path) -> Any:
    text = read_input_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        what = f"not valid JSON ({err.msg} at column {err.colno})"
        raise InputFileError(str(path), what, err.lineno) from None
    except (ValueError, RecursionError) as err:  # a number over 4,300 digits, nesting too deep
        what = f"not valid JSON ({type(err).__name__}: {err})"
        raise InputFileError(str(path), what) from None


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line."""
    # Not str.splitlines: it also splits at U+2028, U+0085 and \x1c, which JSON strings may
    # hold raw (ensure_ascii=False), cutting a valid line in two.
    lines = re.split(r"\r\n|\r|\n", read_input_text(path))
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            what = f"not valid JSON ({err.msg} at column {err.colno})"
            raise InputFileError(str(path), what, n) from None
        except (ValueError, RecursionError) as err:
            raise InputFileError(str(path), f"not valid JSON ({type(err).__name__}: {err})",
                                 n) from None
    if not rows:
        raise InputFileError(str(path), "no items in file")
    return rows


# --- engines ------------------------------------------------------------------------------


@contextlib.contextmanager
def open_engine(spec: str, opts: EvalOptions) -> Iterator[Any]:
    """An engine for a model spec (run:STAGE resolved in the run dir), closed on exit so the next
    model of a pairwise run gets the memory back."""
    import torch

    from dromedary_ray.config import EngineConfig
    from dromedary_ray.engines import make_engine
    from dromedary_ray.models import resolve_model

    cfg = EngineConfig(
        backend=opts.backend,
        dtype="auto" if torch.cuda.is_available() else "float32",
        max_model_len=opts.max_model_len,
        kv_cache_gib=1,
        cpus_per_engine=float(os.cpu_count() or 1),  # one engine at a time: give it every core
    )
    engine = make_engine(resolve_model(spec, opts.run_dir), cfg)
    try:
        yield engine
    finally:
        engine.close()


def generate_answers(engine: Any, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy single-turn chat answers: deterministic, so a rerun scores the same text."""
    from dromedary_ray.config import SamplingConfig
    from dromedary_ray.prompts import chat_stop_strings, render_chat

    tok = engine.tokenizer
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                              stop=chat_stop_strings(tok))
    rendered = [render_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
    answers = []
    for gen in engine.generate(rendered, sampling):
        if gen.error:
            answers.append({"text": "", "error": gen.error})
        else:
            c = gen.completions[0]
            answers.append({"text": c.text.strip(), "error": None,
                            "finish_reason": c.finish_reason})
    return answers


# --- results ------------------------------------------------------------------------------


def model_slug(spec: str) -> str:
    """A folder name for a model spec: `builtin:tiny-llama` -> `builtin-tiny-llama`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "model"


def result_name(opts: EvalOptions) -> str:
    # Pairwise results depend on the opponent too; one file per opponent keeps them all.
    if opts.suite == "pairwise":
        return f"pairwise-vs-{model_slug(opts.other or '')}.json"
    return f"{opts.suite}.json"


def save_result(result: dict[str, Any], opts: EvalOptions, out: str | None) -> list[str]:
    """Write the result to `--out` and/or the run directory; return where it went."""
    import pyarrow.fs as pafs

    data = json.dumps(result, indent=2, allow_nan=False).encode()
    written = []
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(data)
        written.append(out)
    if opts.run_dir:
        if "://" in opts.run_dir:
            fs, root = pafs.FileSystem.from_uri(opts.run_dir)
        else:
            fs, root = pafs.LocalFileSystem(), str(Path(opts.run_dir).expanduser().resolve())
        folder = f"{root}/eval/{model_slug(opts.model)}"
        fs.create_dir(folder, recursive=True)
        with fs.open_output_stream(f"{folder}/{result_name(opts)}") as f:
            f.write(data)
        written.append(f"{opts.run_dir}/eval/{model_slug(opts.model)}/{result_name(opts)}")
    return written


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Rows are subsets, columns the union of their metric names; rates to 3 decimals."""
    columns: list[str] = []
    for row in metrics.values():
        columns += [k for k in row if k not in columns]
    cells = [["", *columns]]
    for name, row in metrics.items():
        cells.append([name] + [_cell(row.get(c)) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w)
                       in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Run one suite; the result carries the options and timing, ready for `save_result`."""
    from dromedary_ray.eval import hhh, ifeval, pairwise, truthfulqa

    runner = {"hhh": hhh.run, "truthfulqa": truthfulqa.run, "pairwise": pairwise.run,
              "ifeval": ifeval.run}[opts.suite]
    start = time.time()
    result = runner(opts)
    return {"suite": opts.suite, "model": opts.model, "options": asdict(opts),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - start, 2), **result}


def claim_stdout() -> TextIO:
    """Point fd 1 at stderr for the rest of the process and return a stream on the real stdout.

    vLLM logs to stdout, and so does its engine process (which inherits fd 1), even at exit;
    with `--json` the command's stdout must hold the JSON alone. For the command line only:
    nothing is restored.
    """
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real
