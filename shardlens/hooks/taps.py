"""Taps: how tensors inside a Hugging Face model are routed through canonical hook points.

The hook points live in a tree of containers named like TransformerLens' modules
(`blocks.3.attn.hook_q`); the wrapped model's own modules stay as they are. A tap connects
one hook point to one place in the model with torch module hooks, and is wired only while
its hook point has hooks (`sync()`), so a model with no hooks runs its plain forward.
"""

from __future__ import annotations

import types
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shardlens.hooks.architectures import BlockArchitecture, Architecture, MoEArchitecture
from shardlens.hooks.attention import AttentionPoints
from shardlens.hooks.hook_point import HookPoint


def _mapping_key(output: Mapping) -> Optional[str]:
    """The key of a ModelOutput's or dict's tensor part: `logits` where it has them (a causal
    LM, also when it computed a loss), else its first tensor value (a base model's
    last_hidden_state)."""
    if isinstance(output.get("logits"), Tensor):
        return "logits"
    return next((k for k, v in output.items() if isinstance(v, Tensor)), None)


def _first(output: Any) -> Optional[Tensor]:
    """The tensor part of a module's output: the output itself, the first tensor of a tuple or
    list, or (see _mapping_key) one tensor value of a ModelOutput or dict. None when it holds
    no tensor."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        key = _mapping_key(output)
        return None if key is None else output[key]
    values = output if isinstance(output, (tuple, list)) else ()
    return next((value for value in values if isinstance(value, Tensor)), None)


def _with_first(output: Any, first: Tensor) -> Any:
    """`output` with its tensor part (see _first) replaced by `first`."""
    if isinstance(output, Tensor):
        return first
    if isinstance(output, Mapping):
        output[_mapping_key(output)] = first  # a ModelOutput keeps its attribute and its item in step
        return output
    index = next(i for i, v in enumerate(output) if isinstance(v, Tensor))
    items = [*output[:index], first, *output[index + 1:]]
    return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)  # a namedtuple takes fields


class Tap:
    """Routes one tensor of the wrapped model through `point` while the point has hooks."""

    def __init__(self, point: HookPoint, module: nn.Module):
        self.point, self.module = point, module
        self._handles: list[Any] = []  # each has .remove()

    def wanted(self) -> bool:
        return self.point.active

    def sync(self) -> None:
        """Wire the tap if its point has hooks, unwire it if not."""
        if self.wanted() != bool(self._handles):
            if self._handles:
                for handle in self._handles:
                    handle.remove()
                self._handles = []
            else:
                self._handles = self.attach()

    def attach(self) -> list[RemovableHandle]:
        raise NotImplementedError


class OutputTap(Tap):
    """The module's output (the first item, when it returns a tuple)."""

    def attach(self) -> list[RemovableHandle]:
        # prepend: canonical points see the module's own output, before any other hook.
        return [self.module.register_forward_hook(self._hook, prepend=True)]

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        first = _first(output)
        return output if first is None else _with_first(output, self.point(first))


class CopiedOutputTap(OutputTap):
    """The module's output, where the caller then changes it in place (Falcon adds the
    attention output into the MLP's): the model gets a copy, so what hooks cached stays."""

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return _with_first(output, self.point(_first(output)).clone())


