"""The pure parts of out-of-band probes and subscription windows (issue 22, points 1 and 3):
the probe spec in router.yaml, due times with jitter, which endpoints to probe, the probe
request, the cost cap per hour, the window headers and their cap; and the prober's decisions
over a memory store with an injected clock."""

import asyncio
import json

import pytest

from claude_router import config, probes, windows
from claude_router.endpoints import Endpoint
from claude_router.health import Breaker, Health, MemoryHealthStore, Phase, phase
from claude_router.policy import Attempt
from claude_router.probes import HourlyCap, Prober, ProbeSpec
from claude_router.routing import Settings, _asked_wait, _Tried
from claude_router.usage import Price


def endpoints_yaml(probe: str, extra: str = "    key: sk-own-0a1b2c3d\n") -> dict:
    from ruamel.yaml import YAML
    return YAML(typ="safe", pure=True).load(
        f"endpoints:\n  - name: aws\n    url: https://relay.example/aws\n{extra}    probe: {probe}\n")


def parse(probe: str, extra: str = "    key: sk-own-0a1b2c3d\n") -> Endpoint:
    return config.parse(endpoints_yaml(probe, extra), "r.yaml", {"PROBE_KEY": "sk-probe-9z8y7x"}).endpoints[0]


# -- the spec -------------------------------------------------------------------------------


def test_probe_true_is_a_free_models_probe_every_15_s():
    assert parse("true").probe == ProbeSpec("/v1/models", None, 15.0)


def test_no_probe_field_means_no_probe():
    assert parse("false").probe is None


def test_a_count_tokens_probe_with_its_model_and_interval():
    spec = parse("{path: /v1/messages/count_tokens, model: claude-haiku-4-5, every: 30}").probe
    assert spec is not None and spec.method == "POST" and not spec.paid and spec.every == 30


@pytest.mark.parametrize("probe, message", [
    ("{pth: /v1/models}", "r.yaml: endpoints[0] (aws).probe.pth: unknown field (did you mean path?)"),
    ("{path: /v1/complete}", "r.yaml: endpoints[0] (aws).probe.path: must be one of /v1/models, "
                             "/v1/messages/count_tokens, /v1/messages"),
    ("{path: /v1/messages}", "r.yaml: endpoints[0] (aws).probe.model: a /v1/messages probe needs a "
                             "model id (as this endpoint names it)"),
    ("{every: 0}", "r.yaml: endpoints[0] (aws).probe.every: must be a number of seconds >= 0.1"),
    ("{every: true}", "r.yaml: endpoints[0] (aws).probe.every: must be a number of seconds >= 0.1"),
    ("{model: x}", "r.yaml: endpoints[0] (aws).probe.model: only count_tokens and messages probes "
                   "send a model"),
    ("[1]", "r.yaml: endpoints[0] (aws).probe: expected true or a mapping with every, key, model, "
            "path, usd_per_hour"),
    ("{path: /v1/messages, model: m}", "r.yaml: endpoints[0] (aws).probe: a /v1/messages probe needs "
                                       "the endpoint's price (its cost is capped per hour in USD)"),
])
def test_a_bad_probe_spec_is_a_one_line_error(probe, message):
    with pytest.raises(config.ConfigError) as e:
        parse(probe)
    assert str(e.value) == message


def test_an_endpoint_that_takes_the_clients_key_needs_a_probe_key():
    with pytest.raises(config.ConfigError, match="takes its clients' keys, which the router never keeps"):
        parse("true", extra="")
    ep = parse("{key: env:PROBE_KEY}", extra="")
    assert ep.probe is not None and ep.probe.key == "sk-probe-9z8y7x"
    assert "sk-probe" not in repr(ep.probe)


def test_a_messages_probe_with_a_price_and_a_cap():
    ep = parse("{path: /v1/messages, model: m, usd_per_hour: 0.5}",
               extra="    key: k-own-0a1b2c3d\n    price: {input: 3, output: 15}\n")
    assert ep.probe is not None and ep.probe.paid and ep.probe.usd_per_hour == 0.5


# -- due times, what to probe ---------------------------------------------------------------


@pytest.mark.parametrize("rand, due", [(0.0, 112.0), (0.5, 115.0), (0.999999, 118.0)])
def test_the_next_probe_is_due_every_seconds_from_now_jittered_20_percent(rand, due):
    assert probes.next_due(100.0, 15.0, rand) == pytest.approx(due, abs=1e-4)


DEFAULT_SPEC = ProbeSpec()
TEN_SECONDS = ProbeSpec(every=10.0)


