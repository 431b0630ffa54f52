"""Conversations placed by what they cost: through a real mitmdump, the mock relay's prompt-cache
model and the anthropic SDK (and a real redis-server for two instances)."""

import time

import anthropic
import httpx

SYSTEM = "You are a careful assistant. " + "Follow the project's conventions closely. " * 450  # ~4.8k tokens


def start(start_router, mock, tmp_path, cheap: float, dear: float = 3.0, name: str = "r",
          tool: str = "mitmdump", **options):
    """A router with endpoints cheap and dear (their own keys: the mock ignores them), priced."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
endpoints:
  - name: cheap
    url: {mock.url("cheap")}
    key: sk-cheap-relay-0000
    price: {{input: {cheap}, output: {cheap * 5}}}
  - name: dear
    url: {mock.url("dear")}
    key: sk-dear-relay-0000
    price: {{input: {dear}, output: {dear * 5}}}
""")
    return start_router([], options={"router_config": str(path), **options}, tool=tool)


class Conversation:
    """A Claude Code-like conversation: cached system prompt, growing history, newest message
    marked for caching, one session id."""

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.messages: list[dict] = []

    def turn(self, router, text: str, stream: bool = False):
        self.messages.append({"role": "user", "content": [
            {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]})
        for m in self.messages[:-1]:  # only the newest message carries a breakpoint
            for block in m["content"] if isinstance(m["content"], list) else []:
                block.pop("cache_control", None)
        client = anthropic.Anthropic(base_url=router.base, api_key="k", max_retries=0)
        kwargs = dict(model="claude-sonnet-4-5", max_tokens=64,
                      system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
                      messages=self.messages, extra_headers={"X-Claude-Code-Session-Id": self.sid})
        if stream:
            with client.messages.with_streaming_response.create(stream=True, **kwargs) as raw:
                headers = raw.headers
                events = list(raw.parse())
            answer = "".join(e.delta.text for e in events if e.type == "content_block_delta")
            assert events[-1].type == "message_stop"
        else:
            raw = client.messages.with_raw_response.create(**kwargs)
            headers, msg = raw.headers, raw.parse()
            answer = msg.content[0].text
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return headers


def status(router) -> dict:
    return httpx.get(f"{router.base}/_router/status", timeout=10).json()


TTL = 2  # seconds: the cache clock of these tests (router_cache_ttl, and the mock's scaled 5 min)


def caching(mock, cheap="true", dear="true", scale: float = 1.0):
    for name, mode in (("cheap", cheap), ("dear", dear)):
        mock.profile(name, cache=True if mode == "true" else mode, cache_ttl_scale=scale)


def move_to_dear(conv, router, mock, other=None):
    """Turn 1 on cheap; cheap overloads; turn 2 fails over to dear and writes its cache there."""
    assert conv.turn(router, "hello")["x-used-endpoint"] == "cheap"
    mock.fault("cheap", status=529)
    h = conv.turn(router, "and now?")
    assert (h["x-used-endpoint"], h["x-router-attempts"]) == ("dear", "cheap:529, dear:200")
    mock.fault("cheap")


def outlast_cheaps_cache(conv, router, mock):
    """Turn 1 on cheap; cheap is out for longer than the cache TTL while the conversation goes
    on at dear: cheap's copy of the prefix expires, dear's stays warm."""
    assert conv.turn(router, "hello")["x-used-endpoint"] == "cheap"
    mock.fault("cheap", status=529)
    for text in ("and now?", "still there?"):
        h = conv.turn(router, text)
        assert h["x-used-endpoint"] == "dear"
        time.sleep(TTL * 0.6)
    mock.fault("cheap")


def test_a_session_stays_on_its_warm_endpoint_when_moving_back_does_not_pay(mock, start_router, tmp_path):
    caching(mock, scale=TTL / 300)
    router = start(start_router, mock, tmp_path, cheap=2.8, router_cache_ttl=TTL)
    conv = Conversation("sess-close-prices")
    outlast_cheaps_cache(conv, router, mock)
    h = conv.turn(router, "third")  # cheap is back, cold, and only 7 % cheaper: re-writing costs more
    assert h["x-used-endpoint"] == "dear"
    assert "warm" in h["x-router-reason"]
    assert mock.requests("dear")[-1]["usage"]["cache_read_input_tokens"] > 1000


def test_a_session_moves_back_when_the_saving_pays_for_the_rewrite(mock, start_router, tmp_path):
    caching(mock, scale=TTL / 300)
    router = start(start_router, mock, tmp_path, cheap=0.2, router_cache_ttl=TTL)
    conv = Conversation("sess-far-prices")
    outlast_cheaps_cache(conv, router, mock)
    h = conv.turn(router, "third")
    assert h["x-used-endpoint"] == "cheap" and "x-router-reason" not in h
    doc = status(router)
    cheap = doc["endpoints"][0]
    assert cheap["rewrite_cost_usd"] > 0  # the move re-wrote the prefix there, and it shows
    [recent] = doc["sessions"]["recent"]  # the only conversation, shown by a hash of its id
    assert recent["endpoint"] == "cheap" and recent["moved_from"] == "dear"
    assert recent["session"].endswith("#sonnet") and "sess-far" not in str(doc)


def test_a_returning_session_goes_back_to_the_endpoint_that_still_holds_its_prefix(
        mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.8)
    conv = Conversation("sess-return")
    move_to_dear(conv, router, mock)  # cheap was out for a moment only: it still holds the prefix
    h = conv.turn(router, "third")
    assert h["x-used-endpoint"] == "cheap"
    assert mock.requests("cheap")[-1]["usage"]["cache_read_input_tokens"] > 4000


def test_a_cheap_endpoint_that_ignores_caching_is_learned_and_avoided(mock, start_router, tmp_path):
    caching(mock, cheap="ignore")
    router = start(start_router, mock, tmp_path, cheap=2.25)  # 25 % cheaper per token
    conv = Conversation("sess-learn")
    used = [conv.turn(router, f"turn {i}")["x-used-endpoint"] for i in range(3)]
    # Optimistic at first; one conversation's turns with neither a cache write nor a read do
    # not teach it (one client cannot condemn an endpoint alone)...
    assert used == ["cheap", "cheap", "cheap"]
    # ...a second conversation's miss does.
    assert Conversation("sess-learn-2").turn(router, "hello")["x-used-endpoint"] == "cheap"
    assert conv.turn(router, "turn 3")["x-used-endpoint"] == "dear"
    doc = status(router)
    assert doc["endpoints"][0]["caches"] is False and doc["endpoints"][1]["caches"] is not False
    h = Conversation("sess-new").turn(router, "hi")  # a new conversation goes to dear at once
    assert h["x-used-endpoint"] == "dear" and "does not cache" in h["x-router-reason"]


def test_order_strategy_keeps_the_original_order(mock, start_router, tmp_path):
    caching(mock, scale=TTL / 300)
    router = start(start_router, mock, tmp_path, cheap=2.8, router_strategy="order", router_cache_ttl=TTL)
    conv = Conversation("sess-order")
    outlast_cheaps_cache(conv, router, mock)
    assert conv.turn(router, "third")["x-used-endpoint"] == "cheap"


def test_the_request_bytes_are_never_changed(mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.8)
    body = (b'{"model":"claude-sonnet-4-5","max_tokens":8,"system":[{"type":"text","text":"s",'
            b'"cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"}]}')
    r = httpx.post(f"{router.base}/echo/x", content=body, timeout=10,
                   headers={"content-type": "application/json", "x-claude-code-session-id": "s"})
    import hashlib
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_failing_session_endpoint_fails_over_with_the_stream_intact(mock, start_router, tmp_path):
    caching(mock)
    router = start(start_router, mock, tmp_path, cheap=2.8)
    conv = Conversation("sess-stream")
    assert conv.turn(router, "hello", stream=True)["x-used-endpoint"] == "cheap"
    mock.fault("cheap", stream_error="overloaded_error", stream_error_after=1)
    h = conv.turn(router, "again", stream=True)  # asserts message_stop arrived
    assert h["x-router-attempts"] == "cheap:overloaded_error, dear:200"


def test_affinity_is_shared_by_two_router_instances(mock, start_router, tmp_path, redis_server):
    caching(mock, scale=TTL / 300)
    shared = {"router_redis_url": redis_server.url, "router_cache_ttl": TTL}
    a = start(start_router, mock, tmp_path, cheap=2.8, name="a", **shared)
    b = start(start_router, mock, tmp_path, cheap=2.8, name="b", **shared)
    a.wait_log("(connected)")
    b.wait_log("(connected)")
    conv = Conversation("sess-shared")
    outlast_cheaps_cache(conv, a, mock)  # placed on dear by instance A
    h = conv.turn(b, "third, through B")
    assert h["x-used-endpoint"] == "dear" and "warm" in h["x-router-reason"]
    keys = redis_server.cli("KEYS", "endpoint_health_|s|*").split()
    assert len(keys) == 1 and keys[0].endswith("#sonnet") and "sess-shared" not in keys[0]
