"""What each client has spent and is doing: spend per UTC day, the last minute's requests,
requests in flight, refusals, and tokens and cost by day, endpoint and model. Kept by client
name (``clients.UNNAMED`` for keys without one), not by config entry, so a live reload keeps
every counter; the decisions themselves are ``clients.decide``.

Spend per day is the one figure budgets read. It is this process's own (plus what the ledger
held at start-up) and, with Redis, the total every worker shared there: the larger of the two
counts, so a Redis that restarts empty never forgives what this process knows was spent.
"""

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge

from . import clients
from .clients import Client, Refusal
from .usage import FIELDS, Usage

KEEP_DAYS = 40  # spend per day kept in memory: every day of the longest period (a month), and some
MAX_KINDS = 200  # (endpoint, model) pairs tallied per client and day; more go under "other"
MODEL_CHARS = 64


@dataclass
class Tally:
    requests: int = 0
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0


@dataclass
class Account:
    spend: dict[str, float] = field(default_factory=dict)  # UTC day -> USD (this process's view)
    shared: dict[str, float] = field(default_factory=dict)  # UTC day -> USD last read from Redis
    pending: dict[str, float] = field(default_factory=dict)  # spent here, not yet added in Redis
    recent: deque = field(default_factory=deque)  # when admitted requests came (last 60 s)
    in_flight: int = 0
    requests: int = 0
    refused: Counter = field(default_factory=Counter)
    tallies: dict[tuple[str, str, str], Tally] = field(default_factory=dict)  # (day, endpoint, model)

    def day_spend(self, d: str) -> float:
        own = self.spend.get(d, 0.0)
        if d in self.shared:
            return max(own, self.shared[d] + self.pending.get(d, 0.0))
        return own


