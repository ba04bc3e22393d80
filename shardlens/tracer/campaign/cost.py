"""What a campaign will cost before it runs, from its file, its data and the model's config
alone (no weights are read): `shardlens plan CAMPAIGN`.

Per stage: the memory of the campaign's largest run against the stage's budget (see
shardlens.sharding.estimate for what is counted), and the bytes it sends and writes over
the whole campaign. Per experiment: its forward-equivalents (see `forward_equivalents`) and
the bytes it writes. The runs each work unit makes are those of shardlens.tracer.patching
and shardlens.tracer.attribution: a cached run of the clean batch (and of the corrupted
one, for attribution) in microbatches; attribution's corrupted run backpropagates; each
integrated-gradients point runs steps x batch rows forward and backward at once; a sweep
keeps one corrupted run (every layer's resid_pre, keys and values) and runs its cells up to
64 rows at a time (its default max_batch), each from the cell's layer and position.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from shardlens.hooks.architectures import architecture_for
from shardlens.hooks.run import Resume
from shardlens.hooks.shapes import canonical_shape
from shardlens.hooks.sources import model_config
from shardlens.sharding import Estimate, ShardPlan, estimate, fit_microbatch
from shardlens.sharding.estimate import format_bytes, model_hook_names, stage_table
from shardlens.sharding.plan import text_table
from shardlens.tracer.campaign import activations, top_contexts
from shardlens.tracer.campaign.experiments import hook_points
from shardlens.tracer.campaign.schema import Campaign, load_campaign
from shardlens.tracer.cells import resolve_points
from shardlens.tracer.patching import MAX_BATCH, head_positions, sweep_cells

MASK_BYTES = 8  # an int64 attention mask entry
TABLE_ROW_BYTES = 2 + 4 + 4 + 8 + 4 + 8 + 4  # layer, pos, head, value, batch, baseline, the point's string offset


def forward_equivalents(
    kind: str, *, cells: Sequence[tuple[Optional[int], int]] = (), n_points: int = 0, steps: int = 16, n_layers: int = 1,
    seq_len: int = 1,
) -> float:
    """The forward-equivalents of one work unit: forward passes of its data batch through the
    whole model. This is the one place the campaign's formula is written.

    Convention: a backward that computes the gradients of activations only (shardlens'
    gradient runs freeze the weights) costs about one forward, and counts as one.

    - extract, activations: 1 (one forward).
    - top_contexts: 1 (one forward; each feature's top k is kept on this process).
    - atp: 3 (the clean forward; the corrupted forward and its backward).
    - ig: 2 + n_points x steps x 2 (the clean and corrupted forwards; per hook point, its
      `steps` interpolated copies of the batch forward and backward).
    - sweep: 2 + the sum over `cells` (layer L, start position p) of
      (n_layers - L) / n_layers x (seq_len - p) / seq_len: the clean run and the corrupted run
      it starts from, then each cell runs the layers from its own on, over the positions
      from p on (a cell without a layer runs the whole forward). A position cell starts at
      its position, a head cell at 0 (or, with positions=, at the earliest), and none later
      than the first position the metric reads. A sweep runs cells in groups that start at
      the group's earliest cell, so it computes somewhat more than this.

    Example:
        >>> forward_equivalents("sweep", cells=[(0, 0), (1, 3)], n_layers=2, seq_len=4)
        3.125
    """
    if kind in ("extract", "activations"):
        return 1.0
    if kind == "top_contexts":
        return 1.0
    if kind == "atp":
        return 3.0
    if kind == "ig":
        return 2.0 + n_points * steps * 2
    if kind == "sweep":
        fractions = (1.0 if layer is None else (n_layers - layer) / n_layers * (seq_len - start) / seq_len for layer, start in cells)
        return 2.0 + sum(fractions)
    raise ValueError(f"experiment kind must be one of extract, activations, top_contexts, atp, ig, sweep; got {kind!r}")


@dataclass(frozen=True)
class ExperimentCost:
    """One experiment over every data batch: its hook points; its forward-equivalents, the
    forward passes of all the campaign's examples through the whole model it costs (each
    unit's `forward_equivalents` weighted by its share of the examples); the bytes it writes
    (raw values; a grid's Arrow table); and the peak of its largest run's largest stage."""

    name: str
    kind: str
    points: tuple
    forwards: float
    written_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class CampaignCost:
    """The cost of a whole campaign (see `campaign_cost`).

    Attributes:
        stages: per stage, the StageCost of the campaign's run with its largest peak, with
            sent_bytes and written_bytes over the whole campaign (written: what its workers
            write, the extract experiments' activations).
        experiments: one ExperimentCost per experiment.
    """

    name: str
    model_type: str
    dtype: str
    examples: int
    batches: int
    seq_len: int
    microbatch_size: int
    stages: tuple
    experiments: tuple

    @property
    def forwards(self) -> float:
        return sum(e.forwards for e in self.experiments)

    @property
    def written_bytes(self) -> int:
        return sum(e.written_bytes for e in self.experiments)

    def __str__(self) -> str:
        head = (f"{self.name}: {self.model_type}, {self.dtype}, {len(self.stages)} stages; {self.examples} examples in "
                f"{self.batches} batches, up to {self.seq_len} tokens, microbatches of {self.microbatch_size}")
        rows = [("experiment", "kind", "points", "forward-equivalents", "written", "peak")]
        for e in self.experiments:
            rows.append((e.name, e.kind, str(len(e.points)), f"{e.forwards:.4g}", format_bytes(e.written_bytes), format_bytes(e.peak_bytes)))
        table = text_table(rows)
        total = (f"total: {self.forwards:.4g} forward-equivalents (a backward counts as one forward), "
                 f"{format_bytes(self.written_bytes)} written")
        return "\n".join([head, stage_table(self.stages), "", table, total])

    def describe(self) -> str:
        """The stage table and the experiment table; printed and returned."""
        text = str(self)
        print(text)
        return text


@dataclass(frozen=True)
class _Model:
    """What the cost of a campaign's units needs of its model: plan, config, hook names."""

    plan: ShardPlan
    config: Any
    names: tuple
    spliced: Mapping = dataclasses.field(default_factory=dict)  # a spliced dictionary's points: their shapes after [batch, pos]

    def hook_names(self) -> list[str]:  # what resolve_points asks of a runner
        return list(self.names)

    @property
    def n_layers(self) -> int:
        return self.plan.n_layers

    def stage_of(self, layer: Optional[int]) -> int:
        return 0 if layer is None else next(s.index for s in self.plan.stages if layer in s.layers)


@dataclass(frozen=True)
class _Unit:
    """One experiment on one data batch: its forward-equivalents, bytes written, runs (as
    Estimates), and what its runs send: the tokens whose hidden states they send on from the
    stage they enter at (start stage -> tokens), the entries of the attention masks they send
    along (a sweep's corrupted run, and its runs from a later position, have one over every
    position), and the tokens whose gradients they send back; and what each stage writes."""

    forwards: float
    written: int
    runs: tuple
    forward_tokens: dict
    backward_tokens: int = 0
    mask_entries: dict = dataclasses.field(default_factory=dict)
    stage_written: tuple = ()  # what each stage's workers write (extract units)


def campaign_cost(path: os.PathLike) -> CampaignCost:
    """The cost of the campaign file at `path`, from its data and the model's config.json
    (no weights are read): stages, replicas, max_memory and microbatch_size from its cluster
    section ("auto": see `campaign_microbatch`).

    Example:
        >>> campaign_cost("examples/induction/campaign.yaml").describe()
    """
    campaign = load_campaign(path)
    model, batches = _model(campaign), _batch_shapes(campaign)
    split = -(-max(b for b, _ in batches) // campaign.cluster.get("replicas", 1))  # each batch over the replicas
    size = campaign_microbatch(campaign, model=model, batches=batches) or split
    points = {e["name"]: _points(e, model) for e in campaign.experiments}
    units = {e["name"]: [_unit(e, points[e["name"]], campaign, _Batch(model, b, t, size)) for b, t in batches] for e in campaign.experiments}
    experiments = tuple(_experiment_cost(e, points[e["name"]], units[e["name"]], batches) for e in campaign.experiments)
    stages = _stage_costs(model, [u for us in units.values() for u in us])
    return CampaignCost(campaign.name, model.plan.model_type, model.plan.dtype, sum(b for b, _ in batches), len(batches),
                        max(t for _, t in batches), size, stages, experiments)


def _experiment_cost(experiment: dict, points: list[str], units: list[_Unit], batches: list) -> ExperimentCost:
    """An experiment's units summed: forward-equivalents weighted by each batch's share of the examples."""
    examples = sum(b for b, _ in batches)
    forwards = sum(u.forwards * b for u, (b, _) in zip(units, batches)) / examples
    peak = max(run.peak_bytes for u in units for run in u.runs)
    return ExperimentCost(experiment["name"], experiment["kind"], tuple(points), forwards, sum(u.written for u in units), peak)


def campaign_microbatch(campaign: Campaign, *, model: Optional[_Model] = None, batches: Optional[list] = None) -> Optional[int]:
    """The microbatch size a campaign starts its Tracer with: cluster.microbatch_size (None:
    each batch split over the replicas); for "auto" the largest with which every
    microbatched run of its experiments (the cached clean and corrupted runs, attribution's
    backward) fits every stage's budget, at its longest data batch."""
    size = campaign.cluster.get("microbatch_size")
    if size != "auto":
        return size
    model = model if model is not None else _model(campaign)
    batches = batches if batches is not None else _batch_shapes(campaign)
    batch = max(b for b, _ in batches)
    seq_len = max(t for _, t in batches)
    fits = [batch]
    for experiment in campaign.experiments:
        names = _points(experiment, model)
        for incl_bwd in (False, True) if experiment["kind"] == "atp" else (False,):
            fits.append(fit_microbatch(model.plan, model.config, seq_len=seq_len, names=names, incl_bwd=incl_bwd, batch=batch,
                                       shapes=model.spliced))
    return min(fits)


# ---------------------------------------------------------------------- the campaign's model and data


def _model(campaign: Campaign) -> _Model:
    source, cluster = campaign.model_source, campaign.cluster
    config = model_config(source)
    plan = ShardPlan.for_model(
        source, stages=cluster.get("stages", 1), max_memory=cluster.get("max_memory"), dtype=campaign.model.get("dtype"),
        stage_resources=cluster.get("stage_resources"),
    )
    names = model_hook_names(plan, config)
    spliced = _spliced_points(campaign, names)
    return _Model(plan, config, tuple(names) + tuple(spliced), spliced)


def _spliced_points(campaign: Campaign, names: list[str]) -> dict[str, tuple[int]]:
    """The points the campaign's dictionaries make, with their sizes (from the files' headers)."""
    shapes = {}
    for spec in campaign.dictionary_specs():
        dictionary = spec.op.dictionary
        for name in spec.created_names(spec.resolve(names)):
            shapes[name] = (dictionary.d_sae,) if name.endswith(".sae.hook_latents") else (dictionary.d_out,)
    return shapes


def _batch_shapes(campaign: Campaign) -> list[tuple[int, int]]:
    """(examples, tokens) of each data batch, from the clean prompts (text through the model's tokenizer)."""
    from shardlens.hooks.model import load_tokenizer
    from shardlens.tracer.campaign.data import check_fields, load_rows
    rows = load_rows(campaign)
    check_fields(campaign, rows)
    tokenizer = load_tokenizer(campaign.model_source) if any(isinstance(r.get(campaign.data.get("clean", "clean")), str) for r in rows) else None
    size = campaign.data.get("batch_size", 16)
    # padded shapes: the prompts of an activations experiment's batch may differ in length
    return [tuple(activations.token_batch(campaign, rows[i:i + size], tokenizer).ids.shape) for i in range(0, len(rows), size)]


def _points(experiment: dict, model: _Model) -> list[str]:
    """The hook names an experiment reads, as units.py resolves them."""
    if experiment["kind"] in ("extract", "top_contexts", "activations"):
        return hook_points(experiment, model.names)
    return resolve_points(model, experiment["points"], tuple(experiment.get("over", ["layer", "pos"])))


# ---------------------------------------------------------------------- the units


@dataclass(frozen=True)
class _Batch:
    """One data batch of a campaign: `rows` examples of `seq_len` tokens, run in microbatches of `size`."""

    model: _Model
    rows: int
    seq_len: int
    size: int

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def run(self, rows: int, names: Sequence[str], *, incl_bwd: bool = False, whole: bool = False) -> Estimate:
        """The estimate of one run of `rows` examples caching `names` (whole: in one microbatch)."""
        return estimate(self.model.plan, self.model.config, batch=rows, seq_len=self.seq_len, names=names, incl_bwd=incl_bwd,
                        microbatch_size=None if whole else self.size, shapes=self.model.spliced)


def _unit(experiment: dict, names: list[str], campaign: Campaign, batch: _Batch) -> _Unit:
    kind, rows, tokens = experiment["kind"], batch.rows, batch.tokens
    if kind == "extract":  # its workers write what they cache
        run = batch.run(rows, names)
        return _Unit(1.0, run.written_bytes, (run,), {0: tokens}, stage_written=tuple(s.written_bytes for s in run.stages))
    if kind == "activations":  # the driver gathers what it caches, and writes it in the experiment's dtype (no padding assumed)
        run = batch.run(rows, names)
        return _Unit(forward_equivalents(kind), activations.written_bytes(experiment, run.written_bytes, batch.model.plan.dtype), (run,), {0: tokens})
    if kind == "top_contexts":  # the driver gathers what it caches, and writes each feature's top k
        return _Unit(forward_equivalents(kind), _top_contexts_bytes(experiment, names, batch), (batch.run(rows, names),), {0: tokens})
    written = _table_bytes(experiment, names, batch.model, batch.seq_len)
    if kind == "atp":
        return _Unit(3.0, written, (batch.run(rows, names), batch.run(rows, names, incl_bwd=True)), {0: 2 * tokens}, tokens)
    if kind == "ig":
        steps = experiment.get("steps", 16)
        per_point = tuple(batch.run(steps * rows, [n], incl_bwd=True, whole=True) for n in names)
        forwards = forward_equivalents("ig", n_points=len(names), steps=steps)
        return _Unit(forwards, written, (batch.run(rows, names), *per_point), {0: (2 + len(names) * steps) * tokens}, len(names) * steps * tokens)
    return _sweep_unit(experiment, names, campaign, batch, written)


def _sweep_unit(experiment: dict, names: list[str], campaign: Campaign, batch: _Batch, written: int) -> _Unit:
    """A sweep: the clean cached run, the corrupted run it keeps (each layer's resid_pre,
    keys and values, held while its cells run), and its cells' runs."""
    model, seq_len = batch.model, batch.seq_len
    cells = _sweep_cells(experiment, names, model, campaign, seq_len)
    kept = [*Resume.points(model.n_layers), *(f"blocks.{layer}.attn.hook_{kv}" for layer in range(model.n_layers) for kv in "kv")]
    base = batch.run(batch.rows, kept, whole=True)
    variants = batch.run(min(max(1, MAX_BATCH // batch.rows), len(cells)) * batch.rows, [], whole=True)
    variants = dataclasses.replace(variants, stages=tuple(
        dataclasses.replace(s, activation_bytes=s.activation_bytes + b.activation_bytes) for s, b in zip(variants.stages, base.stages)
    ))
    entering, masks = {0: 2 * batch.tokens}, {0: batch.tokens}  # the clean run; the corrupted one, with a mask
    for layer, start in cells:
        stage = model.stage_of(layer)
        entering[stage] = entering.get(stage, 0) + batch.rows * (seq_len - start)
        if start > 0:  # it reads the positions before from the corrupted run's keys and values, past a mask over all of them
            masks[stage] = masks.get(stage, 0) + batch.tokens
    forwards = forward_equivalents("sweep", cells=cells, n_layers=model.n_layers, seq_len=seq_len)
    return _Unit(forwards, written, (batch.run(batch.rows, names), base, variants), entering, mask_entries=masks)


def _sweep_cells(experiment: dict, names: list[str], model: _Model, campaign: Campaign, seq_len: int) -> list[tuple[Optional[int], int]]:
    """(layer, start position) of every cell, as patching.sweep starts them (no padding assumed)."""
    first_read = 0 if campaign.metric.get("kind", "logit_diff") == "loss" else seq_len - 1
    over = experiment.get("over", ["layer", "pos"])
    counts = {name: seq_len if over[1] == "pos" else _heads(model, name) for name in names}
    positions = experiment.get("positions")
    positions = None if positions is None else head_positions(positions, seq_len)
    return [(cell.layer, cell.position) for cell in sweep_cells(names, over, counts, positions=positions, first_read=first_read)]


def _heads(model: _Model, name: str) -> int:
    return canonical_shape(model.config, architecture_for(model.config), name)[0]


def _table_bytes(experiment: dict, names: list[str], model: _Model, seq_len: int) -> int:
    """The Arrow bytes of a sweep's or attribution's table for one batch: a row per cell."""
    over = experiment.get("over", ["layer", "pos"])[1]
    cells = {"pos": lambda n: seq_len, "head": lambda n: _heads(model, n), "feature": lambda n: _features(model, n)}[over]
    return sum(cells(n) * (TABLE_ROW_BYTES + len(n.encode())) for n in names)


def _top_contexts_bytes(experiment: dict, names: list[str], batch: _Batch) -> int:
    """A top_contexts unit's part: at most k (and at most its tokens) rows per feature."""
    k = min(top_contexts.option(experiment, "k"), batch.tokens)
    features = top_contexts.option(experiment, "features")
    counts = [len(features) if features else _features(batch.model, n) for n in names]
    return sum(k * count * (top_contexts.CANDIDATE_ROW_BYTES + len(n.encode())) for n, count in zip(names, counts))


def _features(model: _Model, name: str) -> int:
    if name in model.spliced:
        return model.spliced[name][-1]
    return canonical_shape(model.config, architecture_for(model.config), name)[-1]


def _stage_costs(model: _Model, units: list[_Unit]) -> tuple:
    """Per stage, the cost of its largest run, with what it sends and writes over the campaign."""
    unit = estimate(model.plan, model.config, batch=1, seq_len=1, incl_bwd=True)  # per token: forward and backward
    forward_only = estimate(model.plan, model.config, batch=1, seq_len=1)
    stages = []
    for index in range(len(model.plan.stages)):
        largest = max((r.stages[index] for u in units for r in u.runs), key=lambda s: s.peak_bytes)
        forward = forward_only.stages[index].sent_bytes
        backward = unit.stages[index].sent_bytes - forward  # the gradient of its input, sent back (none from stage 0)
        sent = sum(tokens * forward for u in units for start, tokens in u.forward_tokens.items() if start <= index)
        if forward:  # not the last stage
            sent += sum(entries * MASK_BYTES for u in units for start, entries in u.mask_entries.items() if start <= index)
        sent += sum(u.backward_tokens for u in units) * backward
        written = sum(u.stage_written[index] for u in units if u.stage_written)
        stages.append(dataclasses.replace(largest, sent_bytes=sent, written_bytes=written))
    return tuple(stages)
