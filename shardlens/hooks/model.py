"""HookedModel: a Hugging Face causal LM with TransformerLens hook points, run by its own forward."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.hooks.architectures import ModelLayout, layout_for
from shardlens.hooks.attention import IMPLEMENTATION
from shardlens.hooks.generation import KeyValueCache, generate
from shardlens.hooks.metrics import Metric
from shardlens.hooks.layers import run_layers
from shardlens.hooks.taps import LogitTransform, ModelParts, PointOptions, module_taps
from shardlens.hooks.tapped import TappedModel, cache_fields, no_layout_for_options

ReturnType = Optional[str]  # "logits" | "loss" | "both" | "metric" | None
_RETURN_TYPES = ("logits", "loss", "both", "metric", None)


def token_ids(input: Any, attention_mask: Optional[Tensor], tokenizer: Callable[[], Any]) -> tuple[Tensor, Optional[Tensor]]:
    """Token ids [batch, pos] and the attention mask (None when there is none) of `input`:
    integer ids ([batch, pos] or [pos]) or text, encoded with padding by `tokenizer()` (which
    raises when there is no tokenizer)."""
    if isinstance(input, (str, list)) and (isinstance(input, str) or all(isinstance(s, str) for s in input)):
        encoded = tokenizer()(input, return_tensors="pt", padding=True)
        tokens, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    elif isinstance(input, Tensor):
        if input.dtype.is_floating_point or input.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor; got dtype {input.dtype}")
        tokens = input[None] if input.ndim == 1 else input
        if tokens.ndim != 2:
            raise ValueError(f"token ids must be [batch, pos] or [pos]; got shape {tuple(input.shape)}")
    else:
        raise TypeError(f"input must be token ids (a tensor) or text; got {type(input).__name__}")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    return tokens, attention_mask


def next_token_loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean cross-entropy of predicting each next token, over positions where both the token
    and its successor are real (not padding). Computed in float32."""
    log_probs = logits[:, :-1].float().log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]  # [batch, pos - 1]
    if attention_mask is None:
        return nll.mean()
    mask = attention_mask.to(logits.device).bool()
    return nll[mask[:, :-1] & mask[:, 1:]].mean()


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only real tokens, so a left-padded example sees the positions
    it would see alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HookedModel(TappedModel):
    """A transformers causal LM whose own forward runs through canonical hook points.

    Registered architectures (see `shardlens.hooks.architectures`) get the TransformerLens
    names (`blocks.3.attn.hook_pattern`, ...); attention internals come from shardlens'
    attention function, registered with transformers' AttentionInterface. Any module can
    also be hooked by its path (`module:model.layers.3.mlp`); a model of an unregistered
    architecture, or any other nn.Module, gets those points on every submodule.

    The wrapped model is changed in place: its attention implementation becomes "shardlens"
    (which takes transformers' SDPA path in every layer whose attention points have no hooks).

    Args:
        hf_model: a transformers causal LM (or, with module points only, any nn.Module).
        tokenizer: optional; lets forward take text and enables to_tokens / to_string.
        point_options: TransformerLens' optional hook points to add (sl.PointOptions:
            hook_result, split q/k/v inputs, attn_in, mlp_in, hook_tokens, each expert); also
            switched by the set_use_* methods.

    Example:
        >>> model = sl.HookedModel.from_pretrained("path/to/checkpoint")
        >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, point_options: PointOptions = PointOptions()):
        super().__init__()
        self.model = hf_model
        self.tokenizer = tokenizer
        self._last_attention_mask: Optional[Tensor] = None
        config = getattr(hf_model, "config", None)
        self.layout: Optional[ModelLayout] = layout_for(config) if config is not None else None
        # the language model's own config (a multimodal model's text_config): sizes, layers, masks
        self.config = config.get_text_config() if config is not None else None
        if self.layout is None:
            if point_options != PointOptions():
                raise ValueError(no_layout_for_options(self.config))
            paths = [path for path, _ in hf_model.named_modules() if path]
            self._module_taps = module_taps(hf_model, paths)
        else:
            self._use_shardlens_attention()
            self.logit_transform = LogitTransform(self.layout)  # for readouts outside the model's forward
            self._build_points(point_options)
        self.setup()

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: Union[str, os.PathLike],
        *,
        dtype: Union[torch.dtype, str] = "auto",
        device_map: Union[str, dict, None] = None,
        point_options: PointOptions = PointOptions(),
        **hf_kwargs: Any,
    ) -> "HookedModel":
        """Load a causal LM (and its tokenizer, when the checkpoint has one) and wrap it.

        Args:
            path_or_name: a local checkpoint folder or a hub id.
            dtype: parameter dtype (torch.float32, torch.bfloat16, ...); "auto" (transformers'):
                the one the checkpoint's config names, else that of its weights.
            device_map: as transformers / accelerate take it ("auto", a dict, ...).
            **hf_kwargs: passed to AutoModelForCausalLM.from_pretrained.
        """
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, device_map=device_map, **hf_kwargs)
        return cls(hf_model.eval(), _load_tokenizer(path_or_name), point_options=point_options)

    # ------------------------------------------------------------------ hook points

    def _use_shardlens_attention(self) -> None:
        if self.layout.attention_forward is not None:
            return  # its attention modules run shardlens' forward while hooked (taps.AttentionForwardTap)
        self.model.set_attn_implementation(IMPLEMENTATION)
        if self.model.config._attn_implementation != IMPLEMENTATION:
            raise NotImplementedError(
                f"{type(self.model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so shardlens cannot place its attention hook points in it"
            )

    def _parts(self) -> ModelParts:
        module = self.model.get_submodule
        return ModelParts(
            blocks=dict(enumerate(module(self.layout.blocks))),
            embed=module(self.layout.embed),
            pos_embed=module(self.layout.pos_embed) if self.layout.pos_embed else None,
            final_norm=module(self.layout.final_norm),
            unembed=module(self.layout.unembed),
            # a family that changes the logits in its forward (scale, soft-cap): the model's own output
            logits=self.model if self.layout.transforms_logits else None,
        )

    def _module_root(self) -> nn.Module:
        return self.model

    def _blocks_path(self) -> str:
        return self.layout.blocks

    # ------------------------------------------------------------------ running

    def forward(
        self,
        input: Any = None,
        *args: Any,
        return_type: ReturnType = "logits",
        attention_mask: Optional[Tensor] = None,
        metric: Optional[Metric] = None,
        past_kv_cache: Optional[KeyValueCache] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the wrapped model through its hook points.

        Args:
            input: token ids [batch, pos] (or [pos]), a string or list of strings (needs a
                tokenizer). A model that is not a causal LM gets all arguments as they are.
            return_type: "logits" [batch, pos, vocab], "loss" (mean next-token loss, a scalar),
                "both" (logits, loss), "metric" (the value of `metric`, a scalar), or None.
            attention_mask: [batch, pos], 1 for real tokens, 0 for padding. Position ids then
                count only real tokens, so padding does not shift an example's positions.
            metric: an sl.metrics score, for return_type="metric".
            past_kv_cache: a KeyValueCache of earlier tokens: only `input` (the new tokens)
                runs, attending to them; the cache grows unless it is frozen.
            **kwargs: passed to the wrapped model's forward.
        """
        self._sync_taps()
        if self.layout is None and not hasattr(self.model, "get_output_embeddings"):
            return self.model(input, *args, **kwargs)
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}; got {return_type!r}")
        tokens, attention_mask = self._inputs(input, attention_mask)
        self._last_attention_mask = attention_mask
        if past_kv_cache is not None:
            return self._run_with_kv_cache(tokens, attention_mask, past_kv_cache, return_type, metric, kwargs)
        if attention_mask is not None and "position_ids" not in kwargs and not bool(attention_mask.all()):
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        elif self.layout is not None and self.layout.pos_embed and "position_ids" not in kwargs:
            # one row per example, so that hook_pos_embed is [batch, pos, d_model] as in TransformerLens
            kwargs["position_ids"] = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        logits = self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False, *args, **kwargs).logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if return_type == "metric":
            if metric is None:
                raise ValueError("return_type='metric' needs metric=sl.metrics....")
            return metric(logits, attention_mask, tokens)
        loss = next_token_loss(logits, tokens, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _run_with_kv_cache(self, tokens: Tensor, mask: Optional[Tensor], cache: KeyValueCache, return_type: Any, metric: Any, kwargs: dict) -> Any:
        new_mask = torch.ones_like(tokens) if mask is None else mask
        held = cache.seq_len
        full_mask = cache.append_attention_mask(new_mask)
        positions = positions_from_mask(full_mask)[:, -tokens.shape[1]:]
        try:
            logits = self.model(
                input_ids=tokens, attention_mask=full_mask, position_ids=positions, cache=cache.for_run(), use_cache=True, **kwargs
            ).logits
            if return_type in ("logits", None):
                return logits if return_type else None
            if return_type == "metric":
                return metric(logits, new_mask, tokens)
            loss = next_token_loss(logits, tokens, new_mask)
            return loss if return_type == "loss" else (logits, loss)
        except BaseException:  # the cache has grown (in the layers that ran): a failed run leaves it as it was
            if not cache.frozen:
                cache.truncate(held)
            raise

    def generate(self, input: Any, **kwargs: Any) -> Tensor:
        """Generate tokens with hooks and specs active at every step (greedy by default);
        see shardlens.hooks.generation.generate for the options."""
        return generate(self, input, **kwargs)

    def run_from(self, layer: int, resid_pre: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The logits of the model run from layer `layer` on, given that layer's resid_pre
        [batch, pos, d_model]: what the whole forward gives when the layers before produced
        `resid_pre`, without recomputing them. Hook points of the layers run fire as usual."""
        if self.layout is None:
            raise ValueError("run_from needs a registered architecture")
        self._sync_taps()
        parts = self._parts()
        batch, pos = resid_pre.shape[:2]
        if attention_mask is not None and not bool(attention_mask.all()):
            position_ids = positions_from_mask(attention_mask)
        else:
            position_ids = torch.arange(pos, device=resid_pre.device).expand(batch, -1)
        rotary = self.model.get_submodule(self.layout.rotary) if self.layout.rotary else None
        blocks = {i: block for i, block in parts.blocks.items() if i >= layer}
        hidden = run_layers(self.config, self.layout, blocks, rotary, resid_pre, attention_mask, position_ids)
        logits = self._readout(hidden)
        # hook_logits is on the model's own output where its forward changes the logits (see _parts)
        return self.points.hook_logits(logits) if self.layout.transforms_logits else logits

    def _cache_context(self) -> dict:
        if self.layout is None:
            return {}
        return {"attention_mask": self._last_attention_mask, "readout": self._readout, **cache_fields(self.layout)}

    def _inputs(self, input: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        tokens, attention_mask = token_ids(input, attention_mask, lambda: self._tokenizer_or_raise("text input"))
        device = self.model.get_input_embeddings().weight.device
        return tokens.to(device), None if attention_mask is None else attention_mask.to(device)

    def _tokenizer_or_raise(self, what: str) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: pass HookedModel(model, tokenizer) or load a checkpoint that has one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    def to_tokens(self, text: Union[str, list[str]], *, padding_side: Optional[str] = None) -> Tensor:
        """Token ids [batch, pos] for a string or list of strings (padded with the pad token)."""
        tokenizer = self._tokenizer_or_raise("to_tokens")
        options = {} if padding_side is None else {"padding_side": padding_side}
        return tokenizer(text, return_tensors="pt", padding=True, **options)["input_ids"]

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        """The text of token ids: a string for [pos], a list of strings for [batch, pos]."""
        tokenizer = self._tokenizer_or_raise("to_string")
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return tokenizer.batch_decode(tokens)
        return tokenizer.decode(tokens)


def _load_tokenizer(path_or_name: Union[str, os.PathLike]) -> Any:
    """The checkpoint's tokenizer, or None when a local checkpoint has none."""
    from transformers import AutoTokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(path_or_name) and not any(os.path.exists(os.path.join(path_or_name, f)) for f in tokenizer_files):
        return None
    return AutoTokenizer.from_pretrained(path_or_name)
