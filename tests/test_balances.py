"""Relay balances, the pure parts: the presets, the ``balance:`` spec and its one-line errors,
reading a panel's answer (bad JSON, a missing path, a value that is not a number), the low
decision with an injected clock, and the poller's transitions (``on_low`` once per transition)."""

import json
import math

import pytest

from claude_router import balances, config, status
from claude_router.balances import Balances, BalanceSpec, Reading, SpecError
from claude_router.config import ConfigError
from claude_router.endpoints import Endpoint, parse_endpoint
from claude_router.policy import Attempt

TOKEN = "panel-token-7e1d9c"
SRC = "router.yaml"


def endpoint(url: str = "https://relay.example/claude/aws", key: str | None = "sk-relay-key-0001") -> Endpoint:
    ep = parse_endpoint(f"aws={url}", 0)
    return Endpoint(ep.name, ep.url, 0, key=key)


def spec(raw: dict, ep: Endpoint | None = None, env: dict | None = None) -> BalanceSpec:
    env = {"PANEL": TOKEN, **(env or {})}

    def secret(ref, where):
        return env[ref[4:]] if str(ref).startswith("env:") else ref

    return balances.parse(raw, ep or endpoint(), secret, "endpoints[0] (aws).balance")


def refused(raw: dict, env: dict | None = None, **ep) -> str:
    d = {"endpoints": [{"name": "aws", "url": "https://relay.example/aws", "balance": raw, **ep}]}
    with pytest.raises(ConfigError) as exc:
        config.parse(d, SRC, env or {"PANEL": TOKEN})
    message = str(exc.value)
    assert TOKEN not in message
    return message


# --- presets ---

def test_new_api_reads_data_quota_at_the_origin_with_token_and_user():
    s = spec({"preset": "new-api", "key": "env:PANEL", "user": 42})
    assert s.url == "https://relay.example/api/user/self"
    assert (s.json_path, s.divisor, s.success_field) == ("data.quota", 500_000, True)
    assert dict(s.headers) == {"Authorization": f"Bearer {TOKEN}", "New-Api-User": "42"}


def test_one_api_needs_only_the_token():
    s = spec({"preset": "one-api", "key": "env:PANEL"})
    assert s.url == "https://relay.example/api/user/self"
    assert dict(s.headers) == {"Authorization": f"Bearer {TOKEN}"}


def test_sub2api_reads_usage_under_the_endpoint_prefix_with_its_own_key():
    s = spec({"preset": "sub2api"})
    assert s.url == "https://relay.example/claude/aws/v1/usage"
    assert (s.json_path, s.divisor, s.negative_unlimited) == ("remaining", 1, True)
    assert dict(s.headers) == {"Authorization": "Bearer sk-relay-key-0001"}


def test_a_preset_url_never_carries_the_endpoint_url_credentials():
    s = spec({"preset": "sub2api"}, endpoint("https://user:pw@relay.example:8443/c"))
    assert s.url == "https://relay.example:8443/c/v1/usage"


def test_custom_panel_url_headers_path_and_divisor():
    s = spec({"url": "https://panel.example/balance?currency=usd", "key": "env:PANEL", "auth": "x-api-key",
              "headers": {"X-Panel": "env:PANEL", "Accept": "application/json"},
              "json_path": "balances.0.amount", "divisor": 100, "min_usd": 3.5, "every": 60, "timeout": 4})
    assert (s.url, s.json_path, s.divisor, s.min_usd, s.every, s.timeout) == (
        "https://panel.example/balance?currency=usd", "balances.0.amount", 100, 3.5, 60, 4)
    assert dict(s.headers) == {"X-Panel": TOKEN, "Accept": "application/json", "x-api-key": TOKEN}
    assert TOKEN not in repr(s)


