"""The stage store: everything a run makes, under one run directory (local or any pyarrow fs URI).

Layout::

    <run>/<stage>/data/part-*.parquet      rows kept
    <run>/<stage>/rejects/part-*.parquet   rows dropped, with a reason
    <run>/<stage>/model/                   a Hugging Face folder (training stages)
    <run>/<stage>/manifest.json            fingerprints, counts, timings, status

Every file is committed whole or not at all: on a local disk it is written under a temporary
name, fsynced, renamed into place and its folder fsynced, so neither a crash nor a power loss
leaves a torn file under the real name; an object store publishes an object only when its
upload completes on close. Shard names derive from the row ids they hold: a retried batch
overwrites its own file instead of adding a second copy. Readers still drop repeated ids (first
shard wins), because a resumed run may batch the remaining rows differently.

Should a committed shard be unreadable all the same (a disk that lied about a flush, a file
damaged later), the reader moves it aside into `<stage>/quarantine/` with a warning, and its
rows count as not done, so the resumed stage makes them again. A full disk (ENOSPC, EDQUOT)
raises StoreFullError naming the file, never a raw OSError.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dromedary_ray.errors import DISK_FULL, StoreFullError

log = logging.getLogger(__name__)

TABLES = ("data", "rejects")
TMP_PREFIX = "."  # temporaries of atomic writes: hidden from readers, swept on resume
QUARANTINE = "quarantine"  # unreadable committed shards are moved here, out of the tables
UNREADABLE = "unreadable"  # read_manifest's status for a manifest that does not parse


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-able object (configs, input fingerprints)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def shard_name(ids: list[str]) -> str:
    """Deterministic shard name for a batch of row ids."""
    return "part-" + hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def write_run_file(run_dir: str, name: str, data: bytes, append: bool = False) -> None:
    """Write (or append to) a file at the top of the run directory, local or remote, whole or
    not at all: an append writes the old content plus `data` as a new file and renames it over
    the old one, so a crash or a full disk mid-write keeps the file as it was."""
    fs, root = _filesystem(run_dir)
    path = f"{root}/{name}"
    if append and fs.get_file_info(path).type != pafs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            data = f.read() + data  # object stores cannot append; run files are small
    commit_file(fs, path, lambda p: _write_stream(fs, p, data))


def _write_stream(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def commit_file(fs: pafs.FileSystem, path: str, write: Callable[[str], None],
                stage: str | None = None) -> None:
    """Make `path` by `write(some_path)`, atomically and durably (see the module docstring).
    Thread-safe for distinct paths: each write has its own temporary."""
    folder, base = path.rsplit("/", 1)
    try:
        fs.create_dir(folder, recursive=True)
        if not isinstance(fs, pafs.LocalFileSystem):
            write(path)  # published on close, whole; an object store has no folder to sync
            return
        # A leading dot: pyarrow's dataset discovery skips dot-files, so a plain
        # `pq.read_table(<stage>/data)` never trips over a half-written temporary (it raised
        # "magic bytes not found" on one); `drop_uncommitted` deletes those a crash left.
        tmp = f"{folder}/{TMP_PREFIX}{base}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write(tmp)
            _fsync(tmp)  # the bytes reach the disk before the name does
            os.replace(tmp, path)
        except OSError as err:
            if err.errno in DISK_FULL and os.path.exists(tmp):
                os.remove(tmp)  # give the space back; other temporaries wait for the sweep
            raise
        _fsync(folder)  # the rename itself survives a power loss
    except OSError as err:
        if err.errno in DISK_FULL:
            raise StoreFullError(path, err.errno, stage, socket.gethostname()) from err
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems cannot fsync a folder (EINVAL); the file itself was synced.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP) or not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


class StageStore:
    """One stage's folder in the run directory. Picklable: Ray workers write shards with it."""

    def __init__(self, run_dir: str, stage: str):
        self.run_dir, self.stage = run_dir, stage
        self.fs, root = _filesystem(run_dir)
        self.root = f"{root}/{stage}"
        self.quarantined = 0  # shards this object moved aside

    def __reduce__(self):
        return (StageStore, (self.run_dir, self.stage))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def model_dir(self) -> str:
        return f"{self.root}/model"

    def _write_bytes_atomic(self, path: str, write: Callable[[str], None]) -> None:
        commit_file(self.fs, path, write, stage=self.stage)

    def _write_table(self, table_name: str, name: str, table: pa.Table) -> None:
        path = f"{self.root}/{table_name}/{name}.parquet"
        self._write_bytes_atomic(path, lambda p: pq.write_table(table, p, filesystem=self.fs))

    def write_shard(self, kept: pa.Table, rejects: pa.Table, name: str) -> None:
        """Write one batch's kept and rejected rows. The data file goes last: its presence
        is what commits the shard, so a crash between the two writes leaves no committed half."""
        self._write_table("rejects", name, rejects)
        self._write_table("data", name, kept)

    def _names(self, table_name: str) -> dict[str, str]:
        selector = pafs.FileSelector(f"{self.root}/{table_name}", allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return {
            i.base_name.removesuffix(".parquet"): i.path
            for i in infos
            if i.base_name.endswith(".parquet")
        }

    def committed_shards(self) -> list[str]:
        return sorted(set(self._names("data")) & set(self._names("rejects")))

    def drop_uncommitted(self) -> int:
        """Delete half-written shards (rejects without data) and the temporaries of writes a
        crash cut short; returns the number of shards dropped."""
        orphans = set(self._names("rejects")) - set(self._names("data"))
        for name in orphans:
            self.fs.delete_file(self._names("rejects")[name])
        for path in self._temporaries():
            self.fs.delete_file(path)
        return len(orphans)

    def _temporaries(self) -> list[str]:
        found = []
        for folder in (self.root, *(f"{self.root}/{t}" for t in TABLES)):
            selector = pafs.FileSelector(folder, allow_not_found=True)
            found += [i.path for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.base_name.startswith(TMP_PREFIX)
                      and ".tmp-" in i.base_name]
        return found

    def read(
        self, table_name: str, schema: pa.Schema, columns: list[str] | None = None
    ) -> pa.Table:
        """All committed shards of a table, each id once (first shard in name order wins).
        An unreadable shard is quarantined (`quarantine`) and left out: its rows are not done."""
        assert table_name in TABLES, table_name
        paths = self._names(table_name)
        tables = []
        for name in self.committed_shards():
            try:
                tables.append(pq.read_table(paths[name], filesystem=self.fs, schema=schema,
                                            columns=columns))
            except (pa.ArrowInvalid, OSError) as err:
                if self._readable(paths[name]):
                    raise  # a whole file that does not fit `schema`: a bug, not a torn shard
                self.quarantine(name, err)
        if not tables:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return _first_per_id(pa.concat_tables(tables))

    def _readable(self, path: str) -> bool:
        try:
            with self.fs.open_input_file(path) as f:
                pq.ParquetFile(f).read()
        except (pa.ArrowInvalid, OSError):
            return False
        return True

    def quarantine(self, name: str, why: BaseException | str) -> str:
        """Move shard `name` (its data file first, which uncommits it, then its rejects) into
        `<stage>/quarantine/<table>/`; returns that folder. Its rows then count as not done."""
        folder = f"{self.root}/{QUARANTINE}"
        for table_name in ("data", "rejects"):
            source = f"{self.root}/{table_name}/{name}.parquet"
            if self.fs.get_file_info(source).type == pafs.FileType.NotFound:
                continue
            self.fs.create_dir(f"{folder}/{table_name}", recursive=True)
            self.fs.move(source, f"{folder}/{table_name}/{name}.parquet")
        self.quarantined += 1
        log.warning("stage %s: committed shard %s is unreadable (%s), torn by a crash or a "
                    "power loss; moved it to %s/ and its rows will be made again",
                    self.stage, name, why, folder)
        return folder

    def done_ids(self, schemas: dict[str, pa.Schema]) -> set[str]:
        """Ids already committed to any table of this stage: these need no more work."""
        while True:
            quarantined = self.quarantined
            done: set[str] = set()
            for table_name, schema in schemas.items():
                done.update(self.read(table_name, schema, columns=["id"])["id"].to_pylist())
            # A shard moved aside while reading a later table may have given ids to an
            # earlier one: read again without it.
            if self.quarantined == quarantined:
                return done

    def pending(self, rows: pa.Table, schemas: dict[str, pa.Schema]) -> tuple[pa.Table, int]:
        """The rows of `rows` whose ids this stage has not committed yet, and how many it has."""
        done = self.done_ids(schemas)
        keep = pa.array([i not in done for i in rows["id"].to_pylist()], type=pa.bool_())
        return rows.filter(keep), len(done)

    def write_table(self, table: pa.Table, rejects: pa.Table) -> None:
        """A stage whose output is made in one go (no batches) writes it as a single shard."""
        self.write_shard(table, rejects, "part-all")

    def read_manifest(self) -> dict[str, Any] | None:
        """The stage's manifest; None if it has none. One that does not parse (torn) reads as
        `{"status": UNREADABLE}`: which config made the shards is then unknown, and the
        driver starts the stage afresh rather than trust them or skip it."""
        path = f"{self.root}/manifest.json"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            blob = f.read()
        try:
            manifest = json.loads(blob.decode())
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError alike
            log.warning("stage %s: %s is unreadable (%s, %d bytes), torn by a crash or a power "
                        "loss", self.stage, path, err, len(blob))
            return {"status": UNREADABLE}
        return manifest if isinstance(manifest, dict) else {"status": UNREADABLE}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()

        def write(p: str) -> None:
            with self.fs.open_output_stream(p) as f:
                f.write(blob)

        self._write_bytes_atomic(f"{self.root}/manifest.json", write)

    def clear(self) -> None:
        """Remove everything this stage wrote (its config or inputs changed)."""
        if self.fs.get_file_info(self.root).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.root)


def _first_per_id(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    ids = table["id"]
    if pc.count_distinct(ids).as_py() == table.num_rows:
        return table
    seen: set[str] = set()
    keep = []
    for value in ids.to_pylist():
        keep.append(value not in seen)
        seen.add(value)
    return table.filter(pa.array(keep))