class InputTap(Tap):
    """The module's first input (positional, or the `hidden_states` keyword)."""

    def attach(self) -> list[RemovableHandle]:
        return [self.module.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.point(args[0]), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise TypeError(f"{self.point.name}: {type(module).__name__} was called without its input tensor")
        return args, {**kwargs, "hidden_states": self.point(kwargs["hidden_states"])}


class SharedInputTap(Tap):
    """The module's first input where the block also keeps that tensor for its residual.

    resid_mid is read by the second norm and by the residual addition after the MLP. A hook
    that replaces it must change what both read, so the replacement is copied into the tensor
    in place; backward hooks see its whole gradient, through both readers.
    """

    def attach(self) -> list[RemovableHandle]:
        # first among the module's pre-hooks: hook_mlp_in, also read there, sees the result
        return [self.module.register_forward_pre_hook(self._hook, prepend=True)]

    def _hook(self, module: nn.Module, args: tuple) -> None:
        resid = args[0]
        # The hooks get a copy: an in-place update of a tensor their own graph saved would
        # break the backward pass.
        seen = resid.clone()
        result = self.point.run_fwd_hooks(seen)
        if result is not seen:
            if result.shape != resid.shape:
                raise ValueError(f"{self.point.name}: a hook returned shape {tuple(result.shape)}, expected {tuple(resid.shape)}")
            resid.copy_(result)
        if self.point._bwd_fns and resid.requires_grad:
            resid.register_hook(self.point.run_bwd_hooks)


class NormPoints(nn.Module):
    """hook_scale [batch, pos, 1] and hook_normalized [batch, pos, d_model] of one norm."""

    def __init__(self):
        super().__init__()
        self.hook_scale, self.hook_normalized = HookPoint(), HookPoint()


class ForwardSwap:
    """Replaces a module's forward until removed (under accelerate's hook, the forward it wraps)."""

    def __init__(self, module: nn.Module, forward: Any):
        self.module = module
        self.attr = "_old_forward" if hasattr(module, "_old_forward") else "forward"
        self.previous = module.__dict__.get(self.attr)  # None: the class's own forward
        setattr(module, self.attr, forward)

    def remove(self) -> None:
        if self.previous is None:
            delattr(self.module, self.attr)
        else:
            setattr(self.module, self.attr, self.previous)


class NormTap(Tap):
    """A norm computed in two steps, scale then normalized, while either point has hooks
    (the module's own forward is swapped out meanwhile, so the norm is computed once).

    Each kind computes as its transformers module does (see architecture.NormKind): LayerNorm has
    scale = sqrt(var + eps), normalized = (x - mean) / scale, out = normalized * w + b; an
    RMSNorm has scale = sqrt(mean(x^2) + eps) and normalized = x / scale, in float32. Where the
    module applies its weight in float32 too (OLMo-2, gemma, Cohere), hook_normalized is float32.
    """

    def __init__(self, points: NormPoints, module: nn.Module, kind: str):
        super().__init__(points.hook_scale, module)
        self.hook_scale, self.hook_normalized, self.kind = points.hook_scale, points.hook_normalized, kind
        self.eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))

    def wanted(self) -> bool:
        return self.hook_scale.active or self.hook_normalized.active

    def attach(self) -> list[ForwardSwap]:
        return [ForwardSwap(self.module, self._forward)]

    def _forward(self, x: Tensor) -> Tensor:
        kind, weight = self.kind, getattr(self.module, "weight", None)
        if kind == "layernorm":
            var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
            scale = self.hook_scale((var + self.eps).sqrt())
            normalized = self.hook_normalized((x - mean) / scale)
            bias = getattr(self.module, "bias", None)
            if weight is not None and bias is not None:
                return torch.addcmul(bias, normalized, weight)
            return normalized if weight is None else normalized * weight
        x32 = x.float()
        if kind == "layernorm_f32":
            var, mean = torch.var_mean(x32, -1, keepdim=True, correction=0)
            scale = self.hook_scale((var + self.eps).sqrt())
            normalized = self.hook_normalized((x32 - mean) / scale)
            return (normalized if weight is None else weight.float() * normalized).to(x.dtype)
        scale = self.hook_scale((x32.square().mean(-1, keepdim=True) + self.eps).sqrt())
        if kind == "rmsnorm":
            return weight * self.hook_normalized((x32 / scale).to(x.dtype))
        normalized = self.hook_normalized(x32 / scale)
        if kind == "gemma_rmsnorm":
            return (normalized * (1.0 + weight.float())).type_as(x)
        return (weight * normalized).to(x.dtype)  # rmsnorm_f32


def head_weights(o_proj: nn.Module, n_heads: int, kind: str) -> Tensor:
    """The attention output projection's weights per head, [head, d_head, d_model]."""
    weight = o_proj.weight if kind == "conv1d" else o_proj.weight.T  # [head * d_head, d_model]
    return weight.unflatten(0, (n_heads, -1))


