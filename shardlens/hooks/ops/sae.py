"""A dictionary (sparse autoencoder or transcoder) spliced into the model, with hook points
of its own for its latents, its reconstruction and its error."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from shardlens.hooks.dictionaries import Dictionary
from shardlens.hooks.ops.base import Op
from shardlens.hooks.ops.context import RunContext
from shardlens.tables.axes import layer_index

SPLICE_POINTS = ("sae.hook_latents", "sae.hook_reconstruction", "sae.hook_error")
ERROR_MODES = ("add", "freeze", "drop")


@dataclass(frozen=True, eq=False)
class Splice(Op):
    """Replace an activation by a dictionary's reconstruction of it, exposing hook points
    ``<point>.sae.hook_latents`` [batch, pos, d_sae], ``.sae.hook_reconstruction`` and
    ``.sae.hook_error`` that other specs can cache, patch or take gradients at (after
    neuron_explainer's AutoencoderHooks).

    An SAE reads and writes the point its spec names. A transcoder (`write` given) reads the
    spec's other point (e.g. ``blocks.3.ln2.hook_normalized``) and replaces the value at
    `write` (``blocks.3.hook_mlp_out``); its sub-points are made under `write`, and its
    spec names both points: ``HookSpec([read, write], Splice(d, write=write))``.

    Args:
        dictionary: an `sl.dictionaries.Dictionary`.
        write: a transcoder's output point; None for an SAE.
        error: the error term, error = y - decode(latents before their hooks), where y is the
            replaced value. "add": the output is reconstruction + error, so an unedited
            splice leaves the model's values exactly as they were, edits of the latents act
            through the decoder only, and gradients reach y by both paths (the identity,
            when nothing is edited). "freeze": the same values, with the error a constant
            for the backward pass (SAELens' use_error_term): gradients below the splice pass
            through the dictionary only (hook_error still sees its own gradient). "drop": the output is the reconstruction alone.
            To hold the error at another run's value, patch ``.sae.hook_error``.
    """

    creates_points: ClassVar[tuple[str, ...]] = SPLICE_POINTS
    dictionary: Dictionary
    _: KW_ONLY
    write: Optional[str] = None
    error: str = "add"

    def __post_init__(self) -> None:
        if not isinstance(self.dictionary, Dictionary):
            raise ValueError(f"Splice takes an sl.dictionaries.Dictionary (sl.dictionaries.read(path)); got {type(self.dictionary).__name__}")
        if self.error not in ERROR_MODES:
            raise ValueError(f"error must be one of {', '.join(ERROR_MODES)}; got {self.error!r}")
        if self.write is not None and (not isinstance(self.write, str) or not self.write):
            raise ValueError(f"write must be a hook point's name; got {self.write!r}")

    def check(self, name: str, root: Any) -> None:
        if self.write is not None and name != self.write and (layer_index(name) is None or layer_index(name) != layer_index(self.write)):
            raise ValueError(f"Splice(write={self.write!r}) reads {name}: a transcoder reads and writes in one layer "
                             f"(a stage holds whole layers, and a run resumed at a layer starts there); got layers "
                             f"{layer_index(name)} and {layer_index(self.write)}")

    def created_names(self, names: Sequence[str]) -> list[str]:
        if self.write is None:
            return super().created_names(names)
        return [f"{self.write}.{sub}" for sub in SPLICE_POINTS] if self.write in names else []

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Optional[Tensor]:
        if self.write is None:
            return self._splice(tensor, tensor, hook.name, ctx)
        if hook.name != self.write:  # the transcoder's input: encode now, write at `write`
            ctx.carried[("transcoder", self.write)] = tensor
            return None
        read = ctx.carried.pop(("transcoder", self.write), None)
        if read is None:
            raise ValueError(f"Splice(write={self.write!r}) fired at {self.write} before its input point: "
                             f"its spec must name the point it reads and {self.write!r}, the reading point first in the model")
        return self._splice(read, tensor, self.write, ctx)

    def _splice(self, x: Tensor, y: Tensor, name: str, ctx: RunContext) -> Tensor:
        """y replaced by the reconstruction of x (y is x for an SAE)."""
        points = ctx.root.hook_dict
        latents_point, reconstruction_point, error_point = (points[f"{name}.{sub}"] for sub in SPLICE_POINTS)
        latents = self.dictionary.encode(x)
        # Hooks may edit the latents in place: the error term needs them as they were.
        hooked = latents_point(latents.clone() if latents_point.active else latents)
        decoded = self.dictionary.decode(hooked, x)
        # One decode serves both terms unless the latents' hooks edited them or may take their
        # gradient: then the error's decode is its own node, so the gradient at the latents
        # is the reconstruction's alone.
        separate = latents_point.active and (torch.is_grad_enabled() or not torch.equal(hooked, latents))
        clean = self.dictionary.decode(latents, x) if separate else decoded
        raw_error = y - clean
        if self.error == "freeze":  # a constant below the splice; its own gradient still reaches hook_error
            raw_error = raw_error.detach().requires_grad_(raw_error.requires_grad)
        reconstruction, error = reconstruction_point(decoded), error_point(raw_error)
        if self.error == "drop":
            return reconstruction
        if error is not raw_error:  # edited (patched), or hooked for its gradient
            return reconstruction + error
        # reconstruction + (y - clean), written so that unedited latents give y exactly: the
        # two decodes of equal latents are equal, where reconstruction + error would round.
        if self.error == "freeze":
            return y.detach() + (reconstruction - clean.detach())
        return y + (reconstruction - clean)
