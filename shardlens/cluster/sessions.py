"""Key/value sessions: keys and values of earlier tokens kept on the stages between runs.

A key/value session lives on the first replica's stages, each holding its own layers' keys
and values under the session's id. `StageKeyValueCache` is the driver's handle on one: a KeyValueCache
whose entries stay on the stages. A base run (`StageBaseRun`) is a session on every
replica's stages that also keeps the hidden states entering each layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from shardlens.hooks.generation import KeyValueCache, KeyValueCacheEntry
from shardlens.hooks.run import BaseRun


@dataclass(frozen=True)
class KVSession:
    """A key/value session kept on the stages: its id, whether a run may extend it, how many
    times a run repeats its batch (frozen sessions only), and how many tokens it holds before
    the run (a failed run cuts it back to them; a run of a frozen session attends to these
    first tokens only)."""

    session: str
    frozen: bool = False
    repeat: int = 1
    held: int = 0


class StageKeyValueCache(KeyValueCache):
    """A Tracer's key/value cache: each stage of the first replica keeps its own layers'
    keys and values under `session`; this handle holds only the attention mask so far, the
    frozen flag, and how many times a run repeats the cached batch.

    Example:
        >>> cache = tracer.init_kv_cache(batch_size=2)
        >>> tracer(prefix, past_kv_cache=cache); cache.freeze()
        >>> logits, acts = tracer.run_with_cache(suffix, past_kv_cache=cache)   # only the suffix runs
        >>> cache.close()                                                          # the stages forget it
    """

    def __init__(self, coordinator: Any, session: str, previous_attention_mask: Tensor, frozen: bool = False, times: int = 1):
        super().__init__(None, previous_attention_mask, frozen)
        self.coordinator, self.session, self.times = coordinator, session, times

    @property
    def entries(self) -> list[KeyValueCacheEntry]:
        """Every layer's past keys and values, fetched from the stages (of the cached batch,
        not repeated)."""
        by_layer = self.coordinator.kv_entries(self.session)
        return [KeyValueCacheEntry(*by_layer[layer]) for layer in sorted(by_layer)]

    def repeat(self, times: int) -> "StageKeyValueCache":
        """A frozen view whose batch is this batch repeated `times` times (the stages copy
        their entries per run; nothing is copied now)."""
        if not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive int; got {times!r}")
        return StageKeyValueCache(self.coordinator, self.session, self.previous_attention_mask.repeat(times, 1), True, self.times * times)

    def for_run(self) -> Any:
        raise TypeError("a Tracer's key/value cache lives on its stages: pass it as past_kv_cache= to the Tracer")

    def session_of_run(self) -> KVSession:
        """The session as one run sees it (before the run)."""
        return KVSession(self.session, self.frozen, self.times, self.seq_len)

    def close(self) -> None:
        """Make the stages forget this cache's keys and values (and every repeat of it)."""
        self.coordinator.end_session(self.session)


class StageBaseRun(BaseRun):
    """A Tracer's base run (see BaseRun): every replica's stages keep their layers' keys and
    values and the hidden states entering each of their layers under `session`; close()
    frees them."""

    def __init__(self, coordinator: Any, session: str, tokens: Tensor, attention_mask: Any, logits: Tensor):
        super().__init__(tokens, attention_mask, logits)
        self.coordinator, self.session = coordinator, session
        # a base run dropped without close() is freed when it is collected
        self._free = weakref.finalize(self, coordinator.end_session, session)

    def close(self) -> None:
        self._free()
