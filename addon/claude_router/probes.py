"""Out-of-band probes: while an endpoint cools, the router tests it itself, so that its
recovery is not paid for by a user's request.

An endpoint with a ``probe:`` spec in router.yaml is probed while it is cooling or half-open,
every ``every`` seconds (jittered by +-20 %, so a fleet does not probe in step), with a
request that costs nothing or almost nothing:

- ``GET /v1/models`` (the default) or ``POST /v1/messages/count_tokens``: free;
- ``POST /v1/messages`` with ``max_tokens: 1``: a few tokens at the endpoint's price, sent only
  while this process's probes of that endpoint spent less than ``usd_per_hour`` in the last hour.

A passing probe (any 2xx) ends the cooldown at once (``store.record_success``: the endpoint is
healthy for every instance sharing the store). A failing probe keeps it: during the cooldown
it changes nothing; once the cooldown has run out (half-open) the prober takes the half-open
probe itself (``store.try_probe``), and a failure ejects the endpoint again for longer, exactly
as a failed user request would. A probe that could not be sent because of the router itself
(out of descriptors) says nothing about the endpoint.

A model family cooling at an endpoint (a 429 or 529 about one model cools that family only) is
probed only by a ``/v1/messages`` probe whose model is of that family: a free probe shows the
relay answers, not that the family's capacity is back, so it tests the endpoint alone. For the
same reason a free probe is not sent for a cooldown of credentials or billing (401, 402, 403,
or a 429 that named no wait: ``free_may_end`` over the endpoint's last counted failure).

An endpoint that asked to be left alone until a time (Retry-After, a rate-limit reset, a used-up
subscription window: ``windows``) is not probed before then: a free ``/v1/models`` would pass and
end a cooldown the endpoint itself set (``Prober.hold``, told by the routing loop).

Credentials: a probe carries the endpoint's own credentials (``Endpoint.request_headers`` with
no client headers), or ``probe.key`` for an endpoint that takes its clients' keys (the router
never keeps a client's key to probe with); config refuses a probe with neither.

One prober per endpoint across all workers: with ``router_redis_url``, a probe is sent only by
the instance that wins ``SET <prefix>|probe|<name> NX PX <every>``, so the endpoint sees one
probe per interval whatever the number of instances; without Redis, health is per process and
so is the prober. Every wait is bounded (the probe, each Redis call).

The spec and decisions are pure (``parse``, ``next_due``, ``wanted``, ``probe_request``,
``HourlyCap``); the ``Prober`` is the background task the addon starts when running.
"""

import asyncio
import json
import logging
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import profiles, windows
from .health import HEALTHY, Health, HealthStore, Phase, phase
from .policy import family_subject
from .redis_store import SEP, RedisHealthStore
from .upstream import Timeouts, Upstream, UpstreamError

if TYPE_CHECKING:
    from .endpoints import Endpoint
    from .usage import Price

log = logging.getLogger("claude_router")

# The probes there are: path -> method. Free ones first.
PATHS = {"/v1/models": "GET", "/v1/messages/count_tokens": "POST", "/v1/messages": "POST"}
FIELDS = {"path", "model", "every", "usd_per_hour", "key"}
JITTER = 0.2  # each interval is every x [0.8, 1.2]
TICK = 0.25  # seconds between looks at which endpoints are cooling
PROBE_TIMEOUT = 10.0  # the whole probe: connect, headers and body
BODY_LIMIT = 64 * 1024
REDIS_TIMEOUT = 0.5
PROBE_TEXT = "ping"
PROBE_INPUT_TOKENS = 16  # more than a one-word message's input tokens: the cost is a bound
ANTHROPIC_VERSION = "2023-06-01"
HOUR = 3600.0
CLOSE_TIMEOUT = 2.0  # seconds close() waits for cancelled tasks to end


@dataclass(frozen=True)
class ProbeSpec:
    path: str = "/v1/models"
    model: str | None = None  # count_tokens and messages probes: as this endpoint names it
    every: float = 15.0  # seconds between probes (jittered)
    usd_per_hour: float = 0.01  # messages probes: this process's most spend per hour
    key: str | None = field(default=None, repr=False, compare=False)  # never shown

    @property
    def method(self) -> str:
        return PATHS[self.path]

    @property
    def paid(self) -> bool:
        return self.path == "/v1/messages"


