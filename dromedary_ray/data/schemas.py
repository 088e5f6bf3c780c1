"""One explicit Arrow schema per stage table, with a typed row view (STYLE.md §5).

Rows carry a stable `id` so that a resumed or retried stage neither loses nor repeats a row.
`to_table(rows)` and `from_table(table)` round-trip between the dataclass and Arrow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa


class Row:
    """Mixin for table rows: `SCHEMA` lists the columns in the same order as the fields."""

    SCHEMA: ClassVar[pa.Schema]

    @classmethod
    def to_table(cls, rows: list[Any]) -> pa.Table:
        columns = {f.name: [getattr(r, f.name) for r in rows] for f in dataclasses.fields(cls)}
        return pa.Table.from_pydict(columns, schema=cls.SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table) -> list[Any]:
        table = table.select(cls.SCHEMA.names)
        return [cls(**row) for row in table.to_pylist()]

    @classmethod
    def empty(cls) -> pa.Table:
        return cls.SCHEMA.empty_table()


@dataclass(frozen=True)
class PromptRow(Row):
    """A prompt for the model to answer: from the seed file, self-instruct or red-teaming."""

    id: str
    source: str  # seed | self_instruct | tgrt
    query: str  # the whole user turn (instruction plus input)

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("query", pa.string())]
    )


@dataclass(frozen=True)
class SelfAlignRow(Row):
    """A principle-guided answer, its internal thoughts kept apart (the SFT data)."""

    id: str
    query: str
    thoughts: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    mean_logprob: float
    finish_reason: str

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("query", pa.string()),
            ("thoughts", pa.string()),
            ("answer", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
            ("mean_logprob", pa.float32()),
            ("finish_reason", pa.string()),
        ]
    )


@dataclass(frozen=True)
class AnswerRow(Row):
    """A plain (query, answer) pair, e.g. a verbose-cloning answer: SFT data without thoughts."""

    id: str
    query: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    mean_logprob: float
    finish_reason: str

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("query", pa.string()),
            ("answer", pa.string()),
            ("prompt_tokens", pa.int32()),
            ("completion_tokens", pa.int32()),
            ("mean_logprob", pa.float32()),
            ("finish_reason", pa.string()),
        ]
    )


@dataclass(frozen=True)
class AssessRow(Row):
    """An I-SHEEP self-assessment: one score per rubric for a (prompt, answer) pair."""

    id: str
    query: str
    answer: str
    answer_tokens: int
    rubrics: list[str]
    scores: list[float]  # a parsed grade, or the expected grade (method "expected")
    grades: list[str]  # the grade text the model wrote ("" for the expected-score method)
    kept: bool  # every score above the threshold: the pair goes on to fine-tuning

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [
            ("id", pa.string()),
            ("query", pa.string()),
            ("answer", pa.string()),
            ("answer_tokens", pa.int32()),
            ("rubrics", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
            ("grades", pa.list_(pa.string())),
            ("kept", pa.bool_()),
        ]
    )


@dataclass(frozen=True)
class RejectRow(Row):
    """A row a stage did not keep, with the reason and the text that was judged."""

    id: str
    stage: str
    reason: str
    detail: str

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
         ("detail", pa.string())]
    )


@dataclass(frozen=True)
class BatchSummary(Row):
    """What a generation worker returns to the driver for one batch (the files hold the rows)."""

    shard: str
    rows: int
    kept: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    started: float  # wall-clock time.time() when the worker began the batch
    seconds: float
    worker: str  # which engine actor made it (host:pid); batches in flight on one overlap

    SCHEMA: ClassVar[pa.Schema] = pa.schema(
        [("shard", pa.string()), ("rows", pa.int64()), ("kept", pa.int64()),
         ("rejected", pa.int64()), ("prompt_tokens", pa.int64()),
         ("completion_tokens", pa.int64()), ("started", pa.float64()),
         ("seconds", pa.float64()), ("worker", pa.string())]
    )