def ep(name="aws", probe: ProbeSpec | None = DEFAULT_SPEC, **kw) -> Endpoint:
    return Endpoint(name, f"https://relay.example/{name}", key=kw.pop("key", "sk-own-0a1b2c3d"),
                    probe=probe, **kw)


def test_only_cooling_or_half_open_endpoints_with_a_probe_are_wanted():
    eps = [ep("cool"), ep("half"), ep("fine"), ep("bare", probe=None), ep("off"), ep("held")]
    cooling = Health(ejections=1, ejected_until=200.0)
    view = {"cool": cooling, "half": Health(ejections=1, ejected_until=50.0), "bare": cooling,
            "off": cooling, "held": cooling, "fine": Health(failures=2)}
    got = probes.wanted(eps, view, 100.0, {"off"}, {"held": 150.0})
    assert [subject for _, subject in got] == ["cool", "half"]
    assert [subject for _, subject in probes.wanted(eps, view, 160.0, {"off"}, {"held": 150.0})] == \
        ["cool", "half", "held"]


def test_a_cooling_model_family_is_probed_only_by_a_messages_probe_of_that_family():
    sonnet = ProbeSpec("/v1/messages", "claude-sonnet-4-5")
    eps = [ep("msg", probe=sonnet, price=Price(1, 5)), ep("free"),
           ep("other", probe=ProbeSpec("/v1/messages", "claude-opus-4-1"), price=Price(1, 5))]
    cooling = Health(ejections=1, ejected_until=200.0)
    view = {"msg~sonnet": cooling, "free~sonnet": cooling, "other~sonnet": cooling}
    assert [(e.name, subject) for e, subject in probes.wanted(eps, view, 100.0, set(), {})] == \
        [("msg", "msg~sonnet")]


# -- the request ----------------------------------------------------------------------------


def test_a_models_probe_carries_the_endpoints_own_key_only():
    method, path, headers, body = probes.probe_request(ep())
    assert (method, path, body) == ("GET", "/v1/models", b"")
    assert ("x-api-key", "sk-own-0a1b2c3d") in headers
    assert [k for k, _ in headers if k.lower() in ("x-api-key", "authorization")] == ["x-api-key"]


def test_a_probe_key_is_sent_the_endpoints_way():
    e = ep(key=None, auth="bearer", probe=ProbeSpec(key="sk-probe-1"))
    _, _, headers, _ = probes.probe_request(e)
    assert ("authorization", "Bearer sk-probe-1") in headers


def test_a_messages_probe_asks_for_one_token():
    e = ep(probe=ProbeSpec("/v1/messages", "claude-haiku-4-5"), price=Price(1, 5))
    method, path, headers, body = probes.probe_request(e)
    assert method == "POST" and ("content-type", "application/json") in headers
    assert json.loads(body) == {"model": "claude-haiku-4-5", "max_tokens": 1,
                                "messages": [{"role": "user", "content": "ping"}]}


# -- the cost cap ---------------------------------------------------------------------------


def test_a_probe_costs_a_few_tokens_at_the_endpoints_price():
    assert probes.probe_cost(Price(input=3, output=15)) == pytest.approx((16 * 3 + 15) / 1e6)


def test_the_cost_cap_counts_the_last_hour_only():
    cap = HourlyCap(0.01)
    for t in range(10):
        assert cap.allows(t, 0.001)
        cap.add(t, 0.001)
    assert not cap.allows(10, 0.001)
    assert not cap.allows(3599, 0.001)
    assert cap.allows(3600, 0.001)  # the first probe left the hour
    assert cap.spent(3605) == pytest.approx(0.004)


# -- windows --------------------------------------------------------------------------------


def test_a_rejected_5h_window_waits_until_its_reset_in_unix_seconds():
    h = {"anthropic-ratelimit-unified-5h-status": "rejected", "anthropic-ratelimit-unified-5h-reset": "8200"}
    assert windows.rejected_wait(h, 1000.0) == 7200.0


def test_a_rejected_7d_window_in_rfc_3339():
    h = {"anthropic-ratelimit-unified-7d-status": "rejected",
         "anthropic-ratelimit-unified-7d-reset": "1970-01-01T02:00:00Z"}
    assert windows.rejected_wait(h, 0.0) == 7200.0


