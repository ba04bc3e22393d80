"""GPT-2: learned absolute positions, LayerNorm, Conv1D projections."""

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture


def gpt2_architecture(config) -> Architecture:
    return Architecture(
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        blocks="transformer.h",
        embed_dropout="transformer.drop",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        block=BlockArchitecture(
            ln1="ln_1", attn="attn", o_proj="attn.c_proj", ln2="ln_2", mlp="mlp",
            mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", norm="layernorm", o_proj_kind="conv1d", qkv=(("attn.c_attn", "qkv"),),
        ),
    )
