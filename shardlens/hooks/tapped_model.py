"""TappedModel: the part of HookedModel that a sharded stage shares.

A TappedModel holds Hugging Face modules (a whole causal LM, or one stage's layers of it) and
the canonical hook points tapped into them, plus `module:<path>` points made on request.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from torch import Tensor, nn

from shardlens.errors import HookNameError
from shardlens.hooks.architectures import Architecture
from shardlens.hooks.experts import expert_taps
from shardlens.hooks.head_inputs import option_taps
from shardlens.hooks.hook_point import HookPoint
from shardlens.hooks.names import is_glob
from shardlens.hooks.root_module import HookedRootModule
from shardlens.hooks.shapes import canonical_shape
from shardlens.hooks.taps import (
    ModelParts, ModelPoints, OutputTap, PointOptions, Tap, changed_in_place, head_weights, model_taps, module_point_name, module_taps,
)

MODULE_PREFIX = "module:"


def no_architecture_for_options(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    return (
        f"optional hook points (PointOptions) need canonical names, and model type {model_type!r} has none: "
        "it gets module: points only (register_architecture adds a family)"
    )


class TappedModel(HookedRootModule):
    """Canonical hook points tapped into Hugging Face modules, wired only while hooked.

    Subclasses set `config` and `architecture` (None: module points only), say which modules the
    points tap into (`_parts`) and which module `module:<path>` names are relative to
    (`_module_root`), call `build_points`, and call `sync_taps()` at the top of forward.
    """

    config: Any
    architecture: Optional[Architecture]

    def __init__(self) -> None:
        super().__init__()
        self._taps: list[Tap] = []
        self._module_taps: dict[str, OutputTap] = {}
        self.point_options = PointOptions()

    def _parts(self) -> ModelParts:
        raise NotImplementedError

    def _module_root(self) -> nn.Module:
        raise NotImplementedError

    def _blocks_path(self) -> str:
        """The path of the decoder blocks under the module root."""
        raise NotImplementedError

    def build_points(self, options: PointOptions) -> None:
        """Make the canonical points and their taps; the model's points change only once every
        tap is made (a family that cannot have an optional point leaves the model as it was)."""
        parts = self._parts()
        points = ModelPoints(
            self.architecture, sorted(parts.blocks), has_embed=parts.embed is not None,
            has_head=parts.unembed is not None, options=options,
        )
        n_heads, n_kv = self.config.num_attention_heads, self.n_kv_heads
        taps = model_taps(points, parts, self.architecture, n_heads, n_kv)
        for layer, block_points in points.blocks.items():
            block = parts.blocks[int(layer)]
            block_architecture, family = self.architecture.block_at(int(layer)), self.config.model_type
            taps += option_taps(block_points, block, block_architecture, n_heads, n_kv, family)
            taps += expert_taps(block_points, block, block_architecture, family)
        self.points, self._taps, self.point_options = points, taps, options

    def _graph_entries(self) -> Optional[list[nn.Module]]:
        """The embeddings (token, and position where the family has one): where a run's graph
        starts (none in a stage without them: its input hidden states are its leaf). Their
        taps are wired first, so that the leaf comes before hook_embed."""
        if self.architecture is None:
            return super()._graph_entries()
        self.sync_taps()
        parts = self._parts()
        return [module for module in (parts.embed, parts.pos_embed) if module is not None]

    def readout(self, resid: Tensor, *, start: int = 0) -> Tensor:
        """The logits of a final residual stream [batch, pos, d_model] (of its positions from
        `start` on): final norm, unembedding, and what the family's forward does to the logits
        (`logit_transform`, set by a model that holds the head)."""
        parts = self._parts()
        return self.logit_transform(parts.unembed(parts.final_norm(resid)[:, start:]))

    def readout_start(self, start: int) -> int:
        """Where a run's unembedding may start, given the first position it needs: there,
        unless hooks at hook_logits want every position."""
        hook_logits = getattr(getattr(self, "points", None), "hook_logits", None)
        return 0 if hook_logits is None or hook_logits.active else start

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads per layer (as hook_k has them)."""
        return canonical_shape(self.config, self.architecture, "blocks.0.attn.hook_k")[0]

    def set_point_options(self, options: PointOptions) -> None:
        """Switch TransformerLens' optional hook points on or off (see PointOptions). The
        points are rebuilt, so the model must have no hooks attached."""
        if self.architecture is None:
            raise ValueError(no_architecture_for_options(self.config))
        if options == self.point_options:
            return
        if self.has_hooks():
            raise RuntimeError("switching optional hook points rebuilds them: call reset_hooks(including_permanent=True) first")
        self.sync_taps()  # with no hooks: unwire everything before the points are replaced
        self.build_points(options)
        self.setup()

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Add (or remove) `blocks.{L}.attn.hook_result`, each head's output through W_O."""
        self.set_point_options(replace(self.point_options, attn_result=use_attn_result))

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Add (or remove) `blocks.{L}.hook_q_input|hook_k_input|hook_v_input`: each head's own
        copy of the block's input, normalised on its own (see shardlens.hooks.head_inputs)."""
        self.set_point_options(replace(self.point_options, split_qkv_input=use_split_qkv_input))

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Add (or remove) `blocks.{L}.hook_attn_in`, one copy of the block's input per head."""
        self.set_point_options(replace(self.point_options, attn_in=use_attn_in))

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Add (or remove) `blocks.{L}.hook_mlp_in`, what the MLP's norm reads."""
        self.set_point_options(replace(self.point_options, hook_mlp_in=use_hook_mlp_in))

    def set_use_hook_tokens(self, use_hook_tokens: bool) -> None:
        """Add (or remove) `hook_tokens`, the token ids [batch, pos]."""
        self.set_point_options(replace(self.point_options, hook_tokens=use_hook_tokens))

    def set_use_expert_points(self, use_expert_points: bool) -> None:
        """Add (or remove) `blocks.{L}.mlp.experts.{E}.hook_pre|hook_pre_linear|hook_post|hook_out`
        in every mixture-of-experts block (see shardlens.hooks.experts)."""
        self.set_point_options(replace(self.point_options, expert_points=use_expert_points))

    def setup(self) -> None:
        """Index the hook points by canonical name, and the held modules by path."""
        self.hook_dict = dict(self._extra_points)
        if self.architecture is not None:
            for name, module in self.points.named_modules():
                if isinstance(module, HookPoint):
                    module.name = name
                    self.hook_dict[name] = module
        self.hook_dict.update({name: tap.point for name, tap in self._module_taps.items()})
        self.mod_dict = {path: module for path, module in self._module_root().named_modules() if path}
        self.mod_dict.update(self.hook_dict)

    def _add_module_point(self, name: str) -> None:
        path = name[len(MODULE_PREFIX):]
        try:
            self._module_root().get_submodule(path)
        except AttributeError:
            paths = [module_point_name(p) for p, _ in self._module_root().named_modules() if p]
            raise HookNameError(name, paths) from None
        copied = changed_in_place(self.architecture, self._parts().blocks, self._blocks_path() + ".") if self.architecture else ()
        self._module_taps.update(module_taps(self._module_root(), [path], copied))
        self.setup()

    def _prepare_names(self, names: Any) -> None:
        """Make the `module:<path>` points that exact names ask for."""
        if isinstance(names, str):
            names = [names]
        if isinstance(names, (list, tuple)):
            for name in names:
                if isinstance(name, str) and name.startswith(MODULE_PREFIX) and not is_glob(name) and name not in self.hook_dict:
                    self._add_module_point(name)

    def sync_taps(self) -> None:
        for tap in self._taps:
            tap.sync()
        for tap in self._module_taps.values():
            tap.sync()

    # ------------------------------------------------------------------ shapes and weights

    def _o_proj(self, layer: int) -> nn.Module:
        return self._parts().blocks[layer].get_submodule(self.architecture.block_at(layer).o_proj)

    def w_o(self, layer: int) -> Tensor:
        """Layer `layer`'s attention output weights per head, [head, d_head, d_model]."""
        return head_weights(self._o_proj(layer), self.config.num_attention_heads, self.architecture.block_at(layer).o_proj_kind)

    def b_o(self, layer: int) -> Tensor:
        """Layer `layer`'s attention output bias, [d_model] (zeros when it has none)."""
        o_proj = self._o_proj(layer)
        return o_proj.bias if o_proj.bias is not None else o_proj.weight.new_zeros(self.config.hidden_size)

