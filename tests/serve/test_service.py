"""The tracing service over HTTP (Ray Serve on the test session's Ray): isolation between
concurrent clients, shared pipeline runs, access and limits, queue position and cancel,
health and metrics. References: the plain transformers model with torch forward hooks."""

import json
import threading
import urllib.error
import urllib.request

import pytest
import torch

import shardlens as sl
from shardlens.hooks.codec import encode
from shardlens.serve.calls import installed_json, run_json
from shardlens.serve.config import Limits
from tests.serve.service import config_of, running
from tests.tiny_models import load_reference

FAMILY = "llama_gqa"
ATOL = 1e-5
TOKENS = {"alice": ("alice-token", None), "bob": ("bob-token", None), "carol": ("carol-token", None), "dave": ("dave-token", None),
          "small": ("small-token", Limits(tokens_per_request=16, cached_bytes=1024, per_minute=3))}


@pytest.fixture(scope="module")
def service(ray_session, tiny_checkpoints):
    with running(config_of(tiny_checkpoints[FAMILY], tokens=TOKENS, stages=2, backend="ray", max_batch=8)) as url:
        yield url


@pytest.fixture(scope="module")
def hf(tiny_checkpoints):
    return load_reference(tiny_checkpoints[FAMILY])


@pytest.fixture
def tokens():
    return torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def client(url, name="alice"):
    return sl.connect(url, model="tiny", token=TOKENS[name][0])


def scaled(hf, tokens, layer, factor):
    """Logits with decoder layer `layer`'s output scaled (a plain torch forward hook)."""
    handle = hf.model.layers[layer].register_forward_hook(lambda module, args, output: output * factor)
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        handle.remove()


