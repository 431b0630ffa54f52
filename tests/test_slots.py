"""Requests in flight per endpoint: a cap that is never exceeded, a bounded first-come wait when
every endpoint is at its cap, slots that always come back (a lease gives back its slot once,
however the request ends), and the routing loop skipping a busy endpoint without blame."""

import asyncio

from claude_router import slots as slots_mod
from claude_router.endpoints import Endpoint
from claude_router.health import Breaker, MemoryHealthStore
from claude_router.policy import Step
from claude_router.routing import Request, Routing, Settings
from claude_router.slots import Slots
from claude_router.usage import Price

PRICE = Price(input=1.0, output=5.0)


def ep(name: str, cap: int | None = None, weight: float = 1.0) -> Endpoint:
    return Endpoint(name, f"http://relay.example/{name}", price=PRICE, weight=weight, max_concurrency=cap)


def test_take_stops_at_the_cap_and_give_back_frees_a_slot():
    s, a = Slots(), ep("a", cap=2)
    assert s.take(a) and s.take(a) and not s.take(a)
    s.give_back("a")
    assert s.count("a") == 1 and s.take(a)


def test_no_cap_means_no_limit():
    s, a = Slots(), ep("a")
    assert all(s.take(a) for _ in range(100))
    assert s.count("a") == 100


def test_a_lease_holds_one_slot_at_a_time_and_gives_it_back_once():
    s = Slots()
    a, b = ep("a", cap=1), ep("b", cap=1)
    lease = s.lease()
    assert lease.take(a) and s.count("a") == 1
    assert lease.take(a)  # already held: no second slot
    assert lease.take(b) and (s.count("a"), s.count("b")) == (0, 1)  # failing over gives back a
    lease.release()
    lease.release()
    assert s.counts == {}


async def test_a_waiter_gets_the_first_slot_freed_before_any_new_request():
    s = Slots()
    a, b = ep("a", cap=1), ep("b", cap=1)
    assert s.take(a) and s.take(b)
    waiting = asyncio.ensure_future(s.wait([a, b], 10))
    await asyncio.sleep(0)
    s.give_back("b")
    assert not s.take(b)  # the freed slot went to the waiter, not to this newcomer
    assert await waiting is b
    assert s.counts == {"a": 1, "b": 1}


async def test_waiters_are_served_in_the_order_they_came():
    s = Slots()
    a = ep("a", cap=1)
    assert s.take(a)
    first = asyncio.ensure_future(s.wait([a], 10))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(s.wait([a], 10))
    await asyncio.sleep(0)
    s.give_back("a")
    assert await first is a and not second.done()
    s.give_back("a")
    assert await second is a


async def test_a_wait_is_bounded_and_leaves_nothing_behind():
    s = Slots()
    a = ep("a", cap=1)
    assert s.take(a)
    assert await s.wait([a], 0.01) is None
    s.give_back("a")
    assert s.counts == {}


async def test_a_cancelled_waiter_gives_back_a_slot_granted_as_it_left():
    s = Slots()
    a = ep("a", cap=1)
    assert s.take(a)
    waiting = asyncio.ensure_future(s.wait([a], 10))
    await asyncio.sleep(0)
    s.give_back("a")  # granted to the waiter ...
    waiting.cancel()  # ... whose client leaves before it runs
    await asyncio.gather(waiting, return_exceptions=True)
    assert s.counts == {}


async def test_arrange_waits_for_a_slot_when_every_endpoint_is_busy():
    s = Slots()
    a = ep("a", cap=1)
    lease = s.lease()
    assert s.take(a)
    steps = [Step(a, probe=False)]
    arranging = asyncio.ensure_future(lease.arrange(steps, None, False, 10))
    await asyncio.sleep(0)
    assert not arranging.done()
    s.give_back("a")
    assert await arranging == steps and lease.holding == "a"
    assert await s.lease().arrange(steps, None, False, 0.01) == []  # still held: none within the wait


# -- through the attempt loop, with a fake upstream ----------------------------------------------

