"""ShardPlan: which layers each stage holds, and on which of its devices each module lives.

Stages are contiguous layer ranges balanced by parameter bytes: stage 0 also holds the
embeddings, the last stage the final norm and the unembedding (with tied embeddings the last
stage holds its own copy). Within a stage, accelerate's infer_auto_device_map spreads the
modules over the stage's devices under `max_memory`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from shardlens.errors import ShardPlanError
from shardlens.hooks.architectures import ARCHITECTURES, Architecture, architecture_for, architecture_path
from shardlens.hooks.sources import model_config
from shardlens.sharding.checkpoint import Checkpoint

Device = Union[int, str]


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan.

    Attributes:
        index: the stage's place in the pipeline, from 0.
        layers: the global indices of the layers it holds.
        devices: the devices of the stage's own host (ints are its GPUs, "cpu" its memory).
        device_map: stage module path -> device ("embed", "blocks.7", "final_norm", ...).
        bytes: parameter bytes the stage holds, in the plan's dtype.
        embed, head: whether it holds the embeddings / the final norm and unembedding.
        resources: custom cluster resources the stage's worker needs ({"node_a": 1} pins it
            to the nodes that advertise node_a); empty: any node where it fits.
        budget: the bytes max_memory gives the stage over all its devices; None without
            max_memory (see shardlens.sharding.estimate: what fits in it).
    """

    index: int
    layers: range
    devices: tuple
    device_map: dict
    bytes: int
    embed: bool
    head: bool
    resources: dict = field(default_factory=dict)
    budget: Optional[int] = None

    @property
    def host_bytes(self) -> int:
        """Parameter bytes the stage keeps in host memory (all of them unless it has GPUs)."""
        return 0 if any(isinstance(d, int) for d in self.devices) else self.bytes

    def to_dict(self) -> dict:
        return {
            "index": self.index, "layers": [self.layers.start, self.layers.stop], "devices": list(self.devices),
            "device_map": dict(self.device_map), "bytes": self.bytes, "embed": self.embed, "head": self.head,
            "resources": dict(self.resources), "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "StagePlan":
        devices = tuple(data["devices"])
        return cls(
            index=data["index"], layers=range(*data["layers"]), devices=devices, device_map=dict(data["device_map"]),
            bytes=data["bytes"], embed=data["embed"], head=data["head"], resources=dict(data.get("resources", {})),
            budget=data.get("budget"),
        )


@dataclass(frozen=True)
class ShardPlan:
    """Stages of one model: see `ShardPlan.for_model`. `architecture` is the import path of the
    architecture function the plan was made with (see hooks.architectures.register_architecture): the
    stages use it, in whatever process they are built."""

    model_type: str
    n_layers: int
    dtype: str
    stages: tuple
    architecture: Optional[str] = None

    @classmethod
    def for_model(
        cls,
        config_or_path: Any,
        *,
        stages: int,
        max_memory: Optional[dict] = None,
        dtype: Union[torch.dtype, str, None] = None,
        stage_resources: Optional[Sequence[dict]] = None,
    ) -> "ShardPlan":
        """Plan `stages` stages of a model.

        Args:
            config_or_path: a transformers config, or a checkpoint folder / hub id.
            stages: how many stages (each a contiguous range of at least one layer).
            max_memory: the memory of each stage's devices, as accelerate takes it
                ({0: "40GiB", 1: "40GiB"}: each stage has two GPUs of 40 GiB). None: each
                stage on one device, "cpu" (build_stage(device=...) can place it elsewhere).
            dtype: the parameter dtype the stages will hold; None: as transformers' dtype="auto",
                the dtype the config names (`dtype` / `torch_dtype`), else that of the
                checkpoint's weights (a local folder), else float32.
            stage_resources: one dict per stage of custom cluster resources its worker
                needs: [{"node_a": 1}, {"node_b": 1}] puts stage 0 on a node that advertises
                node_a and stage 1 on one with node_b. None: no requirement (a Ray cluster
                then spreads the stages over its nodes, see the Ray backend).

        Raises:
            ModelSourceError: a path that is no checkpoint folder (nor a hub id that loads).
            ShardPlanError: unknown architecture; more stages than layers; a stage that
                does not fit max_memory; stage_resources of the wrong length or form.
        """
        config = _config(config_or_path)
        if dtype is None:
            dtype = config_dtype(config) or _weights_dtype(config_or_path) or torch.float32
        architecture = architecture_for(config)
        if architecture is None:
            raise ShardPlanError(
                f"unknown architecture {config.model_type!r}: shardlens can shard {', '.join(sorted(ARCHITECTURES))}"
            )
        dtype = _dtype(dtype)
        n_layers = config.get_text_config().num_hidden_layers
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise ShardPlanError(f"stages must be a positive int; got {stages!r}")
        if stages > n_layers:
            raise ShardPlanError(f"stages={stages} but the model has {n_layers} layers: each stage needs at least one")
        resources = _stage_resources(stage_resources, stages)
        skeleton = meta_model(config, dtype)
        sizes = _part_bytes(skeleton, architecture, n_layers)
        ranges = balance(sizes["blocks"], stages, first_extra=sizes["embed"], last_extra=sizes["head"])
        stage_plans = []
        for index, layers in enumerate(ranges):
            first, last = index == 0, index == stages - 1
            size = sum(sizes["blocks"][i] for i in layers) + first * sizes["embed"] + last * sizes["head"]
            modules = stage_modules(skeleton, architecture, layers, first=first, last=last)
            devices, device_map = _device_map(modules, architecture, max_memory, size, index, layers)
            stage_plans.append(StagePlan(index, layers, devices, device_map, size, first, last, resources[index], stage_budget(max_memory)))
        return cls(config.model_type, n_layers, str(dtype).removeprefix("torch."), tuple(stage_plans), architecture_path(config.model_type))

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type, "n_layers": self.n_layers, "dtype": self.dtype,
            "stages": [s.to_dict() for s in self.stages], "architecture": self.architecture,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "ShardPlan":
        data = json.loads(text)
        stages = tuple(StagePlan.from_dict(s) for s in data["stages"])
        return cls(data["model_type"], data["n_layers"], data["dtype"], stages, data.get("architecture"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        """A table of the stages (stage, layers, devices, GB, and the resources asked for
        when any stage asks); printed and returned."""
        pinned = any(s.resources for s in self.stages)
        rows = [("stage", "layers", "devices", "GB") + ("resources",) * pinned]
        for s in self.stages:
            parts = [f"{s.layers.start}-{s.layers.stop - 1}"] + ["embed"] * s.embed + ["head"] * s.head
            row = (str(s.index), " + ".join(parts), ", ".join(map(str, s.devices)), f"{s.bytes / 1e9:.4g}")
            rows.append(row + (", ".join(f"{k}={v:g}" for k, v in s.resources.items()),) * pinned)
        text = f"{self.model_type}, {self.n_layers} layers, {self.dtype}\n" + text_table(rows)
        print(text)
        return text


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text, each column left-aligned to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


BUILT_IN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})  # Ray's own; the plan sets them


def _stage_resources(stage_resources: Optional[Sequence[dict]], stages: int) -> list[dict]:
    if stage_resources is None:
        return [{} for _ in range(stages)]
    if isinstance(stage_resources, dict) or not isinstance(stage_resources, Sequence) or len(stage_resources) != stages:
        raise ShardPlanError(
            f"stage_resources must be a list of {stages} dicts, one per stage (e.g. [{{'node_a': 1}}, ...]); got {stage_resources!r}"
        )
    checked = []
    for index, wanted in enumerate(stage_resources):
        if not isinstance(wanted, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for k, v in wanted.items()
        ):
            raise ShardPlanError(f"stage_resources[{index}] must map resource names to positive numbers; got {wanted!r}")
        reserved = sorted(set(wanted) & BUILT_IN_RESOURCES)
        if reserved:
            raise ShardPlanError(
                f"stage_resources[{index}] names {reserved}: the plan sets CPUs, GPUs and memory itself; give only custom resources"
            )
        checked.append(dict(wanted))
    return checked


def _config(config_or_path: Any) -> Any:
    if isinstance(config_or_path, (str, os.PathLike)):
        return model_config(config_or_path)
    if not hasattr(config_or_path, "model_type"):
        raise ShardPlanError(f"expected a transformers config or a checkpoint path; got {type(config_or_path).__name__}")
    return config_or_path


def _dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype):
        raise ShardPlanError(f"dtype must be a torch dtype such as torch.bfloat16; got {dtype!r}")
    return value


