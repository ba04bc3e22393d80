"""Writing a dictionary-training dataset: DatasetWriter vs numpy tofile of the same bytes, in the same run.

The same fp16 activations (random normal token rows of two hook points, d=768 and d=2048,
in batches of 4096 tokens; 512 MB by default) written to the same disk (a temporary
folder beside this file unless --dir) by:

  (a) numpy tofile: each batch's arrays appended to one file, then one fsync;
  (b) DatasetWriter: rows shuffled across a buffer of one file (shard_rows 16384), Arrow IPC
      files written under temporary names, each fsynced (and hashed with sha256 while it
      is synced) before its rename, then manifest, dataset_info.json and state.json;
      timed from the writer's creation to close(); without provenance columns (the values
      of (a) plus Arrow's offsets and framing: 0.3% more bytes), then without sha256, then
      with provenance (token_ids, example, pos); then as an activations campaign writes by
      default (shard_rows and shuffle_buffer 65536, provenance, sha256), and that with
      `checksum: false`;
  (c) sl.ParquetSink, layout "token" (value as arrow.fixed_shape_tensor), zstd and uncompressed,
      each part fsynced before its rename; timed until the sink is closed.

Everything is fsynced, as each writer does to survive a crash ((a) once at the end, the
cheapest for it). (a) and (b) take turns for --repeats rounds (after one warm-up round), in
a new random order each round; then (c) the same way, apart (on the 2-core virtual machine
this was written on, any write right after a Parquet run was often several times slower).
Prints each one's median seconds and GB/s, its ratio to (a), and every run's seconds.

sha256 (hashlib, about 2 GB/s per core with SHA instructions) is the costliest step of (b):
two files are hashed at once beside the writes, so it is free only where cores are to
spare. Measured with `--repeats 9` on the 2-core virtual machine this was written on (a
quiet one: load below 1), tofile 0.20 s (2.5 GB/s); files of 16384 rows 0.26 s with sha256
(x0.78), 0.19 s without (x1.08), 0.26 s with provenance (x0.78): sha256 costs about 30% of
the speed. The campaign's default (65536-row files) 0.38 s (x0.54): a 369 MB file's hash
(0.18 s, sequential within a file) is on the critical path. Its `checksum: false` run is
bimodal, 0.26 s or 0.5-0.8 s: in a 512 MB run its two fresh 369 MB shuffle buffers are
never reused, and when the kernel must first reclaim page cache for them (after another
run's files) faulting them in dominates; longer runs reuse their buffers.

    .venv/bin/python bench/dictionary_write.py [--mb 512] [--repeats 5] [--dir PATH] [--no-parquet]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import shardlens as sl
from shardlens.tables.datasets import DatasetSpec, DatasetWriter
from shardlens.tracer.campaign.activations import DEFAULTS as CAMPAIGN

HOOKS = {"blocks.6.hook_resid_post": 768, "blocks.6.hook_mlp_out": 2048}
BATCH_TOKENS = 4096
SHARD_ROWS = 16384


def batches(total_bytes: int) -> list[dict[str, torch.Tensor]]:
    """fp16 token rows, hook point -> [4096, d], totalling about `total_bytes`."""
    per_batch = BATCH_TOKENS * sum(HOOKS.values()) * 2
    generator = torch.Generator().manual_seed(0)
    return [{name: torch.randn(BATCH_TOKENS, d, generator=generator).half() for name, d in HOOKS.items()}
            for _ in range(max(1, total_bytes // per_batch))]


def time_tofile(data: list, root: Path) -> float:
    start = time.perf_counter()
    with open(root / "raw.bin", "wb") as f:
        for batch in data:
            for tensor in batch.values():
                tensor.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def time_dataset(data: list, root: Path, *, checksum: bool = True, provenance: bool = False, shard_rows: int = SHARD_ROWS) -> float:
    rows = len(data) * BATCH_TOKENS
    spec = DatasetSpec({name: [d] for name, d in HOOKS.items()}, rows, shard_rows=shard_rows, provenance=provenance)
    ids = torch.arange(BATCH_TOKENS)
    start = time.perf_counter()
    with DatasetWriter(root / "dataset", spec, checksum=checksum, metadata={"bench": "dictionary_write"}) as writer:
        for index, batch in enumerate(data):
            extra = dict(token_ids=ids, examples=ids // 256 + index * 16, positions=ids % 256) if provenance else {}
            writer.write(batch, **extra)
    return time.perf_counter() - start


def time_parquet(data: list, root: Path, *, compression: str) -> float:
    start = time.perf_counter()
    with sl.ParquetSink(root / "parquet", layout="token", compression=compression) as sink:
        for index, batch in enumerate(data):  # [16 examples, 256 positions, d]
            tensors = {name: t.view(16, BATCH_TOKENS // 16, -1) for name, t in batch.items()}
            sink.write(sl.ActivationCache(tensors, examples=torch.arange(16) + 16 * index, batch=index))
    return time.perf_counter() - start


def rounds(runs: dict, data: list, work: Path, repeats: int) -> dict[str, list[float]]:
    """Each run's seconds over `repeats` rounds (after a warm-up round), in a new order each round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = random.Random(0)
    for round_index in range(repeats + 1):
        for name in order.sample(list(runs), len(runs)):
            target = work / f"run-{round_index}"
            target.mkdir()
            seconds = runs[name](data, target)
            if round_index:
                times[name].append(seconds)
            shutil.rmtree(target)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description="DatasetWriter vs numpy tofile, same bytes, same disk, same run.")
    parser.add_argument("--mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder beside this file, on its disk)")
    parser.add_argument("--no-parquet", action="store_true", help="skip the Parquet runs (slow)")
    args = parser.parse_args()
    data = batches(int(args.mb * 1e6))
    n_bytes = sum(t.numel() * t.element_size() for batch in data for t in batch.values())
    runs = {
        "numpy tofile": time_tofile,
        "DatasetWriter": time_dataset,
        "DatasetWriter, no sha256": lambda d, r: time_dataset(d, r, checksum=False),
        "DatasetWriter, provenance": lambda d, r: time_dataset(d, r, provenance=True),
        # an activations campaign's default: shard_rows = shuffle_buffer = 65536, provenance, sha256
        "campaign default": lambda d, r: time_dataset(d, r, provenance=True, shard_rows=CAMPAIGN["shard_rows"]),
        "campaign, checksum: false": lambda d, r: time_dataset(d, r, provenance=True, shard_rows=CAMPAIGN["shard_rows"], checksum=False),
    }
    parquet = {
        "ParquetSink zstd": lambda d, r: time_parquet(d, r, compression="zstd"),
        "ParquetSink none": lambda d, r: time_parquet(d, r, compression="none"),
    }
    work = Path(tempfile.mkdtemp(dir=args.dir or Path(__file__).parent))
    try:
        times = rounds(runs, data, work, args.repeats)
        # Parquet last, apart: here any write right after a Parquet run is often several times
        # slower (the page cache refills slowly), whichever writer it is.
        times.update({} if args.no_parquet else rounds(parquet, data, work, args.repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n_bytes / 1e6:.0f} MB of fp16 activations ({len(data)} batches of {BATCH_TOKENS} tokens x d={'+'.join(map(str, HOOKS.values()))}), "
          f"files of {SHARD_ROWS} rows (campaign: {CAMPAIGN['shard_rows']}), {args.repeats} rounds, median; everything fsynced; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    raw = statistics.median(times["numpy tofile"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:<27} {median:7.3f} s  {n_bytes / median / 1e9:6.2f} GB/s  x{raw / median:5.2f} of tofile"
              f"   (runs: {', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
