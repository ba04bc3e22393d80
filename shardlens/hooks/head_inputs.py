"""Per-head attention inputs and the MLP's input, as TransformerLens' optional hook points.

TransformerLens can give each attention head its own copy of the residual stream
(`use_attn_in`: blocks.{L}.hook_attn_in; `use_split_qkv_input`: blocks.{L}.hook_q_input,
hook_k_input, hook_v_input), each normalised by ln1 on its own, so that a patch of one
head's copy reaches that head only (path patching needs it). In a Hugging Face block the
attention reads one normalised tensor; while these points have hooks, the block's q/k/v
projections are computed per head from the per-head copies instead (`HeadInputsTap`), which
equals the plain projection, up to rounding, when nothing is patched.

hook_attn_in is [batch, pos, head, d_model] with one copy per query head; under grouped-query
attention kv head g reads the copy of its group's first query head (g * n_heads / n_kv_heads).
hook_q_input is [batch, pos, head, d_model]; hook_k_input and hook_v_input have n_kv_heads
(as in TransformerLens). With both switched on, the split inputs are copies of hook_attn_in.
blocks.{L}.hook_mlp_in [batch, pos, d_model] is what the MLP's norm reads (resid_mid, or
resid_pre in a parallel block), a copy, so that a patch changes the MLP's input only.

OLMo-2, OLMo-3 and OLMoE normalise q and k over all heads together (q_norm and k_norm span
every head), so there a patch of one head's q or k input also moves the other heads' a little.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from shardlens.hooks.architectures import BlockArchitecture
from shardlens.hooks.hook_point import HookPoint
from shardlens.hooks.taps import BlockPoints, ForwardSwap, Tap

# How a projection's output rows are laid out, in blocks of d_head rows each owned by one
# (q|k|v, head): see `row_blocks`.
ARRANGEMENTS = ("q", "k", "v", "qkv", "qkv_per_head", "falcon")


def row_blocks(arrangement: str, n_heads: int, n_kv: int) -> list[tuple[str, int]]:
    """The (component, head) owning each d_head-row block of a projection's output.

    "q" / "k" / "v": one projection per component; "qkv": [q heads | k heads | v heads]
    (GPT-2, Phi-3); "qkv_per_head": per head q, k, v (GPT-NeoX); "falcon": per kv head its
    query heads, then its k and v (Falcon's new decoder architecture).
    """
    if arrangement in ("q", "k", "v"):
        return [(arrangement, h) for h in range(n_heads if arrangement == "q" else n_kv)]
    if arrangement == "qkv":
        return [("q", h) for h in range(n_heads)] + [("k", g) for g in range(n_kv)] + [("v", g) for g in range(n_kv)]
    if arrangement == "qkv_per_head":
        return [(c, h) for h in range(n_heads) for c in ("q", "k", "v")]
    if arrangement == "falcon":
        groups = n_heads // n_kv
        return [item for g in range(n_kv) for item in [("q", g * groups + j) for j in range(groups)] + [("k", g), ("v", g)]]
    raise ValueError(f"unknown q/k/v arrangement {arrangement!r}; one of {ARRANGEMENTS}")


class HeadInputsTap(Tap):
    """Routes a block's attention inputs through per-head hook points while any has hooks.

    `source` is the module that reads resid_pre on the attention path (ln1, or the attention
    itself in a block without ln1); `norm` is ln1 (None: no norm); `projections` are
    (module, kind "linear"|"conv1d", arrangement) for the block's q/k/v projections.
    """

    def __init__(
        self, points: nn.Module, source: nn.Module, norm: Optional[nn.Module],
        projections: Sequence[tuple[nn.Module, str, str]], n_heads: int, n_kv: int,
    ):
        self.attn_in: Optional[HookPoint] = getattr(points, "hook_attn_in", None)
        split = [getattr(points, f"hook_{c}_input", None) for c in "qkv"]
        self.split: Optional[tuple[HookPoint, ...]] = tuple(split) if all(split) else None
        super().__init__(self.attn_in or self.split[0], source)
        self.norm, self.projections = norm, list(projections)
        self.n_heads, self.n_kv = n_heads, n_kv
        self._inputs: Optional[Tensor] = None

    def wanted(self) -> bool:
        return bool(self.attn_in is not None and self.attn_in.active) or bool(self.split and any(p.active for p in self.split))

    def attach(self) -> list[Any]:
        handles: list[Any] = [self.module.register_forward_pre_hook(self._capture, with_kwargs=True)]
        for module, kind, arrangement in self.projections:
            blocks = row_blocks(arrangement, self.n_heads, self.n_kv)
            handles.append(ForwardSwap(module, lambda x, m=module, k=kind, b=blocks: self._project(m, k, b, x)))
        return handles

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        resid = args[0] if args else kwargs["hidden_states"]  # [batch, pos, d_model]
        groups = self.n_heads // self.n_kv
        per_head = resid.unsqueeze(2).repeat(1, 1, self.n_heads, 1)  # [batch, pos, head, d_model], a copy
        q_in = per_head if self.attn_in is None else self.attn_in(per_head)
        kv_in = q_in[:, :, ::groups] if self.attn_in is not None else resid.unsqueeze(2).repeat(1, 1, self.n_kv, 1)
        inputs = {"q": q_in, "k": kv_in, "v": kv_in}
        if self.split is not None:
            inputs = {c: point(inputs[c].clone()) for c, point in zip("qkv", self.split)}
        # [batch, pos, n_heads + 2 n_kv, d_model]: the q, k and v inputs side by side (see _project)
        self._inputs = torch.cat([self._normalize(inputs[c]) for c in "qkv"], dim=2)

    def _normalize(self, x: Tensor) -> Tensor:
        # the norm's own class forward: its hook points (and any swap of its forward) see only
        # the block's real call
        return x if self.norm is None else type(self.norm).forward(self.norm, x)

    def _project(self, module: nn.Module, kind: str, blocks: list[tuple[str, int]], x: Tensor) -> Tensor:
        """The projection's output with each d_head-row block computed from its head's input."""
        offsets = {"q": 0, "k": self.n_heads, "v": self.n_heads + self.n_kv}
        owners = torch.tensor([offsets[c] + h for c, h in blocks], device=self._inputs.device)
        weight = module.weight if kind == "conv1d" else module.weight.T  # [d_model, out]
        weight = weight.T.unflatten(0, (len(blocks), -1))  # [block, d_head, d_model]
        inputs = self._inputs.index_select(2, owners).to(weight.device, weight.dtype)  # [batch, pos, block, d_model]
        out = torch.einsum("bpnd,ned->bpne", inputs, weight).flatten(2)
        return out if module.bias is None else out + module.bias


class CopiedInputTap(Tap):
    """hook_mlp_in: a copy of `module`'s first input, through the point, is what the module
    reads (the block keeps its own tensor for the residual)."""

    def attach(self) -> list[RemovableHandle]:
        return [self.module.register_forward_pre_hook(self._hook, with_kwargs=True)]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.point(args[0].clone()), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.point(kwargs["hidden_states"].clone())}


class SharedNormMLPInputTap(Tap):
    """hook_mlp_in of a parallel block whose MLP reads the attention's norm (Phi, GPT-J,
    Cohere): the MLP reads norm(hook_mlp_in), with hook_mlp_in a copy of resid_pre."""

    def __init__(self, point: HookPoint, norm: nn.Module, mlp: nn.Module):
        super().__init__(point, mlp)
        self.norm = norm
        self._resid: Optional[Tensor] = None

    def attach(self) -> list[RemovableHandle]:
        return [self.norm.register_forward_pre_hook(self._capture), self.module.register_forward_pre_hook(self._replace)]

    def _capture(self, module: nn.Module, args: tuple) -> None:
        self._resid = args[0]

    def _replace(self, module: nn.Module, args: tuple) -> tuple:
        resid, self._resid = self._resid, None
        return (type(self.norm).forward(self.norm, self.point(resid.clone())), *args[1:])


def option_taps(points: BlockPoints, block: nn.Module, architecture: BlockArchitecture, n_heads: int, n_kv: int, family: str) -> list[Tap]:
    """The taps of a block's optional points (those its BlockPoints has) in a model of type `family`."""
    module = block.get_submodule
    taps: list[Tap] = []
    if hasattr(points, "hook_attn_in") or hasattr(points, "hook_q_input"):
        if not architecture.qkv:
            raise NotImplementedError(
                f"{family} models have no per-head attention inputs (split_qkv_input, attn_in): its attention "
                "does not project each head from the block's input (DeepSeek's latent attention shares low-rank latents)"
            )
        source = module(architecture.ln1) if architecture.ln1 else module(architecture.attn)
        norm = module(architecture.ln1) if architecture.ln1 else None
        projections = [(module(path), architecture.o_proj_kind, arrangement) for path, arrangement in architecture.qkv]
        taps.append(HeadInputsTap(points, source, norm, projections, n_heads, n_kv))
    if hasattr(points, "hook_mlp_in"):
        if architecture.ln2 is not None:
            taps.append(CopiedInputTap(points.hook_mlp_in, module(architecture.ln2)))
        elif architecture.parallel:  # the MLP reads ln1's output
            taps.append(SharedNormMLPInputTap(points.hook_mlp_in, module(architecture.ln1), module(architecture.mlp)))
        else:  # no norm before the MLP (OLMo-2)
            taps.append(CopiedInputTap(points.hook_mlp_in, module(architecture.mlp)))
    return taps
