"""DeepSeek-V3: multi-head latent attention and mixture-of-experts.

Attention points are the query, key and value heads that multi-head latent attention
finally attends with: hook_q and hook_k [batch, pos, head, qk_nope_head_dim +
qk_rope_head_dim] (the rotary part after rotary), hook_v [batch, pos, head, v_head_dim]; the
compressed latents (q_a_proj, kv_a_proj_with_mqa and their norms) are reachable as
`module:` points. The first `first_k_dense_replace` layers have a dense MLP; the others route
over `n_routed_experts` with sigmoid scores and group-limited top-k, plus shared experts.
"""

from shardlens.hooks.architectures.layout import ModelLayout
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_layout
from shardlens.hooks.architectures.moe import moe_block


def deepseek_v3_layout(config) -> ModelLayout:
    moe = moe_block(config, router="mlp.gate", shared_expert="mlp.shared_experts")
    blocks = tuple(LLAMA_BLOCK if layer < config.first_k_dense_replace else moe for layer in range(config.num_hidden_layers))
    return llama_layout(config, moe, layer_blocks=blocks)
