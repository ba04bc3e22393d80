"""ModelHost (serve.host): the fair queue, jobs on a 2-stage Tracer in this process, their
owners, cancelling, idle jobs, key/value sessions, shared pipeline runs, and the checks
serve.calls.decode_call makes before a job is queued.

Calls are built as the client builds them (calls.run_json / installed_json, through JSON)
and decoded as the service decodes them; the reference for a job's result is the same
request run alone on the Tracer."""

import base64
import json
import pickle
import threading
import time

import pytest
import torch

import shardlens as sl
from shardlens.errors import ServiceError
from shardlens.hooks.codec import encode
from shardlens.serve import calls
from shardlens.serve import host as host_module
from shardlens.serve.host import Call, FairQueue, Job, ModelHost, as_service_error
from tests.serve.service import assert_same_result

FAMILY = "llama_gqa"
ATOL = 1e-5
WAIT_S = 30.0
D_MODEL, D_HEAD = 32, 8

READ = sl.HookSpec(("blocks.1.hook_resid_pre", "blocks.2.attn.hook_pattern"), sl.ops.Cache())
MISSING_SOURCE = sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Patch(from_cache="missing"))  # fails as it runs


def tokens_of(batch, seed, seq_len=7):
    return torch.randint(3, 97, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- FairQueue


def job(name):
    """A queued job named like "a2": owner "a"."""
    made = Job(name[0], Call("run", ()), release=lambda: None)
    made.name = name
    return made


def queue_of(*names):
    queue = FairQueue()
    jobs = {name: job(name) for name in names}
    for made in jobs.values():
        queue.push(made)
    return queue, jobs


def popped(queue):
    order = []
    while (next_job := queue.pop()) is not None:
        order.append(next_job.name)
    return order


def test_pop_takes_the_owners_in_turn():
    queue, _ = queue_of("a1", "a2", "a3", "b1")

    assert popped(queue) == ["a1", "b1", "a2", "a3"]
    assert len(queue) == 0


def test_pop_takes_three_owners_in_turn_as_they_came():
    queue, _ = queue_of("b1", "a1", "a2", "c1", "b2", "a3", "c2")

    assert popped(queue) == ["b1", "a1", "c1", "b2", "a2", "c2", "a3"]


@pytest.mark.parametrize("names, popped_first", [
    (("a1", "a2", "a3", "b1"), 0),
    (("a1", "a2", "a3", "b1"), 1),
    (("b1", "a1", "a2", "c1", "b2", "a3", "c2", "c3", "c4"), 0),
    (("b1", "a1", "a2", "c1", "b2", "a3", "c2", "c3", "c4"), 2),
    (("a1", "b1", "b2", "b3", "c1"), 1),
])
def test_position_is_the_order_pop_gives(names, popped_first):
    queue, jobs = queue_of(*names)
    for _ in range(popped_first):  # the owners' turn has moved on
        queue.pop()
    positions = {name: queue.position(made) for name, made in jobs.items()}

    order = popped(queue)

    assert {name: positions[name] for name in order} == {name: i for i, name in enumerate(order)}
    assert all(positions[name] is None for name in jobs if name not in order)


def test_take_takes_each_owners_first_accepted_jobs_in_turn():
    queue, _ = queue_of("a1", "a2", "a3", "b1", "c1", "c2")
    accepted = {"a1", "a2", "b1", "c2"}  # c's first job is not: c2 waits behind it

    taken = queue.take(lambda j: j.name in accepted, limit=10)

    assert [j.name for j in taken] == ["a1", "b1", "a2"]
    assert sorted(popped(queue)) == ["a3", "c1", "c2"]


def test_take_stops_at_its_limit():
    queue, _ = queue_of("a1", "a2", "b1", "b2", "c1")

    taken = queue.take(lambda j: True, limit=4)

    assert [j.name for j in taken] == ["a1", "b1", "c1", "a2"]
    assert popped(queue) == ["b2"]


def test_owner_served_by_take_goes_to_the_back_of_the_turn():
    queue, _ = queue_of("a1", "b1", "b2", "c1")
    assert queue.pop().name == "a1"  # the turn: b, c

    taken = queue.take(lambda j: j.name == "b1", limit=1)  # b1 shares a1's run

    assert [j.name for j in taken] == ["b1"]
    assert popped(queue) == ["c1", "b2"]  # c waited through a1's run: it goes before b's second job


def test_remove_takes_a_job_out_once():
    queue, jobs = queue_of("a1", "a2", "b1")

    assert queue.remove(jobs["a1"])
    assert not queue.remove(jobs["a1"])
    assert queue.remove(jobs["b1"])
    assert len(queue) == 1
    assert queue.position(jobs["b1"]) is None
    assert popped(queue) == ["a2"]


# ---------------------------------------------------------------------- ModelHost


@pytest.fixture(scope="module")
def tracer(tiny_checkpoints):
    with sl.Tracer.from_pretrained(tiny_checkpoints[FAMILY], stages=2, backend="local") as tracer:
        yield tracer


@pytest.fixture
def host(tracer):
    made = ModelHost("tiny", tracer)
    yield made
    made.shutdown()


class Gate:
    """Holds the host's thread inside each of its first `held` tracer.run calls until that
    one is opened; counts the runs."""

    def __init__(self, tracer, monkeypatch, held=1):
        self.entered = [threading.Event() for _ in range(held)]
        self.opened = [threading.Event() for _ in range(held)]
        self.runs = []
        real = tracer.run

        def run(request):
            index = len(self.runs)
            self.runs.append(request)
            if index < held:
                self.entered[index].set()
                self.opened[index].wait(WAIT_S)
            return real(request)

        monkeypatch.setattr(tracer, "run", run)

    def hold(self, host, request=None, release=lambda: None):
        """Submit a job and wait until the thread runs it (and is held there)."""
        held = submit(host, "holder", request or sl.RunRequest(tokens_of(1, 99)), release=release)
        assert self.entered[0].wait(WAIT_S)
        return held

    def open(self, index=None):
        for i, opened in enumerate(self.opened):
            if index is None or i == index:
                opened.set()


@pytest.fixture
def gate(host, tracer, monkeypatch):
    made = Gate(tracer, monkeypatch)
    yield made
    made.open()  # before the host shuts down


class Releases:
    """Each job's release callback, counting its calls."""

    def __init__(self):
        self.counts = {}

    def __call__(self, key):
        self.counts.setdefault(key, 0)

        def release():
            self.counts[key] += 1

        return release


def call_json(request, installed=(), kind="run"):
    """What a client posts (through JSON text, as it travels)."""
    data = {"kind": kind, "installed": calls.installed_json(installed), "runs": [calls.run_json(request)]}
    return json.loads(json.dumps(data))


def submit(host, owner, request, installed=(), release=lambda: None):
    return host.submit(owner, calls.decode_call(call_json(request, installed), host, owner), release)


def ended(job):
    """The job, once it ended (watched without job.wait, which counts as its client asking)."""
    deadline = time.monotonic() + WAIT_S
    while job.state not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.state} after {WAIT_S} s"
        time.sleep(0.002)
    return job


