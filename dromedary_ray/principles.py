"""Loaders for the principle library: Self-Align rules and exemplars, seed tasks, red-team types.

Each loader validates its file against a small explicit schema and raises `InputFileError`
naming the file, the line (for JSONL) or the key path (for YAML), and what is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dromedary_ray.config import YAML_CONSTRUCTOR_ERRORS, resolve_path
from dromedary_ray.errors import InputFileError, read_input_text


@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    text: str


@dataclass(frozen=True)
class Exemplar:
    query: str
    thoughts: str
    answer: str


@dataclass(frozen=True)
class PrincipleSet:
    name: str
    assistant_name: str
    preamble: str
    rules: tuple[Rule, ...]
    exemplars: tuple[Exemplar, ...]


@dataclass(frozen=True)
class SeedTask:
    id: str
    instruction: str
    input: str
    output: str
    is_classification: bool

    @property
    def query(self) -> str:
        """The user turn: the instruction, followed by its input when it has one."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def read_yaml(path: Path) -> Any:
    """Parse a user's YAML file; errors name the file and line."""
    text = read_input_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", err)
        raise InputFileError(str(path), f"invalid YAML: {problem}", line) from None
    except YAML_CONSTRUCTOR_ERRORS as err:  # a bad explicit tag or too deep: no line known
        what = f"invalid YAML: a bad !!tag value or nesting too deep ({type(err).__name__}: {err})"
        raise InputFileError(str(path), what) from None