def test_the_overall_unified_status_is_not_a_window():
    h = {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": "900"}
    assert windows.rejected_wait(h, 0.0) == 0.0


def test_the_latest_rejected_window_counts_and_allowed_ones_do_not():
    h = {"anthropic-ratelimit-unified-5h-status": "rejected", "anthropic-ratelimit-unified-5h-reset": "100",
         "anthropic-ratelimit-unified-7d-status": "rejected", "anthropic-ratelimit-unified-7d-reset": "900",
         "anthropic-ratelimit-unified-status": "allowed", "anthropic-ratelimit-unified-reset": "5000"}
    assert windows.rejected_wait(h, 0.0) == 900.0


@pytest.mark.parametrize("headers", [
    {},
    {"anthropic-ratelimit-unified-5h-status": "allowed", "anthropic-ratelimit-unified-5h-reset": "900"},
    {"anthropic-ratelimit-unified-5h-status": "rejected"},
    {"anthropic-ratelimit-unified-5h-status": "rejected", "anthropic-ratelimit-unified-5h-reset": "soon"},
    {"anthropic-ratelimit-unified-5h-status": "rejected", "anthropic-ratelimit-unified-5h-reset": "inf"},
])
def test_no_usable_rejected_window_is_no_wait(headers):
    assert windows.rejected_wait(headers, 0.0) == 0.0


def test_a_window_cools_until_its_reset_at_most_the_cap():
    assert windows.window_cooldown(7200, 18000) == 7200
    assert windows.window_cooldown(3 * 86400, 18000) == 18000
    assert windows.window_cooldown(-5, 18000) == 0


def test_a_window_wins_over_retry_after_and_has_its_own_cap():
    s = Settings(max_hint=600, window_cap=18000)
    tried = _Tried(None, Attempt("aws", "429"), hint=30, window=7200)
    assert _asked_wait(tried, s) == 7200
    assert _asked_wait(_Tried(None, Attempt("aws", "429"), hint=7200), s) == 600
    assert _asked_wait(_Tried(None, Attempt("aws", "529")), s) == 0


def test_router_window_cap_is_set_from_the_health_section():
    doc = endpoints_yaml("false")
    doc["health"] = {"window_cap": 3600}
    assert config.parse(doc, "r.yaml", {}).options["router_window_cap"] == 3600


# -- the prober over a memory store ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Resp:
    def __init__(self, status: int, headers=()) -> None:
        self.status = status
        self.headers = list(headers)

    async def read(self, limit):
        return b"{}", True

    def close(self) -> None:
        pass


class FakeUpstream:
    def __init__(self, *statuses) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple] = []

    async def send(self, endpoint, method, path, headers, body, timeouts):
        self.sent.append((endpoint.name, method, path))
        status = self.statuses.pop(0)
        return status if isinstance(status, Resp) else Resp(status)


def setup(*statuses, spec=TEN_SECONDS, price=None):
    clock = Clock()
    store = MemoryHealthStore(Breaker(max_failures=1, cooldown=60.0), clock=clock, rand=lambda: 0.0)
    up = FakeUpstream(*statuses)
    e = ep(probe=spec, price=price)
    prober = Prober(lambda: [e], lambda: store, up, clock=clock, rand=lambda: 0.5)  # type: ignore[arg-type]
    return clock, store, up, prober, e


def run(coro):
    return asyncio.run(coro)


def test_a_cooling_endpoint_is_probed_after_one_jittered_interval_and_a_pass_ends_the_cooldown():
    clock, store, up, prober, _ = setup(200)

    async def go():
        await store.record_failure("aws")
        await prober.tick()  # first seen cooling: the first probe is due in 10 s
        assert up.sent == []
        clock.now += 9.9
        await prober.tick()
        assert up.sent == []
        clock.now += 0.2
        await prober.tick()
        assert up.sent == [("aws", "GET", "/v1/models")]
        assert "aws" not in store.current()  # healthy
        assert prober.tally["aws"].last == "pass"

    run(go())


def test_a_failing_probe_during_the_cooldown_changes_nothing():
    clock, store, up, prober, e = setup(529)

    async def go():
        before = await store.record_failure("aws")
        assert await prober.probe(e, store) is False
        assert store.current()["aws"] == before

    run(go())


def test_a_failing_probe_once_half_open_ejects_it_again_for_longer():
    clock, store, up, prober, e = setup(529)

    async def go():
        await store.record_failure("aws")
        clock.now += 61  # the cooldown ran out: half-open
        assert await prober.probe(e, store) is False
        h = store.current()["aws"]
        assert phase(h, clock.now) is Phase.COOLING and h.ejections == 2
        assert h.ejected_until - clock.now == 120.0

    run(go())


def test_no_probe_while_a_user_request_holds_the_half_open_probe():
    clock, store, up, prober, e = setup(200)

    async def go():
        await store.record_failure("aws")
        clock.now += 61
        assert await store.try_probe("aws")
        assert await prober.probe(e, store) is None and up.sent == []

    run(go())


