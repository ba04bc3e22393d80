"""Who may use the tracing service and how much: bearer tokens checked against the config's
hashes, and each token's limits enforced."""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Optional

from shardlens.errors import ServiceError
from shardlens.serve.config import ServiceConfig, TokenEntry, hash_token

WINDOW_S = 60.0  # the span of Limits.per_minute
_HOW = "send Authorization: Bearer <token>"


class Admission:
    """A request let in: holds one of its token's concurrency slots until release() or the
    end of its `with` block."""

    def __init__(self, entry: TokenEntry, release: Callable[[], None]):
        self.entry = entry
        self._free = release
        self._lock = threading.Lock()
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Free the slot; later calls do nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._free()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class Access:
    """Who may do what: checks bearer tokens against the config's hashes and enforces per-token limits.

    Thread-safe: the server calls it from several threads.

    Args:
        config: the service config, whose tokens and their limits apply.
        clock: seconds, for the per-minute limit (a fake one in tests).
    """

    def __init__(self, config: ServiceConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = defaultdict(int)  # token name -> requests queued or running
        self._started: dict[str, deque] = defaultdict(deque)  # token name -> clock times of the requests started in the window

    def authenticate(self, authorization: Optional[str]) -> TokenEntry:
        """The token entry of an Authorization header's bearer token; ServiceError 401 if none."""
        digest = hash_token(_bearer(authorization))
        found = None
        for entry in self.config.tokens:  # all compared, in constant time: how long it takes tells nothing of the hashes
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        if found is None:
            raise ServiceError(401, "unknown token", kind="unauthorized")
        return found

    def admit(self, entry: TokenEntry, *, model: str, n_tokens: int) -> Admission:
        """Let a request of `entry` in, or refuse it (ServiceError 403, 413 or 429) changing no count.

        Args:
            entry: the request's token, from authenticate.
            model: the model it uses.
            n_tokens: its token ids (batch x positions, summed over its runs).

        Returns the Admission that holds the request's concurrency slot until released.
        """
        limits, name = entry.limits, entry.name
        self.check_model(entry, model)
        if n_tokens > limits.tokens_per_request:
            raise ServiceError(
                413, f"the request holds {n_tokens} token ids; the limit of token {name!r} is {limits.tokens_per_request} per request (tokens_per_request)", kind="limit",
            )
        with self._lock:
            now = self._clock()
            started = self._window(name, now)
            if self._in_flight[name] >= limits.concurrent:
                raise ServiceError(
                    429, f"token {name!r} has {self._in_flight[name]} requests queued or running, its limit (concurrent); send more when one has finished", kind="limit",
                )
            if len(started) >= limits.per_minute:
                wait = started[0] + WINDOW_S - now
                raise ServiceError(429, f"token {name!r} started {len(started)} requests in the last 60 s, its limit (per_minute); retry in {wait:.1f} s", kind="limit")
            self._in_flight[name] += 1
            started.append(now)
        return Admission(entry, lambda: self._release(name))

    def check_model(self, entry: TokenEntry, model: str) -> None:
        """Refuse a model the token may not use (ServiceError 403)."""
        if entry.models is not None and model not in entry.models:
            allowed = ", ".join(entry.models) or "none"
            raise ServiceError(403, f"token {entry.name!r} may not use model {model!r}; it may use: {allowed}", kind="forbidden")

    def check_cached_bytes(self, entry: TokenEntry, nbytes: int) -> None:
        """Refuse results of more bytes than the token may get in one request (ServiceError 413)."""
        limit = entry.limits.cached_bytes
        if nbytes > limit:
            raise ServiceError(
                413, f"the results hold {nbytes} bytes; the limit of token {entry.name!r} is {limit} bytes per request (cached_bytes) "
                "(ask for fewer hook points, positions or examples)", kind="limit",
            )

    def in_flight(self, entry: TokenEntry) -> int:
        """The requests of the token queued or running now."""
        with self._lock:
            return self._in_flight.get(entry.name, 0)

    def _window(self, name: str, now: float) -> deque:
        """The times the token started requests in the last WINDOW_S seconds (older ones dropped)."""
        started = self._started[name]
        while started and now - started[0] >= WINDOW_S:
            started.popleft()
        return started

    def _release(self, name: str) -> None:
        with self._lock:
            self._in_flight[name] -= 1


def _bearer(authorization: Optional[str]) -> str:
    """The token of an Authorization header's value "Bearer <token>" (never echoed in errors)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if not scheme:
        raise ServiceError(401, f"no token: {_HOW}", kind="unauthorized")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServiceError(401, f"the Authorization header is not a bearer token: {_HOW}", kind="unauthorized")
    return token.strip()
