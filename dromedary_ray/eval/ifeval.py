"""Verifiable instructions in the style of IFEval (Zhou et al. 2023), with our own prompts.

Data: JSONL (default `principles/ifeval_prompts.jsonl`), one prompt a line:
`{"id": ..., "prompt": ..., "checks": [{"kind": "word_count", "max": 50}, ...]}`; the kinds and
their parameters are in `ifeval_checks.CHECKS`. The model answers each prompt greedily as one
chat turn; every check is then run on the answer, strictly and loosely (`loose_variants`).
Metrics: prompt level (all of a prompt's checks pass) and instruction level (the fraction of all
checks that pass), each strict and loose; one row per check kind besides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromedary_ray.config import resolve_path
from dromedary_ray.errors import InputFileError
from dromedary_ray.eval import EvalOptions, generate_answers, open_engine, read_jsonl
from dromedary_ray.eval.ifeval_checks import check_strict_loose, validate


@dataclass(frozen=True)
class IFPrompt:
    id: str
    prompt: str
    checks: tuple[dict[str, Any], ...]


def _parse_line(path: Path, n: int, row: Any) -> IFPrompt:
    if not isinstance(row, dict):
        raise InputFileError(str(path), "each line must be a JSON object", n)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputFileError(str(path), "missing or empty string", n, "prompt")
    checks = row.get("checks")
    if not isinstance(checks, list) or not checks:
        raise InputFileError(str(path), "must be a non-empty list of checks", n, "checks")
    for j, check in enumerate(checks):
        problem = validate(check)
        if problem:
            key, what = problem
            raise InputFileError(str(path), what, n, f"checks[{j}]" + (f".{key}" if key else ""))
    return IFPrompt(str(row.get("id", f"line_{n}")), prompt.strip(), tuple(checks))


def load_ifeval(data: str) -> list[IFPrompt]:
    path = resolve_path(data)
    prompts, seen = [], set()
    for n, row in read_jsonl(path):
        item = _parse_line(path, n, row)
        if item.id in seen:
            raise InputFileError(str(path), f"duplicate id {item.id!r}", n, "id")
        seen.add(item.id)
        prompts.append(item)
    return prompts


def _rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def score_ifeval(prompts: list[IFPrompt], responses: list[str]) -> dict[str, Any]:
    """Strict and loose accuracy at prompt and instruction level, and per check kind."""
    details, by_kind = [], {}
    strict_all, loose_all, prompt_strict, prompt_loose = [], [], [], []
    for item, text in zip(prompts, responses, strict=True):
        results = [check_strict_loose(c, text) for c in item.checks]
        strict = [s for s, _ in results]
        loose = [lo for _, lo in results]
        strict_all += strict
        loose_all += loose
        prompt_strict.append(all(strict))
        prompt_loose.append(all(loose))
        for check, (s, lo) in zip(item.checks, results, strict=True):
            by_kind.setdefault(check["kind"], []).append((s, lo))
        details.append({"id": item.id, "response": text, "strict": strict, "loose": loose})
    metrics: dict[str, dict[str, Any]] = {
        kind: {"n": len(v), "strict": _rate([s for s, _ in v]), "loose": _rate([lo for _, lo in v])}
        for kind, v in sorted(by_kind.items())}
    metrics["prompt_level"] = {"n": len(prompts), "strict": _rate(prompt_strict),
                               "loose": _rate(prompt_loose)}
    metrics["instruction_level"] = {"n": len(strict_all), "strict": _rate(strict_all),
                                    "loose": _rate(loose_all)}
    return {"metrics": metrics, "items": details}


def run(opts: EvalOptions) -> dict[str, Any]:
    prompts = load_ifeval(opts.data_path)
    prompts = prompts[:opts.limit] if opts.limit else prompts
    with open_engine(opts.model, opts) as engine:
        answers = generate_answers(engine, [p.prompt for p in prompts], opts.max_new_tokens)
    result = score_ifeval(prompts, [a["text"] for a in answers])
    for row, answer in zip(result["items"], answers, strict=True):
        row["error"] = answer["error"]
    return {"data": opts.data_path, **result}
