"""An autoencoder (SAE) spliced in at a hook point, with hook points of its own."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from shardlens.hooks.codec import serializable
from shardlens.hooks.ops.base import Op, normalize_tensor
from shardlens.hooks.ops.context import RunContext


@serializable
@dataclass(frozen=True, eq=False)
class Linear:
    """x @ weight (+ bias), then an optional activation ("relu"): an SAE's encoder or decoder."""

    weight: Any
    bias: Any = None
    _: KW_ONLY
    activation: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", normalize_tensor(self.weight, "weight"))
        object.__setattr__(self, "bias", normalize_tensor(self.bias, "bias", optional=True))
        if self.activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu'; got {self.activation!r}")

    def __call__(self, x: Tensor) -> Tensor:
        y = x @ self.weight.to(x.device, x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.device, x.dtype)
        return torch.relu(y) if self.activation == "relu" else y

    __eq__ = Op.__eq__
    __hash__ = None


SPLICE_POINTS = ("sae.hook_latents", "sae.hook_reconstruction", "sae.hook_error")


@dataclass(frozen=True, eq=False)
class Splice(Op):
    """Replace the activation x by an autoencoder's reconstruction, after neuron_explainer's
    AutoencoderHooks, exposing hook points ``<point>.sae.hook_latents``,
    ``.hook_reconstruction`` and ``.hook_error`` that other specs can cache or patch.

    With add_error=True the output is reconstruction + (x - decode(latents)), where the error
    term is computed from latents before their hooks: an exact autoencoder leaves the model
    unchanged, and edits of the latents act through the decoder only. With add_error=False
    the output is the reconstruction alone, and hook_error sees x - reconstruction.
    """

    creates_points: ClassVar[tuple[str, ...]] = SPLICE_POINTS
    encoder: Linear
    decoder: Linear
    _: KW_ONLY
    add_error: bool = True

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            if not isinstance(getattr(self, name), Linear):
                raise ValueError(f"Splice.{name} must be an sl.ops.Linear; got {type(getattr(self, name)).__name__}")

    def __call__(self, tensor: Tensor, hook: Any, ctx: RunContext) -> Tensor:
        points = ctx.root.hook_dict
        latents_point, reconstruction_point, error_point = (points[f"{hook.name}.{sub}"] for sub in SPLICE_POINTS)
        latents = self.encoder(tensor)
        reconstruction = reconstruction_point(self.decoder(latents_point(latents.clone() if self.add_error else latents)))
        if self.add_error:
            return reconstruction + error_point(tensor - self.decoder(latents))
        error_point(tensor - reconstruction)
        return reconstruction
