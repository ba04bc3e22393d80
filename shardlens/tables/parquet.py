"""Parquet datasets of caches: a streaming sink, and reading back with filters pushed down.

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
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Optional, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from shardlens.tables.arrow import cache_to_tables, schema_metadata, tables_to_cache
from shardlens.tables.cache import ActivationCache

PARTITION = "hook"


def filesystem_and_root(path: Union[str, os.PathLike]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it, for a local path or a URI."""
    path = os.fspath(path)
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


class ParquetSink:
    """Appends caches (or per-hook tables) to a hive-partitioned Parquet dataset.

    Args:
        path: the dataset's root, local or a pyarrow filesystem URI.
        metadata: JSON-serialisable fields stored in every part's schema metadata (model id,
            dtype, shard plan, specs, …), with the shardlens version.
        layout: "example" or "token" (see shardlens.tables.arrow).
        threads: parts written at once (pyarrow encodes without holding the GIL).
        compression: the Parquet codec ("zstd"; "none" trades size for speed).

    Example:
        >>> with sl.ParquetSink("runs/acts", metadata={"model": "gpt2"}) as sink:
        ...     for batch in batches:
        ...         _, cache = model.run_with_cache(batch)
        ...         sink.write(cache)
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        *,
        metadata: Optional[Mapping[str, Any]] = None,
        layout: str = "example",
        threads: int = 2,
        compression: str = "zstd",
    ):
        self.fs, self.root = filesystem_and_root(path)
        self.fs.create_dir(self.root, recursive=True)
        self.metadata = schema_metadata(metadata)
        self.layout = layout
        self.compression = compression
        self._writer = uuid.uuid4().hex[:12]
        self._count = 0
        self._pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
        self.parts: list[str] = []

    def write(self, data: Union[ActivationCache, Mapping[str, pa.Table]]) -> list[str]:
        """Write one part per hook point; returns the parts' paths once all are complete. All
        or nothing: when one part fails, the parts this call already wrote are deleted."""
        tables = cache_to_tables(data, self.layout) if isinstance(data, ActivationCache) else dict(data)
        jobs = [(hook, table, self._next_name()) for hook, table in tables.items()]
        written: list[str] = []
        failure: Optional[BaseException] = None
        if self._pool is None:
            for job in jobs:
                try:
                    written.append(self._write_part(*job))
                except BaseException as error:
                    failure = error
                    break
        else:
            futures = [self._pool.submit(self._write_part, *job) for job in jobs]
            wait(futures)
            written = [f.result() for f in futures if f.exception() is None]
            failure = next((f.exception() for f in futures if f.exception() is not None), None)
        if failure is not None:
            for part in written:
                _delete_quietly(self.fs, part)
            raise failure
        self.parts += written
        return written

    def _next_name(self) -> str:
        self._count += 1
        return f"part-{self._writer}-{self._count:06d}.parquet"

    def _write_part(self, hook: str, table: pa.Table, name: str) -> str:
        if PARTITION in table.column_names:
            table = table.drop_columns([PARTITION])  # the partition key lives in the path
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **self.metadata})
        directory = f"{self.root}/{PARTITION}={hook}"
        self.fs.create_dir(directory, recursive=True)
        final, temporary = f"{directory}/{name}", f"{directory}/.{name}.tmp"
        try:
            scalar_columns = [c for c in table.column_names if c != "value"]
            pq.write_table(
                table, temporary, filesystem=self.fs, compression=self.compression,
                # Dictionaries and min/max statistics mean nothing for tensor values, and
                # computing them over every element costs more than the write itself.
                use_dictionary=scalar_columns, write_statistics=scalar_columns,
            )
            if isinstance(self.fs, pafs.LocalFileSystem):
                flush_to_disk(temporary)
            self.fs.move(temporary, final)
        except BaseException:
            _delete_quietly(self.fs, temporary)
            raise
        return final

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> "ParquetSink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def flush_to_disk(path: Union[str, os.PathLike]) -> None:
    """fsync a written part before its rename publishes it: otherwise a crash soon after
    can leave the final name pointing at a file whose bytes never reached the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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


def dataset(path: Union[str, os.PathLike]) -> ds.Dataset:
    """The pyarrow dataset of a shardlens Parquet dataset (hook as the hive partition)."""
    fs, root = filesystem_and_root(path)
    partitioning = ds.partitioning(pa.schema([(PARTITION, pa.string())]), flavor="hive")
    return ds.dataset(root, filesystem=fs, format="parquet", partitioning=partitioning)


def read_cache(
    path: Union[str, os.PathLike],
    *,
    hooks: Optional[Iterable[str]] = None,
    examples: Optional[Iterable[int]] = None,
) -> ActivationCache:
    """Read a dataset written by ParquetSink / to_parquet back into an ActivationCache.

    The hook and example filters are pushed down to pyarrow.dataset, so only the matching
    partitions and row groups are read. Nothing is unpickled: reading runs no code.
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
        cache = tables_to_cache(table)
        merged.update(cache)
        mask = cache.attention_mask if cache.attention_mask is not None else mask
        examples_seen = cache.examples if examples_seen is None else examples_seen
    return ActivationCache(merged, attention_mask=mask, examples=examples_seen)
