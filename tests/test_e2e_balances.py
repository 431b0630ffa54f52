"""Relay balances through a real mitmdump (issue 22, point 2): a relay whose panel says it is
below min_usd is skipped without blame (``low_balance``) and comes back once topped up; a 402
polls its panel at once; status, metrics and the log show the balance; the panel's token never
shows; and when every relay is low, they are all tried anyway."""

import re
import time
from pathlib import Path

import anthropic
import httpx

from claude_router_dev.harness import wait_for

TOKEN = "panel-token-5f0c2e9a7b"  # the new-api access token the mock's panel requires
UNIT = 500_000  # new-api quota units per USD
MSG = {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}


def write_config(path: Path, mock, every: int = 1, min_usd: float = 5, droid_balance: bool = False) -> Path:
    def panel(name: str) -> str:
        return f"""
    balance:
      preset: new-api
      url: {mock.url(name)}/api/user/self
      key: env:PANEL_TOKEN
      user: 1
      min_usd: {min_usd}
      every: {every}
      timeout: 5"""

    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
    key: sk-aws-relay-key-01{panel("aws")}
  - name: droid
    url: {mock.url("droid")}
    key: sk-droid-relay-key-02{panel("droid") if droid_balance else ""}
""")
    return path


def start(start_router, mock, tmp_path, **kw):
    config = write_config(tmp_path / "router.yaml", mock, **kw)
    return start_router([], options={"router_config": str(config)}, env={"PANEL_TOKEN": TOKEN})


def status(router) -> dict:
    return {e["name"]: e for e in httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"]}


def balance_is(router, name: str, usd: float):
    return wait_for(lambda: (e := status(router)[name])["balance_usd"] == usd and e,
                    what=f"{name}'s balance {usd}")


def ask(router):
    client = anthropic.Anthropic(base_url=router.base, api_key="sk-client", max_retries=0, timeout=30)
    return client.messages.with_raw_response.create(**MSG)


def test_a_relay_below_min_usd_is_skipped_without_blame(mock, start_router, tmp_path):
    mock.balance("aws", quota=1 * UNIT, key=TOKEN)  # $1, min_usd 5
    router = start(start_router, mock, tmp_path)
    balance_is(router, "aws", 1.0)
    raw = ask(router)
    assert raw.headers["x-router-attempts"] == "aws:low_balance, droid:200"
    assert raw.headers["x-used-endpoint"] == "droid"
    assert mock.count("aws") == 0
    aws = status(router)["aws"]
    assert (aws["state"], aws["failures"], aws["consecutive_failures"]) == ("healthy", 0, 0)
    assert aws["balance_low"] is True


def test_a_topped_up_relay_is_back_at_the_next_poll(mock, start_router, tmp_path):
    mock.balance("aws", quota=UNIT, key=TOKEN)
    router = start(start_router, mock, tmp_path)
    balance_is(router, "aws", 1.0)
    assert ask(router).headers["x-router-attempts"] == "aws:low_balance, droid:200"
    mock.balance("aws", quota=20 * UNIT, key=TOKEN)
    balance_is(router, "aws", 20.0)
    assert ask(router).headers["x-router-attempts"] == "aws:200"
    router.wait_log("has balance again ($20.00); back in rotation")


def test_a_402_polls_the_relay_panel_at_once(mock, start_router, tmp_path):
    mock.balance("aws", quota=100 * UNIT, key=TOKEN)
    router = start(start_router, mock, tmp_path, every=3600)  # no poll of its own for an hour
    balance_is(router, "aws", 100.0)
    assert mock.balance_polls("aws") == 1
    mock.balance("aws", quota=0, key=TOKEN)  # the relay ran dry meanwhile
    mock.fault("aws", status=402, error_type="billing_error", message="insufficient balance", times=1)
    assert ask(router).headers["x-router-attempts"] == "aws:402, droid:200"
    wait_for(lambda: mock.balance_polls("aws") == 2, what="the poll the 402 asked for")
    balance_is(router, "aws", 0.0)
    assert ask(router).headers["x-router-attempts"] == "aws:low_balance, droid:200"


def test_status_metrics_and_log_show_the_balance(mock, start_router, tmp_path):
    mock.balance("aws", quota=int(12.5 * UNIT), key=TOKEN)
    router = start(start_router, mock, tmp_path)
    aws = balance_is(router, "aws", 12.5)
    assert abs(aws["balance_checked"] - time.time()) < 60
    assert (aws["balance_low"], aws["balance_error"], aws["balance_min_usd"]) == (False, "", 5)
    droid = status(router)["droid"]  # no balance: configured: nulls
    assert (droid["balance_usd"], droid["balance_checked"]) == (None, None)
    metrics = httpx.get(f"{router.base}/_router/metrics", timeout=10).text
    assert re.search(r'^claude_router_endpoint_balance_usd\{endpoint="aws"\} 12\.5$', metrics, re.M)
    router.wait_log("balance of aws: $12.50 (min_usd 5)")


def test_the_panel_token_never_shows(mock, start_router, tmp_path):
    mock.balance("aws", quota=UNIT, key=TOKEN)
    router = start(start_router, mock, tmp_path)
    balance_is(router, "aws", 1.0)
    mock.balance("aws", status=500, key=TOKEN)  # the panel breaks: its error is shown
    wait_for(lambda: status(router)["aws"]["balance_error"], what="the panel's failure")
    assert status(router)["aws"]["balance_error"] == "the panel answered HTTP 500"
    assert status(router)["aws"]["balance_usd"] == 1.0  # the last good reading stays
    router.wait_log("could not read the balance of aws: the panel answered HTTP 500")
    mock.fault("aws", status=529)
    mock.fault("droid", status=529)
    answer = httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)
    assert answer.status_code == 529
    pages = [httpx.get(f"{router.base}/_router/{p}", timeout=10).text for p in ("status", "metrics")]
    for text in [router.log(), answer.text, *pages]:
        assert TOKEN not in text


def test_when_every_relay_is_low_they_are_tried_anyway(mock, start_router, tmp_path):
    mock.balance("aws", quota=UNIT, key=TOKEN)
    mock.balance("droid", quota=UNIT, key=TOKEN)
    router = start(start_router, mock, tmp_path, droid_balance=True)
    balance_is(router, "aws", 1.0)
    balance_is(router, "droid", 1.0)
    raw = ask(router)
    assert raw.headers["x-router-attempts"] == "aws:200"  # a low balance alone never refuses


def test_a_panel_refusing_the_token_is_an_error_not_a_low_balance(mock, start_router, tmp_path):
    mock.balance("aws", quota=0, key="another-token-entirely")
    router = start(start_router, mock, tmp_path)
    wait_for(lambda: status(router)["aws"]["balance_error"], what="the refusal")
    assert status(router)["aws"]["balance_error"] == "the panel answered HTTP 401"
    assert status(router)["aws"]["balance_low"] is False
    assert ask(router).headers["x-router-attempts"] == "aws:200"


def test_two_routers_share_the_balance_through_redis(mock, start_router, tmp_path, redis_server):
    mock.balance("aws", quota=100 * UNIT, key=TOKEN)
    config = write_config(tmp_path / "shared.yaml", mock, every=3600)
    opts = {"router_config": str(config), "router_redis_url": redis_server.url}
    a = start_router([], options=opts, env={"PANEL_TOKEN": TOKEN})
    balance_is(a, "aws", 100.0)
    b = start_router([], options=opts, env={"PANEL_TOKEN": TOKEN})
    balance_is(b, "aws", 100.0)  # a's reading, from Redis
    assert mock.balance_polls("aws") == 1  # one poll for the two of them
    mock.balance("aws", quota=0, key=TOKEN)
    mock.fault("aws", status=402, error_type="billing_error", times=1)
    assert ask(a).headers["x-router-attempts"] == "aws:402, droid:200"
    balance_is(b, "aws", 0.0)  # a's poll reached b without a poll of b's own
    assert mock.balance_polls("aws") == 2
    assert ask(b).headers["x-router-attempts"] == "aws:low_balance, droid:200"
    assert TOKEN not in redis_server.cli("GET", "endpoint_health_|balance|aws")


def test_a_reloaded_min_usd_applies_with_a_fresh_poll(mock, start_router, tmp_path):
    mock.balance("aws", quota=UNIT, key=TOKEN)
    router = start(start_router, mock, tmp_path, every=3600)
    balance_is(router, "aws", 1.0)
    assert ask(router).headers["x-router-attempts"] == "aws:low_balance, droid:200"
    write_config(tmp_path / "router.yaml", mock, every=3600, min_usd=0.5)
    router.wait_log("config reloaded")
    wait_for(lambda: mock.balance_polls("aws") == 2, what="the new spec's first poll")
    wait_for(lambda: status(router)["aws"]["balance_min_usd"] == 0.5 and status(router)["aws"]["balance_usd"] == 1.0,
             what="the new reading")
    assert ask(router).headers["x-router-attempts"] == "aws:200"
