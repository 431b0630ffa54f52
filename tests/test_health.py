"""The breaker's transitions, as pure functions and through the memory store (injected clock)."""

from dataclasses import replace

import pytest

from claude_router.health import (
    HEALTHY,
    Breaker,
    Health,
    MemoryHealthStore,
    Phase,
    Scopes,
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


# -- edges found by mutation testing (./scripts/mutation, docs/mutation.md) -------------------


def test_each_repeated_ejection_doubles_the_cooldown_before_the_cap():
    assert [B.ejection_time(n) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert B.ejection_time(2) == 120  # no jitter unless a random draw is given


def test_a_single_failure_is_failing_not_healthy_and_a_success_heals():
    assert phase(Health(failures=1), 0) is Phase.FAILING
    assert phase(HEALTHY, 0) is Phase.HEALTHY
    assert after_success(Health(failures=2, ejections=3)) == HEALTHY


def test_an_ejection_at_the_threshold_uses_the_random_draw_and_clears_the_count():
    h = fail(HEALTHY, 0, 2)
    ejected = after_failure(h, 0, B, rand=1.0)
    assert ejected == Health(failures=0, ejections=1, ejected_until=60)
    again = after_failure(replace(ejected, ejected_until=0), 100, B, rand=1.0)
    assert again == Health(failures=0, ejections=2, ejected_until=100 + 144)
    assert after_failure(replace(ejected, ejected_until=0), 100, B).ejected_until == 100 + 120


def test_a_hint_below_the_threshold_ejects_once_and_clears_the_count():
    h = after_failure(Health(failures=1), 0, B, at_least=0.5)
    assert h == Health(failures=0, ejections=1, ejected_until=0.5)


def test_a_hint_longer_than_a_running_cooldown_extends_it_by_any_amount():
    h = Health(ejections=1, ejected_until=10)
    assert after_failure(h, 5, B, at_least=5.5).ejected_until == 10.5
    assert after_failure(h, 5, B, at_least=5) is h  # the same end: nothing changes


def test_seconds_left_is_zero_once_the_cooldown_is_over():
    assert seconds_left(Health(ejections=1, ejected_until=10), 10.5) == 0
    assert seconds_left(Health(ejections=1, ejected_until=10), 9.5) == 0.5


def scoped(until=0.0, probe=0.0):
    return Health(ejections=1, ejected_until=until, probe_until=probe)


def test_scopes_keep_only_endpoint_at_key_entries_in_order():
    s, states = Scopes(limit=10, ttl=5), {"a": scoped(100), "a@k1": scoped(100), "a@k2": scoped(100)}
    for name in ("a", "a@k1", "a@k2", "a@k1"):
        s.touched(states, name)
    assert s.names() == ["a@k2", "a@k1"] and len(s) == 2
    del states["a@k2"]
    s.touched(states, "a@k2")  # gone from the view: no longer kept
    assert s.names() == ["a@k1"]
    s.clear()
    assert s.names() == [] and len(s) == 0


def test_scopes_drop_the_least_recent_beyond_their_limit():
    s, states = Scopes(limit=2, ttl=5), {}
    for i in range(3):
        states[f"a@k{i}"] = scoped(100)
        s.touched(states, f"a@k{i}")
    assert s.names() == ["a@k1", "a@k2"] and set(states) == {"a@k1", "a@k2"}


def test_scopes_expire_the_two_oldest_only_after_cooldown_plus_ttl():
    s, states = Scopes(limit=10, ttl=5), {}
    for i, until in enumerate((10, 10, 10)):
        states[f"a@k{i}"] = scoped(until)
        s.touched(states, f"a@k{i}")
    s.touched(states, "a@k2", now=15)  # 10 + 5 is not before 15: kept
    assert s.names() == ["a@k0", "a@k1", "a@k2"]
    states["a@k1"] = scoped(10, probe=20)  # a probe in flight keeps it
    s.touched(states, "a@k2", now=15.5)
    assert s.names() == ["a@k1", "a@k2"] and "a@k0" not in states
    s.touched(states, "a@k2", now=20)  # a@k1's probe holds until 20: kept; a@k2 expired
    assert s.names() == ["a@k1"] and set(states) == {"a@k1"}
    s.touched(states, "a@k2", now=20.5)
    assert s.names() == [] and states == {}


def test_scopes_default_to_a_bound_and_a_two_minute_ttl():
    s = Scopes()
    assert (s.limit, s.ttl, len(s)) == (10_000, 120.0, 0)


async def test_the_memory_store_keeps_a_key_scope_for_twice_the_cooldown():
    clock = Clock(0.0)
    store = MemoryHealthStore(B, clock=clock)
    assert store.scopes.ttl == 120 and len(store.salt) == 32 and store.disabled == frozenset()
    await store.record_failure("aws@k", at_least=10)
    clock.t = 200
    await store.record_failure("aws@j", at_least=10)  # 10 + 120 < 200: aws@k is dropped
    assert set(await store.view()) == {"aws@j"}


def test_a_new_cooldown_changes_how_long_key_scopes_are_kept():
    """router_cooldown changed live: the store gets a new breaker, and its key scopes follow."""
    store = MemoryHealthStore(B)
    store.breaker = replace(B, cooldown=300)
    assert store.scopes.ttl == 600


async def test_the_memory_store_passes_the_hint_and_the_random_draw():
    clock = Clock(0.0)
    store = MemoryHealthStore(B, clock=clock, rand=lambda: 1.0)
    assert (await store.record_failure("aws", at_least=0.5)).ejected_until == 0.5
    clock.t = 1
    h = await store.record_failure("aws")  # the failed probe of a half-open endpoint
    assert h.ejected_until == 1 + 144
    assert (await store.record_failure("new")).failures == 1  # no hint by default


async def test_a_probe_taken_on_a_key_scope_is_kept_in_the_view():
    clock = Clock(0.0)
    store = MemoryHealthStore(B, clock=clock)
    assert await store.try_probe("healthy") is False
    await store.record_failure("aws@k", at_least=10)
    clock.t = 10
    assert await store.try_probe("aws@k") is True
    assert store.scopes.names() == ["aws@k"]
    await store.record_success("aws@k")
    assert store.scopes.names() == [] and dict(store.current()) == {}


async def test_releasing_frees_only_the_probe_this_store_took():
    clock = Clock(0.0)
    store = MemoryHealthStore(B, clock=clock)
    await store.record_failure("aws", at_least=10)
    clock.t = 10
    assert await store.try_probe("aws") is True
    clock.t = 10 + 30  # the probe expired; another instance took it since
    store._states["aws"] = replace(store._states["aws"], probe_until=100)
    await store.release_probe("aws")
    assert store.current()["aws"].probe_until == 100
    assert await store.try_probe("aws") is False
    await store.record_success("aws")
    await store.release_probe("aws")  # nothing held any more
    assert "aws" not in store.current()


async def test_disabling_an_endpoint_and_enabling_it_again():
    store = MemoryHealthStore(B, clock=Clock())
    await store.set_disabled("aws", True)
    await store.set_disabled("gcp", True)
    assert store.disabled == frozenset({"aws", "gcp"})
    await store.set_disabled("aws", False)
    assert store.disabled == frozenset({"gcp"})


async def test_reset_of_one_endpoint_clears_it_and_its_key_scopes_only():
    clock = Clock(0.0)
    store = MemoryHealthStore(B, clock=clock)
    for name in ("aws", "aws@k1", "aws@k2", "gcp", "gcp@k1", "awsx@k1"):
        await store.record_failure(name, at_least=10)
    clock.t = 10
    assert await store.try_probe("aws") is True
    await store.reset("aws")
    assert set(store.current()) == {"gcp", "gcp@k1", "awsx@k1"}
    assert store.scopes.names() == ["gcp@k1", "awsx@k1"]
    assert await store.try_probe("aws") is False  # healthy: nothing to probe
    await store.reset()
    assert dict(store.current()) == {} and store.scopes.names() == []


async def test_reset_of_a_healthy_endpoint_changes_nothing():
    store = MemoryHealthStore(B, clock=Clock())
    await store.reset("aws")
    assert dict(store.current()) == {}