def test_the_panel_token_is_one_of_the_endpoint_secrets():
    cfg = config.parse({"endpoints": [{"name": "aws", "url": "https://relay.example/aws",
                                       "balance": {"preset": "new-api", "key": "env:PANEL"}}]},
                       SRC, {"PANEL": TOKEN})
    assert TOKEN in cfg.endpoints[0].secrets
    assert TOKEN not in repr(cfg.endpoints[0])


# --- one-line errors with did-you-mean ---

@pytest.mark.parametrize("raw, where, problem", [
    ({"preset": "new-api", "key": "env:PANEL", "min_usb": 5}, "balance.min_usb",
     "unknown field (did you mean min_usd?)"),
    ({"preset": "newapi", "key": "env:PANEL"}, "balance.preset", "must be one of new-api, one-api, sub2api"),
    ({"preset": "new-api"}, "balance.key", "is required for the new-api panel"),
    ({"json_path": "data.quota"}, "balance.url", "is required without a preset"),
    ({"url": "ftp://panel.example/x", "json_path": "a"}, "balance.url", "must be http:// or https://"),
    ({"url": "https://u:p@panel.example/x", "json_path": "a"}, "balance.url", "must not hold user:password@"),
    ({"url": "https://panel.example/x"}, "balance.json_path", "expected a dotted path"),
    ({"url": "https://panel.example/x", "json_path": "a..b"}, "balance.json_path", "expected a dotted path"),
    ({"preset": "one-api", "key": "env:PANEL", "divisor": 0}, "balance.divisor", "must be above 0"),
    ({"preset": "one-api", "key": "env:PANEL", "min_usd": -1}, "balance.min_usd", "must be 0 or more"),
    ({"preset": "one-api", "key": "env:PANEL", "min_usd": "5"}, "balance.min_usd", "must be a number"),
    ({"preset": "one-api", "key": "env:PANEL", "every": 0.5}, "balance.every", "must be at least 1"),
    ({"preset": "one-api", "key": "env:PANEL", "timeout": 0}, "balance.timeout", "must be above 0"),
    ({"preset": "one-api", "key": "env:PANEL", "auth": "basic"}, "balance.auth", "must be bearer or x-api-key"),
    ({"preset": "new-api", "key": "env:PANEL", "user": "1; x"}, "balance.user", "expected the panel's user id"),
    ({"preset": "one-api", "key": "env:PANEL", "headers": {"Host": "x"}}, "balance.headers.Host", "is set by"),
    ("new-api", "balance", "expected a mapping"),
])
def test_a_bad_balance_is_one_line_naming_the_field(raw, where, problem):
    message = refused(raw)
    assert message.startswith(f"{SRC}: endpoints[0] (aws).{where}: {problem}"), message
    assert "\n" not in message


def test_sub2api_without_an_endpoint_key_says_so():
    assert "endpoint aws has no key of its own" in refused({"preset": "sub2api"})


def test_an_unset_panel_token_names_the_variable_not_a_value():
    message = refused({"preset": "new-api", "key": "env:NOPE"}, env={})
    assert message == f"{SRC}: endpoints[0] (aws).balance.key: environment variable NOPE is not set"


def test_unknown_endpoint_field_suggests_balance():
    d = {"endpoints": [{"name": "aws", "url": "https://relay.example/aws", "balanse": {}}]}
    with pytest.raises(ConfigError, match=r"did you mean balance\?"):
        config.parse(d, SRC, {})


# --- reading an answer ---

def test_read_walks_objects_and_lists_and_divides():
    assert balances.read({"data": {"quota": 2_500_000}}, "data.quota", 500_000) == 5.0
    assert balances.read({"b": [{"usd": "12.5"}]}, "b.0.usd", 1) == 12.5
    assert balances.read({"remaining": -1}, "remaining", 1) == -1


