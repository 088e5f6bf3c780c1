"""The stage store: everything a run makes, under one run directory (local or any pyarrow fs URI).

Layout::

    <run>/<stage>/data/part-*.parquet      rows kept
    <run>/<stage>/rejects/part-*.parquet   rows dropped, with a reason
    <run>/<stage>/model/                   a Hugging Face folder (training stages)
    <run>/<stage>/manifest.json            fingerprints, counts, timings, status

Shards are written atomically (a temporary name, then a rename on local disks; object stores
publish a single PUT atomically), so a partial file is never taken for a finished shard. Shard
names derive from the row ids they hold: a retried batch overwrites its own file instead of
adding a second copy. Readers still drop repeated ids (first shard wins), because a resumed run
may batch the remaining rows differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TABLES = ("data", "rejects")
TMP_PREFIX = "."  # temporaries of atomic writes: hidden from readers, swept on resume


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
    """Write (or append to) a file at the top of the run directory, local or remote."""
    fs, root = _filesystem(run_dir)
    fs.create_dir(root, recursive=True)
    path = f"{root}/{name}"
    if append and fs.get_file_info(path).type != pafs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            data = f.read() + data  # object stores cannot append; run files are small
    with fs.open_output_stream(path) as f:
        f.write(data)


class StageStore:
    """One stage's folder in the run directory. Picklable: Ray workers write shards with it."""

    def __init__(self, run_dir: str, stage: str):
        self.run_dir, self.stage = run_dir, stage
        self.fs, root = _filesystem(run_dir)
        self.root = f"{root}/{stage}"

    def __reduce__(self):
        return (StageStore, (self.run_dir, self.stage))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def model_dir(self) -> str:
        return f"{self.root}/model"

    def _write_bytes_atomic(self, path: str, write) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if not self.is_local:
            write(path)
            return
        folder, base = path.rsplit("/", 1)
        # A leading dot: pyarrow's dataset discovery skips dot-files, so a plain
        # `pq.read_table(<stage>/data)` never trips over a half-written temporary (it raised
        # "magic bytes not found" on one); `drop_uncommitted` deletes those a crash left.
        tmp = f"{folder}/{TMP_PREFIX}{base}.tmp-{uuid.uuid4().hex[:8]}"
        write(tmp)
        os.replace(tmp, path)

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
        """All committed shards of a table, each id once (first shard in name order wins)."""
        assert table_name in TABLES, table_name
        paths = self._names(table_name)
        tables = [
            pq.read_table(paths[n], filesystem=self.fs, schema=schema, columns=columns)
            for n in self.committed_shards()
        ]
        if not tables:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        return _first_per_id(pa.concat_tables(tables))

    def done_ids(self, schemas: dict[str, pa.Schema]) -> set[str]:
        """Ids already committed to any table of this stage: these need no more work."""
        done: set[str] = set()
        for table_name, schema in schemas.items():
            done.update(self.read(table_name, schema, columns=["id"])["id"].to_pylist())
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
        path = f"{self.root}/manifest.json"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

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
