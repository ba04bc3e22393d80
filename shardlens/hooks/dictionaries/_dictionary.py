"""A dictionary (sparse autoencoder or transcoder) as a value: its weights (by reference or
inline) and how it encodes and decodes, with SAELens' definitions of each architecture.

Tensor names and orientations are SAELens': W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae] (JumpReLU), b_gate / b_mag / r_mag
[d_sae] (gated), topk_threshold [] (a batch-top-k training checkpoint), W_skip [d_out, d_in]
(a transcoder's affine skip). An SAE has d_out = d_in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import KW_ONLY, dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from shardlens.hooks.codec import serializable, values_equal
from shardlens.hooks.dictionaries._weights import WeightsRef, shapes
from shardlens.tables.dtypes import normalize_dtype

ARCHITECTURES = ("standard", "gated", "jumprelu", "topk", "batchtopk")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_NEEDS = {
    "standard": ("b_enc",), "jumprelu": ("b_enc", "threshold"), "gated": ("b_gate", "b_mag", "r_mag"),
    "topk": ("b_enc",), "batchtopk": ("b_enc", "topk_threshold"),
}
_LAYER_NORM_EPS = 1e-5  # SAELens' run-time layer norm


@serializable
@dataclass(frozen=True, eq=False)
class Dictionary:
    """A sparse dictionary: encode(x) -> latents [..., d_sae], decode(latents) -> [..., d_out].

    Args:
        weights: a `WeightsRef` (loaded by the process that uses it) or a dict of tensors.
        architecture: "standard" (ReLU), "gated", "jumprelu", "topk", or "batchtopk" (a
            batch-top-k training checkpoint: at inference a JumpReLU whose threshold is its
            learnt topk_threshold, as SAELens saves it for inference).
        k: latents kept per token ("topk").
        apply_b_dec_to_input: subtract b_dec from the input before encoding (SAEs only).
        normalize_activations: SAELens' run-time normalisation: "constant_norm_rescale"
            (scale x to norm sqrt(d_in), undo on the output), "layer_norm" (centre and divide
            by the std, undo on the output), or "none" / "expected_average_only_in" (folded
            into the weights once training ends: nothing at run time).
        rescale_acts_by_decoder_norm: top-k selection on pre-activations times the decoder
            row norms, latents divided by them on decoding (SAELens' topk option).
        reshape_activations: "hook_z" flattens [..., head, d_head] to [..., head * d_head].
        transcoder: its output is not its input's space (it reads one hook point and writes
            another): run-time normalisation of the input is not undone on the output, as in
            SAELens' Transcoder, and b_dec is never subtracted from the input.
        dtype: compute in this dtype (default: the weights'): latents come in it, decode's
            output in the dtype of the input x it is given.
    """

    weights: Any
    _: KW_ONLY
    architecture: str = "standard"
    k: Optional[int] = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"
    transcoder: bool = False
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.weights, (WeightsRef, dict)):
            raise ValueError(f"weights must be a WeightsRef or a dict of tensors; got {type(self.weights).__name__}")
        for value, name, choices in ((self.architecture, "architecture", ARCHITECTURES),
                                     (self.normalize_activations, "normalize_activations", NORMALIZATIONS),
                                     (self.reshape_activations, "reshape_activations", ("none", "hook_z"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if (self.architecture == "topk") != (self.k is not None):
            raise ValueError(f"k is the number of latents a 'topk' dictionary keeps, and only that; got k={self.k!r} "
                             f"with architecture={self.architecture!r}")
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive int; got {self.k!r}")
        if self.transcoder and self.apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input=True: a transcoder's b_dec is in its output space, not its input's")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype, "dtype"))
        # Read once: for a reference, each read of the header is a file (or object store) request.
        found = shapes(self.weights.uri) if isinstance(self.weights, WeightsRef) else {n: tuple(t.shape) for n, t in self.weights.items()}
        check_shapes(found, self.architecture, where=self._where)
        object.__setattr__(self, "_shapes", found)

    # ------------------------------------------------------------------ sizes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape (for a reference, from the file's header: no weights are read)."""
        return dict(self._shapes)

    @property
    def d_in(self) -> int:
        return self.shapes()["W_enc"][0]

    @property
    def d_sae(self) -> int:
        return self.shapes()["W_enc"][1]

    @property
    def d_out(self) -> int:
        return self.shapes()["W_dec"][1]

    @property
    def has_skip(self) -> bool:
        return "W_skip" in self.shapes()

    @property
    def _where(self) -> str:
        return self.weights.uri if isinstance(self.weights, WeightsRef) else "weights"

    # ------------------------------------------------------------------ the maths

    def encode(self, x: Tensor) -> Tensor:
        """The latents of `x` [..., d_in] (or [..., head, d_head] with reshape "hook_z")."""
        w = self._placed(x.device)
        sae_in = self._normalize(self._flatten(x).to(w["W_enc"].dtype))
        if self.apply_b_dec_to_input:
            sae_in = sae_in - w["b_dec"]
        if self.architecture == "gated":
            active = (sae_in @ w["W_enc"] + w["b_gate"] > 0).to(sae_in.dtype)
            return active * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if self.rescale_acts_by_decoder_norm:
            pre = pre * w["W_dec"].norm(dim=-1)
        if self.architecture == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if self.architecture in ("jumprelu", "batchtopk"):
            threshold = w["threshold"] if self.architecture == "jumprelu" else w["topk_threshold"]
            return torch.relu(pre) * (pre > threshold).to(pre.dtype)
        return torch.relu(pre)

    def decode(self, latents: Tensor, x: Optional[Tensor] = None) -> Tensor:
        """The reconstruction of `latents`: [..., d_out], in `x`'s dtype and shape.

        `x` is the input the latents were encoded from: an SAE's run-time normalisation is
        undone with its statistics, and a transcoder's skip term (W_skip @ x) is added.
        """
        w = self._placed(latents.device)
        if self.rescale_acts_by_decoder_norm:
            latents = latents / w["W_dec"].norm(dim=-1)
        out = latents.to(w["W_dec"].dtype) @ w["W_dec"] + w["b_dec"]
        if self.normalize_activations in ("constant_norm_rescale", "layer_norm") and not self.transcoder:
            if x is None:
                raise ValueError(f"decode needs the input x to undo normalize_activations={self.normalize_activations!r}")
            out = self._denormalize(out, self._flatten(x).to(out.dtype))
        if "W_skip" in w:
            if x is None:
                raise ValueError("decode needs the input x to add a transcoder's skip term")
            out = out + self._flatten(x).to(out.dtype) @ w["W_skip"].T
        if x is None:
            return out
        return self._unflatten(out, x).to(x.dtype)

    # ------------------------------------------------------------------ helpers

    def _flatten(self, x: Tensor) -> Tensor:
        return x.flatten(-2) if self.reshape_activations == "hook_z" else x

    def _unflatten(self, out: Tensor, x: Tensor) -> Tensor:
        return out.unflatten(-1, x.shape[-2:]) if self.reshape_activations == "hook_z" and out.shape[-1] == x.shape[-2:].numel() else out

    def _normalize(self, x: Tensor) -> Tensor:
        if self.normalize_activations == "constant_norm_rescale":
            return x * (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
        if self.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + _LAYER_NORM_EPS)
        return x

    def _denormalize(self, out: Tensor, x: Tensor) -> Tensor:
        if self.normalize_activations == "constant_norm_rescale":
            return out / (x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True))
        mean = x.mean(dim=-1, keepdim=True)
        return out * (x - mean).std(dim=-1, keepdim=True) + mean

    def _placed(self, device: torch.device) -> dict[str, Tensor]:
        """The tensors on `device`, in the compute dtype (converted once per process)."""
        dtype = getattr(torch, self.dtype) if self.dtype else None
        if isinstance(self.weights, WeightsRef):
            return _placed_ref(self.weights, self.architecture, str(device), dtype)
        return {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in self.weights.items()}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            values_equal(getattr(self, f), getattr(other, f)) if f != "weights" else _same_weights(self.weights, other.weights)
            for f in self.__dataclass_fields__
        )

    __hash__ = None


