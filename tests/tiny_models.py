"""Tiny random transformers checkpoints, saved as safetensors (no downloads).

Weights are drawn with a larger spread than transformers' default so that activations and
logits are of order one: a difference between two computations shows at 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from shardlens.hooks.toy import word_tokenizer

VOCAB = 97

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, initializer_range=0.2,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    ),
    "llama_gqa": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=1,
        pad_token_id=0,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.2, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, tie_word_embeddings=False,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, vocab_size=VOCAB,
        rotary_pct=0.5, initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, vocab_size=VOCAB,
        rotary_pct=0.5, initializer_range=0.2, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        use_parallel_residual=False,
    ),
}


def save_tiny_model(name: str, folder: Path, *, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Build the named tiny model with random weights and save it (and a tokenizer) to folder."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():  # biases and norms start at 0 / 1: give them spread too
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name or ".ln_" in param_name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    if with_tokenizer:
        word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


def load_reference(folder: Path) -> torch.nn.Module:
    """The checkpoint as a plain transformers model: the reference the tests compare against."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
