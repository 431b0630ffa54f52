"""Answers in every shape a relay gives them, through a real mitmdump, the mock relay and the
anthropic SDK or raw HTTP: thinking-signature repair for the turn Claude Code sends most
(``[thinking, text, tool_use]``), and the client's own model id (``model_map``) when the relay
writes its id JSON-escaped, or compresses its answers whatever accept-encoding says."""

import gzip
import json
import zlib
from pathlib import Path

import anthropic
import httpx
import pytest

from claude_router_dev import mock_relay
from claude_router_dev.harness import sse_events

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


SONNET = "claude-sonnet-4-5"
RELAY_SONNET = "vendor/claude-sonnet-4-5-v1:0"  # the relay's own id: has a "/" to escape
THINK = {"type": "enabled", "budget_tokens": 1024}
HI = [{"role": "user", "content": "hi"}]


def escaped(model: str) -> str:
    """How the mock's escape_model writes an id (between the quotes)."""
    return "".join("\\/" if c == "/" else f"\\u{ord(c):04x}" for c in model)


def relay_id_in(raw: bytes) -> bool:
    """The relay's id in any spelling the mock uses: plain, with \\/ or fully \\u-escaped."""
    return any(form.encode() in raw for form in
               (RELAY_SONNET, RELAY_SONNET.replace("/", "\\/"), escaped(RELAY_SONNET), "\\u0076\\u0065"))


def sdk(router) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base, api_key="k", max_retries=0)


def attempts(resp) -> str:
    return resp.headers["x-router-attempts"]


def configured(start_router, mock, tmp_path: Path, endpoints: list[dict]):
    """A router whose endpoints come from a YAML config file (url filled in from the mock)."""
    lines = ["endpoints:"]
    for ep in endpoints:
        ep = {"url": mock.url(ep["name"]), **ep}
        lines.append(f"  - name: {ep.pop('name')}")
        lines += [f"    {k}: {json.dumps(v)}" for k, v in ep.items()]  # JSON is YAML
    path = tmp_path / "router.yaml"
    path.write_text("\n".join(lines) + "\n")
    router = start_router([], options={"router_config": str(path)})
    router.wait_log("endpoints in price order")
    return router


@pytest.fixture
def mapped(mock, start_router, tmp_path):
    """One endpoint that serves sonnet under its own id (which has a "/")."""
    return configured(start_router, mock, tmp_path,
                      [{"name": "relay", "model_map": {SONNET: RELAY_SONNET}}])


# -- 5. thinking-signature repair for [thinking, text, tool_use] ----------------------------------


