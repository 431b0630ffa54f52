"""Alerts (issue 23), the pure parts and the sender: the ``alerts:`` spec and its parser, the
health transition and budget detectors (views and clock given), the bodies, and delivery to a
real aiohttp receiver on loopback (retries, the bounded queue, claims in a real Redis)."""

import asyncio
import json
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from ruamel.yaml import YAML

from claude_router import alerts, config
from claude_router.alerts import Alerts, Event, Observation, Webhook, budget_events, health_events
from claude_router.clients import Budget
from claude_router.config import ConfigError
from claude_router.health import HEALTHY, Breaker, Health, after_failure

SRC = "router.yaml"
TOKEN = "T0KEN-b2c3d4e5f6a7"  # a webhook URL's token: never in a message
HOOK = f"https://hooks.example/services/{TOKEN}"
B = Breaker(max_failures=3, cooldown=60)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


NOW = ts("2026-12-09T15:30:00")


def doc(hooks) -> dict:
    return {"endpoints": [{"name": "aws", "url": "https://relay.example/aws"}], "alerts": hooks}


def parsed(hooks, env: dict | None = None) -> tuple[Webhook, ...]:
    return config.parse(doc(hooks), SRC, env or {}).alerts


def refused(hooks, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        config.parse(doc(hooks), SRC, env or {})
    message = str(exc.value)
    assert TOKEN not in message
    return message


# -- the spec ------------------------------------------------------------------------------------

def test_a_webhook_with_only_a_url_gets_every_event_as_json():
    (wh,) = parsed([{"url": HOOK}])
    assert wh.url == HOOK and wh.format == "json" and wh.events == frozenset(alerts.EVENTS)


def test_a_webhook_names_its_format_and_events():
    (wh,) = parsed([{"url": HOOK, "format": "slack", "events": ["cooled", "budget_100"]}])
    assert wh.format == "slack" and wh.events == {"cooled", "budget_100"}


def test_a_url_may_be_an_env_reference():
    (wh,) = parsed([{"url": "env:ALERT_HOOK"}], {"ALERT_HOOK": HOOK})
    assert wh.url == HOOK


def test_an_unset_env_reference_names_the_field():
    assert refused([{"url": "env:ALERT_HOOK"}]) == \
        "router.yaml: alerts[0].url: environment variable ALERT_HOOK is not set"


def test_no_config_has_no_webhooks():
    assert config.parse({"endpoints": [{"name": "aws", "url": "https://r.example"}]}, SRC, {}).alerts == ()


def test_a_misspelt_field_is_named_with_a_hint():
    assert refused([{"url": HOOK, "evnets": ["cooled"]}]) == \
        "router.yaml: alerts[0].evnets: unknown field (did you mean events?)"


def test_a_misspelt_event_is_named_with_a_hint():
    assert refused([{"url": HOOK, "events": ["cooled", "recoverd"]}]) == \
        "router.yaml: alerts[0].events: unknown event 'recoverd' (did you mean recovered?)"


def test_a_misspelt_section_is_named_with_a_hint():
    d = doc([{"url": HOOK}])
    d["alert"] = d.pop("alerts")
    with pytest.raises(ConfigError, match=r"alert: unknown section \(did you mean alerts\?\)"):
        config.parse(d, SRC, {})


@pytest.mark.parametrize("url, problem", [
    (f"ftp://hooks.example/{TOKEN}", "must be an http:// or https:// URL with a host"),
    (f"https:///{TOKEN}", "must be an http:// or https:// URL with a host"),
    (f"https://hooks.example:99999/{TOKEN}", "has a bad port"),
    (f"https://hooks.example/{TOKEN}\n", "contains a control character (CR, LF, NUL, ...)"),
    (f" https://hooks.example/{TOKEN}", "has leading or trailing whitespace"),
])
def test_a_bad_url_is_refused_without_quoting_it(url, problem):
    assert refused([{"url": url}]) == f"router.yaml: alerts[0].url: {problem}"


@pytest.mark.parametrize("hooks, message", [
    ({"url": HOOK}, "alerts: expected a list of webhooks (url, format, events)"),
    ([HOOK], "alerts[0]: expected a mapping with url, format and events"),
    ([{"format": "slack"}], "alerts[0].url: is required (a URL or an env:NAME reference)"),
    ([{"url": HOOK, "format": "teams"}], "alerts[0].format: must be json or slack"),
    ([{"url": HOOK, "events": []}], "alerts[0].events: expected a non-empty list of events"),
])
def test_malformed_sections_are_one_line_errors(hooks, message):
    assert refused(hooks) == f"router.yaml: {message}"


def test_logs_name_a_webhook_by_position_and_host_only():
    (_, wh) = parsed([{"url": "https://a.example/x"}, {"url": HOOK}])
    assert wh.shown == "alerts[1] (hooks.example)"
    assert TOKEN not in repr(wh)


# -- health transitions ------------------------------------------------------------------------

def failed(h: Health, now: float, times: int = 1, at_least: float = 0.0) -> Health:
    for _ in range(times):
        h = after_failure(h, now, B, at_least)
    return h


def kinds(events) -> list[tuple[str, str]]:
    return [(e.kind, e.subject) for e in events]


def test_an_ejection_is_cooled():
    cooled = failed(HEALTHY, NOW, 3)
    (e,) = health_events({}, NOW, {"aws": cooled}, NOW + 1, ["aws", "droid"])
    assert (e.kind, e.subject, e.fields["ejections"]) == ("cooled", "aws", 1)
    assert e.fields["cooldown_seconds"] == 59.0
    assert e.id == f"cooled|aws|{int(cooled.ejected_until * 1000)}"


def test_failures_below_the_threshold_are_no_news():
    assert health_events({}, NOW, {"aws": failed(HEALTHY, NOW, 2)}, NOW + 1, ["aws"]) == []


def test_a_cooldown_seen_again_or_extended_is_no_news():
    cooled = failed(HEALTHY, NOW, 3)
    assert health_events({"aws": cooled}, NOW, {"aws": cooled}, NOW + 1, ["aws"]) == []
    longer = failed(cooled, NOW + 1, at_least=300)  # a Retry-After while cooling
    assert longer.ejected_until > cooled.ejected_until
    assert health_events({"aws": cooled}, NOW + 1, {"aws": longer}, NOW + 2, ["aws"]) == []


def test_a_failed_probe_cools_again():
    cooled = failed(HEALTHY, NOW, 3)
    again = failed(cooled, NOW + 61)  # half-open: the probe failed
    (e,) = health_events({"aws": cooled}, NOW + 60, {"aws": again}, NOW + 61, ["aws", "droid"])
    assert (e.kind, e.fields["ejections"]) == ("cooled", 2)


def test_a_cooldown_first_seen_after_it_ended_is_still_told():
    cooled = failed(HEALTHY, NOW, 3)
    assert kinds(health_events({}, NOW, {"aws": cooled}, NOW + 61, ["aws"])) == [("cooled", "aws")]


def test_a_half_open_endpoint_has_not_recovered_yet():
    cooled = failed(HEALTHY, NOW, 3)
    assert health_events({"aws": cooled}, NOW + 30, {"aws": cooled}, NOW + 61, ["aws"]) == []


@pytest.mark.parametrize("after", [{}, {"aws": Health(failures=1)}])  # a success or reset; then a failure
def test_an_ejected_endpoint_back_in_use_recovered(after):
    cooled = failed(HEALTHY, NOW, 3)
    (e,) = health_events({"aws": cooled}, NOW + 61, after, NOW + 62, ["aws"])
    assert (e.kind, e.subject) == ("recovered", "aws")
    assert e.id == f"recovered|aws|{int(cooled.ejected_until * 1000)}"


def test_two_workers_seeing_the_same_transition_derive_the_same_id():
    cooled = failed(HEALTHY, NOW, 3)
    a = health_events({}, NOW, {"aws": cooled}, NOW + 0.2, ["aws"])
    b = health_events({}, NOW + 0.5, {"aws": cooled}, NOW + 0.9, ["aws"])
    assert [e.id for e in a] == [e.id for e in b]


def test_every_endpoint_cooling_is_told_once():
    aws, droid = failed(HEALTHY, NOW, 3), failed(HEALTHY, NOW + 5, 3)
    events = health_events({"aws": aws}, NOW + 1, {"aws": aws, "droid": droid}, NOW + 6, ["aws", "droid"])
    assert kinds(events) == [("cooled", "droid"), ("all_cooling", "")]
    assert events[1].fields == {"endpoints": ["aws", "droid"], "first_back_seconds": 54.0}
    both = {"aws": aws, "droid": droid}
    assert health_events(both, NOW + 6, both, NOW + 7, ["aws", "droid"]) == []


def test_a_disabled_endpoint_does_not_count_for_all_cooling():
    aws = failed(HEALTHY, NOW, 3)
    events = health_events({}, NOW, {"aws": aws}, NOW + 1, ["aws", "droid"], disabled={"droid"})
    assert kinds(events) == [("cooled", "aws"), ("all_cooling", "")]
    assert kinds(health_events({}, NOW, {"aws": aws}, NOW + 1, ["aws", "droid"])) == [("cooled", "aws")]


def test_only_whole_endpoints_are_watched():
    view = {"aws~opus": failed(HEALTHY, NOW, 3), "aws@0123456789abcdef": failed(HEALTHY, NOW, 3)}
    assert health_events({}, NOW, view, NOW + 1, ["aws"]) == []


# -- budgets -------------------------------------------------------------------------------------

DAY = Budget(10.0, "day")


def test_budget_levels():
    assert budget_events([("alice", DAY, 7.99)], NOW) == []
    (e,) = budget_events([("alice", DAY, 8.0)], NOW)
    assert (e.kind, e.subject, e.id) == ("budget_80", "alice", "budget_80|alice|2026-12-09T00:00:00Z")
    assert e.fields == {"client": "alice", "spent_usd": 8.0, "budget_usd": 10.0, "per": "day",
                        "percent": 80.0, "resets_at": "2026-12-10T00:00:00Z"}


def test_a_jump_past_both_levels_is_told_of_100_only():
    (e,) = budget_events([("alice", DAY, 12.5)], NOW)
    assert (e.kind, e.id) == ("budget_100", "budget_100|alice|2026-12-09T00:00:00Z")


def test_each_period_has_its_own_ids():
    today = budget_events([("alice", Budget(10.0, "week"), 9.0)], NOW)
    next_week = budget_events([("alice", Budget(10.0, "week"), 9.0)], NOW + 7 * 86400)
    assert today[0].id != next_week[0].id
    assert today[0].ttl > 86400  # claimed until its period ends, and a day more


def test_a_zero_budget_is_no_news():
    assert budget_events([("alice", Budget(0.0, "day"), 0.0)], NOW) == []


# -- the watcher's step and the bodies -----------------------------------------------------------

def watcher(*hooks: Webhook, clock=lambda: NOW) -> Alerts:
    return Alerts(clock=clock, webhooks=lambda: hooks)


def test_budget_levels_reached_before_the_first_look_are_known_not_told():
    a = watcher(Webhook(HOOK))
    assert a.look(Observation(NOW, ("aws",), {}, budgets=(("alice", DAY, 9.0),))) == []
    assert a.look(Observation(NOW + 1, ("aws",), {}, budgets=(("alice", DAY, 9.5),))) == []
    (e,) = a.look(Observation(NOW + 2, ("aws",), {}, budgets=(("alice", DAY, 10.0),)))
    assert e.kind == "budget_100"


def test_a_cooldown_at_the_first_look_is_told():
    a = watcher(Webhook(HOOK))
    view = {"aws": failed(HEALTHY, NOW, 3)}
    assert kinds(a.look(Observation(NOW, ("aws", "droid"), view))) == [("cooled", "aws")]


def test_an_event_id_is_queued_once_per_process():
    a = watcher(Webhook(HOOK))
    a.emit("balance_low", "aws", usd=4.2, min_usd=10)
    a.emit("balance_low", "aws", usd=4.1, min_usd=10)  # still low: the same day's id
    assert a.document()["webhooks"][0]["queued"] == 1


def test_a_webhook_gets_only_the_events_it_wants():
    a = watcher(Webhook(HOOK, events=frozenset({"cooled"})), Webhook("https://b.example/", index=1))
    a.emit("balance_low", "aws", usd=1.0, min_usd=10)
    assert [w["queued"] for w in a.document()["webhooks"]] == [0, 1]


def test_a_full_queue_drops_its_oldest_and_counts_it():
    a = watcher(Webhook(HOOK))
    a.queue_size = 2
    for name in ("aws", "droid", "gcp"):
        a.emit("balance_low", name, usd=1.0, min_usd=10)
    assert a.counts["dropped"] == 1
    (q,) = a._queues.values()
    assert [q.get_nowait().subject for _ in range(2)] == ["droid", "gcp"]


def test_an_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError):
        watcher().emit("balance_lo", "aws")