def test_an_endpoint_held_by_its_own_answer_is_not_probed_until_then():
    clock, store, up, prober, _ = setup(200)

    async def go():
        await store.record_failure("aws", at_least=7200)
        prober.hold("aws", clock.now + 7200)
        for _ in range(3):
            clock.now += 20
            await prober.tick()
        assert up.sent == []

    run(go())


def test_a_window_rejection_of_a_probe_holds_the_endpoint_until_the_reset():
    window = Resp(429, [("anthropic-ratelimit-unified-5h-status", "rejected"),
                        ("anthropic-ratelimit-unified-5h-reset", "8200")])
    clock, store, up, prober, e = setup(window)

    async def go():
        await store.record_failure("aws")
        assert await prober.probe(e, store) is False
        assert prober.holds["aws"] == 8200
        assert store.current()["aws"].ejected_until == 8200

    run(go())


def test_messages_probes_stop_at_the_cost_cap():
    spec = ProbeSpec("/v1/messages", "m", every=1.0, usd_per_hour=3 * probes.probe_cost(Price(1000, 1000)))
    clock, store, up, prober, e = setup(529, 529, 529, 529, spec=spec, price=Price(1000, 1000))

    async def go():
        await store.record_failure("aws")
        results = []
        for _ in range(4):
            results.append(await prober.probe(e, store))
            clock.now += 1
        assert results == [False, False, False, None]
        assert len(up.sent) == 3 and prober.tally["aws"].capped == 1

    run(go())


# -- what a free probe may judge ------------------------------------------------------------


@pytest.mark.parametrize("cause, waited, ok", [
    ("HTTP 529 overloaded_error", False, True),
    ("HTTP 503", False, True),
    ("connection refused", False, True),
    ("", False, True),  # unknown (another worker's cooldown): as before
    ("HTTP 402", False, False),
    ("HTTP 402 billing_error", True, False),
    ("HTTP 401 authentication_error", False, False),
    ("HTTP 403", False, False),
    ("HTTP 400 billing_error", False, False),
    ("HTTP 429 rate_limit_error", False, False),  # no word on how long: a free probe cannot tell
    ("HTTP 429 rate_limit_error", True, True),  # it said how long, and that time is over
])
def test_a_free_probe_ends_only_capacity_cooldowns(cause, waited, ok):
    assert probes.free_may_end(cause, waited) is ok


def test_a_relay_whose_models_answer_while_messages_answer_402_is_not_healed_by_a_free_probe():
    clock, store, up, prober, e = setup(200, 200)
    prober.cause = lambda name: "HTTP 402 billing_error"

    async def go():
        await store.record_failure("aws")
        assert await prober.probe(e, store) is None and up.sent == []  # not sent
        clock.now += 61  # half-open: left to a user request, whose failure ejects it for longer
        assert await prober.probe(e, store) is None and up.sent == []
        assert store.current()["aws"].ejections == 1

    run(go())


def test_a_rate_limit_with_its_wait_is_probed_once_the_wait_is_over():
    clock, store, up, prober, _ = setup(200)
    prober.cause = lambda name: "HTTP 429 rate_limit_error"

    async def go():
        await store.record_failure("aws", at_least=30)
        prober.hold("aws", clock.now + 30)
        for _ in range(5):
            clock.now += 10
            await prober.tick()
        assert up.sent == [("aws", "GET", "/v1/models")] and "aws" not in store.current()

    run(go())


def test_a_messages_probe_judges_a_billing_cooldown():
    spec = ProbeSpec("/v1/messages", "m", every=1.0, usd_per_hour=1.0)
    clock, store, up, prober, e = setup(200, spec=spec, price=Price(1, 1))
    prober.cause = lambda name: "HTTP 402 billing_error"

    async def go():
        await store.record_failure("aws")
        assert await prober.probe(e, store) is True and "aws" not in store.current()

    run(go())


def test_close_cancels_the_loop_and_waits_until_it_has_ended():
    clock, store, up, prober, _ = setup()

    async def go():
        ended = asyncio.Event()

        async def loop():
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0)  # (a probe letting go of its connection)
                ended.set()

        task = asyncio.get_running_loop().create_task(loop())
        await asyncio.sleep(0)
        await prober.close(task)
        assert task.done() and ended.is_set()

    run(go())


def test_the_router_tells_its_prober_what_cooled_an_endpoint():
    from claude_router.addon import Router
    r = Router()
    assert r.prober.cause("aws") == ""
    r.stats.attempts([Attempt("aws", "402", "HTTP 402 billing_error")], [True])
    assert r.prober.cause("aws") == "HTTP 402 billing_error"
