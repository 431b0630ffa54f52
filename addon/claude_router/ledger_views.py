"""What the dashboard reads from the ledger (``ledger.py``'s SQLite file): the last hour per
minute and per endpoint, and the latest requests. The file is the one every worker behind
``--workers`` writes, so these are the whole router's figures, not one process's.

Plain read-only queries over a connection opened with ``mode=ro``; the caller runs them in a
thread (``dashboard.py``: ``asyncio.to_thread`` under a timeout, never on the event loop).
Only names, hashes and counts are read: the ledger holds no key.
"""

import os
import sqlite3
from dataclasses import dataclass, field
from urllib.parse import quote

from . import policy

MINUTES = 60  # the chart's window: the last hour, per minute
RECENT = 50  # rows of the request table

_PER_MINUTE = """
SELECT CAST(t / 60 AS INTEGER), endpoint, COUNT(*), TOTAL(cost_usd),
       TOTAL(input_tokens + cache_write_tokens + cache_read_tokens), TOTAL(cache_read_tokens)
FROM requests WHERE t >= ? GROUP BY 1, 2
"""
# Requests in which some attempt did not answer: more than one attempt, or none answered.
_FAILED = """
SELECT CAST(t / 60 AS INTEGER), endpoint, attempts, COUNT(*)
FROM requests WHERE t >= ? AND attempts != '' AND (endpoint IS NULL OR attempts LIKE '%,%')
GROUP BY 1, 2, 3
"""
_RECENT = """
SELECT t, client, session, model, endpoint, attempts, status, input_tokens, output_tokens,
       cache_write_tokens, cache_read_tokens, cost_usd, reason
FROM requests ORDER BY t DESC LIMIT ?
"""
RECENT_FIELDS = ("t", "client", "session", "model", "endpoint", "attempts", "status", "input_tokens",
                 "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost_usd", "reason")


@dataclass
class EndpointWindow:
    """One endpoint's last hour: requests it answered, attempts at it that did not answer
    (the router went on, or nobody answered), spend, and prompt tokens read from cache."""
    served: int = 0
    failed: int = 0
    spend_usd: float = 0.0
    prompt_tokens: float = 0.0
    cache_read_tokens: float = 0.0
    requests: list[int] = field(default_factory=lambda: [0] * MINUTES)
    failures: list[int] = field(default_factory=lambda: [0] * MINUTES)
    spend: list[float] = field(default_factory=lambda: [0.0] * MINUTES)

    @property
    def cache_read_ratio(self) -> float | None:
        return round(self.cache_read_tokens / self.prompt_tokens, 3) if self.prompt_tokens else None


@dataclass
class Window:
    """The last hour (``minutes``: each minute's start, unix seconds) and the latest rows."""
    minutes: list[int]
    endpoints: dict[str, EndpointWindow]
    requests: int = 0  # every request in the hour (the router's own answers too)
    failovers: int = 0  # requests that needed more than one attempt
    spend_usd: float = 0.0
    recent: list[dict] = field(default_factory=list)


def failed_attempts(attempts: str, answered: str | None) -> list[str]:
    """The endpoints of the attempts that did not answer the client: every one but the last,
    and the last too when no endpoint answered. ``attempts`` as the ledger holds it
    (``policy.attempts_header``: ``"aws:529, droid:200"``)."""
    parts = [part.strip().rpartition(":") for part in attempts.split(",") if part.strip()]
    # Skipped without blame (busy, low balance) or asked again: not a failure (policy.NOT_TRIED)
    names = [name for name, _, outcome in parts if policy.was_tried(outcome)]
    if answered is not None and names and names[-1] == answered:
        names.pop()
    return [n for n in names if n]


def connect(path: str, timeout: float = 1.0) -> sqlite3.Connection | None:
    """A read-only connection to the ledger, None while there is no file yet (nothing was
    written). Never creates the file."""
    if not os.path.exists(path):
        return None
    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=timeout,
                           isolation_level=None, check_same_thread=False)


def empty(now: float, minutes: int = MINUTES) -> Window:
    last = int(now // 60)
    return Window(minutes=[(last - minutes + 1 + i) * 60 for i in range(minutes)], endpoints={})


def read(db: sqlite3.Connection | None, now: float, names: list[str], recent: int = RECENT) -> Window:
    """The window ending at ``now`` for the endpoints ``names`` (rows of other names, from an
    older config, count in the totals only). ``db`` None: an empty window."""
    win = empty(now)
    win.endpoints = {name: EndpointWindow() for name in names}
    if db is None:
        return win
    first = win.minutes[0] // 60
    since = float(win.minutes[0])
    try:
        per_minute = db.execute(_PER_MINUTE, (since,)).fetchall()
        failed = db.execute(_FAILED, (since,)).fetchall()
        rows = db.execute(_RECENT, (recent,)).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return win  # a file the writer has only just created
        raise
    for minute, endpoint, count, cost, prompt, cache_read in per_minute:
        i = minute - first
        win.requests += count
        win.spend_usd += cost
        ep = win.endpoints.get(endpoint) if endpoint is not None else None
        if ep is None:
            continue
        ep.served += count
        ep.spend_usd += cost
        ep.prompt_tokens += prompt
        ep.cache_read_tokens += cache_read
        if 0 <= i < len(win.minutes):
            ep.requests[i] += count
            ep.spend[i] += cost
    for minute, endpoint, attempts, count in failed:
        i = minute - first
        if sum(1 for part in attempts.split(",") if policy.was_tried(part.strip().rpartition(":")[2])) > 1:
            win.failovers += count  # more than one endpoint asked (skips are no failover)
        for name in failed_attempts(attempts, endpoint):
            ep = win.endpoints.get(name)
            if ep is None:
                continue
            ep.failed += count
            if 0 <= i < len(win.minutes):
                ep.failures[i] += count
    win.spend_usd = round(win.spend_usd, 6)
    for ep in win.endpoints.values():
        ep.spend_usd = round(ep.spend_usd, 6)
        ep.spend = [round(v, 6) for v in ep.spend]
    win.recent = [dict(zip(RECENT_FIELDS, row)) for row in rows]
    return win