def tool_loop(secret: str) -> list[dict]:
    """Claude Code's usual history in a tool-use loop: the last assistant turn says something
    before its tool call, after thinking signed by another relay."""
    text = "The user said: list files. I will answer from a."
    return [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": text, "signature": mock_relay.sign_thinking(secret, text)},
            {"type": "text", "text": "I will list the files."},
            {"type": "tool_use", "id": "toolu_01", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt"}]},
    ]


def test_the_mock_enforces_the_apis_rule_for_a_tool_use_turn_without_thinking_first(mock):
    """What the router's retry would get if it kept thinking on after stripping (the bug)."""
    mock.profile("b", sign_thinking="secret-b")
    stripped = tool_loop("secret-a")
    stripped[1]["content"] = stripped[1]["content"][1:]
    r = httpx.post(mock.url("b") + "/v1/messages", timeout=30, json={
        "model": SONNET, "max_tokens": 2048, "thinking": THINK, "messages": stripped})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `text`.")
    del_thinking = httpx.post(mock.url("b") + "/v1/messages", timeout=30, json={
        "model": SONNET, "max_tokens": 2048, "messages": stripped})
    assert del_thinking.status_code == 200


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
def test_thinking_text_tool_use_turn_is_repaired_on_another_relay(mock, start_router, streaming):
    mock.profile("a", sign_thinking="secret-a")
    mock.profile("b", sign_thinking="secret-b")
    mock.fault("a", status=529)
    router = start_router([f"a={mock.url('a')}", f"b={mock.url('b')}"])
    kw = dict(model=SONNET, max_tokens=2048, thinking=THINK, messages=tool_loop("secret-a"))
    client = sdk(router)
    if streaming:
        with client.messages.stream(**kw) as s:
            types = [e.type for e in s]
            answer = s.get_final_message()
            tried = attempts(s.response)
        assert types[0] == "message_start" and types[-1] == "message_stop"
    else:
        raw = client.messages.with_raw_response.create(**kw)
        answer, tried = raw.parse(), attempts(raw)
    assert tried == "a:529, b:thinking_signature, b:200"
    # b answered without thinking: the retry had thinking turned off.
    assert [b.type for b in answer.content] == ["text"]
    assert answer.content[0].text == "Hello from b. You said: "  # (the last user turn is a tool_result)
    first, second = mock.requests("b")
    assert (first["outcome"], second["outcome"]) == ("400", "200")


# -- 9. the client's own model id in every answer shape --------------------------------------------


def test_escaped_id_in_message_start_reaches_the_client_as_its_own(mock, mapped):
    mock.profile("relay", escape_model=True)
    body = {"model": SONNET, "max_tokens": 64, "stream": True, "messages": HI}
    with httpx.stream("POST", f"{mapped.base}/v1/messages", json=body, timeout=30) as r:
        raw = r.read()
    assert r.status_code == 200 and attempts(r) == "relay:200"
    events = sse_events(raw)
    assert events[0][0] == "message_start" and events[0][1]["message"]["model"] == SONNET
    assert events[-1][0] == "message_stop"
    assert not relay_id_in(raw)
    # The mock did write it escaped, and was asked under its own id.
    (rec,) = mock.requests("relay")
    assert rec["model"] == RELAY_SONNET
    assert escaped(RELAY_SONNET).encode() in mock_relay.escape_model(
        b'"model":' + json.dumps(RELAY_SONNET).encode(), RELAY_SONNET)

    with sdk(mapped).messages.stream(model=SONNET, max_tokens=64, messages=HI) as s:
        start = next(e for e in s if e.type == "message_start")
        assert start.message.model == SONNET and s.get_final_message().model == SONNET


def test_escaped_id_in_a_json_answer_reaches_the_client_as_its_own(mock, mapped):
    mock.profile("relay", escape_model=True)
    r = httpx.post(f"{mapped.base}/v1/messages", timeout=30,
                   json={"model": SONNET, "max_tokens": 64, "messages": HI})
    assert r.status_code == 200 and r.json()["model"] == SONNET and not relay_id_in(r.content)


@pytest.mark.parametrize("escape", [False, True], ids=["plain-id", "escaped-id"])
def test_gzip_json_answer_reaches_the_client_decoded_with_its_own_id(mock, mapped, escape):
    mock.profile("relay", gzip=True, escape_model=escape)
    body = {"model": SONNET, "max_tokens": 64, "messages": HI}
    with httpx.stream("POST", f"{mapped.base}/v1/messages", json=body, timeout=30,
                      headers={"accept-encoding": "identity"}) as r:
        raw = b"".join(r.iter_raw())  # the bytes as they came, nothing decoded by httpx
    assert r.status_code == 200 and attempts(r) == "relay:200"
    assert "content-encoding" not in r.headers  # sent decoded: the router rewrote it
    assert int(r.headers["content-length"]) == len(raw)
    doc = json.loads(raw)
    assert doc["model"] == SONNET and doc["content"][0]["text"] == "Hello from relay. You said: hi"
    assert not relay_id_in(raw)

    answer = sdk(mapped).messages.create(**body)
    assert answer.model == SONNET
    # The relay really did compress (it ignores the router's accept-encoding: identity).
    direct = httpx.post(mock.url("relay") + "/v1/messages", json=body, timeout=30,
                        headers={"accept-encoding": "identity"})
    assert direct.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize("escape", [False, True], ids=["plain-id", "escaped-id"])
def test_gzip_stream_reaches_the_client_decoded_with_its_own_id_event_by_event(mock, mapped, escape):
    mock.profile("relay", gzip=True, escape_model=escape)
    # 5 words: message_start, content_block_start, ping, 5 deltas, then a long pause before
    # content_block_stop, message_delta, message_stop.
    mock.fault("relay", words=5, stall_ms=4000, stall_after_events=8)
    body = {"model": SONNET, "max_tokens": 64, "stream": True, "messages": HI}
    raw, deltas, pending_at_last_delta = b"", 0, None
    with httpx.stream("POST", f"{mapped.base}/v1/messages", json=body, timeout=30,
                      headers={"accept-encoding": "identity"}) as r:
        assert r.status_code == 200 and attempts(r) == "relay:200"
        assert "content-encoding" not in r.headers and "content-length" not in r.headers
        for chunk in r.iter_raw():
            raw += chunk
            now = sum(1 for name, _ in sse_events(raw.rsplit(b"\n\n", 1)[0] + b"\n\n")
                      if name == "content_block_delta")
            if now == 5 and deltas < 5:
                # Every delta is here while the relay still holds back the rest: the stream
                # is passed on event by event, not decoded at its end.
                pending_at_last_delta = mock.requests("relay")[0]["outcome"]
            deltas = now
    assert pending_at_last_delta == "pending"
    events = sse_events(raw)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_delta") == 5
    assert events[0][1]["message"]["model"] == SONNET
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "w1 w2 w3 w4 w5"
    assert not relay_id_in(raw)
    # The router still reads the usage of the decoded stream.
    assert '"output_tokens": 5' in mapped.wait_log('"output_tokens": 5', timeout=30)


def test_gzip_stream_through_the_sdk_has_the_clients_id(mock, mapped):
    mock.profile("relay", gzip=True, escape_model=True)
    with sdk(mapped).messages.stream(model=SONNET, max_tokens=64, messages=HI) as s:
        types = [e.type for e in s]
        final = s.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.model == SONNET and final.content[0].text == "Hello from relay. You said: hi"


def test_without_model_map_a_gzip_stream_passes_through_untouched(mock, start_router):
    mock.profile("plain", gzip=True)
    router = start_router([f"plain={mock.url('plain')}"])
    body = {"model": SONNET, "max_tokens": 64, "stream": True, "messages": HI}
    with httpx.stream("POST", f"{router.base}/v1/messages", json=body, timeout=30,
                      headers={"accept-encoding": "identity"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    events = sse_events(zlib.decompress(raw, 47))
    assert events[0][1]["message"]["model"] == SONNET and events[-1][0] == "message_stop"
    r = httpx.post(f"{router.base}/v1/messages", timeout=30, headers={"accept-encoding": "identity"},
                   json={**body, "stream": False})
    assert r.headers["content-encoding"] == "gzip" and r.json()["model"] == SONNET


def test_the_mocks_new_profile_keys_are_checked():
    for key in ("gzip", "escape_model"):
        assert mock_relay.validate_profile({key: True}) == {key: True}
        with pytest.raises(ValueError, match=key):
            mock_relay.validate_profile({key: "yes"})
    assert gzip.decompress(mock_relay.gzip_body(b"abc")) == b"abc"
    assert json.loads(mock_relay.escape_model(b'{"model":"a/b"}', "a/b")) == {"model": "a/b"}
