"""ActivationCache: what one run cached, by hook name."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from shardlens.errors import HookNameError
from shardlens.tables.axes import layer_index

if TYPE_CHECKING:
    from shardlens.tables.views import View


class ActivationCache(Mapping[str, Tensor]):
    """The activations one run cached, by hook name; gradients under ``<name>_grad``.

    A read-only mapping: a value scoped to one run, not state a later run writes into.

    Args:
        tensors: hook name -> tensor, each [batch, ...]; entries cached sparsely
            (sl.ops.Cache(sparse=True) or top_k=k) are torch sparse COO tensors of the dense
            shape (see shardlens.tables.sparse).
        attention_mask: [batch, pos] (1: real token), when the run had one: it gives each
            example's sequence length, and keeps padding out of token-layout tables.
        examples: the global index of each example of the batch (default 0, 1, …).
        batch: the id of the batch the cache belongs to.
        readout: resid -> logits (the model's final norm then unembedding), for logit_lens.
        norm: "layernorm" or "rmsnorm", the kind of the final norm, for apply_ln.
        scales: what the model multiplies a component by as it enters the residual stream,
            by hook suffix ({"hook_embed": 12.0, "hook_attn_out": 0.22, ...}: Granite), for
            decompose_resid; none: 1.

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> cache["blocks.0.hook_resid_post"].shape
        torch.Size([2, 7, 64])
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        *,
        attention_mask: Optional[Tensor] = None,
        examples: Optional[Tensor] = None,
        batch: int = 0,
        readout: Optional[Callable[[Tensor], Tensor]] = None,
        norm: Optional[str] = None,
        scales: Optional[Mapping[str, float]] = None,
    ):
        self._tensors = dict(tensors)
        self.attention_mask = attention_mask
        self.examples = examples
        self.batch = batch
        self.readout = readout
        self.norm = norm
        self.scales = dict(scales or {})

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise HookNameError(name, self._tensors, what="cache entry named") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        rows = [f"  {name}: {list(t.shape)} {str(t.dtype).removeprefix('torch.')}{' sparse' if t.is_sparse else ''}"
                for name, t in self._tensors.items()]
        return f"ActivationCache({len(self)} entries" + (":\n" + "\n".join(rows) + "\n)" if rows else ")")

    def _replace(self, tensors: Mapping[str, Tensor], **changes: Any) -> "ActivationCache":
        fields = dict(
            attention_mask=self.attention_mask, examples=self.examples, batch=self.batch, readout=self.readout, norm=self.norm,
            scales=self.scales,
        )
        fields.update(changes)
        return ActivationCache(tensors, **fields)

    def to(self, device: Union[str, torch.device]) -> "ActivationCache":
        """A copy of this cache with every tensor on `device`."""
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return self._replace({name: t.to(device) for name, t in self._tensors.items()}, attention_mask=mask)

    @property
    def batch_size(self) -> int:
        return next(iter(self._tensors.values())).shape[0] if self._tensors else 0

    def example_ids(self) -> Tensor:
        """The global example index of each row of the batch."""
        return self.examples if self.examples is not None else torch.arange(self.batch_size)

    def seq_lens(self) -> Optional[Tensor]:
        """Each example's number of real tokens, from the attention mask (None without one)."""
        return None if self.attention_mask is None else self.attention_mask.long().sum(-1)

    # ------------------------------------------------------------------ TransformerLens helpers

    def _names(self, names_or_glob: Union[str, Sequence[str]]) -> list[str]:
        if isinstance(names_or_glob, str):
            matched = [n for n in self._tensors if fnmatch.fnmatchcase(n, names_or_glob)]
            if not matched:
                raise HookNameError(names_or_glob, self._tensors, what="cache entry matches the glob")
            return matched
        for name in names_or_glob:
            self[name]  # raises HookNameError naming the closest entries
        return list(names_or_glob)

    def stack(self, names_or_glob: Union[str, Sequence[str]]) -> Tensor:
        """The entries named (a list, or a glob in cache order) stacked on a new first axis."""
        return torch.stack([self[n] for n in self._names(names_or_glob)])

    def n_layers(self) -> int:
        layers = [layer_index(n) for n in self._tensors]
        return 1 + max((l for l in layers if l is not None), default=-1)

    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False) -> Tensor:
        """The residual stream before each layer up to `layer` (exclusive), as TransformerLens:
        [component, batch, pos, d_model]. With layer None, also the final resid_post.

        Args:
            incl_mid: also each layer's resid_mid, after its resid_pre.
            apply_ln: divide by the final norm's cached scale (centering first for LayerNorm).
        """
        n_layers = self.n_layers()
        layer = n_layers if layer is None else layer
        names = []
        for i in range(layer):
            names.append(f"blocks.{i}.hook_resid_pre")
            if incl_mid:
                names.append(f"blocks.{i}.hook_resid_mid")
        if layer == n_layers:
            names.append(f"blocks.{n_layers - 1}.hook_resid_post")
        stacked = self.stack(names)
        return self.apply_ln_to_stack(stacked) if apply_ln else stacked

    def decompose_resid(self, layer: Optional[int] = None, return_labels: bool = False) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The residual stream before `layer` split into what wrote it: embeddings, then each
        layer's attention and MLP outputs, [component, batch, pos, d_model], each as it entered
        the stream (times the model's multiplier for it, see `scales`): they sum to resid_pre."""
        layer = self.n_layers() if layer is None else layer
        names = [n for n in ("hook_embed", "hook_pos_embed") if n in self._tensors]
        for i in range(layer):
            names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
        stacked = torch.stack([self[n] * self.scales.get(n.rsplit(".", 1)[-1], 1.0) for n in names])
        return (stacked, names) if return_labels else stacked

    def apply_ln_to_stack(self, stack: Tensor) -> Tensor:
        """Scale a stack of residual streams by the final norm's cached scale, as the norm
        would (centering first for LayerNorm; no weights)."""
        scale = self["ln_final.hook_scale"]
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError("apply_ln needs the cache's norm kind ('layernorm' or 'rmsnorm'); this cache has none")
        if self.norm == "layernorm":
            stack = stack - stack.mean(-1, keepdim=True)
        return stack / scale

    def logit_lens(self, layer: Optional[int] = None, incl_mid: bool = False) -> Tensor:
        """The model's final norm and unembedding applied to each accumulated residual stream:
        [component, batch, pos, vocab]."""
        if self.readout is None:
            raise ValueError("logit_lens needs the model's final norm and unembedding; this cache was not given them")
        return self.readout(self.accumulated_resid(layer, incl_mid=incl_mid))

    # ------------------------------------------------------------------ views

    def view(self, tokens: Optional[Sequence[str]] = None, *, batch: int = 0, layers: Optional[Sequence[int]] = None,
             title: Optional[str] = None) -> "View":
        """The attention patterns this cache holds (blocks.{L}.attn.hook_pattern) of one example,
        per layer and head, as an HTML view (shardlens.tables.views.attention_view); padding
        positions (attention mask 0) are left out.

        Args:
            tokens: a label per position of the example (its real tokens, or all of them); default "0", "1", ...
            batch: the row of the batch to show.
            layers: the layers to show (default: every layer whose pattern is cached).
            title: the page's title (default: "attention patterns (example <batch>)").

        Example:
            >>> _, cache = model.run_with_cache(tokens, names_filter="blocks.*.attn.hook_pattern")
            >>> cache.view(["The", " cat", " sat"])   # inline in a notebook; .save("attention.html")
        """
        from shardlens.tables.views import attention_view

        cached = {layer_index(n): n for n in self._tensors if n.endswith(".attn.hook_pattern") and layer_index(n) is not None}
        if not cached:
            raise ValueError("cache.view() shows attention patterns and this cache has none; cache them with "
                             "run_with_cache(..., names_filter='blocks.*.attn.hook_pattern')")
        if layers is not None and not layers:
            raise ValueError(f"cache.view(layers=[]): name at least one layer; cached: {sorted(cached)}")
        missing = sorted(set(layers or ()) - set(cached))
        if missing:
            raise ValueError(f"cache.view(layers={list(layers)}): no pattern cached for layers {missing}; cached: {sorted(cached)}")
        if not 0 <= batch < self.batch_size:
            raise ValueError(f"cache.view(batch={batch}): the cache has {self.batch_size} examples")
        chosen = sorted(cached) if layers is None else list(layers)
        patterns = {layer: _dense(self._tensors[cached[layer]][batch]) for layer in chosen}  # each [head, q_pos, k_pos]
        n_pos = next(iter(patterns.values())).shape[-1]
        if self.attention_mask is not None:
            real = self.attention_mask[batch].bool().cpu()
            patterns = {layer: p[:, real][:, :, real] for layer, p in patterns.items()}
            if tokens is not None and len(tokens) == n_pos:
                tokens = [t for t, keep in zip(tokens, real.tolist()) if keep]
        return attention_view(patterns, tokens, title=title or f"attention patterns (example {batch})")

    # ------------------------------------------------------------------ Arrow and Parquet

    def to_arrow(self, layout: str = "example") -> dict:
        """One pyarrow Table per hook point (rows of fwd and bwd entries together); see
        shardlens.tables.arrow for the columns."""
        from shardlens.tables.arrow import cache_to_tables

        return cache_to_tables(self, layout)

    def to_parquet(self, path: str, *, layout: str = "example", metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Write this cache as a hive-partitioned Parquet dataset (path/hook=<name>/part-*.parquet)."""
        from shardlens.tables.parquet import ParquetSink

        with ParquetSink(path, metadata=metadata, layout=layout) as sink:
            sink.write(self)


def _dense(tensor: Tensor) -> Tensor:
    return (tensor.to_dense() if tensor.is_sparse else tensor).detach().float().cpu()
