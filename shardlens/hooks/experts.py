"""Each expert of a mixture-of-experts block as hook points, on request.

With `PointOptions(expert_points=True)` (or `set_use_expert_points(True)`), every expert E of
an MoE block gets blocks.{L}.mlp.experts.{E}.hook_pre (its gate projection),
.hook_pre_linear (its up projection), .hook_post (what its down projection reads) [batch,
pos, d_mlp], and .hook_out [batch, pos, d_model] (its output times its routing weight: what
it adds to the block's output). An expert sees only the tokens routed to it: its points hold
zeros at every other position, and what a hook writes there is not used. As for hook_result,
these cost an expert's worth of memory each, so they are off by default.

While any of them has hooks, the experts module computes as transformers' own loop over
experts does (weights [experts, 2 * d_mlp, d_model] and [experts, d_model, d_mlp], gate and
up concatenated), with the points in between. gpt-oss's experts (biases, clamped, interleaved
gate and up) are not of that form and get no per-expert points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardlens.hooks.hook_point import HookPoint
from shardlens.hooks.taps import BlockTokensTap, ForwardSwap, Tap


def is_plain_experts(experts: nn.Module) -> bool:
    """Whether an experts module has transformers' generic form (see the module docstring)."""
    return (
        isinstance(getattr(experts, "gate_up_proj", None), Tensor) and isinstance(getattr(experts, "down_proj", None), Tensor)
        and getattr(experts, "gate_up_proj_bias", None) is None and hasattr(experts, "act_fn")
    )


class ExpertsTap(BlockTokensTap):
    """Runs an experts module through per-expert points while any of them has hooks (the MoE
    block's input, seen on the way in, gives the points their [batch, pos] shape)."""

    def __init__(self, points: nn.ModuleDict, block: nn.Module, experts: nn.Module):
        super().__init__(points["0"].hook_pre, experts, block)
        self.points = [points[str(e)] for e in range(len(points))]

    def wanted(self) -> bool:
        return any(p.active for e in self.points for p in (e.hook_pre, e.hook_pre_linear, e.hook_post, e.hook_out))

    def attach(self) -> list:
        return [self.record_tokens(), ForwardSwap(self.module, self._forward)]

    def _forward(self, hidden: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """transformers' loop over experts, with hidden [tokens, d_model] and indices / weights
        [tokens, top_k], each expert's activations through its points."""
        experts, shape = self.module, self._tokens
        out = torch.zeros_like(hidden)
        for expert, points in enumerate(self.points):
            token, slot = torch.where(indices == expert)
            gate_up = F.linear(hidden[token], experts.gate_up_proj[expert])
            gate, up = gate_up.chunk(2, dim=-1)
            gate = _routed_through(points.hook_pre, gate, token, hidden.shape[0], shape)
            up = _routed_through(points.hook_pre_linear, up, token, hidden.shape[0], shape)
            post = _routed_through(points.hook_post, experts.act_fn(gate) * up, token, hidden.shape[0], shape)
            result = F.linear(post, experts.down_proj[expert]) * weights[token, slot, None]
            result = _routed_through(points.hook_out, result, token, hidden.shape[0], shape)
            out.index_add_(0, token, result.to(out.dtype))
        return out


def _routed_through(point: HookPoint, rows: Tensor, token: Tensor, n_tokens: int, shape: tuple) -> Tensor:
    """Run the routed tokens' rows through `point` as a [batch, pos, ...] tensor (zeros at the
    other tokens), and take the routed rows back."""
    if not point.active:
        return rows
    dense = rows.new_zeros(n_tokens, rows.shape[-1])
    dense[token] = rows
    return point(dense.view(*shape, rows.shape[-1])).reshape(n_tokens, -1)[token]


def expert_taps(points: nn.Module, block: nn.Module, architecture, family: str) -> list[Tap]:
    """The per-expert tap of a block whose MLP points have `experts` (see PointOptions)."""
    experts = getattr(points.mlp, "experts", None)
    if experts is None:
        return []
    module = block.get_submodule(architecture.moe.experts)
    if not is_plain_experts(module):
        raise NotImplementedError(
            f"{family} models have no per-expert hook points: their experts ({type(module).__name__}) are not "
            "transformers' plain concatenated gate/up experts"
        )
    return [ExpertsTap(experts, block.get_submodule(architecture.mlp), module)]
