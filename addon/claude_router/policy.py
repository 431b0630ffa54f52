"""Routing decisions: which endpoints to try, in what order, and what an outcome means.

Pure functions over data; the router applies them.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .endpoints import Endpoint
from .health import HEALTHY, Health, Phase, phase


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


def fallback(endpoints: Sequence[Endpoint]) -> list[Step]:
    """When nothing is usable, every endpoint in price order, as the original did."""
    return [Step(ep, probe=False) for ep in endpoints]


def is_failure(status: int) -> bool:
    """An answer that sends the request on to the next endpoint and counts against this one."""
    return status >= 400


@dataclass(frozen=True)
class Attempt:
    endpoint: str
    outcome: str  # a status code ("529") or a transport failure ("refused", "timeout", ...)
    detail: str = ""  # human words for error bodies and logs; never carries secrets

    def __str__(self) -> str:
        return f"{self.endpoint}:{self.outcome}"


def attempts_header(attempts: Iterable[Attempt]) -> str:
    return ", ".join(str(a) for a in attempts)


def all_failed_message(attempts: Sequence[Attempt]) -> str:
    if not attempts:
        return "no endpoint was tried"
    parts = "; ".join(f"{a.endpoint}: {a.detail or a.outcome}" for a in attempts)
    return f"every endpoint failed ({parts})"
