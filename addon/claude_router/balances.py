"""Relay balances: how much money is left at each endpoint, read from its panel ahead of a
failure, so that a relay about to run dry is skipped before it answers 402.

An endpoint's ``balance:`` (router.yaml) says where to read it: a preset for the common relay
panels (``new-api`` and ``one-api``: ``GET /api/user/self`` with the user's access token,
``data.quota`` in quota units, 500,000 per USD; ``sub2api``: ``GET /v1/usage`` with the
endpoint's own API key, ``remaining`` in USD, -1 for no limit) or a custom URL, headers, JSON
path and divisor. ``BalanceSpec`` and ``parse`` are the spec; ``read`` and ``answer_usd`` turn
a panel's answer into USD, ``is_low`` decides from a reading, a spec and the time; all pure.

``Balances`` is the poller: one background task per endpoint (started when the router runs,
cancelled at shutdown) reads the panel every ``every`` seconds, jittered, each request bounded
by ``timeout``; a 402 or a ``billing_error`` from the endpoint asks for a poll at once
(debounced). Below ``min_usd`` (or at zero) the router skips the endpoint without blame
(``low_balance`` in ``X-Router-Attempts``). A reading older than ``STALE_POLLS`` polls, or a
panel that cannot be read, never makes an endpoint low; and when every endpoint a request could
use is low the router tries them all anyway (the relays say 402 themselves if they are empty):
a stale balance must never make the router refuse everything.

The panel's credential is a secret: it is only ever sent to the panel's URL, never shown in a
log line, status page or error (errors name the HTTP status or the problem, never a body).
"""

import asyncio
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from prometheus_client import CollectorRegistry, Gauge

from .endpoints import Endpoint
from .policy import Attempt

log = logging.getLogger("claude_router")

FIELDS = {"preset", "url", "key", "auth", "user", "headers", "json_path", "divisor", "min_usd",
          "every", "timeout"}
DEFAULT_EVERY = 300  # seconds between polls
DEFAULT_TIMEOUT = 10.0  # seconds one poll may take, connect to last byte
JITTER = 0.1  # each wait is every x (1 +- JITTER): workers and endpoints drift apart
STALE_POLLS = 3  # a reading older than this many polls is unknown again: never low
TRIGGER_DEBOUNCE = 10.0  # seconds between polls that 402s / billing errors ask for
MAX_ANSWER = 1 << 20  # bytes of a panel's answer read at most
LOW_BALANCE = "low_balance"  # the attempt outcome of a skipped endpoint
SYNC_EVERY = 5.0  # with Redis: seconds between reads of the readings other workers shared
SHARED_OP_TIMEOUT = 2.0  # seconds one Redis call may take (background; Redis away: each polls alone)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Preset:
    path: str  # appended to the base
    json_path: str
    divisor: float
    base: str  # "origin": the endpoint's scheme://host:port; "endpoint": its URL, prefix included
    own_key: bool = False  # the endpoint's own key reads it (no key of its own needed)
    user_header: str = ""  # header that carries ``user`` (new-api's New-Api-User)
    success_field: bool = False  # answers {"success": false, "message": ...} when refused
    negative_unlimited: bool = False  # a negative value means no limit


PRESETS = {
    # new-api (QuantumNous/new-api): the personal access token (Settings -> security) as
    # ``Authorization: Bearer``, and the user's id as New-Api-User; data.quota is what is left,
    # in quota units (QuotaPerUnit, 500,000 per USD unless the operator changed it).
    "new-api": Preset("/api/user/self", "data.quota", 500_000, "origin", user_header="New-Api-User",
                      success_field=True),
    # one-api (songquanpeng/one-api): the same page and fields; the access token alone.
    "one-api": Preset("/api/user/self", "data.quota", 500_000, "origin", success_field=True),
    # sub2api (Wei-Shaw/sub2api): GET /v1/usage with the API key; ``remaining`` in USD (the key's
    # quota, the subscription's tightest window or the wallet), -1 when nothing limits it.
    "sub2api": Preset("/v1/usage", "remaining", 1, "endpoint", own_key=True, negative_unlimited=True),
}


class SpecError(ValueError):
    """A problem in one field of an endpoint's ``balance:``; ``where`` names the field (never a
    value), the config turns it into its one-line ``ConfigError``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class PanelError(ValueError):
    """A panel's answer that gives no balance; the message names the problem, never the body."""


