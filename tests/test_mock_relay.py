"""The mock relay's endpoint profiles: models, betas, cache TTLs, thinking signatures, family
limits and the prompt-cache model. Talks to the mock directly (no router)."""

import asyncio
import json
import subprocess
import time

import anthropic
import httpx
import pytest

from claude_router_dev import mock_relay
from claude_router_dev.harness import mock_argv
from conftest import start_mock, stop

BEDROCK = ["anthropic.claude-sonnet-4-5-v1:0", "anthropic.claude-haiku-4-5-v1:0"]
HI = [{"role": "user", "content": "hi"}]
THINK = {"type": "enabled", "budget_tokens": 1024}
BAD_SIG = "messages.1.content.0: Invalid `signature` in `thinking` block"
CC = {"type": "ephemeral"}
CC_1H = {"type": "ephemeral", "ttl": "1h"}


def sdk(mock, endpoint: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=mock.url(endpoint), api_key="k", max_retries=0)


def post(mock, endpoint: str, body: dict, path: str = "/v1/messages", **kw) -> httpx.Response:
    return httpx.post(f"{mock.url(endpoint)}{path}", json={"max_tokens": 64, **body}, **kw)


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    e = r.json()["error"]
    return r.status_code, e["type"], e["message"]


def tokens(block) -> int:
    """The documented rule: canonical JSON of the block without cache_control, // 4."""
    block = {k: v for k, v in block.items() if k != "cache_control"}
    return len(json.dumps(block, sort_keys=True, separators=(",", ":"), ensure_ascii=False)) // 4


def text(t: str, cc=None) -> dict:
    return {"type": "text", "text": t, **({"cache_control": cc} if cc else {})}


# -- models ------------------------------------------------------------------------------------


def test_models_are_listed_served_under_their_own_ids_and_others_are_404(mock):
    mock.profile("bedrock", models=BEDROCK)
    client = sdk(mock, "bedrock")
    assert [m.id for m in client.models.list().data] == BEDROCK
    assert client.models.retrieve(BEDROCK[1]).id == BEDROCK[1]
    answer = client.messages.create(model=BEDROCK[0], max_tokens=64, messages=HI)
    assert answer.model == BEDROCK[0]
    with client.messages.stream(model=BEDROCK[0], max_tokens=64, messages=HI) as s:
        assert s.get_final_message().model == BEDROCK[0]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = post(mock, "bedrock", {"model": "claude-opus-4-1", "messages": HI}, path)
        assert error_of(r) == (404, "not_found_error", "model: claude-opus-4-1")
    assert error_of(post(mock, "bedrock", {"messages": HI}))[:2] == (400, "invalid_request_error")
    assert mock.requests("bedrock")[-2]["model"] == "claude-opus-4-1"
    # an endpoint without a profile still takes any model and lists its one model
    assert sdk(mock, "plain").messages.create(model="whatever", max_tokens=8, messages=HI).model == "whatever"
    assert [m.id for m in sdk(mock, "plain").models.list().data] == ["claude-sonnet-4-5"]


# -- betas and cache ttl -----------------------------------------------------------------------


def test_a_rejected_beta_is_a_400_naming_it(mock):
    mock.profile("vertex", reject_betas=["context-1m-2025-08-07"])
    r = post(mock, "vertex", {"model": "m", "messages": HI},
             headers={"anthropic-beta": "oauth-2025-04-20, context-1m-2025-08-07"})
    assert error_of(r) == (400, "invalid_request_error",
                           "Unexpected value(s) 'context-1m-2025-08-07' for the 'anthropic-beta' header")
    assert post(mock, "vertex", {"model": "m", "messages": HI},
                headers={"anthropic-beta": "oauth-2025-04-20"}).status_code == 200
    assert post(mock, "other", {"model": "m", "messages": HI},
                headers={"anthropic-beta": "context-1m-2025-08-07"}).status_code == 200


def test_a_cache_ttl_is_rejected_where_unsupported(mock):
    mock.profile("old", reject_cache_ttl=True)
    body = {"model": "m", "system": [text("s", CC_1H)], "messages": HI}
    status, etype, message = error_of(post(mock, "old", body))
    assert (status, etype) == (400, "invalid_request_error")
    assert message == "system.0.cache_control.ttl: Extra inputs are not permitted"
    body = {"model": "m", "system": [text("s", CC)], "messages": HI}  # no ttl: fine
    assert post(mock, "old", body).status_code == 200
    body = {"model": "m", "messages": [{"role": "user", "content": [text("a"), text("b", CC_1H)]}]}
    assert "messages.0.content.1.cache_control.ttl" in error_of(post(mock, "old", body))[2]


# -- thinking signatures -----------------------------------------------------------------------


