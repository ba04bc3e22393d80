"""Campaign experiments of kind activations: a dataset for training dictionaries (sparse
autoencoders, transcoders) from the campaign's hook points, as shuffled token rows in Arrow
shards that Hugging Face `datasets` (`load_from_disk`) and SAELens read (the layout is
shardlens.tables.shards').

    - {name: sae_data, kind: activations, points: "blocks.6.hook_resid_post", shard_rows: 65536, dtype: float16}

Keys: `points` (hook points with a fixed shape per token: a name, glob or list, as for
extract); `shard_rows` (rows per shard, default 65536); `shuffle_buffer` (rows shuffled
together, a multiple of shard_rows; default shard_rows); `seed` (the shuffle's, default 0);
`dtype` (float16 | float32 | bfloat16; default the activations' own).

Rows are the real tokens of the clean prompts: before the shuffle, batch by batch, prompt
by prompt, position by position. The prompts of a batch may differ in length: they run
padded on the right with an attention mask, and padding never becomes a row. Each row has
the hook points' values and token_ids, example (the prompt's index in the data) and pos.
The dataset is the folder `<output.path>/<experiment>/`.

Resuming. A work unit is one data batch, as for every kind: its rows go to the shard
writer, and it is finished once its marker `_done/b<batch>.json` exists, which is written
once every shard its rows went to is finished (listed in the dataset's manifest.json). A
shard holds rows of a fixed range of the data (its shuffle group), so a rerun runs exactly
the batches with rows in an unfinished group (one that straddles a finished group runs
again; the writer skips its rows there) and rewrites only unfinished shards: a campaign
killed at any moment and run again yields, byte for byte, the dataset of an uninterrupted
run. A run first brings the markers in line with the manifest, and refuses a dataset that
other settings wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from shardlens.hooks.names import names_predicate
from shardlens.tables.axes import PATTERN_SUFFIXES
from shardlens.tables.shards import DTYPES, MANIFEST, ShardError, ShardSpec, ShardWriter, read_manifest, write_json_atomic
from shardlens.tracer.campaign.data import _ids
from shardlens.tracer.campaign.schema import Campaign, CampaignError

DEFAULTS = {"shard_rows": 65536, "shuffle_buffer": None, "seed": 0, "dtype": None}


# ---------------------------------------------------------------------- the campaign file


def check_experiment(experiment: dict, file: str) -> None:
    """Refuse bad values of an activations experiment's own keys, naming the line."""
    lines, line = getattr(experiment, "lines", {}), getattr(experiment, "line", 0)
    at = lambda key: f"{file}:{lines.get(key, line)}"  # noqa: E731
    for key, least in (("shard_rows", 1), ("shuffle_buffer", 1), ("seed", 0)):
        value = experiment.get(key, DEFAULTS[key])
        if value is not None and value < least:
            raise CampaignError(f"{at(key)}: experiment.{key} must be an int >= {least}; got {value!r}")
    shard_rows, buffer = option(experiment, "shard_rows"), option(experiment, "shuffle_buffer")
    if buffer is not None and buffer % shard_rows:
        raise CampaignError(f"{at('shuffle_buffer')}: experiment.shuffle_buffer must be a multiple of shard_rows={shard_rows}; got {buffer}")


def option(experiment: Mapping, key: str) -> Any:
    return experiment.get(key, DEFAULTS[key])


def hook_points(experiment: Mapping, names: Sequence[str]) -> list[str]:
    """The hook points an experiment writes, in the runner's order."""
    selected = names_predicate(experiment["points"], list(names))
    return [n for n in names if selected(n)]


def written_bytes(experiment: Mapping, cache_bytes: int, model_dtype: str) -> int:
    """The bytes an experiment writes for a cache of `cache_bytes` in the model's dtype."""
    size = lambda dtype: DTYPES[dtype][0].itemsize  # noqa: E731
    return cache_bytes * size(option(experiment, "dtype") or model_dtype) // size(model_dtype)


# ---------------------------------------------------------------------- the prompts


