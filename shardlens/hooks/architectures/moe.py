"""Mixture-of-experts families shaped like Llama: Mixtral, Qwen2-MoE, Qwen3-MoE (and the MoE
blocks of OLMoE, DeepSeek-V3, gpt-oss). Routing hook points: see taps.MoEPoints."""

from dataclasses import replace
from typing import Optional

from shardlens.hooks.architectures.layout import BlockLayout, ModelLayout, MoELayout
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_layout


def moe_block(config, *, router: str, shared_expert: Optional[str] = None, shared_expert_gate: Optional[str] = None,
              base: BlockLayout = LLAMA_BLOCK) -> BlockLayout:
    """`base` with its MLP replaced by routed experts (`mlp.experts`) behind `router`."""
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or config.n_routed_experts
    moe = MoELayout(
        router=router, experts="mlp.experts", n_experts=n_experts, top_k=config.num_experts_per_tok,
        shared_expert=shared_expert, shared_expert_gate=shared_expert_gate,
    )
    return replace(base, mlp_in=None, mlp_in_linear=None, mlp_out=None, moe=moe)


def mixtral_layout(config) -> ModelLayout:
    return llama_layout(config, moe_block(config, router="mlp.gate"))


def qwen_moe_layout(config) -> ModelLayout:
    """Qwen2-MoE (with a gated shared expert) and Qwen3-MoE: MoE in the layers the config's
    decoder_sparse_step and mlp_only_layers choose, Llama's MLP in the others."""
    shared = {"shared_expert": "mlp.shared_expert", "shared_expert_gate": "mlp.shared_expert_gate"}
    moe = moe_block(config, router="mlp.gate", **(shared if config.model_type == "qwen2_moe" else {}))
    sparse = [
        layer not in (config.mlp_only_layers or ()) and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0
        for layer in range(config.num_hidden_layers)
    ]
    return llama_layout(config, moe, layer_blocks=tuple(moe if s else LLAMA_BLOCK for s in sparse))
