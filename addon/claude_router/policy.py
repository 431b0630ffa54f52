"""Routing decisions: which endpoints to try, what an outcome means, how long to back off.

Pure functions over data; the router applies them.
"""

import email.utils
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from .endpoints import Endpoint
from .health import HEALTHY, Health, Phase, phase

# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    endpoint: Endpoint
    probe: bool  # half-open: the request must win the probe before it may use the endpoint


def plan(endpoints: Sequence[Endpoint], view: Mapping[str, Health], now: float) -> list[Step]:
    """Endpoints to try, cheapest first, skipping those cooling down or being probed."""
    steps = []
    for ep in endpoints:
        p = phase(view.get(ep.name, HEALTHY), now)
        if p in (Phase.HEALTHY, Phase.FAILING):
            steps.append(Step(ep, probe=False))
        elif p is Phase.HALF_OPEN:
            steps.append(Step(ep, probe=True))
    return steps


def pinned_order(endpoints: Sequence[Endpoint], name: str) -> list[Endpoint]:
    """A tier chosen by path: that endpoint first, then the pricier ones in order, then round
    to the cheaper ones (the original's ``/claude/<tier>/...``)."""
    names = [ep.name for ep in endpoints]
    if name not in names:
        return list(endpoints)
    i = names.index(name)
    return list(endpoints[i:]) + list(endpoints[:i])


def family_subject(endpoint: str, family: str) -> str:
    """The health entry of one model family at one endpoint (rate limits are per family)."""
    return f"{endpoint}~{family}"


def credential_subject(endpoint: str, credential: str) -> str:
    """The health entry of one client credential (its keyed hash) at one endpoint: a refused
    key or a rate-limited key cools that endpoint for that key only."""
    return f"{endpoint}@{credential}"


def is_credential_subject(name: str) -> bool:
    return "@" in name


def health_subjects(names: Iterable[str]) -> list[str]:
    """Every health entry a store keeps for these endpoints: each, and each of its families."""
    from .profiles import FAMILIES
    return [s for n in names for s in (n, *(family_subject(n, f) for f in FAMILIES))]


def with_family(view: Mapping[str, Health], names: Iterable[str], family: str,
                now: float) -> Mapping[str, Health]:
    """The health to plan with for a request of ``family``: an endpoint whose family is
    cooling longer than the endpoint itself is cooling for this request."""
    return with_scope(view, names, lambda name: family_subject(name, family), now)


def with_credential(view: Mapping[str, Health], names: Iterable[str], credential: str,
                    now: float) -> Mapping[str, Health]:
    """The same for the client's credential: an endpoint cooling for this key is cooling for
    this request, and for no other key's."""
    return with_scope(view, names, lambda name: credential_subject(name, credential), now)


def with_scope(view: Mapping[str, Health], names: Iterable[str], subject: Callable[[str], str],
               now: float) -> Mapping[str, Health]:
    """``view`` with each endpoint whose scoped entry (``subject(name)``) cools longer than the
    endpoint itself shown as cooling until then; ``view`` itself when none does."""
    merged = None
    for name in names:
        fam = view.get(subject(name))
        if fam is None or phase(fam, now) is not Phase.COOLING:
            continue
        own = view.get(name, HEALTHY)
        if fam.ejected_until > own.ejected_until:
            merged = dict(view) if merged is None else merged
            merged[name] = Health(failures=own.failures, ejections=max(own.ejections, 1),
                                  ejected_until=fam.ejected_until, probe_until=own.probe_until)
    return view if merged is None else merged


def fallback(endpoints: Sequence[Endpoint]) -> list[Step]:
    """When nothing is usable and the operator asked for it: every endpoint, in price order."""
    return [Step(ep, probe=False) for ep in endpoints]


def seconds_until_usable(endpoints: Sequence[Endpoint], view: Mapping[str, Health], now: float) -> float:
    """How long until the first endpoint can be tried again (0 if one can be now)."""
    waits = []
    for ep in endpoints:
        h = view.get(ep.name, HEALTHY)
        p = phase(h, now)
        if p is Phase.COOLING:
            waits.append(h.ejected_until - now)
        elif p is Phase.PROBING:
            waits.append(h.probe_until - now)
        else:
            return 0.0
    return max(0.0, min(waits, default=0.0))


def retry_after_value(wait: float, cap: int = 60) -> str:
    """A Retry-After the clients honour: whole seconds, at least 1, at most ``cap``
    (Claude Code gives up at once on more than 60)."""
    return str(min(cap, max(1, math.ceil(wait))))


