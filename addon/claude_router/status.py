"""What the router has been doing: per-endpoint counters, the status document, and Prometheus
metrics. Nothing here ever holds a key: only endpoint names, origins and counts."""

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from . import policy
from .endpoints import Endpoint
from .health import HEALTHY, Health, Phase, phase
from .policy import Attempt
from .profiles import FAMILIES
from .sessions import fresh, shown
from .usage import Usage


@dataclass
class EndpointStats:
    served: int = 0  # requests this endpoint answered for the client
    failures: int = 0  # attempts (and streams broken after they started) that counted against it
    last_error: str = ""
    client_stalls: int = 0  # streams that broke after their client stopped reading: not counted
    rewrite_cost: float = 0.0  # USD spent re-writing conversations' prompt caches after moves
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0


class Stats:
    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointStats] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.m_requests = Counter("claude_router_requests", "Client requests answered, by the "
                                  "endpoint that answered and the status", ["endpoint", "status"], registry=r)
        self.m_attempts = Counter("claude_router_attempts", "Upstream attempts by endpoint and outcome",
                                  ["endpoint", "outcome"], registry=r)
        self.m_failovers = Counter("claude_router_failovers", "Requests that needed more than one "
                                   "attempt", registry=r)
        self.m_stream_failures = Counter("claude_router_stream_failures", "Streams that broke after "
                                         "content reached the client, by endpoint and kind",
                                         ["endpoint", "kind"], registry=r)
        self.m_client_stalls = Counter("claude_router_client_stalls", "Streams that broke after "
                                       "their client stopped reading (not counted against the "
                                       "endpoint)", ["endpoint"], registry=r)
        self.m_moves = Counter("claude_router_session_moves", "Conversations that moved to this "
                               "endpoint from another", ["endpoint"], registry=r)
        self.m_rewrite = Counter("claude_router_rewrite_cost_usd", "Estimated USD spent re-writing "
                                 "prompt caches after conversations moved", ["endpoint"], registry=r)
        self.m_trips = Counter("claude_router_cooldown_trips", "Times an endpoint was put in cooldown",
                               ["endpoint"], registry=r)
        self.m_ttfb = Histogram("claude_router_time_to_first_byte_seconds", "From the client's "
                                "request to the upstream's response headers", ["endpoint"], registry=r,
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.m_tokens = Counter("claude_router_tokens", "Tokens by endpoint and kind",
                                ["endpoint", "kind"], registry=r)
        self.m_cost = Counter("claude_router_cost_usd", "Estimated cost in USD by endpoint",
                              ["endpoint"], registry=r)

    def _ep(self, name: str) -> EndpointStats:
        return self.endpoints.setdefault(name, EndpointStats())

    def attempts(self, attempts: Sequence[Attempt], failed: Sequence[bool]) -> None:
        for attempt, counted in zip(attempts, failed):
            self.m_attempts.labels(attempt.endpoint, attempt.outcome).inc()
            if counted:
                ep = self._ep(attempt.endpoint)
                ep.failures += 1
                ep.last_error = attempt.detail or attempt.outcome
        if sum(1 for a in attempts if policy.was_tried(a.outcome)) > 1:  # skips are no failover
            self.m_failovers.inc()

    def midstream(self, name: str, kind: str, detail: str) -> None:
        ep = self._ep(name)
        ep.failures += 1
        ep.last_error = detail
        self.m_stream_failures.labels(name, kind).inc()

    def rewrite(self, name: str, usd: float) -> None:
        """A conversation moved here and re-wrote its prompt cache, costing ``usd``."""
        self._ep(name).rewrite_cost += usd
        self.m_moves.labels(name).inc()
        if usd:
            self.m_rewrite.labels(name).inc(usd)

    def client_stalled(self, name: str) -> None:
        self._ep(name).client_stalls += 1
        self.m_client_stalls.labels(name).inc()

    def trip(self, name: str) -> None:
        self.m_trips.labels(name).inc()

    def answered(self, endpoint: str | None, status: int, ttfb: float | None) -> None:
        label = endpoint or "router"
        self.m_requests.labels(label, str(status)).inc()
        if endpoint:
            self._ep(endpoint).served += 1
            if ttfb is not None:
                self.m_ttfb.labels(endpoint).observe(ttfb)

    def used(self, endpoint: str, usage: Usage, cost: float) -> None:
        ep = self._ep(endpoint)
        ep.usage = ep.usage + usage
        ep.cost += cost
        for kind in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                     "cache_read_input_tokens"):
            if n := getattr(usage, kind):
                self.m_tokens.labels(endpoint, kind).inc(n)
        if cost:
            self.m_cost.labels(endpoint).inc(cost)

    def metrics(self) -> bytes:
        return generate_latest(self.registry)

    def document(self, endpoints: Sequence[Endpoint], view: Mapping[str, Health], now: float,
                 disabled: set[str], store: str, affinity=None) -> dict:
        keys: dict[str, int] = {}  # endpoint -> client keys it is cooling for (issue 19)
        keys_left: dict[str, float] = {}  # endpoint -> the longest of those cooldowns
        for name, h in view.items():
            if "@" in name and phase(h, now) is Phase.COOLING:
                ep_name = name.partition("@")[0]
                keys[ep_name] = keys.get(ep_name, 0) + 1
                keys_left[ep_name] = max(keys_left.get(ep_name, 0.0), round(h.ejected_until - now, 1))
        doc: dict[str, Any] = {
            "store": store,
            "endpoints": [self._endpoint_doc(ep, view, now, ep.name in disabled)
                          | {"cooling_for_keys": keys.get(ep.name, 0),
                             "keys_cooldown_seconds_left": keys_left.get(ep.name, 0)}
                          for ep in endpoints],
        }
        if affinity is not None:
            pinned = affinity.pinned()
            learned = fresh(affinity.learned, now)  # an expired fact is unknown again
            for e in doc["endpoints"]:
                name = e["name"]
                t = e["tokens"]
                prompt = t["input_tokens"] + t["cache_creation_input_tokens"] + t["cache_read_input_tokens"]
                lr = learned.get(name)
                e["sessions_pinned"] = pinned.get(name, 0)
                e["caches"] = "unknown" if lr is None or not lr.expected else lr.caches
                e["cache_read_ratio"] = round(t["cache_read_input_tokens"] / prompt, 3) if prompt else None
                e["rewrite_cost_usd"] = round(self.endpoints.get(name, EndpointStats()).rewrite_cost, 6)
            doc["sessions"] = {
                "count": len(affinity),
                # Hashed ids only (sessions.shown): any client key may read this page.
                "recent": [{**shown(key), "endpoint": sess.endpoint, "turns": sess.turns,
                            "prompt_tokens": sess.prompt_tokens, "warm": sess.warm(now),
                            "moved_from": sess.moved_from, "why": sess.why}
                           for key, sess in affinity.recent(20)],
            }
        return doc

    def _endpoint_doc(self, ep: Endpoint, view: Mapping[str, Health], now: float, disabled: bool) -> dict:
        h = view.get(ep.name, HEALTHY)
        p = phase(h, now)
        st = self.endpoints.get(ep.name, EndpointStats())
        doc = {
            "name": ep.name,
            "index": ep.index,
            "origin": ep.origin,
            "has_key": ep.key is not None,
            "state": "disabled" if disabled else p.value,
            "models": list(ep.profile.models) or ["*"],
            "consecutive_failures": h.failures,
            "ejections": h.ejections,
            "cooldown_seconds_left": round(max(0.0, h.ejected_until - now), 1) if p is Phase.COOLING else 0,
            "served": st.served,
            "failures": st.failures,
            "last_error": st.last_error,
            "client_stalls": st.client_stalls,
            "tokens": {k: getattr(st.usage, k) for k in ("input_tokens", "output_tokens",
                       "cache_creation_input_tokens", "cache_read_input_tokens")},
            "cost_usd": round(st.cost, 6),
            "weight": ep.weight,
            "max_concurrency": ep.max_concurrency,
        }
        families = {}
        for fam in FAMILIES:  # a family's rate limit cools that family only
            fh = view.get(f"{ep.name}~{fam}")
            if fh is not None and (fp := phase(fh, now)) is Phase.COOLING:
                families[fam] = {"state": fp.value,
                                 "cooldown_seconds_left": round(max(0.0, fh.ejected_until - now), 1)}
        if families:
            doc["families"] = families
        return doc


