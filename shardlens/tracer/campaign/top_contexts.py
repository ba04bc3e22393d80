"""Campaign experiments of kind top_contexts: for every feature (the last axis: MLP neurons,
SAE latents, ...) of every hook point, the k tokens of the dataset where it is largest, with
their context: what feature browsers show.

    - {name: latents, kind: top_contexts, points: "blocks.*.mlp.hook_post", k: 20, window: 8}

Keys: `points` ([batch, pos, features] hook points: a name, glob or list); `k` (contexts
per feature, default 20); `window` (tokens kept on each side of the activating token,
default 8); `features` (a list of feature indices: only these; default all); `sparse`
(true: the stages send only the non-zeros, sl.ops.Cache(sparse=True): for SAE latents a
small fraction of the dense bytes, for dense points such as neurons more; the result is
the same).

Only activations above zero count (where a feature fires); a feature that fires on fewer
than k tokens has fewer contexts. Ties rank by example, then position, so the output is a
function of the data alone.

Each work unit (one data batch) runs the clean prompts forward once and writes its own
per-feature top k as one part, `<experiment>/part-b<batch>.parquet` (hook, feature,
activation, example, pos): resumable like every kind. A part records in its Parquet
metadata the settings it depends on: the experiment's points, k and features, and the
campaign's model, dictionaries and data (path, clean, limit, batch_size); a run refuses
parts of other settings, naming the setting, since it would merge them with its own.
window and sparse are not among them: window only shapes the merge, which every run
redoes, and sparse only how the values travel (the parts are the same). After the last unit the parts are
merged, streaming (a running top k per feature, so memory stays at features x k rows), into
`<experiment>/top_contexts.parquet`, recomputed from the parts on every run: hook, feature,
rank (0: the largest), activation, example, pos, start (the position of tokens[0]) and
tokens (the window's token ids; tokens[pos - start] is the activating token).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from shardlens.hooks.ops import Cache
from shardlens.hooks.specs import HookSpec
from shardlens.tables.axes import layer_index, position_axis
from shardlens.tracer.campaign import experiments
from shardlens.tracer.campaign.experiments import hook_points
from shardlens.tracer.campaign.schema import Campaign, CampaignError

RESULT = "top_contexts.parquet"
DEFAULTS = {"k": 20, "window": 8, "features": None, "sparse": False}
option = functools.partial(experiments.option, defaults=DEFAULTS)  # (experiment, key) -> its value or the default
SETTINGS_KEY = b"shardlens.top_contexts"  # a part's schema metadata: the settings it was computed with (JSON)
CANDIDATES = pa.schema([("hook", pa.string()), ("feature", pa.int32()), ("activation", pa.float32()), ("example", pa.int64()), ("pos", pa.int32())])
RESULT_SCHEMA = pa.schema([
    ("hook", pa.string()), ("feature", pa.int32()), ("rank", pa.int32()), ("activation", pa.float32()), ("example", pa.int64()),
    ("pos", pa.int32()), ("start", pa.int32()), ("tokens", pa.list_(pa.int32())),
])
CANDIDATE_ROW_BYTES = 4 + 4 + 4 + 8 + 4  # the hook's string offset, feature, activation, example, pos
MERGE_PARTS = 16  # parts merged into the running top k at once


# ---------------------------------------------------------------------- the campaign file


def check_experiment(experiment: dict, file: str) -> None:
    """Refuse bad values of a top_contexts experiment's own keys, naming the line."""
    experiments.check_at_least(experiment, file, {"k": 1, "window": 0}, DEFAULTS)
    features = experiment.get("features")
    if features is not None:
        bad = [f for f in features if not isinstance(f, int) or isinstance(f, bool) or f < 0]
        if bad or not features or len(set(features)) != len(features):
            raise CampaignError(f"{experiments.key_line(experiment, file, 'features')}: experiment.features must be distinct feature "
                                f"indices >= 0; got {features!r}")


def part_settings(campaign: Campaign, experiment: dict) -> dict:
    """The settings an experiment's parts depend on (see the module docstring), as JSON gives them back."""
    features = option(experiment, "features")
    settings = {"points": experiment["points"], "k": option(experiment, "k"), "features": None if features is None else sorted(features),
                **experiments.made_by(campaign, data=("path", "clean", "limit", "batch_size"))}
    return json.loads(json.dumps(settings))


def check_parts(campaign: Campaign, experiment: dict, directory: Path) -> None:
    """Refuse the experiment's parts that other settings computed (a run would merge them
    with its own), naming the experiment and the settings that differ."""
    settings = part_settings(campaign, experiment)
    for part in sorted(directory.glob("part-b*.parquet")):
        written = json.loads((pq.read_schema(part).metadata or {}).get(SETTINGS_KEY, b"null"))
        if written == settings:
            continue
        differ = "no settings (an older shardlens wrote it)" if written is None else ", ".join(
            f"{key}={written.get(key)!r} (now {value!r})" for key, value in settings.items() if written.get(key) != value)
        raise CampaignError(f"{campaign.path}: experiment {experiment['name']!r} (top_contexts): {part.name} was computed with {differ}; "
                            f"remove {directory} to compute its parts again, or restore the settings")