def result_of(host, owner, job):
    (result,) = host.collect(ended(host.job(owner, job.id)))
    return result


def assert_no_specs_installed(tracer):
    assert tracer.list_hooks() == {}
    assert [s["installed_specs"] for s in tracer.stats()] == [0, 0]
    assert [worker.stage.list_hooks() for row in tracer.coordinator.workers for worker in row] == [{}, {}]


def test_run_job_gives_what_the_tracer_gives(host, tracer):
    installed = (sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(0.5)),)
    request = sl.RunRequest(tokens_of(2, 1), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]), specs=(READ,))

    result = result_of(host, "alice", submit(host, "alice", request, installed))

    assert_same_result(result, tracer.run(sl.RunRequest(request.input, attention_mask=request.attention_mask, specs=installed + (READ,))))
    assert host.counts["done"] == 1 and host.counts["runs"] == 1
    assert_no_specs_installed(tracer)


def test_status_of_a_done_job(host):
    made = ended(submit(host, "alice", sl.RunRequest(tokens_of(1, 2))))

    assert host.status(made) == {"job": made.id, "state": "done", "position": None, "progress": [1, 1]}


def test_owner_cannot_see_another_owners_job(host):
    made = submit(host, "alice", sl.RunRequest(tokens_of(1, 3)))

    with pytest.raises(ServiceError) as other:
        host.job("bob", made.id)
    with pytest.raises(ServiceError) as made_up:
        host.job("bob", "0" * 32)

    assert other.value.status == made_up.value.status == 404
    assert other.value.message == made_up.value.message.replace("0" * 32, made.id)
    assert host.job("alice", made.id) is made


