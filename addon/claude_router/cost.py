"""Where a conversation's next turn is cheapest, counting its prompt cache.

The rule (pure; prices in USD per million tokens, times in seconds):

- A turn on endpoint E costs its prompt ``P`` (tokens, from the session's last turn), plus
  its output ``O`` (the session's average) at E's output price:
  - E caches and may still hold ``C`` tokens of the conversation (its last turn there was
    within the TTL: the endpoint it is on, or the one it left on its last move):
    ``C x read + (P - C) x write`` (write: 1.25 x input, 2 x for 1-hour caches);
  - E caches but is cold for it: ``P x write``;
  - E does not cache (learned from its usage reports): ``P x input``, every turn.
- Later turns on E cost ``P x read`` if E caches, else ``P x input`` (plus output).
- Over the turns still to come, ``N``, an endpoint's total is its next turn plus ``N - 1``
  later turns. ``N`` is estimated as the turns the session has had so far (a conversation that
  has gone on for k turns tends to go on for about as many), at least 4 for a session that
  asked for caching (Claude Code conversations are long), at most ``horizon`` (the knob,
  ``router_session_horizon``).
- The session goes to the endpoint with the lowest total; it stays where it is unless another
  endpoint's total is lower, i.e. unless the saving over the turns to come exceeds the cost of
  re-writing its prefix there. Ties go to price order.

Endpoints without prices cannot be weighed: then the price order holds unchanged.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from .sessions import LONG_TTL, UNKNOWN, Learned, Session
from .usage import CACHE_READ_FACTOR, CACHE_WRITE_FACTOR, Price

LONG_WRITE_FACTOR = 2.0
MIN_TURNS = 4  # turns still to come assumed for a young conversation that asked for caching


@dataclass(frozen=True)
class Choice:
    endpoint: str
    reason: str  # "" when it is simply the cheapest healthy endpoint


def rates(price: Price, ttl: float) -> tuple[float, float, float]:
    """(input, cache write, cache read) in USD per token."""
    write = (price.input * (LONG_WRITE_FACTOR if ttl >= LONG_TTL else CACHE_WRITE_FACTOR)
             if price.cache_write is None or ttl >= LONG_TTL else price.cache_write)
    read = price.input * CACHE_READ_FACTOR if price.cache_read is None else price.cache_read
    return price.input / 1e6, write / 1e6, read / 1e6


def turns_to_come(session: Session | None, ttl: float, horizon: int) -> int:
    if ttl <= 0:
        return 1  # no caching asked for: each turn stands alone
    seen = session.turns if session is not None else 1
    return min(horizon, max(MIN_TURNS, seen))


def total(price: Price, learned: Learned, cached: int, prompt: int, output: float, ttl: float,
          turns: int) -> float:
    """What ``turns`` turns of this session cost on an endpoint that may hold ``cached`` of its
    ``prompt`` tokens, starting now."""
    inp, write, read = rates(price, ttl)
    out = output * price.output / 1e6
    caches = learned.caches and ttl > 0
    if not caches:
        return turns * (prompt * inp + out)
    cached = min(cached, prompt)
    first = cached * read + (prompt - cached) * write + out
    return first + (turns - 1) * (prompt * read + out)


def choose(candidates: Sequence[tuple[str, Price | None]], learned: dict[str, Learned],
           session: Session | None, prompt: int, output: float, ttl: float, now: float,
           horizon: int) -> Choice | None:
    """The endpoint (among healthy ``candidates``, in price order) for this session's next
    turn; None when they cannot be weighed (an endpoint without a price)."""
    priced = [(name, p) for name, p in candidates if p is not None]
    if not candidates or len(priced) < len(candidates):
        return None
    turns = turns_to_come(session, ttl, horizon)

    def held(name: str) -> int:
        return session.cached_at(name, now) if session is not None else 0

    costs = [(total(p, learned.get(name, UNKNOWN), held(name), prompt, output, ttl, turns), i, name)
             for i, (name, p) in enumerate(priced)]
    best_cost, _, best = min(costs)
    first_cost, _, first = costs[0]
    if best == first:
        return Choice(best, "")
    if held(best):
        reason = f"session cache warm here (saves ${first_cost - best_cost:.4f} over {turns} turns)"
    elif not learned.get(first, UNKNOWN).caches:
        reason = f"{first} does not cache prompts (saves ${first_cost - best_cost:.4f} over {turns} turns)"
    else:
        reason = f"cheaper over {turns} turns (saves ${first_cost - best_cost:.4f})"
    return Choice(best, reason)

