"""Documented claims of this round (docs/), each through a real mitmdump: start-up checks,
regular mode's API-only routing, body limits, metrics names, shared family cooldowns and
learned caching."""

import time
import zlib

import anthropic
import httpx
import pytest

from conftest import free_port
from test_e2e_bad_clients import _pause_reading_a_long_stream
from test_e2e_modes import proxied_sdk  # noqa: F401 - a fixture
from test_e2e_operations import endpoint_doc, wait_for, web_command
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


@pytest.mark.parametrize("operator, expected", [(None, "128m"), ("50m", "50m"), ("1g", "1g")])
def test_the_body_size_limit_backstop_is_set_unless_the_operator_set_one(mock, start_router,
                                                                          operator, expected):
    """Fails when the router overwrites the operator's limit (configure's
    `if opts.body_size_limit in (None, self._backstop)` made `if True`): 50m and 1g read 128m."""
    web_port = free_port()
    extra = {"body_size_limit": operator} if operator else {}
    router = start_router([f"aws={mock.url('aws')}"], tool="mitmweb",
                          options={"web_port": web_port, "web_password": "pw", **extra})
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", params={"token": "pw"})
    router.wait_log("endpoints in price order")
    opts = web.get("/options").json()
    assert opts["body_size_limit"]["value"] == expected


def _relay_gzip(writes: list[bytes]) -> bytes:
    """What the gzip relay sends for these writes: one gzip stream, each write sync-flushed."""
    z = zlib.compressobj(wbits=31)
    return b"".join(z.compress(w) + z.flush(zlib.Z_SYNC_FLUSH) for w in writes[:-1]) + \
        z.compress(writes[-1]) + z.flush()


@pytest.mark.parametrize("accept", ["identity", "gzip, deflate"])
def test_response_bytes_pass_unchanged_with_their_content_encoding(mock, start_router, accept):
    """docs/failure-policy.md: response bytes are passed on unchanged, including their content
    encoding (no model_map here: with one, the router decodes to put the client's model id
    back). Read raw, undecoded: the gzip bytes are exactly the relay's (deterministic zlib,
    mtime 0).

    Fails with the upstream session decoding (`auto_decompress=True` in upstream.py): the
    client gets plain bytes labelled gzip."""
    mock.profile("plain", gzip=True)
    router = start_router([f"plain={mock.url('plain')}"])
    headers = {"accept-encoding": accept}
    with httpx.stream("POST", f"{router.base}/v1/messages", json=MSG, headers=headers, timeout=30) as r:
        raw = b"".join(r.iter_raw())
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    body = zlib.decompress(raw, wbits=31)
    assert raw == _relay_gzip([body]) and b"Hello from plain" in body
    stream = dict(MSG, stream=True)
    with httpx.stream("POST", f"{router.base}/v1/messages", json=stream, headers=headers, timeout=30) as r:
        raw = b"".join(r.iter_raw())
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert r.headers["content-type"].startswith("text/event-stream")
    text = zlib.decompress(raw, wbits=31)
    events = [e + b"\n\n" for e in text.split(b"\n\n")[:-1]]  # the relay writes one event at a time
    assert b"".join(events) == text and events[-1].startswith(b"event: message_stop")
    assert raw == _relay_gzip([*events, b""])