def test_queued_job_has_its_position(host, gate):
    gate.hold(host)
    first = submit(host, "alice", sl.RunRequest(tokens_of(1, 4)))
    second = submit(host, "alice", sl.RunRequest(tokens_of(1, 5), return_type=None))  # another key: not shared
    third = submit(host, "bob", sl.RunRequest(tokens_of(1, 6), specs=(READ,)))

    positions = [host.status(j)["position"] for j in (first, second, third)]

    assert positions == [0, 2, 1]
    assert [host.status(j)["state"] for j in (first, second, third)] == ["queued"] * 3


def test_cancelled_queued_job_never_runs(host, gate):
    gate.hold(host)
    made = submit(host, "alice", sl.RunRequest(tokens_of(1, 7)))

    host.cancel(made)
    gate.open()
    after = ended(submit(host, "bob", sl.RunRequest(tokens_of(1, 6))))  # the thread is past `made`

    assert made.state == "cancelled"
    assert after.state == "done"
    assert len(gate.runs) == 2  # the held job's run and the later one's: none for `made`
    with pytest.raises(ServiceError) as refused:
        host.collect(made)
    assert (refused.value.status, refused.value.kind) == (409, "cancelled")


@pytest.mark.parametrize("ending", ["done", "failed", "cancelled_queued", "cancelled_running", "cancelled_running_failed"])
def test_release_is_called_once_when_a_job_ends(ending, host, gate):
    releases = Releases()
    request = sl.RunRequest(tokens_of(1, 8))
    if ending in ("failed", "cancelled_running_failed"):
        request = sl.RunRequest(tokens_of(1, 8), specs=(MISSING_SOURCE,))
    if ending.startswith("cancelled_running"):
        made = held = gate.hold(host, request, release=releases("job"))
        host.cancel(made)
    else:
        held = gate.hold(host)
        made = submit(host, "alice", request, release=releases("job"))
        if ending == "cancelled_queued":
            host.cancel(made)
    gate.open()
    ended(made)
    ended(held)
    ended(submit(host, "bob", sl.RunRequest(tokens_of(1, 98))))  # the thread is done with both

    host.cancel(made)  # too late: changes nothing

    assert made.state == {"done": "done", "failed": "failed"}.get(ending, "cancelled")
    assert releases.counts == {"job": 1}


def test_cancelled_running_job_that_fails_counts_as_cancelled_only(host, gate):
    held = gate.hold(host, sl.RunRequest(tokens_of(1, 14), specs=(MISSING_SOURCE,)))

    host.cancel(held)
    gate.open()
    ended(submit(host, "alice", sl.RunRequest(tokens_of(1, 15))))  # runs once the held job's run has failed

    assert (held.state, held.error.status) == ("cancelled", 409)
    assert host.counts["failed"] == 0
    assert host.counts["done"] == 1


