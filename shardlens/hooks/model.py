"""HookedModel: a Hugging Face causal LM with TransformerLens hook points, run by its own forward."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.errors import HookNameError
from shardlens.hooks.architectures import ModelLayout, layout_for
from shardlens.hooks.attention import IMPLEMENTATION
from shardlens.hooks.hook_points import HookedRootModule, HookPoint, HookTarget
from shardlens.hooks.names import NamesFilter, is_glob
from shardlens.hooks.taps import ModelPoints, OutputTap, Tap, model_taps, module_point_name, module_taps

ReturnType = Optional[str]  # "logits" | "loss" | "both" | None
_RETURN_TYPES = ("logits", "loss", "both", None)
_MODULE_PREFIX = "module:"


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


class HookedModel(HookedRootModule):
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
        attn_result: add `blocks.{L}.attn.hook_result`, each head's output through W_O.

    Example:
        >>> model = sl.HookedModel.from_pretrained("path/to/checkpoint")
        >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, attn_result: bool = False):
        super().__init__()
        self.model = hf_model
        self.tokenizer = tokenizer
        config = getattr(hf_model, "config", None)
        self.layout: Optional[ModelLayout] = layout_for(config) if config is not None else None
        self._taps: list[Tap] = []
        self._module_taps: dict[str, OutputTap] = {}
        if self.layout is None:
            paths = [path for path, _ in hf_model.named_modules() if path]
            self._module_taps = module_taps(hf_model, paths)
        else:
            self._use_shardlens_attention()
            self._build_points(attn_result)
        self.setup()

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: Union[str, os.PathLike],
        *,
        dtype: torch.dtype = torch.float32,
        device_map: Union[str, dict, None] = None,
        attn_result: bool = False,
        **hf_kwargs: Any,
    ) -> "HookedModel":
        """Load a causal LM (and its tokenizer, when the checkpoint has one) and wrap it.

        Args:
            path_or_name: a local checkpoint folder or a hub id.
            dtype: parameter dtype (torch.float32, torch.bfloat16, ...).
            device_map: as transformers / accelerate take it ("auto", a dict, ...).
            **hf_kwargs: passed to AutoModelForCausalLM.from_pretrained.
        """
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, device_map=device_map, **hf_kwargs)
        return cls(hf_model.eval(), _load_tokenizer(path_or_name), attn_result=attn_result)

    # ------------------------------------------------------------------ hook points

    def _use_shardlens_attention(self) -> None:
        self.model.set_attn_implementation(IMPLEMENTATION)
        if self.model.config._attn_implementation != IMPLEMENTATION:
            raise NotImplementedError(
                f"{type(self.model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so shardlens cannot place its attention hook points in it"
            )

    def _build_points(self, attn_result: bool) -> None:
        n_layers = len(self.model.get_submodule(self.layout.blocks))
        self.points = ModelPoints(self.layout, range(n_layers), has_embed=True, has_head=True, attn_result=attn_result)
        self._taps = model_taps(self.points, self.model, self.layout, self.model.config.num_attention_heads)
        self._attn_result = attn_result

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Add (or remove) `blocks.{L}.attn.hook_result`. Needs a model with no hooks attached."""
        if self.layout is None or use_attn_result == self._attn_result:
            return
        if self.has_hooks():
            raise RuntimeError("set_use_attn_result rebuilds the hook points: call reset_hooks(including_permanent=True) first")
        for tap in self._taps:
            tap.sync()  # with no hooks: unwire everything before the points are replaced
        self._build_points(use_attn_result)
        self.setup()

    def setup(self) -> None:
        """Index the hook points by canonical name, and the wrapped model's modules by path."""
        self.hook_dict = dict(self._extra_points)
        if self.layout is not None:
            for name, module in self.points.named_modules():
                if isinstance(module, HookPoint):
                    module.name = name
                    self.hook_dict[name] = module
        self.hook_dict.update({name: tap.point for name, tap in self._module_taps.items()})
        self.mod_dict = {path: module for path, module in self.model.named_modules() if path}
        self.mod_dict.update(self.hook_dict)

    def _add_module_point(self, name: str) -> None:
        path = name[len(_MODULE_PREFIX):]
        try:
            self.model.get_submodule(path)
        except AttributeError:
            paths = [module_point_name(p) for p, _ in self.model.named_modules() if p]
            raise HookNameError(name, paths) from None
        self._module_taps.update(module_taps(self.model, [path]))
        self.setup()

    def _prepare_names(self, names: Union[NamesFilter, HookTarget]) -> None:
        """Create the `module:<path>` points an exact name asks for (they are made on request)."""
        if isinstance(names, str):
            names = [names]
        if isinstance(names, (list, tuple)):
            for name in names:
                if isinstance(name, str) and name.startswith(_MODULE_PREFIX) and not is_glob(name) and name not in self.hook_dict:
                    self._add_module_point(name)

    def _sync_taps(self) -> None:
        for tap in self._taps:
            tap.sync()
        for tap in self._module_taps.values():
            tap.sync()

    # ------------------------------------------------------------------ shapes and weights

    def _attention_module(self, layer: int, path: str) -> nn.Module:
        return self.model.get_submodule(self.layout.blocks)[layer].get_submodule(path)

    def w_o(self, layer: int) -> Tensor:
        """Layer `layer`'s attention output weights per head, [head, d_head, d_model]."""
        o_proj = self._attention_module(layer, self.layout.block.o_proj)
        weight = o_proj.weight if self.layout.block.o_proj_kind == "conv1d" else o_proj.weight.T
        return weight.unflatten(0, (self.config.num_attention_heads, -1))

    def b_o(self, layer: int) -> Tensor:
        """Layer `layer`'s attention output bias, [d_model] (zeros when it has none)."""
        o_proj = self._attention_module(layer, self.layout.block.o_proj)
        return o_proj.bias if o_proj.bias is not None else o_proj.weight.new_zeros(self.config.hidden_size)

    def hook_shape(self, name: str) -> Optional[tuple[int, ...]]:
        """The shape of a canonical hook point's tensors after [batch, pos], or None where it
        depends on the input (attention scores and patterns) or is unknown."""
        if self.layout is None or name.startswith(_MODULE_PREFIX) or name not in self.hook_dict:
            return None
        config = self.config
        d_model, n_heads = config.hidden_size, config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        d_head = getattr(config, "head_dim", None) or d_model // n_heads
        d_mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model
        shapes = {
            "hook_q": (n_heads, d_head), "hook_k": (n_kv, d_head), "hook_v": (n_kv, d_head), "hook_z": (n_heads, d_head),
            "hook_result": (n_heads, d_model), "hook_scale": (1,), "hook_logits": (config.vocab_size,),
            "hook_pre": (d_mlp,), "hook_pre_linear": (d_mlp,), "hook_post": (d_mlp,),
            "hook_attn_scores": None, "hook_pattern": None,
        }
        return shapes.get(name.rsplit(".", 1)[-1], (d_model,))

    # ------------------------------------------------------------------ running

    @property
    def config(self) -> Any:
        """The wrapped model's transformers config."""
        return self.model.config

    def forward(
        self,
        input: Any = None,
        *args: Any,
        return_type: ReturnType = "logits",
        attention_mask: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the wrapped model through its hook points.

        Args:
            input: token ids [batch, pos] (or [pos]), a string or list of strings (needs a
                tokenizer). A model that is not a causal LM gets all arguments as they are.
            return_type: "logits" [batch, pos, vocab], "loss" (mean next-token loss, a scalar),
                "both" (logits, loss), or None.
            attention_mask: [batch, pos], 1 for real tokens, 0 for padding. Position ids then
                count only real tokens, so padding does not shift an example's positions.
            **kwargs: passed to the wrapped model's forward.
        """
        self._sync_taps()
        if self.layout is None and not hasattr(self.model, "get_output_embeddings"):
            return self.model(input, *args, **kwargs)
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}; got {return_type!r}")
        tokens, attention_mask = self._inputs(input, attention_mask)
        if attention_mask is not None and "position_ids" not in kwargs and not bool(attention_mask.all()):
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        logits = self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False, *args, **kwargs).logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = next_token_loss(logits, tokens, attention_mask)
        return loss if return_type == "loss" else (logits, loss)

    def _inputs(self, input: Any, attention_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(input, (str, list)) and (isinstance(input, str) or all(isinstance(s, str) for s in input)):
            encoded = self._tokenizer_or_raise("text input")(input, return_tensors="pt", padding=True)
            tokens, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        elif isinstance(input, Tensor):
            if input.dtype.is_floating_point or input.dtype == torch.bool:
                raise TypeError(f"token ids must be an integer tensor; got dtype {input.dtype}")
            tokens = input[None] if input.ndim == 1 else input
            if tokens.ndim != 2:
                raise ValueError(f"token ids must be [batch, pos] or [pos]; got shape {tuple(input.shape)}")
        else:
            raise TypeError(f"input must be token ids (a tensor) or text; got {type(input).__name__}")
        device = self.model.get_input_embeddings().weight.device
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
            attention_mask = attention_mask.to(device)
        return tokens.to(device), attention_mask

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
