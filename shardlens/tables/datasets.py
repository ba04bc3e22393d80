"""Activation datasets for training dictionaries (sparse autoencoders, transcoders):
shuffled token rows of several hook points, written as Arrow files that Hugging Face
`datasets` and SAELens read.

A dataset folder is laid out as `datasets.Dataset.save_to_disk` lays one out:

    data-00000-of-00008.arrow ...   the data files (datasets calls them shards): Arrow IPC
                                    streams, one record batch each, uncompressed, which
                                    datasets memory-maps
    dataset_info.json, state.json   the features and the list of files that
                                    `datasets.load_from_disk` reads; written by close()
    manifest.json                   the spec, the caller's metadata, and each finished
                                    file's name, rows, bytes and sha256

Rows and columns. One row per token. Each hook point is a column named by the hook point,
of datasets' feature `Array2D(shape=(1, width), dtype)`: the hook point's values at one
token, flattened (manifest.json keeps their shape). That is the feature SAELens's
CacheActivationsRunner writes (a hook point's name as the column, a [context, d_in] array
per row), with a context of one token, so SAELens's ActivationsStore reads a hook point of
the folder as cached activations with `context_size=1, d_in=width`. With provenance, also
`token_ids` (`List(int32, length=1)`: SAELens's column, which it uses to drop special
tokens), `example` (int64) and `pos` (int32). float16 and float32 are stored as such;
bfloat16 as its uint16 bits (datasets has no bfloat16), which SAELens reads as integers
(1.0 as 16256.0): read them back with `shardlens.tables.dtypes.from_numpy(values,
"bfloat16")`, or write float32 (exact for bfloat16 values) for SAELens.

Shuffling. Rows are numbered in the order they are written. The rows of group g (rows
[g * shuffle_buffer, (g + 1) * shuffle_buffer)) are put in the order
`numpy.random.default_rng([seed, g]).permutation(rows of the group)` and cut into files of
shard_rows rows. A dataset therefore depends on the rows, their order, the seed, shard_rows
and shuffle_buffer alone, not on how the rows were split into write() calls. Row i of every
hook point (and of the provenance columns) is the same token.

Crashes and resuming. A file is written under a hidden temporary name, synced to disk and
renamed; it is finished once manifest.json (replaced atomically after each file) lists it
with its sha256. A DatasetWriter opened on a folder written with the same spec and metadata
keeps the finished files: `next_row` is the first row it still needs (the start of the
first group with an unfinished file); it skips rows before that (see `write`'s `row`) and
rewrites only unfinished files. `verify_dataset` checks a folder against its manifest.

Speed. Rows are scattered into their shuffled places as they arrive (one copy, which the
shuffle needs); a file's columns are Arrow arrays over those buffers without a copy,
written uncompressed by a background thread while the next group fills; written files are
hashed (two at once) and synced by other threads. sha256 (hashlib, about 2 GB/s per core)
is the costliest step, hidden only where cores are to spare, and sequential within a file.
Measured on 2 cores (bench/dictionary_write.py, 512 MB of fp16 rows): files of 16384 rows
are written at 1.08x the speed of numpy's tofile of the same bytes without checksums and at
0.78x with them (sha256 costs about 30% of the speed); files of 65536 rows (an activations
campaign's default) at 0.54x with checksums, where one file's hash (0.18 s on one core)
lies on the critical path. `checksum=False` skips the hashing; hashing on the writer
thread, or as the bytes are written, was slower.

Reading: `datasets.load_from_disk(folder)`. Its numpy and torch formats turn float16 into
float32 (exactly; `.half()` turns it back); `with_format(..., dtype=)` would cast the
integer columns too.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from shardlens.errors import DatasetError
from shardlens.tables.dtypes import field_metadata, to_numpy
from shardlens.tables.files import flush_to_disk, write_json_atomic

FORMAT = "shardlens.dataset/1"
MANIFEST = "manifest.json"
PROVENANCE = ("token_ids", "example", "pos")
# name -> (torch dtype, Arrow storage type, datasets' dtype name, numpy storage dtype)
DTYPES = {
    "float16": (torch.float16, pa.float16(), "float16", np.float16),
    "float32": (torch.float32, pa.float32(), "float32", np.float32),
    "bfloat16": (torch.bfloat16, pa.uint16(), "uint16", np.uint16),  # datasets has no bfloat16: its bits
}
_ARRAY2D = b"datasets.features.features.Array2DExtensionType"
_MAX_VALUES = 2**31 - 1  # datasets' Array2D stores list<list<...>>: int32 offsets per file
_SHUFFLE = "numpy.random.default_rng([seed, group]).permutation(rows of the group)"
_UNSYNCED = 3  # files written but not yet synced, at most
_HASH_THREADS = 2  # files hashed at once: sha256 runs at about 2 GB/s per core
_PROVENANCE_TYPES = {"token_ids": np.int32, "example": np.int64, "pos": np.int32}


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"{name} must be an int >= {minimum}; got {value!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """What an activation dataset holds and how its rows are shuffled and cut into files.

    Args:
        hooks: hook point -> the shape of its values at one token ([d_model], or [head,
            d_head] for hook_z); a column per hook point, in this order.
        rows: the dataset's rows (tokens), known before writing, as in the files' names.
        dtype: "float16", "float32" or "bfloat16" (stored as its uint16 bits).
        shard_rows: rows per file (datasets' word for a data file is shard; the last file
            holds what is left).
        shuffle_buffer: rows shuffled together: a multiple of shard_rows (default
            shard_rows); the writer holds up to two such buffers.
        seed: the shuffle's seed.
        provenance: add token_ids, example and pos columns.

    Example:
        >>> spec = DatasetSpec({"blocks.3.hook_resid_post": [768]}, n_tokens, shard_rows=65536, seed=1)
    """

    hooks: Any
    rows: int
    _: KW_ONLY
    dtype: str = "float16"
    shard_rows: int = 65536
    shuffle_buffer: Optional[int] = None
    seed: int = 0
    provenance: bool = True

    def __post_init__(self):
        try:  # a mapping, or (name, shape) pairs as the field holds them (dataclasses.replace)
            hooks = dict(self.hooks)
        except (TypeError, ValueError):
            hooks = {}
        if not hooks:
            raise DatasetError(f"hooks must be a non-empty mapping of hook point -> shape; got {self.hooks!r}")
        object.__setattr__(self, "hooks", tuple((str(name), _shape(name, shape)) for name, shape in hooks.items()))
        if self.shuffle_buffer is None:
            object.__setattr__(self, "shuffle_buffer", self.shard_rows)
        self._check()

    def _check(self) -> None:
        _positive("rows", self.rows)
        _positive("shard_rows", self.shard_rows)
        _positive("shuffle_buffer", self.shuffle_buffer)
        _positive("seed", self.seed, 0)
        if self.dtype not in DTYPES:
            raise DatasetError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.shuffle_buffer % self.shard_rows:
            raise DatasetError(f"shuffle_buffer must be a multiple of shard_rows={self.shard_rows}; got {self.shuffle_buffer}")
        for name, width in self.widths.items():
            if name in PROVENANCE:
                raise DatasetError(f"a hook point may not be named {name!r}, a provenance column")
            if self.shard_rows * width > _MAX_VALUES:
                raise DatasetError(f"shard_rows={self.shard_rows} x {width} values of {name} exceeds the 2**31 - 1 values a file's column "
                                   f"holds (datasets' int32 offsets): use shard_rows <= {_MAX_VALUES // width}")

    @property
    def widths(self) -> dict[str, int]:
        """Hook point -> values per token (the product of its shape)."""
        return {name: int(np.prod(shape)) for name, shape in self.hooks}

    @property
    def n_files(self) -> int:
        return -(-self.rows // self.shard_rows)

    def file_name(self, index: int) -> str:
        return f"data-{index:05d}-of-{self.n_files:05d}.arrow"

    def group_range(self, group: int) -> tuple[int, int]:
        """The rows [start, stop) of a shuffle group."""
        start = group * self.shuffle_buffer
        return start, min(start + self.shuffle_buffer, self.rows)

    def group_files(self, group: int) -> range:
        """The indices of a shuffle group's files."""
        start, stop = self.group_range(group)
        return range(start // self.shard_rows, -(-stop // self.shard_rows))

    def permutation(self, group: int) -> np.ndarray:
        """Output row j of the group holds the group's input row permutation(group)[j]."""
        start, stop = self.group_range(group)
        return np.random.default_rng([self.seed, group]).permutation(stop - start)

    def to_json(self) -> dict:
        return {
            "rows": self.rows, "dtype": self.dtype, "shard_rows": self.shard_rows, "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed, "shuffle": _SHUFFLE, "provenance": list(PROVENANCE) if self.provenance else [],
            "hooks": [{"name": name, "shape": list(shape), "dtype": self.dtype, "column": {"feature": "Array2D", "shape": [1, self.widths[name]],
                                                                                           "dtype": DTYPES[self.dtype][2]}}
                      for name, shape in self.hooks],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> DatasetSpec:
        return cls({h["name"]: tuple(h["shape"]) for h in data["hooks"]}, data["rows"], dtype=data["dtype"], shard_rows=data["shard_rows"],
                   shuffle_buffer=data["shuffle_buffer"], seed=data["seed"], provenance=bool(data["provenance"]))


def _shape(name: Any, shape: Any) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise DatasetError(f"the shape of {name} must be positive ints (its values at one token, e.g. [768]); got {shape!r}")
    return shape


@dataclass(frozen=True)
class DatasetFile:
    """One finished data file: its index, name, rows, bytes and sha256 (None: not hashed)."""

    index: int
    file: str
    rows: int
    bytes: int
    sha256: Optional[str]


@dataclass(frozen=True)
class DatasetManifest:
    """What manifest.json says: the spec, the caller's metadata, the finished files (by
    index) and whether the dataset is complete (close() wrote datasets' files)."""

    spec: DatasetSpec
    metadata: Mapping = field(default_factory=dict)
    files: tuple = ()  # DatasetFile, by index
    complete: bool = False

    @property
    def finished_rows(self) -> int:
        """The rows of the leading groups whose files are all finished: a writer resumes here."""
        done = {f.index for f in self.files}
        group = 0
        while group * self.spec.shuffle_buffer < self.spec.rows and all(i in done for i in self.spec.group_files(group)):
            group += 1
        return min(group * self.spec.shuffle_buffer, self.spec.rows)

    def to_json(self) -> dict:
        return {"format": FORMAT, **self.spec.to_json(), "metadata": dict(self.metadata), "complete": self.complete,
                "files": [vars(f) for f in self.files]}

    @classmethod
    def from_json(cls, data: Mapping) -> DatasetManifest:
        if data.get("format") != FORMAT:
            raise DatasetError(f"manifest format {data.get('format')!r} is not {FORMAT!r}")
        return cls(DatasetSpec.from_json(data), data.get("metadata", {}), tuple(DatasetFile(**f) for f in data["files"]), data["complete"])


def read_manifest(path: Union[str, os.PathLike]) -> DatasetManifest:
    """The manifest of the activation dataset in folder `path`."""
    file = Path(path) / MANIFEST
    if not file.exists():
        raise DatasetError(f"{path} has no {MANIFEST}: not an activation dataset (or none of it was started)")
    return DatasetManifest.from_json(json.loads(file.read_text()))


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The sha256 of a file, hashed from a memory map (no copy; hashlib releases the GIL).
    The map is populated at once (Linux): faulting it in page by page costs a tenth more."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            with mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mapped:
                digest.update(mapped)
    return digest.hexdigest()


def verify_dataset(path: Union[str, os.PathLike]) -> DatasetManifest:
    """Check every finished file of the dataset at `path` against its manifest (present,
    size, sha256); raises DatasetError naming the first file that differs.

    Example:
        >>> sl.verify_dataset("out/sae_data").complete
        True
    """
    manifest = read_manifest(path)
    for listed in manifest.files:
        file = Path(path) / listed.file
        if not file.exists():
            raise DatasetError(f"file {listed.file} is missing; the manifest lists it with {listed.rows} rows")
        size = file.stat().st_size
        if size != listed.bytes:
            raise DatasetError(f"file {listed.file} has {size} bytes; the manifest says {listed.bytes}")
        if listed.sha256 is not None and (digest := file_sha256(file)) != listed.sha256:
            raise DatasetError(f"file {listed.file} has sha256 {digest}; the manifest says {listed.sha256}: it changed after it was written")
    return manifest


# ---------------------------------------------------------------------- datasets' files


def _features(spec: DatasetSpec) -> dict:
    """The datasets features of the columns, as dataset_info.json spells them."""
    storage = DTYPES[spec.dtype][2]
    features = {name: {"shape": [1, width], "dtype": storage, "_type": "Array2D"} for name, width in spec.widths.items()}
    if spec.provenance:
        features["token_ids"] = {"feature": {"dtype": "int32", "_type": "Value"}, "length": 1, "_type": "List"}
        features["example"] = {"dtype": "int64", "_type": "Value"}
        features["pos"] = {"dtype": "int32", "_type": "Value"}
    return features


def _schema(spec: DatasetSpec) -> pa.Schema:
    """The files' schema: datasets' Array2D extension named in the field metadata (so this
    module needs no datasets), bfloat16 marked as in shardlens.tables.arrow."""
    storage_type, storage = DTYPES[spec.dtype][1], DTYPES[spec.dtype][2]
    fields = []
    for name, width in spec.widths.items():
        metadata = {b"ARROW:extension:name": _ARRAY2D, b"ARROW:extension:metadata": json.dumps([[1, width], storage]).encode(),
                    **field_metadata(DTYPES[spec.dtype][0])}
        fields.append(pa.field(name, pa.list_(pa.list_(storage_type)), metadata=metadata))
    if spec.provenance:
        fields += [pa.field("token_ids", pa.list_(pa.int32(), 1)), pa.field("example", pa.int64()), pa.field("pos", pa.int32())]
    return pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": _features(spec)}}).encode()})


def _array2d(values: np.ndarray, storage_type: pa.DataType) -> pa.Array:
    """values [n, width] (C-contiguous) as datasets' Array2D (1, width) storage, without a copy."""
    n, width = values.shape
    flat = pa.Array.from_buffers(storage_type, n * width, [None, pa.py_buffer(values)])
    inner_offsets = pa.py_buffer(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    inner = pa.Array.from_buffers(pa.list_(storage_type), n, [None, inner_offsets], children=[flat])
    return pa.Array.from_buffers(pa.list_(pa.list_(storage_type)), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32))], children=[inner])


