"""Redis that holds junk, or a "Redis" that speaks junk, never fails a request: a real mitmdump,
the mock relay, and a real redis-server (or a fake one on a loopback port)."""

import asyncio
import threading

import httpx
import pytest

from test_health_stores import FakeRedis

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
P = "endpoint_health_|"  # the default prefix and the separator


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def attempts(router) -> str:
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-router-attempts"]


def status(router) -> dict:
    r = httpx.get(f"{router.base}/_router/status", timeout=10)
    assert r.status_code == 200
    return r.json()


class ThreadedFake:
    """A FakeRedis served by an event loop of its own in a thread, for these synchronous tests."""

    def __init__(self, mode: str, upstream: int | None = None) -> None:
        self.fake = FakeRedis(mode, upstream)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(5)
        self.url = self.fake.url

    def set_mode(self, mode: str) -> None:
        self.fake.mode = mode

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def fake_redis():
    fakes: list[ThreadedFake] = []

    def make(mode: str, upstream: int | None = None) -> ThreadedFake:
        fakes.append(ThreadedFake(mode, upstream))
        return fakes[-1]

    yield make
    for f in fakes:
        f.close()


def test_stray_keys_under_the_prefix_cost_only_themselves(mock, start_router, redis_server):
    # before the router starts: junk where the disabled set, a state and the counter go
    redis_server.cli("SET", P + "disabled", "not a set")
    redis_server.cli("LPUSH", P + "ep|aws", "not a hash")
    redis_server.cli("HSET", P + "ep|droid", "f", "abc", "e", "1")
    redis_server.cli("SET", P + "version", "not a number")
    router = start_router(tiers(mock, "aws", "droid", "ultra"),
                          options={"router_redis_url": redis_server.url})
    log = router.wait_log("(connected)")
    assert f"'{P}ep|aws' is not a hash" in log and f"'{P}disabled' is not a set" in log
    assert attempts(router) == "aws:200"  # the cheapest, read as healthy

    # after it started: more junk, then failures trip cooldowns as usual
    redis_server.cli("SET", P + "ep|ultra", "not a hash")
    redis_server.cli("DEL", P + "ep|droid")
    redis_server.cli("LPUSH", P + "ep|droid", "not a hash")
    mock.fault("aws", status=503)
    for _ in range(3):
        assert attempts(router) == "aws:503, droid:200"
    assert attempts(router) == "droid:200"  # aws is cooling
    assert redis_server.cli("TYPE", P + "ep|aws") == "hash"  # the junk was replaced
    assert redis_server.cli("HGET", P + "ep|aws", "e") == "1"
    mock.fault("droid", status=503)
    for _ in range(3):
        assert attempts(router) == "droid:503, ultra:200"
    assert attempts(router) == "ultra:200"

    doc = status(router)
    assert [e["state"] for e in doc["endpoints"]] == ["cooling", "cooling", "healthy"]
    assert "connected" in doc["store"]
    assert "unavailable" not in router.log()  # junk in Redis is not an outage


@pytest.mark.parametrize("mode", ["garbage", "ok", "idle"])
def test_a_server_that_is_not_redis_fails_no_request(mock, start_router, fake_redis, mode):
    fake = fake_redis(mode)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_redis_url": fake.url})
    log = router.wait_log("endpoints in price order")
    assert "unreachable: local view" in log and "unavailable" in log
    for _ in range(2):
        assert attempts(router) == "aws:200"
    mock.fault("aws", status=503)
    for _ in range(3):
        assert attempts(router) == "aws:503, droid:200"
    assert attempts(router) == "droid:200"  # cooled on the local view
    assert [e["state"] for e in status(router)["endpoints"]] == ["cooling", "healthy"]
    assert router.log().count("unavailable") == 1
    assert "Traceback" not in router.log()


@pytest.mark.parametrize("mode", ["garbage", "ok", "idle"])
def test_redis_turning_to_garbage_under_a_running_router_fails_no_request(
        mock, start_router, redis_server, fake_redis, mode):
    proxy = fake_redis("pass", upstream=redis_server.port)  # relays to the real Redis, for now
    router = start_router(tiers(mock, "aws", "droid"), options={"router_redis_url": proxy.url})
    router.wait_log("(connected)")
    assert attempts(router) == "aws:200"
    proxy.set_mode(mode)
    mock.fault("aws", status=503)
    for _ in range(3):
        assert attempts(router) == "aws:503, droid:200"  # the first meets the junk: local from then on
    assert attempts(router) == "droid:200"
    router.wait_log("unavailable")
    assert "unreachable" in status(router)["store"]
    proxy.set_mode("pass")
    router.wait_log("reachable again", timeout=10)
    assert "connected" in status(router)["store"]
    # Re-synced: Redis never saw those failures, so the cooldown learned meanwhile is kept
    # (and written back for the other instances): aws is not tried again at once.
    assert attempts(router) == "droid:200"
    assert redis_server.cli("HGET", "endpoint_health_|ep|aws", "u") not in ("", "0")
    log = router.log()
    assert log.count("unavailable") == 1 and log.count("reachable again") == 1
    assert log.count("kept 1 cooldown(s) learned while Redis was away (aws)") == 1
    assert "Traceback" not in log
