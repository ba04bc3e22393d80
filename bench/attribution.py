"""Attribution patching at scale: what AtP costs against a plain forward, and what it leaves.

A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192), batch 8 x 64
tokens, logit-difference metric. For a HookedModel and a 2-stage Tracer (local backend,
and Ray with --ray): the median time of a plain forward (logits, no hooks), of
sl.attribution.atp over every head's hook_z and every MLP output (one clean forward that
caches, one corrupted forward and backward that caches activations and gradients), and its
ratio to the forward; how many parameters hold a .grad afterwards; and the memory of the
attribution run on a HookedModel, with and without weight gradients: the weights, the
activations its graph saves for the backward (torch.autograd.graph.saved_tensors_hooks),
and the weight gradients.

    .venv/bin/python bench/attribution.py [--ray]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import median_seconds, patching_task, save_gpt2_small

import shardlens as sl

POINTS = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]


def saved_bytes(model, tokens, metric, weight_grads: bool) -> tuple[int, int]:
    """(the bytes of activations, not parameters, which are only referenced, that the graph
    of one gradient run saves for its backward; the bytes of the .grad it leaves)."""
    parameters = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(tensor):
        if tensor.data_ptr() not in parameters:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.run_with_cache(tokens, names_filter=POINTS, incl_bwd=True, return_type="metric", metric=metric, weight_grads=weight_grads)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return total[0], grads


def with_grad(runner) -> int:
    if isinstance(runner, sl.HookedModel):
        return sum(p.grad is not None for p in runner.parameters())
    return sum(stats["parameters_with_grad"] for stats in runner.stats())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", action="store_true", help="also time a 2-stage Tracer on a local Ray instance")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    clean, corrupt = patching_task(8, 64, corrupted=40)
    metric = sl.metrics.logit_diff([5] * 8, [9] * 8)
    print(f"GPT-2-small shape, batch 8 x 64 tokens, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        save_gpt2_small(folder)
        runners = [("HookedModel", lambda: sl.HookedModel.from_pretrained(folder))]
        runners.append(("Tracer, 2 stages, local", lambda: sl.Tracer.from_pretrained(folder, stages=2, backend="local")))
        if args.ray:
            runners.append(("Tracer, 2 stages, Ray", lambda: sl.Tracer.from_pretrained(folder, stages=2, backend="ray", worker_threads=torch.get_num_threads())))
        for label, make in runners:
            runner = make()
            try:
                with torch.no_grad():
                    forward = median_seconds(lambda: runner(corrupt), args.repeats)
                atp = median_seconds(lambda: sl.attribution.atp(runner, clean, corrupt, points=POINTS, metric=metric), args.repeats)
                print(f"  {label:<26} forward {forward:6.3f} s   atp {atp:6.3f} s   {atp / forward:5.2f}x a forward   "
                      f"parameters with .grad afterwards: {with_grad(runner)}")
                if isinstance(runner, sl.HookedModel):
                    weights = sum(p.numel() * p.element_size() for p in runner.parameters())
                    for weight_grads in (False, True):
                        saved, grads = saved_bytes(runner, corrupt, metric, weight_grads)
                        print(f"    weight_grads={weight_grads!s:<5}: weights {weights / 2**20:6.1f} MiB + activations saved for backward "
                              f"{saved / 2**20:6.1f} MiB + weight gradients {grads / 2**20:6.1f} MiB")
            finally:
                if not isinstance(runner, sl.HookedModel):
                    runner.shutdown()


if __name__ == "__main__":
    main()