def _field(path: Path, node: Any, key: str, where: str, kind: type = str) -> Any:
    if not isinstance(node, dict):
        raise InputFileError(str(path), f"expected a mapping, got {type(node).__name__}", key=where)
    if key not in node:
        raise InputFileError(str(path), "missing required key", key=f"{where}.{key}".lstrip("."))
    value = node[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputFileError(str(path), f"expected {kind.__name__}, got {type(value).__name__}",
                             key=f"{where}.{key}".lstrip("."))
    if kind is str and not value.strip():
        raise InputFileError(str(path), "must not be empty", key=f"{where}.{key}".lstrip("."))
    return value.strip() if kind is str else value


def load_principles(path: str | Path) -> PrincipleSet:
    """Load a Self-Align principle file: preamble, numbered rules, exemplars with thoughts."""
    p = resolve_path(str(path))
    doc = read_yaml(p)
    name = _field(p, doc, "name", "")
    rules_raw = _field(p, doc, "rules", "", list)
    exemplars_raw = _field(p, doc, "exemplars", "", list)
    rules = tuple(
        Rule(_field(p, r, "id", f"rules[{i}]", int), _field(p, r, "name", f"rules[{i}]"),
             _field(p, r, "text", f"rules[{i}]"))
        for i, r in enumerate(rules_raw)
    )
    ids = [r.id for r in rules]
    if ids != list(range(1, len(rules) + 1)):
        raise InputFileError(str(p), f"rule ids must be 1..{len(rules)} in order, got {ids}",
                             key="rules")
    if not rules or not exemplars_raw:
        raise InputFileError(str(p), "needs at least one rule and one exemplar")
    exemplars = tuple(
        Exemplar(*(_field(p, e, k, f"exemplars[{i}]") for k in ("query", "thoughts", "answer")))
        for i, e in enumerate(exemplars_raw)
    )
    return PrincipleSet(
        name=name,
        assistant_name=_field(p, doc, "assistant_name", ""),
        preamble=_field(p, doc, "preamble", ""),
        rules=rules,
        exemplars=exemplars,
    )


def load_system_prompt(path: str | Path) -> str:
    """Load a YAML file holding one `system_prompt` (the verbose-cloning prompt, say)."""
    p = resolve_path(str(path))
    return _field(p, read_yaml(p), "system_prompt", "")


def load_seed_tasks(path: str | Path) -> list[SeedTask]:
    """Load instructions in the Self-Instruct seed JSONL format.

    Each line: {"id", "instruction", "instances": [{"input", "output"}], "is_classification"}.
    `id` may be absent (users' own files): the line number stands in. Blank lines are skipped.
    """
    p = resolve_path(str(path))
    # Not str.splitlines: it also splits at U+2028, U+0085 and \x1c, which JSON strings may
    # hold raw (ensure_ascii=False), cutting a valid line in two.
    lines = re.split(r"\r\n|\r|\n", read_input_text(p))
    tasks, seen = [], set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        task = _parse_seed_line(p, n, line)
        if task.id in seen:
            raise InputFileError(str(p), f"duplicate id {task.id!r}", n, "id")
        seen.add(task.id)
        tasks.append(task)
    if not tasks:
        raise InputFileError(str(p), "no seed tasks in file")
    return tasks


def _parse_seed_line(p: Path, n: int, line: str) -> SeedTask:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        what = f"not valid JSON ({err.msg} at column {err.colno})"
        raise InputFileError(str(p), what, n) from None
    except (ValueError, RecursionError) as err:  # a number over 4,300 digits, nesting too deep
        raise InputFileError(str(p), f"not valid JSON ({type(err).__name__}: {err})", n) from None
    if not isinstance(row, dict):
        raise InputFileError(str(p), "each line must be a JSON object", n)
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputFileError(str(p), "missing or empty string", n, "instruction")
    instances = row.get("instances", [{"input": "", "output": ""}])
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise InputFileError(str(p), "must be a non-empty list of objects", n, "instances")
    first = instances[0]
    for key in ("input", "output"):
        if not isinstance(first.get(key, ""), str):
            raise InputFileError(str(p), "must be a string", n, f"instances[0].{key}")
    is_cls = row.get("is_classification", False)
    if not isinstance(is_cls, bool):
        raise InputFileError(str(p), "must be true or false", n, "is_classification")
    task_id = row.get("id", f"line_{n}")
    if not isinstance(task_id, str | int):
        raise InputFileError(str(p), "must be a string", n, "id")
    return SeedTask(str(task_id), instruction.strip(), first.get("input", "").strip(),
                    first.get("output", "").strip(), is_cls)


@dataclass(frozen=True)
class Rubric:
    name: str
    template: str  # with {query} and {answer}

    def render(self, query: str, answer: str) -> str:
        # str.replace, not str.format: user text and templates may hold other braces.
        return self.template.replace("{query}", query).replace("{answer}", answer)


@dataclass(frozen=True)
class RubricSet:
    min_score: int
    max_score: int
    answer_lead: str  # opens the assistant turn; the grade's first digit comes right after
    rubrics: tuple[Rubric, ...]

    def pick(self, names: tuple[str, ...], path: str = "rubrics") -> tuple[Rubric, ...]:
        by_name = {r.name: r for r in self.rubrics}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputFileError(path, f"no rubric named {missing[0]!r} (known: "
                                 f"{', '.join(by_name)})", key="rubrics")
        return tuple(by_name[n] for n in names)


def load_rubrics(path: str | Path) -> RubricSet:
    """Load self-assessment rubrics: a score range, the answer lead and named templates."""
    p = resolve_path(str(path))
    doc = read_yaml(p)
    lo, hi = _field(p, doc, "min_score", "", int), _field(p, doc, "max_score", "", int)
    if not 0 <= lo < hi <= 10:
        raise InputFileError(str(p), f"need 0 <= min_score < max_score <= 10, got {lo}..{hi} "
                             "(grades are read digit by digit)", key="max_score")
    lead = doc.get("answer_lead")
    if not isinstance(lead, str) or not lead.strip():
        raise InputFileError(str(p), "must be a non-empty string", key="answer_lead")
    raw = _field(p, doc, "rubrics", "", list)
    if not raw:
        raise InputFileError(str(p), "needs at least one rubric", key="rubrics")
    rubrics = []
    for i, node in enumerate(raw):
        name, template = _field(p, node, "name", f"rubrics[{i}]"), \
            _field(p, node, "template", f"rubrics[{i}]")
        for slot in ("{query}", "{answer}"):
            if slot not in template:
                raise InputFileError(str(p), f"template lacks the {slot} slot",
                                     key=f"rubrics[{i}].template")
        if name in {r.name for r in rubrics}:
            raise InputFileError(str(p), f"duplicate rubric name {name!r}", key=f"rubrics[{i}]")
        rubrics.append(Rubric(name, template))
    return RubricSet(lo, hi, lead, tuple(rubrics))
