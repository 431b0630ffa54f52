"""Three behaviours so far only unit-tested, through a real mitmdump and the mock relay:
``count_tokens`` is a side request (its 429s cool nothing for ``/v1/messages``); a relay below
its ``min_usd`` is a last resort, tried after every other endpoint failed; and a passing free
probe ends only a cooldown of capacity (529s), never one of billing (402s)."""

from pathlib import Path

import httpx
import pytest

from claude_router_dev.harness import wait_for

CLIENT_KEY = "sk-client-3c4d5e6f"
MSG = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
COUNT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
PANEL_TOKEN = "panel-token-8a9b0c1d"  # the new-api access token the mock's panel requires
UNIT = 500_000  # new-api quota units per USD
EVERY = 0.3  # seconds between probes


def start(start_router, path: Path, config: str, **env: str):
    path.write_text(config)
    return start_router([], options={"router_config": str(path)}, env=env)


def post(router, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{router.base}{path}", json=body, headers={"x-api-key": CLIENT_KEY}, timeout=30)


def status(router) -> dict:
    doc = httpx.get(f"{router.base}/_router/status", headers={"x-api-key": CLIENT_KEY}, timeout=10).json()
    return {e["name"]: e for e in doc["endpoints"]}


def paths(mock, name: str) -> list[str]:
    return [r["path"] for r in mock.requests(name)]


# --- count_tokens is a side request ---

@pytest.mark.parametrize("own_key", [False, True], ids=["clients-key", "own-key"])
def test_count_tokens_429s_leave_the_endpoint_serving_messages(mock, start_router, tmp_path, own_key):
    """Three 429s to count_tokens (as many as cool an endpoint for Messages; on an endpoint
    that takes the client's key, one would already cool it for that key) leave aws serving the
    next /v1/messages; each count got one attempt and a 404 Claude Code does not retry (it
    estimates the tokens itself)."""
    router = start(start_router, tmp_path / "router.yaml", f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
{"    key: sk-aws-relay-0f1e2d3c" if own_key else ""}
  - name: droid
    url: {mock.url("droid")}
    key: sk-droid-relay-4b5a6978
client_keys: [{CLIENT_KEY}]
""")
    mock.fault("aws", status=429, error_type="rate_limit_error", message="rate limited", times=3)
    for _ in range(3):
        r = post(router, "/v1/messages/count_tokens?beta=true", COUNT)
        assert r.status_code == 404
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
        assert "retry-after" not in r.headers  # nothing to wait for: Claude Code estimates
        assert r.headers["x-router-attempts"] == "aws:429"  # one attempt, droid never asked
    assert paths(mock, "droid") == []
    aws = status(router)["aws"]
    assert (aws["state"], aws["failures"], aws["consecutive_failures"]) == ("healthy", 0, 0)
    assert (aws["cooling_for_keys"], aws.get("families") or {}) == (0, {})
    r = post(router, "/v1/messages?beta=true", MSG)
    assert r.status_code == 200
    assert (r.headers["x-used-endpoint"], r.headers["x-router-attempts"]) == ("aws", "aws:200")
    assert r.json()["content"][0]["text"].startswith("Hello from aws")
    assert paths(mock, "aws") == ["/v1/messages/count_tokens"] * 3 + ["/v1/messages"]


# --- a low balance is a last resort ---

def test_a_relay_below_min_usd_serves_when_every_other_endpoint_failed(mock, start_router, tmp_path):
    """aws is skipped for its balance (no blame), droid answers 529, then aws is tried after
    all: the client gets aws's 200, and the attempts say so in that order."""
    mock.balance("aws", quota=UNIT, key=PANEL_TOKEN)  # $1, below min_usd 5
    mock.fault("droid", status=529, error_type="overloaded_error")
    router = start(start_router, tmp_path / "router.yaml", f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
    key: sk-aws-relay-0f1e2d3c
    balance:
      preset: new-api
      url: {mock.url("aws")}/api/user/self
      key: env:PANEL_TOKEN
      user: 1
      min_usd: 5
      every: 3600
  - name: droid
    url: {mock.url("droid")}
    key: sk-droid-relay-4b5a6978
""", PANEL_TOKEN=PANEL_TOKEN)
    wait_for(lambda: status(router)["aws"]["balance_low"], what="aws's balance read as low")
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)
    assert r.status_code == 200
    assert r.headers["x-router-attempts"] == "aws:low_balance, droid:529, aws:200"
    assert r.headers["x-used-endpoint"] == "aws"
    assert r.json()["content"][0]["text"].startswith("Hello from aws")
    assert paths(mock, "aws") == ["/v1/messages"] and paths(mock, "droid") == ["/v1/messages"]
    aws, droid = status(router)["aws"], status(router)["droid"]
    assert (aws["state"], aws["failures"], aws["served"], aws["balance_low"]) == ("healthy", 0, 1, True)
    assert (droid["failures"], droid["served"]) == (1, 0)


# --- a passing free probe ends only capacity cooldowns ---

def test_a_passing_probe_ends_a_529_cooldown_but_not_a_402_one(mock, start_router, tmp_path):
    """``billed`` and ``busy`` both probe GET /v1/models while they cool; ``billed`` cooled on
    402s (a relay may list its models and still refuse messages for its bill), ``busy`` on
    529s. Once both relays answer again, a probe brings ``busy`` back; ``billed`` is never
    probed for free and keeps cooling until a user request may judge it."""
    probe = f"probe: {{every: {EVERY}}}"
    router = start(start_router, tmp_path / "router.yaml", f"""
endpoints:
  - name: billed
    url: {mock.url("billed")}
    key: sk-billed-relay-1a2b3c4d
    {probe}
  - name: busy
    url: {mock.url("busy")}
    key: sk-busy-relay-5e6f7a8b
    {probe}
  - name: dear
    url: {mock.url("dear")}
    key: sk-dear-relay-9c0d1e2f
health:
  cooldown: 60
""")
    msg = {**MSG, "model": "mock-model"}  # no model family: a 529 cools the endpoint itself
    mock.fault("billed", status=402, error_type="billing_error", message="insufficient balance")
    mock.fault("busy", status=529, error_type="overloaded_error")
    for _ in range(3):
        r = httpx.post(f"{router.base}/v1/messages", json=msg, timeout=30)
        assert (r.status_code, r.headers["x-router-attempts"]) == (200, "billed:402, busy:529, dear:200")
    doc = status(router)
    assert (doc["billed"]["state"], doc["billed"]["last_error"]) == ("cooling", "HTTP 402 billing_error")
    assert (doc["busy"]["state"], doc["busy"]["last_error"]) == ("cooling", "HTTP 529 overloaded_error")
    # busy's failing probes show the prober at work: billed's probes were due as often.
    wait_for(lambda: status(router)["busy"]["probe"]["failed"] >= 3, what="three failed probes of busy")
    doc = status(router)
    assert doc["billed"]["probe"]["sent"] == 0
    # The status page does not promise billed a probe: a request will tell.
    assert (doc["billed"]["probe"]["next_in_seconds"], doc["billed"]["probe"]["left_to_requests"]) == (
        None, ["billed"])
    assert doc["busy"]["probe"]["left_to_requests"] == []
    for name in ("billed", "busy"):
        mock.call("DELETE", f"/_mock/faults/{name}")  # both relays answer again
    wait_for(lambda: status(router)["busy"]["state"] == "healthy", what="busy brought back by a probe")
    doc = status(router)
    assert doc["busy"]["probe"]["last"] == "pass"
    billed = doc["billed"]
    assert billed["state"] == "cooling"
    assert (billed["probe"]["sent"], billed["probe"]["passed"]) == (0, 0)
    assert "/v1/models" not in paths(mock, "billed")
    r = httpx.post(f"{router.base}/v1/messages", json=msg, timeout=30)
    assert (r.status_code, r.headers["x-router-attempts"]) == (200, "busy:200")
    assert "probe of busy passed" in router.log() and "probe of billed" not in router.log()
