"""GPT-J: a parallel block whose MLP reads the attention's norm (no ln2), LayerNorm,
interleaved rotary on part of each head, untied unembedding with a bias."""

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture


def gptj_architecture(config) -> Architecture:
    return Architecture(
        embed="transformer.wte", blocks="transformer.h", embed_dropout="transformer.drop", final_norm="transformer.ln_f",
        unembed="lm_head", rotary="transformer.rotary_emb",
        block=BlockArchitecture(
            ln1="ln_1", attn="attn", o_proj="attn.out_proj", mlp="mlp", mlp_in="mlp.fc_in", mlp_out="mlp.fc_out",
            norm="layernorm", parallel=True, qkv=(("attn.q_proj", "q"), ("attn.k_proj", "k"), ("attn.v_proj", "v")),
        ),
    )
