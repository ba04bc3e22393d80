"""Attention internals as hook points, through transformers' AttentionInterface.

`shardlens_attention` is registered under the name "shardlens" with both AttentionInterface
and AttentionMaskInterface (the latter with transformers' own SDPA mask builder, so the model
hands it the same causal / padding / sliding-window mask it would hand SDPA). Any model that
dispatches attention through that interface gets hook_q/k/v/attn_scores/pattern/z.

A layer none of whose score or pattern points has hooks takes transformers' SDPA path
(after the q/k/v hooks, if any, and before the z hooks: SDPA's output is z), except where SDPA cannot compute what the layer asks for
(Gemma 2's soft-capped scores, gpt-oss's attention sinks); otherwise the layer computes what
eager attention computes, with the hook points in between.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

from shardlens.hooks.hook_point import HookPoint

IMPLEMENTATION = "shardlens"
_POINTS_ATTR = "_shardlens_attention_points"


class AttentionPoints(nn.Module):
    """The attention hook points of one layer: q, k, v [batch, pos, head, d_head] (after
    rotary; k and v have n_kv_heads), scores and pattern [batch, head, q_pos, k_pos], z."""

    def __init__(self):
        super().__init__()
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern, self.hook_z = HookPoint(), HookPoint(), HookPoint()

    def attach_to(self, attention_module: nn.Module) -> None:
        """Make `attention_module`'s calls to shardlens_attention run through these points."""
        # A plain tuple (fast to read on every call), set with object.__setattr__ so that it is
        # not registered as a submodule of the Hugging Face model.
        points = (self.hook_q, self.hook_k, self.hook_v, self.hook_attn_scores, self.hook_pattern, self.hook_z)
        object.__setattr__(attention_module, _POINTS_ATTR, points)


def _through(point: HookPoint, states: Tensor) -> Tensor:
    """Run [batch, head, pos, d_head] states through a [batch, pos, head, d_head] hook point."""
    return point(states.transpose(1, 2)).transpose(1, 2)


def _bool_mask(attention_mask: Optional[Tensor], q_len: int, k_len: int, device: torch.device) -> Optional[Tensor]:
    """A boolean mask (True: attend) for the scores, or None when nothing is masked."""
    if attention_mask is not None:
        return attention_mask[..., :k_len] if attention_mask.dtype == torch.bool else attention_mask
    if q_len == 1:
        return None
    # SDPA's mask builder leaves the mask out only when kv and query lengths agree: causal.
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def shardlens_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> tuple[Tensor, Optional[Tensor]]:
    """Attention for [batch, head, pos, d_head] query and [batch, kv_head, pos, d_head] key/value.

    Returns the output as [batch, pos, head, d_head] and the pattern (None on the SDPA path),
    as every transformers attention function does.
    """
    points = module.__dict__.get(_POINTS_ATTR)
    # SDPA has no soft-capping and no attention sinks: such layers always take the path below.
    plain = kwargs.get("softcap") is None and kwargs.get("s_aux") is None
    if points is None:
        if plain:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return _attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, kwargs=kwargs, points=_NO_POINTS)
    hook_q, hook_k, hook_v, hook_scores, hook_pattern, hook_z = points
    if hook_q.active:
        query = _through(hook_q, query)
    if hook_k.active:
        key = _through(hook_k, key)
    if hook_v.active:
        value = _through(hook_v, value)
    if plain and not (hook_scores.active or hook_pattern.active):  # SDPA's output is z: its hooks see it there
        z, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return (hook_z(z) if hook_z.active else z), None
    points = (hook_scores, hook_pattern, hook_z)
    return _attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, kwargs=kwargs, points=points)


def _identity(x: Tensor) -> Tensor:
    return x


_NO_POINTS = (_identity, _identity, _identity)


def _attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], *,
    dropout: float, scaling: Optional[float], kwargs: dict, points: tuple,
) -> tuple[Tensor, Tensor]:
    """What eager attention computes, with scores, pattern and z through `points`.

    Scores are after soft-capping (Gemma 2) and masking. With attention sinks (gpt-oss's
    s_aux, one logit per head that takes part in the softmax but has no value), the pattern
    leaves the sink out, so its rows sum to one minus the sink's share.
    """
    hook_scores, hook_pattern, hook_z = points
    # Grouped-query attention: query head h reads kv head h // groups (transformers' repeat_kv).
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [batch, head, q_pos, k_pos]
    softcap = kwargs.get("softcap")
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _bool_mask(attention_mask, query.shape[2], key.shape[2], query.device)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask[..., : key.shape[2]]  # an additive float mask
    scores = hook_scores(scores)
    sinks = kwargs.get("s_aux")
    if sinks is None:
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:
        sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        pattern = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1].to(query.dtype)
    pattern = hook_pattern(pattern)
    pattern_used = F.dropout(pattern, p=dropout, training=module.training) if dropout else pattern
    z = torch.matmul(pattern_used, value).transpose(1, 2).contiguous()  # [batch, pos, head, d_head]
    return hook_z(z), pattern


def falcon_attention(
    module: nn.Module,
    hidden_states: Tensor,
    alibi: Optional[Tensor],
    attention_mask: Optional[Tensor],
    position_ids: Optional[Tensor] = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """FalconAttention.forward (rotary Falcons), with attention through shardlens_attention.

    Keys and values keep their kv heads (grouped-query: query head h reads kv head
    h // (n_heads / n_kv_heads)), in the key/value cache too.
    """
    if alibi is not None:
        raise NotImplementedError("Falcon with ALiBi positions is not supported")
    batch, pos, _ = hidden_states.shape
    n_heads, d_head = module.num_heads, module.head_dim
    fused = module.query_key_value(hidden_states)
    if module.new_decoder_architecture:
        qkv = fused.view(batch, pos, module.config.num_kv_heads, -1, d_head)  # per kv head: its query heads, k, v
        query, key, value = qkv[..., :-2, :].flatten(2, 3), qkv[..., -2, :], qkv[..., -1, :]
    elif module.multi_query:
        qkv = fused.view(batch, pos, n_heads + 2, d_head)
        query, key, value = qkv[..., :-2, :], qkv[..., -2:-1, :], qkv[..., -1:, :]
    else:
        qkv = fused.view(batch, pos, n_heads, 3, d_head)
        query, key, value = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [batch, head, pos, d_head]
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    z, _ = shardlens_attention(module, query, key, value, attention_mask, scaling=module.inv_norm_factor)
    return module.dense(z.reshape(batch, pos, n_heads * d_head)), None


AttentionInterface.register(IMPLEMENTATION, shardlens_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