def test_mid_stream_failures_and_stalls_have_their_metrics(mock, start_router):
    """One stream cut by aws's reset (blamed) and one broken after its client stopped reading
    (a client stall, not blamed) show as those counts in the metrics and the status page.

    Fails with `Stats.client_stalled` a no-op (no stall count), and with `Stats.midstream` a
    no-op (no stream failure count)."""
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"])
    mock.fault("aws", words=20, reset="mid_stream", reset_after_events=5, times=1)
    stream = dict(MSG, stream=True)
    r = httpx.post(f"{router.base}/v1/messages", json=stream, timeout=30)
    assert r.headers["x-used-endpoint"] == "aws" and "event: error" in r.text
    mock.fault("aws", words=2000, event_bytes=32 * 1024, write_timeout_ms=2000)  # a 64 MB stream
    assert _pause_reading_a_long_stream(router.port, mock) == "write_timeout"
    text = httpx.get(f"{router.base}/_router/metrics", timeout=10).text
    assert 'claude_router_stream_failures_total{endpoint="aws",kind="reset"} 1.0' in text
    assert 'claude_router_client_stalls_total{endpoint="aws"} 1.0' in text
    assert "claude_router_stream_failures_total{" not in text.replace('{endpoint="aws",kind="reset"}', "")
    assert 'claude_router_client_stalls_total{endpoint="droid"}' not in text
    aws, droid = httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"]
    # The stalled stream's start was a success and its break blamed nobody: no consecutive failure.
    assert (aws["failures"], aws["client_stalls"], aws["consecutive_failures"]) == (1, 1, 0), aws
    assert aws["last_error"].startswith("mid-stream") and aws["state"] == "healthy"
    assert (droid["failures"], droid["client_stalls"]) == (0, 0)


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
    wait_for(lambda: "opus" in endpoint_doc(b, "aws").get("families", {}), what="opus cooling on b")
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
    # Misses in two conversations teach it (one conversation's alone teach nothing).
    assert [Conversation(f"sess-learn-{i}").turn(a, "t")["x-used-endpoint"] for i in range(2)] == ["cheap", "cheap"]
    # Instances re-read what was learned every 2 s, from their first conversation on.
    Conversation("sess-warm-b").turn(b, "w")
    wait_for(lambda: endpoint_doc(b, "cheap")["caches"] is False, what="b learned cheap does not cache")
    h = Conversation("sess-on-b").turn(b, "hi")
    assert h["x-used-endpoint"] == "dear" and "does not cache" in h["x-router-reason"]
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", params={"token": "pw"})
    web_command(web, "router.forget")
    wait_for(lambda: redis_server.cli("EXISTS", "endpoint_health_|learned") == "0", what="forgotten")
    wait_for(lambda: endpoint_doc(b, "cheap")["caches"] == "unknown", what="b forgot")
    assert Conversation("sess-after").turn(b, "hi")["x-used-endpoint"] == "cheap"


def test_garbage_in_the_shared_session_state_fails_no_turn(mock, start_router, tmp_path, redis_server):
    from claude_router import access, sessions
    caching(mock)
    redis_server.cli("HSET", "endpoint_health_|learned", "cheap", "not:a:count", "dear", "x")
    router = priced(start_router, mock, tmp_path, cheap=2.8, router_redis_url=redis_server.url)
    router.wait_log("(connected)")
    # Records are keyed by the client's credential hash (under the salt the routers share in
    # Redis) and a hash of the conversation's id: garbage under the keys these will be read from.
    owner = access.credential_id(b"k", redis_server.cli("GET", "endpoint_health_|salt").encode())
    key = {sid: "endpoint_health_|s|" + sessions.record_key(owner, f"cc:{sid}", "sonnet")
           for sid in ("sess-garbage", "sess-wrongtype")}
    redis_server.cli("SET", key["sess-garbage"], '{"e": "cheap", "p": 1e400}')
    redis_server.cli("LPUSH", key["sess-wrongtype"], "not a session")
    for sid in ("sess-garbage", "sess-wrongtype"):
        conv = Conversation(sid)
        assert conv.turn(router, "hello")["x-used-endpoint"] == "cheap"
        assert conv.turn(router, "again", stream=True)["x-used-endpoint"] == "cheap"
    assert "Traceback" not in router.log()
    for k in key.values():  # the garbage was where the router reads and writes: now replaced
        deadline = time.monotonic() + 10
        while '"n": 2' not in (v := redis_server.cli("GET", k)):  # the router's record, 2 turns
            assert time.monotonic() < deadline, v
            time.sleep(0.05)
