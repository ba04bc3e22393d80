"""A run as a value: what one forward (and backward) pass asks, and what it returns.

Every runner (HookedModel in this process, a Tracer over stage workers) takes a `RunRequest`
and gives a `RunResult`; the TransformerLens-compatible methods (`run_with_cache`,
`run_with_hooks`, `__call__`, `generate`) only build requests (see `hooks.hook_api`).

Example:
    >>> request = RunRequest(tokens, specs=(sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Cache()),))
    >>> result = model.run(request)
    >>> result.output.shape, result.cache["blocks.0.hook_resid_post"].shape
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from shardlens.hooks.layers import default_positions
from shardlens.hooks.metrics import Metric
from shardlens.hooks.ops import Cache
from shardlens.hooks.specs import HookSpec
from shardlens.tables.arrow import check_layout
from shardlens.tables.cache import ActivationCache
from shardlens.tables.parquet import ParquetSink, check_part_name

RETURN_TYPES = ("logits", "loss", "both", "metric", None)
RUN_LEVEL = 1_000_000  # a run's own specs are installed here, above every hooks() level


@dataclass(frozen=True)
class Destination:
    """Where a run writes what it caches, instead of returning it: the Parquet dataset at
    `path` (on a Tracer every worker must reach it: a local path on one machine, shared
    storage or an object store URI across nodes), in `layout` ("example" or "token"), as the
    dataset rows `examples` (one per example of the batch; None: 0..batch-1) of `batch`, with
    `metadata` in every part. With `name`, the parts of the microbatch starting at row r are
    named `<name>-<r>`, so that a batch written again replaces its parts."""

    path: str
    layout: str = "example"
    examples: Optional[Tensor] = None
    batch: int = 0
    metadata: Optional[Mapping[str, Any]] = None
    name: Optional[str] = None

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.name is not None:
            check_part_name(self.name)

    def rows(self, n: int) -> Tensor:
        """The dataset rows of a batch of `n` examples."""
        rows = torch.arange(n) if self.examples is None else torch.as_tensor(self.examples).long().cpu()
        if rows.shape != (n,):
            raise ValueError(f"examples must hold one index per example of the batch ({n}); got shape {tuple(rows.shape)}")
        return rows

    def part_name(self, start: int) -> Optional[str]:
        return None if self.name is None else f"{self.name}-{start:05d}"

    def sink(self) -> ParquetSink:
        """A sink that writes parts into this destination's dataset, one at a time."""
        return ParquetSink(self.path, metadata=dict(self.metadata or {}), layout=self.layout, threads=1)

    def write(self, values: Mapping[str, Tensor], attention_mask: Optional[Tensor]) -> list[str]:
        """Write what a whole batch's run read into this dataset, one part per hook point;
        returns the parts."""
        if not values:
            return []
        n = next(iter(values.values())).shape[0]
        cache = ActivationCache({k: v.cpu() for k, v in values.items()}, attention_mask=None if attention_mask is None else attention_mask.cpu(),
                                examples=self.rows(n), batch=self.batch)
        with self.sink() as sink:
            sink.write(cache, name=self.part_name(0))
        return sink.parts


