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


def test_commit_syncs_the_file_renames_it_then_syncs_its_folder(tmp_path: Path, monkeypatch):
    """A power loss after a commit must not lose or tear the shard: the bytes are fsynced
    before the rename, the folder (the rename itself) after it."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(
        ("replace", str(b))) or real_replace(a, b))
    store = StageStore(str(tmp_path), "s")
    store.write_shard(_prompts(["a"]), _rejects([]), "part-1")
    data = str(tmp_path / "s" / "data")
    i = events.index(("replace", f"{data}/part-1.parquet"))
    synced_tmp = events[i - 1]
    assert synced_tmp[0] == "fsync" and synced_tmp[1].startswith(f"{data}/.part-1.parquet.tmp-")
    assert events[i + 1] == ("fsync", data)
    assert [e for e in events if e[0] == "replace"] == [
        ("replace", str(tmp_path / "s" / "rejects" / "part-1.parquet")),
        ("replace", f"{data}/part-1.parquet")]  # rejects first: data commits the shard


@pytest.mark.parametrize("table,keep", [("data", 0.0), ("rejects", 0.5)])
def test_torn_shard_is_quarantined_and_its_rows_count_as_not_done(tmp_path: Path, caplog,
                                                                  table: str, keep: float):
    """A committed file torn after the fact (zero bytes after a power loss, half a file):
    reading moves the shard aside, warns naming it, and its rows are pending again."""
    store = StageStore(str(tmp_path), "s")
    store.write_shard(_prompts(["a"]), _rejects(["b"]), "part-1")
    store.write_shard(_prompts(["c"]), _rejects(["d"]), "part-2")
    torn = tmp_path / "s" / table / "part-2.parquet"
    torn.write_bytes(torn.read_bytes()[:int(torn.stat().st_size * keep)])
    schemas = {"data": PromptRow.SCHEMA, "rejects": RejectRow.SCHEMA}
    with caplog.at_level("WARNING"):
        todo, done = store.pending(_prompts(["a", "b", "c", "d"]), schemas)
    assert todo["id"].to_pylist() == ["c", "d"] and done == 2
    assert "part-2" in caplog.text and str(tmp_path / "s" / "quarantine") in caplog.text
    assert store.committed_shards() == ["part-1"]
    moved = sorted(p.relative_to(tmp_path / "s").as_posix()
                   for p in (tmp_path / "s" / "quarantine").rglob("*.parquet"))
    assert moved == ["quarantine/data/part-2.parquet", "quarantine/rejects/part-2.parquet"]
    # A user's plain read of the table works again, and a rewrite of the shard commits.
    assert pq.read_table(tmp_path / "s" / "data")["id"].to_pylist() == ["a"]
    store.write_shard(_prompts(["c"]), _rejects(["d"]), "part-2")
    assert store.done_ids(schemas) == {"a", "b", "c", "d"}


def test_whole_shard_of_another_schema_is_an_error_not_quarantined(tmp_path: Path):
    """Only unreadable files are moved aside: a whole file that does not fit the schema is a
    bug to show, and it stays where it is."""
    store = StageStore(str(tmp_path), "s")
    row = SelfAlignRow.to_table([ROWS[SelfAlignRow]])
    wrong = row.set_column(4, "prompt_tokens", pa.array(["ten"]))  # a string in an int column
    store.write_shard(wrong, _rejects([]), "part-1")
    with pytest.raises(pa.ArrowInvalid, match="ten"):
        store.read("data", SelfAlignRow.SCHEMA)
    assert store.committed_shards() == ["part-1"]
    assert not (tmp_path / "s" / "quarantine").exists()


def test_torn_manifest_reads_as_unreadable_not_done(tmp_path: Path, caplog):
    store = StageStore(str(tmp_path), "s")
    store.write_manifest({"status": "done", "fingerprint": "f"})
    manifest = tmp_path / "s" / "manifest.json"
    for torn in (b"", manifest.read_bytes()[:10], b"\xff\xfe"):
        manifest.write_bytes(torn)
        with caplog.at_level("WARNING"):
            assert store.read_manifest() == {"status": "unreadable"}
        assert str(manifest) in caplog.text
