from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dromedary_ray.data.schemas import AnswerRow, BatchSummary, PromptRow, RejectRow, SelfAlignRow
from dromedary_ray.data.store import StageStore, fingerprint, shard_name

ROWS = {
    PromptRow: PromptRow("a", "seed", "What is 2+2?"),
    SelfAlignRow: SelfAlignRow("a", "q", "thinking", "answer", 10, 5, -1.5, "stop"),
    RejectRow: RejectRow("a", "self_align", "truncated", "text"),
    AnswerRow: AnswerRow("a", "q", "long answer", 12, 40, -0.5, "stop"),
    BatchSummary: BatchSummary("part-x", 4, 3, 1, 100, 50, 1700000000.5, 1.25, "node-1:4242"),
}


@pytest.mark.parametrize("cls", list(ROWS))
def test_rows_round_trip_through_arrow_and_parquet(cls, tmp_path: Path):
    row = ROWS[cls]
    table = cls.to_table([row, row])
    assert table.schema == cls.SCHEMA
    pq.write_table(table, tmp_path / "t.parquet")
    assert cls.from_table(pq.read_table(tmp_path / "t.parquet")) == [row, row]


@pytest.mark.parametrize("cls", list(ROWS))
def test_schema_matches_dataclass_fields(cls):
    import dataclasses

    assert cls.SCHEMA.names == [f.name for f in dataclasses.fields(cls)]


def test_wrong_types_are_refused_by_the_schema():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        SelfAlignRow.to_table([SelfAlignRow("a", "q", "t", "x", "ten", 5, -1.0, "stop")])


def _prompts(ids):
    return PromptRow.to_table([PromptRow(i, "seed", f"q{i}") for i in ids])


def _rejects(ids, reason="r"):
    return RejectRow.to_table([RejectRow(i, "s", reason, "") for i in ids])


@pytest.mark.parametrize("uri_style", [False, True])
def test_store_shards_commit_and_read_back(tmp_path: Path, uri_style: bool):
    run = f"file://{tmp_path}" if uri_style else str(tmp_path)
    store = StageStore(run, "stage")
    store.write_shard(_prompts(["a", "b"]), _rejects(["c"]), shard_name(["a", "b", "c"]))
    store.write_shard(_prompts(["d"]), _rejects([]), shard_name(["d"]))
    data = store.read("data", PromptRow.SCHEMA)
    assert sorted(data["id"].to_pylist()) == ["a", "b", "d"]
    assert store.read("rejects", RejectRow.SCHEMA)["id"].to_pylist() == ["c"]
    assert store.done_ids({"data": PromptRow.SCHEMA, "rejects": RejectRow.SCHEMA}) == {
        "a", "b", "c", "d"}


def test_pending_leaves_out_committed_ids(tmp_path: Path):
    store = StageStore(str(tmp_path), "s")
    store.write_shard(_prompts(["a"]), _rejects(["b"]), "part-1")
    todo, done = store.pending(_prompts(["a", "b", "c", "d"]),
                               {"data": PromptRow.SCHEMA, "rejects": RejectRow.SCHEMA})
    assert todo["id"].to_pylist() == ["c", "d"] and done == 2


def test_half_written_shard_is_not_committed(tmp_path: Path):
    store = StageStore(str(tmp_path), "s")
    # A crash after the rejects file and before the data file: rows must count as not done.
    store._write_table("rejects", "part-orphan", _rejects(["x"]))
    # A crash mid-write leaves only a temporary file, never a .parquet.
    (tmp_path / "s" / "data").mkdir(parents=True)
    (tmp_path / "s" / "data" / "part-y.parquet.tmp-1234").write_bytes(b"partial")
    assert store.committed_shards() == []
    assert store.read("rejects", RejectRow.SCHEMA).num_rows == 0
    assert store.drop_uncommitted() == 1
    assert not (tmp_path / "s" / "rejects" / "part-orphan.parquet").exists()


def test_repeated_ids_are_read_once_first_shard_wins(tmp_path: Path):
    store = StageStore(str(tmp_path), "s")
    first = PromptRow.to_table([PromptRow("a", "seed", "first")])
    second = PromptRow.to_table([PromptRow("a", "seed", "second"), PromptRow("b", "seed", "b")])
    store.write_shard(first, _rejects([]), "part-1")
    store.write_shard(second, _rejects([]), "part-2")
    rows = PromptRow.from_table(store.read("data", PromptRow.SCHEMA))
    assert [(r.id, r.query) for r in rows] == [("a", "first"), ("b", "b")]


def test_shard_name_depends_on_ids_not_order():
    assert shard_name(["a", "b"]) == shard_name(["b", "a"]) != shard_name(["a", "c"])


def test_manifest_and_clear(tmp_path: Path):
    store = StageStore(str(tmp_path), "s")
    assert store.read_manifest() is None
    store.write_manifest({"status": "done", "n": 1})
    assert store.read_manifest() == {"status": "done", "n": 1}
    store.clear()
    assert store.read_manifest() is None


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
