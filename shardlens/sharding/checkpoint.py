"""Reading chosen tensors from a safetensors checkpoint, single-file or sharded."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from shardlens.errors import ShardPlanError

SINGLE = "model.safetensors"
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a checkpoint folder, read one by one: nothing is loaded until asked.

    Keys are translated to the model's own parameter names with transformers' checkpoint
    conversions for the model class or type: renamings (GPT-NeoX's "embed_out." ->
    "lm_head."), the base model prefix (old GPT-2 files say "h.0..." for "transformer.h.0..."),
    and merges of per-expert tensors into one (a mixture-of-experts checkpoint stores
    `experts.3.gate_proj.weight`, the model holds `experts.gate_up_proj` for all experts):
    a merged tensor is built, with transformers' own operations, from exactly its sources.
    """

    def __init__(self, folder: os.PathLike, *, model_class: str = "", model_type: str = "", base_prefix: str = ""):
        self.folder = Path(folder)
        self.files = self._files()
        transforms = _conversions(model_class, model_type)
        renamings = [(s, t) for kind, sources, targets, _ in transforms if kind == "rename" for s, t in zip(sources, targets)]
        self._merges = [(sources, targets, ops) for kind, sources, targets, ops in transforms if kind == "merge"]
        self._file_key: dict[str, tuple[str, str]] = {}  # model name -> (file, key in file)
        # merged model name -> its converter, and per source pattern: expert index -> (file, key)
        self._merged: dict[str, tuple[int, list[dict[int, tuple[str, str]]]]] = {}
        for key, file in self.files.items():
            name = key
            for pattern, target in renamings:
                name = re.sub(pattern, target, name)
            if base_prefix and not name.startswith(base_prefix + ".") and not name.startswith("lm_head"):
                self._file_key.setdefault(f"{base_prefix}.{name}", (file, key))
            self._file_key[name] = (file, key)
            self._index_merge_source(name, (file, key))

    def _index_merge_source(self, name: str, where: tuple[str, str]) -> None:
        for converter, (sources, targets, _) in enumerate(self._merges):
            for slot, pattern in enumerate(sources):
                match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
                if match:
                    merged = name[: match.start()] + targets[0] + name[match.end():]
                    _, slots = self._merged.setdefault(merged, (converter, [{} for _ in sources]))
                    slots[slot][int(match.group(1))] = where
                    return

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
                for slot in self._merged[name][1]:
                    wanted.update(dict.fromkeys(slot[i] for i in sorted(slot)))
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
        converter, slots = self._merged[name]
        sources, targets, operations = self._merges[converter]
        values: dict = {pattern: [stored[slot[i]] for i in sorted(slot)] for pattern, slot in zip(sources, slots)}
        for operation in operations:
            values = operation.convert(values, sources, targets)
        return next(iter(values.values()))


# The conversions that build a model tensor from stored ones without any other input; others
# (quantisation, fused-rope permutations) are left out, and their tensors reported missing.
_MERGE_OPERATIONS = frozenset({"MergeModulelist", "Concatenate"})


def _conversions(model_class: str, model_type: str) -> list[tuple[str, list, list, list]]:
    """transformers' checkpoint conversions for a model class (or else its model type), as
    ("rename", source regexes, targets, []) and ("merge", source patterns, targets, operations)."""
    if not (model_class or model_type):
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    transforms = (get_checkpoint_conversion_mapping(model_class) if model_class else None) or (
        get_checkpoint_conversion_mapping(model_type) if model_type else None
    ) or []
    out = []
    for transform in transforms:
        sources, targets = _listify(transform.source_patterns), _listify(transform.target_patterns)
        kind = type(transform).__name__
        if kind == "WeightRenaming":
            out.append(("rename", sources, targets, []))
        elif kind == "WeightConverter" and {type(op).__name__ for op in transform.operations} <= _MERGE_OPERATIONS:
            out.append(("merge", sources, targets, list(transform.operations)))
    return out



def _listify(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