class SpecError(ValueError):
    """A problem in one field of an endpoint's ``probe:``; ``where`` names the field (never a
    key); config turns it into its one-line ``ConfigError``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def parse(raw: Any, where: str, secret: Callable[[Any, str], str]) -> ProbeSpec | None:
    """An endpoint's ``probe:`` (``true`` for the defaults, or a mapping of FIELDS); None when
    absent or false. ``secret`` resolves ``key`` (a value or ``env:NAME``)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return ProbeSpec()
    if not isinstance(raw, dict):
        raise SpecError(where, f"expected true or a mapping with {', '.join(sorted(FIELDS))}")
    if unknown := set(raw) - FIELDS:
        raise SpecError(f"{where}.{sorted(map(str, unknown))[0]}", "unknown field")
    path = raw.get("path", "/v1/models")
    if path not in PATHS:
        raise SpecError(f"{where}.path", f"must be one of {', '.join(PATHS)}")
    model = raw.get("model")
    if PATHS[path] == "POST":
        if not isinstance(model, str) or not model.strip() or model != model.strip():
            raise SpecError(f"{where}.model", f"a {path} probe needs a model id (as this endpoint "
                                              "names it)")
    elif model is not None:
        raise SpecError(f"{where}.model", "only count_tokens and messages probes send a model")
    every = _number(raw.get("every", 15.0), f"{where}.every", 0.1, "a number of seconds")
    usd = _number(raw.get("usd_per_hour", 0.01), f"{where}.usd_per_hour", 0.0, "a number of USD")
    key = secret(raw["key"], f"{where}.key") if raw.get("key") is not None else None
    return ProbeSpec(path, model, every, usd, key)


