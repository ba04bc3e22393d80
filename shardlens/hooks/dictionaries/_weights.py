"""A dictionary's weights by reference: a file path or URI and the sha256 of its bytes.

A spec that holds a reference is a few hundred bytes, whatever the size of the weights. The
driver builds no tensors: it reads the file's header, and streams the file once to hash it
unless it is given the hash (Hugging Face shows a file's sha256 as its LFS oid). Each
process that runs the spec reads the file once, checks the hash, and keeps the tensors (see
_dictionary.py) for the next batch.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import json
import struct
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file as load_safetensors_file
from torch import Tensor

from shardlens.hooks.codec import serializable
from shardlens.tables.parquet import filesystem_and_root, is_uri

FORMATS = (".safetensors", ".npz")
_CHUNK = 1 << 24


@serializable
@dataclass(frozen=True)
class WeightsRef:
    """Where a dictionary's tensors are (`uri`: a local path, or a URI pyarrow opens, such
    as s3://bucket/sae.safetensors) and the sha256 of the file's bytes."""

    uri: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.uri.endswith(FORMATS):
            raise ValueError(f"weights file {self.uri!r}: expected a name ending in {' or '.join(FORMATS)}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits; got {self.sha256!r}")

    def tensors(self) -> dict[str, Tensor]:
        """The file's tensors, read now, after checking the hash of its bytes."""
        if not is_uri(self.uri):  # hashed through a memory map, then read by safetensors' own: one copy in memory
            with open(self.uri, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                self._check(hashlib.sha256(data).hexdigest())
            return load_safetensors_file(self.uri) if self.uri.endswith(".safetensors") else _npz(self.uri)
        with _open(self.uri) as stream:
            data = stream.read()
        self._check(hashlib.sha256(data).hexdigest())
        return load_safetensors(data) if self.uri.endswith(".safetensors") else _npz(io.BytesIO(data))

    def _check(self, found: str) -> None:
        if found != self.sha256:
            raise ValueError(f"weights file {self.uri!r} has sha256 {found}, not the {self.sha256} the spec names: "
                             "the file changed since the spec was made; load the dictionary again")


def reference(uri: str, *, sha256: Optional[str] = None) -> WeightsRef:
    """A reference to the file `uri`, with the hash of its bytes as they are now (or the
    `sha256` given, which the processes that read the file check)."""
    if sha256 is not None:
        return WeightsRef(uri, sha256)
    digest = hashlib.sha256()
    with _open(uri) as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return WeightsRef(uri, digest.hexdigest())


def shapes(uri: str) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in the file, from its header alone (the driver describes a
    dictionary without reading its weights)."""
    filesystem, path = filesystem_and_root(uri)
    with filesystem.open_input_file(path) as file:
        if uri.endswith(".safetensors"):
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
            return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
        with zipfile.ZipFile(file) as archive:  # an .npz: one .npy per tensor, each with its header
            return {member.removesuffix(".npy"): _npy_shape(archive, member) for member in archive.namelist()}


def _npy_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...]:
    with archive.open(member) as array:
        major, _ = np.lib.format.read_magic(array)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(read_header(array)[0])


def _open(uri: str):
    filesystem, path = filesystem_and_root(uri)
    return filesystem.open_input_stream(path)


def _npz(file) -> dict[str, Tensor]:
    with np.load(file) as arrays:
        return {name: torch.from_numpy(np.array(arrays[name])) for name in arrays.files}
