"""Dictionaries (sparse autoencoders and transcoders) as published, spliced into a model.

    >>> spec = sl.dictionaries.load("saes/blocks.6.hook_resid_post")      # a SAELens folder
    >>> logits, cache = model.run_with_cache(tokens, fwd_hooks=[spec],
    ...                                      names_filter="blocks.6.hook_resid_post.sae.hook_latents")

`load` reads a SAELens folder (cfg.json + sae_weights.safetensors: standard, gated,
JumpReLU, top-k, batch-top-k and the transcoder architectures), Gemma Scope's params.npz,
or a safetensors file of W_enc / W_dec / b_enc / b_dec (+ threshold, W_skip), and gives a
`HookSpec` holding an `sl.ops.Splice`. The weights stay where they are: the spec names the
file and the sha256 of its bytes, and each process that runs it (a stage worker) reads the
file once. The process that loads it reads the file's header and builds no tensors (it
streams the file once to hash it, unless given `sha256=`).
"""

from __future__ import annotations

import os
from typing import Optional

from shardlens.hooks.dictionaries._dictionary import ARCHITECTURES, NORMALIZATIONS, Dictionary
from shardlens.hooks.dictionaries._formats import read as _read
from shardlens.hooks.dictionaries._weights import WeightsRef, reference

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "Dictionary", "WeightsRef", "load", "read", "reference"]


def read(path: os.PathLike | str, *, architecture: Optional[str] = None, k: Optional[int] = None,
         dtype: Optional[str] = None, sha256: Optional[str] = None) -> Dictionary:
    """The dictionary at `path` (see `load`), without a hook point."""
    return _read(path, architecture=architecture, k=k, dtype=dtype, sha256=sha256)[0]


def load(path: os.PathLike | str, *, point: Optional[str] = None, write: Optional[str] = None, error: str = "add",
         architecture: Optional[str] = None, k: Optional[int] = None, dtype: Optional[str] = None, sha256: Optional[str] = None):
    """A spec that splices the dictionary at `path` into a model.

    Args:
        path: a SAELens folder, a Gemma Scope params.npz (or its folder), or a .safetensors
            file; a local path or a URI (s3://...).
        point: the hook point it reads (default: the hook_name its cfg.json names).
        write: a transcoder's output point (default: its cfg.json's hook_name_out); None
            for an SAE, which writes where it reads.
        error: "add", "freeze" or "drop": see `sl.ops.Splice`.
        architecture, k: for files that do not say them (plain safetensors).
        dtype: compute in this dtype (default: the one the files name).
        sha256: the weights file's sha256, when known (Hugging Face shows it as the file's
            LFS oid): then this process reads only the file's header; otherwise it streams
            the file once to hash it. Either way the processes that run the spec check it.

    Returns:
        ``HookSpec(point, Splice(dictionary))``, or for a transcoder
        ``HookSpec([point, write], Splice(dictionary, write=write))``.
    """
    from shardlens.hooks.ops.sae import Splice
    from shardlens.hooks.specs import HookSpec

    dictionary, trained_at = _read(path, architecture=architecture, k=k, dtype=dtype, sha256=sha256)
    point = point or trained_at.get("hook_name")
    if not point:
        raise ValueError(f"{os.fspath(path)!r} does not say which hook point it reads: pass point=, e.g. 'blocks.6.hook_resid_post'")
    write = write or trained_at.get("hook_name_out")
    if write is None and (trained_at["transcoder"] or dictionary.d_out != dictionary.d_in):
        raise ValueError(f"{os.fspath(path)!r} is a transcoder (d_in={dictionary.d_in}, d_out={dictionary.d_out}) whose files "
                         "do not name the point it writes: pass write=, e.g. 'blocks.6.hook_mlp_out'")
    if write == point:
        write = None
    return HookSpec(point if write is None else [point, write], Splice(dictionary, write=write, error=error))
