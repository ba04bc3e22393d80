"""Hook overhead: plain forward vs run_with_cache on every hook point, same process.

A 12-block ToyTransformer; prints the median time of each and their ratio.

    .venv/bin/python bench/hook_overhead.py [--d-model 256] [--batch 8] [--pos 128] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from shardlens.hooks.toy import ToyTransformer


def median_seconds(variants: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each variant; rounds interleave the variants so drift hits all alike."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for round_index in range(repeats):
        order = list(variants.items())
        order = order[round_index % len(order):] + order[:round_index % len(order)]
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ToyTransformer(n_layers=12, d_model=args.d_model, n_heads=8, d_vocab=1000, n_ctx=args.pos).eval()
    tokens = torch.randint(0, 1000, (args.batch, args.pos))
    n_points = len(model.hook_names())

    variants = {
        "plain forward": lambda: model(tokens),
        "run_with_hooks (no hooks)": lambda: model.run_with_hooks(tokens),
        f"run_with_cache (all {n_points} points)": lambda: model.run_with_cache(tokens),
    }
    with torch.no_grad():
        medians = median_seconds(variants, args.repeats)

    print(f"ToyTransformer: 12 blocks, d_model={args.d_model}, {n_points} hook points, "
          f"tokens [{args.batch}, {args.pos}], torch threads={torch.get_num_threads()}")
    plain = medians["plain forward"]
    for name, seconds in medians.items():
        print(f"{name:<36} {seconds * 1e3:8.2f} ms   ratio {seconds / plain:.3f}")

if __name__ == "__main__":
    main()