def test_failing_spec_fails_its_job_400_and_leaves_nothing_installed(host, tracer):
    bad = sl.RunRequest(tokens_of(2, 9), specs=(READ, MISSING_SOURCE))
    good = sl.RunRequest(tokens_of(2, 10), specs=(READ,))

    failed = ended(submit(host, "alice", bad))
    assert_no_specs_installed(tracer)
    result = result_of(host, "alice", submit(host, "alice", good))

    assert failed.state == "failed"
    assert failed.error.status == 400
    assert "from_cache='missing'" in failed.error.message
    assert host.status(failed)["error"] == {"status": 400, "kind": "RemoteHookError", "message": failed.error.message}
    assert_same_result(result, tracer.run(good))
    assert_no_specs_installed(tracer)


def test_idle_queued_job_is_cancelled(host, gate, monkeypatch):
    monkeypatch.setattr(host_module, "IDLE_S", 5.0)
    held = gate.hold(host)
    idle = submit(host, "alice", sl.RunRequest(tokens_of(1, 11)))
    asked = submit(host, "bob", sl.RunRequest(tokens_of(1, 12)))
    idle.seen = time.monotonic() - 10.0  # nobody asked about it for 10 s

    gate.open()
    ended(held)

    assert ended(idle).state == "cancelled"
    assert (idle.error.status, idle.error.kind) == (409, "cancelled")
    assert ended(asked).state == "done"


def test_job_wait_is_true_only_once_the_job_ended(host, tracer, monkeypatch):
    gate = Gate(tracer, monkeypatch, held=2)
    try:
        gate.hold(host)
        made = submit(host, "alice", sl.RunRequest(tokens_of(1, 13)))
        answers = []
        waiter = threading.Thread(target=lambda: answers.append((made.wait(WAIT_S), made.state)))
        waiter.start()
        time.sleep(0.1)  # the waiter waits while `made` is queued

        gate.open(0)  # the thread takes `made`, and is held in its run
        assert gate.entered[1].wait(WAIT_S)
        waited_running = made.wait(0.2)
        time.sleep(0.1)
        answers_running = list(answers)
        gate.open(1)
        waiter.join(WAIT_S)
    finally:
        gate.open()

    assert (waited_running, answers_running) == (False, [])
    assert answers == [(True, "done")]


# ---------------------------------------------------------------------- sessions


def test_sessions_beyond_the_limit_are_refused_429(host, monkeypatch):
    monkeypatch.setattr(host_module, "MAX_SESSIONS", 2)
    kept = [host.open_kv_cache("alice", 1) for _ in range(2)]

    with pytest.raises(ServiceError) as refused:
        host.open_kv_cache("alice", 1)
    other = host.open_kv_cache("bob", 1)  # the limit is per owner

    assert (refused.value.status, refused.value.kind) == (429, "limit")
    assert sorted(host.sessions) == sorted(kept + [other])
    host.end_session("alice", kept[0])
    assert host.open_kv_cache("alice", 1) in host.sessions


def test_end_session_of_another_owner_is_404(host):
    session = host.open_kv_cache("alice", 1)

    with pytest.raises(ServiceError) as refused:
        host.end_session("bob", session)

    assert refused.value.status == 404
    assert host.session("alice", session).session == session
    host.end_session("alice", session)
    with pytest.raises(ServiceError) as gone:
        host.session("alice", session)
    assert gone.value.status == 404


# ---------------------------------------------------------------------- shared pipeline runs


def sharing_requests():
    """Three runs that can share a pipeline run: different writing specs, one reading spec."""
    return {
        "alice": sl.RunRequest(tokens_of(2, 20), specs=(sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(0.5)), READ)),
        "bob": sl.RunRequest(tokens_of(1, 21), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1]]),
                             specs=(READ, sl.HookSpec("blocks.0.attn.hook_z", sl.ops.Add(torch.linspace(-1, 1, D_HEAD), heads=1, scale=4.0)))),
        "carol": sl.RunRequest(tokens_of(3, 22), specs=(READ, sl.HookSpec("blocks.1.hook_mlp_out", sl.ops.Ablate("mean", positions=slice(1, None))))),
    }