# ---------------------------------------------------------------------- one unit


def run_unit(experiment: dict, tracer: Any, clean: Tensor, examples: Tensor, part: Path, *, settings: Mapping, write_atomic: Callable) -> None:
    """Run one data batch and write its per-feature top k as the unit's part, with `settings`
    (part_settings) in its metadata."""
    names = hook_points(experiment, tracer.hook_names())
    if option(experiment, "sparse"):
        _, cache = tracer.run_with_cache(clean, names_filter=[], fwd_hooks=[HookSpec(names, Cache(sparse=True))], return_type=None)
    else:
        _, cache = tracer.run_with_cache(clean, names_filter=names, return_type=None)
    tables = [_unit_candidates(experiment, name, cache[name], examples) for name in names]
    table = pa.concat_tables(tables) if tables else CANDIDATES.empty_table()
    table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode()})
    write_atomic(part, lambda temporary: pq.write_table(table, temporary, compression="zstd"))


def _unit_candidates(experiment: dict, name: str, entry: Tensor, examples: Tensor) -> pa.Table:
    if entry.ndim != 3 or position_axis(name) != 1:
        raise ValueError(f"experiment {experiment['name']!r} (top_contexts) reads [batch, pos, features] hook points; "
                         f"{name} has shape {list(entry.shape)}")
    token, feature, value = activating(entry, option(experiment, "features"), name)
    n_pos = entry.shape[1]
    example, pos = examples[token // n_pos], token % n_pos
    return candidate_table(name, feature, value, example, pos, option(experiment, "k"))


def activating(entry: Tensor, features: Optional[Sequence[int]], name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(token = example row x positions + pos, feature, activation) of every activation above
    zero of a [batch, pos, features] entry (dense or sparse), of the chosen features only."""
    n_features = entry.shape[-1]
    if features is not None and max(features) >= n_features:
        raise ValueError(f"features {sorted(f for f in features if f >= n_features)} are out of range at {name}: it has {n_features} features")
    if entry.is_sparse:
        entry = entry.coalesce()
        (row, pos, feature), value = entry.indices(), entry.values()
    else:
        row, pos, feature = (entry > 0).nonzero(as_tuple=True)
        value = entry[row, pos, feature]
    keep = value > 0
    if features is not None:
        keep &= torch.isin(feature, torch.tensor(list(features)))
    token = row * entry.shape[1] + pos
    return token[keep].cpu(), feature[keep].cpu(), value[keep].float().cpu()


def candidate_table(name: str, feature: Tensor, activation: Tensor, example: Tensor, pos: Tensor, k: int) -> pa.Table:
    """The k largest candidates of each feature, in the order of `rank_order`."""
    order, _ = rank_order(feature, activation.float(), example, pos, k)
    columns = {"hook": pa.array([name] * len(order), pa.string()), "feature": feature[order].int(), "activation": activation[order].float(),
               "example": example[order].long(), "pos": pos[order].int()}
    return pa.table({key: value if isinstance(value, pa.Array) else value.numpy() for key, value in columns.items()}, schema=CANDIDATES)


def rank_order(feature: Tensor, activation: Tensor, example: Tensor, pos: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(indices of the kept rows, their ranks): by feature, then activation from the largest,
    ties by example then position; each feature's first k."""
    order = torch.arange(len(feature))
    # Stable sorts from the least significant key to the most: a lexicographic sort.
    for key, descending in ((pos, False), (example, False), (activation, True), (feature, False)):
        order = order[torch.sort(key[order], descending=descending, stable=True).indices]
    rank = ranks(feature[order])
    keep = rank < k
    return order[keep], rank[keep]


def ranks(feature: Tensor) -> Tensor:
    """Each row's place within its feature's rows, for rows sorted by feature."""
    feature = feature.contiguous()
    return torch.arange(len(feature)) - torch.searchsorted(feature, feature)


# ---------------------------------------------------------------------- the merge


def finish(experiment: dict, directory: Path, tokens_of: Callable[[int], Sequence[int]], write_atomic: Callable) -> Path:
    """Merge the experiment's parts into top_contexts.parquet (replacing any earlier one);
    `tokens_of(example)` gives an example's token ids, for the windows."""
    k, window = option(experiment, "k"), option(experiment, "window")
    best = merged_candidates(sorted(directory.glob("part-b*.parquet")), k)
    tables = [_result_table(hook, best[hook], window, tokens_of) for hook in sorted(best, key=_hook_order)]
    table = pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()
    path = directory / RESULT
    write_atomic(path, lambda temporary: pq.write_table(table, temporary, compression="zstd"))
    return path


def merged_candidates(parts: Sequence[Path], k: int) -> dict[str, pa.Table]:
    """Each hook's top k per feature over the parts, merging a few parts at a time into a
    running top k (the top k of a union is in the union of the top ks)."""
    best: dict[str, pa.Table] = {}
    for start in range(0, len(parts), MERGE_PARTS):
        chunk = pa.concat_tables([pq.read_table(p, schema=CANDIDATES) for p in parts[start:start + MERGE_PARTS]])
        for hook in chunk.column("hook").unique().to_pylist():
            rows = chunk.filter(pc.equal(chunk.column("hook"), hook))
            best[hook] = _top(pa.concat_tables([best[hook], rows]) if hook in best else rows, hook, k)
    return best


def _top(table: pa.Table, hook: str, k: int) -> pa.Table:
    column = functools.partial(_column, table)
    return candidate_table(hook, column("feature"), column("activation"), column("example"), column("pos"), k)


def _column(table: pa.Table, key: str) -> Tensor:
    return torch.from_numpy(table.column(key).to_numpy().copy())  # a copy: arrow's buffers are read-only


def _result_table(hook: str, best: pa.Table, window: int, tokens_of: Callable[[int], Sequence[int]]) -> pa.Table:
    """The output rows of one hook point from its candidates (in rank order), with windows."""
    column = functools.partial(_column, best)
    pos, example = column("pos").long(), column("example")
    start, windows = _windows(example, pos, window, tokens_of)
    return pa.table({
        "hook": best.column("hook"), "feature": best.column("feature"), "rank": pa.array(ranks(column("feature")).int().numpy()),
        "activation": best.column("activation"), "example": best.column("example"), "pos": best.column("pos"),
        "start": pa.array(start.int().numpy()), "tokens": windows,
    }, schema=RESULT_SCHEMA)


def _windows(example: Tensor, pos: Tensor, window: int, tokens_of: Callable[[int], Sequence[int]]) -> tuple[Tensor, pa.Array]:
    """Each row's first window position, and its window's token ids: the prompt's tokens from
    `window` before `pos` to `window` after it, cut at the prompt's ends."""
    unique, inverse = torch.unique(example, return_inverse=True)
    prompts = [torch.tensor(tokens_of(int(e)), dtype=torch.int32) for e in unique]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int(lengths.max()) if len(prompts) else 1
    padded = torch.stack([torch.nn.functional.pad(p, (0, width - len(p))) for p in prompts]) if prompts else torch.zeros(0, 1, dtype=torch.int32)
    around = pos[:, None] + torch.arange(-window, window + 1)  # [rows, 2 x window + 1]
    inside = (around >= 0) & (around < lengths[inverse][:, None])
    ids = padded[inverse[:, None].expand_as(around), around.clamp(0, width - 1)][inside]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), inside.sum(1).cumsum(0)]).int()
    return (pos - window).clamp(min=0), pa.ListArray.from_arrays(pa.array(offsets.numpy()), pa.array(ids.numpy(), pa.int32()))


