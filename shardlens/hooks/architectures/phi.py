"""Phi (1, 1.5, 2) and Phi-3 / Phi-4.

Phi: a parallel block whose MLP reads the attention's norm (no ln2), LayerNorm, partial
rotary, optional q/k LayerNorms inside attention. Phi-3: Llama's sequential block with fused
q/k/v (inside attention) and a fused gate/up projection (hook_pre and hook_pre_linear are its
two halves), and a sliding window in every layer when the config has one.
"""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture


def phi_architecture(config) -> Architecture:
    return Architecture(
        embed="model.embed_tokens", blocks="model.layers", final_norm="model.final_layernorm", unembed="lm_head",
        rotary="model.rotary_emb", embed_dropout="model.embed_dropout",
        block=BlockArchitecture(
            ln1="input_layernorm", attn="self_attn", o_proj="self_attn.dense", mlp="mlp",
            mlp_in="mlp.fc1", mlp_out="mlp.fc2", norm="layernorm", parallel=True, qkv=LLAMA_BLOCK.qkv,
        ),
    )


def phi3_architecture(config) -> Architecture:
    block = replace(
        LLAMA_BLOCK, mlp_in="mlp.gate_up_proj", mlp_in_linear=None, fused_gate_up=True, qkv=(("self_attn.qkv_proj", "qkv"),),
    )
    return llama_architecture(config, block)
