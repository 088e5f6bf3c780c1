"""Stage outputs are written atomically: a write cut short by a crash never counts as a finished
shard, never breaks a plain Parquet read of the table, and is swept when the stage resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore

SCHEMAS = {"data": PromptRow.SCHEMA, "rejects": RejectRow.SCHEMA}


def prompts(ids: list[str]) -> pa.Table:
    return PromptRow.to_table([PromptRow(i, "seed", f"question {i}") for i in ids])


def rejects(ids: list[str]) -> pa.Table:
    return RejectRow.to_table([RejectRow(i, "s", "too_short", "x") for i in ids])


def test_write_cut_short_is_not_a_shard(tmp_path: Path, monkeypatch):
    """pq.write_table raises after writing half a file: no shard, no visible file."""
    store = StageStore(str(tmp_path), "s")
    store.write_shard(prompts(["a"]), rejects([]), "part-1")
    real_write = pq.write_table

    def crash_midway(table, where, **kw):
        real_write(table, where, **kw)
        with open(where, "r+b") as f:  # keep the first half of the bytes, then "crash"
            f.truncate(os.path.getsize(where) // 2)
        raise OSError("disk gone")

    monkeypatch.setattr(pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk gone"):
        store.write_shard(prompts(["b"]), rejects(["c"]), "part-2")
    monkeypatch.undo()
    assert store.committed_shards() == ["part-1"]
    todo, done = store.pending(prompts(["a", "b", "c"]), SCHEMAS)
    assert todo["id"].to_pylist() == ["b", "c"] and done == 1
    # A user reading the folder as plain Parquet sees only finished files.
    assert pq.read_table(tmp_path / "s" / "data")["id"].to_pylist() == ["a"]
    assert pq.read_table(tmp_path / "s" / "rejects").num_rows == 0
    leftovers = [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]
    assert leftovers, "the crash should have left its temporary behind"
    store.drop_uncommitted()
    assert not [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]
    assert store.committed_shards() == ["part-1"]


def test_finished_manifest_survives_a_crashed_rewrite(tmp_path: Path, monkeypatch):
    """The manifest decides skip or resume: a crash while rewriting it keeps the old one."""
    store = StageStore(str(tmp_path), "s")
    store.write_manifest({"status": "running", "fingerprint": "f"})

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_manifest({"status": "done", "fingerprint": "f"})
    monkeypatch.undo()
    assert store.read_manifest() == {"status": "running", "fingerprint": "f"}


WRITER = """
import sys, pyarrow as pa
from dromedary_ray.data.store import StageStore
store = StageStore(sys.argv[1], "s")
big = pa.table({"id": [f"r{i}" for i in range(2_000_000)], "query": ["x" * 40] * 2_000_000})
print("writing", flush=True)
while True:
    store._write_table("data", "part-big", big)
"""


def test_sigkill_during_a_large_write_leaves_only_finished_shards(tmp_path: Path):
    """A real process SIGKILLed while it writes shards: every .parquet it left reads whole."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    temporaries = lambda: [p for p in (tmp_path / "s/data").glob("*") if ".tmp-" in p.name]  # noqa: E731
    finished = tmp_path / "s/data/part-big.parquet"
    for _ in range(1200):  # kill it while it rewrites a finished shard's temporary
        if finished.exists() and temporaries():
            break
        time.sleep(0.05)
    assert finished.exists() and temporaries(), "never caught the writer mid-write"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = StageStore(str(tmp_path), "s")
    # The finished shard reads whole, and so does the folder as a plain dataset, although
    # a torn temporary lies beside it.
    assert pq.read_table(finished).num_rows == 2_000_000
    assert pq.read_table(tmp_path / "s/data", columns=["id"]).num_rows == 2_000_000
    assert store.committed_shards() == []  # data without rejects: never a committed shard
    store.drop_uncommitted()
    assert not temporaries()
