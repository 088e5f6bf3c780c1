"""Programmatic checks for verifiable instructions, in the style of IFEval (Zhou et al. 2023).

Pure functions of the response text and the check's parameters; no model. Each kind names the
parameters it takes; `validate` explains a bad check before any model runs. The loose variants
follow IFEval's idea: formatting noise around an otherwise compliant answer (a preamble line, a
sign-off line, markdown emphasis) should not fail it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_BULLET = re.compile(r"^\s*[-*+•]\s+\S", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_TITLE = re.compile(r"<<[^<>\n]*\S[^<>\n]*>>")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n(.*)\n```$", re.DOTALL)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Sentence-like spans: text up to ., ! or ? followed by space or the end; a span counts
    only if it holds a word, so "..." or a stray "!" is not a sentence."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p for p in parts if _WORD.search(p)]


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def _has_word(text: str, phrase: str) -> int:
    """Occurrences of `phrase` as whole words, ignoring case."""
    return len(re.findall(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE))


def word_count(text: str, min: int | None = None, max: int | None = None) -> bool:  # noqa: A002
    n = len(words(text))
    return (min is None or n >= min) and (max is None or n <= max)


def sentence_count(text: str, min: int | None = None, max: int | None = None) -> bool:  # noqa: A002
    n = len(sentences(text))
    return (min is None or n >= min) and (max is None or n <= max)


def keywords_present(text: str, keywords: list[str]) -> bool:
    return all(_has_word(text, k) for k in keywords)


def keywords_absent(text: str, keywords: list[str]) -> bool:
    return not any(_has_word(text, k) for k in keywords)


def keyword_frequency(text: str, keyword: str, min: int) -> bool:  # noqa: A002
    return _has_word(text, keyword) >= min


def json_format(text: str) -> bool:
    """The whole response is one JSON value; a ```json fence around it is allowed."""
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError:
        return False
    return True


def bullet_count(text: str, count: int) -> bool:
    return len(_BULLET.findall(text)) == count


def lowercase(text: str) -> bool:
    return text == text.lower() and any(c.isalpha() for c in text)


def uppercase(text: str) -> bool:
    return text == text.upper() and any(c.isalpha() for c in text)


def ends_with(text: str, phrase: str) -> bool:
    return text.strip().endswith(phrase.strip())


def starts_with(text: str, word: str) -> bool:
    first = words(text)
    return bool(first) and first[0].lower() == word.lower()


def no_commas(text: str) -> bool:
    return "," not in text and "，" not in text


def paragraph_count(text: str, count: int) -> bool:
    return len(paragraphs(text)) == count


def title(text: str) -> bool:
    return bool(_TITLE.search(text))


def placeholder_count(text: str, min: int) -> bool:  # noqa: A002
    return len(_PLACEHOLDER.findall(text)) >= min


def repeat_request(text: str, text_to_repeat: str) -> bool:
    """The response opens with the request, word for word (spacing and case aside)."""
    squash = lambda s: " ".join(s.split()).lower()  # noqa: E731
    return squash(text).startswith(squash(text_to_repeat))


def postscript(text: str, marker: str) -> bool:
    return any(line.strip().startswith(marker) for line in text.splitlines())


def quoted(text: str) -> bool:
    body = text.strip()
    return len(body) >= 2 and body[0] in "\"“" and body[-1] in "\"”"


@dataclass(frozen=True)
class CheckKind:
    fn: Callable[..., bool]
    required: dict[str, type] = field(default_factory=dict)
    optional: dict[str, type] = field(default_factory=dict)
    one_of: tuple[str, ...] = ()  # at least one of these optional parameters must be given


_BOUNDS = {"min": int, "max": int}
CHECKS: dict[str, CheckKind] = {
    "word_count": CheckKind(word_count, optional=_BOUNDS, one_of=("min", "max")),
    "sentence_count": CheckKind(sentence_count, optional=_BOUNDS, one_of=("min", "max")),
    "keywords_present": CheckKind(keywords_present, {"keywords": list}),
    "keywords_absent": CheckKind(keywords_absent, {"keywords": list}),
    "keyword_frequency": CheckKind(keyword_frequency, {"keyword": str, "min": int}),
    "json_format": CheckKind(json_format),
    "bullet_count": CheckKind(bullet_count, {"count": int}),
    "lowercase": CheckKind(lowercase),
    "uppercase": CheckKind(uppercase),
    "ends_with": CheckKind(ends_with, {"phrase": str}),
    "starts_with": CheckKind(starts_with, {"word": str}),
    "no_commas": CheckKind(no_commas),
    "paragraph_count": CheckKind(paragraph_count, {"count": int}),
    "title": CheckKind(title),
    "placeholder_count": CheckKind(placeholder_count, {"min": int}),
    "repeat_request": CheckKind(repeat_request, {"text_to_repeat": str}),
    "postscript": CheckKind(postscript, {"marker": str}),
    "quoted": CheckKind(quoted),
}


def validate(check: Any) -> tuple[str, str] | None:
    """(key, what is wrong) for a malformed check object, or None when it is usable."""
    if not isinstance(check, dict):
        return "", "expected an object with a `kind`"
    kind = check.get("kind")
    if not isinstance(kind, str) or kind not in CHECKS:  # a list or object is unhashable
        return "kind", f"unknown check kind {kind!r} (known: {', '.join(sorted(CHECKS))})"
    spec = CHECKS[kind]
    allowed = {"kind", *spec.required, *spec.optional}
    for key in check:
        if key not in allowed:
            return key, f"unknown parameter for {kind} (takes: {', '.join(sorted(allowed))})"
    for key in spec.required:
        if key not in check:
            return key, f"{kind} needs this parameter"
    for key, kind_type in {**spec.required, **spec.optional}.items():
        if key in check and not _type_ok(check[key], kind_type):
            return key, _type_error(kind_type)
    if spec.one_of and not any(k in check for k in spec.one_of):
        return spec.one_of[0], f"{kind} needs at least one of {', '.join(spec.one_of)}"
    return None


def _type_ok(value: Any, kind_type: type) -> bool:
    if kind_type is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind_type is list:
        return (isinstance(value, list) and bool(value)
                and all(isinstance(v, str) and v.strip() for v in value))
    return isinstance(value, str) and bool(value.strip())


def _type_error(kind_type: type) -> str:
    return {int: "expected a non-negative integer", list: "expected a non-empty list of strings",
            str: "expected a non-empty string"}[kind_type]


def run_check(check: dict[str, Any], text: str) -> bool:
    params = {k: v for k, v in check.items() if k != "kind"}
    return CHECKS[check["kind"]].fn(text, **params)


def loose_variants(text: str) -> list[str]:
    """The response, without its first line, without its last, without both; each of those
    also with markdown `*` removed. Empty variants are dropped (they would pass "absent"
    checks vacuously)."""
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    variants = cut + [v.replace("*", "") for v in cut]
    return [v for v in variants if v.strip()]


def check_strict_loose(check: dict[str, Any], text: str) -> tuple[bool, bool]:
    strict = run_check(check, text)
    return strict, strict or any(run_check(check, v) for v in loose_variants(text))
