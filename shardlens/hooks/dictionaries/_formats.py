"""Reading published dictionaries as they are published: SAELens folders, Gemma Scope's
params.npz, and plain safetensors files of W_enc / W_dec / b_enc / b_dec."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from shardlens.hooks.dictionaries._dictionary import Dictionary
from shardlens.hooks.dictionaries._weights import FORMATS, WeightsRef, reference, shapes
from shardlens.tables.parquet import filesystem_and_root, is_uri

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
# SAELens architecture -> (ours, is a transcoder)
_SAELENS = {
    "standard": ("standard", False), "gated": ("gated", False), "jumprelu": ("jumprelu", False), "topk": ("topk", False),
    "batchtopk": ("batchtopk", False), "transcoder": ("standard", True), "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True), "jumprelu_skip_transcoder": ("jumprelu", True),
}


def read(path: os.PathLike | str, *, architecture: Optional[str] = None, k: Optional[int] = None,
         dtype: Optional[str] = None, sha256: Optional[str] = None) -> tuple[Dictionary, dict]:
    """The dictionary at `path`, and what its files say about where it was trained: the
    hook point it reads ("hook_name"), a transcoder's output point ("hook_name_out"), and
    whether it is a transcoder ("transcoder").

    `path` is a SAELens folder (cfg.json + sae_weights.safetensors), a Gemma Scope
    params.npz (or a folder holding one), or a safetensors file of SAELens-named tensors;
    local or a URI. `architecture` and `k` are needed only where the files do not say them
    (plain safetensors: by default "jumprelu" when it has a threshold, "gated" when it has
    b_gate, else "standard").
    """
    location = os.fspath(path)
    if location.endswith(FORMATS):
        return _plain(reference(location, sha256=sha256), architecture=architecture, k=k, dtype=dtype)
    files = _listing(location)
    if SAELENS_CONFIG in files:
        return _saelens(location, dtype=dtype, sha256=sha256)
    if "params.npz" in files:
        return _plain(reference(_join(location, "params.npz"), sha256=sha256), architecture=architecture, k=k, dtype=dtype)
    raise FileNotFoundError(
        f"{location!r} is not a dictionary: expected a SAELens folder ({SAELENS_CONFIG} and {SAELENS_WEIGHTS}), "
        f"a Gemma Scope params.npz, or a .safetensors / .npz file; found {', '.join(sorted(files)) or 'nothing'}")


def _saelens(folder: str, *, dtype: Optional[str], sha256: Optional[str]) -> tuple[Dictionary, dict]:
    config = json.loads(_read_text(_join(folder, SAELENS_CONFIG)))
    config = _pre_6_config(config) if _is_pre_6(config) else config
    name = config.get("architecture", "standard")
    if name not in _SAELENS:
        raise ValueError(f"{folder}: SAELens architecture {name!r} is not supported; supported: {', '.join(_SAELENS)}")
    architecture, transcoder = _SAELENS[name]
    if config.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise ValueError(f"{folder}: reshape_activations={config['reshape_activations']!r}; supported: none, hook_z")
    if config.get("normalize_activations") == "covariance_whitening":
        raise ValueError(f"{folder}: normalize_activations='covariance_whitening' is applied by SAELens only in training "
                         "(it folds the whitening into the weights at inference): fold it, save again, and load that")
    dictionary = Dictionary(
        reference(_join(folder, SAELENS_WEIGHTS), sha256=sha256), architecture=architecture,
        k=config.get("k") if architecture == "topk" else None,
        apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)) and not transcoder,  # SAELens' default: True
        normalize_activations=config.get("normalize_activations") or "none",
        rescale_acts_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm", False)),
        reshape_activations=config.get("reshape_activations", "none"),
        transcoder=transcoder,
        dtype=dtype or config.get("dtype"),
    )
    metadata = dict(config.get("metadata") or {})
    trained_at = {k: metadata.get(k, config.get(k)) for k in ("hook_name", "hook_name_out", "model_name")}
    return dictionary, {**trained_at, "transcoder": transcoder}


def _is_pre_6(config: dict) -> bool:
    version = config.get("sae_lens_version") or (config.get("metadata") or {}).get("sae_lens_version")
    return not version or int(str(version).split(".")[0]) < 6


def _pre_6_config(config: dict) -> dict:
    """SAELens' older cfg.json keys in today's form, with the defaults SAELens gives them."""
    config = {{"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in config.items()}
    config.setdefault("apply_b_dec_to_input", True)
    config.setdefault("reshape_activations", "hook_z" if "hook_z" in config.get("hook_name", "") else "none")
    if config.get("activation_fn") == "topk" and (config.get("activation_fn_kwargs") or {}).get("k") is not None:
        config["architecture"], config["k"] = "topk", config["activation_fn_kwargs"]["k"]
    normalize = config.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        config["normalize_activations"] = "expected_average_only_in" if normalize else "none"
    return config


def _plain(ref: WeightsRef, *, architecture: Optional[str], k: Optional[int], dtype: Optional[str]) -> tuple[Dictionary, dict]:
    names = shapes(ref.uri)
    if architecture is None:
        architecture = "jumprelu" if "threshold" in names else "gated" if "b_gate" in names else "topk" if k else "standard"
    return Dictionary(ref, architecture=architecture, k=k, transcoder="W_skip" in names, dtype=dtype), {"transcoder": "W_skip" in names}


def _listing(location: str) -> list[str]:
    if is_uri(location):
        import pyarrow.fs as pafs

        filesystem, root = filesystem_and_root(location)
        return [Path(info.path).name for info in filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    if not os.path.isdir(location):
        raise FileNotFoundError(f"no dictionary at {location!r}: no such folder or file")
    return os.listdir(location)


def _join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_uri(location) else os.path.join(location, name)


def _read_text(location: str) -> str:
    filesystem, path = filesystem_and_root(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")