@dataclass(frozen=True)
class BalanceSpec:
    url: str = field(repr=False)  # the panel's URL (GET); never shown: it may carry a token
    json_path: str = ""
    divisor: float = 1.0
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # the credential among them
    min_usd: float = 0.0
    every: float = DEFAULT_EVERY
    timeout: float = DEFAULT_TIMEOUT
    preset: str = ""  # "" for a custom panel
    success_field: bool = False
    negative_unlimited: bool = False

    @property
    def secrets(self) -> tuple[str, ...]:
        """Header values that must never be shown (the credential; any long value)."""
        out = []
        for _, v in self.headers:
            out.append(v)
            if v.lower().startswith("bearer "):
                out.append(v[7:])
        return tuple(s for s in out if len(s) >= 8)


@dataclass(frozen=True)
class Reading:
    """What is known of one endpoint's balance."""

    usd: float | None = None  # the last good reading (math.inf: the panel reports no limit)
    at: float | None = None  # unix time of that reading
    error: str = ""  # why the latest poll failed ("" when it worked); never holds a secret
    error_at: float | None = None


# -- the spec -------------------------------------------------------------------------------


def parse(raw: Any, ep: Endpoint, secret: Callable[[Any, str], str], where: str) -> BalanceSpec:
    """An endpoint's ``balance:`` mapping. ``secret(ref, where)`` resolves a key (a value or an
    ``env:NAME`` reference) and validates it, raising with the field's name. Raises SpecError."""
    if not isinstance(raw, dict):
        raise SpecError(where, "expected a mapping (preset, url, key, json_path, divisor, min_usd, every)")
    if unknown := set(map(str, raw)) - FIELDS:
        raise SpecError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    name = raw.get("preset")
    preset = None
    if name is not None:
        preset = PRESETS.get(str(name))
        if preset is None:
            raise SpecError(f"{where}.preset", f"must be one of {', '.join(sorted(PRESETS))}, got {name!r}")
    url = raw.get("url")
    if url is None:
        if preset is None:
            raise SpecError(f"{where}.url", "is required without a preset (the panel's full URL)")
        url = _base(ep, preset.base) + preset.path
    elif not isinstance(url, str):
        raise SpecError(f"{where}.url", "expected the panel's full URL (http:// or https://)")
    _check_url(url, f"{where}.url")
    json_path = raw.get("json_path", preset.json_path if preset else None)
    if not isinstance(json_path, str) or not json_path.strip() or any(not p for p in json_path.split(".")):
        raise SpecError(f"{where}.json_path", "expected a dotted path to the number, e.g. data.quota")
    divisor = _number(raw.get("divisor", preset.divisor if preset else 1), f"{where}.divisor")
    if divisor <= 0:
        raise SpecError(f"{where}.divisor", "must be above 0 (units per USD)")
    min_usd = _number(raw.get("min_usd", 0), f"{where}.min_usd")
    if min_usd < 0:
        raise SpecError(f"{where}.min_usd", "must be 0 or more (USD)")
    every = _number(raw.get("every", DEFAULT_EVERY), f"{where}.every")
    if every < 1:
        raise SpecError(f"{where}.every", "must be at least 1 (seconds between polls)")
    timeout = _number(raw.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout")
    if not 0 < timeout <= 120:
        raise SpecError(f"{where}.timeout", "must be above 0 and at most 120 (seconds)")
    auth = str(raw.get("auth", "bearer")).lower()
    if auth not in ("bearer", "x-api-key"):
        raise SpecError(f"{where}.auth", "must be bearer or x-api-key")
    headers = _headers(raw.get("headers"), f"{where}.headers", secret)
    if raw.get("key") is not None:
        key: str | None = secret(raw["key"], f"{where}.key")
    elif preset is not None and preset.own_key:
        key = ep.key
        if key is None:
            raise SpecError(f"{where}.key", f"is required: endpoint {ep.name} has no key of its own "
                                            f"for the {name} panel")
    else:
        key = None
        if preset is not None:
            raise SpecError(f"{where}.key", f"is required for the {name} panel (its access token, "
                                            "as env:NAME)")
    if key is not None:
        headers = [(k, v) for k, v in headers if k.lower() not in ("authorization", "x-api-key")]
        headers.append(("Authorization", f"Bearer {key}") if auth == "bearer" else ("x-api-key", key))
    user = raw.get("user")
    if user is not None:
        if isinstance(user, bool) or not isinstance(user, (int, str)) or not str(user).strip().isalnum():
            raise SpecError(f"{where}.user", "expected the panel's user id (a number)")
        headers.append((preset.user_header if preset and preset.user_header else "New-Api-User", str(user)))
    return BalanceSpec(url=url, json_path=json_path, divisor=divisor, headers=tuple(headers),
                       min_usd=min_usd, every=every, timeout=timeout, preset=str(name or ""),
                       success_field=preset.success_field if preset else False,
                       negative_unlimited=preset.negative_unlimited if preset else False)


def _base(ep: Endpoint, kind: str) -> str:
    """Where a preset's panel is: the endpoint's origin, or its URL with the path prefix (both
    without any user:password@)."""
    scheme, host, port, prefix = ep.shown_parts
    host = f"[{host}]" if ":" in host else host
    at = "" if port == (443 if scheme == "https" else 80) else f":{port}"
    return f"{scheme}://{host}{at}" + (prefix if kind == "endpoint" else "")


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SpecError(where, "must be http:// or https:// with a host")
    if "@" in parts.netloc:
        raise SpecError(where, "must not hold user:password@ (put the credential in key or headers)")
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in url):
        raise SpecError(where, "must not contain spaces or control characters")
    try:
        _ = parts.port
    except ValueError:
        raise SpecError(where, "has a bad port") from None


