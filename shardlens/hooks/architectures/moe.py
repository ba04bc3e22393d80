"""Mixture-of-experts families shaped like Llama: Mixtral, Qwen2-MoE, Qwen3-MoE (and the MoE
blocks of OLMoE, DeepSeek-V3, gpt-oss). Routing hook points: see taps.MoEPoints."""

from dataclasses import replace
from typing import Optional

from shardlens.hooks.architectures.architecture import BlockArchitecture, Architecture, MoEArchitecture
from shardlens.hooks.architectures.llama import LLAMA_BLOCK, llama_architecture


def moe_block(config, *, router: str, shared_expert: Optional[str] = None, base: BlockArchitecture = LLAMA_BLOCK) -> BlockArchitecture:
    """`base` with its MLP replaced by routed experts (`mlp.experts`) behind `router`."""
    counts = [getattr(config, name, None) for name in ("num_local_experts", "num_experts", "n_routed_experts")]
    n_experts = next((n for n in counts if n is not None), None)
    if not n_experts:
        raise ValueError(f"{config.model_type} config names no experts (num_local_experts / num_experts / n_routed_experts: {counts})")
    moe = MoEArchitecture(
        router=router, experts="mlp.experts", n_experts=n_experts, top_k=config.num_experts_per_tok, shared_expert=shared_expert,
    )
    return replace(base, mlp_in=None, mlp_in_linear=None, mlp_out=None, moe=moe)


def mixtral_architecture(config) -> Architecture:
    return llama_architecture(config, moe_block(config, router="mlp.gate"))


def qwen_moe_architecture(config) -> Architecture:
    """Qwen2-MoE (with a gated shared expert) and Qwen3-MoE: MoE in the layers the config's
    decoder_sparse_step and mlp_only_layers choose, Llama's MLP in the others."""
    sparse = [
        layer not in (config.mlp_only_layers or ()) and config.num_experts > 0 and (layer + 1) % config.decoder_sparse_step == 0
        for layer in range(config.num_hidden_layers)
    ]
    if not any(sparse):  # num_experts=0: a dense model
        return llama_architecture(config)
    shared = "mlp.shared_expert" if config.model_type == "qwen2_moe" else None  # (its sigmoid gate is not a point)
    moe = moe_block(config, router="mlp.gate", shared_expert=shared)
    return llama_architecture(config, moe, layer_blocks=tuple(moe if s else LLAMA_BLOCK for s in sparse))
