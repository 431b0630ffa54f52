"""Endpoint health: a circuit breaker per endpoint, in Envoy's outlier-detection vocabulary.

Consecutive failures eject an endpoint for a cooldown (the base ejection time, growing each
time it is ejected again). When the cooldown ends the endpoint is half-open: exactly one
request probes it; success makes it healthy, failure ejects it again for longer.

Everything here is pure: functions over a `Health` value, a `Breaker` config and a clock value
passed in. Stores (memory here, Redis in `redis_store`) apply these same transitions.
"""

import itertools
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol


@dataclass(frozen=True)
class Breaker:
    max_failures: int = 3  # consecutive failures that eject an endpoint
    cooldown: float = 60.0  # base ejection time, seconds
    max_cooldown: float = 600.0  # cap for repeated ejections
    jitter: float = 0.2  # up to +20% on repeated ejections, so fleets do not probe in step
    probe_timeout: float = 30.0  # a probe that never reports frees its lock after this

    def ejection_time(self, ejections: int, rand: float = 0.0) -> float:
        """Cooldown for the n-th consecutive ejection: base, then doubling with jitter, capped."""
        if ejections <= 1:
            return self.cooldown
        grown = min(self.cooldown * 2 ** (ejections - 1), self.max_cooldown)
        return min(grown * (1 + self.jitter * rand), self.max_cooldown)


@dataclass(frozen=True)
class Health:
    failures: int = 0  # consecutive failures since the last success or ejection
    ejections: int = 0  # consecutive ejections; reset by a success
    ejected_until: float = 0.0  # wall-clock end of the current cooldown
    probe_until: float = 0.0  # a half-open probe holds the endpoint until then


HEALTHY = Health()


class Phase(str, Enum):
    HEALTHY = "healthy"
    FAILING = "failing"  # some failures, not ejected
    COOLING = "cooling"  # ejected, cooldown running
    HALF_OPEN = "half_open"  # cooldown over, waiting for one probe
    PROBING = "probing"  # cooldown over, a probe is in flight


def phase(h: Health, now: float) -> Phase:
    if now < h.ejected_until:
        return Phase.COOLING
    if h.ejections:
        return Phase.PROBING if now < h.probe_until else Phase.HALF_OPEN
    return Phase.FAILING if h.failures else Phase.HEALTHY


def after_failure(
    h: Health, now: float, breaker: Breaker, at_least: float = 0.0, rand: float = 0.0
) -> Health:
    """A failure: count it; eject at the threshold, a failed probe at once.

    ``at_least`` (from Retry-After and the like) ejects for at least that long even below the
    threshold. A cooldown is never shortened.
    """
    p = phase(h, now)
    if p is Phase.COOLING:
        return _extend(h, now + at_least)
    failures = h.failures + 1
    if p in (Phase.HALF_OPEN, Phase.PROBING) or failures >= breaker.max_failures:
        ejections = h.ejections + 1
        until = now + max(breaker.ejection_time(ejections, rand), at_least)
        return Health(failures=0, ejections=ejections, ejected_until=max(until, h.ejected_until))
    if at_least > 0:
        return Health(failures=0, ejections=h.ejections + 1, ejected_until=now + at_least)
    return replace(h, failures=failures)


def _extend(h: Health, until: float) -> Health:
    return replace(h, ejected_until=until) if until > h.ejected_until else h


def after_success(h: Health) -> Health:
    return HEALTHY


def try_probe(h: Health, now: float, breaker: Breaker) -> Health | None:
    """Take the half-open probe if it is free; None when another request holds it."""
    if phase(h, now) is not Phase.HALF_OPEN:
        return None
    return replace(h, probe_until=now + breaker.probe_timeout)


def release_probe(h: Health, now: float, held: float | None = None) -> Health:
    """Free a probe that ended without an outcome (its client went away), so the next request
    may probe at once instead of after ``probe_timeout``.

    Only a probe in flight is freed, and with ``held`` (the ``probe_until`` the caller's
    ``try_probe`` set) only that very probe: not one that expired and another request took since.
    """
    if phase(h, now) is not Phase.PROBING or (held is not None and h.probe_until != held):
        return h
    return replace(h, probe_until=0.0)


def seconds_left(h: Health, now: float) -> float:
    return max(0.0, h.ejected_until - now)


