"""Gemma, Gemma 2 and Gemma 3 (text).

All three scale the embeddings by sqrt(d_model) inside their embedding module (so hook_embed
is scaled) and compute RMSNorm in float32 as x / scale * (1 + weight). Gemma 2 and 3 add norms
on the attention and MLP outputs (ln1_post, ln2_post: hook_attn_out and hook_mlp_out are
their outputs, what the residual stream adds), alternate sliding-window and global layers,
and soft-cap the final logits (Gemma 2 also the attention scores, inside attention, so
hook_attn_scores is after the cap). Gemma 3 has per-head q/k norms and a rotary embedding
per attention kind. Gemma 3's multimodal checkpoints (model_type "gemma3": 4B and up) hold
the same text model under model.language_model, with its config as text_config; shardlens
hooks and shards that text model (its vision tower and projector are in no stage, so runs
take token ids only).
"""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture

GEMMA_BLOCK = replace(LLAMA_BLOCK, norm="gemma_rmsnorm")
GEMMA2_BLOCK = replace(
    GEMMA_BLOCK, ln1_post="post_attention_layernorm", ln2="pre_feedforward_layernorm", ln2_post="post_feedforward_layernorm",
)


def gemma_architecture(config) -> Architecture:
    return llama_architecture(config, GEMMA_BLOCK)


def gemma2_architecture(config) -> Architecture:
    return llama_architecture(config, GEMMA2_BLOCK, logit_softcap=getattr(config, "final_logit_softcapping", None))


def gemma3_architecture(config) -> Architecture:
    return llama_architecture(
        config, GEMMA2_BLOCK, logit_softcap=getattr(config, "final_logit_softcapping", None), rotary_by_layer_type=True,
    )


def gemma3_multimodal_architecture(config) -> Architecture:
    text = gemma3_architecture(config.get_text_config())
    return replace(
        text, embed="model.language_model.embed_tokens", blocks="model.language_model.layers",
        final_norm="model.language_model.norm", rotary="model.language_model.rotary_emb",
        logit_softcap=None,  # transformers' Gemma3ForConditionalGeneration does not soft-cap its logits
    )