@dataclass(frozen=True)
class TokenBatch:
    """One data batch's clean prompts, padded on the right.

    Attributes:
        ids: [batch, pos] token ids (0 at padding).
        mask: [batch, pos], 1 at real tokens.
        examples: [batch] each prompt's index in the data.
    """

    ids: Tensor
    mask: Tensor
    examples: Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.sum())


def token_batch(campaign: Campaign, rows: list[dict], tokenizer: Any, *, first_example: int = 0) -> TokenBatch:
    """The clean prompts of a data batch as a TokenBatch (prompts may differ in length)."""
    column = campaign.data.get("clean", "clean")
    ids = [_ids(row[column], tokenizer, "clean") for row in rows]
    if not all(ids):
        raise CampaignError(f"{campaign.path}: a clean prompt of examples {first_example}..{first_example + len(rows) - 1} has no tokens")
    width = max(len(i) for i in ids)
    padded = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, tokens in enumerate(ids):
        padded[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
    return TokenBatch(padded, mask, torch.arange(len(ids)) + first_example)


# ---------------------------------------------------------------------- the writers of one run


class ActivationDatasets:
    """The dataset writers of a campaign's activations experiments during one run_campaign.

    Made before the run decides which units are left (it marks the batches that the
    datasets already hold); `run` each unit; then `close()` (finishes the datasets) or, on
    failure, `abort()` (keeps the finished shards).
    """

    def __init__(self, campaign: Campaign, out: Path, batches: Sequence[list], runner: Any):
        self.campaign, self.out = campaign, out
        self.experiments = {e["name"]: e for e in campaign.experiments if e["kind"] == "activations"}
        self._writers: dict[str, ShardWriter] = {}
        self._marked = dict.fromkeys(self.experiments, 0)  # leading batches with markers
        if not self.experiments:
            return
        size = campaign.data.get("batch_size", 16)
        self._batches = [token_batch(campaign, rows, runner.tokenizer, first_example=b * size) for b, rows in enumerate(batches)]
        self._starts = [0]
        for batch in self._batches:  # the first row of each batch, and the total
            self._starts.append(self._starts[-1] + batch.rows)
        self._points = {name: self._hook_points(e, runner) for name, e in self.experiments.items()}
        for name in self.experiments:
            self._reconcile(name)

    def run(self, experiment: Mapping, batch: int, runner: Any) -> None:
        """Run one data batch's clean prompts and hand their token rows to the experiment's writer."""
        name, tokens = experiment["name"], self._batches[batch]
        with torch.no_grad():
            _, cache = runner.run_with_cache(tokens.ids, attention_mask=tokens.mask, names_filter=self._points[name], return_type=None)
        real = tokens.mask.bool()
        dtype = option(experiment, "dtype")
        values = {point: _token_rows(cache[point], real, dtype) for point in self._points[name]}
        writer = self._writer(name, values)
        prompt, position = real.nonzero(as_tuple=True)  # the rows' order: prompt by prompt, position by position
        writer.write(values, token_ids=tokens.ids[real], examples=tokens.examples[prompt], positions=position, row=self._starts[batch])
        self._mark(name, writer.finished_rows)

    def close(self) -> None:
        """Finish every dataset (datasets' files, then the last markers)."""
        for name in self.experiments:
            writer = self._writers.get(name) or self._reopen(name)  # reopened: every batch done, the dataset not finished
            if writer is None:
                continue
            self._writers[name] = writer  # until it is closed: abort() marks what it holds
            self._mark(name, writer.close().finished_rows)
            del self._writers[name]

    def abort(self) -> None:
        """Stop the writers, keeping every finished shard (and marking the batches they hold)."""
        for name, writer in self._writers.items():
            writer.abort()
            self._mark(name, writer.finished_rows)
        self._writers.clear()

    # -------------------------------------------------------------- internals

    def _hook_points(self, experiment: Mapping, runner: Any) -> list[str]:
        points = hook_points(experiment, runner.hook_names())
        varying = [p for p in points if p.endswith(PATTERN_SUFFIXES)]
        if varying or not points:
            raise CampaignError(f"{self.campaign.path}: experiment {experiment['name']!r} needs hook points with a fixed shape per token; "
                                f"{experiment['points']!r} gives {varying or 'none'}")
        return points

    def _metadata(self, name: str) -> dict:
        """What the dataset records of its making; a rerun must match it to resume."""
        data = {key: self.campaign.data.get(key) for key in ("path", "clean", "limit")}
        return {"campaign": self.campaign.name, "model": dict(self.campaign.model), "data": data, "experiment": dict(self.experiments[name])}

    def _spec(self, name: str, values: Mapping[str, Tensor]) -> ShardSpec:
        experiment = self.experiments[name]
        dtype = str(next(iter(values.values())).dtype).removeprefix("torch.")
        return ShardSpec({point: tuple(v.shape[1:]) for point, v in values.items()}, self._starts[-1], dtype=dtype,
                         shard_rows=option(experiment, "shard_rows"), shuffle_buffer=option(experiment, "shuffle_buffer"),
                         seed=option(experiment, "seed"))

    def _writer(self, name: str, values: Mapping[str, Tensor]) -> ShardWriter:
        if name not in self._writers:
            try:
                self._writers[name] = ShardWriter(self.out / name, self._spec(name, values), metadata=self._metadata(name))
            except ShardError as error:
                raise CampaignError(f"experiment {name!r}: {error}") from None
        return self._writers[name]

    def _reopen(self, name: str) -> Optional[ShardWriter]:
        """A writer on a dataset whose shards are all finished but whose datasets' files are not."""
        directory = self.out / name
        if not (directory / MANIFEST).exists() or read_manifest(directory).complete:
            return None
        return ShardWriter(directory, read_manifest(directory).spec, metadata=self._metadata(name))

    def _reconcile(self, name: str) -> None:
        """Markers for the batches the dataset holds (a run killed before writing them), none
        for those it does not; a dataset of other settings is refused."""
        directory = self.out / name
        finished = 0
        if (directory / MANIFEST).exists():
            manifest = read_manifest(directory)
            if dict(manifest.metadata) != json.loads(json.dumps(self._metadata(name))) or manifest.spec.rows != self._starts[-1]:
                raise CampaignError(f"{directory} holds a dataset written by other settings ({dict(manifest.metadata)}, "
                                    f"{manifest.spec.rows} rows; now {self._starts[-1]} rows): remove it to write it again")
            finished = manifest.finished_rows
        for batch in range(len(self._batches)):
            if self._starts[batch + 1] > finished:
                self._marker(name, batch).unlink(missing_ok=True)
            elif not self._marker(name, batch).exists():
                write_json_atomic(self._marker(name, batch), self._marker_json(batch), mkdir=True)
        self._marked[name] = sum(1 for b in range(len(self._batches)) if self._starts[b + 1] <= finished)

    def _mark(self, name: str, finished_rows: int) -> None:
        """Markers for the batches whose rows are all in finished shards."""
        while self._marked[name] < len(self._batches) and self._starts[self._marked[name] + 1] <= finished_rows:
            write_json_atomic(self._marker(name, self._marked[name]), self._marker_json(self._marked[name]), mkdir=True)
            self._marked[name] += 1

    def _marker_json(self, batch: int) -> dict:
        return {"rows": [self._starts[batch], self._starts[batch + 1]]}

    def _marker(self, name: str, batch: int) -> Path:
        return self.out / name / "_done" / f"b{batch:05d}.json"


def _token_rows(values: Tensor, real: Tensor, dtype: Optional[str]) -> Tensor:
    """[batch, pos, ...] -> [real tokens, ...] on the CPU, in the dataset's dtype."""
    rows = values[real.to(values.device)]
    if dtype is not None:
        rows = rows.to(DTYPES[dtype][0])
    return rows.cpu()


def summary(experiment: Mapping, directory: Path) -> dict:
    """What summary.json says of an activations experiment: its dataset's hook points, rows, shards, dtype."""
    manifest = read_manifest(directory)
    return {"kind": "activations", "hooks": [name for name, _ in manifest.spec.hooks], "rows": manifest.spec.rows,
            "shards": manifest.spec.n_shards, "dtype": manifest.spec.dtype, "complete": manifest.complete}