class HealthStore(Protocol):
    """Where health lives. The router only talks to this; stores apply the pure transitions."""

    breaker: Breaker
    salt: bytes  # keys credential hashes (access.credential_id); shared where health is

    @property
    def description(self) -> str:
        """What the store is, for the status page and the log (read-only)."""
        ...

    def track(self, names: Iterable[str]) -> None:
        """The endpoint names in use (a shared store re-syncs these)."""
        ...

    async def view(self) -> Mapping[str, Health]:
        """Current health of every endpoint that is not plainly healthy (missing = healthy)."""
        ...

    def current(self) -> Mapping[str, Health]:
        """The same without waiting (the local view as it stands), for sync callers."""
        ...

    async def try_probe(self, name: str) -> bool: ...

    async def release_probe(self, name: str) -> None:
        """The request that won ``try_probe(name)`` went away without an outcome (the client
        cancelled): free the probe now. A no-op unless this store holds that endpoint's probe."""
        ...

    async def record_failure(self, name: str, at_least: float = 0.0) -> Health: ...

    async def record_success(self, name: str) -> None: ...

    async def reset(self, name: str | None = None) -> None: ...

    @property
    def disabled(self) -> frozenset[str]:
        """Endpoints an operator took out of rotation (shared by every instance in Redis)."""
        ...

    async def set_disabled(self, name: str, disabled: bool) -> None: ...

    async def close(self) -> None: ...


Clock = Callable[[], float]

MAX_SCOPES = 10_000  # credential scopes (endpoint@key) a view keeps; the least recent go first


class Scopes:
    """The credential scopes (``endpoint@keyhash``) in a store's view, least recently changed
    first, at most ``limit``, each kept ``ttl`` seconds after its cooldown ended (as Redis keeps
    its key): one client presenting endless keys cannot grow the view without bound. A scope
    dropped here is healthy again for that key."""

    def __init__(self, limit: int = MAX_SCOPES, ttl: float = 120.0) -> None:
        self.limit = limit
        self.ttl = ttl
        self._order: dict[str, None] = {}

    def touched(self, states: dict[str, Health], name: str, now: float | None = None) -> None:
        if "@" not in name:
            return
        self._order.pop(name, None)
        if name in states:
            self._order[name] = None
        while len(self._order) > self.limit:
            oldest = next(iter(self._order))
            del self._order[oldest]
            states.pop(oldest, None)
        if now is not None:  # the least recently changed are the likeliest to have expired
            for oldest in list(itertools.islice(self._order, 2)):
                h = states.get(oldest)
                if h is None or (h.ejected_until + self.ttl < now and h.probe_until < now):
                    del self._order[oldest]
                    states.pop(oldest, None)

    def names(self) -> list[str]:
        return list(self._order)

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)


class MemoryHealthStore:
    """Per-process health in a dict: the default store."""

    def __init__(
        self,
        breaker: Breaker,
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.scopes = Scopes()
        self.breaker = breaker
        self._clock = clock
        self._rand = rand
        self._states: dict[str, Health] = {}
        self._disabled: set[str] = set()
        self._held: dict[str, float] = {}  # probes won here: name -> the probe_until we set
        self.salt = os.urandom(32)  # keys credential scopes (access.credential_id); per process

    description = "memory"

    @property
    def breaker(self) -> Breaker:
        return self._breaker

    @breaker.setter
    def breaker(self, breaker: Breaker) -> None:
        """A new breaker (``router_cooldown`` changed live) also sets how long a credential
        scope is kept after its cooldown: twice the cooldown, as Redis keeps it."""
        self._breaker = breaker
        self.scopes.ttl = 2 * breaker.cooldown

    @property
    def disabled(self) -> frozenset[str]:
        return frozenset(self._disabled)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        (self._disabled.add if disabled else self._disabled.discard)(name)

    def track(self, names: Iterable[str]) -> None:
        pass

    async def view(self) -> Mapping[str, Health]:
        return self._states

    def current(self) -> Mapping[str, Health]:
        return self._states

    async def try_probe(self, name: str) -> bool:
        taken = try_probe(self._states.get(name, HEALTHY), self._clock(), self.breaker)
        if taken is None:
            return False
        self._states[name] = taken
        self._held[name] = taken.probe_until
        self.scopes.touched(self._states, name, self._clock())
        return True

    async def release_probe(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is None or name not in self._states:
            return
        self._states[name] = release_probe(self._states[name], self._clock(), held)

    async def record_failure(self, name: str, at_least: float = 0.0) -> Health:
        self._held.pop(name, None)
        h = after_failure(
            self._states.get(name, HEALTHY), self._clock(), self.breaker, at_least, self._rand()
        )
        self._states[name] = h
        self.scopes.touched(self._states, name, self._clock())
        return h

    async def record_success(self, name: str) -> None:
        # A success on a healthy endpoint writes nothing.
        self._held.pop(name, None)
        self._states.pop(name, None)
        self.scopes.touched(self._states, name)

    async def reset(self, name: str | None = None) -> None:
        if name is None:
            self._states.clear()
            self._held.clear()
            self.scopes.clear()
        else:
            for n in [name, *(s for s in self.scopes.names() if s.partition("@")[0] == name)]:
                self._states.pop(n, None)
                self._held.pop(n, None)
                self.scopes.touched(self._states, n)

    async def close(self) -> None:
        pass