@pytest.mark.parametrize("doc, problem", [
    ({"data": {}}, "no data.quota in the answer"),
    ({"data": []}, "no data.quota in the answer"),
    ({"data": {"quota": None}}, "data.quota is not a number"),
    ({"data": {"quota": True}}, "data.quota is not a number"),
    ({"data": {"quota": "lots"}}, "data.quota is not a number"),
    ({"data": {"quota": {"usd": 1}}}, "data.quota is not a number"),
    ({"data": {"quota": "nan"}}, "data.quota is not a finite number"),
    ("a string", "no data.quota in the answer"),
])
def test_read_says_what_is_wrong_without_quoting_the_answer(doc, problem):
    with pytest.raises(ValueError) as exc:
        balances.read(doc, "data.quota", 500_000)
    assert str(exc.value) == problem


NEW_API = spec({"preset": "new-api", "key": "env:PANEL"})
SUB2API = spec({"preset": "sub2api"})


def test_answer_usd_of_the_presets():
    body = json.dumps({"success": True, "data": {"quota": 1_250_000}}).encode()
    assert balances.answer_usd(200, body, NEW_API) == 2.5
    assert balances.answer_usd(200, b'{"isValid":true,"remaining":7.25,"unit":"USD"}', SUB2API) == 7.25
    assert balances.answer_usd(200, b'{"remaining":-1}', SUB2API) == math.inf  # no limit


@pytest.mark.parametrize("status_code, body, problem", [
    (200, b"<html>login</html>", "the panel's answer is not JSON"),
    (200, b"", "the panel's answer is not JSON"),
    (200, b'{"success":false,"message":"' + TOKEN.encode() + b' is invalid"}', "the panel refused the request"),
    (401, b'{"success":false}', "the panel answered HTTP 401"),
    (302, b"", "the panel answered HTTP 302"),
    (200, b'{"success":true,"data":{"quota":"n/a"}}', "data.quota is not a number"),
])
def test_answer_usd_refuses_what_it_cannot_read(status_code, body, problem):
    with pytest.raises(ValueError) as exc:
        balances.answer_usd(status_code, body, NEW_API)
    assert str(exc.value).startswith(problem)
    assert TOKEN not in str(exc.value)


# --- the decision, with an injected clock ---

LOW5 = BalanceSpec(url="https://p.example/", json_path="q", min_usd=5, every=60, timeout=10)


@pytest.mark.parametrize("reading, now, low", [
    (Reading(usd=4.99, at=1000), 1000, True),
    (Reading(usd=5.0, at=1000), 1000, False),
    (Reading(usd=4.0, at=1000), 1000 + 3 * 60 + 10, True),  # still fresh
    (Reading(usd=4.0, at=1000), 1000 + 3 * 60 + 11, False),  # stale: unknown again, never low
    (Reading(), 1000, False),  # never read
    (Reading(usd=None, at=None, error="the panel answered HTTP 500"), 1000, False),
    (Reading(usd=math.inf, at=1000), 1000, False),
    (None, 1000, False),
])
def test_is_low(reading, now, low):
    assert balances.is_low(reading, LOW5, now) is low


def test_zero_is_low_even_without_min_usd():
    none = BalanceSpec(url="https://p.example/", json_path="q")
    assert balances.is_low(Reading(usd=0.0, at=1), none, 1)
    assert not balances.is_low(Reading(usd=0.01, at=1), none, 1)
    assert not balances.is_low(Reading(usd=0.0, at=1), None, 1)


def test_jitter_stays_within_ten_percent():
    assert balances.jittered(300, lambda: 0.0) == pytest.approx(270)
    assert balances.jittered(300, lambda: 1.0) == pytest.approx(330)


@pytest.mark.parametrize("attempt, asks", [
    (Attempt("aws", "402", "HTTP 402 billing_error"), True),
    (Attempt("aws", "400", "HTTP 400 billing_error"), True),
    (Attempt("aws", "billing_error", "stream opened with billing_error"), True),
    (Attempt("aws", "529", "HTTP 529 overloaded_error"), False),
    (Attempt("aws", "low_balance", "balance below min_usd"), False),
])
def test_what_asks_for_a_poll(attempt, asks):
    assert balances.asks_for_poll(attempt) is asks


