"""Campaign experiments of kind activations: a dataset for training dictionaries (sparse
autoencoders, transcoders) from the campaign's hook points, as shuffled token rows in Arrow
files that Hugging Face `datasets` (`load_from_disk`) and SAELens read (the layout is
shardlens.tables.datasets').

    - {name: sae_data, kind: activations, points: "blocks.6.hook_resid_post", shard_rows: 65536, dtype: float16}

Keys: `points` (hook points with a fixed shape per token: a name, glob or list, as for
extract); `shard_rows` (rows per file, default 65536); `shuffle_buffer` (rows shuffled
together, a multiple of shard_rows; default shard_rows); `seed` (the shuffle's, default 0);
`dtype` (float16 | float32; default the activations' own, except bfloat16 activations,
which are written as float32, exactly: datasets has no bfloat16, and SAELens reads its
uint16 bits as integers, so `dtype: bfloat16` is refused); `checksum` (record each file's
sha256 in manifest.json, default true: false skips the hashing, the costliest step of the
write where cores are few).

Rows are the real tokens of the clean prompts: before the shuffle, batch by batch, prompt
by prompt, position by position. The prompts of a batch may differ in length: they run
padded on the right with an attention mask, and padding never becomes a row. Each row has
the hook points' values and token_ids, example (the prompt's index in the data) and pos.
The dataset is the folder `<output.path>/<experiment>/`.

Resuming. A work unit is one data batch, as for every kind: its rows go to the dataset
writer, and it is finished once its marker `_done/b<batch>.json` exists, which is written
once every file its rows went to is finished (listed in the dataset's manifest.json). A
file holds rows of a fixed range of the data (its shuffle group), so a rerun runs exactly
the batches with rows in an unfinished group (one that straddles a finished group runs
again; the writer skips its rows there) and rewrites only unfinished files: a campaign
killed at any moment and run again yields, byte for byte, the dataset of an uninterrupted
run. A run first brings the markers in line with the manifest, and refuses a dataset that
other settings wrote. The prompts are tokenized only when some batch is left (a finished
dataset with every marker is not read again).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

import shardlens.progress
from shardlens.errors import DatasetError
from shardlens.tables.axes import PATTERN_SUFFIXES
from shardlens.tables.datasets import DTYPES, MANIFEST, DatasetSpec, DatasetWriter, read_manifest
from shardlens.tables.files import write_json_atomic
from shardlens.tracer.campaign import experiments
from shardlens.tracer.campaign.data import _ids
from shardlens.tracer.campaign.experiments import hook_points
from shardlens.tracer.campaign.schema import Campaign, CampaignError

DEFAULTS = {"shard_rows": 65536, "shuffle_buffer": None, "seed": 0, "dtype": None, "checksum": True}
option = functools.partial(experiments.option, defaults=DEFAULTS)  # (experiment, key) -> its value or the default


# ---------------------------------------------------------------------- the campaign file


def check_experiment(experiment: dict, file: str) -> None:
    """Refuse bad values of an activations experiment's own keys, naming the line."""
    experiments.check_at_least(experiment, file, {"shard_rows": 1, "shuffle_buffer": 1, "seed": 0}, DEFAULTS)
    shard_rows, buffer = option(experiment, "shard_rows"), option(experiment, "shuffle_buffer")
    if buffer is not None and buffer % shard_rows:
        raise CampaignError(f"{experiments.key_line(experiment, file, 'shuffle_buffer')}: experiment.shuffle_buffer must be a multiple "
                            f"of shard_rows={shard_rows}; got {buffer}")
    if option(experiment, "dtype") == "bfloat16":
        raise CampaignError(f"{experiments.key_line(experiment, file, 'dtype')}: experiment.dtype bfloat16 would be stored as its uint16 "
                            "bits, which SAELens reads as integers (1.0 as 16256.0): use float32 (exact for bfloat16 activations, the "
                            "default for them) or float16")


def dataset_dtype(experiment: Mapping, activations: str) -> str:
    """The dtype an experiment writes activations of dtype `activations` in: its `dtype`, else
    their own, except bfloat16, written as float32 (exactly)."""
    return option(experiment, "dtype") or ("float32" if activations == "bfloat16" else activations)


def written_bytes(experiment: Mapping, cache_bytes: int, model_dtype: str) -> int:
    """The bytes an experiment writes for a cache of `cache_bytes` in the model's dtype."""
    size = lambda dtype: DTYPES[dtype][0].itemsize  # noqa: E731
    return cache_bytes * size(dataset_dtype(experiment, model_dtype)) // size(model_dtype)


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


