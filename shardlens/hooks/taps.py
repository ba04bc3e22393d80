"""Taps: how tensors inside a Hugging Face model are routed through canonical hook points.

The hook points live in a tree of containers named like TransformerLens' modules
(`blocks.3.attn.hook_q`); the wrapped model's own modules stay as they are. A tap connects
one hook point to one place in the model with torch module hooks, and is wired only while
its hook point has hooks (`sync()`), so a model with no hooks runs its plain forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shardlens.hooks.architectures import BlockLayout, ModelLayout
from shardlens.hooks.attention import AttentionPoints
from shardlens.hooks.hook_points import HookPoint


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, first: Tensor) -> Any:
    return (first, *output[1:]) if isinstance(output, tuple) else first


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
        return _with_first(output, self.point(_first(output)))


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
        return [self.module.register_forward_pre_hook(self._hook)]

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


class _ForwardSwap:
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

    LayerNorm: scale = sqrt(var + eps), normalized = (x - mean) / scale, out = normalized * w + b.
    RMSNorm: scale = sqrt(mean(x^2) + eps) in float32, normalized = x / scale, out = w * normalized.
    """

    def __init__(self, points: NormPoints, module: nn.Module, kind: str):
        super().__init__(points.hook_scale, module)
        self.hook_scale, self.hook_normalized, self.kind = points.hook_scale, points.hook_normalized, kind
        self.eps = float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))

    def wanted(self) -> bool:
        return self.hook_scale.active or self.hook_normalized.active

    def attach(self) -> list[_ForwardSwap]:
        return [_ForwardSwap(self.module, self._forward)]

    def _forward(self, x: Tensor) -> Tensor:
        module = self.module
        if self.kind == "rmsnorm":
            x32 = x.float()
            scale = self.hook_scale((x32.square().mean(-1, keepdim=True) + self.eps).sqrt())
            normalized = self.hook_normalized((x32 / scale).to(x.dtype))
            return module.weight * normalized
        var, mean = torch.var_mean(x, -1, keepdim=True, correction=0)
        scale = self.hook_scale((var + self.eps).sqrt())
        normalized = self.hook_normalized((x - mean) / scale)
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None and bias is not None:
            return torch.addcmul(bias, normalized, weight)
        return normalized if weight is None else normalized * weight


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


class BlockPoints(nn.Module):
    """The hook points of one block, registered in the order the forward pass reaches them."""

    def __init__(self, layout: BlockLayout, attn_result: bool):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.ln1 = NormPoints()
        self.attn = AttentionPoints()
        if attn_result:
            self.attn.hook_result = HookPoint()
        self.hook_attn_out = HookPoint()
        if not layout.parallel:
            self.hook_resid_mid = HookPoint()
        self.ln2 = NormPoints()
        self.mlp = MLPPoints(gated=layout.mlp_in_linear is not None)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()


def block_taps(points: BlockPoints, block: nn.Module, layout: BlockLayout, n_heads: int) -> list[Tap]:
    """The taps that connect one block's hook points to the block's modules."""
    module = block.get_submodule
    taps: list[Tap] = [
        InputTap(points.hook_resid_pre, block),
        NormTap(points.ln1, module(layout.ln1), layout.norm),
        OutputTap(points.hook_attn_out, module(layout.attn)),
        NormTap(points.ln2, module(layout.ln2), layout.norm),
        OutputTap(points.mlp.hook_pre, module(layout.mlp_in)),
        InputTap(points.mlp.hook_post, module(layout.mlp_out)),
        OutputTap(points.hook_mlp_out, module(layout.mlp)),
        OutputTap(points.hook_resid_post, block),
    ]
    if not layout.parallel:
        taps.append(SharedInputTap(points.hook_resid_mid, module(layout.ln2)))
    if layout.mlp_in_linear is not None:
        taps.append(OutputTap(points.mlp.hook_pre_linear, module(layout.mlp_in_linear)))
    if hasattr(points.attn, "hook_result"):
        taps.append(ResultTap(points.attn.hook_result, module(layout.o_proj), n_heads, layout.o_proj_kind))
    points.attn.attach_to(module(layout.attn))
    return taps


class ModelPoints(nn.Module):
    """The canonical hook points of a causal LM, or of the stage of one that holds `layers`.

    `blocks` is keyed by the global layer index, so a stage's names match the whole model's.
    """

    def __init__(self, layout: ModelLayout, layers: Sequence[int], *, has_embed: bool, has_head: bool, attn_result: bool):
        super().__init__()
        if has_embed:
            self.hook_embed = HookPoint()
            if layout.pos_embed is not None:
                self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleDict({str(layer): BlockPoints(layout.block, attn_result) for layer in layers})
        if has_head:
            self.ln_final = NormPoints()
            self.hook_logits = HookPoint()


@dataclass(frozen=True)
class ModelParts:
    """The modules a model's canonical hook points are tapped into (None: not held here,
    as in a stage that lacks the embeddings or the head). `blocks` maps global layer index
    to decoder block."""

    blocks: Mapping[int, nn.Module]
    embed: Optional[nn.Module] = None
    pos_embed: Optional[nn.Module] = None
    final_norm: Optional[nn.Module] = None
    unembed: Optional[nn.Module] = None


def model_taps(points: ModelPoints, parts: ModelParts, layout: ModelLayout, n_heads: int) -> list[Tap]:
    """The taps that connect `points` to the modules of a model laid out as `layout`."""
    taps: list[Tap] = []
    if hasattr(points, "hook_embed"):
        taps.append(OutputTap(points.hook_embed, parts.embed))
    if hasattr(points, "hook_pos_embed"):
        taps.append(OutputTap(points.hook_pos_embed, parts.pos_embed))
    for layer, block_points in points.blocks.items():
        taps += block_taps(block_points, parts.blocks[int(layer)], layout.block, n_heads)
    if hasattr(points, "ln_final"):
        taps.append(NormTap(points.ln_final, parts.final_norm, layout.block.norm))
        taps.append(OutputTap(points.hook_logits, parts.unembed))
    return taps


def module_point_name(path: str) -> str:
    return f"module:{path}"


def module_taps(model: nn.Module, paths: Iterable[str]) -> dict[str, OutputTap]:
    """An output tap with a fresh hook point for each module path, keyed by hook name."""
    taps = {}
    for path in paths:
        point = HookPoint()
        point.name = module_point_name(path)
        taps[point.name] = OutputTap(point, model.get_submodule(path))
    return taps


def sync_all(taps: Iterable[Tap]) -> None:
    for tap in taps:
        tap.sync()
