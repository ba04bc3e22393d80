"""Parquet datasets of caches: a streaming sink that writes in the background, and reading
back with filters pushed down.

Layout: ``<path>/hook=<name>/part-<writer>-<n>.parquet``, one directory per hook point (its
tables have their own shapes). `hook` is the hive partition key, not a column in the files.
Each part is written under a hidden temporary name (".part-…", which dataset discovery
skips) and renamed once complete, so a reader never sees half a part; on a local disk the
part is fsynced before the rename, so that also holds after a crash. Tensor columns are
not dictionary-encoded; parts are zstd-compressed. Paths may be local or any pyarrow
filesystem URI (s3://bucket/prefix, …).
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardlens.errors import DatasetError, ParquetWriteError
from shardlens.tables.arrow import cache_to_tables, check_layout, schema_metadata, tables_to_cache
from shardlens.tables.cache import ActivationCache
from shardlens.tables.files import flush_to_disk

PARTITION = "hook"
TENSOR_COLUMNS = ("value", "indices", "values")  # a dense entry's value; a sparse entry's lists


def is_uri(path: str) -> bool:
    """Whether `path` names a pyarrow filesystem URI (s3://...) rather than a local path."""
    return "://" in path


def filesystem_and_root(path: Union[str, os.PathLike]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it, for a local path or a URI."""
    path = os.fspath(path)
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


@dataclass
class _Write:
    """One write in flight: its data (held until it is on disk), its parts and their jobs."""

    number: int
    data: Any
    name: Optional[str]
    paths: list[str] = field(default_factory=list)
    jobs: list[Future] = field(default_factory=list)


class ParquetSink:
    """Appends caches (or per-hook tables) to a hive-partitioned Parquet dataset, writing in
    the background while the caller computes the next batch.

    `write` turns a cache into one table per hook point (zero-copy for contiguous CPU
    tensors), hands the tables to `threads` writer threads and returns; pyarrow encodes
    without holding the GIL. Each write is all or nothing: when one of its parts fails,
    the parts it already wrote are deleted. A failure is raised, as ParquetWriteError
    (whose `.unwritten` holds the data), by the sink's next write, flush or close.

    Until a write's parts are on disk the sink holds its data: do not change its tensors in
    place before flush(). A torch in-place change is caught and fails that write.

    Args:
        path: the dataset's root, local or a pyarrow filesystem URI.
        metadata: JSON-serialisable fields stored in every part's schema metadata (model id,
            dtype, shard plan, specs, …), with the shardlens version.
        layout: "example" or "token" (see shardlens.tables.arrow).
        threads: parts written at once. Three keep two cores encoding while a third part
            waits for its fsync.
        max_pending: writes that may be in flight before `write` waits for the oldest; 0
            makes each write return only once its parts are published.
        compression: the Parquet codec ("zstd"; "none" trades size for speed).

    Example:
        >>> with sl.ParquetSink("runs/acts", metadata={"model": "gpt2"}) as sink:
        ...     for batch in batches:
        ...         _, cache = model.run_with_cache(batch)
        ...         sink.write(cache)
        ... # leaving the block waits for every part, and raises any failure
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        layout: str = "example",
        threads: int = 3,
        max_pending: int = 2,
        compression: str = "zstd",
    ):
        check_layout(layout)
        if threads < 1 or max_pending < 0:
            raise ValueError(f"ParquetSink needs threads >= 1 and max_pending >= 0; got threads={threads}, max_pending={max_pending}")
        self.fs, self.root = filesystem_and_root(path)
        self.fs.create_dir(self.root, recursive=True)
        self.metadata = schema_metadata(metadata)
        self.layout = layout
        self.compression = compression
        self.max_pending = max_pending
        self._writer = uuid.uuid4().hex[:12]
        self._count = 0
        self._writes = 0
        self._pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(threads, thread_name_prefix="ParquetSink")
        self._in_flight: deque[_Write] = deque()
        self._failed: list[tuple[_Write, BaseException]] = []
        self.parts: list[str] = []  # published parts, in the order of their writes

    def write(self, data: Union[ActivationCache, Mapping[str, pa.Table]], *, name: Optional[str] = None) -> list[str]:
        """Queue one part per hook point of `data`; returns the paths the parts will have.

        `name` names the parts (``<name>.parquet`` in each hook's directory), so that writing
        the same data again under its name replaces its parts instead of adding to them; by
        default each part gets a new name. Waits first while `max_pending` writes are in
        flight. Raises the failures of earlier writes (this one is then not queued, and is on
        the error's `.unwritten` too)."""
        if self._pool is None:
            raise ValueError(f"ParquetSink at {self.root} is closed; open a new one to write more")
        if name is not None:
            check_part_name(name)
        self._settle(keep=max(self.max_pending - 1, 0))
        while name is not None and any(w.name == name for w in self._in_flight):
            self._settle(keep=len(self._in_flight) - 1)  # one temporary file per name at a time
        self._raise_failures(also=data)
        tables = cache_to_tables(data, self.layout) if isinstance(data, ActivationCache) else dict(data)
        unchanged = _in_place_check(data, self.layout)
        self._writes += 1
        write = _Write(self._writes, data, name)
        for hook, table in tables.items():
            path, temporary = self._next_paths(hook, name)
            write.paths.append(path)
            write.jobs.append(self._pool.submit(self._write_part, table, path, temporary, unchanged))
        self._in_flight.append(write)
        if self.max_pending == 0:
            self._settle(keep=0)
            self._raise_failures()
        return list(write.paths)

    def flush(self) -> list[str]:
        """Wait until every write so far is on disk; returns all parts published. Raises
        ParquetWriteError naming the writes that failed."""
        self._settle(keep=0)
        self._raise_failures()
        return list(self.parts)

    def close(self) -> None:
        """flush(), then stop the writer threads (also when flush raises)."""
        if self._pool is None:
            return
        try:
            self.flush()
        finally:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _next_paths(self, hook: str, name: Optional[str] = None) -> tuple[str, str]:
        self._count += 1
        name = f"part-{self._writer}-{self._count:06d}.parquet" if name is None else f"{name}.parquet"
        directory = f"{self.root}/{PARTITION}={hook}"
        return f"{directory}/{name}", f"{directory}/.{name}.tmp"

    def _write_part(self, table: pa.Table, final: str, temporary: str, unchanged: Callable[[], None]) -> str:
        if PARTITION in table.column_names:
            table = table.drop_columns([PARTITION])  # the partition key lives in the path
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        try:
            scalar_columns = [c for c in table.column_names if c not in TENSOR_COLUMNS]
            pq.write_table(
                table, temporary, filesystem=self.fs, compression=self.compression,
                # Dictionaries and min/max statistics mean nothing for tensor values, and
                # computing them over every element costs more than the write itself.
                use_dictionary=scalar_columns, write_statistics=scalar_columns,
            )
            unchanged()
            if isinstance(self.fs, pafs.LocalFileSystem):
                flush_to_disk(temporary)
            self.fs.move(temporary, final)
        except BaseException:
            _delete_quietly(self.fs, temporary)
            raise
        return final

    def _settle(self, keep: int) -> None:
        """Account for finished writes, oldest first, waiting until at most `keep` are in flight."""
        while self._in_flight and (len(self._in_flight) > keep or all(j.done() for j in self._in_flight[0].jobs)):
            write = self._in_flight[0]
            wait(write.jobs)
            self._in_flight.popleft()  # only now: an interrupted wait leaves it to the next call
            failure = next((j.exception() for j in write.jobs if j.exception() is not None), None)
            if failure is None:
                self.parts += write.paths
            else:
                for job in write.jobs:
                    if job.exception() is None:
                        _delete_quietly(self.fs, job.result())
                self._failed.append((write, failure))

    def _raise_failures(self, also: Any = None) -> None:
        if not self._failed:
            return
        failed, self._failed = self._failed, []
        numbers = [w.number for w, _ in failed]
        first = failed[0][1]
        which = f"writes {', '.join(f'#{n}' for n in numbers)} failed and kept none of their parts" if len(numbers) > 1 \
            else f"write #{numbers[0]} failed and kept none of its parts"
        message = f"ParquetSink at {self.root}: {which}; the first failure: {type(first).__name__}: {first}."
        unwritten = [w.data for w, _ in failed]
        if also is not None:
            unwritten.append(also)
            message += " This write was not queued either."
        raise ParquetWriteError(message, writes=numbers, unwritten=unwritten) from first