class ResultTap(Tap):
    """hook_result: each head's output through W_O, [batch, pos, head, d_model]; the
    projection's output becomes the sum over heads plus the bias."""

    def __init__(self, point: HookPoint, o_proj: nn.Module, n_heads: int, kind: str):
        super().__init__(point, o_proj)
        self.n_heads, self.kind = n_heads, kind

    def attach(self) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(self._hook, prepend=True)]

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        z = args[0].unflatten(-1, (self.n_heads, -1))  # [batch, pos, head, d_head]
        w_o = head_weights(module, self.n_heads, self.kind)
        result = self.point(torch.einsum("bphd,hdm->bphm", z, w_o))
        out = result.sum(-2)
        return out if module.bias is None else out + module.bias


class MLPPoints(nn.Module):
    def __init__(self, gated: bool):
        super().__init__()
        self.hook_pre = HookPoint()
        if gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()


class FusedGateUpTap(Tap):
    """hook_pre and hook_pre_linear of an MLP whose one projection returns [gate | up] (Phi-3)."""

    def __init__(self, points: MLPPoints, module: nn.Module):
        super().__init__(points.hook_pre, module)
        self.gate, self.up = points.hook_pre, points.hook_pre_linear

    def wanted(self) -> bool:
        return self.gate.active or self.up.active

    def attach(self) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(self._hook, prepend=True)]

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        gate, up = output.chunk(2, dim=-1)
        return torch.cat([self.gate(gate), self.up(up)], dim=-1)


class ExpertPoints(nn.Module):
    """One routed expert's points: hook_pre, hook_pre_linear, hook_post [batch, pos, d_mlp],
    hook_out [batch, pos, d_model] (see shardlens.hooks.experts)."""

    def __init__(self):
        super().__init__()
        self.hook_pre, self.hook_pre_linear, self.hook_post, self.hook_out = HookPoint(), HookPoint(), HookPoint(), HookPoint()


class MoEPoints(nn.Module):
    """The routing of a mixture-of-experts MLP.

    hook_router_logits [batch, pos, n_experts]: the router's scores before softmax and top-k
    (editing them does not re-route: edit the indices and weights for that).
    hook_expert_indices [batch, pos, top_k]: the experts each token is sent to.
    hook_expert_weights [batch, pos, top_k]: the weights the block applies to those experts'
    outputs: after the family's own normalisation (renormalised top-k in Mixtral and OLMoE,
    plain softmax probabilities in Qwen2-MoE without norm_topk_prob, sigmoid scores times the
    routed scaling factor in DeepSeek-V3, softmax over the top-k logits in gpt-oss). A hook on
    the weights finds the indices in ``hook.ctx["expert_indices"]``.
    shared_expert.hook_pre|hook_pre_linear|hook_post: the dense expert every token goes through.
    experts.{E}.hook_pre|hook_pre_linear|hook_post|hook_out: each routed expert, on request
    (see shardlens.hooks.experts).
    """

    def __init__(self, architecture: MoEArchitecture, expert_points: bool = False):
        super().__init__()
        self.hook_router_logits = HookPoint()
        self.hook_expert_indices, self.hook_expert_weights = HookPoint(), HookPoint()
        if expert_points:
            self.experts = nn.ModuleDict({str(e): ExpertPoints() for e in range(architecture.n_experts)})
        if architecture.shared_expert is not None:
            self.shared_expert = MLPPoints(gated=True)


class BlockTokensTap(Tap):
    """A tap inside an MoE block, which flattens [batch, pos] into tokens: the block's input
    shape, seen on the way in (`record_tokens`), gives its points their [batch, pos, ...]
    shape back."""

    def __init__(self, point: HookPoint, module: nn.Module, block: nn.Module):
        super().__init__(point, module)
        self.block = block
        self._tokens: tuple[int, ...] = ()

    def record_tokens(self) -> RemovableHandle:
        return self.block.register_forward_pre_hook(self._block_input)

    def _block_input(self, module: nn.Module, args: tuple) -> None:
        self._tokens = tuple(args[0].shape[:-1])  # [batch, pos]


