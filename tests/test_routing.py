"""Routing decisions with a scripted upstream (no sockets): what the router's own exhaustion
does to a request and to the endpoints' health."""

import json

from claude_router.endpoints import parse_endpoint
from claude_router.health import Breaker, MemoryHealthStore
from claude_router.routing import Request, Routing, Settings
from claude_router.upstream import UpstreamError

BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


class Exhausted:
    """An upstream client whose process is out of descriptors: every send fails as local."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, ep, method, path, headers, body, timeouts):
        self.sent.append(ep.name)
        raise UpstreamError("local", "the router is out of file descriptors")


def endpoints():
    return [parse_endpoint("aws=http://127.0.0.1:1/aws", 0), parse_endpoint("droid=http://127.0.0.1:1/droid", 1)]


async def test_the_routers_own_exhaustion_answers_529_at_once_and_blames_nobody():
    clock = lambda: 1000.0  # noqa: E731
    upstream = Exhausted()
    store = MemoryHealthStore(Breaker(max_failures=1, cooldown=60), clock)
    result = await Routing(upstream, clock).route(endpoints(), store, Settings(),
                                                  Request("POST", "/v1/messages", [], BODY))
    assert upstream.sent == ["aws"]  # the next endpoint is not tried
    assert result.answer.status == 529
    assert dict(result.answer.headers)["retry-after"] == "1"
    err = json.loads(result.answer.body)["error"]
    assert err["type"] == "overloaded_error" and "out of file descriptors" in err["message"]
    assert [a.outcome for a in result.attempts] == ["local"] and result.counted == [False]
    assert all(h.failures == 0 for h in (await store.view()).values())


async def test_a_model_listing_the_router_cannot_fetch_for_the_same_reason_is_a_529():
    clock = lambda: 1000.0  # noqa: E731
    store = MemoryHealthStore(Breaker(max_failures=1, cooldown=60), clock)
    result = await Routing(Exhausted(), clock).models(endpoints(), store, Settings(),
                                                      Request("GET", "/v1/models", [], b""))
    assert result.answer.status == 529
    assert all(h.failures == 0 for h in (await store.view()).values())


# -- the client's own key: fail over, cool (endpoint, key) only ------------------------------

class Answered:
    """A complete upstream answer (duck-typed UpstreamResponse)."""

    is_event_stream = False

    def __init__(self, status: int, body: bytes, headers=()) -> None:
        self.status, self.reason, self._body = status, "", body
        self.headers = [("content-type", "application/json"), *headers]
        self.length = len(body)

    async def read(self, limit):
        return self._body, True

    def close(self) -> None:
        pass


class PerKey:
    """Keyless endpoints that answer by the presented key: ``refuse[(endpoint, key)]`` is the
    (status, headers) that endpoint gives that key; everything else is a 200."""

    def __init__(self, refuse) -> None:
        self.refuse = refuse
        self.sent: list[tuple[str, str]] = []

    async def send(self, ep, method, path, headers, body, timeouts):
        key = dict((k.lower(), v) for k, v in headers).get("x-api-key", "")
        self.sent.append((ep.name, key))
        if (ep.name, key) in self.refuse:
            status, extra = self.refuse[(ep.name, key)]
            etype = {401: "authentication_error", 429: "rate_limit_error"}.get(status, "api_error")
            return Answered(status, json.dumps({"type": "error", "error": {
                "type": etype, "message": f"{status} for this key"}}).encode(), extra)
        return Answered(200, json.dumps({"type": "message", "content": [],
                                         "usage": {"input_tokens": 1, "output_tokens": 1}}).encode())


def keyed(key: str) -> Request:
    return Request("POST", "/v1/messages", [("x-api-key", key)], BODY)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def route_as(routing, store, key):
    return await routing.route(endpoints(), store, Settings(), keyed(key), credential=key[-16:].rjust(16, "0"))


async def test_a_429_on_the_clients_key_fails_over_and_cools_that_channel_for_that_key_only():
    clock = Clock()
    upstream = PerKey({("aws", "alice"): (429, [("retry-after", "5")])})
    store = MemoryHealthStore(Breaker(), clock)
    routing = Routing(upstream, clock)
    first = await route_as(routing, store, "alice")
    assert first.winner.endpoint.name == "droid"
    assert [str(a) for a in first.attempts] == ["aws:429", "droid:200"] and first.counted == [False, False]
    upstream.sent.clear()
    await route_as(routing, store, "alice")
    assert upstream.sent == [("droid", "alice")]  # the cooled channel is skipped for alice
    await route_as(routing, store, "bob")
    assert upstream.sent[-1] == ("aws", "bob")  # bob still gets the cheapest
    assert "aws" not in await store.view()  # the endpoint itself was never cooled
    clock.now += 5.5
    upstream.sent.clear()
    await route_as(routing, store, "alice")
    assert upstream.sent == [("aws", "alice"), ("droid", "alice")]  # retry-after over: aws again


async def test_a_key_every_endpoint_refuses_gets_the_last_401_and_then_that_answer_at_once():
    clock = Clock()
    upstream = PerKey({("aws", "bad"): (401, []), ("droid", "bad"): (401, [])})
    store = MemoryHealthStore(Breaker(cooldown=60), clock)
    routing = Routing(upstream, clock)
    first = await route_as(routing, store, "bad")
    assert upstream.sent == [("aws", "bad"), ("droid", "bad")]  # one attempt per endpoint
    assert first.answer.status == 401
    assert json.loads(first.answer.body)["error"]["type"] == "authentication_error"
    upstream.sent.clear()
    again = await route_as(routing, store, "bad")
    assert upstream.sent == [] and again.answer.status == 401  # at once, nothing sent
    assert dict(again.answer.headers)["retry-after"] == "60"
    good = await route_as(routing, store, "good")
    assert good.winner.endpoint.name == "aws"  # nothing cooled for other keys
    clock.now += 61
    upstream.sent.clear()
    await route_as(routing, store, "bad")
    assert upstream.sent == [("aws", "bad"), ("droid", "bad")]  # the scope's cooldown ended


async def test_the_return_rule_keeps_todays_behaviour():
    clock = Clock()
    upstream = PerKey({("aws", "alice"): (429, [("retry-after", "5")])})
    store = MemoryHealthStore(Breaker(), clock)
    settings = Settings(rules=__import__("claude_router.policy", fromlist=["x"]).parse_rules(
        ["client-key:429=return"]))
    result = await Routing(upstream, clock).route(endpoints(), store, settings, keyed("alice"),
                                                  credential="a" * 16)
    assert result.answer.status == 429 and upstream.sent == [("aws", "alice")]


async def test_key_scopes_are_bounded_least_recent_first():
    clock = Clock()
    store = MemoryHealthStore(Breaker(), clock)
    store.scopes.limit = 3
    for i in range(5):
        await store.record_failure(f"aws@{i:016x}", at_least=30)
    assert sorted(await store.view()) == [f"aws@{i:016x}" for i in (2, 3, 4)]


async def test_key_scopes_expire_after_twice_the_cooldown():
    clock = Clock()
    store = MemoryHealthStore(Breaker(cooldown=60), clock)
    await store.record_failure("aws@" + "a" * 16, at_least=30)
    clock.now += 30 + 121  # its cooldown ended over 2 x 60 s ago
    await store.record_failure("aws@" + "b" * 16, at_least=30)
    assert list(await store.view()) == ["aws@" + "b" * 16]


async def test_a_refused_key_neither_heals_nor_blames_a_failing_endpoint():
    clock = Clock()
    upstream = PerKey({("aws", "bad"): (401, [])})
    store = MemoryHealthStore(Breaker(max_failures=3), clock)
    for _ in range(2):
        await store.record_failure("aws")  # real traffic failed twice at aws
    await route_as(Routing(upstream, clock), store, "bad")
    assert (await store.view())["aws"].failures == 2  # a bad key did not reset the count



# -- count_tokens is a side request; skips without blame stay last resorts ---------------------

COUNT = json.dumps({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode()


def count_as(key: str) -> Request:
    return Request("POST", "/v1/messages/count_tokens", [("x-api-key", key)], COUNT)


async def test_a_count_tokens_429_on_the_clients_key_does_not_cool_that_key_for_messages():
    from claude_router import count_tokens
    clock = Clock()
    upstream = PerKey({("aws", "alice"): (429, [("retry-after", "600")])})
    store = MemoryHealthStore(Breaker(), clock)
    routing = Routing(upstream, clock)
    got = await routing.route(endpoints(), store, count_tokens.settings(Settings()), count_as("alice"),
                              credential="alice".rjust(16, "0"), side=True)
    assert count_tokens.answer(got.answer).status == 404  # fast, and not retried by Claude Code
    assert await store.view() == {}  # no key scope cooled, nothing kept to answer alice with
    upstream.sent.clear()
    await route_as(routing, store, "alice")
    assert upstream.sent[0] == ("aws", "alice")  # Messages still try the cheapest first


async def test_a_count_tokens_success_heals_nothing():
    from claude_router import count_tokens
    clock = Clock()
    store = MemoryHealthStore(Breaker(max_failures=3, cooldown=60), clock)
    await store.record_failure("aws")
    await store.record_failure("aws")
    routing = Routing(PerKey({}), clock)
    got = await routing.route(endpoints(), store, count_tokens.settings(Settings()), count_as("k"),
                              side=True)
    assert got.winner is not None and got.winner.endpoint.name == "aws"
    assert (await store.view())["aws"].failures == 2  # one more Messages failure still trips it


async def test_a_count_tokens_request_takes_no_half_open_probe():
    from claude_router import count_tokens
    clock = Clock()
    store = MemoryHealthStore(Breaker(max_failures=1, cooldown=60), clock)
    await store.record_failure("aws")
    clock.now += 61  # aws half-open: its next Messages request is the probe
    upstream = PerKey({})
    await Routing(upstream, clock).route(endpoints(), store, count_tokens.settings(Settings()),
                                         count_as("k"), side=True)
    assert upstream.sent == [("droid", "k")]
    assert (await store.view())["aws"].ejections == 1  # still ejected, the probe still free


async def test_a_low_balance_endpoint_is_the_last_resort_not_dropped():
    clock = Clock()
    store = MemoryHealthStore(Breaker(), clock)
    upstream = PerKey({("droid", "k"): (529, [])})
    routing = Routing(upstream, clock)
    routing.is_low = lambda name: name == "aws"
    got = await routing.route(endpoints(), store, Settings(), keyed("k"))
    assert [str(a) for a in got.attempts] == ["aws:low_balance", "droid:529", "aws:200"]
    assert got.winner is not None and got.winner.endpoint.name == "aws"