class Held:
    """An upstream whose answers wait until released: requests stay in flight at will."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[str] = []

    async def send(self, ep, method, path, headers, body, timeouts):
        from claude_router.upstream import UpstreamError
        self.sent.append(ep.name)
        await self.gate.wait()
        raise UpstreamError("refused", "connection refused")


async def test_a_busy_endpoint_is_skipped_without_blame_and_its_slot_comes_back():
    upstream = Held()
    routing = Routing(upstream, clock=lambda: 1000.0)  # type: ignore[arg-type]
    store = MemoryHealthStore(Breaker(), clock=lambda: 1000.0)
    s = Slots()
    a, b = ep("a", cap=1), ep("b", cap=1)
    req = Request("POST", "/v1/messages", [], b'{"model":"claude-sonnet-4-5"}')
    first = asyncio.ensure_future(routing.route([a, b], store, Settings(), req, lease=(la := s.lease(spread=False))))
    while not upstream.sent:
        await asyncio.sleep(0)
    assert s.counts == {"a": 1}
    second = asyncio.ensure_future(routing.route([a, b], store, Settings(), req, lease=(lb := s.lease(spread=False))))
    while len(upstream.sent) < 2:
        await asyncio.sleep(0)
    assert upstream.sent == ["a", "b"] and s.counts == {"a": 1, "b": 1}
    upstream.gate.set()
    r1, r2 = await first, await second
    la.release()
    lb.release()
    assert s.counts == {}
    assert [(x.endpoint, x.outcome) for x in r2.attempts][0] == ("a", "busy")
    assert r2.counted[0] is False  # busy: not a failure of a
    assert [(x.endpoint, x.outcome) for x in r1.attempts] == [("a", "refused"), ("b", "busy")]
    assert [(x.endpoint, x.outcome) for x in r2.attempts] == [("a", "busy"), ("b", "refused")]
    assert (await store.view())["a"].failures == 1  # its one refusal; the skip added nothing


async def test_every_endpoint_busy_past_the_wait_is_a_429_with_a_short_retry_after(monkeypatch):
    monkeypatch.setattr(slots_mod, "QUEUE_WAIT", 0.01)
    routing = Routing(Held(), clock=lambda: 1000.0)  # type: ignore[arg-type]
    store = MemoryHealthStore(Breaker(), clock=lambda: 1000.0)
    s = Slots()
    a = ep("a", cap=1)
    assert s.take(a)
    req = Request("POST", "/v1/messages", [], b'{"model":"claude-sonnet-4-5"}')
    result = await routing.route([a], store, Settings(), req, lease=s.lease())
    assert result.answer is not None and result.answer.status == 429
    assert b'"rate_limit_error"' in result.answer.body
    assert dict(result.answer.headers_lower())["retry-after"] == str(slots_mod.BUSY_RETRY_AFTER)
    assert [(x.endpoint, x.outcome) for x in result.attempts] == [("a", "busy")] and result.counted == [False]
    assert (await store.view()).get("a") is None or (await store.view())["a"].failures == 0
    assert s.counts == {"a": 1}  # only the slot taken above


async def test_a_count_tokens_request_waits_for_no_slot():
    """count_tokens is never worth a wait (Claude Code stalls on it): every endpoint busy is
    answered at once, not after the queue's wait (here as long as the test may take)."""
    from claude_router import count_tokens
    routing = Routing(Held(), clock=lambda: 1000.0)  # type: ignore[arg-type]
    store = MemoryHealthStore(Breaker(), clock=lambda: 1000.0)
    s = Slots()
    a = ep("a", cap=1)
    assert s.take(a)
    req = Request("POST", "/v1/messages/count_tokens", [], b'{"model":"claude-sonnet-4-5"}')
    result = await asyncio.wait_for(routing.route([a], store, count_tokens.settings(Settings()), req,
                                                  lease=s.lease(), side=True), 600)
    assert result.answer is not None and count_tokens.answer(result.answer).status == 404
    assert s.counts == {"a": 1}


async def test_only_busy_endpoints_left_untried_is_a_429_not_a_502():
    """The free endpoint's half-open probe is another request's; the other is busy: nothing was
    sent, so the answer is the busy 429 (retried by the client), not 'every endpoint failed'."""
    now = [1000.0]
    routing = Routing(Held(), clock=lambda: now[0])  # type: ignore[arg-type]
    store = MemoryHealthStore(Breaker(max_failures=1, cooldown=60), clock=lambda: now[0])
    s = Slots()
    a, b = ep("a"), ep("b", cap=1)
    await store.record_failure("a")
    now[0] += 61  # a half-open: planned as a probe, which another request takes first

    async def taken(name: str) -> bool:
        return False

    store.try_probe = taken  # type: ignore[method-assign]
    assert s.take(b)
    req = Request("POST", "/v1/messages", [], b'{"model":"claude-sonnet-4-5"}')
    result = await routing.route([a, b], store, Settings(), req, lease=s.lease(spread=False))
    assert result.answer is not None and result.answer.status == 429
    assert [(x.endpoint, x.outcome) for x in result.attempts] == [("b", "busy")]