def _record_batch(spec: DatasetSpec, schema: pa.Schema, columns: Mapping[str, np.ndarray]) -> pa.RecordBatch:
    storage_type = DTYPES[spec.dtype][1]
    arrays = [_array2d(columns[name], storage_type) for name, _ in spec.hooks]
    if spec.provenance:
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(columns["token_ids"]), 1))
        arrays += [pa.array(columns["example"]), pa.array(columns["pos"])]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------------- the writer


@dataclass
class _Group:
    """A shuffle group being filled: each arriving row is copied straight to its shuffled place."""

    index: int
    rows: int
    inverse: np.ndarray  # int64 [rows]: the output row of each of the group's input rows
    columns: dict  # column -> numpy [capacity, width] (hook points) or [capacity] (provenance)
    filled: int = 0

    def put(self, values: Mapping[str, np.ndarray]) -> None:
        n = len(next(iter(values.values())))
        places = self.inverse[self.filled:self.filled + n]
        for name, array in values.items():
            # numpy's scatter: one core at memory speed, holding the GIL only while the other
            # threads are in Arrow, hashlib or the kernel (torch's is slower here, and its
            # OpenMP threads spin on the core the hash needs).
            self.columns[name][places] = array
        self.filled += n


class DatasetWriter:
    """Writes an activation dataset (see the module docstring) from batches of token rows.

    Args:
        path: the dataset's folder (local). A folder with a manifest of the same spec and
            metadata is resumed; one of another spec is an error.
        spec: what the dataset holds (DatasetSpec).
        metadata: JSON-serialisable fields kept in manifest.json (model id, dtype, hook
            specs, ...); part of what a resumed folder must match.
        checksum: record each file's sha256 (hashed while the file is synced to disk).
        max_pending: shuffle groups written in the background while the next one fills.

    Example:
        >>> spec = DatasetSpec({"blocks.3.hook_resid_post": [768]}, n_tokens, shard_rows=65536)
        >>> with DatasetWriter("acts/", spec, metadata={"model": "gpt2"}) as writer:
        ...     for acts, ids, examples, positions in batches:   # acts: hook point -> [tokens, 768]
        ...         writer.write(acts, token_ids=ids, examples=examples, positions=positions)
        >>> datasets.load_from_disk("acts/")
    """

    def __init__(self, path: Union[str, os.PathLike], spec: DatasetSpec, *, metadata: Optional[Mapping] = None, checksum: bool = True,
                 max_pending: int = 1):
        _positive("max_pending", max_pending)
        self.root, self.spec, self.checksum, self.max_pending = Path(path), spec, checksum, max_pending
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest = _open_manifest(self.root, spec, dict(metadata or {}))
        for leftover in self.root.glob(".*.tmp"):  # what an interrupted write left
            leftover.unlink()
        self._done = {f.index: f for f in self._manifest.files}
        self.next_row = self._manifest.finished_rows
        self._row = self.next_row
        self._schema = _schema(spec)
        self._group: Optional[_Group] = None
        self._in_flight: deque[Future] = deque()
        self._free: list[dict] = []
        # Stages that keep the disk and the cores busy: this thread scatters rows into a group;
        # `_writes` copies a group's rows into files; `_hashes` hashes written files, two at
        # once (sha256 is the costliest step, and sequential within a file); `_finishes` syncs
        # each file, renames it and lists it in the manifest, in order.
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="DatasetWriter")
        self._hashes = ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="DatasetWriter-sha256")
        self._finishes = ThreadPoolExecutor(1, thread_name_prefix="DatasetWriter-sync")
        self._unsynced = threading.Semaphore(_UNSYNCED)
        self._failure: Optional[BaseException] = None
        self._closed = False

    @property
    def manifest(self) -> DatasetManifest:
        return self._manifest

    @property
    def finished_rows(self) -> int:
        """Rows of the leading groups whose files are all finished (on disk and in the manifest)."""
        return self._manifest.finished_rows

    def write(self, activations: Mapping[str, Any], *, token_ids: Any = None, examples: Any = None, positions: Any = None,
              row: Optional[int] = None) -> None:
        """Add rows: hook point -> [n, *shape] (or [n, width]) of the spec's dtype, the same n
        for every hook point (row i of each is one token), with token_ids / examples /
        positions [n] when the spec has provenance.

        Args:
            row: the index of these rows' first row in the dataset (default: where the last
                write ended, from `next_row` on). Rows before the writer's position (finished
                in an earlier run, or already written) are skipped; a gap is an error.
        """
        self._check_open()
        columns, n = self._columns(activations, dict(token_ids=token_ids, example=examples, pos=positions))
        start = self._row if row is None else row
        _positive("row", start, 0)
        if start + n > self.spec.rows:
            raise DatasetError(f"rows {start}..{start + n - 1} go past the spec's rows={self.spec.rows}")
        if start > self._row:
            raise DatasetError(f"row={start} leaves rows {self._row}..{start - 1} unwritten; write from row {self._row}")
        position = self._row
        while position < start + n:
            group = position // self.spec.shuffle_buffer
            stop = min(start + n, self.spec.group_range(group)[1])
            if not all(i in self._done for i in self.spec.group_files(group)):  # a finished group is not rewritten
                filling = self._filling(group)
                filling.put({name: t[position - start:stop - start] for name, t in columns.items()})
                if filling.filled == filling.rows:
                    self._in_flight.append(self._writes.submit(self._write_group, filling))
                    self._group = None
            position = stop
        self._row = max(self._row, start + n)

    def close(self) -> DatasetManifest:
        """Wait for every file, then write dataset_info.json and state.json (the dataset is
        then complete) and return the manifest. Raises DatasetError, keeping the finished
        files, when fewer than spec.rows rows were written."""
        if self._closed:
            return self._manifest
        try:
            self._wait(0)
        finally:
            self._shutdown()
        if self._failure is not None:
            raise self._failure
        missing = [i for i in range(self.spec.n_files) if i not in self._done]
        if missing:
            raise DatasetError(f"{self.root}: {self._row} of rows={self.spec.rows} rows were written, so files from "
                               f"{self.spec.file_name(missing[0])} on are unfinished; a writer on this folder resumes at row {self.finished_rows}")
        self._finish()
        return self._manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Stop without finishing the dataset: the groups already full are still written (and
        their files finished), nothing else; a failure among them is not raised (abort is
        what a failed run calls, and its own error is the one to see)."""
        if self._closed:
            return
        try:
            self._wait(0)
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._shutdown()

    # -------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise DatasetError(f"the writer of {self.root} is closed")
        while self._in_flight and self._in_flight[0].done():  # a failed file stops the next write
            self._free.append(self._in_flight.popleft().result())
        if self._failure is not None:
            raise self._failure

    def _columns(self, activations: Mapping[str, Any], provenance: dict) -> tuple[dict[str, np.ndarray], int]:
        """The write's columns as numpy arrays [n, width] / [n] (bfloat16 as uint16), checked against the spec."""
        expected = [name for name, _ in self.spec.hooks]
        if set(activations) != set(expected):
            raise DatasetError(f"write got hook points {sorted(activations)}; the spec has {expected}")
        dtype = DTYPES[self.spec.dtype][0]
        columns, counts = {}, {}
        for name, shape in self.spec.hooks:
            tensor = _tensor(activations[name], name)
            if tensor.dtype != dtype:
                raise DatasetError(f"{name} is {str(tensor.dtype).removeprefix('torch.')}; the dataset's dtype is {self.spec.dtype} "
                                   f"(convert first: the writer does not round silently)")
            width = self.spec.widths[name]
            if tensor.ndim < 1 or tuple(tensor.shape[1:]) not in (shape, (width,)):
                raise DatasetError(f"{name} has shape {list(tensor.shape)}; expected [rows, {', '.join(map(str, shape))}] or [rows, {width}]")
            columns[name], counts[name] = to_numpy(tensor.reshape(len(tensor), width)), len(tensor)
        for name, values in provenance.items():
            if not self.spec.provenance:
                if values is not None:
                    raise DatasetError(f"the spec has no provenance columns (provenance=False) but {name} was given")
                continue
            if values is None:
                raise DatasetError(f"the spec has provenance columns: give {name} [rows] too (or use provenance=False)")
            tensor = _tensor(values, name)
            if tensor.ndim != 1 or tensor.is_floating_point() or tensor.is_complex():
                raise DatasetError(f"{name} must be one integer per row; got {tensor.dtype} of shape {list(tensor.shape)}")
            columns[name], counts[name] = tensor.numpy().astype(_PROVENANCE_TYPES[name], copy=False), len(tensor)
        if len(set(counts.values())) != 1:
            raise DatasetError(f"every column needs the same rows (row i of each is one token); got {counts}")
        return columns, next(iter(counts.values()))

    def _filling(self, group: int) -> _Group:
        if self._group is not None and self._group.index == group:
            return self._group
        start, stop = self.spec.group_range(group)
        inverse = np.empty(stop - start, dtype=np.int64)
        inverse[self.spec.permutation(group)] = np.arange(stop - start)
        self._group = _Group(group, stop - start, inverse, self._buffers())
        return self._group

    def _buffers(self) -> dict:
        """Columns for a new group: those of a group already written, else new ones, waiting
        for the oldest group in flight when max_pending are."""
        if not self._free and len(self._in_flight) >= self.max_pending:
            self._free.append(self._in_flight.popleft().result())
        if self._free:
            return self._free.pop()
        capacity, dtype = self.spec.shuffle_buffer, DTYPES[self.spec.dtype][3]
        columns = {name: np.empty((capacity, width), dtype=dtype) for name, width in self.spec.widths.items()}
        if self.spec.provenance:
            columns.update({name: np.empty(capacity, dtype=t) for name, t in _PROVENANCE_TYPES.items()})
        return columns

    def _write_group(self, group: _Group) -> dict:
        """(writer thread) The group's unfinished files, in order; returns its buffers."""
        first_row = self.spec.group_range(group.index)[0]
        for index in self.spec.group_files(group.index):
            if index in self._done:
                continue
            start = index * self.spec.shard_rows - first_row
            stop = min(start + self.spec.shard_rows, group.rows)
            batch = _record_batch(self.spec, self._schema, {name: t[start:stop] for name, t in group.columns.items()})
            self._unsynced.acquire()  # bounds the files in the page cache that wait for their sync
            try:
                temporary = self.root / f".{self.spec.file_name(index)}.tmp"
                size = _write_stream(temporary, self._schema, batch)
            except BaseException:
                self._unsynced.release()
                raise
            digest = self._hashes.submit(file_sha256, temporary) if self.checksum else None
            self._finishes.submit(self._publish, index, temporary, batch.num_rows, size, digest)
        return group.columns  # free: the files hold the rows now

    def _publish(self, index: int, temporary: Path, rows: int, size: int, digest: Optional[Future]) -> None:
        """(sync thread) Sync a written file (while it is hashed), rename it, then list it in
        the manifest: only then is it finished. After a failure nothing more is published."""
        try:
            if self._failure is not None:
                temporary.unlink()
                return
            flush_to_disk(temporary)
            finished = DatasetFile(index, self.spec.file_name(index), rows, size, digest.result() if digest else None)
            os.replace(temporary, self.root / finished.file)
            self._done[index] = finished
            self._manifest = DatasetManifest(self.spec, self._manifest.metadata, tuple(sorted(self._done.values(), key=lambda f: f.index)))
            write_json_atomic(self.root / MANIFEST, self._manifest.to_json())
        except BaseException as error:  # raised by the next write or close
            self._failure = self._failure or error
        finally:
            self._unsynced.release()

    def _wait(self, keep: int) -> None:
        while len(self._in_flight) > keep:
            self._free.append(self._in_flight.popleft().result())

    def _shutdown(self) -> None:
        """Wait for every file handed to the threads (written, synced, listed), then stop them."""
        self._closed = True
        self._writes.shutdown(wait=True)
        self._finishes.shutdown(wait=True)
        self._hashes.shutdown(wait=True)
        self._free.clear()

    def _finish(self) -> None:
        """datasets' dataset_info.json and state.json, then the manifest marked complete."""
        files = self._manifest.files
        fingerprint = hashlib.sha256(json.dumps([self.spec.to_json(), [vars(f) for f in files]]).encode()).hexdigest()[:16]
        write_json_atomic(self.root / "dataset_info.json", {"citation": "", "description": "", "features": _features(self.spec),
                                                            "homepage": "", "license": ""})
        write_json_atomic(self.root / "state.json", {
            "_data_files": [{"filename": f.file} for f in files], "_fingerprint": fingerprint, "_format_columns": None,
            "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None,
        })
        self._manifest = DatasetManifest(self.spec, self._manifest.metadata, files, complete=True)
        write_json_atomic(self.root / MANIFEST, self._manifest.to_json())