# --- the poller's state ---

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def poller(clock: Clock) -> Balances:
    b = Balances(clock)
    b.configure([Endpoint("aws", "https://relay.example/aws", 0, balance=LOW5),
                 Endpoint("droid", "https://relay.example/droid", 1)])
    return b


def test_on_low_is_called_once_per_transition_and_on_recovered_once():
    clock = Clock()
    b = poller(clock)
    lows, ups = [], []
    b.on_low = lambda *a: lows.append(a)
    b.on_recovered = lambda *a: ups.append(a)
    b.record("aws", 10.0)
    assert not b.is_low("aws") and lows == []
    b.record("aws", 3.0)
    b.record("aws", 2.0)
    assert b.is_low("aws") and lows == [("aws", 3.0, 5.0)]
    b.record("aws", 50.0)
    assert not b.is_low("aws") and ups == [("aws", 50.0, 5.0)]


def test_a_failed_poll_keeps_the_last_reading_until_it_is_stale():
    clock = Clock()
    b = poller(clock)
    b.record("aws", 1.0)
    b._failed("aws", "the panel answered HTTP 500")
    assert b.is_low("aws")
    assert b.status("aws")["balance_usd"] == 1.0
    assert b.status("aws")["balance_error"] == "the panel answered HTTP 500"
    clock.now += 3 * 60 + 11
    assert not b.is_low("aws")  # a stale reading never keeps an endpoint out


def test_a_failing_callback_never_stops_the_poller():
    b = poller(Clock())

    def broken(*a):
        raise RuntimeError("alerts are down")

    b.on_low = broken
    b.record("aws", 1.0)
    assert b.is_low("aws")


def test_status_fields_for_an_endpoint_with_and_without_a_balance():
    clock = Clock()
    b = poller(clock)
    assert b.status("droid") == {"balance_usd": None, "balance_checked": None, "balance_unlimited": False,
                                 "balance_min_usd": None, "balance_low": False, "balance_error": ""}
    b.record("aws", 12.3456789)
    assert b.status("aws")["balance_usd"] == 12.3457
    assert b.status("aws")["balance_checked"] == 1000.0
    b.record("aws", math.inf)
    assert (b.status("aws")["balance_usd"], b.status("aws")["balance_unlimited"]) == (None, True)


def test_the_gauge_shows_each_reading():
    b = poller(Clock())
    b.record("aws", 7.5)
    (metric,) = b.gauge.collect()
    assert [(s.labels, s.value) for s in metric.samples] == [({"endpoint": "aws"}, 7.5)]


def test_a_poll_trigger_is_debounced():
    clock = Clock()
    b = poller(clock)
    b.noticed([Attempt("aws", "402", "HTTP 402 billing_error")])
    first = b._triggered["aws"]
    clock.now += 1
    b.noticed([Attempt("aws", "402", "HTTP 402")])
    assert b._triggered["aws"] == first
    clock.now += balances.TRIGGER_DEBOUNCE
    b.noticed([Attempt("aws", "402", "HTTP 402")])
    assert b._triggered["aws"] == clock.now
    b.noticed([Attempt("droid", "402", "HTTP 402")])  # no balance: configured: nothing to poll
    assert "droid" not in b._triggered


def test_a_changed_spec_forgets_the_old_reading():
    b = poller(Clock())
    b.record("aws", 1.0)
    b.configure([Endpoint("aws", "https://relay.example/aws", 0,
                          balance=BalanceSpec(url="https://p.example/", json_path="q", min_usd=0.5))])
    assert b.readings == {} and not b.is_low("aws")


# --- the status table ---