def test_the_json_body_carries_the_event():
    e = Event("balance_low", "aws", "balance_low|aws|2026-12-09", NOW, {"usd": 4.2, "min_usd": 10})
    assert json.loads(alerts.body(e, "json", "host1")) == {
        "event": "balance_low", "subject": "aws", "id": "balance_low|aws|2026-12-09",
        "at": "2026-12-09T15:30:00Z", "host": "host1",
        "text": "endpoint aws: balance low, $4.20 left (alert below $10.00)", "usd": 4.2, "min_usd": 10}


def test_the_slack_body_is_text_only():
    (e,) = health_events({}, NOW, {"aws": failed(HEALTHY, NOW, 3)}, NOW, ["aws", "droid"])
    assert json.loads(alerts.body(e, "slack")) == {
        "text": "claude-router: endpoint aws is cooling down for 60 s (ejection 1); requests go to "
                "the other endpoints"}


@pytest.mark.parametrize("kind, fields, text", [
    ("recovered", {}, "endpoint aws recovered: it is serving again"),
    ("all_cooling", {"endpoints": ["aws", "droid"], "first_back_seconds": 12.5},
     "every endpoint is cooling down (aws, droid); the first is back in 12.5 s"),
    ("budget_80", {"spent_usd": 8.1, "budget_usd": 10.0, "per": "day", "percent": 81.0,
                   "resets_at": "2026-12-10T00:00:00Z"},
     "client aws has spent $8.10 of its daily budget $10.00 (81 %); it resets 2026-12-10T00:00:00Z"),
])
def test_what_each_event_says(kind, fields, text):
    assert alerts.describe(Event(kind, "aws", "x", NOW, fields)) == text


