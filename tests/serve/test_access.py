import threading

import pytest

from shardlens.errors import ServiceError
from shardlens.serve import access as access_module
from shardlens.serve.access import Access
from shardlens.serve.config import Limits, ModelEntry, ServiceConfig, TokenEntry, hash_token

ALICE = TokenEntry(name="alice", sha256=hash_token("alice-token"), models=("induction",),
                   limits=Limits(tokens_per_request=100, cached_bytes=1000, concurrent=2, per_minute=3))
BOB = TokenEntry(name="bob", sha256=hash_token("bob-token"))
CONFIG = ServiceConfig(models=(ModelEntry("induction", "/x"), ModelEntry("other", "/y")), tokens=(ALICE, BOB))


class Clock:
    """A clock that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def access(clock):
    return Access(CONFIG, clock=clock)


def refused(call, *args, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("header, entry", [("Bearer alice-token", ALICE), ("bearer bob-token", BOB), ("  Bearer   alice-token ", ALICE)])
def test_a_known_bearer_token_is_its_entry(access, header, entry):
    assert access.authenticate(header) == entry


@pytest.mark.parametrize("header, message", [
    (None, "no token: send Authorization: Bearer <token>"),
    ("", "no token: send Authorization: Bearer <token>"),
    ("Basic alice-token", "the Authorization header is not a bearer token: send Authorization: Bearer <token>"),
    ("Bearer ", "the Authorization header is not a bearer token: send Authorization: Bearer <token>"),
    ("alice-token", "the Authorization header is not a bearer token: send Authorization: Bearer <token>"),
])
def test_a_missing_or_malformed_header_is_401(access, header, message):
    error = refused(access.authenticate, header)
    assert (error.status, error.kind, error.message) == (401, "unauthorized", message)


def test_an_unknown_token_is_401_and_not_echoed(access):
    error = refused(access.authenticate, "Bearer carol-token")
    assert (error.status, error.kind, str(error)) == (401, "unauthorized", "unknown token (HTTP 401, unauthorized)")


def test_every_hash_is_compared_in_constant_time(access, monkeypatch):
    compared = []
    monkeypatch.setattr(access_module.hmac, "compare_digest", lambda a, b: compared.append(b) or a == b)
    assert access.authenticate("Bearer alice-token") == ALICE
    assert compared == [ALICE.sha256, BOB.sha256]  # on past the match: the time tells nothing


def test_a_model_the_token_may_not_use_is_403(access):
    error = refused(access.admit, ALICE, model="other", n_tokens=1)
    assert (error.status, error.kind, error.message) == (403, "forbidden", "token 'alice' may not use model 'other'; it may use: induction")
    assert access.admit(BOB, model="other", n_tokens=1)  # models None: all


def test_too_many_token_ids_is_413(access):
    error = refused(access.admit, ALICE, model="induction", n_tokens=101)
    assert (error.status, error.kind, error.message) == (413, "limit", "the request holds 101 token ids; the limit of token 'alice' is 100 per request (tokens_per_request)")
    assert access.admit(ALICE, model="induction", n_tokens=100)


def test_more_concurrent_requests_than_the_limit_is_429_until_one_is_released(access):
    first, second = access.admit(ALICE, model="induction", n_tokens=1), access.admit(ALICE, model="induction", n_tokens=1)
    assert access.in_flight(ALICE) == 2 and access.in_flight(BOB) == 0
    error = refused(access.admit, ALICE, model="induction", n_tokens=1)
    assert (error.status, error.kind, error.message) == (
        429, "limit", "token 'alice' has 2 requests queued or running, its limit (concurrent); send more when one has finished")
    first.release()
    assert access.in_flight(ALICE) == 1 and access.admit(ALICE, model="induction", n_tokens=1)
    assert access.in_flight(ALICE) == 2 and not second.released


def test_more_requests_per_minute_than_the_limit_is_429(access, clock):
    for now in (0.0, 10.0, 20.0):
        clock.now = now
        access.admit(ALICE, model="induction", n_tokens=1).release()
    clock.now = 35.5
    error = refused(access.admit, ALICE, model="induction", n_tokens=1)
    assert (error.status, error.kind, error.message) == (429, "limit", "token 'alice' started 3 requests in the last 60 s, its limit (per_minute); retry in 24.5 s")
    clock.now = 60.0  # the one at 0 s has left the window
    assert access.admit(ALICE, model="induction", n_tokens=1)


def test_a_refused_request_changes_no_counter(access, clock):
    held = access.admit(ALICE, model="induction", n_tokens=1)
    access.admit(ALICE, model="induction", n_tokens=1).release()
    for model, n_tokens in (("other", 1), ("induction", 101)):
        refused(access.admit, ALICE, model=model, n_tokens=n_tokens)
    extra = access.admit(ALICE, model="induction", n_tokens=1)  # the third start of the minute: the refused ones did not count
    refused(access.admit, ALICE, model="induction", n_tokens=1)  # concurrency: 2 held
    held.release()
    extra.release()
    assert access.in_flight(ALICE) == 0
    clock.now = 59.0
    error = refused(access.admit, ALICE, model="induction", n_tokens=1)
    assert error.message.startswith("token 'alice' started 3 requests in the last 60 s")


def test_release_is_idempotent_and_the_with_block_releases(access):
    admission = access.admit(BOB, model="induction", n_tokens=1)
    access.admit(BOB, model="induction", n_tokens=1)
    admission.release()
    admission.release()
    assert access.in_flight(BOB) == 1 and admission.released
    with access.admit(BOB, model="induction", n_tokens=1) as held:
        assert access.in_flight(BOB) == 2 and held.entry == BOB
    assert access.in_flight(BOB) == 1


def test_more_cached_bytes_than_the_limit_is_413(access):
    access.check_cached_bytes(ALICE, 1000)
    error = refused(access.check_cached_bytes, ALICE, 1001)
    assert (error.status, error.kind, error.message) == (
        413, "limit", "the results hold 1001 bytes; the limit of token 'alice' is 1000 bytes per request (cached_bytes) (ask for fewer hook points, positions or examples)")


def test_admit_from_many_threads_lets_in_exactly_the_limit(access):
    start, admitted, refusals = threading.Barrier(16), [], []

    def attempt():
        start.wait()
        try:
            admitted.append(access.admit(BOB, model="induction", n_tokens=1))  # concurrent 4, per_minute 600
        except ServiceError as error:
            refusals.append(error.status)

    threads = [threading.Thread(target=attempt) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(admitted), refusals, access.in_flight(BOB)) == (4, [429] * 12, 4)
    for admission in admitted:
        admission.release()
    assert access.in_flight(BOB) == 0