class Accounts:
    def __init__(self, clock: Callable[[], float], registry: CollectorRegistry | None = None) -> None:
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        r = registry or CollectorRegistry()
        self.m_requests = PromCounter("claude_router_client_requests", "Requests admitted, by client "
                                      "(configured names; - for keys without one)", ["client"], registry=r)
        self.m_refused = PromCounter("claude_router_client_refused", "Requests refused 429 by a "
                                     "client's limit, by client and limit (budget, rpm, concurrency)",
                                     ["client", "reason"], registry=r)
        self.m_cost = PromCounter("claude_router_client_cost_usd", "Estimated cost in USD by client",
                                  ["client"], registry=r)
        self.m_tokens = PromCounter("claude_router_client_tokens", "Tokens by client and kind",
                                    ["client", "kind"], registry=r)
        self.m_in_flight = Gauge("claude_router_client_in_flight", "Requests in flight by client",
                                 ["client"], registry=r)
        self.on_spend: Callable[[str, str, float], None] | None = None  # (client, day, usd): Redis
        self._children: dict[str, tuple] = {}

    def get(self, label: str) -> Account:
        acct = self.accounts.get(label)
        if acct is None:
            acct = self.accounts[label] = Account()
        return acct

    # -- the request path ----------------------------------------------------------------

    def spent(self, client: Client, now: float, per: str | None = None) -> float:
        per = per or (client.budget.per if client.budget else "day")
        acct = self.accounts.get(client.label)
        if acct is None:
            return 0.0
        return sum(acct.day_spend(d) for d in clients._days_of(per, int(now // 86400)))

    def admit(self, client: Client, now: float | None = None) -> Refusal | None:
        """Count the request in, or say why it may not go (nothing is counted then but the
        refusal)."""
        now = self.clock() if now is None else now
        acct = self.get(client.label)
        if client.limited:
            recent = acct.recent
            while recent and recent[0] <= now - 60:
                recent.popleft()
            refusal = clients.decide(client, now, self.spent(client, now) if client.budget else 0.0,
                                     recent, acct.in_flight)
            if refusal is not None:
                acct.refused[refusal.reason] += 1
                self.m_refused.labels(client.label, refusal.reason).inc()
                return refusal
            if client.rpm is not None:
                recent.append(now)
                while len(recent) > client.rpm:  # only the last rpm are ever read
                    recent.popleft()
        acct.in_flight += 1
        acct.requests += 1
        m = self._metrics(client.label)
        m[0].inc()
        m[1].inc()
        return None

    def release(self, label: str) -> None:
        acct = self.accounts.get(label)
        if acct is not None and acct.in_flight > 0:
            acct.in_flight -= 1
            self._metrics(label)[1].dec()

    def _metrics(self, label: str) -> tuple:
        """A client's metric children, resolved once (labels() takes a lock and a lookup)."""
        m = self._children.get(label)
        if m is None:
            m = self._children[label] = (
                self.m_requests.labels(label), self.m_in_flight.labels(label), self.m_cost.labels(label),
                {kind: self.m_tokens.labels(label, kind) for kind in FIELDS})
        return m

    def record(self, label: str, now: float, endpoint: str, model: str | None, u: Usage,
               usd: float) -> None:
        """An answered request's tokens and cost, by day, endpoint and model."""
        acct = self.get(label)
        d = clients.day(now)
        model = (model or "")[:MODEL_CHARS]
        key = (d, endpoint, model)
        tally = acct.tallies.get(key)
        if tally is None:
            if sum(1 for k in acct.tallies if k[0] == d) >= MAX_KINDS:
                key = (d, endpoint, "other")
                tally = acct.tallies.get(key)
            if tally is None:
                tally = acct.tallies[key] = Tally()
                self._prune(acct, now)
        tally.requests += 1
        tally.usage = tally.usage + u
        tally.cost += usd
        m = self._metrics(label)
        for kind, child in m[3].items():
            if n := getattr(u, kind):
                child.inc(n)
        if usd:
            acct.spend[d] = acct.spend.get(d, 0.0) + usd
            m[2].inc(usd)
            if self.on_spend is not None:
                self.on_spend(label, d, usd)

    def _prune(self, acct: Account, now: float) -> None:
        oldest = clients.day(now - KEEP_DAYS * 86400)
        for k in [k for k in acct.tallies if k[0] < oldest]:
            del acct.tallies[k]
        for book in (acct.spend, acct.shared, acct.pending):
            for d in [d for d in book if d < oldest]:
                del book[d]

    # -- what it shows -------------------------------------------------------------------------

    def figures(self, client: Client, now: float | None = None) -> dict:
        """One client's own figures (its /_router/usage page): spend this period, the budget,
        what remains, when the period resets, requests in flight."""
        now = self.clock() if now is None else now
        acct = self.accounts.get(client.label) or Account()
        b = client.budget
        per = b.per if b else "day"
        spent = self.spent(client, now, per)
        doc = {
            "client": client.name,
            "period": per,
            "period_start": clients.iso(clients.period_start(per, now)),
            "resets_at": clients.iso(clients.period_end(per, now)),
            "spent_usd": round(spent, 6),
            "budget_usd": b.usd if b else None,
            "remaining_usd": round(max(0.0, b.usd - spent), 6) if b else None,
            "in_flight": acct.in_flight,
            "rpm": client.rpm,
            "requests_last_minute": sum(1 for t in acct.recent if t > now - 60),
            "max_concurrency": client.max_concurrency,
            "endpoints": list(client.endpoints) if client.endpoints is not None else None,
            "requests": acct.requests,
            "refused": dict(acct.refused),
        }
        today = clients.day(now)
        by_endpoint: dict[str, dict] = {}
        by_model: dict[str, dict] = {}
        days = set(clients.days_of(per, now))
        for (d, ep, model), t in acct.tallies.items():
            if d not in days:
                continue
            for book, k in ((by_endpoint, ep), (by_model, model or "?")):
                row = book.setdefault(k, {"requests": 0, "cost_usd": 0.0,
                                          **{f: 0 for f in FIELDS}})
                row["requests"] += t.requests
                row["cost_usd"] = round(row["cost_usd"] + t.cost, 6)
                for f in FIELDS:
                    row[f] += getattr(t.usage, f)
        doc["by_endpoint"] = by_endpoint
        doc["by_model"] = by_model
        doc["by_day"] = {d: round(acct.day_spend(d), 6) for d in sorted(days) if acct.day_spend(d)}
        doc["today_usd"] = round(acct.day_spend(today), 6)
        return doc

    def document(self, configured: Sequence[Client], now: float | None = None) -> list[dict]:
        """Every client's figures, for admins: the configured ones in order, then any name seen
        before a reload removed it (its counters are kept), then the unnamed keys'."""
        now = self.clock() if now is None else now
        seen = {c.label for c in configured}
        shown = [c for c in configured if c.name is not None]
        shown += [Client(label) for label in self.accounts if label not in seen and label != clients.UNNAMED]
        if clients.UNNAMED in self.accounts or any(c.name is None for c in configured):
            shown.append(clients.ANONYMOUS)
        return [self.figures(c, now) for c in shown]

    def labels(self) -> Iterable[str]:
        return self.accounts.keys()