def _number(value: Any, where: str, least: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < least:
        raise SpecError(where, f"must be {what} >= {least:g}")
    return float(value)


# -- the pure decisions ------------------------------------------------------------------------


def next_due(now: float, every: float, rand: float, jitter: float = JITTER) -> float:
    """When the next probe is due: ``every`` from now, jittered by +-``jitter`` (rand in [0, 1))."""
    return now + every * (1 - jitter + 2 * jitter * rand)


def subjects(ep: "Endpoint") -> list[str]:
    """The health entries ``ep``'s probe can judge: the endpoint, and for a messages probe the
    model family of its model at the endpoint (``aws~sonnet``)."""
    spec = ep.probe
    if spec is None:
        return []
    fam = profiles.family(spec.model) if spec.paid else None
    return [ep.name] + ([family_subject(ep.name, fam)] if fam else [])


def wanted(endpoints: Sequence["Endpoint"], view: Mapping[str, Health], now: float,
           disabled: frozenset[str] | set[str], holds: Mapping[str, float]
           ) -> list[tuple["Endpoint", str]]:
    """What to probe now, as (endpoint, subject): subjects of endpoints with a probe spec that
    are cooling or half-open, of endpoints not disabled by an operator, and not asked to be
    left alone until later."""
    return [(ep, subject) for ep in endpoints if ep.name not in disabled
            for subject in subjects(ep)
            if phase(view.get(subject, HEALTHY), now) in (Phase.COOLING, Phase.HALF_OPEN)
            and holds.get(subject, 0.0) <= now]


def probe_cost(price: "Price | None") -> float:
    """A bound on what one ``max_tokens: 1`` probe costs at ``price`` (USD)."""
    if price is None:
        return 0.0
    return (PROBE_INPUT_TOKENS * price.input + price.output) / 1_000_000


def probe_request(ep: "Endpoint") -> tuple[str, str, list[tuple[str, str]], bytes]:
    """(method, path, headers, body) of ``ep``'s probe, with its own credentials (or the
    probe's key) and nothing of any client's."""
    spec = ep.probe
    assert spec is not None
    base = [("anthropic-version", ANTHROPIC_VERSION), ("accept-encoding", "identity")]
    if spec.key is not None:
        base.append(("authorization", f"Bearer {spec.key}") if ep.auth == "bearer"
                    else ("x-api-key", spec.key))
    body = b""
    if spec.method == "POST":
        doc: dict[str, Any] = {"model": spec.model,
                               "messages": [{"role": "user", "content": PROBE_TEXT}]}
        if spec.paid:
            doc["max_tokens"] = 1
        body = json.dumps(doc, separators=(",", ":")).encode()
        base.append(("content-type", "application/json"))
    return spec.method, spec.path, ep.request_headers(base), body


def passed(status: int) -> bool:
    return 200 <= status < 300


# Counted failures a free probe cannot judge: credentials refused, a bill unpaid, a permission
# missing. ``GET /v1/models`` may well pass while messages still answer 402.
_NOT_CAPACITY = re.compile(r"^HTTP (401|402|403)\b|billing_error|authentication_error|permission_error")
_RATE_LIMITED = re.compile(r"^HTTP 429\b|rate_limit_error")


def free_may_end(cause: str, waited: bool) -> bool:
    """May a passing free probe (``/v1/models``, ``count_tokens``) end a cooldown whose last
    counted failure was ``cause`` (``Attempt.detail`` as the status page's ``last_error`` shows
    it: ``HTTP 402 billing_error``, ``connection refused``, ...; "" unknown)? Only one of
    capacity or transport (5xx, 529, timeouts, refused connections): a free probe shows the
    relay answers, not that it bills or serves messages. A 429 counts as capacity only when
    the endpoint said how long to wait (``waited``: the prober held it until then); without,
    a free probe cannot tell the limit is over. An unknown cause (another worker's cooldown)
    is judged as before."""
    if _NOT_CAPACITY.search(cause):
        return False
    return waited or not _RATE_LIMITED.search(cause)


class HourlyCap:
    """What probes of one endpoint spent in the last hour (this process), against a cap."""

    def __init__(self, usd: float, hour: float = HOUR) -> None:
        self.usd = usd
        self.hour = hour
        self._spent: deque[tuple[float, float]] = deque()

    def spent(self, now: float) -> float:
        while self._spent and self._spent[0][0] <= now - self.hour:
            self._spent.popleft()
        return sum(usd for _, usd in self._spent)

    def allows(self, now: float, usd: float) -> bool:
        return self.spent(now) + usd <= self.usd * (1 + 1e-9)

    def add(self, now: float, usd: float) -> None:
        self._spent.append((now, usd))


@dataclass
class Tally:
    """One endpoint's probes, for the status page."""

    sent: int = 0
    passed: int = 0
    failed: int = 0
    capped: int = 0  # messages probes not sent: the hour's cost cap was reached
    last: str = ""  # "pass", "fail" or "" (none yet)
    last_at: float = 0.0
    last_outcome: str = ""  # "200", "529", "timeout", ...


# -- the background task -----------------------------------------------------------------------


class Prober:
    def __init__(self, endpoints: Callable[[], Sequence["Endpoint"]],
                 store: Callable[[], HealthStore], upstream: Upstream,
                 connect_timeout: Callable[[], float] = lambda: PROBE_TIMEOUT,
                 window_cap: Callable[[], float] = lambda: 18000.0,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 cause: Callable[[str], str] = lambda name: "") -> None:
        self._endpoints = endpoints
        self._store = store
        self.upstream = upstream
        self._connect_timeout = connect_timeout
        self._window_cap = window_cap
        self.clock = clock
        self._rand = rand
        self.due: dict[str, float] = {}
        self.holds: dict[str, float] = {}  # name -> until: the endpoint asked to be left alone
        self.waited: set[str] = set()  # held during their current cooldown (free_may_end)
        # The last counted failure of a subject (``Stats``' last_error), for free_may_end.
        self.cause = cause
        self.caps: dict[str, HourlyCap] = {}
        self.tally: dict[str, Tally] = {}
        self._token = os.urandom(8).hex()
        self._background: set[asyncio.Task] = set()

    # -- what the routing loop tells it ----------------------------------------------------

    def hold(self, name: str, until: float) -> None:
        """``name`` asked to be left alone until ``until`` (wall clock): no probe before then,
        here and (through Redis) on every instance."""
        self.waited.add(name)
        if until <= self.holds.get(name, 0.0):
            return
        self.holds[name] = until
        store = self._store()
        if isinstance(store, RedisHealthStore) and store.connected:
            ms = int((until - self.clock()) * 1000)
            if ms > 0:
                task = asyncio.get_running_loop().create_task(self._hold_shared(store, name, ms))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _hold_shared(self, store: RedisHealthStore, name: str, ms: int) -> None:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await store.client.set(self._key(store, "hold", name), b"1", px=ms)
        except Exception:  # noqa: BLE001 - Redis away: this instance holds it still
            pass

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Look every TICK seconds for endpoints to probe; until cancelled."""
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug here must not end probing for good
                log.warning(f"router: prober: {type(e).__name__}: {e}")

    async def tick(self) -> None:
        now = self.clock()
        store = self._store()
        for name, until in list(self.holds.items()):
            if until <= now:
                del self.holds[name]
        view = store.current()
        self.waited = {n for n in self.waited if n in self.holds
                       or phase(view.get(n, HEALTHY), now) not in (Phase.HEALTHY, Phase.FAILING)}
        todo = wanted(self._endpoints(), view, now, store.disabled, self.holds)
        names = {subject for _, subject in todo}
        for name in [n for n in self.due if n not in names]:
            del self.due[name]  # healthy again (or held): its next cooldown starts afresh
        batch = []
        for ep, subject in todo:
            assert ep.probe is not None
            due = self.due.get(subject)
            if due is None:
                self.due[subject] = next_due(now, ep.probe.every, self._rand())
            elif now >= due:
                self.due[subject] = next_due(now, ep.probe.every, self._rand())
                batch.append((ep, subject))
        if batch:
            await asyncio.gather(*(self.probe(ep, store, subject) for ep, subject in batch))

    async def probe(self, ep: "Endpoint", store: HealthStore, subject: str | None = None) -> bool | None:
        """Probe ``ep`` once for ``subject`` (the endpoint, or a model family at it) if the
        cost cap and the shared lock allow, and record what it says. True: passed, the cooldown
        ended; False: failed; None: not sent or no verdict."""
        spec = ep.probe
        assert spec is not None
        subject = subject or ep.name
        tally = self.tally.setdefault(ep.name, Tally())
        now = self.clock()
        cost = probe_cost(ep.price) if spec.paid else 0.0
        cap = None
        if spec.paid:
            cap = self.caps.setdefault(ep.name, HourlyCap(spec.usd_per_hour))
            cap.usd = spec.usd_per_hour
            if not cap.allows(now, cost):
                tally.capped += 1
                return None
        if not spec.paid and not free_may_end(self.cause(subject), subject in self.waited):
            return None  # not sent: only a user request (or a messages probe) can judge this one
        if not await self._claim(subject, spec.every, store):
            return None
        now_phase = phase(store.current().get(subject, HEALTHY), self.clock())
        if now_phase not in (Phase.COOLING, Phase.HALF_OPEN):
            return None  # healthy again, or a user request is probing it
        half_open = now_phase is Phase.HALF_OPEN
        if half_open and not await store.try_probe(subject):
            return None  # a user request took the half-open probe first
        if cap is not None:
            cap.add(now, cost)
        tally.sent += 1
        outcome, wait = await self._send(ep)
        tally.last_at, tally.last_outcome = self.clock(), outcome
        if outcome in ("local", "unsendable"):  # the router's own trouble: no verdict
            if half_open:
                await store.release_probe(subject)
            return None
        if outcome.isdigit() and passed(int(outcome)) and self.holds.get(subject, 0.0) <= self.clock():
            tally.passed += 1
            tally.last = "pass"
            await store.record_success(subject)
            log.info(f"router: probe of {subject} passed ({spec.method} {spec.path}: {outcome}); "
                     "its cooldown ended")
            return True
        tally.failed += 1
        tally.last = "fail"
        if wait > 0:  # a used-up subscription window: no probe until it reopens
            self.hold(subject, self.clock() + wait)
        if half_open or wait > 0:
            await store.record_failure(subject, at_least=wait)
        else:
            log.debug(f"router: probe of {subject} failed ({outcome}); still cooling")
        return False

    async def _send(self, ep: "Endpoint") -> tuple[str, float]:
        """Send the probe; (outcome, window wait): a status ("200", "529") or a failure kind
        ("timeout", "refused", ...), and for a 429 that says a subscription window is used up,
        how long to cool (capped)."""
        method, path, headers, body = probe_request(ep)
        connect = min(self._connect_timeout(), PROBE_TIMEOUT)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT + connect):
                resp = await self.upstream.send(ep, method, path, headers, body,
                                                Timeouts(connect=connect, headers=PROBE_TIMEOUT))
                try:
                    _, complete = await resp.read(BODY_LIMIT)
                except UpstreamError:
                    complete = False
                if not complete:
                    resp.close()
        except UpstreamError as e:
            return e.kind, 0.0
        except TimeoutError:
            return "timeout", 0.0
        wait = 0.0
        if resp.status == 429:
            lowered = {k.lower(): v for k, v in resp.headers}
            wait = windows.window_cooldown(windows.rejected_wait(lowered, self.clock()),
                                           self._window_cap())
        return str(resp.status), wait

    async def _claim(self, name: str, every: float, store: HealthStore) -> bool:
        """This instance may probe ``name`` now: always without Redis (the process is the one
        prober of its own health); with Redis, only the instance that takes this interval's
        lock, and none while the endpoint asked (on any instance) to be left alone."""
        if not isinstance(store, RedisHealthStore) or not store.connected:
            return True
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                held = await store.client.pttl(self._key(store, "hold", name))
                if isinstance(held, int) and held > 0:
                    self.holds[name] = max(self.holds.get(name, 0.0), self.clock() + held / 1000)
                    return False
                return bool(await store.client.set(self._key(store, "probe", name), self._token,
                                                   nx=True, px=max(1, int(every * 1000))))
        except Exception:  # noqa: BLE001 - Redis away: the local view is this instance's own
            return True

    @staticmethod
    def _key(store: RedisHealthStore, kind: str, name: str) -> str:
        return f"{store.prefix}{SEP}{kind}{SEP}{name}"

    # -- for the status page ---------------------------------------------------------------

    def document(self, ep: "Endpoint", now: float) -> dict | None:
        """The ``probe`` field of an endpoint's status entry (None: it has no probe spec)."""
        spec = ep.probe
        if spec is None:
            return None
        t = self.tally.get(ep.name, Tally())
        due = [n for n in subjects(ep) if n in self.due]
        judged = [n for n in due if spec.paid or free_may_end(self.cause(n), n in self.waited)]
        doc: dict[str, Any] = {
            "path": spec.path, "every": spec.every, "sent": t.sent, "passed": t.passed,
            "failed": t.failed, "last": t.last or None, "last_outcome": t.last_outcome or None,
            "last_seconds_ago": round(now - t.last_at, 1) if t.last_at else None,
            "next_in_seconds": _soonest([self.due[n] for n in judged], now),
            # Cooling for a failure a free probe cannot judge (402, 401/403, a 429 that named no
            # wait): no probe goes out for them, a request will tell.
            "left_to_requests": sorted(set(due) - set(judged)),
            "held_seconds_left": round(max([0.0] + [self.holds.get(n, 0.0) - now for n in subjects(ep)]), 1),
        }
        if spec.paid:
            cap = self.caps.get(ep.name)
            doc["usd_last_hour"] = round(cap.spent(now), 6) if cap else 0.0
            doc["capped"] = t.capped
        return doc

    async def close(self, run: "asyncio.Task | None" = None) -> None:
        """Cancel the prober's tasks (``run``: the loop, as the addon spawned it, and the shared
        holds being written) and wait until they have ended, at most CLOSE_TIMEOUT: a probe in
        flight lets go of its connection before the upstream closes."""
        tasks = [t for t in [run, *self._background] if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)


def _soonest(times: list[float], now: float) -> float | None:
    return round(max(0.0, min(times) - now), 1) if times else None
