"""Issue 19, points 3 and 4, through a real mitmdump, the mock relay's prompt-cache model (it
writes nothing for a prefix under 1,024 tokens) and real clients with two client keys: what the
router learns about an endpoint cannot be poisoned by one client, and a conversation belongs
to the credential that started it."""

import time

import anthropic
import httpx

from test_e2e_sessions import SYSTEM, caching, start

KEY_A = "router-client-key-a-0123456789"
KEY_B = "router-client-key-b-9876543210"
KEYS = {"router_client_keys": [KEY_A, KEY_B]}
MODEL = "claude-sonnet-4-5"


def status(router, key: str) -> httpx.Response:
    return httpx.get(f"{router.base}/_router/status", headers={"x-api-key": key}, timeout=10)


def answered(router, n: int, timeout: float = 20.0) -> None:
    """Wait until the router has finished (logged, and so recorded) ``n`` Messages requests."""
    deadline = time.monotonic() + timeout
    while (done := router.log().count('"path": "/')) < n:
        assert time.monotonic() < deadline, f"{done} of {n} requests logged:\n{router.log()}"
        time.sleep(0.05)


class Client:
    """One client key's conversation: Claude Code's shape (cached system prompt, growing
    history, newest message marked, one session id), through the anthropic SDK."""

    def __init__(self, key: str, sid: str) -> None:
        self.key = key
        self.sid = sid
        self.messages: list[dict] = []

    def turn(self, router, text: str, tier: str = "") -> httpx.Headers:
        self.messages.append({"role": "user", "content": [
            {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]})
        for m in self.messages[:-1]:
            for block in m["content"]:
                block.pop("cache_control", None)
        client = anthropic.Anthropic(base_url=router.base + tier, api_key=self.key, max_retries=0)
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=32, messages=self.messages,
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            extra_headers={"X-Claude-Code-Session-Id": self.sid})
        msg = raw.parse()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": msg.content[0].text}]})
        return raw.headers


def poison(router, key: str, sid: str) -> httpx.Response:
    """The attack: a cache breakpoint on a tiny first block (far under any minimum cacheable
    size), then a long unmarked block. A caching relay writes and reads nothing for it."""
    return httpx.post(f"{router.base}/v1/messages", timeout=30, headers={
        "x-api-key": key, "anthropic-version": "2023-06-01", "x-claude-code-session-id": sid}, json={
        "model": MODEL, "max_tokens": 16,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": SYSTEM * 2}],
        "messages": [{"role": "user", "content": "hi"}]})


def test_one_client_cannot_make_a_caching_relay_look_not_caching(mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.25, **KEYS)  # cheap wins only if it caches
    for i in range(4):  # several conversations, so that more than one "source" shows the misses
        r = poison(router, KEY_B, f"attack-{i}")
        assert r.status_code == 200 and r.headers["x-used-endpoint"] == "cheap"
        usage = mock.requests("cheap")[-1]["usage"]
        # The relay really showed no cache activity for a prompt of ~9.7k tokens.
        assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
        assert usage["input_tokens"] > 9000
    answered(router, 4)
    cheap = status(router, KEY_A).json()["endpoints"][0]
    assert cheap["name"] == "cheap" and cheap["caches"] is not False
    h = Client(KEY_A, "victim-session").turn(router, "hello")  # the next conversation still goes there
    assert h["x-used-endpoint"] == "cheap" and "x-router-reason" not in h
    assert mock.requests("cheap")[-1]["usage"]["cache_creation_input_tokens"] > 4000
    answered(router, 5)
    assert status(router, KEY_B).json()["endpoints"][0]["caches"] is True


def test_a_relay_that_ignores_caching_is_still_learned_from_two_conversations(mock, start_router, tmp_path):
    caching(mock, cheap="ignore")
    router = start(start_router, mock, tmp_path, cheap=2.25, **KEYS)
    a = Client(KEY_A, "first")
    assert [a.turn(router, f"t{i}")["x-used-endpoint"] for i in range(3)] == ["cheap"] * 3
    answered(router, 3)
    assert status(router, KEY_A).json()["endpoints"][0]["caches"] is True  # one conversation: not enough
    assert Client(KEY_B, "second").turn(router, "hi")["x-used-endpoint"] == "cheap"
    answered(router, 4)
    assert status(router, KEY_A).json()["endpoints"][0]["caches"] is False
    h = Client(KEY_A, "third").turn(router, "hi")
    assert h["x-used-endpoint"] == "dear" and "does not cache" in h["x-router-reason"]


SID_A = "a5f3c9e2-7d41-4c8a-9b6e-1f2d3c4b5a69"
USER_A = "6b0e7d2a-93c4-4f1e-8a5d-c2b7e9f01d34"


