"""What `shardlens view DATASET` shows of a folder: a campaign experiment's grid or top
contexts, or a cache dataset's attention patterns (views of shardlens.tables.views)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from shardlens.tables.views import View, grid_view, top_contexts_view
from shardlens.tracer.campaign import top_contexts
from shardlens.tracer.campaign.report import experiment_grid, grid_heatmap
from shardlens.tracer.campaign.status import RECORD


def dataset_view(path: Path, *, tokenizer: str | None = None, example: int = 0) -> View:
    """The view of what a dataset folder holds, for `shardlens view`: a top_contexts
    experiment's contexts (top_contexts.parquet), a sweep / atp / ig experiment's grid
    (part-*.parquet with point and value columns; a sweep as its patching effect when the
    campaign's campaign.json names its kind), or the attention patterns of one example of a
    cache dataset (hook=blocks.<L>.attn.hook_pattern/, as cache.to_parquet writes).

    Args:
        tokenizer: a checkpoint whose tokenizer labels the contexts' tokens (default: the
            model the parts record, when it is a local folder; else the token ids).
        example: the example of a cache dataset to show.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: shardlens view reads a dataset folder")
    if (path / top_contexts.RESULT).is_file():
        decode = _decoder(tokenizer or _recorded_model(path))
        return top_contexts_view(pq.read_table(path / top_contexts.RESULT), decode=decode, title=f"top contexts: {path.name}")
    parts = sorted(path.glob("part-*.parquet"))
    if parts and {"point", "value"} <= set(pq.read_schema(parts[0]).names):
        kind = _recorded_kind(path)
        grid, points, columns = experiment_grid(kind or "grid", path)
        return grid_view(grid_heatmap(path.name, kind or "grid", grid, points, columns))
    patterns = sorted(p.name.removeprefix("hook=") for p in path.glob("hook=*.attn.hook_pattern"))
    if patterns:
        from shardlens.tables.parquet import read_cache

        cache = read_cache(path, hooks=patterns, examples=[example])
        if not cache.batch_size:
            raise ValueError(f"{path} holds no example {example} (see `shardlens inspect {path}`)")
        return cache.view(title=f"attention patterns (example {example})")
    raise ValueError(f"{path} is not a dataset shardlens can view: expected a top_contexts experiment's folder "
                     "(top_contexts.parquet), a sweep / atp / ig experiment's folder (part-*.parquet with point and value "
                     "columns) or a cache dataset with attention patterns (hook=blocks.<L>.attn.hook_pattern/)")


def _record(directory: Path) -> dict:
    """What the campaign.json beside an experiment's folder records ({} without one)."""
    record = directory.parent / RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def _recorded_kind(directory: Path) -> str | None:
    """The experiment's kind as its campaign's campaign.json records it (None without one)."""
    return _record(directory).get("experiments", {}).get(directory.name, {}).get("kind")


def _recorded_model(directory: Path) -> str | None:
    """The campaign's model, when it is a local folder: as its campaign.json records it
    (resolved from the campaign file's folder), else as the parts record it when that is a
    folder from anywhere (an absolute path)."""
    source = _record(directory).get("model")
    parts = sorted(directory.glob("part-b*.parquet"))
    if source is None and parts:
        settings = json.loads((pq.read_schema(parts[0]).metadata or {}).get(top_contexts.SETTINGS_KEY, b"null")) or {}
        source = settings.get("model", {}).get("source")
        source = source if source and Path(source).is_absolute() else None  # relative to a campaign file we do not know
    return source if source and Path(source).is_dir() else None  # a hub id would mean a download


def _decoder(source: str | None):
    if source is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    return lambda ids: [tokenizer.decode([i]) for i in ids]
