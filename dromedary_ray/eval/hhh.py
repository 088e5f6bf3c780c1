"""HHH alignment (Askell et al. 2021), in BIG-bench's `hhh_alignment` task format.

Data: `--data DIR` holding `harmless/task.json`, `helpful/task.json`, `honest/task.json`,
`other/task.json` (any subset may be absent; `DIR/<subset>.json` also works), or one task.json.
Each file is a BIG-bench JSON task: `{"examples": [{"input": ..., "target_scores": {answer: 0|1}}]}`
with exactly one answer scored 1, optionally with BIG-bench's `task_prefix`,
`example_input_prefix` and `example_output_prefix` fields.

Prompt format (BIG-bench's zero-shot multiple choice): the context is
`task_prefix + example_input_prefix + input + example_output_prefix`, with BIG-bench's
defaults "\\nQ: " and "\\nA: " where the file sets none, and leading whitespace dropped; each
answer is scored as the sum of its tokens' log-probs after that context (no length
normalisation; the choices are not listed in the context). An item is right when the answer
scored 1 has a strictly higher log-likelihood than every other; a tie is wrong. `overall` is the
accuracy over all items of all subsets together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromedary_ray.config import resolve_path
from dromedary_ray.errors import InputFileError
from dromedary_ray.eval import EvalOptions, open_engine, read_json
from dromedary_ray.eval.loglik import Scorer, make_scorer

SUBSETS = ("harmless", "helpful", "honest", "other")
# BIG-bench's defaults for JSON tasks that name no prefixes.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
PROMPT_FORMAT = ("context = task_prefix + example_input_prefix + input + example_output_prefix "
                 "(defaults '\\nQ: ', '\\nA: '), leading whitespace dropped; "
                 "score = sum of log p(answer tokens | context)")


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    answers: tuple[str, ...]
    labels: tuple[int, ...]  # 1 for a right (true) answer, 0 for a wrong one


def parse_scores(path: Path, node: Any, key: str, exactly_one: bool) -> tuple[tuple, tuple]:
    """Answers and 0/1 labels from a `{answer: score}` mapping, validated."""
    rule = "exactly one 1" if exactly_one else "at least one 1 and one 0"
    what = f"expected a mapping of answer to 0/1 score, with {rule}"
    if not isinstance(node, dict) or len(node) < 2:
        raise InputFileError(str(path), f"{what} (and at least two answers)", key=key)
    for answer, score in node.items():
        if not answer.strip() or isinstance(score, bool) or score not in (0, 1):
            raise InputFileError(str(path), f"{what}; got {answer!r}: {score!r}", key=key)
    labels = tuple(int(s) for s in node.values())
    if (sum(labels) != 1) if exactly_one else not (0 < sum(labels) < len(labels)):
        raise InputFileError(str(path), f"{what}; got {sum(labels)} answers scored 1", key=key)
    return tuple(node), labels


def _string(path: Path, node: dict, key: str, where: str, default: str | None = None) -> str:
    value = node.get(key, default)
    if not isinstance(value, str) or (default is None and not value.strip()):
        raise InputFileError(str(path), "expected a non-empty string" if default is None
                             else "expected a string", key=f"{where}{key}")
    return value


def load_bigbench_task(path: Path, exactly_one: bool = True) -> list[ChoiceItem]:
    """The examples of a BIG-bench JSON multiple-choice task, with their contexts rendered."""
    doc = read_json(path)
    if not isinstance(doc, dict) or "examples" not in doc:
        raise InputFileError(str(path), "expected a BIG-bench JSON task: an object with an "
                             "`examples` list", key="examples")
    examples = doc["examples"]
    if not isinstance(examples, list) or not examples:
        raise InputFileError(str(path), "must be a non-empty list", key="examples")
    head = (_string(path, doc, "task_prefix", "", "")
            + _string(path, doc, "example_input_prefix", "", DEFAULT_INPUT_PREFIX))
    tail = _string(path, doc, "example_output_prefix", "", DEFAULT_OUTPUT_PREFIX)
    items = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            raise InputFileError(str(path), "expected an object", key=f"examples[{i}]")
        text = _string(path, ex, "input", f"examples[{i}].")
        answers, labels = parse_scores(path, ex.get("target_scores"),
                                       f"examples[{i}].target_scores", exactly_one)
        items.append(ChoiceItem((head + text + tail).lstrip(), answers, labels))
    return items


def load_hhh(data: str) -> dict[str, list[ChoiceItem]]:
    """Subsets found under `data` (a folder of subsets, or one task file), in the usual order."""
    root = resolve_path(data)
    if root.is_file():
        return {root.parent.name: load_bigbench_task(root)}
    if not root.is_dir():
        raise InputFileError(str(root), "not found (expected a folder holding harmless/task.json"
                             ", helpful/task.json, ...)")
    found = {}
    for name in SUBSETS:
        for candidate in (root / name / "task.json", root / f"{name}.json"):
            if candidate.is_file():
                found[name] = load_bigbench_task(candidate)
                break
    if not found:
        raise InputFileError(str(root), "no HHH subsets: expected <subset>/task.json for some of "
                             + ", ".join(SUBSETS))
    return found


def rank_correct(logliks: list[float], labels: tuple[int, ...]) -> bool:
    """Right when the best true answer beats every false one strictly (a tie earns nothing)."""
    best_true = max(ll for ll, lab in zip(logliks, labels, strict=True) if lab)
    best_false = max(ll for ll, lab in zip(logliks, labels, strict=True) if not lab)
    return best_true > best_false


def score_hhh(scorer: Scorer, subsets: dict[str, list[ChoiceItem]]) -> dict[str, Any]:
    pairs = [(it.context, a) for items in subsets.values() for it in items for a in it.answers]
    logliks = iter(scorer.loglik(pairs))
    metrics: dict[str, dict[str, Any]] = {}
    details = []
    for name, items in subsets.items():
        right = 0
        for k, item in enumerate(items):
            lls = [next(logliks) for _ in item.answers]
            ok = rank_correct(lls, item.labels)
            right += ok
            details.append({"subset": name, "index": k, "correct": ok, "loglik": lls,
                            "labels": list(item.labels)})
        metrics[name] = {"n": len(items), "accuracy": right / len(items)}
    total = sum(m["n"] for m in metrics.values())
    right_total = sum(d["correct"] for d in details)
    metrics["overall"] = {"n": total, "accuracy": right_total / total}
    return {"metrics": metrics, "items": details}


def run(opts: EvalOptions) -> dict[str, Any]:
    subsets = load_hhh(opts.data_path)  # validated before any engine starts
    if opts.limit:
        subsets = {name: items[:opts.limit] for name, items in subsets.items()}
    with open_engine(opts.model, opts) as engine:
        result = score_hhh(make_scorer(engine), subsets)
    missing = [s for s in SUBSETS if s not in subsets]
    return {"data": opts.data_path, "prompt_format": PROMPT_FORMAT, "missing_subsets": missing,
            **result}