def test_signed_thinking_continues_on_its_relay_only(mock):
    mock.profile("a", sign_thinking="secret-a")
    mock.profile("b", sign_thinking="secret-b")
    client_a, client_b = sdk(mock, "a"), sdk(mock, "b")
    turn1 = client_a.messages.create(model="m", max_tokens=2048, thinking=THINK, messages=HI)
    assert [b.type for b in turn1.content] == ["thinking", "text"]
    assert turn1.content[0].signature == mock_relay.sign_thinking("secret-a", turn1.content[0].thinking)
    history = HI + [{"role": "assistant", "content": turn1.content},
                    {"role": "user", "content": "and then?"}]
    turn2 = client_a.messages.create(model="m", max_tokens=2048, thinking=THINK, messages=history)
    assert turn2.content[1].text == "Hello from a. You said: and then?"
    with pytest.raises(anthropic.BadRequestError) as e:
        client_b.messages.create(model="m", max_tokens=2048, thinking=THINK, messages=history)
    assert e.value.body["error"] == {"type": "invalid_request_error", "message": BAD_SIG}
    stripped = [m if m["role"] == "user" else
                {**m, "content": [b for b in m["content"] if b.type not in ("thinking", "redacted_thinking")]}
                for m in history]
    assert client_b.messages.create(model="m", max_tokens=2048, thinking=THINK,
                                    messages=stripped).content[0].type == "thinking"


def test_streamed_thinking_carries_the_signature_and_is_accepted_back(mock):
    mock.profile("a", sign_thinking="secret-a", cache=True)  # adaptive, as Claude Code sends it
    client = sdk(mock, "a")
    with client.messages.stream(model="m", max_tokens=2048, messages=HI,
                                extra_body={"thinking": {"type": "adaptive"}}) as s:
        final = s.get_final_message()
    thinking, answer = final.content
    assert thinking.type == "thinking" and thinking.signature and answer.text.startswith("Hello from a")
    assert final.usage.output_tokens == len((thinking.thinking + " " + answer.text).split())
    history = HI + [{"role": "assistant", "content": final.content}, {"role": "user", "content": "more"}]
    assert client.messages.create(model="m", max_tokens=2048, thinking=THINK, messages=history)
    tampered = [HI[0], {"role": "assistant", "content": [
        {"type": "thinking", "thinking": thinking.thinking + "!", "signature": thinking.signature},
        {"type": "text", "text": answer.text}]}, {"role": "user", "content": "more"}]
    assert error_of(post(mock, "a", {"model": "m", "messages": tampered}))[2] == BAD_SIG


def test_redacted_thinking_is_accepted_only_where_it_was_made(mock):
    mock.profile("a", sign_thinking="secret-a", redact_thinking=True)
    mock.profile("b", sign_thinking="secret-b")
    turn1 = post(mock, "a", {"model": "m", "thinking": THINK, "messages": HI}).json()
    assert turn1["content"][0]["type"] == "redacted_thinking"
    history = HI + [{"role": "assistant", "content": turn1["content"]},
                    {"role": "user", "content": "more"}]
    assert post(mock, "a", {"model": "m", "thinking": THINK, "messages": history}).status_code == 200
    assert error_of(post(mock, "b", {"model": "m", "thinking": THINK, "messages": history}))[2] == BAD_SIG


def test_thinking_enabled_needs_thinking_before_the_last_tool_use(mock):
    mock.profile("a", sign_thinking="secret-a")
    tool_turn = [HI[0],
                 {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ls",
                                                    "input": {}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                               "content": "a.txt"}]}]
    status, etype, message = error_of(post(mock, "a", {"model": "m", "thinking": THINK,
                                                       "messages": tool_turn}))
    assert (status, etype) == (400, "invalid_request_error")
    assert message.startswith("messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, "
                              "but found `tool_use`. When `thinking` is enabled, a final `assistant` "
                              "message must start with a thinking block")
    assert post(mock, "a", {"model": "m", "messages": tool_turn}).status_code == 200  # thinking off
    signed = {"type": "thinking", "thinking": "ls", "signature": mock_relay.sign_thinking("secret-a", "ls")}
    tool_turn[1]["content"].insert(0, signed)
    assert post(mock, "a", {"model": "m", "thinking": THINK, "messages": tool_turn}).status_code == 200


# -- family limits -----------------------------------------------------------------------------


def test_a_family_limit_refuses_that_family_only(mock):
    mock.profile("sub", family_limits={"opus": {"status": 429, "retry_after": 30},
                                       "haiku": {"status": 529}})
    r = post(mock, "sub", {"model": "claude-opus-4-1", "messages": HI})
    assert error_of(r)[:2] == (429, "rate_limit_error") and r.headers["retry-after"] == "30"
    assert error_of(post(mock, "sub", {"model": "claude-haiku-4-5", "messages": HI})) == (
        529, "overloaded_error", "Overloaded")
    assert post(mock, "sub", {"model": "claude-sonnet-4-5", "messages": HI}).status_code == 200


