"""Tiny random transformers checkpoints, saved as safetensors (no downloads).

One per supported family, with the family's quirks switched on: grouped-query heads where the
family has them, sliding windows shorter than the test sequences (9 tokens), experts, tied and
untied embeddings, multipliers and soft-caps away from 1. Weights are drawn with a larger
spread than transformers' default so that activations and logits are of order one: a
difference between two computations shows at 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from shardlens.hooks.toy import word_tokenizer

VOCAB = 97

_COMMON = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
    initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0,
)
_GQA = dict(num_key_value_heads=2)
_COMMON_TEXT = {k: v for k, v in _COMMON.items()}
_MLP = dict(intermediate_size=64)
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]

# name -> (model_type, the config's own fields); every family is AutoConfig.for_model(model_type, ...)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict()),
    "llama_gqa": ("llama", dict(**_MLP, **_GQA)),
    "mistral": ("mistral", dict(**_MLP, **_GQA, sliding_window=4)),
    "qwen2": ("qwen2", dict(**_MLP, **_GQA, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(**_MLP, **_GQA, head_dim=8)),
    "smollm3": ("smollm3", dict(**_MLP, **_GQA, no_rope_layer_interval=2)),
    "seed_oss": ("seed_oss", dict(**_MLP, **_GQA)),
    "internlm3": ("internlm3", dict(**_MLP, **_GQA)),
    "ernie4_5": ("ernie4_5", dict(**_MLP, **_GQA)),
    "cwm": ("cwm", dict(**_MLP, **_GQA, sliding_window=4)),
    "gpt_neox": ("gpt_neox", dict(**_MLP, rotary_pct=0.5)),
    "gpt_neox_sequential": ("gpt_neox", dict(**_MLP, rotary_pct=0.5, use_parallel_residual=False)),
    "gptj": ("gptj", dict(n_inner=64, rotary_dim=4)),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False)),
    "falcon_7b": ("falcon", dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False)),
    "gemma": ("gemma", dict(**_MLP, **_GQA, head_dim=8)),
    "gemma2": ("gemma2", dict(**_MLP, **_GQA, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("gemma3_text", dict(**_MLP, **_GQA, head_dim=8, sliding_window=4, sliding_window_pattern=2, final_logit_softcapping=3.0)),
    "gemma3_multimodal": ("gemma3", dict(  # a 4B-and-up Gemma 3: the text model beside a (tiny) vision tower
        text_config=dict(**_COMMON_TEXT, **_MLP, **_GQA, head_dim=8, sliding_window=4, layer_types=_ALTERNATING, final_logit_softcapping=3.0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2, image_token_index=VOCAB - 1,
    )),
    "phi": ("phi", dict(**_MLP, partial_rotary_factor=0.5, qk_layernorm=True, tie_word_embeddings=False)),
    "phi3": ("phi3", dict(**_MLP, **_GQA, sliding_window=4, tie_word_embeddings=False)),
    "olmo": ("olmo", dict(**_MLP, **_GQA)),
    "olmo2": ("olmo2", dict(**_MLP, **_GQA)),
    "olmo3": ("olmo3", dict(**_MLP, **_GQA, sliding_window=4, layer_types=_ALTERNATING)),
    "exaone4": ("exaone4", dict(**_MLP, **_GQA, sliding_window=4, layer_types=_ALTERNATING)),
    "granite": ("granite", dict(**_MLP, **_GQA, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0, attention_multiplier=0.3)),
    "cohere": ("cohere", dict(**_MLP, **_GQA, logit_scale=0.5, use_qk_norm=True, head_dim=8)),
    "stablelm": ("stablelm", dict(**_MLP, **_GQA, partial_rotary_factor=0.5, qk_layernorm=True)),
    "stablelm_parallel": ("stablelm", dict(**_MLP, **_GQA, partial_rotary_factor=0.5, use_parallel_residual=True)),
    "starcoder2": ("starcoder2", dict(**_MLP, **_GQA, sliding_window=4)),
    "mixtral": ("mixtral", dict(**_MLP, **_GQA, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    "qwen2_moe": ("qwen2_moe", dict(
        **_MLP, **_GQA, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, tie_word_embeddings=False,
    )),
    "qwen3_moe": ("qwen3_moe", dict(**_MLP, **_GQA, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(**_MLP, **_GQA, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("deepseek_v3", dict(  # latent attention: keys and values for every head, as in DeepSeek-V3
        **_MLP, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, rope_scaling=None,
    )),
    "gpt_oss": ("gpt_oss", dict(**_MLP, **_GQA, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4, rope_scaling=None)),
}

# The families that TransformerLens-shaped tests run on: one checkpoint per model_type (and the variants above).
FAMILIES = list(FAMILY_CONFIGS)
MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def tiny_config(name: str) -> transformers.PretrainedConfig:
    model_type, fields = FAMILY_CONFIGS[name]
    common = {} if "text_config" in fields else _COMMON  # a multimodal config takes its text model's fields in text_config
    return AutoConfig.for_model(model_type, **{**common, **fields})


def save_tiny_model(name: str, folder: Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Build the named tiny model with random weights and save it (and a tokenizer) to folder."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(name))
    with torch.no_grad():  # biases, norms, routers and sinks start at 0 / 1: give them spread too
        for param_name, param in model.named_parameters():
            if param_name.endswith(("bias", "sinks")) or "norm" in param_name or ".ln_" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
            elif param_name.endswith(("gate.weight", "router.weight")) or ".experts." in param_name:
                param.normal_(0, 0.2)
    model.save_pretrained(folder)
    if with_tokenizer:
        word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def load_reference(folder: Path) -> torch.nn.Module:
    """The checkpoint as a plain transformers model: the reference the tests compare against."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
