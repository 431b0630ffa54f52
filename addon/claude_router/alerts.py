"""Alerts: webhooks told when an endpoint cools down and recovers, when every endpoint is
cooling, when a named client reaches 80 % and 100 % of its budget, and when a relay's balance
runs low.

The pure parts: the ``Webhook`` spec and ``parse`` (the config file's ``alerts:``), the
detectors (``health_events``: what changed between two views of the health store;
``budget_events``: the highest budget level each client has reached this period) and the
bodies (``describe``, ``body``). The I/O is ``Alerts``: a watcher task that diffs the store's
view every second (so it sees a cooldown ended by anything: a success, a probe, an operator's
reset, another worker), a bounded queue per webhook, and a sender per webhook that posts with
aiohttp, each post bounded by a timeout and retried with back-off. Nothing here runs on the
request path: ``emit`` only puts on a queue.

Each event has an id derived from its transition (``cooled|aws|<the cooldown's end>``), the
same on every worker that sees it. A process sends an id once; with ``router_redis_url`` a
worker posts only after claiming the id in Redis (SET NX with a TTL), so an event is sent once
however many workers see it. Bodies hold names and figures only, never a key, and anything
that looks like one of the router's secrets is scrubbed before a post. A webhook's URL may
itself hold a token: logs and the status page show only its position and host.
"""

import asyncio
import difflib
import hashlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from . import clients
from .clients import Budget
from .health import HEALTHY, Health, Phase, phase
from .redaction import scrub

if TYPE_CHECKING:
    from .addon import Router

log = logging.getLogger("claude_router")

EVENTS = ("cooled", "recovered", "all_cooling", "budget_80", "budget_100", "balance_low")
FORMATS = ("json", "slack")
FIELDS = {"url", "format", "events"}
EVERY = 1.0  # seconds between the watcher's looks at health and budgets
QUEUE = 100  # alerts waiting per webhook; when full the oldest is dropped (and counted)
POST_TIMEOUT = 10.0  # seconds one post may take, connect to answer
ATTEMPTS = 5  # posts per alert and webhook before it counts as failed
BACKOFF = 1.0  # seconds before the first retry, doubling after each (1, 2, 4, 8)
MAX_BACKOFF = 60.0
CLAIM_TIMEOUT = 0.5  # seconds a Redis claim may take
CLAIM_TTL = 86400  # seconds an event id stays claimed in Redis (budgets: until their period ends)
OUTCOMES = ("sent", "failed", "dropped")
LEVELS = ((1.0, "budget_100"), (0.8, "budget_80"))  # highest first
MIN_SECRET = 8  # shorter strings are not scrubbed from bodies (they would mangle words)