# -- what an outcome means -------------------------------------------------------------------


class Verdict(str, Enum):
    COUNT = "count"  # this endpoint is bad: count a failure, try the next one
    SKIP = "skip"  # try the next one without blaming this one
    CLIENT = "client"  # the request is bad: no blame; return it once a second endpoint agrees
    RETURN = "return"  # hand it to the client now, no blame
    KEY = "key"  # the client's own key was refused or limited here: try the next endpoint,
    # cooling this endpoint for that key only (never for other keys)


# Keys: "NNN:error_type", "NNN", "type:error_type", "Nxx", or a transport failure kind.
# More specific keys win, in that order. Statuses below 300 are successes; a 3xx is the
# failure kind "redirect" (never handed to a client: it would re-send the key elsewhere).
DEFAULT_RULES: dict[str, Verdict] = {
    "400:invalid_request_error": Verdict.CLIENT,
    "401": Verdict.COUNT,
    "402": Verdict.COUNT,
    "403:permission_error": Verdict.SKIP,  # this relay's token may not use that model: next one
    "403": Verdict.COUNT,
    "408": Verdict.COUNT,
    "429": Verdict.COUNT,
    "type:invalid_request_error": Verdict.CLIENT,
    "type:not_found_error": Verdict.CLIENT,
    "type:request_too_large": Verdict.CLIENT,
    "type:overloaded_error": Verdict.COUNT,
    "type:api_error": Verdict.COUNT,
    "type:rate_limit_error": Verdict.COUNT,
    "type:authentication_error": Verdict.COUNT,
    "type:permission_error": Verdict.COUNT,
    "type:billing_error": Verdict.COUNT,
    "4xx": Verdict.CLIENT,
    "5xx": Verdict.COUNT,
    # An endpoint without credentials of its own receives the client's: its credential and
    # quota answers are about that key at that endpoint. The request fails over (another
    # channel may accept the key or have quota left); only (endpoint, key) cools.
    "client-key:401": Verdict.KEY,
    "client-key:402": Verdict.KEY,
    "client-key:403": Verdict.KEY,
    "client-key:429": Verdict.KEY,
}
TRANSPORT_KINDS = ("refused", "reset", "timeout", "tls", "dns", "connect", "bad_response",
                   "error", "empty_stream", "stream_error", "redirect")
# Every failure to get a usable answer is the endpoint's; a kind not listed here blames nobody.
DEFAULT_RULES.update({kind: Verdict.COUNT for kind in TRANSPORT_KINDS})


def parse_rule(spec: str) -> tuple[str, Verdict]:
    """Parse ``KEY=ACTION`` (e.g. ``404=count``, ``400:invalid_request_error=client``)."""
    key, sep, action = spec.partition("=")
    key, action = key.strip().lower(), action.strip().lower()
    if not sep:
        raise ValueError("expected KEY=ACTION, for example 404=count")
    try:
        verdict = Verdict(action)
    except ValueError:
        raise ValueError(f"action {action!r} is not one of count, skip, client, return, key") from None
    status, _, etype = key.partition(":")
    if verdict is Verdict.KEY and not key.startswith("client-key:"):
        raise ValueError("action key is only for client-key:STATUS rules (answers about the "
                         "client's own key)")
    if key.startswith("type:") and etype:
        return key, verdict
    if key.startswith("client-key:") and len(etype) == 3 and etype.isdigit():
        return key, verdict
    if key in TRANSPORT_KINDS:
        return key, verdict
    if len(status) == 3 and (status.isdigit() or (status[0] in "45" and status[1:] == "xx")):
        if status.isdigit() and not 400 <= int(status) <= 599:
            raise ValueError(f"{status}: only 4xx and 5xx answers can be failures")
        return key, verdict
    raise ValueError(f"key {key!r} is not a status (429), a class (5xx), STATUS:error_type, "
                     f"type:error_type, client-key:STATUS or one of {', '.join(TRANSPORT_KINDS)}")


def parse_rules(specs: Iterable[str]) -> dict[str, Verdict]:
    rules = dict(DEFAULT_RULES)
    for spec in specs:
        key, verdict = parse_rule(spec)
        rules[key] = verdict
    return rules