def token_ids(campaign: Campaign, rows: list[dict], tokenizer: Any, *, first_example: int = 0) -> list[list[int]]:
    """The token ids of a data batch's clean prompts (each prompt's own length)."""
    column = campaign.data.get("clean", "clean")
    ids = [_ids(row[column], tokenizer, "clean") for row in rows]
    if not all(ids):
        raise CampaignError(f"{campaign.path}: a clean prompt of examples {first_example}..{first_example + len(rows) - 1} has no tokens")
    return ids


def token_batch(campaign: Campaign, rows: list[dict], tokenizer: Any, *, first_example: int = 0) -> TokenBatch:
    """The clean prompts of a data batch as a TokenBatch (prompts may differ in length)."""
    ids = token_ids(campaign, rows, tokenizer, first_example=first_example)
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
    failure, `abort()` (keeps the finished files).
    """

    def __init__(self, campaign: Campaign, out: Path, batches: Sequence[list], runner: Any):
        self.campaign, self.out, self._batches, self._tokenizer = campaign, out, batches, runner.tokenizer
        self.experiments = {e["name"]: e for e in campaign.experiments if e["kind"] == "activations"}
        self._writers: dict[str, DatasetWriter] = {}
        self._marked = dict.fromkeys(self.experiments, 0)  # leading batches with markers
        self._points = {name: self._hook_points(e, runner) for name, e in self.experiments.items()}
        self._tasks: dict[str, shardlens.progress.Task] = {}  # each dataset's "write" task, from its first batch run now
        for name in self.experiments:
            self._reconcile(name)

    def run(self, experiment: Mapping, batch: int, runner: Any) -> None:
        """Run one data batch's clean prompts and hand their token rows to the experiment's writer."""
        name = experiment["name"]
        task = self._task(name, batch)
        tokens = token_batch(self.campaign, self._batches[batch], self._tokenizer, first_example=batch * self._batch_size)
        with torch.no_grad():
            _, cache = runner.run_with_cache(tokens.ids, attention_mask=tokens.mask, names_filter=self._points[name], return_type=None)
        real = tokens.mask.bool()
        values = {point: _token_rows(cache[point], real, experiment) for point in self._points[name]}
        writer = self._writer(name, values)
        prompt, position = real.nonzero(as_tuple=True)  # the rows' order: prompt by prompt, position by position
        writer.write(values, token_ids=tokens.ids[real], examples=tokens.examples[prompt], positions=position, row=self._starts[batch])
        task.advance(tokens.rows)
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
            if name in self._tasks:  # ended once its last files are written
                self._tasks.pop(name).close()

    def abort(self) -> None:
        """Stop the writers, keeping every finished file (and marking the batches they hold)."""
        for name, writer in self._writers.items():
            writer.abort()
            self._mark(name, writer.finished_rows)
        self._writers.clear()
        for task in self._tasks.values():
            task.close(ok=False)
        self._tasks.clear()

    # -------------------------------------------------------------- internals

    @property
    def _batch_size(self) -> int:
        return self.campaign.data.get("batch_size", 16)

    @functools.cached_property
    def _starts(self) -> list[int]:
        """The first row of each batch, then the total: the prompts' token counts (tokenized
        here, only once a run needs them)."""
        starts = [0]
        for batch, rows in enumerate(self._batches):
            ids = token_ids(self.campaign, rows, self._tokenizer, first_example=batch * self._batch_size)
            starts.append(starts[-1] + sum(map(len, ids)))
        return starts

    def _task(self, name: str, batch: int) -> shardlens.progress.Task:
        """The experiment's "write" task (shardlens.progress): its dataset's rows handed to the
        writer, from the first batch run now (the rows before it were written before)."""
        if name not in self._tasks:
            self._tasks[name] = shardlens.progress.task("write", f"{name}: dataset", total=self._starts[-1], unit="row",
                                                        initial=self._starts[batch])
        return self._tasks[name]

    def _hook_points(self, experiment: Mapping, runner: Any) -> list[str]:
        points = hook_points(experiment, runner.hook_names())
        varying = [p for p in points if p.endswith(PATTERN_SUFFIXES)]
        if varying or not points:
            raise CampaignError(f"{self.campaign.path}: experiment {experiment['name']!r} needs hook points with a fixed shape per token; "
                                f"{experiment['points']!r} gives {varying or 'none'}")
        return points

    def _metadata(self, name: str) -> dict:
        """What the dataset records of its making; a rerun must match it to resume."""
        made_by = experiments.made_by(self.campaign, data=("path", "clean", "limit"))  # rows do not depend on the batch size
        return {"campaign": self.campaign.name, **made_by, "experiment": dict(self.experiments[name])}

    def _spec(self, name: str, values: Mapping[str, Tensor]) -> DatasetSpec:
        experiment = self.experiments[name]
        dtype = str(next(iter(values.values())).dtype).removeprefix("torch.")
        return DatasetSpec({point: tuple(v.shape[1:]) for point, v in values.items()}, self._starts[-1], dtype=dtype,
                           shard_rows=option(experiment, "shard_rows"), shuffle_buffer=option(experiment, "shuffle_buffer"),
                           seed=option(experiment, "seed"))

    def _writer(self, name: str, values: Mapping[str, Tensor]) -> DatasetWriter:
        if name not in self._writers:
            try:
                self._writers[name] = DatasetWriter(self.out / name, self._spec(name, values), metadata=self._metadata(name),
                                                    checksum=option(self.experiments[name], "checksum"))
            except DatasetError as error:
                raise CampaignError(f"experiment {name!r}: {error}") from None
        return self._writers[name]

    def _reopen(self, name: str) -> Optional[DatasetWriter]:
        """A writer on a dataset whose files are all finished but whose datasets' files are not."""
        directory = self.out / name
        if not (directory / MANIFEST).exists() or read_manifest(directory).complete:
            return None
        return DatasetWriter(directory, read_manifest(directory).spec, metadata=self._metadata(name),
                             checksum=option(self.experiments[name], "checksum"))

    def _reconcile(self, name: str) -> None:
        """Markers for the batches the dataset holds (a run killed before writing them), none
        for those it does not; a dataset of other settings is refused. A complete dataset
        with every marker needs no token counts: then the prompts are not tokenized."""
        directory = self.out / name
        n_batches = len(self._batches)
        finished = 0
        if (directory / MANIFEST).exists():
            manifest = read_manifest(directory)
            if dict(manifest.metadata) != json.loads(json.dumps(self._metadata(name))):
                raise CampaignError(f"{directory} holds a dataset written by other settings ({dict(manifest.metadata)}; now "
                                    f"{self._metadata(name)}): remove it to write it again")
            if manifest.complete and all(self._marker(name, b).exists() for b in range(n_batches)):
                self._marked[name] = n_batches
                return
            if manifest.spec.rows != self._starts[-1]:
                raise CampaignError(f"{directory} holds a dataset of {manifest.spec.rows} rows; the data now has {self._starts[-1]} "
                                    "tokens: remove it to write it again")
            finished = manifest.finished_rows
        for batch in range(n_batches):
            if self._starts[batch + 1] > finished:
                self._marker(name, batch).unlink(missing_ok=True)
            elif not self._marker(name, batch).exists():
                write_json_atomic(self._marker(name, batch), self._marker_json(batch))
        self._marked[name] = sum(1 for b in range(n_batches) if self._starts[b + 1] <= finished)

    def _mark(self, name: str, finished_rows: int) -> None:
        """Markers for the batches whose rows are all in finished files."""
        while self._marked[name] < len(self._batches) and self._starts[self._marked[name] + 1] <= finished_rows:
            write_json_atomic(self._marker(name, self._marked[name]), self._marker_json(self._marked[name]))
            self._marked[name] += 1

    def _marker_json(self, batch: int) -> dict:
        return {"rows": [self._starts[batch], self._starts[batch + 1]]}

    def _marker(self, name: str, batch: int) -> Path:
        return self.out / name / "_done" / f"b{batch:05d}.json"


def _token_rows(values: Tensor, real: Tensor, experiment: Mapping) -> Tensor:
    """[batch, pos, ...] -> [real tokens, ...] on the CPU, in the dataset's dtype."""
    rows = values[real.to(values.device)]
    dtype = dataset_dtype(experiment, str(rows.dtype).removeprefix("torch."))
    return rows.to(DTYPES[dtype][0]).cpu()


def summary(experiment: Mapping, directory: Path) -> dict:
    """What summary.json says of an activations experiment: its dataset's hook points, rows, files (as
    "shards", datasets' word), dtype."""
    manifest = read_manifest(directory)
    return {"kind": "activations", "hooks": [name for name, _ in manifest.spec.hooks], "rows": manifest.spec.rows,
            "shards": manifest.spec.n_files, "dtype": manifest.spec.dtype, "complete": manifest.complete}
