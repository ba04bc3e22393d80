"""Pipeline throughput: HookedModel in this process vs Tracer over Ray, same run.

A random GPT-2-small-shaped model (12 layers, d_model 768, vocab 8192), 64 sequences x 128
tokens, caching every hook_resid_post. Variants: HookedModel in this process (2 torch
threads); Tracer(stages=2) and Tracer(stages=1, replicas=2) on a local Ray instance, each
worker with 1 torch thread. Prints sequences/s and the ratio to the in-process run.

With --ceiling it also times what two replicas could do with no framework at all: two
plain processes, 1 torch thread each, running the unwrapped transformers model over half
the sequences each at the same moment. That bounds replicas=2 on this machine (two busy
processes share its caches and memory bandwidth).

    .venv/bin/python bench/pipeline.py [--repeats 3] [--microbatch 8] [--ceiling]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import transformers

import shardlens as sl
from shardlens.tracer import Tracer
from timing import median_seconds  # bench/timing.py

NAMES = "blocks.*.hook_resid_post"


def save_model(folder: str) -> None:
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=8192, n_positions=128, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def plain_forwards(folder: str, tokens: torch.Tensor, microbatch: int, start_at: float) -> float:
    """In a fresh process: the unwrapped model, 1 thread, all of `tokens` in microbatches,
    started at the wall-clock time `start_at` (so that two such processes overlap)."""
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        model(tokens[:microbatch], output_hidden_states=True)  # warm-up
        time.sleep(max(0.0, start_at - time.time()))
        start = time.perf_counter()
        for first in range(0, len(tokens), microbatch):
            model(tokens[first:first + microbatch], output_hidden_states=True)
    return time.perf_counter() - start


def two_plain_processes(folder: str, tokens: torch.Tensor, microbatch: int, repeats: int) -> float:
    """Median over `repeats` of the slower of two overlapping plain_forwards, one per half."""
    halves = tokens.chunk(2)
    times = []
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(repeats):
            start_at = time.time() + 10.0  # after both have loaded the model
            times.append(max(pool.map(plain_forwards, [folder] * 2, halves, [microbatch] * 2, [start_at] * 2)))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description="Pipeline throughput against the in-process HookedModel.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--microbatch", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--ceiling", action="store_true", help="also time two plain transformers processes (no shardlens, no Ray)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tokens = torch.randint(0, 8192, (args.sequences, 128), generator=torch.Generator().manual_seed(0))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder)
        torch.set_num_threads(2)
        model = sl.HookedModel.from_pretrained(folder)
        with torch.no_grad():
            results["HookedModel, this process, 2 threads"] = median_seconds(lambda: model.run_with_cache(tokens, names_filter=NAMES), args.repeats)
        if args.ceiling:
            label = f"ceiling: 2 plain HF processes (microbatch {args.microbatch})"
            results[label] = two_plain_processes(folder, tokens, args.microbatch, args.repeats)
        for label, options in (
            (f"Tracer stages=2 (ray, microbatch {args.microbatch})", dict(stages=2, microbatch_size=args.microbatch)),
            (f"Tracer stages=1 replicas=2 (ray, microbatch {args.microbatch})", dict(stages=1, replicas=2, microbatch_size=args.microbatch)),
        ):
            with Tracer.from_pretrained(folder, backend="ray", worker_threads=1, **options) as tracer:
                results[label] = median_seconds(lambda: tracer.run_with_cache(tokens, names_filter=NAMES), args.repeats)
    ray.shutdown()
    baseline = next(iter(results.values()))
    print(f"GPT-2-small shape, {args.sequences} x 128 tokens, caching every hook_resid_post, {args.repeats} timed runs each")
    for label, seconds in results.items():
        print(f"  {label:<50} {seconds:7.2f} s  {args.sequences / seconds:6.2f} seq/s  {baseline / seconds:5.2f}x")


if __name__ == "__main__":
    main()
