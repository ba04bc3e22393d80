"""HookedModel: a Hugging Face causal LM with TransformerLens hook points, run in this process."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from shardlens.hooks.architectures import Architecture, architecture_for
from shardlens.hooks.attention import IMPLEMENTATION
from shardlens.hooks.generation import KeyValueCache, prefix_copy
from shardlens.hooks.lens import WeightViews
from shardlens.hooks.layers import default_positions, next_token_loss, positions_from_mask, run_layers
from shardlens.hooks.run import BaseRun, Resume, RunRequest, RunResult, output_of
from shardlens.hooks.taps import LogitTransform, ModelParts, PointOptions, module_taps
from shardlens.hooks.shapes import cache_fields
from shardlens.hooks.sources import model_config
from shardlens.hooks.tapped_model import TappedModel, no_architecture_for_options


class HookedModel(WeightViews, TappedModel):
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

    TransformerLens' analysis code reads `cfg`, `to_str_tokens`, `to_single_token` and the
    weight views (W_E, W_Q, W_O, W_in, W_U, ...; see shardlens.hooks.lens.WeightViews).

    Example:
        >>> model = sl.HookedModel.from_pretrained("path/to/checkpoint")
        >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.hook_resid_post")
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, point_options: PointOptions = PointOptions()):
        super().__init__()
        self.model = hf_model
        self.tokenizer = tokenizer
        config = getattr(hf_model, "config", None)
        self.architecture: Optional[Architecture] = architecture_for(config) if config is not None else None
        # the language model's own config (a multimodal model's text_config): sizes, layers, masks
        self.config = config.get_text_config() if config is not None else None
        if self.architecture is None:
            if point_options != PointOptions():
                raise ValueError(no_architecture_for_options(self.config))
            paths = [path for path, _ in hf_model.named_modules() if path]
            self._module_taps = module_taps(hf_model, paths)
        else:
            self._use_shardlens_attention()
            self.logit_transform = LogitTransform(self.architecture)  # for readouts outside the model's forward
            self.build_points(point_options)
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

        Raises:
            ModelSourceError: `path_or_name` is no checkpoint folder, nor a hub id that loads;
                the message says which, and what was expected.
        """
        from transformers import AutoModelForCausalLM

        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, device_map=device_map, **hf_kwargs)
        except (OSError, ValueError):
            model_config(path_or_name)  # a source that is no checkpoint says so; any other error stays transformers'
            raise
        # in eval mode, as transformers' from_pretrained returns a model (no dropout)
        return cls(hf_model, load_tokenizer(path_or_name), point_options=point_options).eval()

    # ------------------------------------------------------------------ hook points

    def _use_shardlens_attention(self) -> None:
        if self.architecture.attention_forward is not None:
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
            blocks=dict(enumerate(module(self.architecture.blocks))),
            embed=module(self.architecture.embed),
            pos_embed=module(self.architecture.pos_embed) if self.architecture.pos_embed else None,
            final_norm=module(self.architecture.final_norm),
            unembed=module(self.architecture.unembed),
            # a family that changes the logits in its forward (scale, soft-cap): the model's own output
            logits=self.model if self.architecture.transforms_logits else None,
        )

    def _module_root(self) -> nn.Module:
        return self.model

    def _blocks_path(self) -> str:
        return self.architecture.blocks

    # ------------------------------------------------------------------ running

    takes_tokens = True  # its runs take token ids, return_type, attention_mask, ... (a plain module's do not)

    def forward(
        self,
        input: Any = None,
        *,
        return_type: Optional[str] = "logits",
        attention_mask: Optional[Tensor] = None,
        metric: Any = None,
        past_kv_cache: Optional[KeyValueCache] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the wrapped model through its hook points (one run: see `run`).

        Args:
            input: token ids [batch, pos] (or [pos]), a string or list of strings (needs a
                tokenizer). A model that is not a causal LM gets all arguments as they are.
            return_type: "logits" [batch, pos, vocab], "loss" (mean next-token loss, a scalar),
                "both" (logits, loss), "metric" (the value of `metric`, a scalar), or None.
                With a metric given, "loss" and "both" give the metric's value.
            attention_mask: [batch, pos], 1 for real tokens, 0 for padding. Position ids then
                count only real tokens, so padding does not shift an example's positions.
            metric: an sl.metrics score, for return_type="metric".
            past_kv_cache: a KeyValueCache of earlier tokens: only `input` (the new tokens)
                runs, attending to them; the cache grows unless it is frozen.
            **kwargs: passed to the wrapped model's forward.
        """
        if not self._is_lm:
            return self.call_with((input,), kwargs)
        options = dict(return_type=return_type, attention_mask=attention_mask, metric=metric, past_kv_cache=past_kv_cache)
        return self.call_with((input,), {**options, **kwargs})

    @property
    def _is_lm(self) -> bool:
        return self.architecture is not None or hasattr(self.model, "get_output_embeddings")

    def run(self, request: RunRequest) -> RunResult:
        """One run (see HookedRootModule.run); a run that fails leaves its key/value cache as
        it was."""
        cache = request.kv_cache
        held = cache.seq_len if isinstance(cache, KeyValueCache) else None
        try:
            return super().run(request)
        except BaseException:  # the cache has grown (in the layers that ran)
            if held is not None and not cache.frozen and cache.hf_cache is not None:
                cache.truncate(held)
            raise

    def _compute(self, request: RunRequest) -> tuple[Any, Optional[Tensor], Optional[Tensor]]:
        self.sync_taps()
        if not self._is_lm:
            mask = {} if request.attention_mask is None else {"attention_mask": request.attention_mask}
            output = self.model(request.input, **mask, **request.forward_kwargs)
            return output, output, None
        tokens, mask = self.tokens_of(request.input, request.attention_mask)
        first = self.readout_start(request.logits_from(tokens.shape[1], mask, backward=request.needs_grad))
        if request.resume is not None:
            start = request.resume.position  # the output covers the positions from here on
            first = max(first - start, 0)
            logits = self._resume(request, tokens, mask, logits_from=first)
            tokens, mask = tokens[:, start:], None if mask is None else mask[:, start:]
        elif request.kv_cache is not None:
            first = 0
            logits = self._with_kv_cache(tokens, mask, request.kv_cache, request.forward_kwargs)
        else:
            kwargs = dict(request.forward_kwargs)
            if "position_ids" not in kwargs and ((mask is not None and not bool(mask.all())) or (self.architecture and self.architecture.pos_embed)):
                kwargs["position_ids"] = default_positions(tokens, mask)
            if first and "logits_to_keep" not in kwargs and self._keeps_logits:
                kwargs["logits_to_keep"] = tokens.shape[1] - first
            else:
                first = 0
            logits = self.model(input_ids=tokens, attention_mask=mask, use_cache=False, **kwargs).logits
        value = None
        if request.return_type not in ("logits", None) or request.needs_grad:
            # the logits cover the positions from `first` on
            read_tokens, read_mask = tokens[:, first:], None if mask is None else mask[:, first:]
            value = request.metric(logits, read_mask, read_tokens) if request.metric is not None else next_token_loss(logits, tokens, mask)
        return output_of(request.return_type, logits, value), value, mask

    @functools.cached_property
    def _keeps_logits(self) -> bool:
        """Whether the wrapped model's forward can unembed only the last positions."""
        return "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _with_kv_cache(self, tokens: Tensor, mask: Optional[Tensor], cache: KeyValueCache, kwargs: dict) -> Tensor:
        """The logits of the new tokens, attending to the cached ones (see `run` for a failure)."""
        if not isinstance(cache, KeyValueCache) or cache.hf_cache is None:
            raise TypeError(f"past_kv_cache must be an open KeyValueCache of this model (model.init_kv_cache()); got {type(cache).__name__}")
        full_mask = cache.append_attention_mask(torch.ones_like(tokens) if mask is None else mask)
        positions = positions_from_mask(full_mask)[:, -tokens.shape[1]:]
        return self.model(
            input_ids=tokens, attention_mask=full_mask, position_ids=positions, cache=cache.for_run(), use_cache=True, **kwargs
        ).logits

    def _resume(self, request: RunRequest, tokens: Tensor, mask: Optional[Tensor], *, logits_from: int) -> Tensor:
        """The logits of a run resumed inside a base run (see Resume), from its position on
        (of those from `logits_from` on, counted from there): only the layers from
        resume.layer on run, over those positions, attending to the base run's keys and
        values before them. Hook points of the layers run fire as usual."""
        resume = request.resume
        base = resume.base
        if not isinstance(base, LocalBaseRun) or base.model is not self:
            raise TypeError(f"Resume.base must be a base run of this model (model.base_run(tokens)); got {type(base).__name__}")
        resume.check(tokens, self.config.num_hidden_layers, request, mask)
        hidden, cache = base.start(resume)
        if torch.is_grad_enabled():
            hidden = hidden.detach().requires_grad_(True)
        positions, run_mask = resume.entry(tokens, mask)
        rotary = self.model.get_submodule(self.architecture.rotary) if self.architecture.rotary else None
        blocks = {i: block for i, block in self._parts().blocks.items() if i >= resume.layer}
        hidden = run_layers(self.config, self.architecture, blocks, rotary, hidden, attention_mask=run_mask, position_ids=positions, cache=cache)
        logits = self.readout(hidden, start=logits_from)
        # hook_logits is on the model's own output where its forward changes the logits (see _parts)
        return self.points.hook_logits(logits) if self.architecture.transforms_logits else logits

    def _keep_base(self, tokens: Tensor, mask: Optional[Tensor]) -> "LocalBaseRun":
        """One run of `tokens` through a key/value cache, keeping every layer's resid_pre."""
        names = Resume.points(self.config.num_hidden_layers)
        kv = self._new_kv_cache(tokens.shape[0])
        try:
            with torch.no_grad():
                result = self.run(RunRequest(tokens, attention_mask=mask, specs=(Resume.keeping(len(names)),), kv_cache=kv))
        except BaseException:
            kv.close()
            raise
        return LocalBaseRun(self, tokens, mask, result.output, [result.cache[name] for name in names], kv)

    def _new_kv_cache(self, batch_size: int) -> KeyValueCache:
        return KeyValueCache.init_cache(self.config, self._device, batch_size)

    @property
    def _device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _place(self, tokens: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        device = self._device
        return tokens.to(device), None if mask is None else mask.to(device)

    def _cache_fields(self) -> dict:
        if self.architecture is None:
            return {}
        return {"readout": self.readout, **cache_fields(self.architecture)}

    def _lens_config_args(self) -> tuple[Any, dict]:
        if self.architecture is None:
            return super()._lens_config_args()
        weight = self.model.get_input_embeddings().weight
        return self.model.config, dict(device=weight.device, dtype=weight.dtype, options=self.point_options)

    def _dataset_metadata(self) -> dict:
        dtype = next(self.model.parameters()).dtype
        return {"model": getattr(self.config, "_name_or_path", None), "dtype": str(dtype).removeprefix("torch.")}


class LocalBaseRun(BaseRun):
    """A HookedModel's base run: each layer's resid_pre and the key/value cache, in memory."""

    def __init__(self, model: HookedModel, tokens: Tensor, mask: Optional[Tensor], logits: Tensor, resid: list[Tensor], kv: KeyValueCache):
        super().__init__(tokens, mask, logits)
        self.model, self.resid, self.kv = model, resid, kv

    def start(self, resume: Resume) -> tuple[Tensor, Any]:
        """The hidden states entering resume.layer from resume.position on, and a cache of the
        keys and values before it in the layers from resume.layer on (None at position 0),
        both of the batch repeated resume.repeat times."""
        if self.kv.hf_cache is None:
            raise ValueError("this base run was closed: make a new one with model.base_run(tokens)")
        layer, position, times = resume.layer, resume.position, resume.repeat
        hidden = self.resid[layer][:, position:].repeat(times, 1, 1)  # [batch * times, pos - position, d_model]
        if position == 0:
            return hidden, None
        return hidden, prefix_copy(self.kv.hf_cache, position, times, config=self.model.config, layers=range(layer, len(self.resid)))

    def close(self) -> None:
        self.resid = []
        self.kv.close()


def load_tokenizer(path_or_name: Union[str, os.PathLike]) -> Any:
    """The checkpoint's tokenizer, or None when a local checkpoint has none."""
    from transformers import AutoTokenizer

    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(path_or_name) and not any(os.path.exists(os.path.join(path_or_name, f)) for f in tokenizer_files):
        return None
    return AutoTokenizer.from_pretrained(path_or_name)