class SpecError(ValueError):
    """A problem in one field of ``alerts:``; ``where`` names the field (never the URL)."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class Webhook:
    url: str = field(repr=False)  # may hold a token (Slack's do): never logged or shown
    format: str = "json"  # json: the event's fields; slack: {"text": ...}
    events: frozenset[str] = frozenset(EVENTS)
    index: int = 0  # position in alerts: (how logs name it, and part of its Redis claims)

    @property
    def shown(self) -> str:
        """How logs and the status page name it: ``alerts[0] (hooks.slack.com)``."""
        return f"alerts[{self.index}] ({urlsplit(self.url).hostname or '?'})"


def _hint(name: object, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (expected one of {', '.join(sorted(known))})"


def parse(raw: Any, secret: Callable[[Any, str], str]) -> tuple[Webhook, ...]:
    """The config file's ``alerts:`` list of webhooks. ``secret(ref, where)`` resolves a URL
    given as a value or an ``env:NAME`` reference (and checks it is one line of ASCII),
    raising with the field's name. Messages never quote a URL. Raises ``SpecError``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("alerts", "expected a list of webhooks (url, format, events)")
    out = []
    for i, item in enumerate(raw):
        where = f"alerts[{i}]"
        if not isinstance(item, dict):
            raise SpecError(where, "expected a mapping with url, format and events")
        if unknown := set(item) - FIELDS:
            name = sorted(map(str, unknown))[0]
            raise SpecError(f"{where}.{name}", "unknown field" + _hint(name, FIELDS))
        if not isinstance(item.get("url"), str) or not item["url"]:
            raise SpecError(f"{where}.url", "is required (a URL or an env:NAME reference)")
        url = secret(item["url"], f"{where}.url")
        parts = urlsplit(url)
        try:
            _ = parts.port  # urlsplit raises ValueError on a bad port when it is read
        except ValueError:
            raise SpecError(f"{where}.url", "has a bad port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpecError(f"{where}.url", "must be an http:// or https:// URL with a host")
        fmt = item.get("format", "json")
        if fmt not in FORMATS:
            raise SpecError(f"{where}.format", "must be json or slack")
        events = item.get("events")
        if events is None:
            wanted = frozenset(EVENTS)
        else:
            if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
                raise SpecError(f"{where}.events", "expected a non-empty list of events")
            for e in events:
                if e not in EVENTS:
                    raise SpecError(f"{where}.events", f"unknown event {e!r}" + _hint(e, EVENTS))
            wanted = frozenset(events)
        out.append(Webhook(url, fmt, wanted, i))
    return tuple(out)


# -- events (pure) -----------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Event:
    kind: str  # one of EVENTS
    subject: str  # the endpoint or client it is about ("" for all_cooling)
    id: str  # derived from the transition: the same on every worker that sees it
    at: float  # when it was seen
    fields: Mapping[str, Any] = field(default_factory=dict)  # JSON values: names and figures
    ttl: float = CLAIM_TTL  # how long the id stays claimed in Redis


def _ms(t: float) -> int:
    return int(round(t * 1000))


def health_events(before: Mapping[str, Health], before_at: float, after: Mapping[str, Health],
                  now: float, names: Sequence[str], disabled: Iterable[str] = ()) -> list[Event]:
    """What happened to the endpoints ``names`` between two views of the health store (taken at
    ``before_at`` and ``now``; a name missing from a view is healthy).

    - ``cooled``: an endpoint was ejected (its ejection count changed to a positive one), even
      if its cooldown already ended by the time it is seen; a cooldown only extended is not news;
    - ``recovered``: an endpoint that had been ejected is no longer (a success, a probe that
      succeeded, an operator's reset);
    - ``all_cooling``: every endpoint not disabled is cooling now, and was not before.
    """
    out = []
    for name in names:
        b, a = before.get(name, HEALTHY), after.get(name, HEALTHY)
        if a.ejections and a.ejections != b.ejections:
            out.append(Event("cooled", name, f"cooled|{name}|{_ms(a.ejected_until)}", now, {
                "endpoint": name, "ejections": a.ejections,
                "cooldown_seconds": round(max(0.0, a.ejected_until - now), 1),
                "until": clients.iso(a.ejected_until)}))
        elif b.ejections and not a.ejections:
            out.append(Event("recovered", name, f"recovered|{name}|{_ms(b.ejected_until)}", now,
                             {"endpoint": name}))
    usable = [n for n in names if n not in set(disabled)]

    def all_cooling(view: Mapping[str, Health], at: float) -> bool:
        return bool(usable) and all(phase(view.get(n, HEALTHY), at) is Phase.COOLING for n in usable)

    if all_cooling(after, now) and not all_cooling(before, before_at):
        ends = {n: after[n].ejected_until for n in usable}
        digest = hashlib.sha256(",".join(f"{n}:{_ms(t)}" for n, t in sorted(ends.items())).encode())
        out.append(Event("all_cooling", "", f"all_cooling|{digest.hexdigest()[:16]}", now, {
            "endpoints": list(usable),
            "first_back_seconds": round(max(0.0, min(ends.values()) - now), 1)}))
    return out


def budget_events(rows: Iterable[tuple[str, Budget, float]], now: float) -> list[Event]:
    """For each (client, budget, spent this period): the highest level (100 %, else 80 %) its
    spend has reached, as an event whose id names the period, so it is sent once a period.
    A client that jumps past both in one step is told only of 100 %."""
    out = []
    for name, b, spent in rows:
        if b.usd <= 0:
            continue  # a zero budget is a client that may not spend: no news in it
        for level, kind in LEVELS:
            if spent >= level * b.usd:
                start, end = clients.period_start(b.per, now), clients.period_end(b.per, now)
                out.append(Event(kind, name, f"{kind}|{name}|{clients.iso(start)}", now, {
                    "client": name, "spent_usd": round(spent, 6), "budget_usd": b.usd, "per": b.per,
                    "percent": round(100 * spent / b.usd, 1), "resets_at": clients.iso(end)},
                    ttl=end - now + CLAIM_TTL))
                break
    return out


def describe(e: Event) -> str:
    """One line for a person: the text of both formats."""
    f = e.fields
    if e.kind == "cooled":
        return (f"endpoint {e.subject} is cooling down for {f.get('cooldown_seconds', 0):g} s "
                f"(ejection {f.get('ejections', 1)}); requests go to the other endpoints")
    if e.kind == "recovered":
        return f"endpoint {e.subject} recovered: it is serving again"
    if e.kind == "all_cooling":
        return (f"every endpoint is cooling down ({', '.join(f.get('endpoints', []))}); the first "
                f"is back in {f.get('first_back_seconds', 0):g} s")
    if e.kind in ("budget_80", "budget_100"):
        adjective = clients.ADJECTIVE.get(str(f.get("per")), "")
        said = (f"client {e.subject} has spent ${f.get('spent_usd', 0):.2f} of its {adjective} budget "
                f"${f.get('budget_usd', 0):.2f} ({f.get('percent', 0):g} %)")
        if e.kind == "budget_100":
            return said + f"; its requests are refused until {f.get('resets_at', '')}"
        return said + f"; it resets {f.get('resets_at', '')}"
    if e.kind == "balance_low":
        usd, least = f.get("usd"), f.get("min_usd")
        if isinstance(usd, (int, float)) and isinstance(least, (int, float)):
            return f"endpoint {e.subject}: balance low, ${usd:.2f} left (alert below ${least:.2f})"
        return f"endpoint {e.subject}: balance low"
    return f"{e.kind} {e.subject}".strip()


def body(e: Event, fmt: str, host: str = "") -> bytes:
    """What a webhook receives: Slack's ``{"text": ...}``, or the event as a JSON object."""
    text = describe(e)
    if fmt == "slack":
        return json.dumps({"text": f"claude-router: {text}"}).encode()
    doc = {"event": e.kind, "subject": e.subject, "id": e.id, "at": clients.iso(e.at),
           "host": host, "text": text, **{k: v for k, v in e.fields.items() if k not in _OWN}}
    return json.dumps(doc, default=str).encode()  # a field of another type: its text


_OWN = {"event", "subject", "id", "at", "host", "text"}


def _name(e: Event) -> str:
    return f"{e.kind} {e.subject}".rstrip()


# -- what the router sees ------------------------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    now: float
    names: tuple[str, ...]  # the endpoints, in price order
    health: Mapping[str, Health]  # a copy: the stores change their views in place
    disabled: frozenset[str] = frozenset()
    budgets: tuple[tuple[str, Budget, float], ...] = ()  # (client, budget, spent this period)


async def observe(router: "Router") -> Observation:
    """The router's health view and named clients' spend, now."""
    view = await router.store.view()
    names = tuple(ep.name for ep in router.endpoints)
    now = router.clock()
    budgets = tuple((c.label, c.budget, router.accounts.spent(c, now))
                    for c in router.clients if c.name is not None and c.budget is not None)
    return Observation(now, names, {n: view[n] for n in names if n in view},
                       frozenset(router.store.disabled), budgets)


def secrets_of(router: "Router") -> list[str]:
    """Every secret the router holds (endpoints' keys, URL passwords and header values; client
    and admin keys): scrubbed from any body before it is posted."""
    found = [s for ep in router.endpoints for s in ep.secrets]
    found += [c.key.decode("utf-8", "replace") for c in router.clients if c.key]
    found += [k.decode("utf-8", "replace") for k in router.client_keys + router.admin_keys]
    return [s for s in dict.fromkeys(found) if len(s) >= MIN_SECRET]


# -- delivery (I/O) --------------------------------------------------------------------------------

class Alerts:
    """The watcher, the queues and the senders. ``webhooks()`` is read at every event, so a
    config reload applies to the next one."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
                 webhooks: Callable[[], Sequence[Webhook]] = tuple,
                 secrets: Callable[[], Sequence[str]] = list) -> None:
        self.clock = clock
        self.webhooks = webhooks
        self.secrets = secrets
        self.every = EVERY
        self.queue_size = QUEUE
        self.post_timeout = POST_TIMEOUT
        self.attempts = ATTEMPTS
        self.backoff = BACKOFF
        self.redis: Any = None  # redis.asyncio client (the health store's), for claims
        self.prefix = ""
        self.host = socket.gethostname()
        m = Counter("claude_router_alerts", "Alerts by outcome: sent (a webhook answered 2xx), "
                    "failed (every attempt failed), dropped (its webhook's queue was full)",
                    ["outcome"], registry=registry or CollectorRegistry())
        self._outcomes = {o: m.labels(o) for o in OUTCOMES}
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._queues: dict[Webhook, asyncio.Queue[Event]] = {}
        self._senders: dict[Webhook, asyncio.Task] = {}
        self._seen: dict[str, float] = {}  # event ids this process has had -> when to forget them
        self._last: Observation | None = None
        self._watcher: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        self._claims_down = False

    def share(self, redis: Any, prefix: str) -> None:
        """Claim events in Redis (the health store's client and key prefix), or not (None)."""
        self.redis, self.prefix = redis, prefix

    # -- events in -------------------------------------------------------------------------

    def emit(self, kind: str, subject: str, *, id: str | None = None, **fields: Any) -> None:
        """Queue an alert for every webhook that wants ``kind``, at once (never waits). ``id``
        names the transition (sent once per id); by default one per subject and UTC day, so a
        condition reported again and again (a balance still low) is sent at most once a day.
        ``fields`` go into the JSON body: pass names and figures, never a secret.
        For the balance poller: ``emit("balance_low", endpoint, usd=4.2, min_usd=10)``."""
        if kind not in EVENTS:
            raise ValueError(f"unknown alert {kind!r}")
        now = self.clock()
        self.put(Event(kind, subject, id or f"{kind}|{subject}|{clients.day(now)}", now, fields))

    def put(self, e: Event) -> bool:
        """Queue ``e`` for the webhooks that want it, unless this process already had its id;
        True when it is new."""
        now = self.clock()
        if self._seen.get(e.id, 0.0) > now:
            return False
        self._seen[e.id] = now + e.ttl
        if len(self._seen) > 10_000:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
        self._prune()
        for wh in self.webhooks():
            if e.kind in wh.events:
                self._enqueue(wh, e)
        return True

    def _prune(self) -> None:
        """Forget the webhooks a config reload removed or changed: their senders stop (a post
        in flight is abandoned) and what was queued for them goes."""
        current = set(self.webhooks())
        for wh in [w for w in self._queues if w not in current]:
            del self._queues[wh]
        for wh in [w for w in self._senders if w not in current]:
            self._senders.pop(wh).cancel()

    def _enqueue(self, wh: Webhook, e: Event) -> None:
        q = self._queues.get(wh)
        if q is None:
            q = self._queues[wh] = asyncio.Queue(self.queue_size)
        if q.full():
            q.get_nowait()  # the oldest goes: the newest says more about now
            self._count("dropped")
            log.warning(f"router: alert queue of {wh.shown} full; dropped its oldest alert")
        q.put_nowait(e)
        if self._running and wh not in self._senders:
            self._senders[wh] = asyncio.get_running_loop().create_task(self._send(wh, q))

    def look(self, obs: Observation) -> list[Event]:
        """The watcher's step: what changed since the last look, queued. The first look takes
        the budget levels already reached as known (they were told before a restart)."""
        self._prune()
        last, self._last = self._last, obs
        if last is None:
            for e in budget_events(obs.budgets, obs.now):
                self._seen[e.id] = obs.now + e.ttl
            last = Observation(obs.now, obs.names, {})
            events = []
        else:
            events = budget_events(obs.budgets, obs.now)
        events = health_events(last.health, last.now, obs.health, obs.now, obs.names, obs.disabled) + events
        return [e for e in events if self.put(e)]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, observe: Callable[[], Awaitable[Observation]]) -> None:
        """Start the watcher and the senders of what is queued (the router is running)."""
        self._running = True
        loop = asyncio.get_running_loop()
        if self._watcher is None:
            self._watcher = loop.create_task(self._watch(observe))
        for wh, q in self._queues.items():
            if wh not in self._senders:
                self._senders[wh] = loop.create_task(self._send(wh, q))

    async def close(self) -> None:
        self._running = False
        tasks = [t for t in (self._watcher, *self._senders.values()) if t is not None]
        self._watcher = None
        self._senders.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _watch(self, observe: Callable[[], Awaitable[Observation]]) -> None:
        failing = False
        while True:
            if not self.webhooks():  # nothing to tell anyone: no look (no Redis read) at all
                self._prune()
                self._last = None
                await asyncio.sleep(self.every)
                continue
            try:
                self.look(await observe())
                failing = False
            except Exception as e:  # noqa: BLE001 - a bad look is skipped, the next one tries again
                if not failing:
                    log.warning(f"router: alerts: cannot read the router's state ({type(e).__name__})")
                failing = True
            await asyncio.sleep(self.every)

    # -- delivery --------------------------------------------------------------------------

    async def _send(self, wh: Webhook, q: asyncio.Queue[Event]) -> None:
        while True:
            e = await q.get()
            try:
                if await self._claim(wh, e):
                    await self._deliver(wh, e)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad alert never stops the sender
                self._count("failed")
                log.warning(f"router: alert {_name(e)} not delivered to {wh.shown} ({type(exc).__name__})")

    async def _claim(self, wh: Webhook, e: Event) -> bool:
        """With Redis: True only for the one worker that sets the event's key first. Redis away:
        True (sent by each worker that saw it, rather than by none)."""
        if self.redis is None:
            return True
        key = f"{self.prefix}|alert|{wh.index}|{e.id}"
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT):
                got = await self.redis.set(key, b"1", nx=True, ex=max(60, int(e.ttl)))
        except Exception as exc:  # noqa: BLE001 - Redis away: this worker sends it
            if not self._claims_down:
                log.warning(f"router: alerts: Redis unavailable for claims ({type(exc).__name__}); "
                            "each worker sends the alerts it sees")
            self._claims_down = True
            return True
        self._claims_down = False
        return bool(got)

    async def _deliver(self, wh: Webhook, e: Event) -> bool:
        data = scrub(body(e, wh.format, self.host), self.secrets())
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            try:
                status = await self._post(wh.url, data)
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                why = f"no answer within {self.post_timeout:g} s"
                continue
            except Exception as exc:  # noqa: BLE001 - the type only: messages may quote the URL
                why = type(exc).__name__
                continue
            if 200 <= status < 300:
                self._count("sent")
                log.info(f"router: alert {_name(e)} sent to {wh.shown}")
                return True
            why = f"HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                break  # the receiver refuses this body: sending it again will not help
        self._count("failed")
        log.warning(f"router: alert {_name(e)} not delivered to {wh.shown} after "
                    f"{attempt + 1} attempt{'s' if attempt else ''} ({why})")
        return False

    async def _post(self, url: str, data: bytes) -> int:
        if self._session is None:
            # Its own pool (the upstream one is tuned for relays); no proxy from the environment.
            self._session = aiohttp.ClientSession(trust_env=False)
        async with asyncio.timeout(self.post_timeout):
            async with self._session.post(url, data=data, allow_redirects=False,
                                          headers={"content-type": "application/json",
                                                   "user-agent": "claude-router-alerts"}) as resp:
                await resp.content.read(65536)  # a little of the answer, so the connection ends cleanly
                return resp.status

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        self._outcomes[outcome].inc()

    def document(self) -> dict:
        """For the status page: each webhook (position and host only) and the counts."""
        return {"webhooks": [{"webhook": wh.shown, "format": wh.format, "events": sorted(wh.events),
                              "queued": self._queues[wh].qsize() if wh in self._queues else 0}
                             for wh in self.webhooks()],
                **self.counts}