def config_dtype(config: Any) -> Optional[torch.dtype]:
    """The dtype a config names for its weights, or None."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return None if named is None or named == "auto" else _dtype(named)


def _weights_dtype(config_or_path: Any) -> Optional[torch.dtype]:
    """The dtype of a local checkpoint folder's first floating-point tensor, or None."""
    if not isinstance(config_or_path, (str, os.PathLike)) or not os.path.isdir(config_or_path):
        return None
    try:
        return Checkpoint(config_or_path).floating_dtype()
    except ShardPlanError:  # a folder with a config only: nothing to read
        return None


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The whole causal LM with parameters on the meta device (no memory for weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from shardlens.hooks.attention import IMPLEMENTATION

    architecture = architecture_for(config)
    # families whose attention modules get shardlens' forward keep transformers' own implementation
    implementation = IMPLEMENTATION if architecture is None or architecture.attention_forward is None else None
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=implementation)


def stage_modules(model: nn.Module, architecture: Architecture, layers: range, *, first: bool, last: bool) -> nn.ModuleDict:
    """The modules of one stage, named as a Stage names them: embed, pos_embed, embed_dropout
    (stage 0), blocks.{global layer}, rotary, final_norm and unembed (last stage)."""
    module = model.get_submodule
    parts: dict[str, nn.Module] = {}
    if first:
        parts["embed"] = module(architecture.embed)
        for name in ("pos_embed", "embed_dropout"):
            if getattr(architecture, name):
                parts[name] = module(getattr(architecture, name))
    blocks = module(architecture.blocks)
    parts["blocks"] = nn.ModuleDict({str(layer): blocks[layer] for layer in layers})
    if architecture.rotary:
        parts["rotary"] = module(architecture.rotary)
    if last:
        parts["final_norm"], parts["unembed"] = module(architecture.final_norm), module(architecture.unembed)
    return nn.ModuleDict(parts)


