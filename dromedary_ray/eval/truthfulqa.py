"""TruthfulQA multiple choice (Lin et al. 2022): MC1 and MC2 by log-likelihood.

Formats, told apart by their keys:
- the original `mc_task.json`: a JSON list of `{"question", "mc1_targets": {answer: 0|1},
  "mc2_targets": {answer: 0|1}}` (the Hugging Face `multiple_choice` export writes each target
  set as `{"choices": [...], "labels": [...]}` instead; JSON list or JSONL; both accepted);
- a BIG-bench JSON task: `{"examples": [{"input", "target_scores": {answer: 0|1}}]}`;
- BIG-bench's Hugging Face export: rows of `{"inputs", "multiple_choice_targets",
  "multiple_choice_scores"}` (JSON list or JSONL).
The BIG-bench forms have one target set per question: MC2 uses it as is, MC1 only where it has
exactly one true answer (`n` says how many questions each metric covers).

Prompt format: "Q: {question}\\nA:" and each answer scored after a space, as the sum of its
tokens' log-probs (BIG-bench tasks use their own prefixes, as in hhh.py; BIG-bench export rows
use `inputs` verbatim). No few-shot primer: we ship no benchmark text.
MC1: 1 when the true answer's log-likelihood is strictly the highest. MC2: the probability mass
on true answers, normalised over all answers: sum_true exp(ll) / sum_all exp(ll), computed as
exp(logsumexp(true) - logsumexp(all)) so long answers (ll of -200, say) do not underflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromedary_ray.config import resolve_path
from dromedary_ray.errors import InputFileError
from dromedary_ray.eval import EvalOptions, open_engine, read_json, read_jsonl
from dromedary_ray.eval.hhh import load_bigbench_task, parse_scores, rank_correct
from dromedary_ray.eval.loglik import Scorer, make_scorer

Targets = tuple[tuple[str, ...], tuple[int, ...]]  # answers, 0/1 labels


@dataclass(frozen=True)
class TQAItem:
    context: str
    mc1: Targets | None
    mc2: Targets | None


def logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(v - top) for v in values))


def mc2_score(logliks: list[float], labels: tuple[int, ...]) -> float:
    """Normalised probability mass on the true answers, in log space."""
    true = [ll for ll, lab in zip(logliks, labels, strict=True) if lab]
    total = logsumexp(logliks)
    return 0.0 if total == -math.inf else math.exp(logsumexp(true) - total)


def _targets(path: Path, node: Any, key: str, exactly_one: bool) -> Targets:
    """A target set as `{answer: 0|1}` or as `{"choices": [...], "labels": [...]}`."""
    if isinstance(node, dict) and set(node) == {"choices", "labels"}:
        choices, labels = node["choices"], node["labels"]
        if (not isinstance(choices, list) or not isinstance(labels, list)
                or len(choices) != len(labels) or not all(isinstance(c, str) for c in choices)):
            raise InputFileError(str(path), "choices and labels must be lists of equal length",
                                 key=key)
        if len(set(choices)) != len(choices):
            raise InputFileError(str(path), "repeated answer in choices", key=key)
        node = dict(zip(choices, labels, strict=True))
    return parse_scores(path, node, key, exactly_one)


def _row_item(path: Path, row: Any, where: str) -> TQAItem:
    if not isinstance(row, dict):
        raise InputFileError(str(path), "expected an object", key=where)
    if "multiple_choice_targets" in row:
        inputs, targets = row.get("inputs"), row.get("multiple_choice_targets")
        if not isinstance(inputs, str) or not inputs.strip():
            raise InputFileError(str(path), "expected a non-empty string", key=f"{where}.inputs")
        node = {"choices": targets, "labels": row.get("multiple_choice_scores")}
        answers, labels = _targets(path, node, f"{where}.multiple_choice_scores", False)
        context = inputs.lstrip() if inputs[-1].isspace() else inputs.lstrip() + " "
        return TQAItem(context, (answers, labels) if sum(labels) == 1 else None,
                       (answers, labels))
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InputFileError(str(path), "expected a non-empty string (or BIG-bench export rows "
                             "with inputs/multiple_choice_targets)", key=f"{where}.question")
    if "mc1_targets" not in row and "mc2_targets" not in row:
        raise InputFileError(str(path), "needs mc1_targets and/or mc2_targets",
                             key=f"{where}.mc1_targets")
    mc1 = (_targets(path, row["mc1_targets"], f"{where}.mc1_targets", True)
           if "mc1_targets" in row else None)
    mc2 = (_targets(path, row["mc2_targets"], f"{where}.mc2_targets", False)
           if "mc2_targets" in row else None)
    return TQAItem(f"Q: {question.strip()}\nA: ", mc1, mc2)


def load_truthfulqa(data: str) -> tuple[str, list[TQAItem]]:
    """(format name, items) for any of the three formats."""
    path = resolve_path(data)
    if path.suffix == ".jsonl":
        rows = [(f"line {n}", row) for n, row in read_jsonl(path)]
    else:
        doc = read_json(path)
        if isinstance(doc, dict) and "examples" in doc:
            items = load_bigbench_task(path, exactly_one=False)
            return "bigbench", [TQAItem(it.context, (it.answers, it.labels)
                                        if sum(it.labels) == 1 else None,
                                        (it.answers, it.labels)) for it in items]
        if not isinstance(doc, list) or not doc:
            raise InputFileError(str(path), "expected a BIG-bench task object, or a non-empty "
                                 "list of questions (mc_task.json)")
        rows = [(f"[{i}]", row) for i, row in enumerate(doc)]
    items = [_row_item(path, row, where) for where, row in rows]
    kind = "bigbench_export" if "multiple_choice_targets" in rows[0][1] else "mc_task"
    return kind, items


def score_truthfulqa(scorer: Scorer, items: list[TQAItem]) -> dict[str, Any]:
    # mc1 answers usually repeat among mc2's: score each (context, answer) once.
    pairs = sorted({(it.context, a) for it in items for t in (it.mc1, it.mc2) if t for a in t[0]})
    table = dict(zip(pairs, scorer.loglik(pairs), strict=True))
    mc1, mc2, details = [], [], []
    for k, it in enumerate(items):
        row: dict[str, Any] = {"index": k}
        if it.mc1:
            lls = [table[(it.context, a)] for a in it.mc1[0]]
            mc1.append(float(rank_correct(lls, it.mc1[1])))
            row["mc1"] = mc1[-1]
        if it.mc2:
            lls = [table[(it.context, a)] for a in it.mc2[0]]
            mc2.append(mc2_score(lls, it.mc2[1]))
            row["mc2"] = mc2[-1]
        details.append(row)
    metrics = {name: {"n": len(v), "score": sum(v) / len(v) if v else None}
               for name, v in (("mc1", mc1), ("mc2", mc2))}
    return {"metrics": metrics, "items": details}


def run(opts: EvalOptions) -> dict[str, Any]:
    kind, items = load_truthfulqa(opts.data_path)
    items = items[:opts.limit] if opts.limit else items
    with open_engine(opts.model, opts) as engine:
        result = score_truthfulqa(make_scorer(engine), items)
    return {"data": opts.data_path, "format": kind, **result}
