"""Claude Code's LLM gateway contract through a real mitmdump (issue 22, point 5):
``count_tokens`` never waits on every endpoint (one attempt where it is served, else a fast 404
Claude Code does not retry), ``?beta=true`` and other query strings never change routing,
``request-id`` reaches the client on streams (after a failover too), and the
``anthropic-workspace-id`` header reaches the endpoint."""

import httpx

from claude_router_dev.harness import wait_for

MSG = {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}
COUNT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def status(router) -> dict:
    return {e["name"]: e for e in httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"]}


def paths(mock, name: str) -> list[str]:
    return [r["path"] for r in mock.requests(name)]


# --- count_tokens ---

def test_count_tokens_is_served_by_the_first_endpoint(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages/count_tokens?beta=true", json=COUNT, timeout=30)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    assert r.headers["x-router-attempts"] == "aws:200"


def test_a_failing_count_tokens_gets_one_attempt_then_a_fast_404_without_blame(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_max_failures": 1})
    r = httpx.post(f"{router.base}/v1/messages/count_tokens?beta=true", json=COUNT, timeout=30)
    assert r.status_code == 404  # Claude Code does not retry a 404: it estimates instead
    assert r.json()["error"]["type"] == "not_found_error"
    assert "count_tokens" in r.json()["error"]["message"]
    assert "retry-after" not in r.headers
    assert r.headers["x-router-attempts"] == "aws:529"
    assert mock.count("droid") == 0  # never waits on every endpoint
    aws = status(router)["aws"]
    assert (aws["state"], aws["failures"]) == ("healthy", 0)  # counting tokens blames nobody


def test_count_tokens_at_an_unreachable_endpoint_is_a_fast_404(mock, start_router):
    from conftest import closed_port_url
    router = start_router([f"dead={closed_port_url()}", f"droid={mock.url('droid')}"])
    r = httpx.post(f"{router.base}/v1/messages/count_tokens", json=COUNT, timeout=30)
    assert (r.status_code, r.headers["x-router-attempts"]) == (404, "dead:refused")
    assert mock.count("droid") == 0


def test_count_tokens_when_every_endpoint_cools_is_a_404_not_a_529(mock, start_router):
    mock.fault("aws", status=500, times=1)
    router = start_router(tiers(mock, "aws"), options={"router_max_failures": 1})
    assert httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30).status_code == 500
    r = httpx.post(f"{router.base}/v1/messages/count_tokens", json=COUNT, timeout=30)
    assert r.status_code == 404 and "retry-after" not in r.headers
    assert paths(mock, "aws") == ["/v1/messages"]


def test_a_bad_count_tokens_request_is_answered_as_the_endpoint_said(mock, start_router):
    mock.fault("aws", status=400, error_type="invalid_request_error", message="messages: Field required")
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages/count_tokens", json={"model": "m"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "messages: Field required"
    assert r.headers["x-router-attempts"] == "aws:400"


def test_messages_still_fail_over_to_every_endpoint(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages?beta=true", json=MSG, timeout=30)
    assert (r.status_code, r.headers["x-router-attempts"]) == (200, "aws:529, droid:200")


# --- query strings never change routing ---

def test_beta_true_routes_like_no_query(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws", "droid", "ultra"), options={"router_max_failures": 100})
    seen = set()
    for query in ("", "?beta=true", "?beta=true&foo=bar", "?x=%2Fdroid%2Fv1"):
        r = httpx.post(f"{router.base}/v1/messages{query}", json=MSG, timeout=30)
        seen.add((r.status_code, r.headers["x-router-attempts"]))
    assert seen == {(200, "aws:529, droid:200")}
    assert [r["query"] for r in mock.requests("droid")] == ["", "beta=true", "beta=true&foo=bar", "x=%2Fdroid%2Fv1"]


def test_a_tier_path_with_a_query_pins_that_tier(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    for path in ("/droid/v1/messages?beta=true", "/claude/droid/v1/messages?beta=true"):
        r = httpx.post(f"{router.base}{path}", json=MSG, timeout=30)
        assert r.headers["x-router-attempts"] == "droid:200"
    assert [(r["path"], r["query"]) for r in mock.requests("droid")] == [("/v1/messages", "beta=true")] * 2


def test_count_tokens_with_a_query_is_still_count_tokens(mock, start_router):
    mock.fault("aws", status=503)
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages/count_tokens?beta=true&x=1", json=COUNT, timeout=30)
    assert (r.status_code, r.headers["x-router-attempts"]) == (404, "aws:503")


# --- request-id on streams ---

def stream(router, **kw) -> httpx.Response:
    with httpx.stream("POST", f"{router.base}/v1/messages?beta=true", json={**MSG, "stream": True},
                      timeout=30, **kw) as r:
        r.read()
        return r


def winner_request_id(mock, name: str) -> str:
    return wait_for(lambda: (recs := mock.requests(name)) and recs[-1].get("request_id"),
                    what=f"{name}'s answer recorded")


def test_request_id_reaches_the_client_on_a_stream(mock, start_router):
    router = start_router(tiers(mock, "aws"))
    r = stream(router)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert b"message_stop" in r.content
    assert r.headers["request-id"] == winner_request_id(mock, "aws")


def test_request_id_is_the_winners_after_a_failover(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws", "droid"))
    r = stream(router)
    assert r.headers["x-router-attempts"] == "aws:529, droid:200"
    assert r.headers["request-id"] == winner_request_id(mock, "droid")
    assert r.headers.get_list("request-id") == [r.headers["request-id"]]


def test_request_id_is_the_winners_after_a_stream_that_failed_before_content(mock, start_router):
    mock.fault("aws", stream_error="overloaded_error")
    router = start_router(tiers(mock, "aws", "droid"))
    r = stream(router)
    assert r.headers["x-router-attempts"] == "aws:overloaded_error, droid:200"
    assert r.headers["request-id"] == winner_request_id(mock, "droid")


# --- anthropic-workspace-id ---

def test_the_workspace_header_reaches_the_endpoint(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages?beta=true", json=MSG, timeout=30,
                   headers={"anthropic-workspace-id": "wrkspc_01AbCdEf", "anthropic-beta": "a-2025,b-2026",
                            "anthropic-version": "2023-06-01"})
    assert r.status_code == 200
    for name in ("aws", "droid"):  # every attempt carries it, unchanged
        (rec,) = mock.requests(name)
        headers = {k.lower(): v for k, v in rec["headers"]}
        assert headers["anthropic-workspace-id"] == "wrkspc_01AbCdEf"
        assert headers["anthropic-beta"] == "a-2025,b-2026"
        assert headers["anthropic-version"] == "2023-06-01"
