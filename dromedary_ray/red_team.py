"""Question types for topic-guided red-teaming (Self-Align §3.1), loaded from a YAML file.

Self-Align seeds its red-teaming with 20 hand-written question types, each a kind of query an
assistant tends to get wrong (it cannot know the future, it has no body, ...). A type gives the
model a description, one example topic and one example question; the synthesize stage then
brainstorms more topics per type and writes questions for each (type, topic).

File format::

    name: tgrt-v1
    types:
      - name: future_events          # a lower-case identifier: it appears in row ids
        description: ...
        seed_topic: ...
        seed_question: ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dromedary_ray.config import resolve_path
from dromedary_ray.errors import InputFileError
from dromedary_ray.principles import _field, read_yaml

_TYPE_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class QuestionType:
    name: str  # identifier, used in row ids
    description: str
    seed_topic: str
    seed_question: str

    @property
    def title(self) -> str:
        """The name as words, for prompts: `future_events` -> `future events`."""
        return self.name.replace("_", " ")


def load_red_team_types(path: str | Path) -> tuple[QuestionType, ...]:
    """Load and validate a red-team types file; raise `InputFileError` naming file and key."""
    p = resolve_path(str(path))
    doc = read_yaml(p)
    _field(p, doc, "name", "")
    raw = _field(p, doc, "types", "", list)
    if not raw:
        raise InputFileError(str(p), "needs at least one question type", key="types")
    types, seen = [], set()
    for i, node in enumerate(raw):
        where = f"types[{i}]"
        name = _field(p, node, "name", where)
        if not _TYPE_NAME.fullmatch(name):
            raise InputFileError(str(p), f"must be lower-case letters, digits and _, got {name!r}",
                                 key=f"{where}.name")
        if name in seen:
            raise InputFileError(str(p), f"duplicate type name {name!r}", key=f"{where}.name")
        seen.add(name)
        types.append(QuestionType(
            name=name,
            description=" ".join(_field(p, node, "description", where).split()),
            seed_topic=_field(p, node, "seed_topic", where),
            seed_question=_field(p, node, "seed_question", where),
        ))
    return tuple(types)