# What each column of the table means (printed under it, and in the README's status section).
LEGEND = (
    ("#", "position in price order: 0 is the cheapest, tried first"),
    ("state", "healthy; failing (recent failures, still used); cooling (not used until its "
              "cooldown ends); half_open / probing (one request tests it); partly cooling (used, "
              "but not for what \"cooling for\" lists); disabled (taken out by a command)"),
    ("fails", "consecutive failures now (at router_max_failures the endpoint cools)"),
    ("cooldown", "time left of the whole endpoint's cooldown"),
    ("cooling for", "model families cooling at this endpoint (a family's rate limit: e.g. "
                    "\"opus 28s\"), and how many client keys it is cooling for (a key it refused "
                    "or rate-limited; the keys themselves are never shown)"),
    ("served", "requests it answered since the router started (summed over several --url)"),
    ("failures", "attempts and broken streams counted against it"),
    ("in/out tokens", "input / output tokens it served"),
    ("cost $", "estimated cost at its configured price"),
    ("balance $", "USD left at the relay as its panel last said (balance:), \"low\" when below "
                  "min_usd (skipped without blame), \"?\" when the panel could not be read"),
    ("last error", "the latest failure counted against it, in full"),
)


def cooling_for(e: dict) -> str:
    """What an endpoint cools for short of the whole endpoint: families and client keys."""
    parts = [f"{fam} {f.get('cooldown_seconds_left', 0):g}s"
             for fam, f in sorted((e.get("families") or {}).items()) if f.get("state") == "cooling"]
    n = e.get("cooling_for_keys") or 0
    if n:
        left = e.get("keys_cooldown_seconds_left") or 0
        parts.append(f"{n} client key{'s' if n != 1 else ''}" + (f" (up to {left:g}s)" if left else ""))
    return ", ".join(parts)


