"""One set of breaker behaviours, run against both stores with an injected clock, so the
in-memory and Redis stores are shown to behave the same. Redis is a real redis-server."""

import asyncio
import logging
import time

import pytest

from claude_router.health import HEALTHY, Breaker, MemoryHealthStore, Phase, phase
from claude_router.redis_store import RedisHealthStore

B = Breaker(max_failures=3, cooldown=60, max_cooldown=600, jitter=0.2, probe_timeout=30)
NAMES = ("aws", "droid")


# A store's Redis calls give up after op_timeout and go on locally, by design (0.25 s in
# production). The tests of what Redis decides need every write to land: on a loaded machine a
# round trip can take longer than 0.25 s, and a store that gave up would keep its later writes
# to itself (an operator's reset that never reached Redis looked like a lost decision).
LANDS = 5.0


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
        store = RedisHealthStore(server.url, B, clock=clock, rand=lambda: 0.5, op_timeout=LANDS)
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
        keys = request.getfixturevalue("redis_server").cli("KEYS", "*").split()
        assert all(k.endswith(("|salt", "|epoch")) for k in keys)  # no health state


async def test_reset_heals(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    await store.reset()
    assert phase(await state(store), clock()) is Phase.HEALTHY


# -- Redis only ---------------------------------------------------------------------------


async def two_instances(server, clock, breaker=B, op_timeout=LANDS):
    stores = [RedisHealthStore(server.url, breaker, clock=clock, rand=lambda: 0.0, op_timeout=op_timeout)
              for _ in range(2)]
    for s in stores:
        s.track(NAMES)
        assert await s.wait_synced(5)
    return stores


async def test_keys_expire_after_twice_the_cooldown(redis_server):
    store = RedisHealthStore(redis_server.url, B)
    store.track(NAMES)
    await store.wait_synced(5)
    await store.record_failure("aws")
    ttl = int(redis_server.cli("PTTL", "endpoint_health_|ep|aws"))
    assert 119_000 < ttl <= 120_000
    await store.close()


async def test_a_probe_in_flight_keeps_its_state_past_twice_the_cooldown(redis_server):
    """A probe may outlast 2 x cooldown (a long answer, a short cooldown): its state must still
    be in Redis when it ends, or its success would reach no other instance."""
    clock = Clock()
    a, b = await two_instances(redis_server, clock, Breaker(max_failures=1, cooldown=1, probe_timeout=30))
    await a.record_failure("aws")
    clock.t += 1.5
    assert await a.try_probe("aws")
    ttl = int(redis_server.cli("PTTL", "endpoint_health_|ep|aws"))
    assert ttl > 20_000  # the probe's 30 s, not 2 x 1 s
    await a.record_success("aws")
    await until(lambda: phase(b.current().get("aws", HEALTHY), clock()) is Phase.HEALTHY)
    assert phase(b.current().get("aws", HEALTHY), clock()) is Phase.HEALTHY  # b heard it
    for s in (a, b):
        await s.close()


async def test_concurrent_failures_across_instances_count_exactly(redis_server):
    clock = Clock()
    # a generous timeout: this is about atomicity, and 98 calls at once on a busy machine
    # could otherwise time out and (rightly) count locally
    a, b = await two_instances(redis_server, clock, Breaker(max_failures=100, cooldown=60), op_timeout=3)
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
        assert loop.time() - t0 < 10, "b never heard of a's trip"
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


# -- releasing an abandoned probe (both stores) ---------------------------------------------


async def test_a_released_probe_is_free_at_once(env):
    store, clock = env
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws") is True
    assert await store.try_probe("aws") is False
    clock.t += 1
    await store.release_probe("aws")  # the probing request's client went away
    h = await state(store)
    assert phase(h, clock()) is Phase.HALF_OPEN and h.ejections == 1  # nothing else changed
    assert await store.try_probe("aws") is True  # the next request probes now, not in 30 s
    assert await store.try_probe("aws") is False


async def test_release_without_a_probe_of_ours_changes_nothing(env):
    store, clock = env
    await store.release_probe("aws")
    assert dict(await store.view()) == {}
    for _ in range(3):
        await store.record_failure("aws")
    cooling = await state(store)
    await store.release_probe("aws")
    assert await state(store) == cooling
    clock.t += 60
    assert await store.try_probe("aws") is True
    await store.record_success("aws")  # an outcome: the probe is over
    await store.release_probe("aws")
    assert phase(await state(store), clock()) is Phase.HEALTHY


# -- Redis: the key scheme ------------------------------------------------------------------


async def until(condition, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds or ``timeout`` seconds of wall clock pass (the caller's
    assertion then says what did not happen): an event, not a count of sleeps."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def synced(server, clock, names, prefix="endpoint_health_", op_timeout=LANDS):
    store = RedisHealthStore(server.url, B, prefix=prefix, clock=clock, rand=lambda: 0.0,
                             op_timeout=op_timeout)
    store.track(names)
    assert await store.wait_synced(5)
    return store


def test_key_scheme():
    store = RedisHealthStore("redis://127.0.0.1:1/0", B)
    assert store.key("aws") == "endpoint_health_|ep|aws"
    assert (store._disabled_key, store._version_key, store.channel) == (
        "endpoint_health_|disabled", "endpoint_health_|version", "endpoint_health_|events")


@pytest.mark.parametrize("prefix", ["a|b", "|", "health|"])
def test_a_prefix_with_the_separator_is_refused(prefix):
    with pytest.raises(ValueError, match=r"router_key_prefix must not contain '\|'"):
        RedisHealthStore("redis://127.0.0.1:1/0", B, prefix=prefix)


async def test_prefixes_that_prefix_each_other_do_not_collide(redis_server):
    """p + adisabled and pa + disabled were one key ("padisabled") in the old scheme."""
    clock = Clock()
    p = await synced(redis_server, clock, ("adisabled", "aevents"), prefix="p")
    pa = await synced(redis_server, clock, ("disabled", "events"), prefix="pa")
    for _ in range(3):
        await p.record_failure("adisabled")
    await pa.record_failure("events")
    await pa.set_disabled("disabled", True)
    await p.set_disabled("aevents", True)
    await asyncio.sleep(0.1)  # let any cross-talk on the channels arrive
    assert set(p.current()) == {"adisabled"} and p.disabled == {"aevents"}
    assert set(pa.current()) == {"events"} and pa.disabled == {"disabled"}
    assert p.connected and pa.connected
    # and a fresh instance of each reads back exactly its own
    p2 = await synced(redis_server, clock, ("adisabled", "aevents"), prefix="p")
    pa2 = await synced(redis_server, clock, ("disabled", "events"), prefix="pa")
    assert phase(p2.current()["adisabled"], clock()) is Phase.COOLING and p2.disabled == {"aevents"}
    assert pa2.current()["events"].failures == 1 and pa2.disabled == {"disabled"}
    assert set(redis_server.cli("KEYS", "*").split()) == {
        "p|ep|adisabled", "p|disabled", "p|version", "pa|ep|events", "pa|disabled", "pa|version",
        "p|salt", "pa|salt", "p|epoch", "pa|epoch", "p|decided", "pa|decided"}
    for s in (p, pa, p2, pa2):
        await s.close()


async def test_endpoints_named_like_the_store_keys_work(redis_server):
    clock = Clock()
    names = ("disabled", "events", "version", "ep")
    a = await synced(redis_server, clock, names)
    b = await synced(redis_server, clock, names)
    for name in names:
        for _ in range(3):
            await a.record_failure(name)
    await a.set_disabled("disabled", True)
    await a.set_disabled("events", True)
    assert await _eventually(
        lambda: set(b.current()) == set(names) and b.disabled == {"disabled", "events"}, 2)
    assert all(phase(h, clock()) is Phase.COOLING for h in b.current().values())
    clock.t += 60
    assert await b.try_probe("events") and not await a.try_probe("events")
    await b.record_success("events")
    await a.set_disabled("events", False)
    assert await _eventually(lambda: "events" not in a.current() and a.disabled == {"disabled"}, 2)
    assert a.connected and b.connected
    for s in (a, b):
        await s.close()


# -- Redis: releasing a probe across instances ----------------------------------------------


async def test_a_released_probe_is_free_on_every_instance(redis_server):
    clock = Clock()
    a, b = await two_instances(redis_server, clock)
    for _ in range(3):
        await a.record_failure("aws")
    clock.t += 60
    assert await a.try_probe("aws")
    assert await _eventually(lambda: phase(b.current()["aws"], clock()) is Phase.PROBING, 2)
    await a.release_probe("aws")
    assert await _eventually(lambda: phase(b.current()["aws"], clock()) is Phase.HALF_OPEN, 2)
    assert await b.try_probe("aws") and not await a.try_probe("aws")
    for s in (a, b):
        await s.close()


async def test_release_keeps_a_probe_taken_after_ours_expired(redis_server):
    clock = Clock()
    a, b = await two_instances(redis_server, clock)
    for _ in range(3):
        await a.record_failure("aws")
    clock.t += 60
    assert await a.try_probe("aws")
    clock.t += 31  # a's probe never reported: its lock expired, and b took a new one
    assert await b.try_probe("aws")
    await a.release_probe("aws")  # a's request goes away late: b's probe must stay held
    assert not await a.try_probe("aws")
    assert int(redis_server.cli("HGET", "endpoint_health_|ep|aws", "p")) == round((clock() + 30) * 1000)
    for s in (a, b):
        await s.close()


async def test_release_while_redis_is_down_frees_the_local_probe(own_redis):
    server = own_redis()
    clock = Clock()
    store = await synced(server, clock, NAMES)
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws")
    server.stop()
    await store.release_probe("aws")
    assert phase(store.current()["aws"], clock()) is Phase.HALF_OPEN
    assert await store.try_probe("aws") and not store.connected
    await store.close()


# -- Redis: stray keys under the prefix cost only themselves --------------------------------

P = "endpoint_health_|"


async def test_stray_keys_are_read_as_healthy_and_the_rest_syncs(redis_server, caplog):
    caplog.set_level(logging.DEBUG, logger="claude_router")
    clock = Clock()
    names = ("aws", "droid", "ultra", "plain", "big")
    writer = await synced(redis_server, clock, names)
    for _ in range(3):
        await writer.record_failure("ultra")
    await writer.close()
    redis_server.cli("LPUSH", P + "ep|aws", "x")  # another type
    redis_server.cli("HSET", P + "ep|droid", "f", "abc", "e", "1")  # not numbers
    redis_server.cli("HSET", P + "ep|plain", "u", "1.5")  # not an integer
    redis_server.cli("HSET", P + "ep|big", "u", "9" * 30)  # out of range
    redis_server.cli("SET", P + "disabled", "not a set")
    store = await synced(redis_server, clock, names)
    assert store.connected
    assert set(store.current()) == {"ultra"}  # the good key still counts
    assert phase(store.current()["ultra"], clock()) is Phase.COOLING
    assert store.disabled == frozenset()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key in ("ep|aws", "ep|droid", "ep|plain", "ep|big", "disabled"):
        assert sum(P + key in m for m in warnings) == 1, warnings
    assert not any("unavailable" in m for m in warnings)
    store._up = False  # the supervisor re-syncs: the same strays are not logged again
    assert await _eventually(lambda: store.connected, 3)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(warnings)
    await store.close()


async def test_an_error_reply_other_than_wrongtype_is_an_outage_not_a_stray(own_redis, caplog):
    server = own_redis()
    server.cli("ACL", "SETUSER", "router", "on", ">pw", "+@all", "&*", f"~{P}ep|aws",
               f"~{P}disabled", f"~{P}version")  # no access to droid's key
    store = RedisHealthStore(f"redis://router:pw@127.0.0.1:{server.port}/0", B, clock=Clock())
    store.track(NAMES)
    assert await store.wait_synced(1.2) is False
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "unavailable (NoPermissionError" in messages and "is not a hash" not in messages
    await store.record_failure("droid")  # served locally all the same
    assert store.current()["droid"].failures == 1
    await store.close()


STRAYS = {
    "string": ("SET", "x"),
    "list": ("LPUSH", "x"),
    "set": ("SADD", "x"),
    "zset": ("ZADD", "1", "x"),
    "hash f=abc": ("HSET", "f", "abc", "e", "7", "junk", "1"),
    "hash u=1.5": ("HSET", "f", "2", "u", "1.5"),
    "hash u=-5": ("HSET", "u", "-5"),
}


@pytest.mark.parametrize("stray", STRAYS)
async def test_transitions_replace_a_stray_key_with_a_proper_state(redis_server, stray):
    clock = Clock()
    cmd, *args = STRAYS[stray]
    redis_server.cli(cmd, P + "ep|aws", *args)
    a, b = await two_instances(redis_server, clock)
    assert await a.try_probe("aws")  # read as healthy: go
    h = await a.record_failure("aws")
    assert (h.failures, h.ejections) == (1, 0) and a.connected
    assert redis_server.cli("TYPE", P + "ep|aws") == "hash"
    assert redis_server.cli("HGETALL", P + "ep|aws").split()[::2] == ["f", "e", "u", "p", "v"]
    assert await _eventually(lambda: b.current().get("aws") == h, 2)
    await a.record_success("aws")
    assert redis_server.cli("EXISTS", P + "ep|aws") == "0"
    for s in (a, b):
        await s.close()


async def test_success_and_reset_delete_a_stray_key_of_any_type(redis_server):
    clock = Clock()
    store = await synced(redis_server, clock, NAMES)
    redis_server.cli("LPUSH", P + "ep|aws", "x")
    redis_server.cli("SET", P + "ep|droid", "x")
    await store.reset()
    assert redis_server.cli("EXISTS", P + "ep|aws", P + "ep|droid") == "0" and store.connected
    await store.close()


@pytest.mark.parametrize("stray", [("SET", "abc"), ("LPUSH", "x"), ("SET", "99999999999999999999999")])
async def test_a_stray_version_counter_is_restarted_above_every_version(redis_server, stray):
    clock = Clock()
    a, b = await two_instances(redis_server, clock)
    for _ in range(3):
        await a.record_failure("droid")  # versions 1..3, seen by b
    assert await _eventually(lambda: "droid" in b.current(), 2)
    redis_server.cli("DEL", P + "version")
    redis_server.cli(stray[0], P + "version", stray[1])
    h = await a.record_failure("aws")
    assert h.failures == 1 and a.connected
    assert int(redis_server.cli("GET", P + "version")) == round(clock() * 1000)
    assert await _eventually(lambda: b.current().get("aws") == h, 2)  # b takes the new version
    await a.record_success("droid")
    assert await _eventually(lambda: "droid" not in b.current(), 2)
    for s in (a, b):
        await s.close()


async def test_set_disabled_replaces_a_stray_disabled_key(redis_server):
    clock = Clock()
    redis_server.cli("LPUSH", P + "disabled", "aws")
    a, b = await two_instances(redis_server, clock)
    await a.set_disabled("aws", True)
    assert a.connected and redis_server.cli("SMEMBERS", P + "disabled") == "aws"
    assert await _eventually(lambda: b.disabled == {"aws"}, 2)
    redis_server.cli("SET", P + "disabled", "x")
    await a.set_disabled("aws", False)
    assert redis_server.cli("TYPE", P + "disabled") in ("set", "none") and a.connected
    assert await _eventually(lambda: b.disabled == frozenset(), 2)
    for s in (a, b):
        await s.close()


async def test_malformed_messages_are_ignored(redis_server):
    clock = Clock()
    store = await synced(redis_server, clock, NAMES)
    for junk in ["", "aws", "aws|1|2", "aws|a|b|c|d|e", "aws|1|2|3|4|5|6", "aws|-1|0|0|0|9",
                 "!disabled|aws", "!disabled|aws|yes", "!disabled|a b|1", "\xff\xfe|1|1|1|1|1",
                 "aws|1|0|0|0|" + "9" * 40]:
        redis_server.cli("PUBLISH", P + "events", junk)
    redis_server.cli("PUBLISH", P + "events", "droid|2|0|0|0|7")  # a good one still applies
    assert await _eventually(lambda: "droid" in store.current(), 2)
    assert store.current()["droid"].failures == 2 and set(store.current()) == {"droid"}
    assert store.connected and not store._supervisor.done()
    await store.close()


# -- Redis: any malformed reply is an outage for that call ----------------------------------


def _answers(reply):
    async def script(keys=(), args=()):
        if isinstance(reply, BaseException):
            raise reply
        return reply
    return script


GARBAGE_REPLIES = {
    "None": None, "str": "garbage", "bytes": b"OK", "int": 7, "negative": -5, "empty": [],
    "short": [1, 2], "long": [1] * 9, "text": [b"x"] * 6, "floats": [0.5] * 6, "nested": [[1]] * 6,
    "dict": {"f": 1}, "huge": [1, 10**30, 0, 0, 0, 1], "ValueError": ValueError("bad"),
    "IndexError": IndexError("bad"), "UnicodeDecodeError": UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"),
}


@pytest.mark.parametrize("reply", GARBAGE_REPLIES)
async def test_a_malformed_reply_is_an_outage_for_that_call(redis_server, caplog, reply):
    clock = Clock()
    store = await synced(redis_server, clock, NAMES)
    garbage = _answers(GARBAGE_REPLIES[reply])
    store._failure = store._probe = store._release = store._success = store._set_disabled = garbage

    async def on_redis(call):
        store._up = True  # take the Redis path, whatever the supervisor did meanwhile
        return await call

    for _ in range(3):
        await on_redis(store.record_failure("aws"))
    assert phase(store.current()["aws"], clock()) is Phase.COOLING  # local transitions
    clock.t += 60
    assert await on_redis(store.try_probe("aws")) is True
    assert await on_redis(store.try_probe("aws")) is False
    await on_redis(store.release_probe("aws"))
    assert phase(store.current()["aws"], clock()) is Phase.HALF_OPEN
    await on_redis(store.set_disabled("droid", True))
    assert store.disabled == {"droid"}
    await on_redis(store.record_failure("droid"))
    await on_redis(store.record_success("droid"))
    await on_redis(store.reset())
    assert dict(await on_redis(store.view())) == {}
    assert any("unavailable" in r.getMessage() for r in caplog.records)
    assert not store._supervisor.done()
    await store.close()


class FakeRedis:
    """A TCP server on a free loopback port in Redis's place. ``mode`` says what it does with
    every chunk it is sent: "pass" relays it to a real Redis (and the answers back), "garbage"
    answers bytes that are not RESP, "ok" answers +OK (RESP, but not what was asked), "idle"
    never answers."""

    REPLIES = {"garbage": b"HTTP/1.1 200 OK\r\n\r\n\x00\xff garbage\r\n", "ok": b"+OK\r\n"}

    def __init__(self, mode: str, upstream: int | None = None) -> None:
        self.mode, self.upstream = mode, upstream
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "FakeRedis":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def _serve(self, reader, writer) -> None:
        self.writers.append(writer)
        up = None
        if self.upstream is not None:
            up_reader, up = await asyncio.open_connection("127.0.0.1", self.upstream)
            self.writers.append(up)
            asyncio.ensure_future(self._relay_back(up_reader, writer))
        try:
            while data := await reader.read(65536):
                if self.mode == "pass" and up is not None:
                    up.write(data)
                elif self.mode in self.REPLIES:
                    writer.write(self.REPLIES[self.mode])
                    await writer.drain()
        except OSError:
            pass
        finally:
            for w in (writer, up):
                if w is not None:
                    w.close()

    async def _relay_back(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                if self.mode == "pass":
                    writer.write(data)
        except OSError:
            pass

    async def close(self) -> None:
        self.server.close()
        for w in self.writers:
            w.close()


@pytest.mark.parametrize("mode", ["garbage", "ok", "idle"])
async def test_a_server_that_is_not_redis_never_fails_a_call(mode, caplog):
    fake = await FakeRedis(mode).start()
    clock = Clock()
    store = RedisHealthStore(fake.url, B, clock=clock, rand=lambda: 0.0)
    store.track(NAMES)
    assert await store.wait_synced(1.2) is False
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws")
    await store.release_probe("aws")
    await store.set_disabled("droid", True)
    await store.record_success("aws")
    await store.reset()
    assert dict(await store.view()) == {} and store.disabled == {"droid"}
    assert loop.time() - t0 < 1.0
    outages = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outages) == 1 and not store.connected and not store._supervisor.done()
    await store.close()
    await fake.close()


@pytest.mark.parametrize("mode", ["garbage", "ok", "idle"])
async def test_redis_turning_to_garbage_mid_run_fails_no_call(redis_server, mode, caplog):
    caplog.set_level(logging.INFO, logger="claude_router")
    fake = await FakeRedis("pass", upstream=redis_server.port).start()
    clock = Clock()
    store = RedisHealthStore(fake.url, B, clock=clock, rand=lambda: 0.0)
    store.track(NAMES)
    assert await store.wait_synced(5)
    await store.record_failure("aws")
    assert redis_server.cli("HGET", P + "ep|aws", "f") == "1"
    fake.mode = mode
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(3):
        await store.record_failure("aws")  # the first finds the garbage, the rest go local
    assert phase(store.current()["aws"], clock()) is Phase.COOLING
    assert loop.time() - t0 < 1.0  # one bounded round trip at most
    for call in (store.try_probe("droid"), store.release_probe("aws"), store.set_disabled("droid", True),
                 store.record_success("droid"), store.reset("droid"), store.view()):
        await call
    assert not store.connected
    await asyncio.sleep(1.5)  # the supervisor meets the garbage too, and survives it
    assert not store._supervisor.done() and not store.connected
    fake.mode = "pass"
    assert await _eventually(lambda: store.connected, 5)
    # Re-synced: Redis holds nothing newer about aws than the failure this store wrote, so the
    # cooldown learned meanwhile is kept, and put back in Redis for the other instances.
    assert phase(store.current()["aws"], clock()) is Phase.COOLING
    assert int(redis_server.cli("HGET", P + "ep|aws", "u")) == int(store.current()["aws"].ejected_until * 1000)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("kept 1 cooldown(s) learned while Redis was away (aws)" in m for m in messages) == 1
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1
    await store.close()
    await fake.close()


async def test_instances_sharing_redis_share_one_salt_so_a_key_is_scoped_alike(redis_server):
    clock = Clock()
    a = await synced(redis_server, clock, ("aws",))
    b = await synced(redis_server, clock, ("aws",))
    assert a.salt == b.salt and len(a.salt) >= 32
    for s in (a, b):
        await s.close()


async def test_a_key_scope_learned_by_one_instance_cools_it_for_that_key_on_another(redis_server):
    clock = Clock()
    a = await synced(redis_server, clock, ("aws",))
    b = await synced(redis_server, clock, ("aws",))
    await a.record_failure("aws@0123456789abcdef", at_least=30)
    await until(lambda: "aws@0123456789abcdef" in b.current())  # the change reaches b over the events channel
    assert phase(b.current()["aws@0123456789abcdef"], clock()) is Phase.COOLING
    assert "aws" not in b.current()
    c = await synced(redis_server, clock, ("aws",))  # a re-sync keeps the scopes it holds
    await c.record_failure("aws@0123456789abcdef", at_least=1)
    await c._resync()
    assert phase(c.current()["aws@0123456789abcdef"], clock()) is Phase.COOLING
    for s in (a, b, c):
        await s.close()


async def test_a_disabled_endpoint_is_put_back_after_redis_loses_its_state(redis_server):
    clock = Clock()
    a = await synced(redis_server, clock, ("aws", "droid"))
    b = await synced(redis_server, clock, ("aws", "droid"))
    await a.set_disabled("aws", True)
    await until(lambda: b.disabled == {"aws"})
    assert b.disabled == {"aws"}
    redis_server.cli("FLUSHALL")  # what a restart without persistence leaves
    # each instance notices the new epoch and puts back what it held
    await until(lambda: redis_server.cli("SMEMBERS", "endpoint_health_|disabled").split() == ["aws"]
                and a._epoch == b._epoch == redis_server.cli("GET", "endpoint_health_|epoch").encode()
                and a.disabled == b.disabled == {"aws"}, timeout=20.0)
    assert redis_server.cli("SMEMBERS", "endpoint_health_|disabled").split() == ["aws"]
    assert a.disabled == b.disabled == {"aws"}
    await a.set_disabled("aws", False)  # and an operator's enable still holds everywhere
    await until(lambda: not b.disabled)
    assert not b.disabled
    for s in (a, b):
        await s.close()


async def test_an_operator_decision_given_while_redis_is_away_is_written_when_it_is_back(redis_server):
    """An enable given while this instance's Redis link is down (or while it re-syncs) holds at
    once, survives the re-sync, and reaches every instance: it is never undone by what Redis
    held before."""
    clock = Clock()
    a = await synced(redis_server, clock, ("aws",))
    b = await synced(redis_server, clock, ("aws",))
    await a.set_disabled("aws", True)
    await until(lambda: b.disabled == {"aws"})
    assert b.disabled == {"aws"}
    a._up = False  # Redis away for a (or a re-sync under way)
    await a.set_disabled("aws", False)
    assert "aws" not in a.disabled  # it holds here at once
    await a._resync()  # Redis still says disabled: the operator's later word wins
    assert "aws" not in a.disabled
    assert redis_server.cli("SMEMBERS", "endpoint_health_|disabled").split() == []
    await until(lambda: not b.disabled)
    assert not b.disabled
    for s in (a, b):
        await s.close()


async def test_an_enable_after_redis_lost_its_state_holds_against_a_late_instance(redis_server):
    # b notices the lost state only after a put "aws" back and an operator enabled it again:
    # b's stale copy must not disable it anew.
    clock = Clock()
    a = await synced(redis_server, clock, ("aws",))
    b = await synced(redis_server, clock, ("aws",))
    await a.set_disabled("aws", True)
    await until(lambda: b.disabled == {"aws"})
    redis_server.cli("FLUSHALL")
    await a._resync()  # a notices first and puts it back
    assert redis_server.cli("SMEMBERS", "endpoint_health_|disabled").split() == ["aws"]
    await a.set_disabled("aws", False)  # the operator enables it
    await until(lambda: not b.disabled)  # b hears both messages (but checks the epoch only every 2 s)
    assert not b.disabled
    b._disabled.add("aws")  # as if b had not heard them: its copy from before the loss
    await b._resync()
    assert redis_server.cli("SMEMBERS", "endpoint_health_|disabled").split() == []
    assert "aws" not in b.disabled
    for s in (a, b):
        await s.close()


async def test_a_cooldown_learned_while_redis_was_away_is_kept_and_shared(redis_server):
    clock = Clock()
    a = await synced(redis_server, clock, ("aws", "droid"))
    a._up = False  # Redis away: the local transition applies
    for _ in range(3):
        await a.record_failure("aws")
    assert phase(a.current()["aws"], clock()) is Phase.COOLING
    await a._resync()  # Redis is back: its view has nothing about aws
    assert phase(a.current()["aws"], clock()) is Phase.COOLING  # kept
    b = await synced(redis_server, clock, ("aws", "droid"))
    assert phase(b.current()["aws"], clock()) is Phase.COOLING  # and put back for the others
    for s in (a, b):
        await s.close()


async def b_cools_aws_and_a_hears(redis_server, clock, at_least):
    """Two instances, a and b: b cools aws for ``at_least`` seconds and a has heard of it."""
    a = await synced(redis_server, clock, ("aws",))
    b = await synced(redis_server, clock, ("aws",))
    await b.record_failure("aws", at_least=at_least)
    await until(lambda: "aws" in a.current())
    return a, b


async def test_a_re_sync_that_read_redis_earlier_never_finishes_after_a_later_one(redis_server):
    """Two re-syncs at once (the supervisor's and another): the one that read Redis before a
    change must not put its older state back after the one that read it later."""
    clock = Clock()
    a, b = await b_cools_aws_and_a_hears(redis_server, clock, at_least=10)
    read, gate, waiting = asyncio.Event(), asyncio.Event(), asyncio.Event()
    real_pipeline = a._client.pipeline

    def pipeline(*args, **kwargs):  # the first re-sync's read is held back after it is made
        pipe = real_pipeline(*args, **kwargs)
        if not read.is_set():
            execute = pipe.execute

            async def held(*a_, **kw):
                replies = await execute(*a_, **kw)
                read.set()
                await gate.wait()
                return replies
            pipe.execute = held
        return pipe

    class Watched(asyncio.Lock):  # says when a re-sync has to wait for the one running
        async def acquire(self):
            if self.locked():
                waiting.set()
            return await super().acquire()

    a._client.pipeline = pipeline
    a._resync_lock = Watched()
    first = asyncio.create_task(a._resync())
    await read.wait()  # it read +10 s
    await b.reset("aws")
    await b.record_failure("aws", at_least=2)
    second = asyncio.create_task(a._resync())  # it reads +2 s
    blocked = asyncio.create_task(waiting.wait())
    async with asyncio.timeout(10):
        await asyncio.wait({second, blocked}, return_when=asyncio.FIRST_COMPLETED)
        gate.set()  # the first may finish now: after the second, if nothing kept them apart
        await asyncio.gather(first, second)
    blocked.cancel()
    assert a.current()["aws"].ejected_until == clock() + 2
    for s in (a, b):
        await s.close()


async def test_a_reset_is_not_undone_by_an_instance_that_had_not_heard_of_it(redis_server):
    """A re-sync read Redis before an operator's reset and would put back the cooldown it held:
    the reset is newer, so Redis refuses it (the third loaded run's +10 s instead of +2 s)."""
    clock = Clock()
    a, b = await b_cools_aws_and_a_hears(redis_server, clock, at_least=10)
    known, held = dict(a._versions), {"aws": a.current()["aws"]}  # what the re-sync read
    await b.reset("aws")
    await a._reassert(["aws"], held, [], known, {})
    assert redis_server.cli("EXISTS", P + "ep|aws") == "0"
    await until(lambda: "aws" not in a.current())
    assert "aws" not in a.current() and "aws" not in b.current()
    for s in (a, b):
        await s.close()


async def test_a_cooldown_put_back_late_gives_way_to_a_newer_one_and_takes_it(redis_server):
    clock = Clock()
    a, b = await b_cools_aws_and_a_hears(redis_server, clock, at_least=10)
    known, held = dict(a._versions), {"aws": a.current()["aws"]}
    await b.reset("aws")
    await b.record_failure("aws", at_least=2)  # newer, and shorter
    await a._reassert(["aws"], held, [], known, {})
    assert redis_server.cli("HGET", P + "ep|aws", "u") == str(int((clock() + 2) * 1000))
    await until(lambda: a.current().get("aws") == b.current().get("aws"))
    assert a.current()["aws"].ejected_until == clock() + 2
    for s in (a, b):
        await s.close()


async def test_a_cooldown_learned_while_away_after_a_heal_it_heard_of_is_put_back(redis_server):
    clock = Clock()
    a, b = await b_cools_aws_and_a_hears(redis_server, clock, at_least=5)
    await b.reset("aws")
    await until(lambda: "aws" not in a.current())  # a heard of the heal
    a._up = False
    await a.record_failure("aws", at_least=30)  # learned while Redis was away
    await a._resync()
    assert redis_server.cli("HGET", P + "ep|aws", "u") == str(int((clock() + 30) * 1000))
    await until(lambda: "aws" in b.current())
    assert b.current()["aws"].ejected_until == clock() + 30
    for s in (a, b):
        await s.close()


async def test_a_newer_decision_in_redis_wins_over_a_cooldown_held_here(redis_server):
    clock = Clock()
    a, b = await b_cools_aws_and_a_hears(redis_server, clock, at_least=5)
    a._up = False
    await a.record_failure("aws", at_least=30)  # held here only
    await b.record_failure("aws", at_least=10)  # a newer decision in Redis: shorter is ignored
    await b.reset("aws")  # an operator's reset: the newest decision
    await b.record_failure("aws", at_least=2)
    await a._resync()
    assert a.current()["aws"].ejected_until == clock() + 2
    for s in (a, b):
        await s.close()