def _number(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise SpecError(where, "must be a number")
    try:
        value = float(raw)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise SpecError(where, "must be a finite number")
    return value


def _headers(raw: Any, where: str, secret: Callable[[Any, str], str]) -> list[tuple[str, str]]:
    """Extra headers for the panel; a value may be an ``env:NAME`` reference (a token)."""
    if raw is None:
        return []
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, (str, int))
                                            and not isinstance(v, bool) for k, v in raw.items()):
        raise SpecError(where, "expected a mapping of header names to values (or env:NAME)")
    out = []
    for k, v in raw.items():
        if not _TOKEN.fullmatch(k):
            raise SpecError(where, f"{k!r} is not a valid header name")
        if k.lower() in ("host", "content-length", "connection", "transfer-encoding"):
            raise SpecError(f"{where}.{k}", "is set by the router itself")
        out.append((k, secret(str(v), f"{where}.{k}")))
    return out


# -- reading an answer (pure) ---------------------------------------------------------------------


def read(doc: Any, path: str, divisor: float) -> float:
    """The number at dotted ``path`` in a parsed JSON document, divided by ``divisor`` (units per
    USD). A path part that is a whole number indexes a list. Raises ValueError saying what is
    wrong (never quoting the document: it may hold a secret)."""
    node = doc
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise PanelError(f"no {path} in the answer")
    if isinstance(node, str):  # some panels send numbers as strings ("12.50")
        try:
            node = float(node.strip())
        except ValueError:
            raise PanelError(f"{path} is not a number") from None
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise PanelError(f"{path} is not a number")
    value = float(node) / divisor
    if not math.isfinite(value):
        raise PanelError(f"{path} is not a finite number")
    return value


