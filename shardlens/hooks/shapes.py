"""The shapes and residual-stream facts of a model's canonical hook points, from its config
and architecture alone (nothing loaded): what every runner's hook_shape and cache say."""

from __future__ import annotations

from typing import Any, Optional

from shardlens.hooks.architectures import Architecture
from shardlens.hooks.hook_point import layer_of


def cache_fields(architecture: Optional[Architecture]) -> dict:
    """What an ActivationCache of a model laid out so needs to know of it: the final norm's
    kind (for apply_ln) and what each component is multiplied by as it enters the residual
    stream (for decompose_resid)."""
    if architecture is None:
        return {}
    return {
        "norm": "layernorm" if architecture.block.norm.startswith("layernorm") else "rmsnorm",  # centred or not
        "scales": {
            "hook_embed": architecture.embed_multiplier,
            "hook_attn_out": architecture.residual_multiplier, "hook_mlp_out": architecture.residual_multiplier,
        },
    }


def canonical_shape(config: Any, architecture: Architecture, name: str) -> Optional[tuple[int, ...]]:
    """The shape after [batch, pos] of the canonical hook point `name` of a model with this
    config and architecture; None for attention scores and patterns (they depend on the input)
    and a spliced dictionary's points."""
    if ".sae." in name:
        return None  # a spliced dictionary's point: its size is the dictionary's
    config = config.get_text_config()  # a multimodal model's language model
    d_model, n_heads = config.hidden_size, config.num_attention_heads
    n_kv = architecture.n_kv_heads or getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    d_qk = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0) or d_head  # DeepSeek's MLA
    d_v = getattr(config, "v_head_dim", None) or d_head
    point = name.rsplit(".", 1)[-1]
    if ".mlp.experts." in name:
        d_mlp = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    elif ".mlp.shared_expert." in name:
        d_mlp = getattr(config, "shared_expert_intermediate_size", None) or config.moe_intermediate_size * getattr(config, "n_shared_experts", 1)
    else:
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or getattr(config, "ffn_hidden_size", None) or 4 * d_model
    moe = architecture.block_at(layer_of(name)).moe if name.startswith("blocks.") else None
    shapes = {
        "hook_q": (n_heads, d_qk), "hook_k": (n_kv, d_qk), "hook_v": (n_kv, d_v), "hook_z": (n_heads, d_v),
        "hook_result": (n_heads, d_model), "hook_scale": (1,), "hook_logits": (config.vocab_size,), "hook_tokens": (),
        "hook_attn_in": (n_heads, d_model), "hook_q_input": (n_heads, d_model), "hook_k_input": (n_kv, d_model),
        "hook_v_input": (n_kv, d_model),
        "hook_pre": (d_mlp,), "hook_pre_linear": (d_mlp,), "hook_post": (d_mlp,),
        "hook_attn_scores": None, "hook_pattern": None,
    }
    if moe is not None:
        shapes.update({"hook_router_logits": (moe.n_experts,), "hook_expert_indices": (moe.top_k,), "hook_expert_weights": (moe.top_k,)})
    return shapes.get(point, (d_model,))

