"""Writing files so that a crash leaves each one whole or absent: written under a hidden
temporary name, synced to disk, then renamed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union


def flush_to_disk(path: Union[str, os.PathLike]) -> None:
    """fsync a written file before its rename publishes it: otherwise a crash soon after
    can leave the final name pointing at a file whose bytes never reached the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write` a file under a hidden temporary name (".<name>.tmp", in `path`'s folder, made
    if missing), sync it, then rename it to `path`: a file that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp"
    write(temporary)
    flush_to_disk(temporary)
    os.replace(temporary, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """`data` as indented JSON, written with `write_atomic`."""
    text = json.dumps(data, indent=1)
    write_atomic(path, lambda temporary: temporary.write_text(text))
