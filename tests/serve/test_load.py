"""A load test on loopback, bounded in count and time: 16 concurrent clients send a mix of
valid requests, requests with bad tokens, bad specs and requests over their token's limit,
while a stage worker is killed in the middle. Nothing wrong may come back, every bad request
must get a 4xx, and no hook may be left on any worker.

References: the plain transformers model with a torch forward hook (the valid requests'
logits), computed before the service starts.
"""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import shardlens as sl
from shardlens.serve.calls import installed_json, run_json
from shardlens.serve.config import Limits
from tests.serve.service import config_of, running
from tests.tiny_models import load_reference

FAMILY = "llama_gqa"
CLIENTS = 16
REQUESTS = 6  # per client
KINDS = ("valid", "bad_token", "bad_spec", "over_limit")
TOKENS = {f"user{i}": (f"user-token-{i}", None) for i in range(4)} | {"tight": ("tight-token", Limits(tokens_per_request=8))}


def factor_of(client: int) -> float:
    return 0.25 * (client + 1)


def scaled(hf, tokens, factor):
    handle = hf.model.layers[1].register_forward_hook(lambda module, args, output: output * factor)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


def post(url, token, body):
    request = urllib.request.Request(url + "/v1/models/tiny/jobs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def workers(url):
    with urllib.request.urlopen(url + "/healthz?workers=true", timeout=60) as response:
        return json.loads(response.read())["models"]["tiny"]


def one_client(url, index, tokens, expected, half_done, outcomes):
    """REQUESTS requests of one kind; appends (kind, "ok" | "wrong" | status | error) per request."""
    kind = KINDS[index % len(KINDS)]
    for n in range(REQUESTS):
        if n == REQUESTS // 2:
            half_done.wait(timeout=120)
        try:
            if kind == "valid":
                client = sl.connect(url, model="tiny", token=f"user-token-{index // 4}")  # the valid clients 0, 4, 8, 12: four tokens
                spec = sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Scale(factor_of(index)))
                if n % 2:
                    (result,) = client.run_variants([sl.RunRequest(tokens, specs=(spec,))])
                    logits = result.output
                else:
                    logits = client.run_with_hooks(tokens, fwd_hooks=[spec])
                outcomes.append((kind, "ok" if torch.allclose(logits, expected[index], atol=1e-5) else "wrong"))
            elif kind == "bad_token":
                outcomes.append((kind, post(url, "not-a-token", {"kind": "run", "runs": [run_json(sl.RunRequest(tokens))]})))
            elif kind == "bad_spec":
                bad = installed_json([sl.HookSpec(f"blocks.{9 + n}.hook_resid_post", sl.ops.Scale(2.0))])
                outcomes.append((kind, post(url, "user-token-0", {"kind": "run", "installed": bad, "runs": [run_json(sl.RunRequest(tokens))]})))
            else:
                outcomes.append((kind, post(url, "tight-token", {"kind": "run", "runs": [run_json(sl.RunRequest(tokens))]})))
        except Exception as error:  # counted as a failure below, with its message
            outcomes.append((kind, f"{type(error).__name__}: {error}"))


@pytest.mark.timeout(600)
def test_sixteen_clients_with_bad_requests_and_a_killed_worker(ray_session, tiny_checkpoints):
    hf = load_reference(tiny_checkpoints[FAMILY])
    tokens = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = {i: scaled(hf, tokens, factor_of(i)) for i in range(CLIENTS)}
    config = config_of(tiny_checkpoints[FAMILY], tokens=TOKENS, stages=2, backend="ray", max_batch=8)
    with running(config) as url:
        before = workers(url)["workers"]
        half_done, outcomes = threading.Event(), []
        threads = [threading.Thread(target=one_client, args=(url, i, tokens, expected, half_done, outcomes)) for i in range(CLIENTS)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        while len(outcomes) < CLIENTS * REQUESTS // 2 and time.monotonic() - start < 120:
            time.sleep(0.05)
        os.kill(before[1]["pid"], signal.SIGKILL)  # the last stage's worker, in the middle of the load
        half_done.set()
        for thread in threads:
            thread.join(timeout=300)
        after = workers(url)
    assert len(outcomes) == CLIENTS * REQUESTS
    by_kind = {kind: [outcome for k, outcome in outcomes if k == kind] for kind in KINDS}
    assert by_kind["valid"] == ["ok"] * len(by_kind["valid"])
    assert by_kind["bad_token"] == [401] * len(by_kind["bad_token"])
    assert by_kind["bad_spec"] == [400] * len(by_kind["bad_spec"])
    assert by_kind["over_limit"] == [413] * len(by_kind["over_limit"])
    assert after["workers"][1]["pid"] != before[1]["pid"] and after["recoveries"] >= 1  # it was killed, came back, runs were retried
    assert all(w["installed_specs"] == 0 and w["pending_results"] == 0 for w in after["workers"])
    assert after["queued"] == 0 and after["running"] == 0
