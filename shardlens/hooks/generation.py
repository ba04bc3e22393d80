"""Generation with hook points active, and a key/value cache of past tokens.

`KeyValueCache` has TransformerLens' shape (entries per layer of [batch, pos_so_far,
n_kv_heads, d_head] keys and values, the attention mask so far, freeze / unfreeze) and is
backed by the transformers DynamicCache the wrapped model consumes. A frozen cache is not
extended by a run: many inputs can share one cached prefix. Sliding-window layers keep every
token too (see full_cache), so a cache can always be cut back and copied exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class KeyValueCacheEntry:
    """One layer's past keys and values, [batch, pos_so_far, n_kv_heads, d_head] (views)."""

    past_keys: Tensor
    past_values: Tensor


class KeyValueCache:
    """Past keys and values of every layer, and the attention mask of the tokens they hold.

    Example:
        >>> cache = sl.KeyValueCache.init_cache(model.config, batch_size=2)
        >>> model(prefix, past_kv_cache=cache); cache.freeze()
        >>> logits = model(suffix, past_kv_cache=cache)   # runs only the suffix; cache unchanged
    """

    def __init__(self, hf_cache: Any, previous_attention_mask: Tensor, frozen: bool = False):
        self.hf_cache = hf_cache
        self.previous_attention_mask = previous_attention_mask
        self.frozen = frozen

    @classmethod
    def init_cache(cls, config: Any, device: Any = None, batch_size: int = 1) -> "KeyValueCache":
        mask = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return cls(full_cache(config), mask)

    def freeze(self) -> None:
        self.frozen = True

    def close(self) -> None:
        """Free the cached keys and values (a run can no longer use the cache)."""
        self.hf_cache = None

    def __enter__(self) -> "KeyValueCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def unfreeze(self) -> None:
        self.frozen = False

    @property
    def seq_len(self) -> int:
        return self.previous_attention_mask.shape[1]

    @property
    def entries(self) -> list[KeyValueCacheEntry]:
        return [KeyValueCacheEntry(layer.keys.transpose(1, 2), layer.values.transpose(1, 2)) for layer in self.hf_cache.layers]

    def __getitem__(self, layer: int) -> KeyValueCacheEntry:
        return self.entries[layer]

    def extended_mask(self, attention_mask: Tensor) -> Tensor:
        """The mask of the cached tokens and these new ones (the cache is left as it is)."""
        return torch.cat([self.previous_attention_mask.to(attention_mask.device), attention_mask.long()], dim=1)

    def append_attention_mask(self, attention_mask: Tensor) -> Tensor:
        """The mask of the cached tokens and these new ones; kept unless the cache is frozen."""
        mask = self.extended_mask(attention_mask)
        if not self.frozen:
            self.previous_attention_mask = mask
        return mask

    def truncate(self, length: int) -> None:
        """Keep only the first `length` cached tokens (undoing a run that failed midway)."""
        truncate_hf_cache(self.hf_cache, length)
        self.previous_attention_mask = self.previous_attention_mask[:, :length]

    def repeat(self, times: int) -> "KeyValueCache":
        """A frozen copy whose batch is this batch repeated `times` times, one after another
        (for running many variants against one cached prefix)."""
        copy = self._copy(lambda t: t.detach().repeat(times, 1, 1, 1))
        return KeyValueCache(copy, self.previous_attention_mask.repeat(times, 1), frozen=True)

    def for_run(self) -> Any:
        """The transformers cache to hand to one run: itself, or a copy when frozen."""
        if not self.frozen:
            return self.hf_cache
        return self._copy(lambda t: t.detach().clone())

    def _copy(self, transform: Any) -> Any:
        return copy_hf_cache(self.hf_cache, transform)


def full_cache(config: Any = None) -> Any:
    """A transformers DynamicCache (with a layer per layer of `config`, when given) whose
    sliding-window layers keep every token rather than the last window's worth: the sliding
    mask still limits what each query sees, and nothing is dropped that truncate or a copy
    would need."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer for layer in cache.layers]
    return cache


def truncate_hf_cache(hf_cache: Any, length: int, layers: Optional[Iterable[int]] = None) -> None:
    """Cut the keys and values of `layers` (default: all) of a transformers cache back to their
    first `length` positions; layers holding fewer are left as they are."""
    for index in range(len(hf_cache.layers)) if layers is None else layers:
        entry = hf_cache.layers[index]
        if getattr(entry, "keys", None) is not None and entry.keys.shape[-2] > length:
            entry.keys, entry.values = entry.keys[..., :length, :], entry.values[..., :length, :]


def copy_hf_cache(hf_cache: Any, transform: Any, *, config: Any = None, layers: Optional[Iterable[int]] = None) -> Any:
    """A new transformers cache (of `config`'s layer types, when given) holding
    transform(keys) and transform(values) of each layer of `hf_cache` (of `layers`, when
    given) that holds any."""
    copy = full_cache(config)
    wanted = None if layers is None else set(layers)
    for index, layer in enumerate(hf_cache.layers):
        if wanted is not None and index not in wanted:
            continue
        if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None:
            copy.update(transform(layer.keys), transform(layer.values), index)
    return copy


def prefix_copy(hf_cache: Any, length: int, times: int, *, config: Any, layers: Iterable[int]) -> Any:
    """A new transformers cache holding the first `length` tokens of `layers` of `hf_cache`,
    its batch repeated `times` times (what a run resumed inside a base run attends to)."""
    prefix = lambda t: t[:, :, :length].detach().repeat(times, 1, 1, 1)  # noqa: E731  [batch, kv_head, pos, d_head]
    return copy_hf_cache(hf_cache, prefix, config=config, layers=layers)


def sample(logits: Tensor, *, temperature: float, top_k: Optional[int], top_p: Optional[float], generator: Optional[torch.Generator]) -> Tensor:
    """The next token of each row of [batch, vocab] logits: greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def decode_loop(
    step: Any,
    tokens: Tensor,
    mask: Tensor,
    config: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_at_eos: bool = True,
    seed: Optional[int] = None,
    after_step: Any = None,
) -> Tensor:
    """The sampling loop, over any model: `step(tokens, mask, new_tokens, new_mask)` returns
    the logits of the newest position(s). Examples that produce the end-of-sequence token
    stop there and are padded with the pad token (as transformers' generate does)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; got {temperature}")
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else eos
    generator = None if seed is None else torch.Generator(device=tokens.device).manual_seed(seed)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    new_tokens, new_mask = tokens, mask
    for index in range(max_new_tokens):
        logits = step(tokens, mask, new_tokens, new_mask)
        token = sample(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if stop_at_eos and eos is not None:
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= token == eos
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        new_tokens, new_mask = token[:, None], torch.ones_like(token)[:, None]
        if after_step is not None:
            after_step(index)
        if stop_at_eos and eos is not None and bool(finished.all()):
            break
    return tokens
