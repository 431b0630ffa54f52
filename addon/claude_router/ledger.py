"""The durable ledger: one row per request (time, client, hashed session, model, endpoint,
attempts, status, tokens, cost, the routing reason) and spend counters per client and UTC day,
in SQLite from the standard library.

Nothing here runs on the request path but ``add`` and ``spend``, which append to memory. A
background thread writes what came in, in one transaction, every ``FLUSH_EVERY`` seconds (WAL,
``synchronous=NORMAL``: a committed batch survives the process being killed), so a ``kill -9``
loses at most the last second. Spend counters are summed in memory before they are written and
are never dropped; request rows are, beyond ``MAX_PENDING``, if the disk stalls (counted, and
logged once). Rows older than ``days`` are deleted once an hour; spend counters are kept for
at least a month, which the longest budget period needs.

Several processes may share one file (``--workers`` share a confdir): each adds its own spend
to the counters, so a restart reads what all of them spent.
"""

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

log = logging.getLogger("claude_router")

FILENAME = "router-ledger.sqlite3"
FLUSH_EVERY = 0.25  # seconds between batches
MAX_PENDING = 200_000  # request rows held in memory while the disk is slow
PRUNE_EVERY = 3600.0
SPEND_DAYS = 40  # spend counters are kept at least this long (a month's budget reads them all)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    t REAL NOT NULL,            -- when the request came (unix seconds)
    client TEXT NOT NULL,       -- the client's name ('-': a key without one); never a key
    session TEXT,               -- a hash of the conversation's id
    model TEXT,
    endpoint TEXT,              -- the endpoint that answered (NULL: the router did)
    attempts TEXT,
    status INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS requests_t ON requests (t);
CREATE TABLE IF NOT EXISTS spend (
    client TEXT NOT NULL,
    day TEXT NOT NULL,          -- UTC, YYYY-MM-DD
    usd REAL NOT NULL,
    PRIMARY KEY (client, day)
) WITHOUT ROWID;
"""
COLUMNS = ("t", "client", "session", "model", "endpoint", "attempts", "status", "input_tokens",
           "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost_usd", "reason")
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_ADD_SPEND = ("INSERT INTO spend (client, day, usd) VALUES (?, ?, ?) "
              "ON CONFLICT (client, day) DO UPDATE SET usd = usd + excluded.usd")


@dataclass(frozen=True)
class Row:
    t: float
    client: str
    session: str | None
    model: str | None
    endpoint: str | None
    attempts: str
    status: int
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float = 0.0
    reason: str | None = None

    def values(self) -> tuple:
        # Free text from a request (the model id) or built from it is cut short: one client
        # must not fill the ledger's disk (or the queue's memory) with a 4 MB model name.
        return (self.t, self.client, self.session, _cut(self.model, 64), self.endpoint,
                _cut(self.attempts, 512), self.status, self.input_tokens, self.output_tokens,
                self.cache_write_tokens, self.cache_read_tokens, self.cost_usd,
                _cut(self.reason, 128))


def _cut(text: str | None, most: int) -> str | None:
    return text[:most] if text is not None and len(text) > most else text


def day_of(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def connect(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection with the ledger's schema and settings (WAL: readers never block the
    writer, and a committed batch survives a killed process)."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    db.executescript(SCHEMA)
    return db


def spend_since(db: sqlite3.Connection, first_day: str) -> dict[str, dict[str, float]]:
    """Spend per client and UTC day from ``first_day`` on (what budgets read at start-up)."""
    out: dict[str, dict[str, float]] = {}
    for client, day, usd in db.execute("SELECT client, day, usd FROM spend WHERE day >= ?", (first_day,)):
        out.setdefault(client, {})[day] = usd
    return out


def prune(db: sqlite3.Connection, now: float, days: int) -> int:
    """Delete request rows older than ``days`` and spend counters older than that or
    ``SPEND_DAYS``, whichever is longer. Returns the rows deleted."""
    cur = db.execute("DELETE FROM requests WHERE t < ?", (now - days * 86400,))
    db.execute("DELETE FROM spend WHERE day < ?", (day_of(now - max(days, SPEND_DAYS) * 86400),))
    return cur.rowcount


class Ledger:
    """The ledger file and its writer thread. ``add`` and ``spend`` are called on the event loop
    and only append; ``flush`` (the thread) writes; ``close`` writes what is left."""

    def __init__(self, path: str, days: int = 30, clock: Callable[[], float] = time.time,
                 flush_every: float = FLUSH_EVERY, max_pending: int = MAX_PENDING) -> None:
        self.path = path
        self.days = days
        self.clock = clock
        self.flush_every = flush_every
        self._rows: deque[Row] = deque()
        self._max_pending = max_pending
        self._spend: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()  # guards _spend (rows: deque appends are atomic)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0
        self.dropped = 0
        self.written = 0
        self.failures = 0
        self._failing = False
        self._db: sqlite3.Connection | None = None  # opened by the first write (the thread's)

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, opened (the file and its schema created) on first use. Raises
        sqlite3.Error or OSError."""
        if self._db is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._db = connect(self.path)
        return self._db

    # -- the request path (event loop) -------------------------------------------------------

    def add(self, row: Row) -> None:
        if len(self._rows) >= self._max_pending:
            self.dropped += 1
            return
        self._rows.append(row)

    def spend(self, client: str, day: str, usd: float) -> None:
        with self._lock:
            self._spend[(client, day)] = self._spend.get((client, day), 0.0) + usd

    @property
    def pending(self) -> int:
        return len(self._rows)

    # -- start-up ------------------------------------------------------------------------------

    def load_spend(self, now: float | None = None) -> dict[str, dict[str, float]]:
        """What the file holds of the spend budgets read (nothing when there is no file yet:
        none is created)."""
        now = self.clock() if now is None else now
        if self._db is None and not os.path.exists(self.path):
            return {}
        return spend_since(self.db, day_of(now - SPEND_DAYS * 86400))

    # -- the writer thread -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="router-ledger", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every):
            self.flush()
        self.flush()

    def flush(self) -> int:
        """Write every row and spend increment that came in, in one transaction; prune when due.
        Returns the rows written. A failed write is retried with the next batch (the spend
        increments are put back; rows, kept in order, too)."""
        rows: list[Row] = []
        while self._rows and len(rows) < 50_000:
            rows.append(self._rows.popleft())
        with self._lock:
            spend, self._spend = self._spend, {}
        if not rows and not spend and (self._db is None or self.clock() - self._last_prune < PRUNE_EVERY):
            return 0  # (nothing ever written: no file is created just to prune it)
        try:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    db.executemany(_INSERT, [r.values() for r in rows])
                if spend:
                    db.executemany(_ADD_SPEND, [(c, d, usd) for (c, d), usd in spend.items()])
                if self.clock() - self._last_prune >= PRUNE_EVERY:
                    self._last_prune = self.clock()
                    prune(db, self.clock(), self.days)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as e:
            self.failures += 1
            with self._lock:
                for k, usd in spend.items():
                    self._spend[k] = self._spend.get(k, 0.0) + usd
            self._rows.extendleft(reversed(rows))
            if not self._failing:
                self._failing = True
                log.warning(f"router: cannot write the ledger {self.path} ({e}); retrying")
            return 0
        if self._failing:
            self._failing = False
            log.info(f"router: the ledger {self.path} is written again")
        self.written += len(rows)
        return len(rows)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after one last batch (bounded by ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # a stalled disk: the thread still holds the connection
            self._thread = None
        else:
            self.flush()
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