def test_shareable_jobs_share_one_pipeline_run(host, gate, tracer):
    requests = sharing_requests()
    gate.hold(host)
    jobs = {owner: submit(host, owner, request) for owner, request in requests.items()}

    gate.open()
    results = {owner: result_of(host, owner, made) for owner, made in jobs.items()}

    assert host.counts["shared_runs"] == 1
    assert len(gate.runs) == 2  # the held job's, and one for the three
    assert host.counts["done"] == 4 and host.counts["runs"] == 4
    for owner, request in requests.items():
        assert_same_result(results[owner], tracer.run(request))
    assert_no_specs_installed(tracer)


def test_failing_job_in_a_shared_run_fails_only_itself(host, gate, tracer):
    requests = sharing_requests()
    bad = sl.RunRequest(tokens_of(1, 23), specs=(READ, MISSING_SOURCE))
    gate.hold(host)
    jobs = {owner: submit(host, owner, request) for owner, request in requests.items()}
    failing = submit(host, "mallory", bad)
    assert failing.call.share_key == jobs["alice"].call.share_key

    gate.open()

    assert (ended(failing).state, failing.error.status) == ("failed", 400)
    assert {owner: ended(made).state for owner, made in jobs.items()} == {owner: "done" for owner in requests}
    for owner, request in requests.items():
        assert_same_result(result_of(host, owner, jobs[owner]), tracer.run(request))


# ---------------------------------------------------------------------- decode_call


def refused(host, data, owner="alice"):
    """The HTTP error the service answers for a request decode_call refuses."""
    with pytest.raises(Exception) as info:
        calls.decode_call(data, host, owner)
    return as_service_error(info.value)


def test_decode_call_gives_back_the_run_the_client_sent(host):
    installed = (sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(0.5), level=2),)
    request = sl.RunRequest(tokens_of(2, 30), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]), specs=(READ,))

    call = calls.decode_call(call_json(request, installed), host, "alice")

    (run,) = call.runs
    assert call.kind == "run"
    assert call.installed == (sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(0.5)),)
    assert run.specs == call.installed + (READ,)
    assert torch.equal(run.input, request.input) and torch.equal(run.attention_mask, request.attention_mask)
    assert call.n_tokens == 14
    assert call.share_key is not None


UNPICKLED = []


def tripwire():
    """What unpickling a Tripwire calls: the server must never do it."""
    UNPICKLED.append(True)
    return lambda tensor, hook: tensor


class Tripwire:
    def __reduce__(self):
        return tripwire, ()


@pytest.mark.parametrize("where", ["specs", "installed"])
def test_decode_call_refuses_code_without_unpickling_it(where, host):
    code = encode(sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Code(tripwire)), allow_code=True)
    code["op"]["pickle"] = base64.b64encode(pickle.dumps(Tripwire())).decode("ascii")
    data = call_json(sl.RunRequest(tokens_of(1, 31)))
    (data["runs"][0] if where == "specs" else data)[where] = [code]
    UNPICKLED.clear()

    error = refused(host, data)

    assert error.status == 400
    assert "sl.ops.Code" in error.message
    assert UNPICKLED == []


@pytest.mark.parametrize("return_type", ["logits", "loss"])  # a run that may share its batch, and one that may not
def test_decode_call_refuses_an_unknown_hook_name_with_the_closest_names(return_type, host):
    data = call_json(sl.RunRequest(tokens_of(1, 32), return_type=return_type, specs=(sl.HookSpec("blocks.0.hook_resid_postt", sl.ops.Cache()),)))

    error = refused(host, data)

    assert error.status == 400
    assert "'blocks.0.hook_resid_postt'" in error.message
    assert "closest existing names: 'blocks.0.hook_resid_post'" in error.message