class MoETap(BlockTokensTap):
    """Routes the router's logits and the experts' indices and weights through MoEPoints."""

    def __init__(self, points: MoEPoints, mlp: nn.Module, router: nn.Module, experts: nn.Module):
        super().__init__(points.hook_router_logits, mlp, mlp)
        self.points, self.router, self.experts = points, router, experts

    def wanted(self) -> bool:
        p = self.points
        return p.hook_router_logits.active or p.hook_expert_indices.active or p.hook_expert_weights.active

    def attach(self) -> list[RemovableHandle]:
        return [
            self.record_tokens(),
            self.router.register_forward_hook(self._router_output, prepend=True),
            self.experts.register_forward_pre_hook(self._routing, with_kwargs=True),
        ]

    def _router_output(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        logits = output[0]  # [tokens, experts]
        seen = self.points.hook_router_logits(logits.view(*self._tokens, logits.shape[-1]))
        return (seen.reshape(logits.shape), *output[1:])

    def _routing(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) < 3:
            raise TypeError(
                f"{self.points.hook_expert_indices.name}: the experts module was called with {len(args)} positional "
                f"arguments and keywords {sorted(kwargs)}; shardlens routes experts(hidden, indices, weights) called positionally"
            )
        hidden, indices, weights = args[:3]
        shaped = indices.view(*self._tokens, indices.shape[-1])
        indices = self.points.hook_expert_indices(shaped)
        weights_point = self.points.hook_expert_weights
        weights_point.ctx["expert_indices"] = indices
        try:
            weights = weights_point(weights.view(*self._tokens, weights.shape[-1]))
        finally:
            weights_point.ctx.pop("expert_indices", None)
        flat = (-1, indices.shape[-1])
        return (hidden, indices.reshape(flat), weights.reshape(flat), *args[3:]), kwargs


class SharedExpertTap(BlockTokensTap):
    """A shared expert's hook_pre, hook_pre_linear and hook_post, as [batch, pos, d_mlp]
    whether the MoE block hands the expert [batch, pos, d_model] (DeepSeek-V3) or its tokens
    flattened (Qwen2-MoE)."""

    def __init__(self, points: MLPPoints, block: nn.Module, expert: nn.Module, moe: MoEArchitecture):
        super().__init__(points.hook_pre, block, block)
        self.points, self.expert, self.moe = points, expert, moe

    def wanted(self) -> bool:
        return self.points.hook_pre.active or self.points.hook_pre_linear.active or self.points.hook_post.active

    def attach(self) -> list[RemovableHandle]:
        part = self.expert.get_submodule
        return [
            self.record_tokens(),
            part(self.moe.shared_in).register_forward_hook(lambda m, a, out: self._through(self.points.hook_pre, out), prepend=True),
            part(self.moe.shared_in_linear).register_forward_hook(lambda m, a, out: self._through(self.points.hook_pre_linear, out), prepend=True),
            part(self.moe.shared_out).register_forward_pre_hook(lambda m, args: (self._through(self.points.hook_post, args[0]), *args[1:])),
        ]

    def _through(self, point: HookPoint, x: Tensor) -> Tensor:
        return point(x.view(*self._tokens, x.shape[-1])).reshape(x.shape)


def mlp_taps(points: nn.Module, block: nn.Module, architecture: BlockArchitecture) -> list[Tap]:
    """The taps of a block's MLP points: a dense MLP's pre / pre_linear / post, or an MoE
    block's routing and shared expert."""
    module = block.get_submodule
    moe = architecture.moe
    if moe is not None:
        taps: list[Tap] = [MoETap(points, module(architecture.mlp), module(moe.router), module(moe.experts))]
        if moe.shared_expert is not None:
            taps.append(SharedExpertTap(points.shared_expert, module(architecture.mlp), module(moe.shared_expert), moe))
        return taps
    if architecture.fused_gate_up:
        return [FusedGateUpTap(points, module(architecture.mlp_in)), InputTap(points.hook_post, module(architecture.mlp_out))]
    return dense_mlp_taps(points, block, architecture.mlp_in, architecture.mlp_in_linear, architecture.mlp_out)


def dense_mlp_taps(points: MLPPoints, root: nn.Module, mlp_in: str, mlp_in_linear: Optional[str], mlp_out: str) -> list[Tap]:
    taps: list[Tap] = [OutputTap(points.hook_pre, root.get_submodule(mlp_in)), InputTap(points.hook_post, root.get_submodule(mlp_out))]
    if mlp_in_linear is not None:
        taps.append(OutputTap(points.hook_pre_linear, root.get_submodule(mlp_in_linear)))
    return taps


@dataclass(frozen=True)
class PointOptions:
    """TransformerLens' optional hook points, all off by default (see head_inputs for the
    per-head inputs).

    Attributes:
        attn_result: blocks.{L}.attn.hook_result, each head's output through W_O.
        split_qkv_input: blocks.{L}.hook_q_input|hook_k_input|hook_v_input.
        attn_in: blocks.{L}.hook_attn_in.
        hook_mlp_in: blocks.{L}.hook_mlp_in.
        hook_tokens: hook_tokens, the token ids [batch, pos].
        expert_points: blocks.{L}.mlp.experts.{E}.hook_pre|hook_pre_linear|hook_post|hook_out,
            each routed expert of a mixture-of-experts block (see shardlens.hooks.experts).
    """

    attn_result: bool = False
    split_qkv_input: bool = False
    attn_in: bool = False
    hook_mlp_in: bool = False
    hook_tokens: bool = False
    expert_points: bool = False


class BlockPoints(nn.Module):
    """The hook points of one block, registered in the order the forward pass reaches them."""

    def __init__(self, architecture: BlockArchitecture, options: PointOptions):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        if options.attn_in:
            self.hook_attn_in = HookPoint()
        if options.split_qkv_input:
            self.hook_q_input, self.hook_k_input, self.hook_v_input = HookPoint(), HookPoint(), HookPoint()
        if architecture.ln1 is not None:
            self.ln1 = NormPoints()
        self.attn = AttentionPoints()
        if options.attn_result:
            self.attn.hook_result = HookPoint()
        if architecture.ln1_post is not None:
            self.ln1_post = NormPoints()
        self.hook_attn_out = HookPoint()
        if not architecture.parallel:
            self.hook_resid_mid = HookPoint()
        if options.hook_mlp_in:
            self.hook_mlp_in = HookPoint()
        if architecture.ln2 is not None:
            self.ln2 = NormPoints()
        self.mlp = MoEPoints(architecture.moe, options.expert_points) if architecture.moe is not None else MLPPoints(gated=architecture.gated)
        if architecture.ln2_post is not None:
            self.ln2_post = NormPoints()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()


class AttentionForwardTap(Tap):
    """A family whose attention module computes attention itself (Falcon) runs it through
    shardlens' attention function, the architecture's `attention_forward`, while any of its
    attention points has hooks; otherwise its own forward runs, unchanged."""

    def __init__(self, points: AttentionPoints, module: nn.Module, forward: Any, n_kv_groups: int):
        super().__init__(points.hook_q, module)
        self.forward = forward
        self.attention_points = (points.hook_q, points.hook_k, points.hook_v, points.hook_attn_scores, points.hook_pattern, points.hook_z)
        module.num_key_value_groups = n_kv_groups  # what transformers' SDPA path reads for grouped-query attention

    def wanted(self) -> bool:
        return any(point.active for point in self.attention_points)

    def attach(self) -> list[ForwardSwap]:
        return [ForwardSwap(self.module, types.MethodType(self.forward, self.module))]


def block_taps(points: BlockPoints, block: nn.Module, architecture: Architecture, layer: int, n_heads: int, n_kv: int) -> list[Tap]:
    """The taps that connect one block's hook points to the block's modules."""
    model_architecture, architecture = architecture, architecture.block_at(layer)
    module = block.get_submodule
    mlp_out_tap = CopiedOutputTap if architecture.mlp_out_changed_in_place else OutputTap
    taps: list[Tap] = [
        InputTap(points.hook_resid_pre, block),
        OutputTap(points.hook_attn_out, module(architecture.ln1_post or architecture.attn)),
        *mlp_taps(points.mlp, block, architecture),
        mlp_out_tap(points.hook_mlp_out, module(architecture.ln2_post or architecture.mlp)),
        OutputTap(points.hook_resid_post, block),
    ]
    for name in ("ln1", "ln1_post", "ln2", "ln2_post"):
        if getattr(architecture, name) is not None:
            taps.append(NormTap(getattr(points, name), module(getattr(architecture, name)), architecture.norm))
    if not architecture.parallel:
        # the residual after attention is what the MLP's norm reads (the MLP itself, without one)
        taps.append(SharedInputTap(points.hook_resid_mid, module(architecture.ln2 or architecture.mlp)))
    if hasattr(points.attn, "hook_result"):
        taps.append(ResultTap(points.attn.hook_result, module(architecture.o_proj), n_heads, architecture.o_proj_kind))
    points.attn.attach_to(module(architecture.attn))
    if model_architecture.attention_forward is not None:
        taps.append(AttentionForwardTap(points.attn, module(architecture.attn), model_architecture.attention_forward, n_heads // n_kv))
    return taps


class LogitTransform(nn.Module):
    """What a family's forward does to the unembedding's output (see Architecture): scale,
    divide, soft-cap. A stage runs it as a module, so hook_logits taps its output."""

    def __init__(self, architecture: Architecture):
        super().__init__()
        self.multiplier, self.divisor, self.softcap = architecture.logit_multiplier, architecture.logit_divisor, architecture.logit_softcap

    def forward(self, logits: Tensor) -> Tensor:
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class ModelPoints(nn.Module):
    """The canonical hook points of a causal LM, or of the stage of one that holds `layers`.

    `blocks` is keyed by the global layer index, so a stage's names match the whole model's.
    """

    def __init__(self, architecture: Architecture, layers: Sequence[int], *, has_embed: bool, has_head: bool, options: PointOptions):
        super().__init__()
        if has_embed and options.hook_tokens:
            self.hook_tokens = HookPoint()
        if has_embed:
            self.hook_embed = HookPoint()
            if architecture.pos_embed is not None:
                self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleDict({str(layer): BlockPoints(architecture.block_at(layer), options) for layer in layers})
        if has_head:
            self.ln_final = NormPoints()
            self.hook_logits = HookPoint()


@dataclass(frozen=True)
class ModelParts:
    """The modules a model's canonical hook points are tapped into (None: not held here,
    as in a stage that lacks the embeddings or the head). `blocks` maps global layer index
    to decoder block; the tensor part of `logits`' output is the model's final logits."""

    blocks: Mapping[int, nn.Module]
    embed: Optional[nn.Module] = None
    pos_embed: Optional[nn.Module] = None
    final_norm: Optional[nn.Module] = None
    unembed: Optional[nn.Module] = None
    logits: Optional[nn.Module] = None


def model_taps(points: ModelPoints, parts: ModelParts, architecture: Architecture, n_heads: int, n_kv: int) -> list[Tap]:
    """The taps that connect `points` to the modules of a model laid out as `architecture`."""
    taps: list[Tap] = []
    if hasattr(points, "hook_tokens"):
        taps.append(InputTap(points.hook_tokens, parts.embed))
    if hasattr(points, "hook_embed"):
        taps.append(OutputTap(points.hook_embed, parts.embed))
    if hasattr(points, "hook_pos_embed"):
        taps.append(OutputTap(points.hook_pos_embed, parts.pos_embed))
    for layer, block_points in points.blocks.items():
        taps += block_taps(block_points, parts.blocks[int(layer)], architecture, int(layer), n_heads, n_kv)
    if hasattr(points, "ln_final"):
        taps.append(NormTap(points.ln_final, parts.final_norm, architecture.block.norm))
        taps.append(OutputTap(points.hook_logits, parts.logits or parts.unembed))
    return taps


def module_point_name(path: str) -> str:
    return f"module:{path}"


def module_taps(model: nn.Module, paths: Iterable[str], copied: Collection[str] = ()) -> dict[str, OutputTap]:
    """An output tap with a fresh hook point for each module path, keyed by hook name (the
    `copied` paths hand their caller a copy: it changes their output in place)."""
    taps = {}
    for path in paths:
        point = HookPoint()
        point.name = module_point_name(path)
        taps[point.name] = (CopiedOutputTap if path in copied else OutputTap)(point, model.get_submodule(path))
    return taps


def changed_in_place(architecture: Optional[Architecture], blocks: Iterable[int], prefix: str) -> set[str]:
    """The module paths (under `prefix`) whose output the model changes in place after them:
    the MLP's, and its output projection's, which is the same tensor (Falcon)."""
    if architecture is None:
        return set()
    paths = set()
    for layer in blocks:
        block = architecture.block_at(layer)
        if block.mlp_out_changed_in_place:
            paths |= {f"{prefix}{layer}.{block.mlp}", f"{prefix}{layer}.{block.mlp_out}"}
    return paths


def sync_all(taps: Iterable[Tap]) -> None:
    for tap in taps:
        tap.sync()