def post(url, path, body, token="alice-token"):
    """A raw request; (status, parsed JSON answer)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as response:
        return response.status, response.read().decode()


def health(url):
    return json.loads(get(url, "/healthz?workers=true")[1])["models"]["tiny"]


def test_concurrent_clients_never_see_each_others_hooks(service, hf, tokens):
    factors = {"alice": 0.5, "bob": 2.0, "carol": 0.0, "dave": -1.0}
    expected = {name: scaled(hf, tokens, 0, f) for name, f in factors.items()}
    with torch.no_grad():
        entering_1 = hf(tokens, output_hidden_states=True).hidden_states[1]  # layer 0's output, unscaled
    wrong, errors = [], []

    def work(name):
        try:
            c = client(service, name)
            with c.hooks(fwd_hooks=[sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(factors[name]))]):
                for _ in range(6):
                    logits, cache = c.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
                    ok = torch.allclose(logits, expected[name], atol=ATOL)
                    ok &= torch.allclose(cache["blocks.1.hook_resid_pre"], entering_1 * factors[name], atol=ATOL)
                    if not ok:
                        wrong.append(name)
        except Exception as error:  # reported below, with the thread's name
            errors.append((name, error))

    threads = [threading.Thread(target=work, args=(name,)) for name in factors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong
    assert health(service)["workers"] and all(w["installed_specs"] == 0 for w in health(service)["workers"])


def test_queued_runs_of_different_clients_share_one_pipeline_run(service, hf, tokens):
    before = health(service).get("shared_runs", 0)
    slow = client(service, "dave").submit("generate", [sl.RunRequest(tokens)], options={"max_new_tokens": 40, "stop_at_eos": False})
    factors = {"alice": 0.5, "bob": 2.0, "carol": 3.0}
    jobs = {}
    for name, factor in factors.items():
        c = client(service, name)
        with c.hooks(fwd_hooks=[sl.HookSpec("blocks.1.hook_resid_post", sl.ops.Scale(factor))]):
            jobs[name] = c.submit("run", [sl.RunRequest(tokens)])
    assert jobs["carol"].status()["state"] in ("queued", "running")
    for name, job in jobs.items():
        (result,) = job.result()
        assert torch.allclose(result.output, scaled(hf, tokens, 1, factors[name]), atol=ATOL)
    slow.fetch()
    assert health(service)["shared_runs"] == before + 1


def test_a_queued_job_shows_its_position_and_can_be_cancelled(service, tokens):
    c = client(service, "alice")
    slow = c.submit("generate", [sl.RunRequest(tokens)], options={"max_new_tokens": 40, "stop_at_eos": False})
    queued = c.submit("variants", [sl.RunRequest(tokens), sl.RunRequest(tokens)])
    status = queued.status()
    assert status["state"] == "queued" and status["position"] == 0 and status["progress"] == [0, 2]
    assert queued.cancel()["state"] == "cancelled"
    with pytest.raises(sl.ServiceError, match="cancelled") as error:
        queued.result()
    assert error.value.status == 409
    assert slow.status(wait=30)["state"] == "done" and slow.fetch()[0]["tokens"].shape == (2, 47)


def test_bad_tokens_are_401_and_change_nothing(service, tokens):
    before = health(service)
    body = {"kind": "run", "runs": [run_json(sl.RunRequest(tokens))]}
    for token in (None, "wrong-token"):
        status, answer = post(service, "/v1/models/tiny/jobs", body, token=token)
        assert status == 401 and answer["error"]["kind"] == "unauthorized"
        assert "wrong-token" not in answer["error"]["message"]
    with pytest.raises(sl.ServiceError, match="unknown token"):
        sl.connect(service, model="tiny", token="wrong-token")
    after = health(service)
    assert {k: after.get(k) for k in ("done", "failed", "queued")} == {k: before.get(k) for k in ("done", "failed", "queued")}


@pytest.mark.parametrize("case", ["code", "unknown_point", "unknown_field", "weight_grads", "bad_kind", "unknown_model", "over_tokens"])
def test_bad_requests_are_4xx_naming_what_is_wrong_and_change_nothing(service, tokens, case):
    from shardlens.hooks.ops import Code

    run = run_json(sl.RunRequest(tokens))
    body, path, token, expected = {"kind": "run", "runs": [run]}, "/v1/models/tiny/jobs", "alice-token", None
    if case == "code":
        body["installed"] = [encode(sl.HookSpec("hook_embed", Code(print)), allow_code=True)]
        expected = (400, "sl.ops.Code")
    elif case == "unknown_point":
        body["installed"] = installed_json([sl.HookSpec("blocks.0.hook_resid_pots", sl.ops.Scale(1.0))])
        expected = (400, "blocks.0.hook_resid_post")
    elif case == "unknown_field":
        body["runs"] = [{**run, "colour": "red"}]
        expected = (400, "unknown run field 'colour'")
    elif case == "weight_grads":
        body["runs"] = [{**run, "weight_grads": True}]
        expected = (400, "no weight gradients")
    elif case == "bad_kind":
        body["kind"] = "train"
        expected = (400, "kind must be one of")
    elif case == "unknown_model":
        path, expected = "/v1/models/huge/jobs", (404, "no model 'huge'")
    else:
        body["runs"] = [run_json(sl.RunRequest(tokens.repeat(2, 1)))]  # 28 token ids
        token, expected = "small-token", (413, "16")
    before = health(service)
    status, answer = post(service, path, body, token=token)
    assert (status, expected[1] in answer["error"]["message"]) == (expected[0], True), answer
    after = health(service)
    assert {k: after.get(k) for k in ("done", "failed", "queued")} == {k: before.get(k) for k in ("done", "failed", "queued")}
    assert all(w["installed_specs"] == 0 and w["pending_results"] == 0 for w in after["workers"])


def test_limits_per_minute_and_cached_bytes(service):
    small = client(service, "small")
    one = torch.tensor([[5, 6, 7]])
    with pytest.raises(sl.ServiceError, match="cached_bytes|bytes") as error:
        small.run_with_cache(one, names_filter="blocks.*.hook_resid_post")  # logits and cache: more than 1024 bytes
    assert error.value.status == 413
    with pytest.raises(sl.ServiceError) as error:
        for _ in range(3):
            small(one, return_type=None)
    assert error.value.status == 429 and "3 requests in the last 60 s" in str(error.value)


def test_health_and_metrics(service):
    status, text = get(service, "/healthz")
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, text = get(service, "/metrics")
    assert status == 200
    assert 'shardlens_serve_queued{model="tiny"} 0' in text
    assert "# TYPE shardlens_serve_done_total counter" in text
    assert "ray_serve_" in text  # Ray Serve's own metrics, from the node's metrics agent


def test_large_results_stream_whole(service, hf):
    tokens = torch.randint(3, 97, (16, 64), generator=torch.Generator().manual_seed(1))
    logits, cache = client(service).run_with_cache(tokens)
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
    assert sum(v.numel() * v.element_size() for v in cache.values()) > 8 << 20  # more than one Arrow record batch
    assert torch.allclose(logits, out.logits, atol=ATOL)
    assert torch.allclose(cache["blocks.2.hook_resid_pre"], out.hidden_states[2], atol=ATOL)


def test_sweeps_and_attribution_run_unchanged_against_a_client(service, tiny_checkpoints):
    model, remote = sl.HookedModel.from_pretrained(tiny_checkpoints[FAMILY]), client(service)
    generator = torch.Generator().manual_seed(2)
    clean, corrupt = torch.randint(3, 97, (2, 6), generator=generator), torch.randint(3, 97, (2, 6), generator=generator)
    metric = sl.metrics.logit_diff(torch.tensor([4, 8]), [5, 6])
    for run in (lambda m: sl.patching.sweep(m, clean, corrupt, points="resid_pre", metric=metric),
                lambda m: sl.patching.sweep(m, clean, corrupt, points="z", over=("layer", "head"), metric=metric, reuse=False),
                lambda m: sl.attribution.atp(m, clean, corrupt, points="z", over=("layer", "head"), metric=metric)):
        expected, got = run(model), run(remote)
        assert torch.allclose(got.grid, expected.grid, atol=1e-4) and got.baseline == pytest.approx(expected.baseline, abs=1e-4)


def test_a_campaign_runs_against_a_client_as_on_a_hooked_model(service, tiny_checkpoints, tmp_path, monkeypatch):
    from shardlens.tracer.campaign import run_campaign
    from tests.tracer.test_campaign import GOOD, visible_dataset, write_campaign

    model = sl.HookedModel.from_pretrained(tiny_checkpoints[FAMILY])
    on_model = run_campaign(write_campaign(tmp_path / "model", GOOD), progress=False, runner=model)
    monkeypatch.setattr(sl.Tracer, "from_pretrained", lambda *a, **k: pytest.fail("the campaign started its own cluster"))
    on_client = run_campaign(write_campaign(tmp_path / "client", GOOD), progress=False, runner=client(service))
    assert on_client["units_run_now"] == on_model["units_run_now"] == 12
    expected, got = visible_dataset(tmp_path / "model" / "out"), visible_dataset(tmp_path / "client" / "out")
    assert sorted(expected) == sorted(got)
    for part, table in expected.items():
        if not part.startswith("resid"):
            assert torch.allclose(torch.tensor(got[part]["value"].to_numpy()), torch.tensor(table["value"].to_numpy()), atol=1e-4), part
    cache, again = sl.read_cache(tmp_path / "model" / "out" / "resid"), sl.read_cache(tmp_path / "client" / "out" / "resid")
    assert all(torch.allclose(cache[name], again[name], atol=1e-5) for name in cache)


def test_a_client_that_goes_away_while_it_waits_cancels_its_job(service, tokens):
    import http.client
    import time
    import urllib.parse

    c = client(service, "alice")
    slow = c.submit("generate", [sl.RunRequest(tokens)], options={"max_new_tokens": 60, "stop_at_eos": False})
    queued = c.submit("run", [sl.RunRequest(tokens)])
    address = urllib.parse.urlparse(service)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=0.3)
    connection.request("GET", f"/v1/models/tiny/jobs/{queued.id}/result", headers={"Authorization": "Bearer alice-token"})
    with pytest.raises(OSError):  # the result is not there yet: give up waiting, and hang up
        connection.getresponse()
    connection.close()
    deadline = time.monotonic() + 20
    while queued.status()["state"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queued.status()["state"] == "cancelled"
    assert slow.fetch()[0]["tokens"].shape == (2, 67)


def test_a_dictionary_loaded_from_a_file_travels_inline(service, tiny_checkpoints, tmp_path, tokens):
    from safetensors.torch import save_file

    from tests.tracer.test_dictionaries import SAE_POINT, _weights

    save_file(_weights(0, skip=False), tmp_path / "sae.safetensors")
    spec = sl.dictionaries.load(tmp_path / "sae.safetensors", point=SAE_POINT)
    names = [f"{SAE_POINT}.sae.hook_latents", "blocks.2.hook_resid_post"]
    model = sl.HookedModel.from_pretrained(tiny_checkpoints[FAMILY])
    expected_logits, expected = model.run_with_cache(tokens, names_filter=names, fwd_hooks=[spec])
    logits, cache = client(service).run_with_cache(tokens, names_filter=names, fwd_hooks=[spec])
    assert torch.allclose(logits, expected_logits, atol=ATOL)
    assert all(torch.allclose(cache[name], expected[name], atol=ATOL) for name in names)