@pytest.mark.parametrize("where", ["request", "run"])
def test_decode_call_refuses_an_unknown_field(where, host):
    data = call_json(sl.RunRequest(tokens_of(1, 33)))
    (data if where == "request" else data["runs"][0])["hooks"] = []

    error = refused(host, data)

    assert error.status == 400
    assert f"unknown {where} field 'hooks'" in error.message


def test_decode_call_refuses_a_malformed_tensor_400(host):
    data = call_json(sl.RunRequest(tokens_of(1, 37)))
    data["runs"][0]["input"] = {"__tensor__": base64.b64encode(b"not a safetensors file").decode("ascii")}

    error = refused(host, data)

    assert error.status == 400


def test_decode_call_refuses_weight_grads(host):
    data = call_json(sl.RunRequest(tokens_of(1, 34), grads=True, weight_grads=True))

    error = refused(host, data)

    assert error.status == 400
    assert "weight_grads" in error.message


def test_decode_call_refuses_an_unknown_kv_cache_404(host):
    data = call_json(sl.RunRequest(tokens_of(1, 35)))
    data["runs"][0]["kv_cache"] = {"session": "kv.unknown", "frozen": False, "times": 1, "mask": encode(torch.ones(1, 3, dtype=torch.long))}

    error = refused(host, data)

    assert error.status == 404
    assert "'kv.unknown'" in error.message


def test_decode_call_refuses_another_owners_kv_cache_404(host):
    session = host.open_kv_cache("bob", 1)
    data = call_json(sl.RunRequest(tokens_of(1, 36)))
    data["runs"][0]["kv_cache"] = {"session": session, "frozen": False, "times": 1, "mask": encode(torch.ones(1, 3, dtype=torch.long))}

    error = refused(host, data, owner="alice")

    assert error.status == 404
    assert calls.decode_call(data, host, "bob").runs[0].kv_cache.session == session


# ---------------------------------------------------------------------- what a request may not do to others


def test_a_permanent_spec_acts_for_its_own_run_only(host, tracer):
    request = sl.RunRequest(tokens_of(1, 30))
    data = call_json(request)
    data["installed"] = [encode(sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Scale(0.0), permanent=True))]
    zeroed = host.submit("mallory", calls.decode_call(data, host, "mallory"), lambda: None)
    plain = submit(host, "bob", request)

    assert not torch.allclose(result_of(host, "mallory", zeroed).output, tracer.run(request).output)
    assert_same_result(result_of(host, "bob", plain), tracer.run(request))
    assert_no_specs_installed(tracer)


def test_a_spec_naming_a_file_on_the_server_is_refused_before_it_is_read(host, tiny_checkpoints, monkeypatch):
    from shardlens.hooks.dictionaries import WeightsRef

    from shardlens.hooks.dictionaries import _weights

    monkeypatch.setattr(_weights, "_open", lambda uri: pytest.fail("the server opened a file a client named"))
    monkeypatch.setattr(WeightsRef, "tensors", lambda self: pytest.fail("the server read a file a client named"))
    ref = {"__type__": "WeightsRef", "uri": str(tiny_checkpoints[FAMILY] / "model.safetensors"), "sha256": None}
    splice = {"__type__": "HookSpec", "points": "blocks.0.hook_resid_post", "dir": None, "level": None, "permanent": False, "prepend": False,
              "op": {"__type__": "Splice", "dictionary": {"__type__": "Dictionary", "weights": ref}}}
    data = call_json(sl.RunRequest(tokens_of(1, 31)))
    data["installed"] = [splice]

    error = refused(host, data)

    assert (error.status, "WeightsRef" in error.message, "inline" in error.message) == (400, True, True)