def test_the_table_shows_the_balance_column():
    doc = {"store": "memory", "endpoints": [
        {"name": "aws", "index": 0, "state": "healthy", "cooldown_seconds_left": 0, "balance_usd": 3.5,
         "balance_low": True, "balance_error": ""},
        {"name": "droid", "index": 1, "state": "healthy", "cooldown_seconds_left": 0, "balance_usd": None,
         "balance_unlimited": True},
        {"name": "ultra", "index": 2, "state": "healthy", "cooldown_seconds_left": 0, "balance_usd": None,
         "balance_error": "the panel answered HTTP 500"},
    ]}
    text = status.table(doc, legend=False)
    header, aws, droid, ultra = text.splitlines()[1:5]
    assert "balance $" in header
    assert "3.50 low" in aws and "no limit" in droid and ultra.rstrip().endswith("?")


def test_spec_error_names_the_field():
    with pytest.raises(SpecError) as exc:
        spec({"preset": "new-api", "key": "env:PANEL", "every": "often"})
    assert exc.value.where.endswith(".every")


def test_the_examples_commented_balance_parses_once_uncommented():
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "router.example.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("    # balance:                              # read its relay's balance: skipped below min_usd")
    block = []
    for line in lines[start:]:
        if not line.startswith("    # "):
            break
        if not line.startswith("    #   #"):
            block.append("    " + line[6:])
    text = "\n".join(lines[:start] + block + lines[start + len(block) + 1:])
    from ruamel.yaml import YAML
    cfg = config.parse(YAML(typ="safe").load(text), SRC, {
        "AWS_RELAY_KEY": "k-aws", "DROID_RELAY_KEY": "k-droid", "ROUTER_CLIENT_KEY": "k-client",
        "AWS_PANEL_TOKEN": TOKEN})
    b = cfg.endpoints[0].balance
    assert (b.preset, b.min_usd, b.every, b.url) == ("new-api", 5, 300, "https://relay.example/api/user/self")


# --- one poll against a real loopback server (bounded, never quoting the URL) ---

async def panel_server(handler):
    from aiohttp import web
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_a_poll_reads_the_panel_with_its_token():
    from aiohttp import web
    seen = []

    async def handler(request):
        seen.append(request.headers.get("authorization"))
        return web.json_response({"success": True, "data": {"quota": 3_000_000}})

    runner, port = await panel_server(handler)
    try:
        b = Balances(Clock())
        s = spec({"preset": "one-api", "key": "env:PANEL", "url": f"http://127.0.0.1:{port}/api/user/self"})
        b.configure([Endpoint("aws", "https://relay.example/aws", 0, balance=s)])
        reading = await b.poll("aws", s)
        assert (reading.usd, reading.error, seen) == (6.0, "", [f"Bearer {TOKEN}"])
    finally:
        await b.close()
        await runner.cleanup()


async def test_a_slow_panel_is_bounded_by_the_timeout():
    import asyncio

    from aiohttp import web

    async def handler(request):
        await asyncio.sleep(30)
        return web.json_response({})

    runner, port = await panel_server(handler)
    try:
        b = Balances(Clock())
        s = spec({"url": f"http://127.0.0.1:{port}/x?token={TOKEN}", "json_path": "a", "timeout": 0.2})
        b.configure([Endpoint("aws", "https://relay.example/aws", 0, balance=s)])
        reading = await b.poll("aws", s)
        assert (reading.usd, reading.error) == (None, "no answer within 0.2 s")
    finally:
        await b.close()
        await runner.cleanup()


async def test_an_unreachable_panel_is_named_without_its_url():
    from claude_router_dev.harness import free_port
    b = Balances(Clock())
    s = spec({"url": f"http://127.0.0.1:{free_port()}/x?token={TOKEN}", "json_path": "a", "timeout": 5})
    b.configure([Endpoint("aws", "https://relay.example/aws", 0, balance=s)])
    try:
        reading = await b.poll("aws", s)
    finally:
        await b.close()
    assert reading.error.startswith("the panel could not be reached (")
    assert TOKEN not in reading.error and "127.0.0.1" not in reading.error