def _write_stream(path: Path, schema: pa.Schema, batch: pa.RecordBatch) -> int:
    """Write one record batch as an Arrow IPC stream (what datasets reads); returns its bytes."""
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_stream(sink, schema) as stream:
            stream.write_batch(batch)
        return sink.tell()


def _tensor(values: Any, name: str) -> Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, Tensor):
        raise DatasetError(f"{name} must be a torch tensor or numpy array; got {type(values).__name__}")
    return values.detach().cpu()


def _open_manifest(root: Path, spec: DatasetSpec, metadata: dict) -> DatasetManifest:
    """The folder's manifest when it holds a dataset of this spec and metadata; a new one
    (written) when it holds none; else DatasetError."""
    if not (root / MANIFEST).exists():
        if any(not p.name.startswith(".") for p in root.iterdir()):
            raise DatasetError(f"{root} holds files but no {MANIFEST}: write an activation dataset into an empty folder")
        manifest = DatasetManifest(spec, metadata)
        write_json_atomic(root / MANIFEST, manifest.to_json())
        return manifest
    manifest = read_manifest(root)
    if manifest.spec != spec:
        theirs, ours = manifest.spec.to_json(), spec.to_json()
        differ = [f"{key}={theirs[key]!r} (now {ours[key]!r})" for key in ours if theirs[key] != ours[key]]
        raise DatasetError(f"{root} holds a dataset written with {', '.join(differ)}: use the same spec, or another folder")
    if manifest.metadata != json.loads(json.dumps(metadata)):
        raise DatasetError(f"{root} holds a dataset written with metadata {dict(manifest.metadata)}; now {metadata}: use another folder")
    return manifest
