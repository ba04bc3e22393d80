"""Patching sweeps: shardlens' batched sweep vs a naive loop vs TransformerLens, same run.

A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192), batch 4 x 16
tokens, logit-difference metric. Sweeps: resid_pre x position, and hook_z x head.
Variants: sl.patching.sweep (many patch variants per forward pass); a naive loop of one
run_with_hooks per cell; for heads patched at the last position only, the sweep with and
without its shared-prefix reuse (the tokens before the patched position run once); and, with the `bench` extra installed, transformer_lens.patching's
get_act_patch_resid_pre / get_act_patch_attn_head_out_all_pos on a TransformerBridge over
the same saved model. Prints each time and its ratio to the shardlens sweep.

    .venv/bin/python bench/patching.py
"""

from __future__ import annotations

import tempfile
import time

import torch
import transformers

import shardlens as sl
from shardlens.hooks.toy import word_tokenizer


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def naive(model, clean, corrupt, metric, names, over):
    _, cache = model.run_with_cache(clean, names_filter=names)
    grid = []
    for name in names:
        row = []
        for i in range(cache[name].shape[1 if over == "pos" else 2]):
            def patch(x, hook, i=i, name=name):
                x = x.clone()
                if over == "pos":
                    x[:, i] = cache[name][:, i]
                else:
                    x[:, :, i] = cache[name][:, :, i]
                return x

            with torch.no_grad():
                row.append(float(metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)]))))
        grid.append(row)
    return torch.tensor(grid)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=64, bos_token_id=0, eos_token_id=0)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 8192, (4, 16), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(3, 8192, (4,), generator=generator)
    answer, wrong = [5, 6, 7, 8], [9, 10, 11, 12]
    metric = sl.metrics.logit_diff(answer, wrong)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
        word_tokenizer(8192).save_pretrained(folder)
        model = sl.HookedModel.from_pretrained(folder)
        for label, points, over in (("resid_pre x pos", "resid_pre", "pos"), ("hook_z x head", "z", "head")):
            seconds, result = timed(lambda: sl.patching.sweep(model, clean, corrupt, points=points, metric=metric, over=("layer", over)))
            rows[(label, "shardlens sweep")] = seconds
            seconds, reference = timed(lambda: naive(model, clean, corrupt, metric, list(result.points), over))
            rows[(label, "naive loop of run_with_hooks")] = seconds
            print(f"{label}: max |sweep - naive| = {(result.grid - reference).abs().max():.2e}")
        last = dict(points="z", metric=metric, over=("layer", "head"), positions=[clean.shape[1] - 1])
        rows[("hook_z x head @ last pos", "shardlens sweep, shared prefix once")] = timed(lambda: sl.patching.sweep(model, clean, corrupt, **last))[0]
        rows[("hook_z x head @ last pos", "shardlens sweep, no prefix reuse")] = timed(lambda: sl.patching.sweep(model, clean, corrupt, reuse_prefix=False, **last))[0]
        try:
            from transformer_lens import patching as tl_patching
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError:
            print("(transformer-lens not installed: it is a test dependency, pip install -e '.[dev]')")
        else:
            bridge = TransformerBridge.boot_transformers(folder, device="cpu")
            _, clean_cache = bridge.run_with_cache(clean)

            def tl_metric(logits):
                final = logits[:, -1]
                return (final[range(4), answer] - final[range(4), wrong]).mean()

            with torch.no_grad():
                rows[("resid_pre x pos", "TransformerLens get_act_patch_resid_pre")] = timed(
                    lambda: tl_patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, tl_metric))[0]
                rows[("hook_z x head", "TransformerLens get_act_patch_attn_head_out_all_pos")] = timed(
                    lambda: tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt, clean_cache, tl_metric))[0]
    print(f"GPT-2-small shape, batch 4 x 16 tokens, torch threads {torch.get_num_threads()}")
    for (label, variant), seconds in rows.items():
        base = rows.get((label, "shardlens sweep")) or rows[(label, "shardlens sweep, shared prefix once")]
        print(f"  {label:<16} {variant:<52} {seconds:8.2f} s   {seconds / base:6.2f}x the sweep's time")


if __name__ == "__main__":
    main()
