"""Writing activations: ParquetSink vs numpy tofile of the same bytes, in the same run.

1 GiB of fp16 activations (random normal, as [batch, pos, d_model] entries of 4 hook
points per batch) written (a) through sl.ParquetSink (layout "example", zstd, parts under
temporary names then fsynced and renamed; timed until the sink is closed, so every part
its writer threads took on is on disk) and (b) as raw bytes with numpy's tofile, then
fsync. Two alternating rounds; prints each one's best MB/s and the ratio. With --ceiling,
also ParquetSink into /dev/shm (memory, no disk): what the encoder alone sustains here.

    .venv/bin/python bench/arrow_write.py [--gib 1.0] [--dir /tmp] [--ceiling]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

import shardlens as sl


def batches(total_bytes: int, batch: int = 16, pos: int = 256, d_model: int = 1024, hooks: int = 4):
    per_batch = batch * pos * d_model * 2 * hooks
    generator = torch.Generator().manual_seed(0)
    for index in range(max(1, total_bytes // per_batch)):
        tensors = {f"blocks.{h}.hook_resid_post": torch.randn(batch, pos, d_model, generator=generator).half() for h in range(hooks)}
        yield sl.ActivationCache(tensors, examples=torch.arange(batch) + index * batch, batch=index)


def fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())


def time_parquet(caches: list, root: str) -> float:
    start = time.perf_counter()
    with sl.ParquetSink(root, layout="example") as sink:
        for cache in caches:
            sink.write(cache)
    fsync_tree(root)
    return time.perf_counter() - start


def time_tofile(caches: list, root: str) -> float:
    os.makedirs(root)
    start = time.perf_counter()
    with open(os.path.join(root, "raw.bin"), "wb") as f:
        for cache in caches:
            for tensor in cache.values():
                tensor.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description="ParquetSink vs numpy tofile, same bytes, same run.")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--ceiling", action="store_true", help="also time ParquetSink into /dev/shm (no disk)")
    args = parser.parse_args()
    caches = list(batches(int(args.gib * 2**30)))
    n_bytes = sum(t.numel() * t.element_size() for c in caches for t in c.values())
    work = tempfile.mkdtemp(dir=args.dir)
    memory = tempfile.mkdtemp(dir="/dev/shm") if args.ceiling else None
    try:
        runs = [("numpy tofile", time_tofile, work), ("ParquetSink", time_parquet, work)]
        if memory is not None:
            runs.append(("ParquetSink to memory", time_parquet, memory))
        results = {}
        for round_index in range(2):  # alternate, keep each one's best
            for name, fn, where in runs:
                target = os.path.join(where, f"{name.split()[0]}-{round_index}")
                seconds = fn(caches, target)
                results[name] = min(results.get(name, float("inf")), seconds)
                shutil.rmtree(target)
    finally:
        for folder in (work, memory):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    print(f"{n_bytes / 2**30:.2f} GiB of fp16 activations, {len(caches)} batches x 4 hook points, torch threads {torch.get_num_threads()}")
    for name, seconds in results.items():
        print(f"  {name:<21} {seconds:7.2f} s   {n_bytes / seconds / 1e6:8.1f} MB/s")
    print(f"  ratio ParquetSink / tofile: {results['numpy tofile'] / results['ParquetSink']:.2f}")


if __name__ == "__main__":
    main()
