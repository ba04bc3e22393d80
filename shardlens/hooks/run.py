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

from shardlens.hooks.metrics import Metric
from shardlens.hooks.specs import HookSpec
from shardlens.tables.arrow import check_layout
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


@dataclass(frozen=True)
class Resume:
    """Start a run at layer `layer`, with `resid_pre` [batch, pos, d_model] as that layer's
    input: what the whole forward gives when the layers before produced it, without
    recomputing them (sweeps start each patched variant at its layer)."""

    layer: int
    resid_pre: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"Resume.layer must be a layer index (an int >= 0); got {self.layer!r}")
        if not isinstance(self.resid_pre, Tensor) or self.resid_pre.ndim != 3:
            shape = tuple(self.resid_pre.shape) if isinstance(self.resid_pre, Tensor) else type(self.resid_pre).__name__
            raise ValueError(f"Resume.resid_pre must be [batch, pos, d_model]; got {shape}")


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
        kv_cache: a key/value cache of earlier tokens (the runner's own kind): only `input`,
            the new tokens, runs; the cache grows unless it is frozen.
        sources: earlier runs' caches by name, for sl.ops.Patch(from_cache=name).
        write: write what the specs read into this dataset instead of returning it.
        whole_batch: keep the batch whole on one pipeline (specs that select batch rows
            need it); a one-process runner always does.
        resume: start at a layer from given hidden states (see Resume).
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
        if self.resume is not None and self.kv_cache is not None:
            raise ValueError("a run starts either from a key/value cache or at a layer (resume), not both")

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
