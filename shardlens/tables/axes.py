"""Where batch, position and head live in the tensor of a hook point, by its name."""

from __future__ import annotations

from typing import Optional

PER_HEAD_SUFFIXES = (  # [batch, pos, head, ...]
    "hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
)
PATTERN_SUFFIXES = ("hook_attn_scores", "hook_pattern")  # [batch, head, q_pos, k_pos]


def base_name(entry: str) -> str:
    """The hook point of a cache entry: "blocks.0.hook_z_grad" -> "blocks.0.hook_z"."""
    return entry[: -len("_grad")] if entry.endswith("_grad") else entry


def position_axis(entry: str) -> int:
    """The position axis of a cache entry's tensor (the query axis of attention patterns)."""
    return 2 if base_name(entry).endswith(PATTERN_SUFFIXES) else 1


def head_axis(entry: str) -> Optional[int]:
    name = base_name(entry)
    if name.endswith(PER_HEAD_SUFFIXES):
        return 2
    if name.endswith(PATTERN_SUFFIXES):
        return 1
    return None


def layer_index(entry: str) -> Optional[int]:
    """The layer of "blocks.<layer>.…", or None for points outside the blocks."""
    parts = entry.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None
