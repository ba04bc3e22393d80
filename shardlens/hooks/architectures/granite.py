"""Granite: Llama-shaped, with multipliers in its forward.

The embeddings are multiplied by `embedding_multiplier` after the embedding module (so
hook_embed is the module's output and blocks.0.hook_resid_pre is the scaled one), each
block adds `residual_multiplier` x hook_attn_out and x hook_mlp_out to the residual stream,
attention scores are scaled by `attention_multiplier` (inside attention), and the logits
are divided by `logits_scaling` (hook_logits is after the division).
"""

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import llama_architecture


def granite_architecture(config) -> Architecture:
    return llama_architecture(
        config, embed_multiplier=config.embedding_multiplier, residual_multiplier=config.residual_multiplier,
        logit_divisor=config.logits_scaling,
    )
