"""GPT-NeoX (Pythia): rotary on part of each head, LayerNorm, parallel residual by default."""

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture


def gpt_neox_architecture(config) -> Architecture:
    return Architecture(
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        embed_dropout="gpt_neox.emb_dropout",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        rotary="gpt_neox.rotary_emb",
        cache_kwarg="layer_past",
        block=BlockArchitecture(
            ln1="input_layernorm", attn="attention", o_proj="attention.dense",
            ln2="post_attention_layernorm", mlp="mlp",
            mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h", norm="layernorm",
            qkv=(("attention.query_key_value", "qkv_per_head"),),
            parallel=bool(getattr(config, "use_parallel_residual", True)),
        ),
    )