def _same_weights(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    return a == b


_PLACED: OrderedDict[tuple, dict[str, Tensor]] = OrderedDict()
PLACED_KEPT = 4  # dictionaries a process keeps on its devices (the ones used last)


def _placed_ref(ref: WeightsRef, architecture: str, device: str, dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    # Kept across batches, keyed by the file's hash: a worker uses the same dictionary for
    # every batch, and reading a 1 GB decoder (and moving it to the GPU) per batch would
    # dominate the run. A copy on the CPU in the file's dtype is the tensors read, not a copy.
    key = (ref.uri, ref.sha256, device, dtype)
    if key not in _PLACED:
        tensors = ref.tensors()
        check_shapes({n: tuple(t.shape) for n, t in tensors.items()}, architecture, where=ref.uri)
        _PLACED[key] = {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in tensors.items()}
        while len(_PLACED) > PLACED_KEPT:
            _PLACED.popitem(last=False)
    _PLACED.move_to_end(key)
    return _PLACED[key]


def forget_loaded_weights() -> None:
    """Drop every dictionary's tensors this process keeps (the next use reads the file)."""
    _PLACED.clear()


def check_shapes(found: dict, architecture: str, *, where: str) -> None:
    """Refuse tensors an architecture cannot use, naming what is missing or misshapen."""
    needed = ("W_enc", "W_dec", "b_dec") + _NEEDS[architecture]
    missing = [n for n in needed if n not in found]
    if missing:
        raise ValueError(f"{where}: a {architecture!r} dictionary needs tensors {', '.join(needed)}; "
                         f"missing {', '.join(missing)} (has {', '.join(sorted(found))})")
    if len(found["W_enc"]) != 2 or len(found["W_dec"]) != 2:
        raise ValueError(f"{where}: W_enc and W_dec must be matrices; got shapes {list(found['W_enc'])} and {list(found['W_dec'])}")
    d_in, d_sae = found["W_enc"]
    d_out = found["W_dec"][1]
    expected = {"W_dec": (d_sae, d_out), "b_dec": (d_out,), "b_enc": (d_sae,), "threshold": (d_sae,), "b_gate": (d_sae,),
                "b_mag": (d_sae,), "r_mag": (d_sae,), "W_skip": (d_out, d_in)}
    for name, shape in expected.items():
        if name in found and tuple(found[name]) != shape:
            raise ValueError(f"{where}: {name} has shape {list(found[name])}, but W_enc [d_in={d_in}, d_sae={d_sae}] "
                             f"and W_dec [d_sae, d_out={d_out}] make it {list(shape)}")