def classify(rules: Mapping[str, Verdict], status: int | None = None,
             error_type: str | None = None, transport: str | None = None,
             own_credentials: bool = True) -> Verdict:
    """What an upstream outcome means, by the most specific rule that matches.

    ``own_credentials`` is False for an endpoint that received the client's credentials:
    its ``client-key:STATUS`` rules come first. A transport kind no rule names blames nobody.
    """
    if transport is not None:
        return rules.get(transport, Verdict.SKIP)
    assert status is not None and status >= 400
    if not own_credentials and (v := rules.get(f"client-key:{status}")) is not None:
        return v
    keys = [str(status), f"{status // 100}xx"]
    if error_type:
        # A 4xx's error type says whose fault it is; a 5xx is the endpoint's whatever it says.
        keys[:0] = [f"{status}:{error_type}"]
        if status < 500:
            keys.insert(2, f"type:{error_type}")
    for key in keys:
        if key in rules:
            return rules[key]
    return Verdict.COUNT


def error_of(body: bytes) -> tuple[str | None, str]:
    """The Anthropic ``error.type`` and ``error.message`` of an error body (None, "" if absent)."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None, ""
    if not isinstance(err, dict):
        return None, ""
    etype, message = err.get("type"), err.get("message")
    return (etype if isinstance(etype, str) else None), (message[:500] if isinstance(message, str) else "")


_UNKNOWN_MODEL = ("not found", "not_found", "does not exist", "unknown model", "invalid model",
                  "model_not_found", "not supported", "unsupported model", "no such model")


def names_unknown_model(status: int, error_type: str | None, message: str, model: str | None) -> bool:
    """A 404 ``not_found_error`` or a 400 that says the requested model is not available here."""
    if status not in (400, 404):
        return False
    text = message.lower()
    if "model" not in text and not (model and model.lower() in text):
        return False
    if status == 404 and error_type in (None, "not_found_error"):
        return True
    # A 400 must name the model it was asked for, and say it is unknown here.
    if not model:
        return False
    return model.lower() in text and any(p in text for p in _UNKNOWN_MODEL)


# -- back-off hints from the upstream --------------------------------------------------------


def cooldown_hint(headers: Mapping[str, str], now: float) -> float:
    """Seconds the upstream asked us to stay away (Retry-After, retry-after-ms, or the reset
    time of an exhausted Anthropic rate limit); 0 when it did not say."""
    hints = [0.0]
    if (ms := headers.get("retry-after-ms")) is not None:
        hints.append(_number(ms) / 1000)
    if (ra := headers.get("retry-after")) is not None:
        hints.append(_retry_after(ra, now))
    unified = headers.get("anthropic-ratelimit-unified-reset")
    if unified is not None and headers.get("anthropic-ratelimit-unified-status", "").lower() == "rejected":
        # Subscription-backed relays: when the 5-hour window reopens (epoch seconds or RFC 3339).
        hints.append((_number(unified) if unified.strip().isdigit() else _rfc3339(unified)) - now)
    for name, value in headers.items():
        if name == "anthropic-ratelimit-unified-reset":
            continue
        if name.startswith("anthropic-ratelimit-") and name.endswith("-reset"):
            remaining = headers.get(name[: -len("reset")] + "remaining")
            if remaining is not None and _number(remaining) <= 0:
                hints.append(_rfc3339(value) - now)
    return max(hints)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def _retry_after(value: str, now: float) -> float:
    if value.strip().replace(".", "", 1).isdigit():
        return _number(value)
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return 0.0


def _rfc3339(value: str) -> float:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# -- what happened, for headers, logs and error bodies ---------------------------------------


@dataclass(frozen=True)
class Attempt:
    endpoint: str
    outcome: str  # a status code ("529") or a failure kind ("refused", "timeout", ...)
    detail: str = ""  # human words for error bodies and logs; never carries secrets

    def __str__(self) -> str:
        return f"{self.endpoint}:{self.outcome}"


def attempts_header(attempts: Iterable[Attempt]) -> str:
    return ", ".join(str(a) for a in attempts)


# Attempt outcomes that sent nothing to another endpoint: one skipped without blame (at its
# max_concurrency, low on balance, not serving the model) or the same endpoint asked again
# (without another endpoint's thinking signatures). Not failovers, not failures.
NOT_TRIED = frozenset({"busy", "low_balance", "thinking_signature", "skipped:model"})


def was_tried(outcome: str) -> bool:
    """Did this attempt send the request to its endpoint (a failover when another follows)?"""
    return outcome not in NOT_TRIED and not outcome.startswith("skipped")


def all_failed_message(attempts: Sequence[Attempt]) -> str:
    if not attempts:
        return "no endpoint was tried"
    parts = "; ".join(f"{a.endpoint}: {a.detail or a.outcome}" for a in attempts)
    return f"every endpoint failed ({parts})"
