"""EXAONE 4: OLMo-2's placement of norms (on the outputs of attention and MLP, no ln1 or
ln2) with Llama's RMSNorm, q/k norms inside attention, and sliding-window layers."""

from dataclasses import replace

from shardlens.hooks.architectures.architecture import Architecture
from shardlens.hooks.architectures.llama import llama_architecture
from shardlens.hooks.architectures.olmo import OLMO2_BLOCK


def exaone4_architecture(config) -> Architecture:
    return llama_architecture(config, replace(OLMO2_BLOCK, norm="rmsnorm"))
