"""The breaker's transitions, as pure functions and through the memory store (injected clock)."""

from dataclasses import replace

import pytest

from claude_router.health import (
    HEALTHY,
    Breaker,
    MemoryHealthStore,
    Phase,
    after_failure,
    after_success,
    phase,
    release_probe,
    seconds_left,
    try_probe,
)

B = Breaker(max_failures=3, cooldown=60, max_cooldown=600, jitter=0.2, probe_timeout=30)


def fail(h, now, n=1, **kw):
    for _ in range(n):
        h = after_failure(h, now, B, **kw)
    return h


def test_failures_below_threshold_keep_endpoint_usable():
    h = fail(HEALTHY, 0, 2)
    assert phase(h, 0) is Phase.FAILING and h.failures == 2


def test_threshold_ejects_for_the_base_cooldown():
    h = fail(HEALTHY, 100, 3)
    assert phase(h, 100) is Phase.COOLING
    assert seconds_left(h, 100) == 60


def test_success_resets_the_count():
    h = after_success(fail(HEALTHY, 0, 2))
    assert fail(h, 0, 2).failures == 2 and phase(fail(h, 0, 2), 0) is Phase.FAILING


def test_cooldown_end_makes_endpoint_half_open():
    h = fail(HEALTHY, 0, 3)
    assert phase(h, 59.9) is Phase.COOLING
    assert phase(h, 60) is Phase.HALF_OPEN


def test_only_one_probe_at_a_time():
    h = try_probe(fail(HEALTHY, 0, 3), 60, B)
    assert h is not None and phase(h, 61) is Phase.PROBING
    assert try_probe(h, 61, B) is None


def test_probe_lock_expires_if_the_probe_never_reports():
    h = try_probe(fail(HEALTHY, 0, 3), 60, B)
    assert phase(h, 90) is Phase.HALF_OPEN


def test_probe_success_heals():
    h = try_probe(fail(HEALTHY, 0, 3), 60, B)
    assert after_success(h) == HEALTHY


def test_probe_failure_ejects_again_for_longer():
    h = try_probe(fail(HEALTHY, 0, 3), 60, B)
    h = after_failure(h, 61, B, rand=0.0)
    assert phase(h, 61) is Phase.COOLING
    assert seconds_left(h, 61) == 120
    assert h.ejections == 2


def test_release_frees_a_probe_in_flight_at_once():
    h = try_probe(fail(HEALTHY, 0, 3), 60, B)
    freed = release_probe(h, 61)
    assert phase(freed, 61) is Phase.HALF_OPEN
    assert freed == replace(h, probe_until=0.0)
    assert try_probe(freed, 61, B) is not None


def test_release_changes_nothing_but_a_probe_in_flight():
    half_open = fail(HEALTHY, 0, 3)
    for h, now in [(HEALTHY, 0), (fail(HEALTHY, 0, 2), 0), (half_open, 10), (half_open, 60),
                   (try_probe(half_open, 60, B), 90)]:  # healthy, failing, cooling, half-open, expired
        assert release_probe(h, now) is h


def test_release_with_held_frees_only_that_probe():
    first = try_probe(fail(HEALTHY, 0, 3), 60, B)
    second = try_probe(first, 95, B)  # the first expired at 90; another request took a new one
    assert release_probe(second, 96, held=first.probe_until) is second
    assert phase(release_probe(second, 96, held=second.probe_until), 96) is Phase.HALF_OPEN


def test_repeated_ejections_are_capped_and_jittered():
    assert B.ejection_time(10, rand=0.0) == 600
    assert B.ejection_time(2, rand=1.0) == pytest.approx(144)
    assert B.ejection_time(1, rand=1.0) == 60  # the first cooldown is exactly the base


def test_failure_while_cooling_does_not_shorten_or_count():
    h = fail(HEALTHY, 0, 3)
    assert fail(h, 10) == h


def test_at_least_ejects_below_threshold_and_never_shortens():
    h = after_failure(HEALTHY, 0, B, at_least=5)
    assert phase(h, 0) is Phase.COOLING and seconds_left(h, 0) == 5
    long = fail(HEALTHY, 0, 3)
    assert after_failure(long, 1, B, at_least=5) == long
    longer = after_failure(long, 1, B, at_least=100)
    assert seconds_left(longer, 1) == 100


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


async def test_memory_store_trips_after_max_failures():
    clock = Clock()
    store = MemoryHealthStore(B, clock=clock)
    for _ in range(3):
        await store.record_failure("aws")
    assert phase((await store.view())["aws"], clock()) is Phase.COOLING


async def test_memory_store_single_probe_after_cooldown():
    clock = Clock()
    store = MemoryHealthStore(B, clock=clock, rand=lambda: 0.0)
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws") is True
    assert await store.try_probe("aws") is False
    await store.record_success("aws")
    assert "aws" not in await store.view()


async def test_memory_store_success_on_healthy_writes_nothing():
    store = MemoryHealthStore(B, clock=Clock())
    await store.record_success("aws")
    assert dict(await store.view()) == {}


async def test_memory_store_release_probe_lets_the_next_request_probe():
    clock = Clock()
    store = MemoryHealthStore(B, clock=clock, rand=lambda: 0.0)
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws") is True
    assert await store.try_probe("aws") is False
    clock.t += 1
    await store.release_probe("aws")  # its client went away: no outcome
    assert phase((await store.view())["aws"], clock()) is Phase.HALF_OPEN
    assert await store.try_probe("aws") is True
    assert await store.try_probe("aws") is False


async def test_memory_store_release_without_a_probe_held_changes_nothing():
    clock = Clock()
    store = MemoryHealthStore(B, clock=clock, rand=lambda: 0.0)
    await store.release_probe("aws")
    assert dict(await store.view()) == {}
    for _ in range(3):
        await store.record_failure("aws")
    clock.t += 60
    assert await store.try_probe("aws") is True
    await store.record_failure("aws")  # the probe failed: an outcome, nothing left to release
    cooling = (await store.view())["aws"]
    await store.release_probe("aws")
    assert (await store.view())["aws"] is cooling
