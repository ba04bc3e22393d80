"""Reading chosen tensors from a safetensors checkpoint, single-file or sharded."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shardlens.errors import ShardPlanError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The tensors of a checkpoint folder, read one by one: nothing is loaded until asked.

    Keys are translated to the model's own parameter names with transformers' checkpoint
    renamings for the model class (GPT-NeoX's "embed_out." -> "lm_head.") and its base
    model prefix (old GPT-2 files say "h.0..." for "transformer.h.0...").
    """

    def __init__(self, folder: os.PathLike, *, model_class: str = "", base_prefix: str = ""):
        self.folder = Path(folder)
        self.files = self._files()
        renamings = _renamings(model_class)
        self._file_key: dict[str, tuple[str, str]] = {}  # model name -> (file, key in file)
        for key, file in self.files.items():
            name = key
            for pattern, target in renamings:
                name = re.sub(pattern, target, name)
            if base_prefix and not name.startswith(base_prefix + ".") and not name.startswith("lm_head"):
                self._file_key.setdefault(f"{base_prefix}.{name}", (file, key))
            self._file_key[name] = (file, key)

    def _files(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.exists():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.folder / SINGLE
        if not single.exists():
            raise ShardPlanError(f"{self.folder} holds neither {SINGLE} nor {INDEX}: shardlens loads safetensors checkpoints")
        with safe_open(single, framework="pt") as f:
            return {key: SINGLE for key in f.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._file_key

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of these model parameter names (each file opened once)."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self._file_key:
                raise KeyError(f"{self.folder} has no tensor for {name!r}")
            by_file[self._file_key[name][0]].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(self.folder / file, framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(self._file_key[name][1])
        return tensors


def _renamings(model_class: str) -> list[tuple[str, str]]:
    """transformers' plain key renamings (source regex, target) for a model class."""
    if not model_class:
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    pairs = []
    for transform in get_checkpoint_conversion_mapping(model_class) or []:
        if type(transform).__name__ == "WeightRenaming":
            pairs += list(zip(_listify(transform.source_patterns), _listify(transform.target_patterns)))
    return pairs


def _listify(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