# -- delivery to a real receiver ----------------------------------------------------------------

class Receiver:
    """An aiohttp server on loopback recording posts; ``answers`` are the statuses to give, in
    turn (200 once they run out)."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.posts: list[bytes] = []
        self.got = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.read())
        self.got.set()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook/{TOKEN}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def wait(self, n: int, timeout: float = 10.0) -> list[dict]:
        async with asyncio.timeout(timeout):
            while len(self.posts) < n:
                self.got.clear()
                await self.got.wait()
        return [json.loads(p) for p in self.posts]


async def idle() -> Observation:
    return Observation(0.0, (), {})


def started(*hooks: Webhook, secrets=list) -> Alerts:
    a = Alerts(webhooks=lambda: hooks, secrets=secrets)
    a.backoff = 0.01
    a.start(idle)
    return a


async def counted(a: Alerts, outcome: str) -> None:
    async with asyncio.timeout(10):
        while not a.counts[outcome]:
            await asyncio.sleep(0.01)


async def test_emit_posts_balance_low():
    async with Receiver() as r:
        a = started(Webhook(r.url))
        a.emit("balance_low", "aws", usd=4.2, min_usd=10.0)
        (posted,) = await r.wait(1)
        await counted(a, "sent")
        await a.close()
    assert posted["event"] == "balance_low" and posted["usd"] == 4.2 and posted["min_usd"] == 10.0
    assert a.counts == {"sent": 1, "failed": 0, "dropped": 0}


async def test_a_failing_receiver_is_retried_until_it_answers():
    async with Receiver(500, 503) as r:
        a = started(Webhook(r.url))
        a.emit("recovered", "aws")
        await r.wait(3)
        await counted(a, "sent")
        await a.close()
    assert len(r.posts) == 3 and a.counts["failed"] == 0


async def test_a_receiver_refusing_the_body_is_not_retried():
    async with Receiver(400) as r:
        a = started(Webhook(r.url))
        a.emit("recovered", "aws")
        await r.wait(1)
        await counted(a, "failed")
        await a.close()
    assert len(r.posts) == 1


async def test_a_webhook_removed_by_a_reload_gets_nothing_more():
    async with Receiver(500, 500, 500, 500) as old, Receiver() as new:
        hooks = [Webhook(old.url)]
        a = Alerts(webhooks=lambda: tuple(hooks))
        a.backoff = 0.5  # the old receiver fails: its alert waits for a retry
        a.start(idle)
        a.emit("recovered", "aws")
        await old.wait(1)
        hooks[:] = [Webhook(new.url)]  # the config file now names another URL
        a.emit("cooled", "aws")
        assert set(a._senders) == set(a._queues) == {Webhook(new.url)}  # the old one stopped
        (posted,) = await new.wait(1)
        await a.close()
    assert posted["event"] == "cooled" and len(old.posts) == 1


async def test_a_secret_in_a_field_is_scrubbed():
    secret = "sk-endpoint-9f8e7d6c"
    async with Receiver() as r:
        a = started(Webhook(r.url), secrets=lambda: [secret])
        a.emit("balance_low", "aws", note=f"relay said: bad key {secret}")
        await r.wait(1)
        await a.close()
    assert secret.encode() not in r.posts[0] and b"[redacted]" in r.posts[0]


async def test_an_event_seen_by_two_workers_sharing_redis_is_posted_once(redis_server):
    clients = [aioredis.from_url(redis_server.url) for _ in range(2)]
    async with Receiver() as r:
        workers = [started(Webhook(r.url)) for _ in range(2)]
        for w, c in zip(workers, clients):
            w.share(c, "endpoint_health_")
        for w in workers:
            w.emit("recovered", "aws", id="recovered|aws|123")
        for w in workers:  # a later event from each: the marker that both have sent theirs
            w.emit("balance_low", "marker", id=f"marker|{id(w)}")
        posted = await r.wait(3)
        for w in workers:
            await w.close()
    for c in clients:
        await c.aclose()
    assert sorted(p["event"] for p in posted) == ["balance_low", "balance_low", "recovered"]
    assert "endpoint_health_|alert|0|recovered|aws|123" in redis_server.cli("KEYS", "*alert*")


def test_the_examples_commented_alerts_parse_once_uncommented():
    from conftest import ROOT

    text = (ROOT / "router.example.yaml").read_text()
    start = text.index("# alerts:")
    block = "\n".join(line[2:] for line in text[start:].splitlines() if line.startswith("# "))
    env = {"AWS_RELAY_KEY": "k-aws-0123456789", "DROID_RELAY_KEY": "k-droid-0123456789",
           "ROUTER_CLIENT_KEY": "k-client-0123456789", "SLACK_WEBHOOK_URL": HOOK}
    slack, ops = config.parse(YAML(typ="safe", pure=True).load(text + "\n" + block), SRC, env).alerts
    assert (slack.url, slack.format, slack.events) == (HOOK, "slack", frozenset(alerts.EVENTS))
    assert (ops.format, ops.events) == ("json", frozenset(alerts.EVENTS))