def hf_path(stage_path: str, architecture: Architecture) -> str:
    """The wrapped model's path of a stage module path ("blocks.3.mlp" -> "model.layers.3.mlp")."""
    head, _, rest = stage_path.partition(".")
    if head == "blocks":
        return f"{architecture.blocks}.{rest}"
    base = {"embed": architecture.embed, "pos_embed": architecture.pos_embed, "embed_dropout": architecture.embed_dropout,
            "rotary": architecture.rotary, "final_norm": architecture.final_norm, "unembed": architecture.unembed}[head]
    return f"{base}.{rest}" if rest else base


def _human(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes} B"


def _bytes(module: nn.Module) -> int:
    """Parameter bytes, each parameter in its own dtype (a model may keep some in float32)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _part_bytes(model: nn.Module, architecture: Architecture, n_layers: int) -> dict:
    module = model.get_submodule
    blocks = module(architecture.blocks)
    embed = _bytes(module(architecture.embed)) + (_bytes(module(architecture.pos_embed)) if architecture.pos_embed else 0)
    head = _bytes(module(architecture.final_norm)) + _bytes(module(architecture.unembed))  # its own copy when tied (and any bias)
    return {"embed": embed, "head": head, "blocks": [_bytes(blocks[i]) for i in range(n_layers)]}


def balance(sizes: list[int], stages: int, *, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous ranges of `sizes`, one per stage, minimising the largest stage's total
    (the first stage also carries first_extra, the last last_extra)."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)

    def cost(start: int, stop: int, stage: int) -> int:
        return prefix[stop] - prefix[start] + (stage == 0) * first_extra + (stage == stages - 1) * last_extra

    inf = float("inf")
    # best[s][i]: the smallest largest-stage total putting layers [0, i) on stages [0, s]
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, i, 0)
    for s in range(1, stages):
        for i in range(s + 1, n + 1):
            for j in range(s, i):
                value = max(best[s - 1][j], cost(j, i, s))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, stop = [], n
    for s in range(stages - 1, 0, -1):
        start = cut[s][stop]
        ranges.append(range(start, stop))
        stop = start
    ranges.append(range(0, stop))
    return ranges[::-1]


def stage_budget(max_memory: Optional[dict]) -> Optional[int]:
    """The bytes a stage's runs may use of its max_memory ({0: "40GiB", 1: 2**30}), or None:
    its accelerators' budgets together where it has any (what it offloads to "cpu" or "disk"
    is not where its activations live), else all of it."""
    if max_memory is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    accelerators = {device: value for device, value in max_memory.items() if isinstance(device, int)}
    return sum(v if isinstance(v, int) else convert_file_size_to_int(v) for v in (accelerators or max_memory).values())


def _device_map(
    modules: nn.ModuleDict, architecture: Architecture, max_memory: Optional[dict], size: int, index: int, layers: range
) -> tuple[tuple, dict]:
    if max_memory is None:
        return ("cpu",), {"": "cpu"}
    from accelerate import infer_auto_device_map

    where = f"stage {index} (layers {layers.start}-{layers.stop - 1})"
    if size > stage_budget(max_memory):
        raise ShardPlanError(
            f"{where} holds {_human(size)} of parameters, but max_memory gives a stage "
            f"{_human(stage_budget(max_memory))} over devices {', '.join(map(str, max_memory))}: use more stages or more memory"
        )
    block_class = type(next(iter(modules["blocks"].values()))).__name__
    # The plan is made for the stages' hosts, not this one: accelerate's warning that this
    # host lacks those GPUs is expected here.
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        device_map = infer_auto_device_map(modules, max_memory=dict(max_memory), no_split_module_classes=[block_class])
    finally:
        quiet.setLevel(level)
    outside = sorted({str(d) for d in device_map.values()} - {str(d) for d in max_memory})
    if outside:
        raise ShardPlanError(f"{where} does not fit max_memory {max_memory}: accelerate would put modules on {outside}")
    return tuple(max_memory), dict(device_map)
