"""Patching sweeps: shardlens' sweep vs a naive loop vs TransformerLens, and across stages.

A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192), batch 4 x 16
tokens, logit-difference metric. Sweeps: resid_pre x position, and hook_z x head (all
positions, and the last position only). Variants, all in this process on the same saved
model:
  - sl.patching.sweep on a HookedModel (each cell starts at its layer and position inside
    the kept corrupted run), and with reuse=False (a whole forward per cell, batched);
  - a naive loop of one run_with_hooks per cell;
  - with the `bench` extra installed, transformer_lens.patching's get_act_patch_resid_pre /
    get_act_patch_attn_head_out_all_pos on a TransformerBridge;
  - the resid_pre sweep on a 2-stage Tracer, local backend and (with --ray) on Ray.
Prints each time and its ratio to the HookedModel sweep's time.

    .venv/bin/python bench/patching.py [--ray] [--quick]   # --quick: no naive loop, no TransformerLens
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from timing import patching_task, save_gpt2_small

import shardlens as sl


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


def transformer_lens_rows(folder, clean, corrupt, answer, wrong) -> dict:
    try:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        print("(transformer-lens not installed: it is a test dependency, pip install -e '.[dev]')")
        return {}
    bridge = TransformerBridge.boot_transformers(folder, device="cpu")
    _, clean_cache = bridge.run_with_cache(clean)

    def tl_metric(logits):
        final = logits[:, -1]
        return (final[range(len(answer)), answer] - final[range(len(answer)), wrong]).mean()

    with torch.no_grad():
        return {
            ("resid_pre x pos", "TransformerLens get_act_patch_resid_pre"): timed(
                lambda: tl_patching.get_act_patch_resid_pre(bridge, corrupt, clean_cache, tl_metric))[0],
            ("hook_z x head", "TransformerLens get_act_patch_attn_head_out_all_pos"): timed(
                lambda: tl_patching.get_act_patch_attn_head_out_all_pos(bridge, corrupt, clean_cache, tl_metric))[0],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", action="store_true", help="also run the resid_pre sweep on a 2-stage Tracer on Ray")
    parser.add_argument("--quick", action="store_true", help="leave out the naive loop and TransformerLens")
    args = parser.parse_args()
    clean, corrupt = patching_task(4, 16, corrupted=3)
    answer, wrong = [5, 6, 7, 8], [9, 10, 11, 12]
    metric = sl.metrics.logit_diff(answer, wrong)
    resid = dict(points="resid_pre", metric=metric, over=("layer", "pos"))
    sweeps = {"resid_pre x pos": resid, "hook_z x head": dict(points="z", metric=metric, over=("layer", "head")),
              "hook_z x head @ last pos": dict(points="z", metric=metric, over=("layer", "head"), positions=[clean.shape[1] - 1])}
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        save_gpt2_small(folder)
        model = sl.HookedModel.from_pretrained(folder)
        for label, kwargs in sweeps.items():
            rows[(label, "shardlens sweep")], result = timed(lambda: sl.patching.sweep(model, clean, corrupt, **kwargs))
            rows[(label, "shardlens sweep, reuse=False")], whole = timed(lambda: sl.patching.sweep(model, clean, corrupt, reuse=False, **kwargs))
            print(f"{label}: max |sweep - reuse=False| = {(result.grid - whole.grid).abs().max():.2e}")
            if not args.quick and "@" not in label:
                rows[(label, "naive loop of run_with_hooks")], reference = timed(
                    lambda: naive(model, clean, corrupt, metric, list(result.points), kwargs["over"][1]))
                print(f"{label}: max |sweep - naive| = {(result.grid - reference).abs().max():.2e}")
        expected = sl.patching.sweep(model, clean, corrupt, **resid)
        backends = [("local", {})] + ([("ray", {"worker_threads": torch.get_num_threads()})] if args.ray else [])
        for backend, options in backends:
            with sl.Tracer.from_pretrained(folder, stages=2, backend=backend, **options) as tracer:
                sl.patching.sweep(tracer, clean, corrupt, **resid)  # warm: the workers' first runs
                rows[("resid_pre x pos", f"2-stage Tracer, {backend} backend")], got = timed(lambda: sl.patching.sweep(tracer, clean, corrupt, **resid))
                print(f"resid_pre x pos: max |{backend} Tracer - HookedModel| = {(got.grid - expected.grid).abs().max():.2e}")
        if not args.quick:
            rows.update(transformer_lens_rows(folder, clean, corrupt, answer, wrong))
    print(f"GPT-2-small shape, batch 4 x 16 tokens, torch threads {torch.get_num_threads()}")
    for (label, variant), seconds in rows.items():
        base = rows[(label, "shardlens sweep")]
        print(f"  {label:<24} {variant:<52} {seconds:8.2f} s   {seconds / base:6.2f}x the HookedModel sweep's time")


if __name__ == "__main__":
    main()
