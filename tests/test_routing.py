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
