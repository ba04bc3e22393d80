"""Falcon (rotary variants; ALiBi Falcons are refused).

Falcon's attention computes attention itself rather than through transformers'
AttentionInterface, so its attention modules get `falcon_attention` as their forward: the
same projections and rotary, then shardlens' attention function, which gives the hook points.
Keys and values keep their `num_kv_heads` heads (grouped-query: head h reads kv head
h // (n_heads / n_kv_heads)), and the key/value cache holds them that way.

The new decoder architecture (Falcon 40B, 180B, Falcon 2) is parallel with one norm for
attention (ln1) and one for the MLP (ln2); the older one is parallel with one shared norm.
The block adds the attention output into the MLP's output in place, so hook_mlp_out caches
a copy.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from shardlens.hooks.architectures.layout import BlockLayout, ModelLayout


def falcon_layout(config) -> ModelLayout:
    if getattr(config, "alibi", False):
        raise NotImplementedError("Falcon with ALiBi positions is not supported: shardlens supports rotary Falcon models")
    if not config.parallel_attn and not config.new_decoder_architecture:
        ln1, ln2, parallel = "input_layernorm", "post_attention_layernorm", False
    elif config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        ln1, ln2, parallel = "ln_attn", "ln_mlp", True
    else:
        ln1, ln2, parallel = "input_layernorm", None, True
    # how query_key_value lays out its heads (see falcon_attention)
    arrangement = "falcon" if config.new_decoder_architecture else "qkv" if config.multi_query else "qkv_per_head"
    return ModelLayout(
        embed="transformer.word_embeddings", blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
        rotary="transformer.rotary_emb", cache_kwarg="layer_past", block_kwargs=(("alibi", None),),
        attention_forward=falcon_attention,
        block=BlockLayout(
            ln1=ln1, ln2=ln2, attn="self_attention", o_proj="self_attention.dense", mlp="mlp",
            mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h", norm="layernorm", parallel=parallel,
            mlp_out_changed_in_place=parallel, qkv=(("self_attention.query_key_value", arrangement),),
        ),
    )


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
    """FalconAttention.forward, with attention through shardlens_attention."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    from shardlens.hooks.attention import shardlens_attention

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
    module.num_key_value_groups = n_heads // key.shape[1]  # what transformers' SDPA path reads for grouped-query
    z, _ = shardlens_attention(module, query, key, value, attention_mask, scaling=module.inv_norm_factor)
    return module.dense(z.reshape(batch, pos, n_heads * d_head)), None