def check_part_name(name: str) -> None:
    """Refuse a part name that is not a plain file name, or that dataset discovery skips."""
    if not name or "/" in name or "\\" in name or name[0] in "._":
        raise ValueError(f"a part name must be a file name that does not start with '.' or '_' (datasets skip those); got {name!r}")


def _in_place_check(data: Any, layout: str) -> Callable[[], None]:
    """A check that the tensors whose memory the tables of `data` share (contiguous CPU
    tensors in layout "example"; others were copied) were not changed in place since now
    (torch counts in-place changes in a tensor's version), so no part holds changed values."""
    if not isinstance(data, ActivationCache) or layout != "example":
        return lambda: None
    versions = [
        (name, tensor, tensor._version) for name, tensor in data.items() if tensor.device.type == "cpu" and tensor.is_contiguous()
    ]

    def unchanged() -> None:
        changed = [name for name, tensor, version in versions if tensor._version != version]
        if changed:
            raise RuntimeError(
                f"{', '.join(changed)} changed in place while being written; call the sink's "
                "flush() before changing a written cache's tensors"
            )

    return unchanged


def delete_parts(path: Union[str, os.PathLike], parts: Iterable[str]) -> None:
    """Delete parts (as ParquetSink.write returned them) of the dataset at `path`."""
    fs, _ = filesystem_and_root(path)
    for part in parts:
        _delete_quietly(fs, part)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


