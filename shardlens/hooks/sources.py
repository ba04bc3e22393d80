"""Where a model comes from: a local checkpoint folder or a Hugging Face hub id, and the error
that says which one a bad source is not (HookedModel, shard plans and the command line share it)."""

from __future__ import annotations

import os
import re
from typing import Any, Union

from shardlens.errors import ModelSourceError

CHECKPOINT = "a checkpoint folder (config.json and safetensors weights, as save_pretrained writes them)"
_HUB_ID = re.compile(r"[A-Za-z0-9]([\w.-]*[A-Za-z0-9_])?(/[A-Za-z0-9]([\w.-]*[A-Za-z0-9_])?)?")  # "org/name" or "name"


def model_config(source: Union[str, os.PathLike]) -> Any:
    """The transformers config of a model source: a local checkpoint folder or a Hugging Face
    hub id (read from the hub's cache, or downloaded).

    Raises ModelSourceError saying what `source` is and what was expected: a folder without
    config.json, a file, a path that exists nowhere and is no hub id ("/no/such/dir"), or a
    hub id that is not in the cache and cannot be downloaded (offline, say).
    """
    from transformers import AutoConfig

    path = os.fspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelSourceError(f"{path}: a folder without config.json: expected {CHECKPOINT}")
        return AutoConfig.from_pretrained(path)
    if os.path.exists(path):
        raise ModelSourceError(f"{path}: a file, not a model: expected {CHECKPOINT} or a Hugging Face hub id")
    if not _HUB_ID.fullmatch(path) or "--" in path or ".." in path or len(path) > 96:
        raise ModelSourceError(f"{path}: no such folder, and not a Hugging Face hub id either (a hub id looks like 'org/name')")
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as error:
        raise ModelSourceError(f"{path}: no such folder here, and {_hub_failure(path, error)}") from error


def _hub_failure(hub_id: str, error: OSError) -> str:
    """Why the hub id could not be loaded, from the hub's own error under transformers' OSError."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    cause = error.__cause__
    if isinstance(cause, LocalEntryNotFoundError):
        why = "downloads are off (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} could not be reached"
        return f"the Hugging Face hub id {hub_id!r} is not in the local cache and cannot be downloaded: {why}"
    if isinstance(cause, GatedRepoError):
        return f"the Hugging Face hub model {hub_id!r} is gated: ask for access on its page, then log in with `hf auth login`"
    if isinstance(cause, RepositoryNotFoundError):
        return f"the Hugging Face hub has no model {hub_id!r} (or it is private: log in with `hf auth login`)"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"the Hugging Face hub id {hub_id!r} could not be loaded: {first}"
