"""Running decoder blocks as a Hugging Face model's own forward runs them.

A HookedModel resuming at a layer and a sharded Stage both run a range of a model's blocks
outside the model's forward; this is the one place that knows what that forward hands each
block, and how both score the logits they end with.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shardlens.hooks.architectures import Architecture


def run_layers(
    config: Any,
    architecture: Architecture,
    blocks: dict[int, nn.Module],
    rotary: Optional[nn.Module],
    hidden: Tensor,
    *,
    attention_mask: Optional[Tensor],
    position_ids: Tensor,
    cache: Any = None,
) -> Tensor:
    """Run decoder blocks (global layer -> block, in order): causal and sliding-window masks
    from the 2-D attention mask (each layer the kind `architecture` gives it), rotary embeddings
    from the position ids (per attention kind where the family has one per kind), and the
    keywords the family's blocks need. With a transformers `cache` (of earlier tokens),
    `hidden` holds only the new tokens and `attention_mask` covers all of them."""
    if attention_mask is not None:
        attention_mask = attention_mask.to(hidden.device)
    mask_kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
    if cache is not None:
        mask_kwargs["layer_idx"] = min(blocks)  # the cache holds entries for this stage's layers only
    kinds = {layer: architecture.attention_kind(layer) for layer in blocks}
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    masks = {kind: builders[kind](**mask_kwargs) for kind in set(kinds.values())}
    if rotary is None:
        rotary_embeddings: dict[str, Any] = {}
    elif architecture.rotary_by_layer_type:
        rotary_embeddings = {kind: rotary(hidden, position_ids, kind) for kind in set(kinds.values())}
    else:
        rotary_embeddings = dict.fromkeys(kinds.values(), rotary(hidden, position_ids))
    shared: dict[str, Any] = {"position_ids": position_ids, **dict(architecture.block_kwargs)}
    if cache is not None:
        shared.update({architecture.cache_kwarg: cache, "use_cache": True})
    for layer, block in blocks.items():
        kind = kinds[layer]
        kwargs = {**shared, "attention_mask": masks[kind]}
        if rotary is not None:
            kwargs["position_embeddings"] = rotary_embeddings[kind]
        hidden = block(hidden, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def next_token_loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy of predicting each next token, over positions where both the token
    and its successor are real (not padding). Computed in float32."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]  # [batch, pos - 1]
    if attention_mask is None:
        return nll.mean()
    mask = attention_mask.to(logits.device).bool()
    return nll[mask[:, :-1] & mask[:, 1:]].mean()


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens, so a left-padded example sees the positions
    it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def default_positions(tokens_or_hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """The position ids a forward uses when none are given: from the mask when it has
    padding, else 0..pos-1 for every example (one row each, so that hook_pos_embed is
    [batch, pos, d_model])."""
    if attention_mask is not None and not bool(attention_mask.all()):
        return positions_from_mask(attention_mask)
    batch, pos = tokens_or_hidden.shape[:2]
    return torch.arange(pos, device=tokens_or_hidden.device).expand(batch, -1)