def test_another_client_never_sees_a_clients_session_ids(mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.8, **KEYS)
    a = Client(KEY_A, SID_A)
    a.turn(router, "hello")
    a.turn(router, "again")
    # A second conversation identified by the body's metadata.user_id (Claude Code before 2.1.86).
    r = httpx.post(f"{router.base}/v1/messages", timeout=30, headers={"x-api-key": KEY_A}, json={
        "model": MODEL, "max_tokens": 8, "metadata": {"user_id": f"user_{'a' * 64}_account_x_session_{USER_A}"},
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    Client(KEY_B, "b-own-session").turn(router, "hi")
    answered(router, 4)
    text = status(router, KEY_B).text
    doc = status(router, KEY_B).json()
    recent = doc["sessions"]["recent"]
    assert len(recent) == 3 and len({s["client"] for s in recent}) == 2  # A's two, B's one
    for secret in (SID_A, USER_A, "b-own-session", *SID_A.split("-"), *USER_A.split("-")):
        assert secret not in text
        assert secret not in router.log()
    assert all(len(s["session"].split("#")[0]) == 12 for s in recent)


def test_a_pinned_request_with_another_clients_session_id_moves_nothing(mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.8, **KEYS)  # prices close: a warm cache stays
    a = Client(KEY_A, SID_A)
    mock.fault("cheap", status=529)
    h = a.turn(router, "hello")  # A's conversation starts on dear (cheap overloaded)
    assert (h["x-used-endpoint"], h["x-router-attempts"]) == ("dear", "cheap:529, dear:200")
    mock.fault("cheap")
    h = a.turn(router, "go on")
    assert h["x-used-endpoint"] == "dear" and "warm" in h["x-router-reason"]
    answered(router, 2)

    # B replays A's conversation with A's session id, pinned to cheap by its path.
    b = Client(KEY_B, SID_A)
    b.messages = [dict(m, content=[dict(c) for c in m["content"]]) for m in a.messages]
    h = b.turn(router, "hijack", tier="/cheap")
    assert h["x-used-endpoint"] == "cheap"
    assert mock.requests("cheap")[-1]["usage"]["cache_creation_input_tokens"] > 4000  # cheap holds it now
    answered(router, 3)
    h = a.turn(router, "still mine?")
    assert h["x-used-endpoint"] == "dear" and "warm" in h["x-router-reason"]
    assert mock.requests("dear")[-1]["usage"]["cache_read_input_tokens"] > 4000

    # Unpinned, B's requests with A's session id are B's own conversation: placed for B alone.
    c = Client(KEY_B, SID_A)
    h = c.turn(router, "mine")
    assert h["x-used-endpoint"] == "cheap" and "x-router-reason" not in h
    answered(router, 5)
    h = a.turn(router, "and now?")
    assert h["x-used-endpoint"] == "dear" and "warm" in h["x-router-reason"]
    answered(router, 6)
    recent = status(router, KEY_A).json()["sessions"]["recent"]
    assert sorted((s["endpoint"], s["turns"]) for s in recent) == [("cheap", 1), ("dear", 4)]
    assert len({s["client"] for s in recent}) == 2


def stored(redis_server, n: int, timeout: float = 10.0) -> None:
    """Wait until Redis holds ``n`` conversation records (they are written in the background)."""
    deadline = time.monotonic() + timeout
    while len(redis_server.cli("KEYS", "endpoint_health_|s|*").split()) < n:
        assert time.monotonic() < deadline, redis_server.cli("KEYS", "*")
        time.sleep(0.05)


def test_conversations_are_kept_per_client_in_redis_too(mock, start_router, tmp_path, redis_server):
    caching(mock)
    shared = {"router_redis_url": redis_server.url, **KEYS}
    one = start(start_router, mock, tmp_path, cheap=2.8, name="one", **shared)
    two = start(start_router, mock, tmp_path, cheap=2.8, name="two", **shared)
    one.wait_log("(connected)")
    two.wait_log("(connected)")
    a = Client(KEY_A, SID_A)
    mock.fault("cheap", status=529)
    assert a.turn(one, "hello")["x-used-endpoint"] == "dear"  # placed on dear by instance one
    mock.fault("cheap")
    answered(one, 1)
    stored(redis_server, 1)
    h = Client(KEY_B, SID_A).turn(two, "hi")  # B, with A's session id, on instance two: its own
    assert h["x-used-endpoint"] == "cheap" and "x-router-reason" not in h
    answered(two, 1)
    stored(redis_server, 2)
    h = a.turn(two, "through two")  # A's conversation, found in Redis under A's credential
    assert h["x-used-endpoint"] == "dear" and "warm" in h["x-router-reason"]
    keys = redis_server.cli("KEYS", "endpoint_health_|s|*").split()
    assert len(keys) == 2 and not any(part in k for k in keys for part in SID_A.split("-"))
