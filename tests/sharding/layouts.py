"""A layout registered by a test, in a module stage workers in other processes import."""

from dataclasses import replace

from shardlens.hooks.architectures.llama import llama_layout


def doubled_logits_layout(config):
    """Llama's layout with the final logits doubled: a stage that uses it is plain to see."""
    return replace(llama_layout(config), logit_multiplier=2.0)
