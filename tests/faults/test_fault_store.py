"""Stage outputs are written atomically: a write cut short by a crash never counts as a finished
shard, never breaks a plain Parquet read of the table, and is swept when the stage resumes. A
file torn after its commit (a power loss) is moved aside and made again; a full disk ends the
run with our one-line error naming the file, also when a Ray worker hit it."""

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from dromedary_ray import cli
from dromedary_ray.config import PROJECT_ROOT, load_config
from dromedary_ray.data import store as store_module
from dromedary_ray.data.schemas import PromptRow, RejectRow
from dromedary_ray.data.store import StageStore, write_run_file
from dromedary_ray.errors import ConfigError, StoreFullError, user_error
from dromedary_ray.pipeline.driver import run_pipeline

CONFIG = str(PROJECT_ROOT / "configs/local.yaml")

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


class CrashingFS(pafs.LocalFileSystem):
    """A local filesystem whose next output stream writes half its bytes, then fails with
    `err` (a process killed mid-write, a disk that fills up)."""

    def __init__(self, err: OSError):
        super().__init__()
        self.err = err

    def open_output_stream(self, path, *args, **kwargs):
        real, err = super().open_output_stream(path, *args, **kwargs), self.err

        class HalfStream:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data: bytes) -> None:
                real.write(data[: len(data) // 2])
                raise err

        return HalfStream()


def crash_run_files(monkeypatch, err: OSError) -> None:
    monkeypatch.setattr(store_module, "_filesystem", lambda uri: (CrashingFS(err), uri))


ONE, TWO = b'{"stage": "one"}\n', b'{"stage": "two", "kept": 24, "rejected": 0}\n'


@pytest.mark.parametrize("name,append", [("metrics.jsonl", True), ("config.yaml", False)])
def test_run_file_write_cut_short_keeps_the_old_file(tmp_path: Path, monkeypatch, name, append):
    """A crash mid-write of metrics.jsonl (an append) or config.yaml leaves the file as it
    was, never half of it; the next write goes through whole."""
    write_run_file(str(tmp_path), name, ONE)
    crash_run_files(monkeypatch, OSError("killed mid-write"))
    with pytest.raises(OSError, match="killed mid-write"):
        write_run_file(str(tmp_path), name, TWO, append=append)
    monkeypatch.undo()
    assert (tmp_path / name).read_bytes() == ONE
    write_run_file(str(tmp_path), name, TWO, append=append)
    want = ONE + TWO if append else TWO
    assert (tmp_path / name).read_bytes() == want


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_on_a_run_file_names_it_and_keeps_it(tmp_path: Path, monkeypatch, code):
    write_run_file(str(tmp_path), "metrics.jsonl", b"one\n")
    crash_run_files(monkeypatch, OSError(code, os.strerror(code)))
    with pytest.raises(StoreFullError) as caught:
        write_run_file(str(tmp_path), "metrics.jsonl", b"two\n", append=True)
    monkeypatch.undo()
    message = str(caught.value)
    assert str(tmp_path / "metrics.jsonl") in message and socket.gethostname() in message
    assert ("quota" if code == errno.EDQUOT else "Free space on that disk") in message
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the space given back


def full_disk_shard(tmp_path: Path, monkeypatch) -> StoreFullError:
    """write_shard on a disk that fills up halfway through the file: our error."""
    store = StageStore(str(tmp_path), "s")
    store.write_shard(prompts(["a"]), rejects([]), "part-1")
    real_write = pq.write_table

    def fill_up(table, where, **kw):
        real_write(table, where, **kw)
        with open(where, "r+b") as f:
            f.truncate(os.path.getsize(where) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", fill_up)
    with pytest.raises(StoreFullError) as caught:
        store.write_shard(prompts(["b"]), rejects(["c"]), "part-2")
    monkeypatch.undo()
    assert store.committed_shards() == ["part-1"]
    assert not [p for p in (tmp_path / "s").rglob("*") if ".tmp-" in p.name]
    return caught.value


def test_full_disk_during_a_shard_write_is_our_error_naming_the_file(tmp_path, monkeypatch):
    err = full_disk_shard(tmp_path, monkeypatch)
    message = str(err)
    assert message.startswith("stage s: no space left on the device writing ")
    assert str(tmp_path / "s" / "rejects" / "part-2.parquet") in message  # written first
    assert "run the same command again" in message
    # It travels back from a Ray worker by pickle: whole, with its message.
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is StoreFullError and str(again) == message


def test_cli_prints_our_one_line_when_ray_wraps_a_workers_full_disk(tmp_path, monkeypatch,
                                                                     capsys):
    """`ray.get` raises a worker's error as Ray's task error, whose text is a whole traceback;
    the CLI prints our message alone, exit status 2."""
    from ray.exceptions import RayTaskError

    err = full_disk_shard(tmp_path, monkeypatch)
    wrapped = RayTaskError("GenerationActor.process", "Traceback (most recent call last):\n"
                           f"  ...\nStoreFullError: {err}", err).as_instanceof_cause()
    assert isinstance(wrapped, StoreFullError) and str(wrapped) != str(err)

    def run_pipeline(config):
        raise wrapped

    monkeypatch.setattr("dromedary_ray.pipeline.driver.run_pipeline", run_pipeline)
    rc = cli.main(["run", CONFIG, "--run-dir", str(tmp_path / "run")])
    assert rc == 2
    assert capsys.readouterr().err == f"error: {err}\n"


def test_only_rays_wrappers_are_looked_through():
    """A bug raised while handling one of our errors is shown as itself, not as ours."""
    try:
        try:
            raise ConfigError("x: bad")
        except ConfigError:
            raise KeyError("a bug")  # noqa: B904 (the implicit chain is the point)
    except KeyError as bug:
        assert user_error(bug) is None
    ours = ConfigError("x: bad")
    assert user_error(ours) is ours


def seeds_config(run_dir: Path):
    return load_config(CONFIG, [f"run_dir={run_dir}", "recipe=seeds_only"])


def test_torn_manifest_of_a_finished_stage_reruns_it(tmp_path: Path, caplog):
    """A finished stage's manifest torn to zero bytes: the stage must not pass for done, nor
    resume from shards whose config is unknown; it runs afresh, to the same rows."""
    (first,) = run_pipeline(seeds_config(tmp_path))
    manifest = tmp_path / "seeds" / "manifest.json"
    manifest.write_bytes(b"")
    with caplog.at_level("WARNING"):
        (again,) = run_pipeline(seeds_config(tmp_path))
    assert "manifest is unreadable" in caplog.text and str(manifest) in caplog.text
    assert again.status == "ran" and (again.kept, again.rejected) == (first.kept, first.rejected)
    assert '"status": "done"' in manifest.read_text()
    (third,) = run_pipeline(seeds_config(tmp_path))
    assert third.status == "skipped"


def test_torn_shard_of_a_finished_stage_is_made_again(tmp_path: Path, caplog):
    """A finished stage's shard torn to zero bytes: it is quarantined, and the stage, which
    would otherwise be skipped with the rows missing, resumes and makes them again."""
    (first,) = run_pipeline(seeds_config(tmp_path))
    assert first.kept > 0
    (shard,) = (tmp_path / "seeds" / "data").glob("*.parquet")
    shard.write_bytes(b"")
    with caplog.at_level("WARNING"):
        (again,) = run_pipeline(seeds_config(tmp_path))
    assert shard.stem in caplog.text and "quarantine" in caplog.text
    assert again.status == "ran" and again.kept == first.kept
    assert (tmp_path / "seeds" / "quarantine" / "data" / shard.name).exists()
    assert pq.read_table(tmp_path / "seeds" / "data").num_rows == first.kept


@pytest.mark.slow
def test_full_disk_in_a_ray_worker_reaches_the_cli_as_our_line(ray_local, tmp_path, monkeypatch,
                                                                capsys):
    """A real Ray worker's shard write hits ENOSPC: the driver gets Ray's task error back, and
    the CLI prints our one line naming the worker's file and host, exit status 2."""
    import ray

    def write_on_a_full_disk(store, kept, dropped):
        import errno

        import pyarrow.parquet as pq

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        real, pq.write_table = pq.write_table, full
        try:  # the worker process is reused by later tasks: put the real writer back
            store.write_shard(kept, dropped, "part-1")
        finally:
            pq.write_table = real

    task = ray.remote(num_cpus=0.1)(write_on_a_full_disk)
    ref = task.remote(StageStore(str(tmp_path), "s"), prompts(["a"]), rejects([]))
    monkeypatch.setattr("dromedary_ray.pipeline.driver.run_pipeline", lambda config: ray.get(ref))
    rc = cli.main(["run", CONFIG, "--run-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert lines[-1].startswith("error: stage s: no space left on the device writing "
                                f"{tmp_path / 's' / 'rejects' / 'part-1.parquet'} on host ")
    assert "Traceback" not in lines[-1] and "RayTaskError" not in lines[-1]
    assert StageStore(str(tmp_path), "s").committed_shards() == []
