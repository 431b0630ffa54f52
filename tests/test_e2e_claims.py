"""README claims of this round, each through a real mitmdump: start-up checks, regular mode's
API-only routing, body limits, metrics names, shared family cooldowns and learned caching."""

import time

import anthropic
import httpx
import pytest

from conftest import free_port
from test_e2e_modes import proxied_sdk  # noqa: F401 - a fixture
from test_e2e_operations import web_command
from test_e2e_sessions import Conversation, caching, start as priced

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path", ["/", "/droid", "/claude/droid/", "/api/hello", "/droid/api/hello"])
def test_start_up_checks_are_answered_by_the_router_key_or_not(mock, start_router, path):
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
                          options={"router_client_keys": ["s3cret-client-key"]})
    r = httpx.head(router.base + path, timeout=10)
    assert r.status_code == 200
    assert mock.requests() == []


def test_regular_mode_routes_only_the_api(mock, start_router, proxied_sdk):  # noqa: F811
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], mode="regular")
    client = proxied_sdk(router)
    r = client._client.get("https://api.anthropic.com/api/claude_code/settings")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert mock.requests() == []  # no relay saw it, none was blamed
    assert client.messages.with_raw_response.create(**MSG).headers["x-router-attempts"] == "aws:200"


def test_a_chunked_body_over_the_limit_gets_413_once_read(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}"], options={"router_max_body_mb": 1})

    def chunks():
        for _ in range(3):
            yield b"x" * 500_000

    r = httpx.post(f"{router.base}/v1/messages", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    assert mock.requests() == []


def test_the_body_size_limit_backstop_is_set_unless_the_operator_set_one(mock, start_router):
    web_port = free_port()
    router = start_router([f"aws={mock.url('aws')}"], tool="mitmweb",
                          options={"web_port": web_port, "web_password": "pw"})
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": "Bearer pw"})
    router.wait_log("endpoints in price order")
    opts = web.get("/options").json()
    assert opts["body_size_limit"]["value"] == "128m"


def test_mid_stream_failures_and_stalls_have_their_metrics(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"])
    mock.fault("aws", words=20, reset="mid_stream", reset_after_events=5)
    stream = dict(MSG, stream=True)
    httpx.post(f"{router.base}/v1/messages", json=stream, timeout=30)
    text = httpx.get(f"{router.base}/_router/metrics", timeout=10).text
    assert 'claude_router_stream_failures_total{endpoint="aws",kind="reset"} 1.0' in text
    assert "claude_router_client_stalls_total" in text


def test_session_moves_show_in_status_and_metrics(mock, start_router, tmp_path):
    caching(mock)
    router = priced(start_router, mock, tmp_path, cheap=0.2)
    conv = Conversation("sess-metrics")
    conv.turn(router, "hello")
    mock.fault("cheap", status=529)
    conv.turn(router, "moved")
    mock.fault("cheap")
    doc = httpx.get(f"{router.base}/_router/status", timeout=10).json()
    dear = doc["endpoints"][1]
    assert dear["sessions_pinned"] == 1 and dear["rewrite_cost_usd"] > 0
    assert dear["cache_read_ratio"] is not None
    text = httpx.get(f"{router.base}/_router/metrics", timeout=10).text
    assert 'claude_router_session_moves_total{endpoint="dear"} 1.0' in text
    assert 'claude_router_rewrite_cost_usd_total{endpoint="dear"}' in text


def _keyed(tmp_path, mock, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
    key: sk-aws-relay-0000
  - name: droid
    url: {mock.url("droid")}
    key: sk-droid-relay-0000
""")
    return str(path)


def test_family_cooldowns_are_shared_through_redis(mock, start_router, tmp_path, redis_server):
    mock.profile("aws", family_limits={"opus": {"status": 429, "retry_after": 30}})
    opts = {"router_redis_url": redis_server.url}
    a = start_router([], options={**opts, "router_config": _keyed(tmp_path, mock, "a")})
    b = start_router([], options={**opts, "router_config": _keyed(tmp_path, mock, "b")})
    for r in (a, b):
        r.wait_log("(connected)")

    def ask(router, model):
        c = anthropic.Anthropic(base_url=router.base, api_key="k", max_retries=0)
        return c.messages.with_raw_response.create(model=model, max_tokens=8, messages=MSG["messages"])

    assert ask(a, "claude-opus-4-1").headers["x-router-attempts"] == "aws:429, droid:200"
    time.sleep(0.2)
    assert ask(b, "claude-opus-4-1").headers["x-router-attempts"] == "droid:200"
    assert ask(b, "claude-haiku-4-5").headers["x-router-attempts"] == "aws:200"
    assert redis_server.cli("EXISTS", "endpoint_health_|ep|aws~opus") == "1"


def test_learned_caching_is_shared_and_can_be_forgotten(mock, start_router, tmp_path, redis_server):
    caching(mock, cheap="ignore")
    web_port = free_port()
    opts = {"router_redis_url": redis_server.url}
    a = priced(start_router, mock, tmp_path, cheap=2.25, name="a", **opts)
    b = priced(start_router, mock, tmp_path, cheap=2.25, name="b", tool="mitmweb",
               web_port=web_port, web_password="pw", **opts)
    for r in (a, b):
        r.wait_log("(connected)")
    conv = Conversation("sess-learn-a")
    assert [conv.turn(a, f"t{i}")["x-used-endpoint"] for i in range(2)] == ["cheap", "cheap"]
    time.sleep(2.5)  # instances re-read what was learned every 2 s
    h = Conversation("sess-on-b").turn(b, "hi")
    assert h["x-used-endpoint"] == "dear" and "does not cache" in h["x-router-reason"]
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": "Bearer pw"})
    web_command(web, "router.forget")
    time.sleep(0.3)
    assert redis_server.cli("EXISTS", "endpoint_health_|learned") == "0"
    assert Conversation("sess-after").turn(b, "hi")["x-used-endpoint"] == "cheap"


def test_garbage_in_the_shared_session_state_fails_no_turn(mock, start_router, tmp_path, redis_server):
    caching(mock)
    redis_server.cli("SET", "endpoint_health_|s|cc:sess-garbage#sonnet", '{"e": "cheap", "p": 1e400}')
    redis_server.cli("HSET", "endpoint_health_|learned", "cheap", "not:a:count", "dear", "x")
    redis_server.cli("LPUSH", "endpoint_health_|s|cc:sess-wrongtype#sonnet", "not a session")
    router = priced(start_router, mock, tmp_path, cheap=2.8, router_redis_url=redis_server.url)
    router.wait_log("(connected)")
    for sid in ("sess-garbage", "sess-wrongtype"):
        conv = Conversation(sid)
        assert conv.turn(router, "hello")["x-used-endpoint"] == "cheap"
        assert conv.turn(router, "again", stream=True)["x-used-endpoint"] == "cheap"
    assert "Traceback" not in router.log()
