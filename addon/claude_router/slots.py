"""Requests in flight at each endpoint, its ``max_concurrency``, and a request's hold on a slot.

Per process: with ``--workers N`` each worker counts its own requests, so an endpoint sees up
to N x ``max_concurrency`` in all (write the endpoint's limit divided by the workers).

A request holds at most one slot at a time (a `Lease`): taking the next endpoint's slot in
the attempt loop gives back the one before, and the exchange gives back the last one when the
answer ends: at once for a complete answer, when the stream ends or its client goes away for a
streamed one. Giving back is idempotent, so every way a request can end may do it.

When every endpoint a request may use is at its cap, the request waits for the first slot
that frees among them (first come, first served), at most ``QUEUE_WAIT`` seconds (and never
past its deadline); then it is answered 429 ``rate_limit_error`` with a short retry-after,
which Claude Code and the SDKs retry. A freed slot goes to a waiting request before any new
one, so a waiter is never overtaken.
"""

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import tiers
from .endpoints import Endpoint
from .policy import Attempt, Step

QUEUE_WAIT = 30.0  # seconds a request waits for a slot when every endpoint is at its cap
BUSY_RETRY_AFTER = 2  # seconds, in the 429 after that wait


@dataclass(eq=False)
class _Waiter:
    endpoints: Sequence[Endpoint]
    granted: "asyncio.Future[Endpoint]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Slots:
    """The process's in-flight counts per endpoint, its waiting requests, and the tiers'
    round-robin state."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.current: dict[str, float] = {}  # tiers.pick's current weights
        self._waiters: deque[_Waiter] = deque()

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    def free(self, ep: Endpoint) -> bool:
        return ep.max_concurrency is None or self.count(ep.name) < ep.max_concurrency

    def take(self, ep: Endpoint) -> bool:
        """One more request at ``ep``, unless it is at its cap."""
        if not self.free(ep):
            return False
        self.counts[ep.name] = self.count(ep.name) + 1
        return True

    def give_back(self, name: str) -> None:
        n = self.count(name) - 1
        if n > 0:
            self.counts[name] = n
        else:
            self.counts.pop(name, None)
        if self._waiters:
            self._grant()

    def _grant(self) -> None:
        """Freed slots to waiting requests, in the order they came (before any new request:
        this runs as the slot is given back)."""
        for w in list(self._waiters):
            if w.granted.done():  # it is leaving (timed out, or its client went away)
                self._waiters.remove(w)
                continue
            ep = next((ep for ep in w.endpoints if self.free(ep)), None)
            if ep is not None:
                self._waiters.remove(w)
                self.counts[ep.name] = self.count(ep.name) + 1
                w.granted.set_result(ep)

    async def wait(self, endpoints: Sequence[Endpoint], timeout: float) -> Endpoint | None:
        """A slot at the first of ``endpoints`` to free one (taken), or None after ``timeout``."""
        for ep in endpoints:
            if self.take(ep):
                return ep
        waiter = _Waiter(endpoints)
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await waiter.granted
        except TimeoutError:
            pass
        except BaseException:  # cancelled: the client went away
            self._leave(waiter, keep=False)
            raise
        return self._leave(waiter, keep=True)

    def _leave(self, waiter: _Waiter, keep: bool) -> Endpoint | None:
        """A waiter is done: the slot it was granted (even as its wait ended), or given back."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        g = waiter.granted
        if not g.done():
            g.cancel()
            return None
        if g.cancelled():
            return None
        ep = g.result()
        if keep:
            return ep
        self.give_back(ep.name)
        return None

    def lease(self, home: str | None = None, spread: bool = True) -> "Lease":
        return Lease(self, home, spread)


class Lease:
    """One request's hold on at most one endpoint slot, and what it needs to order endpoints:
    its conversation's endpoint (``home``) and whether it is spread by weight."""

    def __init__(self, slots: Slots, home: str | None, spread: bool) -> None:
        self.slots = slots
        self.home = home
        self.spread = spread
        self.holding: str | None = None

    def take(self, ep: Endpoint) -> bool:
        """Hold a slot at ``ep`` (giving back any other); False when it is busy."""
        if self.holding == ep.name:
            return True
        self.release()
        if self.slots.take(ep):
            self.holding = ep.name
            return True
        return False

    def release(self) -> None:
        name, self.holding = self.holding, None
        if name is not None:
            self.slots.give_back(name)

    async def arrange(self, steps: list[Step], keep: str | None, pinned: bool,
                      wait: float) -> list[Step]:
        """The steps in tier order (unless the client pinned an endpoint by path), with a slot
        held for the first when every endpoint was busy; [] when none freed within ``wait``."""
        endpoints = [s.endpoint for s in steps]
        busy = {ep.name for ep in endpoints if not self.slots.free(ep)}
        if not pinned:
            ordered, self.slots.current = tiers.order(endpoints, busy, keep or self.home, self.spread,
                                                      self.slots.current)
            rank = {ep.name: i for i, ep in enumerate(ordered)}
            steps = sorted(steps, key=lambda s: rank[s.endpoint.name])
        if len(busy) < len(steps):
            return steps
        self.release()
        got = await self.slots.wait([s.endpoint for s in steps], wait)
        if got is None:
            return []
        self.holding = got.name
        return [s for s in steps if s.endpoint is got] + [s for s in steps if s.endpoint is not got]


def busy(ep: Endpoint) -> Attempt:
    """The attempt record of an endpoint skipped at its cap (blaming nobody)."""
    return Attempt(ep.name, "busy", f"{ep.max_concurrency} requests in flight (max_concurrency)")