def answer_usd(status: int, body: bytes, spec: BalanceSpec) -> float:
    """USD left according to a panel's answer (math.inf: no limit); ValueError otherwise."""
    if status != 200:
        raise PanelError(f"the panel answered HTTP {status}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise PanelError("the panel's answer is not JSON") from None
    if spec.success_field and isinstance(doc, dict) and doc.get("success") is False:
        raise PanelError("the panel refused the request (success: false; check key and user)")
    usd = read(doc, spec.json_path, spec.divisor)
    if spec.negative_unlimited and usd < 0:
        return math.inf
    return usd


def stale_after(spec: BalanceSpec) -> float:
    return STALE_POLLS * spec.every + spec.timeout


def is_low(reading: Reading | None, spec: BalanceSpec | None, now: float) -> bool:
    """Is the endpoint too low on money to be tried: a fresh reading below ``min_usd``, or at or
    below zero. Unknown, unreadable and stale balances are never low."""
    if spec is None or reading is None or reading.usd is None or reading.at is None:
        return False
    if now - reading.at > stale_after(spec):
        return False
    return reading.usd < spec.min_usd or reading.usd <= 0


def jittered(every: float, rnd: Callable[[], float] = random.random) -> float:
    return every * (1 - JITTER + 2 * JITTER * rnd())


def asks_for_poll(attempt: Attempt) -> bool:
    """An attempt whose answer speaks of money: a 402, or an error of type billing_error (as
    an answer, or at the start of a stream)."""
    return (attempt.outcome in ("402", "billing_error")
            or attempt.detail.endswith(" billing_error"))


# -- the poller -----------------------------------------------------------------------------------


class Balances:
    """Each endpoint's balance, polled in the background. ``is_low(name)`` is what routing asks;
    ``on_low(name, usd, min_usd)`` is called once per transition into low (``on_recovered``
    likewise when it is back above)."""

    def __init__(self, clock: Callable[[], float], registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.specs: dict[str, BalanceSpec] = {}
        self.readings: dict[str, Reading] = {}
        self.on_low: Callable[[str, float, float], None] | None = None
        self.on_recovered: Callable[[str, float, float], None] | None = None
        self.polls: dict[str, int] = {}  # polls made per endpoint (status, tests)
        self._low: set[str] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._triggered: dict[str, float] = {}
        self._due: dict[str, float] = {}  # when each endpoint's next poll is due (unix time)
        # With router_redis_url: (redis client, key prefix); each good reading is shared there,
        # and a worker adopts a newer one instead of polling the panel itself.
        self.shared: tuple[Any, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._running = False
        self.gauge = Gauge("claude_router_endpoint_balance_usd", "USD left at the endpoint, as its panel "
                           "last said (+Inf: no limit)", ["endpoint"], registry=registry)

    # -- decisions (called on the request path: no I/O) --

    def is_low(self, name: str) -> bool:
        spec = self.specs.get(name)
        return spec is not None and is_low(self.readings.get(name), spec, self.clock())

    def noticed(self, attempts: Iterable[Attempt]) -> None:
        """A request's attempts: a 402 or billing_error asks for a poll of that endpoint now."""
        for a in attempts:
            if a.endpoint in self.specs and asks_for_poll(a):
                self.poll_soon(a.endpoint)

    def poll_soon(self, name: str) -> None:
        """Poll ``name`` at once, at most once per TRIGGER_DEBOUNCE seconds."""
        now = self.clock()
        if now - self._triggered.get(name, -math.inf) < TRIGGER_DEBOUNCE:
            return
        self._triggered[name] = now
        if (wake := self._wake.get(name)) is not None:
            wake.set()

    def status(self, name: str) -> dict[str, Any]:
        """The fields the status page shows for an endpoint (null when it has no ``balance:``)."""
        spec, r = self.specs.get(name), self.readings.get(name) or Reading()
        usd = r.usd if r.usd is None or math.isfinite(r.usd) else None
        return {
            "balance_usd": round(usd, 4) if usd is not None else None,
            "balance_checked": round(r.at, 3) if r.at is not None else None,
            "balance_unlimited": r.usd == math.inf,
            "balance_min_usd": spec.min_usd if spec else None,
            "balance_low": self.is_low(name),
            "balance_error": r.error,
        }

    # -- configuration and lifecycle --

    def configure(self, endpoints: Iterable[Endpoint]) -> None:
        """The endpoints' balance specs (at start-up and on each reload): a changed spec's
        poller restarts, a removed one stops."""
        specs = {ep.name: spec for ep in endpoints if (spec := getattr(ep, "balance", None)) is not None}
        for name in list(self.specs):
            if specs.get(name) != self.specs[name]:
                self._stop(name)
                self.readings.pop(name, None)
                self._due.pop(name, None)
                self._low.discard(name)
                try:
                    self.gauge.remove(name)
                except KeyError:  # never read
                    pass
        old, self.specs = self.specs, specs
        if self._running:
            for name in specs:
                if name not in self._tasks or old.get(name) != specs[name]:
                    self._start(name)

    def start(self) -> None:
        self._running = True
        for name in self.specs:
            if name not in self._tasks:
                self._start(name)

    async def close(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        for name in list(self._tasks):
            self._stop(name)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start(self, name: str) -> None:
        self._wake[name] = asyncio.Event()
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(name))

    def _stop(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self._wake.pop(name, None)
        if task is not None:
            task.cancel()

    # -- polling --

    async def _run(self, name: str) -> None:
        """Poll when due (or asked by a 402); with Redis, first adopt a newer reading another
        worker shared, so that the workers poll the panel about once per ``every`` together."""
        wake = self._wake[name]
        while True:
            spec = self.specs.get(name)
            if spec is None:
                return
            asked = wake.is_set()
            wake.clear()
            try:
                if self.shared is not None and not asked:
                    await self._adopt(name, spec)
                if asked or self.clock() >= self._due.get(name, -math.inf):
                    self._due[name] = self.clock() + jittered(spec.every)
                    reading = await self.poll(name, spec)
                    if self.shared is not None and not reading.error:
                        await self._publish(name, spec, reading)
            except Exception:  # noqa: BLE001 - a poller never dies of one bad answer
                log.exception(f"router: balance poll of {name} failed")
            wait = self._due.get(name, 0.0) - self.clock()
            if self.shared is not None:
                wait = min(wait, SYNC_EVERY)
            try:
                await asyncio.wait_for(wake.wait(), max(0.05, wait))
            except TimeoutError:
                pass

    def _key(self, name: str) -> str:
        assert self.shared is not None
        return f"{self.shared[1]}|balance|{name}"

    async def _adopt(self, name: str, spec: BalanceSpec) -> None:
        """A reading another worker shared, if newer than ours: taken, and our poll put off."""
        assert self.shared is not None
        try:
            async with asyncio.timeout(SHARED_OP_TIMEOUT):
                raw = await self.shared[0].get(self._key(name))
            if not raw:
                return
            doc = json.loads(raw)
            usd, at = float(doc["usd"]), float(doc["at"])
        except Exception:  # noqa: BLE001 - Redis away or a garbled value: poll on our own
            return
        mine = self.readings.get(name)
        if math.isnan(usd) or (mine is not None and mine.at is not None and mine.at >= at):
            return
        self.record(name, usd, at=at)
        self._due[name] = max(self._due.get(name, -math.inf), at + jittered(spec.every))

    async def _publish(self, name: str, spec: BalanceSpec, reading: Reading) -> None:
        assert self.shared is not None
        try:
            async with asyncio.timeout(SHARED_OP_TIMEOUT):
                await self.shared[0].set(self._key(name), json.dumps({"usd": reading.usd, "at": reading.at}),
                                         ex=max(1, math.ceil(stale_after(spec))))
        except Exception:  # noqa: BLE001 - Redis away: this worker's own reading still holds
            pass

    async def poll(self, name: str, spec: BalanceSpec) -> Reading:
        """Read the panel once (bounded by ``spec.timeout``) and record what it said."""
        self.polls[name] = self.polls.get(name, 0) + 1
        try:
            usd = await self._fetch(spec)
        except PanelError as e:
            return self._failed(name, str(e))
        except TimeoutError:
            return self._failed(name, f"no answer within {spec.timeout:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as e:  # (their text may quote the URL)
            return self._failed(name, f"the panel could not be reached ({type(e).__name__})")
        return self.record(name, usd)

    async def _fetch(self, spec: BalanceSpec) -> float:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                                  auto_decompress=True, trust_env=False)
        async with asyncio.timeout(spec.timeout):
            async with self._session.get(spec.url, headers=list(spec.headers), allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=spec.timeout)) as resp:
                body = await resp.content.read(MAX_ANSWER)
                return answer_usd(resp.status, body, spec)

    def record(self, name: str, usd: float, at: float | None = None) -> Reading:
        """A good reading (this worker's, or one another worker shared, taken ``at``): kept,
        shown, and a transition into low (or out of it) announced."""
        spec = self.specs.get(name)
        before = self.readings.get(name)
        now = self.clock()
        reading = Reading(usd=usd, at=now if at is None else at)
        self.readings[name] = reading
        self.gauge.labels(name).set(usd)
        if before is None or before.usd != usd or before.error:
            shown = "no limit" if usd == math.inf else f"${usd:,.2f}"
            log.info(f"router: balance of {name}: {shown}"
                     + (f" (min_usd {spec.min_usd:g})" if spec and spec.min_usd else ""))
        low = is_low(reading, spec, now)
        if low and name not in self._low:
            self._low.add(name)
            assert spec is not None  # (is_low is False without one)
            log.warning(f"router: endpoint {name} is low on balance (${usd:,.2f}, min_usd "
                        f"{spec.min_usd:g}): skipped until its balance is back")
            self._call(self.on_low, name, usd, spec.min_usd)
        elif not low and name in self._low:
            self._low.discard(name)
            shown = "no limit" if usd == math.inf else f"${usd:,.2f}"
            log.info(f"router: endpoint {name} has balance again ({shown}); back in rotation")
            self._call(self.on_recovered, name, usd, spec.min_usd if spec else 0.0)
        return reading

    def _failed(self, name: str, error: str) -> Reading:
        before = self.readings.get(name) or Reading()
        reading = Reading(usd=before.usd, at=before.at, error=error, error_at=self.clock())
        self.readings[name] = reading
        if error != before.error:
            log.warning(f"router: could not read the balance of {name}: {error}")
        return reading

    @staticmethod
    def _call(callback: Callable[[str, float, float], None] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - an alert that fails must not stop the poller
            log.exception("router: a balance callback failed")
