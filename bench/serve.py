"""The tracing service under load: latency (p50 / p99) and throughput of the same requests

  (a) run one at a time on an in-process Tracer (the baseline),
  (b) sent by concurrent clients to the service, each run alone (max_batch=1),
  (c) the same, with runs of different clients sharing pipeline runs (max_batch=8),

each client sending its next request when its last result is back (--in-flight 1), or
keeping that many requests queued or running (a sweep's way of using the service).

A random Llama (8 layers, d_model 1024, 8 heads / 2 key-value heads, vocab 4096: about 100M
parameters) saved to a temporary folder; every Tracer has 2 stages on a local Ray instance.
Each client has its own token; each request: one sequence of --tokens tokens, its client's own
Scale at blocks.1.hook_resid_post, caching blocks.*.hook_resid_post. Every result (logits and
cache) is checked against the baseline's. Prints requests/s, p50 / p99 latency, and the ratios
c/b and c/a.

Sharing pays where a pipeline run costs about the same for 1 or for 4 sequences: where the run
is bound by reading the weights (a large model on a GPU), not by arithmetic or by the HTTP
round trip. The defaults (16-token requests on the 100M model) are such runs on a 2-core CPU;
with a smaller model (--layers 4 --d-model 256) each request's HTTP handling dominates, and
with longer requests (--tokens 128) the CPU's arithmetic does, and sharing gains less.
    .venv/bin/python bench/serve.py [--clients 4] [--requests 20] [--tokens 16] [--in-flight 1 2] [--layers 8] [--d-model 1024]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.request

import ray
import torch
import transformers

import shardlens as sl
from shardlens.serve import app
from shardlens.serve.config import ModelEntry, ServiceConfig, TokenEntry, hash_token

NAMES = "blocks.*.hook_resid_post"
POINT = "blocks.1.hook_resid_post"


def save_model(folder: str, layers: int, d_model: int) -> None:
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=d_model, intermediate_size=d_model * 43 // 16, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def requests_of(clients: int, per_client: int, tokens: int) -> list[list[tuple[torch.Tensor, float]]]:
    """Each client's requests: (token ids [1, tokens], its Scale factor)."""
    generator = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, 4096, (1, tokens), generator=generator), 0.5 + c) for _ in range(per_client)] for c in range(clients)]


def one(runner, tokens: torch.Tensor, factor: float) -> tuple:
    with runner.hooks(fwd_hooks=[sl.HookSpec(POINT, sl.ops.Scale(factor))]):
        return runner.run_with_cache(tokens, names_filter=NAMES)


def in_process(folder: str, work: list) -> tuple[list[float], float, dict]:
    """(a): every request one after another on a Tracer in this process."""
    latencies, results = [], {}
    with sl.Tracer.from_pretrained(folder, stages=2, backend="ray") as tracer:
        one(tracer, *work[0][0])  # warm-up
        start = time.perf_counter()
        for c, requests in enumerate(work):
            for i, (tokens, factor) in enumerate(requests):
                began = time.perf_counter()
                results[c, i] = one(tracer, tokens, factor)
                latencies.append(time.perf_counter() - began)
        return latencies, time.perf_counter() - start, results


def served(folder: str, work: list, max_batch: int, reference: dict, in_flight: int) -> tuple[list[float], float]:
    """(b) and (c): each client in its own thread, all at once, against a fresh service; each
    keeps `in_flight` requests queued or running (1: run_with_cache, one after another)."""
    tokens = tuple(TokenEntry(f"client{c}", hash_token(f"token-{c}")) for c in range(len(work)))
    config = ServiceConfig(models=(ModelEntry("bench", folder, stages=2, backend="ray", max_batch=max_batch),), tokens=tokens)
    url = app.start(config, port=free_port())
    try:
        clients = [sl.connect(url, model="bench", token=f"token-{c}") for c in range(len(work))]
        one(clients[0], *work[0][0])  # warm-up
        latencies: list[float] = []
        wrong: list = []

        def check(c: int, i: int, logits: torch.Tensor, cache: dict) -> None:
            expected_logits, expected_cache = reference[c, i]
            same = torch.allclose(logits, expected_logits, atol=1e-4) and sorted(cache) == sorted(expected_cache)
            if not (same and all(torch.allclose(cache[n], expected_cache[n], atol=1e-4) for n in cache)):
                wrong.append((c, i))

        def run(c: int) -> None:
            pending: collections.deque = collections.deque()
            for i, (tokens, factor) in enumerate(work[c]):
                began = time.perf_counter()
                if in_flight == 1:
                    check(c, i, *one(clients[c], tokens, factor))
                    latencies.append(time.perf_counter() - began)
                    continue
                with clients[c].hooks(fwd_hooks=[sl.HookSpec(POINT, sl.ops.Scale(factor))]):
                    pending.append((i, began, clients[c].submit("run", [sl.RunRequest(tokens, specs=(sl.HookSpec(NAMES, sl.ops.Cache()),))])))
                while len(pending) >= in_flight or (pending and i == len(work[c]) - 1):
                    j, started, job = pending.popleft()
                    (result,) = job.result()
                    latencies.append(time.perf_counter() - started)
                    check(c, j, result.output, result.cache)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(len(work))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if wrong or len(latencies) != sum(map(len, work)):
            raise AssertionError(f"the service returned other logits or caches than the in-process Tracer for (client, request) {wrong[:5]}")
        with urllib.request.urlopen(url + "/healthz") as response:
            stats = json.loads(response.read())["models"]["bench"]
        print(f"    {stats.get('runs', 0)} runs, {stats.get('shared_runs', 0)} pipeline runs shared by several of them")
        return latencies, elapsed
    finally:
        app.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe(label: str, latencies: list[float], elapsed: float) -> float:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    rate = len(latencies) / elapsed
    print(f"{label:<44} {rate:8.1f} req/s   p50 {statistics.median(ordered) * 1e3:7.1f} ms   p99 {p99 * 1e3:7.1f} ms")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--layers", type=int, default=8, help="the random Llama's layers")
    parser.add_argument("--d-model", type=int, default=1024, help="the random Llama's width")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 2], help="requests each client keeps queued or running (1: one after another)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    transformers.utils.logging.set_verbosity_error()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    work = requests_of(args.clients, args.requests, args.tokens)
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder, args.layers, args.d_model)
        print(f"{args.clients} clients x {args.requests} requests of 1 x {args.tokens} tokens, Tracer of 2 stages on Ray")
        latencies, elapsed, reference = in_process(folder, work)
        alone_in_process = describe("(a) in-process Tracer, one at a time", latencies, elapsed)
        for in_flight in args.in_flight:
            each = f"{args.clients} clients x {in_flight} in flight"
            alone = describe(f"(b) service, {each}, max_batch=1", *served(folder, work, 1, reference, in_flight))
            shared = describe(f"(c) service, {each}, max_batch=8", *served(folder, work, 8, reference, in_flight))
            print(f"{each}: shared runs give {shared / alone:.2f}x the throughput of runs alone (c/b), "
                  f"{shared / alone_in_process:.2f}x the in-process Tracer's (c/a)")
    ray.shutdown()


if __name__ == "__main__":
    main()