class BaseRun:
    """A run its runner keeps so that variant runs can start inside it (see Resume): the
    hidden states entering each layer, and every layer's keys and values. Made by
    `runner.base_run(tokens)`; `close()` (or leaving its `with` block) frees what it holds.

    Attributes:
        tokens: its token ids [batch, pos].
        attention_mask: its attention mask (None: every token is real).
        logits: its logits [batch, pos, vocab].
    """

    def __init__(self, tokens: Tensor, attention_mask: Optional[Tensor], logits: Tensor):
        self.tokens, self.attention_mask, self.logits = tokens, attention_mask, logits

    def close(self) -> None:
        """Free what the runner keeps of this run."""

    def __enter__(self) -> "BaseRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class Resume:
    """Start a run inside a base run (see BaseRun), at layer `layer` and position `position`:
    the run's batch is the base run's repeated `repeat` times, one copy after another, and
    what it computes is what the whole forward of that batch computes, without the layers
    before `layer` (their output is the base run's hidden states entering `layer`) and
    without the positions before `position` (every layer run attends to the base run's keys
    and values there). A variant that changes nothing before (layer, position) gives the
    whole forward's result. The run's output covers the positions from `position` on.

    The request's input is the whole batch (the base run's tokens, repeated) and its
    attention mask that batch's.
    """

    base: BaseRun
    layer: int
    position: int = 0
    repeat: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.base, BaseRun):
            raise TypeError(f"Resume.base must be a BaseRun (runner.base_run(tokens)); got {type(self.base).__name__}")
        for name, low in (("layer", 0), ("position", 0), ("repeat", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Resume.{name} must be an int >= {low}; got {value!r}")
        if self.position >= self.base.tokens.shape[1]:
            raise ValueError(f"Resume.position must be 0..{self.base.tokens.shape[1] - 1} (the base run's positions); got {self.position}")

    def entry(self, tokens: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(position ids of the positions the run computes, the attention mask its layers
        take): the batch's mask, over the base run's positions before them too (all ones
        when the batch has none and the run starts after position 0)."""
        positions = default_positions(tokens, attention_mask)[:, self.position:]
        if attention_mask is None and self.position > 0:
            attention_mask = torch.ones_like(tokens)
        return positions, attention_mask

    @staticmethod
    def points(n_layers: int) -> tuple[str, ...]:
        """The hook points a base run keeps the values of: each layer's resid_pre."""
        return tuple(f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers))

    @staticmethod
    def keeping(n_layers: int) -> HookSpec:
        """The spec a base run keeps each layer's resid_pre with: as it enters the hook point,
        before the hooks there (a resumed run passes it through them again, once)."""
        return HookSpec(Resume.points(n_layers), Cache(), prepend=True)

    def check(self, tokens: Tensor, n_layers: int, request: "RunRequest", attention_mask: Optional[Tensor]) -> None:
        """Refuse a resumed run whose batch or attention mask is not the base run's repeated,
        a layer the model lacks, or a metric or loss that reads a position before the run's."""
        first = request.logits_from(tokens.shape[1], attention_mask, backward=request.needs_grad)
        if first < self.position and (request.metric is not None or request.return_type in ("loss", "both") or request.needs_grad):
            what = "the metric" if request.metric is not None else "the next-token loss"
            raise ValueError(f"{what} reads position {first}, before Resume.position {self.position}: resume at {first} or earlier")
        if self.layer >= n_layers:
            raise ValueError(f"resume at layer {self.layer}: the model has layers 0-{n_layers - 1}")
        expected = (self.base.tokens.shape[0] * self.repeat, self.base.tokens.shape[1])
        if tuple(tokens.shape) != expected:
            raise ValueError(
                f"a run resumed inside a base run of {tuple(self.base.tokens.shape)} repeated {self.repeat} times "
                f"takes a batch of {expected}; got {tuple(tokens.shape)}"
            )
        base_mask = torch.ones_like(self.base.tokens) if self.base.attention_mask is None else self.base.attention_mask
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        if not torch.equal(mask.cpu().long(), base_mask.cpu().long().repeat(self.repeat, 1)):
            raise ValueError("a run resumed inside a base run takes the base run's attention mask, repeated: its positions and keys come from it")


@dataclass(frozen=True)
class RunRequest:
    """What one run asks.

    Attributes:
        input: token ids [batch, pos] (or [pos]), or text (needs a tokenizer).
        attention_mask: [batch, pos], 1 for real tokens, 0 for padding; with `kv_cache` it
            covers the new tokens only.
        return_type: "logits", "loss", "both", "metric" or None.
        metric: an sl.metrics score: the value of return_type="metric", and what a
            gradient run backpropagates (default: the mean next-token loss).
        specs: hook specs active for this run only, one level above every other (sweeps'
            patches, run_with_cache's caching specs).
        grads: backpropagate the loss (or metric) after the forward pass, so that gradient
            specs (sl.ops.CacheGrad, ...) act.
        weight_grads: in a run that backpropagates, also compute the parameters' gradients
            (into their .grad). Without it the parameters are frozen for the run: only
            gradients of activations are computed, and no .grad is touched.
        kv_cache: a key/value cache of earlier tokens (the runner's own kind): only `input`,
            the new tokens, runs; the cache grows unless it is frozen.
        sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name).
        write: write what the specs read into this dataset instead of returning it.
        whole_batch: keep the batch whole on one pipeline (specs that select batch rows
            need it); a one-process runner always does.
        resume: start inside a base run, at a layer and position (see Resume).
        forward_kwargs: more keyword arguments for the wrapped model's forward (one process
            only; a plain HookedRootModule gets `input` and these as they are).
    """

    input: Any = None
    _: KW_ONLY
    attention_mask: Optional[Tensor] = None
    return_type: Optional[str] = "logits"
    metric: Optional[Metric] = None
    specs: tuple[HookSpec, ...] = ()
    grads: bool = False
    weight_grads: bool = False
    kv_cache: Any = None
    sources: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)
    write: Optional[Destination] = None
    whole_batch: bool = False
    resume: Optional[Resume] = None
    forward_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}; got {self.return_type!r}")
        if self.return_type == "metric" and self.metric is None:
            raise ValueError("return_type='metric' needs metric=sl.metrics....")
        if self.metric is not None and not isinstance(self.metric, Metric):
            raise TypeError(f"metric must be an sl.metrics score; got {type(self.metric).__name__}")
        if self.specs:
            object.__setattr__(self, "specs", tuple(self.specs))
            bad = [s for s in self.specs if not isinstance(s, HookSpec)]
            if bad:
                raise TypeError(f"a request's specs are sl.HookSpec values; got {type(bad[0]).__name__}")
        if self.metric is not None and self.metric.copies > 1 and not self.whole_batch:
            raise ValueError(f"a metric valued per copy ({self.metric.copies} copies) scores the whole batch: pass whole_batch=True")
        if self.resume is not None and self.kv_cache is not None:
            raise ValueError("a run starts either from a key/value cache or at a layer (resume), not both")

    def logits_from(self, seq_len: int, attention_mask: Optional[Tensor], *, backward: bool) -> int:
        """The first position whose logits the run needs, of `seq_len`: 0 when it returns
        logits or backpropagates the next-token loss, else the first position its metric
        reads (the last position when nothing is read). A runner may skip the unembedding
        of the positions before it."""
        if self.return_type in ("logits", "both"):
            return 0
        if self.metric is None:
            return 0 if backward or self.return_type == "loss" else seq_len - 1
        return self.metric.first_read(attention_mask, seq_len)

    @property
    def needs_grad(self) -> bool:
        """Whether this run backpropagates: asked for, or one of its own specs acts on gradients."""
        return self.grads or any(spec.needs_grad for spec in self.specs)


@dataclass(frozen=True)
class RunResult:
    """What one run returns.

    Attributes:
        output: what the request's return_type asks for (None for return_type=None).
        cache: what reading specs stored during the run, by entry name (gradients under
            ``<name>_grad``), on the runner's device; empty when the run wrote them.
        parts: the dataset parts written, when the request had a `write` destination.
        attention_mask: the batch's attention mask (None when every token is real).
    """

    output: Any
    cache: Mapping[str, Tensor] = field(default_factory=dict)
    parts: tuple[str, ...] = ()
    attention_mask: Optional[Tensor] = None


def output_of(return_type: Optional[str], logits: Optional[Tensor], loss: Optional[Tensor]) -> Any:
    """The output a return_type asks for, given the run's logits and loss (or metric)."""
    if return_type == "logits":
        return logits
    if return_type == "both":
        return logits, loss
    return None if return_type is None else loss