# -- the prompt-cache model --------------------------------------------------------------------

SYSTEM = text("You are a careful assistant. " * 300, CC)  # ~2.2k tokens, over the minimum


def usage_of(mock, endpoint: str, messages: list, system=SYSTEM, stream: bool = False, **extra) -> dict:
    body = {"model": "mock-sonnet", "system": [system], "messages": messages, **extra}
    if stream:
        with sdk(mock, endpoint).messages.stream(max_tokens=64, **body) as s:
            usage = s.get_final_message().usage.model_dump()
    else:
        usage = post(mock, endpoint, body).json()["usage"]
    billed = mock.requests(endpoint)[-1]
    assert billed["model"] == "mock-sonnet"
    assert {k: billed["usage"][k] for k in usage if k in billed["usage"]} == {
        k: usage[k] for k in usage if k in billed["usage"]}
    total = post(mock, endpoint, body, "/v1/messages/count_tokens").json()["input_tokens"]
    assert usage["input_tokens"] + usage["cache_creation_input_tokens"] + \
        usage["cache_read_input_tokens"] == total
    return usage


def conversation(turns: int) -> list:
    """Claude Code style: the newest user message carries the breakpoint."""
    msgs = []
    for i in range(turns):
        msgs += [{"role": "user", "content": [text(f"question {i}")]}]
        if i < turns - 1:
            msgs += [{"role": "assistant", "content": [text(f"answer {i}")]}]
    msgs[-1]["content"][-1]["cache_control"] = CC
    return msgs


def test_cache_writes_then_reads_within_the_ttl_then_writes_again(mock):
    mock.profile("c", cache=True, cache_ttl_scale=0.002)  # 5 min -> 0.6 s
    sys_t, q0 = tokens(SYSTEM), tokens(text("question 0"))
    u1 = usage_of(mock, "c", conversation(1))
    assert (u1["cache_read_input_tokens"], u1["cache_creation_input_tokens"], u1["input_tokens"]) == (
        0, sys_t + q0, 0)
    assert u1["cache_creation"] == {"ephemeral_5m_input_tokens": sys_t + q0, "ephemeral_1h_input_tokens": 0}
    assert u1["output_tokens"] == len("Hello from c. You said: question 0".split())
    u2 = usage_of(mock, "c", conversation(2), stream=True)  # look-back finds turn 1's breakpoint
    rest = tokens(text("answer 0")) + tokens(text("question 1"))
    assert (u2["cache_read_input_tokens"], u2["cache_creation_input_tokens"]) == (sys_t + q0, rest)
    assert sorted(e["tokens"] for e in mock.cache("c")) == [sys_t, sys_t + q0, sys_t + q0 + rest]
    time.sleep(0.8)
    assert mock.cache("c") == []
    u3 = usage_of(mock, "c", conversation(2))
    assert (u3["cache_read_input_tokens"], u3["cache_creation_input_tokens"]) == (0, sys_t + q0 + rest)
    assert usage_of(mock, "other-relay", conversation(2))["cache_creation_input_tokens"] == 0  # no profile


def test_a_relay_that_ignores_cache_control_never_reads_or_writes(mock):
    mock.profile("nocache", cache="ignore")
    for _ in range(2):
        u = usage_of(mock, "nocache", conversation(1))
        assert u["cache_read_input_tokens"] == u["cache_creation_input_tokens"] == 0
        assert u["input_tokens"] == tokens(SYSTEM) + tokens(text("question 0"))
    assert mock.cache("nocache") == []


def test_one_hour_breakpoints_are_accounted_and_outlive_five_minute_ones(mock):
    mock.profile("c", cache=True, cache_ttl_scale=0.002)  # 5 min -> 0.6 s, 1 h -> 7.2 s
    system = {**SYSTEM, "cache_control": CC_1H}
    sys_t, q0 = tokens(system), tokens(text("question 0"))
    u1 = usage_of(mock, "c", conversation(1), system=system)
    assert u1["cache_creation"] == {"ephemeral_5m_input_tokens": q0, "ephemeral_1h_input_tokens": sys_t}
    time.sleep(0.8)
    assert [e["ttl"] for e in mock.cache("c")] == ["1h"]
    u2 = usage_of(mock, "c", conversation(1), system=system)
    assert (u2["cache_read_input_tokens"], u2["cache_creation_input_tokens"]) == (sys_t, q0)


