"""Reading chosen tensors from a safetensors checkpoint, single-file or sharded."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

from shardlens.errors import ShardPlanError

SINGLE = "model.safetensors"
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a checkpoint folder, read one by one: nothing is loaded until asked.

    With `model` (the model the checkpoint is for, on the meta device, say), keys are
    translated to its parameter names as transformers translates them when it loads the
    checkpoint (transformers' own conversion mapping, renamings and base-model prefix): GPT-
    NeoX's "embed_out." is "lm_head.", a multimodal Gemma 3's "language_model.model." is
    "model.language_model.", and per-expert tensors (`experts.3.gate_proj.weight`) are merged
    into the tensor the model holds for all experts (`experts.gate_up_proj`), by transformers'
    own operations, from exactly their sources.
    """

    def __init__(self, folder: os.PathLike, *, model: Optional[nn.Module] = None):
        self.folder = Path(folder)
        self.files = self._files()
        self._file_key: dict[str, tuple[str, str]] = {}  # model name -> (file, key in file)
        # merged model name -> (its converter, per source pattern the (file, key) of each expert, in order)
        self._merged: dict[str, tuple[Any, dict[str, list[tuple[str, str]]]]] = {}
        rename = _renamer(model)
        for key in sorted(self.files, key=dot_natural_key):  # experts in index order, as transformers merges them
            name, converter, pattern = rename(key)
            if converter is None:
                self._file_key[name] = (self.files[key], key)
            elif {type(op).__name__ for op in converter.operations} <= _MERGE_OPERATIONS:
                _, sources = self._merged.setdefault(name, (converter, {p: [] for p in converter.source_patterns}))
                sources[pattern].append((self.files[key], key))

    def _files(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.folder / SINGLE
        if not single.exists():
            raise ShardPlanError(f"{self.folder} holds neither {SINGLE} nor {INDEX}: shardlens loads safetensors checkpoints")
        with safe_open(single, framework="pt") as f:
            return {key: SINGLE for key in f.keys()}

    def floating_dtype(self) -> Optional[torch.dtype]:
        """The dtype of the checkpoint's first floating-point tensor (what transformers'
        dtype="auto" falls back to when the config names none), or None."""
        for file in dict.fromkeys(self.files.values()):
            with safe_open(self.folder / file, framework="pt") as f:
                for key in f.keys():
                    dtype = _SAFETENSORS_FLOATS.get(f.get_slice(key).get_dtype())
                    if dtype is not None:
                        return dtype
        return None

    def __contains__(self, name: str) -> bool:
        return name in self._file_key or name in self._merged

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of these model parameter names (each file opened once)."""
        names = list(names)
        wanted: dict[tuple[str, str], None] = {}  # (file, key) of every stored tensor to read, in order
        for name in names:
            if name in self._merged:
                for sources in self._merged[name][1].values():
                    wanted.update(dict.fromkeys(sources))
            elif name in self._file_key:
                wanted[self._file_key[name]] = None
            else:
                raise KeyError(f"{self.folder} has no tensor for {name!r}")
        stored = self._read_stored(wanted)
        return {name: self._merge(name, stored) if name in self._merged else stored[self._file_key[name]] for name in names}

    def _read_stored(self, wanted: Iterable[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
        by_file: dict[str, list[str]] = defaultdict(list)
        for file, key in wanted:
            by_file[file].append(key)
        tensors = {}
        for file, keys in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for key in keys:
                    tensors[(file, key)] = f.get_tensor(key)
        return tensors

    def _merge(self, name: str, stored: dict) -> torch.Tensor:
        """A merged tensor from its sources, by the converter's own operations."""
        converter, sources = self._merged[name]
        values: dict = {pattern: [stored[where] for where in found] for pattern, found in sources.items()}
        for operation in converter.operations:
            values = operation.convert(values, converter.source_patterns, converter.target_patterns)
        return next(iter(values.values()))


# The conversions that build a model tensor from stored ones without any other input; others
# (quantisation, fused-rope permutations) are left out, and their tensors reported missing.
_MERGE_OPERATIONS = frozenset({"MergeModulelist", "Concatenate"})


def _renamer(model: Optional[nn.Module]) -> Callable[[str], tuple[str, Any, Optional[str]]]:
    """key -> (the model's name for it, the converter merging it or None, the converter's
    source pattern it matched), as transformers renames checkpoint keys for `model`."""
    if model is None:
        return lambda key: (key, None, None)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict())

    def rename(key: str) -> tuple[str, Any, Optional[str]]:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        converter = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
        return name, converter, pattern

    return rename
