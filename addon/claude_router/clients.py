"""The people (and agents) behind the router's keys: named clients with a budget, a request rate,
a concurrency cap and the endpoints they may use.

Everything here is pure: the ``Client`` spec, ``parse`` (the config file's ``clients:``), which
client a presented key is (``identify``, constant-time), the calendar periods budgets run over
(UTC days, ISO weeks from Monday, months) and ``decide``: whether a request may go now, and
if not, the 429 answer's message and ``retry-after``. The state the decisions read (spend, the
last minute's requests, requests in flight) is kept by ``accounts``.

Claude Code sends its user to ``/login`` on 401 and 403, so a limit is never answered with
either: it is ``429 rate_limit_error``. Over budget, ``retry-after`` runs until the period
resets (above 60 s Claude Code stops retrying at once and shows the message); over ``rpm`` or
``max_concurrency`` it is short (at most 60 s), so clients retry.
"""

import calendar
import functools
import hashlib
import hmac
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
UNNAMED = "-"  # how a client without a name (a client_keys entry, an admin key) is shown
PERIODS = ("day", "week", "month")
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
FIELDS = {"name", "key", "budget", "rpm", "max_concurrency", "endpoints"}
SHORT_RETRY = 60  # the longest retry-after clients still retry (Claude Code gives up beyond it)


class SpecError(ValueError):
    """A problem in one field of the ``clients:`` section; ``where`` names the field (never a
    key), the config turns it into its ``ConfigError``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@dataclass(frozen=True)
class Budget:
    usd: float
    per: str  # day | week | month (calendar periods in UTC)


@dataclass(frozen=True)
class Client:
    name: str | None  # None: an unnamed client (client_keys, admin keys): no limits
    key: bytes = b""
    budget: Budget | None = None
    rpm: int | None = None
    max_concurrency: int | None = None
    endpoints: tuple[str, ...] | None = None  # None: every endpoint

    @property
    def label(self) -> str:
        return self.name or UNNAMED

    @property
    def limited(self) -> bool:
        return self.budget is not None or self.rpm is not None or self.max_concurrency is not None

    def allows(self, endpoint: str) -> bool:
        return self.endpoints is None or endpoint in self.endpoints

    def __repr__(self) -> str:  # never the key
        return f"Client({self.label})"


ANONYMOUS = Client(None)  # the router without keys: everyone is this one


@dataclass(frozen=True)
class Refusal:
    """Why a request may not go now: the 429's message and retry-after (whole seconds)."""

    reason: str  # budget | rpm | concurrency
    message: str
    retry_after: int

    @property
    def final(self) -> bool:
        """Retrying before ``retry_after`` is pointless (the budget is spent until a reset):
        clients are told not to (``x-should-retry: false``)."""
        return self.reason == "budget" and self.retry_after > SHORT_RETRY


# -- parsing -------------------------------------------------------------------------------