def _hook_order(hook: str) -> tuple:
    layer = layer_index(hook)
    return (-1 if layer is None else layer, hook)


# ---------------------------------------------------------------------- the campaign's side


def prompt_tokens(campaign: Campaign, batches: Sequence[list], tokenizer: Any) -> Callable[[int], list[int]]:
    """example -> its clean prompt's token ids, as the units ran them (a batch tokenized once)."""
    from shardlens.tracer.campaign.data import batch_tensors

    size = campaign.data.get("batch_size", 16)
    batch = functools.lru_cache(maxsize=4)(lambda b: batch_tensors(campaign, batches[b], tokenizer)["clean"])
    return lambda example: batch(example // size)[example % size].tolist()


def summary(experiment: dict, directory: Path) -> dict:
    """What summary.json says of a finished experiment: its hook points, how many features
    have contexts, and the largest activation of each hook point."""
    table = pq.read_table(directory / RESULT)
    hooks = sorted(set(table.column("hook").to_pylist()), key=_hook_order)
    top = {}
    for hook, feature, rank, activation in zip(*(table.column(c).to_pylist() for c in ("hook", "feature", "rank", "activation"))):
        if rank == 0 and (hook not in top or activation > top[hook]["activation"]):
            top[hook] = {"feature": feature, "activation": activation}
    features = len({(h, f) for h, f in zip(table.column("hook").to_pylist(), table.column("feature").to_pylist())})
    return {"kind": "top_contexts", "hooks": hooks, "features": features, "contexts": table.num_rows, "largest": top}
