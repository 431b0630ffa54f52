"""One set of breaker behaviours, run against both stores with an injected clock, so the
in-memory and Redis stores are shown to behave the same. Redis is a real redis-server."""

import asyncio
import logging

import pytest

from claude_router.health import HEALTHY, Breaker, MemoryHealthStore, Phase, phase
from claude_router.redis_store import RedisHealthStore

B = Breaker(max_failures=3, cooldown=60, max_cooldown=600, jitter=0.2, probe_timeout=30)
NAMES = ("aws", "droid")


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["memory", "redis"])
async def env(request):
    """(store, clock): a fresh store of each kind sharing one injected clock."""
    clock = Clock()
    if request.param == "memory":
        store = MemoryHealthStore(B, clock=clock, rand=lambda: 0.5)
    else:
        server = request.getfixturevalue("redis_server")
        store = RedisHealthStore(server.url, B, clock=clock, rand=lambda: 0.5)
    store.track(NAMES)
    if isinstance(store, RedisHealthStore):
        assert await store.wait_synced(5)
    yield store, clock
    await store.close()


async def state(store, name="aws"):
    return (await store.view()).get(name, HEALTHY)


async def test_failures_below_threshold_keep_it_usable(env):
    store, clock = env
    for _ in range(2):
        await store.record_failure("aws")
    h = await state(store)
    assert phase(h, clock()) is Phase.FAILING and h.failures == 2


async def test_threshold_ejects_for_the_base_cooldown(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    h = await state(store)
    assert phase(h, clock()) is Phase.COOLING
    assert h.ejected_until == pytest.approx(clock() + 60)


async def test_success_resets(env):
    store, clock = env
    await store.record_failure("aws")
    await store.record_success("aws")
    assert phase(await state(store), clock()) is Phase.HEALTHY


async def test_one_probe_after_cooldown_then_heal(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    assert await store.try_probe("aws") is False  # still cooling
    clock.t += 60
    assert await store.try_probe("aws") is True
    assert await store.try_probe("aws") is False  # someone is probing
    await store.record_success("aws")
    assert phase(await state(store), clock()) is Phase.HEALTHY


async def test_failed_probe_ejects_for_longer_with_jitter(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws")
    await store.record_failure("aws")
    h = await state(store)
    assert h.ejections == 2
    assert h.ejected_until - clock() == pytest.approx(120 * 1.1)  # doubled, +20% x rand 0.5


async def test_retry_after_cools_at_once_and_is_never_shortened(env):
    store, clock = env
    await store.record_failure("aws", at_least=5)
    h = await state(store)
    assert phase(h, clock()) is Phase.COOLING and h.ejected_until == pytest.approx(clock() + 5)
    await store.record_failure("aws", at_least=2)
    assert (await state(store)).ejected_until == pytest.approx(clock() + 5)
    await store.record_failure("aws", at_least=30)
    assert (await state(store)).ejected_until == pytest.approx(clock() + 30)


async def test_success_on_a_healthy_endpoint_writes_nothing(env, request):
    store, _ = env
    await store.record_success("aws")
    assert dict(await store.view()) == {}
    if isinstance(store, RedisHealthStore):
        assert request.getfixturevalue("redis_server").cli("DBSIZE") == "0"


async def test_reset_heals(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    await store.reset()
    assert phase(await state(store), clock()) is Phase.HEALTHY


# -- Redis only ---------------------------------------------------------------------------


async def two_instances(server, clock, breaker=B):
    stores = [RedisHealthStore(server.url, breaker, clock=clock, rand=lambda: 0.0) for _ in range(2)]
    for s in stores:
        s.track(NAMES)
        assert await s.wait_synced(5)
    return stores


async def test_keys_expire_after_twice_the_cooldown(redis_server):
    store = RedisHealthStore(redis_server.url, B)
    store.track(NAMES)
    await store.wait_synced(5)
    await store.record_failure("aws")
    ttl = int(redis_server.cli("PTTL", "endpoint_health_aws"))
    assert 119_000 < ttl <= 120_000
    await store.close()


async def test_concurrent_failures_across_instances_count_exactly(redis_server):
    clock = Clock()
    a, b = await two_instances(redis_server, clock, Breaker(max_failures=100, cooldown=60))
    await asyncio.gather(*(s.record_failure("aws") for s in (a, b) for _ in range(49)))
    h = await b.record_failure("aws")
    assert (h.failures, h.ejections) == (99, 0)
    h = await a.record_failure("aws")
    assert (h.failures, h.ejections) == (0, 1)  # tripped exactly once, at the 100th
    for s in (a, b):
        await s.close()


async def test_a_trip_on_one_instance_reaches_the_other_without_a_read(redis_server):
    clock = Clock()
    a, b = await two_instances(redis_server, clock)
    for _ in range(3):
        await a.record_failure("aws")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while phase((await b.view()).get("aws", HEALTHY), clock()) is not Phase.COOLING:
        assert loop.time() - t0 < 1.0
        await asyncio.sleep(0.001)
    print(f"\npropagated in {1000 * (loop.time() - t0):.1f} ms")
    for s in (a, b):
        await s.close()


async def test_only_one_instance_wins_the_probe(redis_server):
    clock = Clock()
    a, b = await two_instances(redis_server, clock)
    for _ in range(3):
        await a.record_failure("aws")
    clock.t += 60
    wins = await asyncio.gather(*(s.try_probe("aws") for s in (a, b) for _ in range(25)))
    assert sum(wins) == 1
    for s in (a, b):
        await s.close()


async def test_redis_down_falls_back_to_local_view_within_bounds(own_redis, caplog):
    caplog.set_level(logging.INFO, logger="claude_router")
    server = own_redis()
    clock = Clock()
    store = RedisHealthStore(server.url, B, clock=clock)
    store.track(NAMES)
    assert await store.wait_synced(5)
    server.stop()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(3):
        await store.record_failure("aws")
    assert loop.time() - t0 < 1.0  # bounded even while Redis is gone
    assert phase((await store.view())["aws"], clock()) is Phase.COOLING
    assert not store.connected
    outages = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outages) == 1
    server.start()
    assert await _eventually(lambda: store.connected, 5)
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    await store.close()


async def test_wrong_password_is_reported_and_local_state_serves(own_redis, caplog):
    server = own_redis(password="right")
    url = server.url.replace(":right@", ":wrong@")
    store = RedisHealthStore(url, B)
    store.track(NAMES)
    assert await store.wait_synced(1.5) is False
    await store.record_failure("aws")
    assert (await store.view())["aws"].failures == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "authentication failed" in messages and "wrong" not in messages
    await store.close()


async def _eventually(cond, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()