def parse(raw: Any, secret: Callable[[Any, str], str], endpoint_names: Sequence[str]) -> tuple[Client, ...]:
    """The config file's ``clients:`` list. ``secret(ref, where)`` resolves a key (a value or an
    ``env:`` reference) and validates it, raising with the field's name; ``endpoint_names``
    are the file's endpoints, which allow-lists must name. Raises ``SpecError``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise SpecError("clients", "expected a list of clients (name, key, ...)")
    out: list[Client] = []
    for i, item in enumerate(raw):
        where = f"clients[{i}]"
        if not isinstance(item, dict):
            raise SpecError(where, "expected a mapping with name and key")
        if unknown := set(item) - FIELDS:
            raise SpecError(f"{where}.{sorted(map(str, unknown))[0]}", "unknown field")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SpecError(f"{where}.name", "must be 1 to 64 of a-z, 0-9, _ and -, starting "
                                             "with a letter or digit")
        where = f"clients[{i}] ({name})"
        if "key" not in item:
            raise SpecError(f"{where}.key", "is required (a key or an env:NAME reference)")
        key = secret(item["key"], f"{where}.key").encode()
        out.append(Client(
            name=name, key=key,
            budget=_budget(item.get("budget"), f"{where}.budget"),
            rpm=_count(item.get("rpm"), f"{where}.rpm"),
            max_concurrency=_count(item.get("max_concurrency"), f"{where}.max_concurrency"),
            endpoints=_allowed(item.get("endpoints"), f"{where}.endpoints", endpoint_names)))
    for i, c in enumerate(out):
        for j, other in enumerate(out[:i]):
            if c.name == other.name:
                raise SpecError(f"clients[{i}].name", f"{c.name!r} is used twice")
            if hmac.compare_digest(c.key, other.key):
                raise SpecError(f"clients[{i}] ({c.name}).key", f"the same key as clients[{j}] "
                                                                f"({other.name}): each client needs its own")
    return tuple(out)


def _budget(raw: Any, where: str) -> Budget | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"usd", "per"}:
        raise SpecError(where, "expected {usd: AMOUNT, per: day | week | month}")
    usd = raw["usd"]
    if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not math.isfinite(usd) or usd < 0:
        raise SpecError(f"{where}.usd", "must be a number of US dollars >= 0")
    if raw["per"] not in PERIODS:
        raise SpecError(f"{where}.per", "must be day, week or month")
    return Budget(float(usd), raw["per"])


def _count(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise SpecError(where, "must be a whole number >= 1 (leave it out for no limit)")
    return raw


def _allowed(raw: Any, where: str, names: Sequence[str]) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw):
        raise SpecError(where, "expected a non-empty list of endpoint names")
    for n in raw:
        if n not in names:
            raise SpecError(where, f"no endpoint {n!r} (endpoints: {', '.join(names)})")
    return tuple(dict.fromkeys(raw))


# -- who a key is ----------------------------------------------------------------------------

_LOOKUP_SECRET = os.urandom(32)  # keys lookup digests (``key_digest``); this process's only
_INDEXES: dict[tuple[int, str], tuple[tuple, dict[bytes, Any]]] = {}  # (id, kind) -> (the tuple, index)


def key_digest(key: bytes) -> bytes:
    """A key as lookups see it: keyed BLAKE2s (a MAC, and twice as fast as HMAC-SHA256 here)
    under a secret of this process, never stored or shown. What a lookup's time depends on is
    this digest, which nobody can predict without the secret: it tells nothing about which
    key (or how much of one) was right."""
    return hashlib.blake2s(key, key=_LOOKUP_SECRET).digest()


def key_index(items: tuple, kind: str, key_of: Callable[[Any], bytes]) -> dict[bytes, Any]:
    """``items`` by the digest of their key (the first wins), built once per tuple (the
    addon's tables are replaced, never changed, on a reload) and kept for the few tuples in use."""
    entry = _INDEXES.get((id(items), kind))
    if entry is not None and entry[0] is items:
        return entry[1]
    index: dict[bytes, Any] = {}
    for item in items:
        index.setdefault(key_digest(key_of(item)), item)
    if len(_INDEXES) >= 16:
        _INDEXES.clear()
    _INDEXES[(id(items), kind)] = (items, index)
    return index


def identify(presented: bytes, table: Sequence[Client]) -> Client | None:
    """The client whose key was presented, or None. The presented key's keyed digest is
    looked up among the keys' (``key_digest``), so the time it takes tells nothing about which
    key (or how much of one) was right, and does not grow with the number of clients; a table
    that is not a tuple (it could change) is searched comparing every key in constant time."""
    if isinstance(table, tuple):
        return key_index(table, "client", _key_of).get(key_digest(presented))
    found = None
    for c in table:
        if hmac.compare_digest(presented, c.key) and found is None:
            found = c
    return found


def _key_of(c: Client) -> bytes:
    return c.key


def table(named: Iterable[Client], unnamed_keys: Iterable[bytes]) -> tuple[Client, ...]:
    """The lookup table: named clients first, then every other key as an unnamed client."""
    named = tuple(named)
    return named + tuple(Client(None, k) for k in unnamed_keys)


# -- calendar periods (UTC) ----------------------------------------------------------------------

def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def period_start(per: str, now: float) -> float:
    """When the period holding ``now`` began: 00:00 UTC of the day, of the week's Monday, of the
    month's first day."""
    t = _utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "week":
        t -= timedelta(days=t.weekday())
    elif per == "month":
        t = t.replace(day=1)
    return t.timestamp()


def period_end(per: str, now: float) -> float:
    """When the period holding ``now`` resets (the next one's start)."""
    t = _utc(period_start(per, now))
    if per == "day":
        t += timedelta(days=1)
    elif per == "week":
        t += timedelta(days=7)
    else:
        t += timedelta(days=calendar.monthrange(t.year, t.month)[1])
    return t.timestamp()


def day(now: float) -> str:
    """The UTC day holding ``now``, as spend is kept: ``2026-12-06``."""
    return _day(int(now // 86400))


@functools.lru_cache(maxsize=64)
def _day(index: int) -> str:
    return _utc(index * 86400.0).strftime("%Y-%m-%d")


def days_of(per: str, now: float) -> list[str]:
    """The UTC days of the period holding ``now`` so far (today included)."""
    return list(_days_of(per, int(now // 86400)))


@functools.lru_cache(maxsize=64)
def _days_of(per: str, index: int) -> tuple[str, ...]:
    start = int(period_start(per, index * 86400.0) // 86400)
    return tuple(_day(i) for i in range(start, index + 1))


def reset_text(per: str, now: float) -> str:
    """When the period resets, as a 429 says it: ``00:00 UTC`` (today's budget) or with the date
    (``Monday 2026-12-07 00:00 UTC``, ``2027-01-01 00:00 UTC``)."""
    end = _utc(period_end(per, now))
    if per == "day":
        return "00:00 UTC"
    if per == "week":
        return f"{end:%A %Y-%m-%d} 00:00 UTC"
    return f"{end:%Y-%m-%d} 00:00 UTC"


def iso(t: float) -> str:
    return _utc(t).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- decisions ---------------------------------------------------------------------------------

def spent_in_period(per: str, now: float, by_day: Mapping[str, float]) -> float:
    """A client's spend in the period holding ``now``, from its spend per UTC day."""
    return sum(by_day.get(d, 0.0) for d in days_of(per, now))


def decide(client: Client, now: float, spent: float, recent: Sequence[float],
           in_flight: int) -> Refusal | None:
    """May ``client`` send a request at ``now``? ``spent``: its spend this budget period so far;
    ``recent``: when its admitted requests of the last 60 s came (oldest first); ``in_flight``:
    its requests not yet answered. None: it may. The budget is checked first (its refusal is the
    one that lasts), then concurrency, then the rate."""
    b = client.budget
    if b is not None and spent >= b.usd:
        wait = max(1, math.ceil(period_end(b.per, now) - now))
        return Refusal("budget", f"{client.label}: {ADJECTIVE[b.per]} budget ${b.usd:.2f} spent; "
                                 f"resets {reset_text(b.per, now)}", wait)
    if client.max_concurrency is not None and in_flight >= client.max_concurrency:
        return Refusal("concurrency", f"{client.label}: {client.max_concurrency} requests already "
                                      f"in flight (max_concurrency); retry when one is answered", 1)
    if client.rpm is not None and len(recent) >= client.rpm:
        oldest = recent[len(recent) - client.rpm]  # the rpm-th newest: in the minute, rpm are
        if oldest > now - 60:
            wait = min(SHORT_RETRY, max(1, math.ceil(oldest + 60 - now)))
            return Refusal("rpm", f"{client.label}: {client.rpm} requests per minute (rpm) reached; "
                                  f"retry in {wait} s", wait)
    return None
