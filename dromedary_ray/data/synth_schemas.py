"""Tables internal to the synthesize stage: the requests of a round and their raw candidates.

The driver plans a round as `RequestRow`s, the generation workers turn each request into
`CandidateRow`s (one per parsed list item, unfiltered) and commit them to the round's own
sub-store, so a resumed stage re-reads finished rounds instead of sampling them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from dromedary_ray.data.schemas import Row

# What a request asks for; each phase has its own prompt template and parser.
PHASE_SELF_INSTRUCT = "self_instruct"  # continue a few-shot list of instructions
PHASE_BRAINSTORM = "brainstorm"  # list more topics for one red-team question type
PHASE_QUESTIONS = "questions"  # write questions of one type about one topic
PHASES = (PHASE_SELF_INSTRUCT, PHASE_BRAINSTORM, PHASE_QUESTIONS)


@dataclass(frozen=True)
class RequestRow(Row):
    """One generation request of a synthesis round, everything the worker needs to render it."""

    id: str  # e.g. si-r003-q0012, bs-future_events-r001-q00, tgrt-future_events-002
    phase: str  # one of PHASES
    round: int
    type_name: str  # red-team question type ("" for self-instruct)
    topic: str  # the topic questions are asked about (questions phase only)
    examples: list[str]  # few-shot instructions, or the topics known so far
    count: int  # how many new list items to ask for

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("id", pa.string()), ("phase", pa.string()), ("round", pa.int32()),
         ("type_name", pa.string()), ("topic", pa.string()),
         ("examples", pa.list_(pa.string())), ("count", pa.int32())]
    )


@dataclass(frozen=True)
class CandidateRow(Row):
    """One item parsed from a model continuation, before any filter ran."""

    id: str  # <request id>-<position>
    source: str  # self_instruct | tgrt
    kind: str  # instruction | topic | question
    round: int
    request_id: str
    position: int  # 1-based place in the parsed list
    type_name: str
    topic: str
    text: str
    truncated: bool  # the generation hit its token limit inside this item

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
         ("round", pa.int32()), ("request_id", pa.string()), ("position", pa.int32()),
         ("type_name", pa.string()), ("topic", pa.string()), ("text", pa.string()),
         ("truncated", pa.bool_())]
    )
