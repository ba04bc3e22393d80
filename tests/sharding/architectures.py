"""An architecture registered by a test, in a module stage workers in other processes import."""

from dataclasses import replace

from shardlens.hooks.architectures.llama import llama_architecture


def doubled_logits_architecture(config):
    """Llama's architecture with the final logits doubled: a stage that uses it is plain to see."""
    return replace(llama_architecture(config), logit_multiplier=2.0)