def balance_of(e: dict) -> str:
    """An endpoint's balance cell: USD left, "low" below its min_usd, "?" when unreadable."""
    usd = e.get("balance_usd")
    text = ("no limit" if e.get("balance_unlimited") else f"{usd:,.2f}" if isinstance(usd, (int, float))
            else "")
    if e.get("balance_low"):
        text += " low"
    if e.get("balance_error"):
        text += " ?" if text else "?"
    return text


def state_of(e: dict) -> str:
    """The endpoint's state as the table shows it: an endpoint that is usable for some requests
    only (a family or a client key cooling) is "partly cooling", never plain healthy."""
    state = e["state"]
    if state in ("healthy", "failing") and cooling_for(e):
        return "partly cooling"
    return state


def table(doc: dict, width: int = 120, legend: bool = True) -> str:
    """The status document as a terminal table (for the `router.status` command and
    scripts/status). The last error is wrapped to fit ``width``, never cut."""
    head = ("#", "endpoint", "state", "fails", "cooldown", "cooling for", "served", "failures",
            "in/out tokens", "cost $", "balance $", "last error")
    rows = [head]
    errors = [""]
    for e in doc["endpoints"]:
        t = e.get("tokens") or {}
        cost = e.get("cost_usd")
        rows.append((str(e.get("index", "")), e["name"], state_of(e), str(e.get("consecutive_failures", "")),
                     f"{e['cooldown_seconds_left']:g}s" if e.get("cooldown_seconds_left") else "",
                     cooling_for(e), str(e.get("served", "-")), str(e.get("failures", "-")),
                     f"{t.get('input_tokens', '-')}/{t.get('output_tokens', '-')}",
                     f"{cost:.4f}" if isinstance(cost, (int, float)) else "-", balance_of(e), ""))
        errors.append(" ".join(str(e.get("last_error") or "").split()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    indent = sum(widths) + 2 * len(widths)
    room = max(30, width - indent - 1)
    lines = []
    for r, err in zip(rows, errors):
        wrapped = [head[-1]] if r is head else _wrap(err, room) or [""]
        cells = "  ".join(c.ljust(w) for c, w in zip(r, widths))
        lines.append(f"{cells}  {wrapped[0]}".rstrip())
        lines += [" " * indent + more for more in wrapped[1:]]
    out = [f"health store: {doc['store']}", *lines, *_clients_table(doc.get("clients"))]
    if legend and doc["endpoints"]:
        pad = max(len(name) for name, _ in LEGEND)
        out += ["", "Columns of the endpoint table:"]
        for name, what in LEGEND:
            text = _wrap(what, max(40, width - pad - 4))
            out.append(f"  {name.ljust(pad)}  {text[0]}")
            out += [" " * (pad + 4) + more for more in text[1:]]
    return "\n".join(out)


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters holding every character of ``text`` (words longer
    than a line are split, nothing is dropped)."""
    return textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)


def _money(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _clients_table(clients: list[dict] | None) -> list[str]:
    """Named clients (issue 21): spend this period against the budget, and what is in flight."""
    if not clients:
        return []
    rows = [("client", "period", "spent $", "budget $", "left $", "resets (UTC)", "in flight",
             "requests", "refused")]
    for c in clients:
        rows.append((c["client"] or "-", c["period"], _money(c["spent_usd"]), _money(c["budget_usd"]),
                     _money(c["remaining_usd"]), c["resets_at"].replace("T", " ").rstrip("Z"),
                     str(c["in_flight"]), str(c["requests"]),
                     ", ".join(f"{k}:{v}" for k, v in sorted(c["refused"].items()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)]
