"""End to end: a real mitmdump with the addon, the mock relay, the anthropic SDK or raw HTTP."""

import hashlib
import json
import time

import anthropic
import httpx
import pytest

from conftest import closed_port_url

MSG = {"model": "mock-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def sdk(router, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base, api_key="sk-client-key", max_retries=0, **kw)


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def test_cheapest_endpoint_serves_and_headers_say_so(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    raw = sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.parse().content[0].text == "Hello from aws. You said: hi"
    assert raw.headers["x-used-endpoint"] == "aws"
    assert raw.headers["x-endpoint-index"] == "0"
    assert raw.headers["x-router-attempts"] == "aws:200"
    assert mock.count("droid") == 0


def test_client_path_and_query_are_appended_to_endpoint_prefix(mock, start_router):
    router = start_router(tiers(mock, "aws"))
    r = httpx.post(f"{router.base}/v1/messages?beta=true", json=MSG)
    assert r.status_code == 200
    (rec,) = mock.requests("aws")
    assert (rec["path"], rec["query"]) == ("/v1/messages", "beta=true")


def test_every_path_is_routed(mock, start_router):
    router = start_router(tiers(mock, "aws"))
    client = sdk(router)
    assert client.messages.count_tokens(model="m", messages=MSG["messages"]).input_tokens > 0
    assert client.models.list().data[0].id == "claude-sonnet-4-5"
    assert [r["path"] for r in mock.requests("aws")] == ["/v1/messages/count_tokens", "/v1/models"]


def test_head_root_is_answered_without_upstream(mock, start_router):
    router = start_router(tiers(mock, "aws"))
    r = httpx.head(f"{router.base}/")
    assert r.status_code == 200
    assert mock.count("aws") == 0


def test_failover_on_529_refused_and_reset(mock, start_router):
    mock.fault("aws", status=529)
    mock.fault("ultra", reset="before_headers")
    router = start_router(
        [f"aws={mock.url('aws')}", f"dead={closed_port_url()}", f"ultra={mock.url('ultra')}",
         f"claude={mock.url('claude')}"]
    )
    raw = sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.parse().content[0].text.startswith("Hello from claude.")
    assert raw.headers["x-router-attempts"] == "aws:529, dead:refused, ultra:reset, claude:200"
    assert (raw.headers["x-used-endpoint"], raw.headers["x-endpoint-index"]) == ("claude", "3")


def test_failover_on_timeout_before_headers(mock, start_router):
    mock.fault("aws", delay_ms=5000)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_headers_timeout": 1})
    raw = sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.headers["x-router-attempts"] == "aws:timeout, droid:200"


def test_same_request_goes_to_next_endpoint_byte_for_byte(mock, start_router):
    mock.fault("aws", status=500)
    router = start_router(tiers(mock, "aws", "droid"))
    body = b'{"model":"m",  "messages":[{"role":"user","content":"caf\xc3\xa9"}], "max_tokens":1}'
    headers = {
        "x-api-key": "sk-client-key",
        "authorization": "Bearer sk-client-token",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31",
        "x-custom": "kept",
        "content-type": "application/json",
        "connection": "keep-alive, x-hop",
        "x-hop": "dropped",
    }
    r = httpx.put(f"{router.base}/echo/path?a=1&b=%2F", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["x-used-endpoint"] == "droid"
    first, second = mock.requests("aws")[0], mock.requests("droid")[0]
    for rec in (first, second):
        assert rec["method"] == "PUT"
        assert (rec["path"], rec["query"]) == ("/echo/path", "a=1&b=%2F")
        assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()
        got = {k.lower(): v for k, v in rec["headers"]}
        for name in ("x-api-key", "authorization", "anthropic-version", "anthropic-beta", "x-custom"):
            assert got[name] == headers[name]
        assert "x-hop" not in got
        assert got.get("connection", "keep-alive").lower() == "keep-alive"


HOP_BY_HOP_SENT = [("Keep-Alive", "timeout=5, max=100"), ("TE", "trailers"), ("Upgrade", "IRC/6.9"),
                   ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"), ("Proxy-Connection", "keep-alive"),
                   ("Proxy-Authenticate", "Basic realm=x")]


def test_hop_by_hop_headers_never_reach_an_endpoint(mock, start_router):
    """docs/failure-policy.md: Keep-Alive, TE, Upgrade and Proxy-* are dropped even when
    `Connection` does not name them. A raw HTTP/1.1 request carries them; neither attempt's
    endpoint gets them.
    (Not `Upgrade: h2c`: mitmproxy's own disable_h2c addon removes that one, and `Connection`.)

    Fails with HOP_BY_HOP (upstream.py) holding only connection and transfer-encoding."""
    import socket
    mock.fault("aws", status=500)
    router = start_router(tiers(mock, "aws", "droid"))
    body = json.dumps(MSG).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in HOP_BY_HOP_SENT)
    request = (f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"X-Api-Key: k\r\nX-Kept: yes\r\n{head}Connection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", router.port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"x-router-attempts: aws:500, droid:200" in answer.lower()
    for rec in mock.requests("aws") + mock.requests("droid"):
        got = {k.lower() for k, _ in rec["headers"]}
        assert "x-kept" in got and "x-api-key" in got
        assert not got & {k.lower() for k, _ in HOP_BY_HOP_SENT}, rec["headers"]
        assert not any(k.startswith("proxy-") for k in got), rec["headers"]


def test_cooled_endpoint_gets_no_requests_then_recovers(mock, start_router):
    mock.fault("aws", status=503)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_cooldown": 4})
    client = sdk(router)
    for _ in range(2):
        client.messages.create(**MSG)
    sent = time.monotonic()  # the third failure trips it, after this
    client.messages.create(**MSG)
    assert mock.count("aws") == 3
    for _ in range(5):  # (a few hundred ms: well inside the 4 s)
        raw = client.messages.with_raw_response.create(**MSG)
        assert raw.headers["x-router-attempts"] == "droid:200"
    assert mock.count("aws") == 3  # cooling: not a single request
    mock.fault("aws")  # aws recovers (empty fault = normal answers)
    while (raw := client.messages.with_raw_response.create(**MSG)).headers["x-used-endpoint"] != "aws":
        assert time.monotonic() - sent < 30, "aws still cooling long after its 4 s"
        time.sleep(0.1)
    assert time.monotonic() - sent >= 4
    assert mock.count("aws") == 4


def test_success_resets_the_failure_count(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"), options={"router_cooldown": 60})
    client = sdk(router)
    for _ in range(3):
        mock.fault("aws", status=500, times=2)
        for _ in range(3):
            client.messages.create(**MSG)  # two failures, then a success on aws
    raw = client.messages.with_raw_response.create(**MSG)
    assert raw.headers["x-used-endpoint"] == "aws"


def test_all_cooling_with_try_still_tries_every_endpoint_in_order(mock, start_router):
    mock.fault("aws", status=503)
    mock.fault("droid", status=503)
    router = start_router(tiers(mock, "aws", "droid"),
                          options={"router_max_failures": 1, "router_all_cooling": "try"})
    client = sdk(router)
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(**MSG)
    mock.fault("droid")
    raw = client.messages.with_raw_response.create(**MSG)  # both cooling: tried anyway
    assert raw.headers["x-router-attempts"] == "aws:503, droid:200"


def test_all_fail_returns_last_upstream_error_as_sent(mock, start_router):
    mock.fault("aws", status=529)
    mock.fault("droid", status=503, retry_after=7, message="slow down")
    router = start_router(tiers(mock, "aws", "droid") + [f"dead={closed_port_url()}"])
    r = httpx.post(f"{router.base}/v1/messages", json=MSG)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json()["error"] == {"type": "api_error", "message": "slow down"}
    assert r.headers["x-used-endpoint"] == "droid"
    assert r.headers["x-router-attempts"] == "aws:529, droid:503, dead:refused"


def test_a_429_from_an_endpoint_using_the_clients_key_fails_over_and_cools_it_for_that_key(
        mock, start_router):
    mock.fault("aws", status=429, retry_after=600, message="your quota", key="k1")
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": "k1"})
    assert (r.status_code, r.headers["x-router-attempts"]) == (200, "aws:429, droid:200")
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": "k1"})
    assert r.headers["x-router-attempts"] == "droid:200"  # cooled for k1
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": "k2"})
    assert r.headers["x-router-attempts"] == "aws:200"  # not cooled for everybody


def test_no_upstream_answer_gives_502_in_anthropic_shape_without_secrets(start_router):
    router = start_router([f"a=http://user:hunter2@127.0.0.1:{closed_port_url().split(':')[2]}",
                           f"b={closed_port_url()}"])
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": "sk-secret-123"})
    assert r.status_code == 502
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert "a: connection refused" in body["error"]["message"]
    assert "b: connection refused" in body["error"]["message"]
    assert r.headers["x-router-attempts"] == "a:refused, b:refused"
    for secret in ("hunter2", "sk-secret-123"):
        assert secret not in r.text and secret not in router.log()


def test_sdk_sees_a_clean_error_type_when_everything_fails(mock, start_router):
    mock.fault("aws", status=529)
    router = start_router(tiers(mock, "aws"))
    with pytest.raises(anthropic.APIStatusError) as exc:
        sdk(router).messages.create(**MSG)
    assert exc.value.status_code == 529
    assert exc.value.body["error"]["type"] == "overloaded_error"