def test_the_points_a_generate_jobs_splice_makes_are_gone_after_it(host, tracer):
    from tests.tracer.test_dictionaries import _weights

    weights = {k: v for k, v in _weights(0, skip=False).items()}
    splice = sl.HookSpec("blocks.0.hook_resid_post", sl.ops.Splice(sl.dictionaries.Dictionary(weights)))
    names = tracer.hook_names()
    data = call_json(sl.RunRequest(tokens_of(1, 32)), installed=[splice], kind="generate")
    data["options"] = {"max_new_tokens": 2, "stop_at_eos": False}
    made = host.submit("mallory", calls.decode_call(data, host, "mallory"), lambda: None)

    assert ended(made).state == "done"
    assert tracer.hook_names() == names
    assert_no_specs_installed(tracer)


@pytest.mark.parametrize("installed, message", [
    ([sl.HookSpec("blocks.0.hook_resid_pots", sl.ops.Scale(1.0))], "blocks.0.hook_resid_post"),
])
def test_a_generate_jobs_installed_specs_are_checked_before_it_is_queued(host, installed, message):
    data = call_json(sl.RunRequest(tokens_of(1, 33)), installed=installed, kind="generate")
    data["options"] = {"max_new_tokens": 2}

    error = refused(host, data)

    assert error.status == 400 and message in error.message and host.stats()["queued"] == 0


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 0}, "options.max_new_tokens got 0"),
    ({"max_new_tokens": "8"}, "options.max_new_tokens got '8'"),
    ({"max_new_tokens": 2, "top_p": 1.5}, "options.top_p got 1.5"),
    ({"max_new_tokens": 2, "stop_at_eos": "no"}, "options.stop_at_eos got 'no'"),
])
def test_bad_generate_options_are_refused(host, options, message):
    data = call_json(sl.RunRequest(tokens_of(1, 34)), kind="generate")
    data["options"] = options

    error = refused(host, data)

    assert (error.status, message in error.message) == (400, True), error.message


def test_a_generate_counts_its_new_tokens(host):
    data = call_json(sl.RunRequest(tokens_of(2, 35)), kind="generate")
    data["options"] = {"max_new_tokens": 10}

    assert calls.decode_call(data, host, "alice").n_tokens == 2 * (7 + 10)


@pytest.mark.parametrize("field, value, message", [
    ("resume", "x", "resume must be"),
    ("kv_cache", ["x"], "kv_cache must be"),
    ("sources", [1, 2], "sources must map names to caches"),
    ("grads", "false", "grads must be true or false"),
    ("whole_batch", 1, "whole_batch must be true or false"),
])
def test_malformed_run_fields_are_400(host, field, value, message):
    data = call_json(sl.RunRequest(tokens_of(1, 36)))
    data["runs"][0][field] = value

    error = refused(host, data)

    assert (error.status, message in error.message) == (400, True), error.message


def test_a_result_over_the_tokens_byte_limit_is_413_and_dropped(host):
    def check_bytes(n):
        if n > 100:
            raise ServiceError(413, f"the results hold {n} bytes", kind="limit")

    released = []
    call = calls.decode_call(call_json(sl.RunRequest(tokens_of(1, 37))), host, "alice")
    made = host.submit("alice", call, lambda: released.append(1), check_bytes)

    assert (ended(made).state, made.error.status, made.result, released) == ("failed", 413, None, [1])
    assert host.counts["done"] == 0


def test_a_job_cancelled_while_waiting_to_share_never_runs(host, gate, tracer, monkeypatch):
    requests = sharing_requests()
    gate.hold(host)
    host.batch_wait_s = 0.5
    first = submit(host, "alice", requests["alice"])
    second = submit(host, "bob", requests["bob"])
    gate.open()
    deadline = time.monotonic() + WAIT_S
    while second.state == "queued" and time.monotonic() < deadline:  # taken to share, while the thread waits for more
        time.sleep(0.001)
    host.cancel(second)

    assert ended(second).state == "cancelled" and ended(first).state == "done"
    assert host.counts["done"] == 2 and [r.input.shape[0] for r in gate.runs] == [1, 2]  # the held job; the first, alone
