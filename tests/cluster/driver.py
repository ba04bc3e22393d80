"""The driver side of the multi-host tests, run as its own process inside (or outside) the
test cluster's namespaces: `python -m tests.cluster.driver <task> <request.json>`.

A request names the checkpoint, the Ray address, the stage resources, the token file and
where to write what it computed (safetensors, and JSON for everything else).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import shardlens as sl

RESID_POST = "blocks.*.hook_resid_post"


def _tracer(request: dict, **kwargs: object) -> sl.Tracer:
    return sl.Tracer.from_pretrained(
        request["checkpoint"], stages=request.get("stages", 2), backend="ray", address=request["address"],
        stage_resources=request.get("stage_resources"), **kwargs,
    )


def trace(request: dict) -> dict:
    """One batch with activations and gradients at every resid_post; where each stage ran."""
    tokens = load_file(request["tokens"])["tokens"]
    with _tracer(request) as tracer:
        loss, cache = tracer.run_with_cache(tokens, return_type="loss", names_filter=RESID_POST, incl_bwd=True)
        placement = tracer.placement()
    save_file({**{k: v.contiguous() for k, v in cache.items()}, "loss": loss.reshape(1)}, request["out"])
    return {"placement": placement}


def failover(request: dict) -> dict:
    """Runs the batch again and again (each slowed by a sleeping hook, so that runs are in
    flight when a node dies); after the first run, writes the placement to `ready` and
    waits for the test to kill a node. Every run's loss, or the error that ended the loop."""
    tokens = load_file(request["tokens"])["tokens"]
    marker = Path(request["ready"])

    def slow(x: torch.Tensor, hook: object) -> torch.Tensor:
        time.sleep(0.3)
        return x

    losses, error = [], None
    with _tracer(request, allow_code=True) as tracer:
        tracer.add_hook(request["slow_point"], slow, is_permanent=True)
        placements = [tracer.placement()]
        deadline = time.monotonic() + request.get("seconds", 60)
        try:
            while time.monotonic() < deadline and len(losses) < request.get("runs", 20):
                losses.append(float(tracer(tokens, return_type="loss")))
                if len(losses) == 1:
                    marker.write_text(json.dumps(placements[0]))
        except Exception as caught:  # what the user would see
            error = f"{type(caught).__name__}: {caught}"
        placements.append(tracer.placement() if error is None else None)
        recoveries = tracer.coordinator.recoveries
    return {"losses": losses, "error": error, "placements": placements, "recoveries": recoveries}


def main() -> None:
    task, request_path = sys.argv[1], sys.argv[2]
    request = json.loads(Path(request_path).read_text())
    try:
        result = {"trace": trace, "failover": failover}[task](request)
    except Exception:
        result = {"crash": traceback.format_exc()}
    Path(request["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