DATASET = ("a folder of Parquet parts, hook=<hook point>/<part>.parquet (as cache.to_parquet, sl.ParquetSink and a "
           "campaign's extract experiments write)")


def check_dataset(path: Union[str, os.PathLike]) -> None:
    """Refuse a local `path` that is not a shardlens Parquet dataset (see DATASET) with a
    DatasetError (FileNotFoundError where nothing is there), saying what it is instead: a
    file, a folder of other things, an activations dataset of Arrow files, or one with
    datasets in its subfolders (a campaign's output folder). An empty
    folder passes (an empty dataset). Names that start with "." or "_" are skipped, as dataset
    discovery skips them. URIs are not checked."""
    path = os.fspath(path)
    if is_uri(path):
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        raise DatasetError(f"{path}: a file, not a shardlens dataset: expected {DATASET}")
    stray = []  # what is not a part, as "name", "folder/" or "hook=x/name"
    for entry in _visible(path):
        if not (entry.is_dir() and entry.name.startswith(f"{PARTITION}=")):
            stray.append(entry.name + "/" * entry.is_dir())
            continue
        stray += [f"{entry.name}/{e.name}" for e in _visible(entry.path) if e.is_dir() or not e.name.endswith(".parquet")]
    if stray:
        raise DatasetError(f"{path}: not a shardlens dataset: expected {DATASET}; found {_found(path, stray)}")


def _visible(folder: str) -> list[os.DirEntry]:
    """The entries of `folder` that dataset discovery reads, by name."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith((".", "_"))), key=lambda e: e.name)


def _has_partitions(folder: str) -> bool:
    """Whether `folder` holds hook=<name>/ folders (is a dataset, say); False where it cannot be read."""
    try:
        return any(e.is_dir() and e.name.startswith(f"{PARTITION}=") for e in _visible(folder))
    except OSError:
        return False


def _found(root: str, stray: list[str]) -> str:
    """What a folder that is not a dataset holds (`stray`: what in it is no part), for
    check_dataset's message."""
    if os.path.exists(os.path.join(root, "manifest.json")) and any(f.endswith(".arrow") for f in stray):
        return "an activations dataset (manifest.json and Arrow files): read it with datasets.load_from_disk"
    folders = [f for f in stray if f.endswith("/") and not f.startswith(f"{PARTITION}=")]
    inside = [f for f in folders if _has_partitions(os.path.join(root, f))]
    if inside:
        return f"datasets in its subfolders {', '.join(inside)}: inspect one of those"
    return ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")


def dataset(path: Union[str, os.PathLike]) -> ds.Dataset:
    """The pyarrow dataset of a shardlens Parquet dataset (hook as the hive partition); a local
    path that is none is refused (see check_dataset)."""
    check_dataset(path)
    fs, root = filesystem_and_root(path)
    partitioning = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
    return ds.dataset(root, filesystem=fs, format="parquet", partitioning=partitioning)


def read_cache(
    path: Union[str, os.PathLike],
    *,
    hooks: Optional[Iterable[str]] = None,
    examples: Optional[Iterable[int]] = None,
    sparse: bool = False,
) -> ActivationCache:
    """Read a dataset written by ParquetSink / to_parquet back into an ActivationCache.

    The hook and example filters are pushed down to pyarrow.dataset, so only the matching
    partitions and row groups are read. Nothing is unpickled: reading runs no code.
    Entries cached sparsely (sl.ops.Cache(sparse=True) or top_k=k) come back as dense
    tensors, zero where nothing was kept, or with `sparse=True` as the sparse COO tensors
    they were (dense entries stay dense).
    """
    data = dataset(path)
    row_filter = None if examples is None else ds.field("example").isin([int(e) for e in examples])
    partition_filter = None if hooks is None else ds.field(PARTITION).isin(list(hooks))
    # Each hook point's parts are scanned on their own: hook points have their own value
    # shapes, so their schemas need not agree.
    by_hook: dict[str, list[pa.Table]] = {}
    for fragment in data.get_fragments(filter=partition_filter):
        hook = ds.get_partition_keys(fragment.partition_expression)[PARTITION]
        table = fragment.to_table(filter=row_filter)
        by_hook.setdefault(hook, []).append(table.append_column(PARTITION, pa.array([hook] * table.num_rows, pa.string())))
    merged: dict = {}
    mask = examples_seen = None
    for hook, tables in by_hook.items():
        try:
            table = pa.concat_tables(tables)
        except pa.ArrowInvalid:
            raise ValueError(
                f"the parts of hook={hook} differ in schema: a dataset holds one layout, and in layout "
                "'example' one padded length per hook point (use layout 'token' for ragged batches)"
            ) from None
        cache = tables_to_cache(table, sparse=sparse)
        merged.update(cache)
        mask = cache.attention_mask if cache.attention_mask is not None else mask
        examples_seen = cache.examples if examples_seen is None else examples_seen
    return ActivationCache(merged, attention_mask=mask, examples=examples_seen)
