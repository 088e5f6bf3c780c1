"""SALMON's principle library: judging dimensions, RL-time interventions, prompt types, templates.

SALMON (Sun et al. 2023) trains an *instructable* reward model: its input holds a prompt, a
response and a list of principles, and its score must follow those principles. The same
principles drive the synthetic preferences (a judge compares two responses under one principle
at a time, §3.1) and PPO (principles sampled per prompt, plus intervention principles written
against observed reward hacking, §3.3). This module loads `principles/salmon.yaml`, validates it
like the other loaders (an `InputFileError` naming the file and key path), and holds the pure
helpers around it: prompt typing, weighted principle sampling and prompt rendering.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dromedary_ray.config import resolve_path
from dromedary_ray.errors import InputFileError
from dromedary_ray.principles import _field, read_yaml

JUDGE_PLACEHOLDERS = frozenset(
    {"principle_name", "principle_definition", "prompt", "response_a", "response_b"})
RM_PLACEHOLDERS = frozenset({"prompt", "response", "principles"})
FALLBACK_TYPE = "general"
DEFAULT_WEIGHT = 1.0
# A keyword also matches these endings ("kill" finds "killing"), not arbitrary continuations
# ("api" must not find "apiary").
_INFLECTIONS = r"(?:s|es|ed|d|ing|er|ers)?"


@dataclass(frozen=True)
class SalmonPrinciple:
    name: str
    definition: str
    negation: str

    def text(self, negated: bool = False) -> str:
        return self.negation if negated else self.definition


@dataclass(frozen=True)
class SalmonPrincipleSet:
    principles: tuple[SalmonPrinciple, ...]
    interventions: tuple[SalmonPrinciple, ...]
    # type -> {principle name -> weight} as written; unlisted principles weigh DEFAULT_WEIGHT.
    prompt_types: Mapping[str, Mapping[str, float]]
    # (type, keywords) in the order the file lists them: classify_prompt tries them in turn.
    type_keywords: tuple[tuple[str, tuple[str, ...]], ...]
    judge_template: str
    choices: tuple[str, str]
    rm_template: str

    def get(self, name: str) -> SalmonPrinciple:
        """A principle or intervention by name."""
        for p in self.principles + self.interventions:
            if p.name == name:
                return p
        raise KeyError(f"no SALMON principle named {name!r}")

    def weights(self, prompt_type: str) -> list[float]:
        """Sampling weight of each entry of `principles`, in order, for one prompt type."""
        if prompt_type not in self.prompt_types:
            raise ValueError(f"unknown prompt type {prompt_type!r}; known: "
                             f"{', '.join(self.prompt_types)}")
        table = self.prompt_types[prompt_type]
        return [table.get(p.name, DEFAULT_WEIGHT) for p in self.principles]


# --- loading ---------------------------------------------------------------------------------


def load_salmon_principles(path: str | Path) -> SalmonPrincipleSet:
    """Load and validate a SALMON principle file (format: see principles/salmon.yaml)."""
    p = resolve_path(str(path))
    doc = read_yaml(p)
    principles = _principle_list(p, doc, "principles", allow_empty=False)
    interventions = _principle_list(p, doc, "intervention_principles", allow_empty=True)
    seen: dict[str, str] = {}
    for where, group in (("principles", principles), ("intervention_principles", interventions)):
        for i, pr in enumerate(group):
            if pr.name in seen:
                raise InputFileError(str(p), f"duplicate name {pr.name!r} (also at "
                                     f"{seen[pr.name]})", key=f"{where}[{i}].name")
            seen[pr.name] = f"{where}[{i}]"
    prompt_types, keywords = _prompt_types(p, doc, [pr.name for pr in principles])
    judge = _field(p, doc, "judge", "", dict)
    choices_raw = _field(p, judge, "choices", "judge", list)
    if (len(choices_raw) != 2 or not all(isinstance(c, str) and c.strip() for c in choices_raw)
            or choices_raw[0] == choices_raw[1]):
        raise InputFileError(str(p), "must be two different non-empty strings",
                             key="judge.choices")
    return SalmonPrincipleSet(
        principles=principles,
        interventions=interventions,
        prompt_types=prompt_types,
        type_keywords=keywords,
        judge_template=_template(p, judge, "judge", JUDGE_PLACEHOLDERS),
        choices=(choices_raw[0], choices_raw[1]),
        rm_template=_template(p, _field(p, doc, "rm_prompt", "", dict), "rm_prompt",
                              RM_PLACEHOLDERS),
    )


def _principle_list(p: Path, doc: Any, key: str, allow_empty: bool) -> tuple[SalmonPrinciple, ...]:
    raw = _field(p, doc, key, "", list)
    if not raw and not allow_empty:
        raise InputFileError(str(p), "needs at least one principle", key=key)
    return tuple(
        SalmonPrinciple(*(_field(p, item, k, f"{key}[{i}]") for k in ("name", "definition",
                                                                      "negation")))
        for i, item in enumerate(raw)
    )


def _prompt_types(p: Path, doc: Any, names: list[str]
                  ) -> tuple[dict[str, dict[str, float]], tuple[tuple[str, tuple[str, ...]], ...]]:
    raw = _field(p, doc, "prompt_types", "", list)
    known = set(names)
    types: dict[str, dict[str, float]] = {}
    keywords: list[tuple[str, tuple[str, ...]]] = []
    for i, entry in enumerate(raw):
        where = f"prompt_types[{i}]"
        name = _field(p, entry, "name", where)
        if name in types:
            raise InputFileError(str(p), f"duplicate prompt type {name!r}", key=f"{where}.name")
        kws = _field(p, entry, "keywords", where, list)
        for j, kw in enumerate(kws):
            if not isinstance(kw, str) or not kw.strip():
                raise InputFileError(str(p), "keywords must be non-empty strings",
                                     key=f"{where}.keywords[{j}]")
        table = _weight_table(p, _field(p, entry, "weights", where, dict), f"{where}.weights",
                              known)
        if not any(table.get(n, DEFAULT_WEIGHT) > 0 for n in names):
            raise InputFileError(str(p), "every principle has weight 0: nothing to sample",
                                 key=f"{where}.weights")
        types[name] = table
        keywords.append((name, tuple(kw.strip().lower() for kw in kws)))
    if FALLBACK_TYPE not in types:
        raise InputFileError(str(p), f"needs a {FALLBACK_TYPE!r} type, the fallback for prompts "
                             "no keyword matches", key="prompt_types")
    return types, tuple(keywords)


def _weight_table(p: Path, raw: dict, where: str, known: set[str]) -> dict[str, float]:
    table: dict[str, float] = {}
    for name, w in raw.items():
        key = f"{where}.{name}"
        if name not in known:
            raise InputFileError(str(p), "not the name of a principle in `principles`", key=key)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise InputFileError(str(p), f"weight must be a number, got {w!r}", key=key)
        if w < 0:
            raise InputFileError(str(p), f"weight must be >= 0, got {w}", key=key)
        table[name] = float(w)
    return table


def _template(p: Path, node: dict, where: str, required: frozenset[str]) -> str:
    text = _field(p, node, "template", where)
    key = f"{where}.template"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text)
                  if f is not None]
    except ValueError as err:  # a lone "{" or "}"
        raise InputFileError(str(p), f"not a valid template ({err}); write literal braces "
                             "as {{ and }}", key=key) from None
    found = {f for f, _, _ in fields}
    # `{prompt!x}` or `{response:d}` parses but fails in .format() at render time, hours later.
    if odd := [f for f, spec, conv in fields if spec or conv]:
        raise InputFileError(str(p), f"placeholder {odd[0]!r} has a conversion or format spec; "
                             "write placeholders as plain {name}", key=key)
    if missing := required - found:
        raise InputFileError(str(p), f"missing placeholder(s) {sorted(missing)}", key=key)
    if unknown := found - required:
        raise InputFileError(str(p), f"unknown placeholder(s) {sorted(unknown)}; allowed: "
                             f"{sorted(required)}", key=key)
    return text


# --- using a set -----------------------------------------------------------------------------


def classify_prompt(text: str, pset: SalmonPrincipleSet) -> str:
    """The prompt type of `text`: the first type, in file order, with a keyword in the text.

    Keywords match case-insensitively as whole words or phrases, allowing common English endings
    ("kill" matches "killing", not "skill"). Red-team types should come first in the file so a
    harmful request dressed as a story is still typed red_team. No match: `general`.
    """
    lowered = text.lower()
    for type_name, kws in pset.type_keywords:
        for kw in kws:
            if re.search(rf"(?<!\w){re.escape(kw)}{_INFLECTIONS}(?!\w)", lowered):
                return type_name
    return FALLBACK_TYPE


def sample_principles(pset: SalmonPrincipleSet, prompt_type: str, k: int,
                      rng: random.Random) -> list[SalmonPrinciple]:
    """Draw `k` distinct principles, each draw with probability proportional to its weight.

    Sequential draws without replacement, so the result (and its order) depends only on the
    weights and the state of `rng`; zero-weight principles are never drawn.
    """
    weights = pset.weights(prompt_type)
    pool = [i for i, w in enumerate(weights) if w > 0]
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} principles: {len(pool)} have positive weight for "
                         f"prompt type {prompt_type!r}")
    picked: list[SalmonPrinciple] = []
    for _ in range(k):
        total = sum(weights[i] for i in pool)
        u, acc = rng.random() * total, 0.0
        chosen = pool[-1]  # float round-off can leave u just above the last cumulative sum
        for i in pool:
            acc += weights[i]
            if u < acc:
                chosen = i
                break
        pool.remove(chosen)
        picked.append(pset.principles[chosen])
    return picked


def render_judge_prompt(pset: SalmonPrincipleSet, principle: SalmonPrinciple, prompt: str,
                        response_a: str, response_b: str) -> str:
    """The single-principle comparison prompt; the next token is one of `pset.choices`."""
    return pset.judge_template.format(
        principle_name=principle.name, principle_definition=principle.definition,
        prompt=prompt.strip(), response_a=response_a.strip(), response_b=response_b.strip())


def render_principle_list(principles: Sequence[tuple[SalmonPrinciple, bool]]) -> str:
    """Numbered lines "1. Name: text", the text being the negation for negated principles."""
    return "\n".join(f"{i}. {p.name}: {p.text(negated)}"
                     for i, (p, negated) in enumerate(principles, start=1))


def render_rm_input(pset: SalmonPrincipleSet, prompt: str, response: str,
                    principles: Sequence[tuple[SalmonPrinciple, bool]]) -> str:
    """The reward model's input text for one response under (principle, negated) pairs."""
    if not principles:
        raise ValueError("the reward model input needs at least one principle")
    return pset.rm_template.format(prompt=prompt.strip(), response=response.strip(),
                                   principles=render_principle_list(principles))
