"""Stage: one contiguous range of a model's layers, built without the rest of the model.

A Stage holds only its own modules (stage 0 the embeddings, the last stage the final norm
and unembedding), loaded tensor by tensor from the checkpoint, and runs them in order: what
the Hugging Face model's forward does for those layers. Its hook points carry the global
canonical names (blocks.{global layer}.…). Chaining every stage's forward gives the whole
model's forward; chaining their backward in reverse gives the whole model's gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.errors import ShardPlanError
from shardlens.hooks.architectures import Architecture, architecture_at, architecture_for
from shardlens.hooks.metrics import Metric
from shardlens.hooks.layers import default_positions, next_token_loss, positions_from_mask, run_layers
from shardlens.hooks.taps import LogitTransform, ModelParts, PointOptions
from shardlens.hooks.tapped_model import TappedModel
from shardlens.hooks.sources import model_config
from shardlens.sharding.checkpoint import Checkpoint
from shardlens.sharding.plan import ShardPlan, StagePlan, hf_path, meta_model, stage_modules


@dataclass(frozen=True)
class Graph:
    """What a stage's backward needs of one forward: the leaf its input hidden states became
    (None on stage 0) and the output to backpropagate from (the loss, or the hidden states
    or logits)."""

    leaf: Optional[Tensor]
    output: Tensor


@dataclass(frozen=True)
class StageIO:
    """What crosses a stage boundary.

    Stage 0 reads `input_ids` (and `attention_mask`, `position_ids`, `labels` when given);
    every stage passes on `hidden` [batch, pos, d_model] with the mask, positions and labels,
    from which the next stage rebuilds its attention mask and rotary embeddings. The last
    stage returns `logits`, and `loss`: the value of `metric` when one is given (labels are
    the tokens), else the mean next-token loss when labels are given; its logits cover the
    positions from `logits_from` on (RunRequest.logits_from: those the run needs). With
    `start_layer` the batch enters at that layer (which this stage holds) with `hidden` as
    its resid_pre (a worker fills it in from a base run when a resumed batch has none).
    """

    hidden: Optional[Tensor] = None
    input_ids: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None
    position_ids: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    metric: Optional[Metric] = None
    logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    start_layer: Optional[int] = None
    logits_from: int = 0


class Stage(TappedModel):
    """One stage of a model: see `build_stage`."""

    def __init__(self, config: Any, architecture: Architecture, stage_plan: StagePlan, modules: nn.ModuleDict, point_options: PointOptions = PointOptions()):
        super().__init__()
        self.config, self.architecture, self.stage_plan = config, architecture, stage_plan
        for name in ("embed", "pos_embed", "embed_dropout", "rotary", "final_norm", "unembed"):
            setattr(self, name, modules[name] if name in modules else None)
        self.blocks = modules["blocks"]
        self.logit_transform = LogitTransform(architecture) if stage_plan.head else None
        self.loaded_keys: tuple[str, ...] = ()
        self._pending: Optional[Graph] = None
        self.build_points(point_options)
        self.setup()

    @property
    def first(self) -> bool:
        return self.stage_plan.embed

    @property
    def last(self) -> bool:
        return self.stage_plan.head

    def _parts(self) -> ModelParts:
        return ModelParts(
            blocks={int(layer): block for layer, block in self.blocks.items()},
            embed=self.embed, pos_embed=self.pos_embed, final_norm=self.final_norm, unembed=self.unembed,
            logits=self.logit_transform,
        )

    def _module_root(self) -> nn.Module:
        return self

    def _blocks_path(self) -> str:
        return "blocks"

    # ------------------------------------------------------------------ running

    def forward(self, io: StageIO, cache: Any = None) -> StageIO:
        """Run this stage's layers on `io` (see StageIO). With gradients enabled, keeps what
        `backward` needs. With `cache` (a transformers DynamicCache of this stage's layers),
        `io` holds only new tokens, its attention mask covers the cached ones too, and the
        cache grows by the new tokens."""
        self.sync_taps()
        hidden, position_ids = self._entry(io, cached=cache is not None)
        leaf = None
        if torch.is_grad_enabled() and (not self.first or io.start_layer is not None):
            leaf = hidden = hidden.detach().requires_grad_(True)
        start = -1 if io.start_layer is None else io.start_layer
        blocks = {int(layer): block for layer, block in self.blocks.items() if int(layer) >= start}
        hidden = run_layers(
            self.config, self.architecture, blocks, self.rotary, hidden, attention_mask=io.attention_mask, position_ids=position_ids, cache=cache,
        )
        out = replace(io, hidden=hidden, input_ids=None, position_ids=position_ids, start_layer=None)
        if self.last:
            first = self.readout_start(io.logits_from)
            logits = self.readout(hidden, start=first)
            mask = None if io.attention_mask is None else io.attention_mask[:, -logits.shape[1]:]  # the logits' columns
            if io.metric is not None:
                loss = io.metric(logits, mask, None if io.labels is None else io.labels[:, -logits.shape[1]:])
            else:
                loss = next_token_loss(logits, io.labels, mask) if io.labels is not None and first == 0 else None
            out = replace(out, hidden=None, logits=logits, loss=loss)
        if torch.is_grad_enabled():
            self._pending = Graph(leaf, out.loss if out.loss is not None else (out.logits if self.last else out.hidden))
        return out

    def detach_graph(self) -> Optional[Graph]:
        """The graph the last forward kept (with gradients enabled), which this stage forgets:
        for a caller that keeps one per batch and passes it back to backward."""
        graph, self._pending = self._pending, None
        return graph

    def _entry(self, io: StageIO, cached: bool = False) -> tuple[Tensor, Tensor]:
        """The hidden states entering the first block, and the position ids."""
        if io.start_layer is not None:
            if str(io.start_layer) not in self.blocks or io.hidden is None:
                raise ValueError(f"stage {self.stage_plan.index} holds layers {list(self.blocks)}; a batch entering at layer {io.start_layer} needs it, and hidden states")
            return io.hidden, io.position_ids if io.position_ids is not None else default_positions(io.hidden, io.attention_mask)
        if not self.first:
            if io.hidden is None:
                raise ValueError(f"stage {self.stage_plan.index} takes hidden states from the stage before; StageIO.hidden is None")
            return io.hidden, io.position_ids
        if io.input_ids is None:
            raise ValueError("stage 0 takes token ids; StageIO.input_ids is None")
        position_ids = io.position_ids
        if position_ids is None and cached:
            if io.attention_mask is None:
                raise ValueError("a run with a key/value cache needs the attention mask of the cached and new tokens")
            position_ids = positions_from_mask(io.attention_mask)[:, -io.input_ids.shape[1]:]
        if position_ids is None:
            position_ids = default_positions(io.input_ids, io.attention_mask)
        hidden = self.embed(io.input_ids)
        if self.architecture.embed_multiplier != 1.0:  # Granite scales the embeddings in its forward
            hidden = hidden * self.architecture.embed_multiplier
        if self.pos_embed is not None:
            hidden = hidden + self.pos_embed(position_ids).to(hidden.device)
        if self.embed_dropout is not None:
            hidden = self.embed_dropout(hidden)
        return hidden, position_ids

    def backward(self, grad: Optional[Tensor] = None, graph: Optional[Graph] = None) -> Optional[Tensor]:
        """Backpropagate through `graph` (default: the last forward's): from its loss (grad
        None), or from the gradient of its output (hidden states, or logits on a last stage
        without labels). Returns the gradient of the stage's input hidden states (None on
        stage 0, unless the batch entered at a later layer)."""
        graph = graph if graph is not None else self.detach_graph()
        if graph is None:
            raise RuntimeError(f"stage {self.stage_plan.index}: backward() needs a forward with gradients enabled first")
        leaf, output = graph.leaf, graph.output
        if grad is None and output.numel() != 1:
            raise ValueError(f"stage {self.stage_plan.index} returned {tuple(output.shape)}, not a loss: pass the gradient of its output")
        output.backward(None if grad is None else grad.to(output.device))
        return None if leaf is None else leaf.grad


def build_stage(
    source: Union[str, os.PathLike], plan: ShardPlan, index: int, *, device: Union[str, torch.device, None] = None,
    point_options: PointOptions = PointOptions(),
) -> Stage:
    """Build stage `index` of `plan` from a checkpoint folder, reading only its own tensors.

    The stage's modules are made on the meta device; then exactly the tensors they hold are
    read from the safetensors files (single or sharded) and placed by the stage's device
    map, or all on `device` when given. Other stages' weights are never read. `point_options`
    switches on TransformerLens' optional hook points, as on a HookedModel.
    """
    if not 0 <= index < len(plan.stages):
        raise ShardPlanError(f"stage {index} does not exist: the plan has {len(plan.stages)} stages")
    config = model_config(source)
    if config.model_type != plan.model_type:
        raise ShardPlanError(f"the plan is for {plan.model_type!r}, but {source} holds a {config.model_type!r} model")
    architecture = _architecture(plan, config)
    stage_plan = plan.stages[index]
    skeleton = meta_model(config, plan.torch_dtype)
    modules = stage_modules(skeleton, architecture, stage_plan.layers, first=stage_plan.embed, last=stage_plan.head)
    stage = Stage(skeleton.config.get_text_config(), architecture, stage_plan, modules, point_options)
    checkpoint = Checkpoint(source, model=skeleton)
    _load(stage, checkpoint, architecture, device)
    return stage.eval()


def _architecture(plan: ShardPlan, config: Any) -> Architecture:
    """The architecture the plan was made with (imported by its path), else the one registered here."""
    if plan.architecture is not None:
        try:
            return architecture_at(plan.architecture, config)
        except LookupError as error:
            raise ShardPlanError(f"the plan's architecture cannot be used here: {error}; define it in a module every worker imports") from None
    architecture = architecture_for(config)
    if architecture is None:
        raise ShardPlanError(f"no architecture for model type {config.model_type!r} in this process, and the plan names none: use register_architecture")
    return architecture


def _load(stage: Stage, checkpoint: Checkpoint, architecture: Architecture, device: Any) -> None:
    """Read the stage's tensors, each in the dtype its skeleton gave it: the plan's, or float32
    where the model class keeps a module in float32 (DeepSeek-V3's router), as transformers does."""
    from accelerate.utils import set_module_tensor_to_device

    meta = dict(_meta_tensors(stage))
    wanted = {path: hf_path(path, architecture) for path in meta}
    tied = getattr(stage.config, "tie_word_embeddings", False)
    for path, name in wanted.items():
        if name not in checkpoint and path.startswith("unembed.") and tied:
            wanted[path] = f"{architecture.embed}.weight"  # tied: the last stage gets its own copy
    missing = sorted(name for name in wanted.values() if name not in checkpoint)
    if missing:
        raise ShardPlanError(f"{checkpoint.folder} lacks tensors stage {stage.stage_plan.index} needs: {missing[:5]}")
    tensors = checkpoint.read(sorted(set(wanted.values())))
    for path, name in wanted.items():
        target = device if device is not None else _device_for(path, stage.stage_plan.device_map)
        dtype = meta[path].dtype if meta[path].is_floating_point() else None
        set_module_tensor_to_device(stage, path, target, value=tensors[name], dtype=dtype)
    stage.loaded_keys = tuple(sorted(set(wanted.values())))
    if device is not None:
        stage.to(device)  # buffers made at init (rotary inv_freq) follow the weights
    elif len({str(d) for d in stage.stage_plan.device_map.values()}) > 1:
        from accelerate import dispatch_model

        dispatch_model(stage, device_map=stage.stage_plan.device_map)


def _meta_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return [(path, t) for path, t in named if t.device.type == "meta"]


def _device_for(path: str, device_map: dict) -> Any:
    """The device of the longest device-map prefix of a tensor path."""
    best, device = -1, "cpu"
    for prefix, target in device_map.items():
        if prefix == "" or path == prefix or path.startswith(prefix + "."):
            if len(prefix) > best:
                best, device = len(prefix), target
    return torch.device(f"cuda:{device}") if isinstance(device, int) else device