def test_look_back_reaches_twenty_blocks_and_no_further(mock):
    mock.profile("c", cache=True)
    first = [{"role": "user", "content": [text(f"block {i}") for i in range(5)]}]
    first[0]["content"][-1]["cache_control"] = CC
    base = usage_of(mock, "c", first)["cache_creation_input_tokens"]

    def grown(n: int) -> list:  # the same prefix, n more blocks, the breakpoint on the last only
        blocks = [text(f"block {i}") for i in range(5 + n)]
        blocks[-1]["cache_control"] = CC
        return [{"role": "user", "content": blocks}]

    assert usage_of(mock, "c", grown(20))["cache_read_input_tokens"] == base
    mock.clear_cache("c")
    usage_of(mock, "c", first)
    assert usage_of(mock, "c", grown(21))["cache_read_input_tokens"] == tokens(SYSTEM)  # only that


def test_a_prefix_under_the_minimum_is_not_written(mock):
    mock.profile("c", cache=True, output_tokens=7)
    u = usage_of(mock, "c", conversation(1), system=text("short", CC))
    assert u["cache_creation_input_tokens"] == 0 and u["output_tokens"] == 7
    mock.profile("c", cache=True, cache_min_tokens=1)
    assert usage_of(mock, "c", conversation(1), system=text("short", CC))["cache_creation_input_tokens"] > 0


# -- control API, CLI and in-process start -----------------------------------------------------


def test_profiles_are_validated_listed_replaced_and_cleared(mock):
    with pytest.raises(Exception, match="400"):
        mock.profile("x", cache="sometimes")
    mock.profile("x", models=["m1"])
    mock.profile("x", reject_cache_ttl=True)  # replaces
    assert mock.profiles() == {"x": {"reject_cache_ttl": True}}
    mock.profile("x")  # empty: a plain relay again
    assert mock.profiles() == {}
    mock.profile("y", cache=True)
    mock.reset()
    assert mock.profiles() == {}


def test_cli_profile_option():
    relay = start_mock("--profile", 'bed={"models": ["anthropic.claude-sonnet-4-5-v1:0"]}')
    try:
        assert relay.profiles() == {"bed": {"models": ["anthropic.claude-sonnet-4-5-v1:0"]}}
        r = post(relay, "bed", {"model": "claude-opus-4-1", "messages": HI})
        assert r.status_code == 404
    finally:
        stop(relay.proc)
    bad = subprocess.run(mock_argv("--profile", 'x={"nope": 1}'), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown profile keys" in bad.stderr


def test_in_process_start_with_profiles():
    async def run():
        relay, port = await mock_relay.start(profiles={"a": {"family_limits": {"opus": {}}}})
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
                r = await c.post("/a/v1/messages", json={"model": "claude-opus-4-1", "messages": HI})
                ok = await c.post("/a/v1/messages", json={"model": "claude-sonnet-4-5", "messages": HI})
            return r.status_code, ok.status_code
        finally:
            await relay.stop()

    assert asyncio.run(run()) == (429, 200)


def test_stamp_events_puts_the_send_time_in_every_event_and_the_sdk_still_reads_it(mock):
    mock.fault("s", stamp_events=True, event_gap_ms=20, words=3)
    before = time.monotonic()
    with httpx.stream("POST", f"{mock.url('s')}/v1/messages", timeout=10,
                      json={"model": "m", "max_tokens": 64, "stream": True, "messages": HI}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    stamps = [e["mock_t"] for e in events]
    assert len(events) == 3 + 6 and stamps == sorted(stamps)
    assert before < stamps[0] and stamps[-1] < time.monotonic()  # CLOCK_MONOTONIC, system-wide
    assert stamps[-1] - stamps[0] >= 0.020 * 8
    with sdk(mock, "s").messages.stream(model="m", max_tokens=64, messages=HI) as s:
        assert s.get_final_message().content[0].text == "w1 w2 w3"
    with pytest.raises(Exception, match="400"):
        mock.fault("s", stamp_events=1)


def test_the_balance_panel_answers_new_api_and_sub2api_shapes_and_counts_polls(mock):
    assert httpx.get(f"{mock.url('aws')}/api/user/self").status_code == 404  # no panel yet
    mock.balance("aws", quota=2_500_000, key="tok-1")
    assert httpx.get(f"{mock.url('aws')}/api/user/self").status_code == 401  # without the token
    auth = {"authorization": "Bearer tok-1"}
    self_page = httpx.get(f"{mock.url('aws')}/api/user/self", headers=auth).json()
    assert (self_page["success"], self_page["data"]["quota"]) == (True, 2_500_000)
    assert httpx.get(f"{mock.url('aws')}/v1/usage", headers=auth).json()["remaining"] == 5.0
    mock.balance("aws", status=503)  # the panel breaks; the poll count stays
    assert httpx.get(f"{mock.url('aws')}/api/user/self").status_code == 503
    assert mock.balance_polls("aws") == 4
    assert mock.requests("aws") == [mock.requests("aws")[0]]  # only the 404 before the panel
