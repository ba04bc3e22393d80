"""Falcon (rotary variants; ALiBi Falcons are refused).

Falcon's attention computes attention itself rather than through transformers'
AttentionInterface, so while any of a layer's attention points has hooks its attention module
runs `falcon_attention` (in hooks/attention.py) instead: the same projections and rotary,
then shardlens' attention function, which gives the hook points.

The new decoder architecture (Falcon 40B, 180B, Falcon 2) is parallel with one norm for
attention (ln1) and one for the MLP (ln2); the older one is parallel with one shared norm.
The block adds the attention output into the MLP's output in place, so hook_mlp_out caches
a copy.
"""

from __future__ import annotations

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture
from shardlens.hooks.attention import falcon_attention


def falcon_architecture(config) -> Architecture:
    if getattr(config, "alibi", False):
        raise NotImplementedError("Falcon with ALiBi positions is not supported: shardlens supports rotary Falcon models")
    if not config.parallel_attn and not config.new_decoder_architecture:
        ln1, ln2, parallel = "input_layernorm", "post_attention_layernorm", False
    elif config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        ln1, ln2, parallel = "ln_attn", "ln_mlp", True
    else:
        ln1, ln2, parallel = "input_layernorm", None, True
    # how query_key_value lays out its heads (see falcon_attention), and how many kv heads it has
    if config.new_decoder_architecture:
        arrangement, n_kv = "falcon", config.num_kv_heads
    elif config.multi_query:
        arrangement, n_kv = "qkv", 1
    else:
        arrangement, n_kv = "qkv_per_head", config.num_attention_heads
    return Architecture(
        embed="transformer.word_embeddings", blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head",
        rotary="transformer.rotary_emb", cache_kwarg="layer_past", block_kwargs=(("alibi", None),), n_kv_heads=n_kv,
        attention_forward=falcon_attention,
        block=BlockArchitecture(
            ln1=ln1, ln2=ln2, attn="self_attention", o_proj="self_attention.dense", mlp="mlp",
            mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h", norm="layernorm", parallel=parallel,
            mlp_out_changed_in_place=parallel, qkv=(("self_attention.query_key_value", arrangement),),
        ),
    )
