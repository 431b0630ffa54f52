"""Endpoint profiles: models served, id mapping, rejected features, thinking, tiers, families."""

import json

import pytest

from claude_router import policy, profiles
from claude_router.config import ConfigError, parse
from claude_router.endpoints import parse_endpoints
from claude_router.health import Health, Phase, phase
from claude_router.profiles import Profile
from claude_router.requests import split_tier

BEDROCK = Profile(models=("claude-sonnet-*", "claude-haiku-*"),
                  model_map=(("claude-sonnet-4-5", "anthropic.claude-sonnet-4-5-v1:0"),))


def test_an_empty_models_list_serves_everything():
    assert Profile().serves("claude-opus-4-1") and Profile().serves(None)


def test_models_are_glob_patterns_of_client_ids():
    assert BEDROCK.serves("claude-haiku-4-5") and not BEDROCK.serves("claude-opus-4-1")


def test_the_model_id_is_replaced_in_place_and_nothing_else_changes():
    body = b'{"model" : "claude-sonnet-4-5",\n "messages":[{"role":"user","content":"model: x"}], "stream":true}'
    out = profiles.request_body(body, json.loads(body), BEDROCK)
    assert out == body.replace(b'"claude-sonnet-4-5"', b'"anthropic.claude-sonnet-4-5-v1:0"')


def test_an_unmapped_model_leaves_the_body_as_it_is():
    body = b'{"model":"claude-haiku-4-5","messages":[]}'
    assert profiles.request_body(body, json.loads(body), BEDROCK) is body


def test_a_nested_model_key_is_not_the_models_id():
    body = b'{"metadata":{"model":"claude-sonnet-4-5"},"model":"claude-sonnet-4-5"}'
    out = profiles.request_body(body, json.loads(body), BEDROCK)
    assert out == b'{"metadata":{"model":"claude-sonnet-4-5"},"model":"anthropic.claude-sonnet-4-5-v1:0"}'


def test_escaped_strings_do_not_fool_the_scanner():
    body = b'{"system":"a \\"model\\": \\\\","model":"claude-sonnet-4-5"}'
    assert json.loads(profiles.request_body(body, json.loads(body), BEDROCK))["model"].startswith("anthropic.")


def test_rejected_betas_are_dropped_for_that_endpoint_only():
    p = Profile(drop_betas=("context-1m-2025-08-07",))
    assert profiles.request_headers([("anthropic-beta", "context-1m-2025-08-07,oauth-2025")], p) == [
        ("anthropic-beta", "oauth-2025")]
    assert profiles.request_headers([("anthropic-beta", "context-1m-2025-08-07")], p) == []


def test_one_hour_cache_ttls_are_removed_where_unsupported():
    body = json.dumps({"model": "m", "system": [{"type": "text", "text": "s",
                       "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}).encode()
    out = json.loads(profiles.request_body(body, json.loads(body), Profile(cache_ttl=False)))
    assert out["system"][0]["cache_control"] == {"type": "ephemeral"}


def test_the_client_gets_its_own_model_id_back():
    assert profiles.answer_json(b'{"model":"anthropic.x","id":"m"}', "anthropic.x", "claude-x") == \
        b'{"model":"claude-x","id":"m"}'
    opening = b'event: message_start\ndata: {"message": {"model": "anthropic.x"}}\n\n'
    assert b'"model": "claude-x"' in profiles.answer_stream_opening(opening, "anthropic.x", "claude-x")


def test_models_lists_merge_in_client_ids():
    lists = [[{"id": "anthropic.claude-sonnet-4-5-v1:0"}, {"id": "claude-opus-4-1"}],
             [{"id": "claude-sonnet-4-5"}, {"id": "claude-opus-4-1"}]]
    merged = profiles.union_models(lists, [BEDROCK, Profile()])
    assert [m["id"] for m in merged] == ["claude-sonnet-4-5", "claude-opus-4-1"]


@pytest.mark.parametrize("model, family", [("claude-opus-4-1", "opus"), ("claude-3-5-haiku-latest", "haiku"),
                                           ("anthropic.claude-sonnet-4-5-v1:0", "sonnet"), ("gpt-x", None)])
def test_model_families(model, family):
    assert profiles.family(model) == family


THINKING = {
    "model": "m", "thinking": {"type": "enabled", "budget_tokens": 1024},
    "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "A"},
                                          {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ],
}


def test_thinking_blocks_are_removed_from_earlier_turns():
    out = profiles.without_thinking(THINKING)
    assert out["messages"][1]["content"] == [{"type": "text", "text": "b"}]
    assert out["thinking"] == THINKING["thinking"]


def test_thinking_is_turned_off_when_the_last_assistant_turn_would_open_with_tool_use():
    doc = json.loads(json.dumps(THINKING))
    doc["messages"][1]["content"][1] = {"type": "tool_use", "id": "t", "name": "n", "input": {}}
    assert "thinking" not in profiles.without_thinking(doc)


def test_nothing_to_strip_is_none():
    assert profiles.without_thinking({"messages": [{"role": "user", "content": "a"}]}) is None


def test_signature_rejections_are_recognised():
    msg = "messages.1.content.0: Invalid `signature` in `thinking` block"
    assert profiles.is_signature_rejection(400, "invalid_request_error", msg)
    assert not profiles.is_signature_rejection(400, "invalid_request_error", "max_tokens: too large")
    assert not profiles.is_signature_rejection(500, "api_error", msg)


@pytest.mark.parametrize("status, etype, message, unknown", [
    (404, "not_found_error", "model: claude-opus-4-1", True),
    (400, "invalid_request_error", "The model claude-opus-4-1 does not exist", True),
    (400, "invalid_request_error", "model_not_found: claude-opus-4-1", True),
    (400, "invalid_request_error", "thinking is not supported for this model", False),
    (400, "invalid_request_error", "messages: field required", False),
    (404, "not_found_error", "file not found", False),
])
def test_unknown_model_answers(status, etype, message, unknown):
    assert policy.names_unknown_model(status, etype, message, "claude-opus-4-1") is unknown


def test_a_pinned_tier_starts_there_then_pricier_then_wraps():
    eps = parse_endpoints(["a=http://h/a", "b=http://h/b", "c=http://h/c", "d=http://h/d"])
    assert [ep.name for ep in policy.pinned_order(eps, "c")] == ["c", "d", "a", "b"]


@pytest.mark.parametrize("raw, tier, rest", [
    (b"/droid/v1/messages?beta=true", "droid", b"/v1/messages?beta=true"),
    (b"/claude/droid/v1/messages", "droid", b"/v1/messages"),
    (b"/v1/messages", None, b"/v1/messages"),
    (b"/nope/v1/messages", None, b"/nope/v1/messages"),
    (b"/droid/other", None, b"/droid/other"),
])
def test_tiers_by_path(raw, tier, rest):
    assert split_tier(raw, {"droid", "aws"}) == (tier, rest)


def test_a_cooling_family_cools_that_endpoint_for_that_family_only():
    now = 1000.0
    view = {"aws~opus": Health(ejections=1, ejected_until=now + 30)}
    opus = policy.with_family(view, ["aws"], "opus", now)
    assert phase(opus["aws"], now) is Phase.COOLING
    assert policy.with_family(view, ["aws"], "haiku", now) is view


def test_unified_reset_is_honoured_like_retry_after_when_the_window_is_closed():
    closed = {"anthropic-ratelimit-unified-status": "rejected"}
    assert policy.cooldown_hint({**closed, "anthropic-ratelimit-unified-reset": "1300"}, 1000.0) == 300
    assert policy.cooldown_hint({**closed, "anthropic-ratelimit-unified-reset": "1970-01-01T00:21:40Z"},
                                1000.0) == 300


def test_unified_reset_of_an_open_window_is_no_hint():
    # Subscription relays send it on every answer; "allowed" says nothing about a cooldown.
    assert policy.cooldown_hint({"anthropic-ratelimit-unified-status": "allowed",
                                 "anthropic-ratelimit-unified-reset": "99999"}, 1000.0) == 0


def test_the_last_of_duplicate_model_keys_is_the_one_mapped():
    body = b'{"model":"x","max_tokens":1,"model":"claude-sonnet-4-5"}'
    out = profiles.request_body(body, json.loads(body), BEDROCK)
    assert json.loads(out)["model"] == "anthropic.claude-sonnet-4-5-v1:0"


def test_a_lone_surrogate_survives_a_rewrite():
    doc = {"model": "m", "system": [{"type": "text", "text": "a\ud800b",
                                     "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}
    out = profiles.request_body(json.dumps(doc).encode(), doc, Profile(cache_ttl=False))
    assert json.loads(out)["system"][0]["text"] == "a\ud800b"


def test_a_ttl_inside_a_tool_input_is_user_data_not_a_breakpoint():
    doc = {"model": "m", "messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "n", "input": {"cache_control": {"ttl": "1h"}}}]}]}
    body = json.dumps(doc).encode()
    assert profiles.request_body(body, doc, Profile(cache_ttl=False)) is body


def _cfg(**fields):
    return {"endpoints": [{"name": "aws", "url": "http://h/aws", **fields}]}


def test_profiles_are_read_from_the_config_file():
    ep = parse(_cfg(models=["claude-sonnet-*"], model_map={"claude-sonnet-4-5": "bedrock-sonnet"},
                    drop_betas=["x"], cache_ttl=False), "r.yaml", {}).endpoints[0]
    assert ep.profile == Profile(("claude-sonnet-*",), (("claude-sonnet-4-5", "bedrock-sonnet"),), ("x",), False)


@pytest.mark.parametrize("fields, where", [
    ({"models": "claude-*"}, "models"), ({"models": [""]}, "models"),
    ({"model_map": ["a"]}, "model_map"), ({"model_map": {"a": "x", "b": "x"}}, "model_map"),
    ({"drop_betas": [1]}, "drop_betas"), ({"cache_ttl": "no"}, "cache_ttl"),
    ({"model_map": {"a": "x\r\ny"}}, "model_map.a"),
])
def test_bad_profiles_are_refused_naming_the_field(fields, where):
    with pytest.raises(ConfigError, match=f"endpoints\\[0\\] \\(aws\\).{where}"):
        parse(_cfg(**fields), "r.yaml", {})


# -- thinking repair for the turn Claude Code sends most: [thinking, text, tool_use] ----------

TOOL_LOOP = {
    "model": "m", "thinking": {"type": "enabled", "budget_tokens": 1024},
    "messages": [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "A"},
                                          {"type": "text", "text": "I will look."},
                                          {"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.txt"}]},
    ],
}


def test_thinking_is_turned_off_when_the_last_turn_holds_tool_use_after_text():
    out = profiles.without_thinking(TOOL_LOOP)
    assert [b["type"] for b in out["messages"][1]["content"]] == ["text", "tool_use"]
    assert "thinking" not in out
    assert "thinking" in TOOL_LOOP  # the client's request is not changed


def test_a_redacted_thinking_block_counts_as_thinking_and_is_stripped_too():
    doc = json.loads(json.dumps(TOOL_LOOP))
    doc["messages"][1]["content"][0] = {"type": "redacted_thinking", "data": "xyz"}
    out = profiles.without_thinking(doc)
    assert [b["type"] for b in out["messages"][1]["content"]] == ["text", "tool_use"]
    assert "thinking" not in out


def test_an_assistant_turn_split_over_messages_is_one_turn():
    doc = json.loads(json.dumps(TOOL_LOOP))
    thinking, text, tool = doc["messages"][1]["content"]
    doc["messages"][1:2] = [{"role": "assistant", "content": [thinking, text]},
                            {"role": "assistant", "content": [tool]}]
    assert "thinking" not in profiles.without_thinking(doc)


def test_thinking_stays_on_when_only_an_earlier_turn_used_tools():
    doc = json.loads(json.dumps(TOOL_LOOP))
    doc["messages"] += [{"role": "assistant", "content": [
        {"type": "thinking", "thinking": "u", "signature": "B"}, {"type": "text", "text": "done"}]},
        {"role": "user", "content": "thanks"}]
    out = profiles.without_thinking(doc)
    assert out["thinking"] == TOOL_LOOP["thinking"]
    assert profiles.needs_thinking_first(out["messages"]) is False


def test_what_only_works_with_thinking_goes_with_it():
    doc = {**TOOL_LOOP, "context_management": {"edits": [
        {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}},
        {"type": "clear_tool_uses_20250919"}]}}
    out = profiles.without_thinking(doc)
    assert "thinking" not in out
    assert out["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}
    only = {**TOOL_LOOP, "context_management": {"edits": [{"type": "clear_thinking_20251015"}]}}
    assert "context_management" not in profiles.without_thinking(only)


def test_thinking_already_off_is_left_as_it_is():
    doc = {**TOOL_LOOP, "thinking": {"type": "disabled"}}
    assert profiles.without_thinking(doc)["thinking"] == {"type": "disabled"}


@pytest.mark.parametrize("blocks, needs", [
    (["thinking", "text", "tool_use"], False), (["redacted_thinking", "tool_use"], False),
    (["text", "tool_use"], True), (["tool_use"], True), (["text"], False), ([], False),
])
def test_the_apis_rule_for_the_last_assistant_turn(blocks, needs):
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": t} for t in blocks]},
                {"role": "user", "content": "b"}]
    assert profiles.needs_thinking_first(messages) is needs


# -- the client's own model id in every answer shape ------------------------------------------

UP, CLIENT = "vendor/claude-x-v1:0", "claude-x"
ESCAPED = "".join("\\/" if c == "/" else f"\\u{ord(c):04x}" for c in UP)  # decodes to UP


def _opening(model_json: str, nl: str = "\n") -> bytes:
    return (f'event: message_start{nl}data: {{"type":"message_start","message":{{"id":"msg_1",'
            f'"model":{model_json},"content":[]}}}}{nl}{nl}event: ping{nl}data: {{"type":"ping"}}{nl}{nl}'
            f'event: content_block_start{nl}data: {{"type":"content_block_start","index":0}}{nl}{nl}'
            ).encode()


@pytest.mark.parametrize("model_json", [json.dumps(UP), f'"{ESCAPED}"', '"vendor\\/claude-x-v1:0"'],
                         ids=["plain", "unicode-escaped", "slash-escaped"])
@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
def test_message_start_gets_the_clients_id_however_the_relays_is_escaped(model_json, nl):
    out = profiles.answer_stream_opening(_opening(model_json, nl), UP, CLIENT)
    assert out == _opening(json.dumps(CLIENT), nl)  # that value changes, no other byte


def test_message_start_with_data_over_several_lines_is_rewritten_as_one():
    held = (b'event: message_start\ndata: {"type":"message_start",\ndata: "message":{"model":"'
            + ESCAPED.encode() + b'"}}\n\nevent: ping\ndata: {}\n\n')
    out = profiles.answer_stream_opening(held, UP, CLIENT)
    assert out == (b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-x"}}'
                   b'\n\nevent: ping\ndata: {}\n\n')


@pytest.mark.parametrize("held", [
    _opening(json.dumps("claude-other")),  # another model: not the relay's id for this request
    _opening(json.dumps(UP))[:60],  # message_start not complete yet
    b'event: content_block_start\ndata: {"type":"content_block_start","message":{"model":"%s"}}\n\n'
    % UP.encode(),  # a model key outside message_start
])
def test_only_message_starts_own_model_is_changed(held):
    assert profiles.answer_stream_opening(held, UP, CLIENT) is held


@pytest.mark.parametrize("body", [
    b'{"id":"m","model":"%s","content":[]}' % ESCAPED.encode(),
    b'{"id":"m","mod\\u0065l":"vendor\\/claude-x-v1:0","content":[]}',
])
def test_a_json_answer_gets_the_clients_id_however_the_relays_is_escaped(body):
    out = profiles.answer_json(body, UP, CLIENT)
    assert json.loads(out)["model"] == CLIENT and UP.encode() not in out
    assert out.startswith(b'{"id":"m","') and out.endswith(b',"content":[]}')


def test_a_gzip_json_answer_is_decoded_to_be_rewritten():
    import gzip
    import zlib
    plain = b'{"id":"m","model":"%s","content":[{"type":"text","text":"hi"}]}' % ESCAPED.encode()
    for coding, body in [("gzip", gzip.compress(plain)), ("deflate", zlib.compress(plain))]:
        out = profiles.answer_body(body, coding, UP, CLIENT)
        assert out == plain.replace(b'"%s"' % ESCAPED.encode(), b'"claude-x"')
    gz = gzip.compress(plain)
    assert profiles.answer_body(gz[:-4], "gzip", UP, CLIENT) is None  # cut short: sent as it came
    assert profiles.answer_body(gz, "br", UP, CLIENT) is None  # unreadable: sent as it came
    assert profiles.answer_body(gzip.compress(b'{"model":"claude-x"}'), "gzip", UP, CLIENT) is None
    assert profiles.answer_body(plain, "", UP, CLIENT) == json.dumps(
        json.loads(plain) | {"model": CLIENT}, separators=(",", ":")).encode()


def test_a_gzip_stream_is_decoded_from_its_opening_on_when_it_must_be_rewritten():
    import zlib
    z = zlib.compressobj(wbits=31)
    events = [_opening(f'"{ESCAPED}"'), b'event: content_block_delta\ndata: {"text":"a"}\n\n',
              b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
    coded = [z.compress(e) + z.flush(zlib.Z_SYNC_FLUSH) for e in events]
    coded[-1] += z.flush()
    opening, inflater = profiles.answer_opening(coded[0], "gzip", UP, CLIENT)
    assert opening == _opening(json.dumps(CLIENT))
    # The rest continues the same compressed stream, event by event, in any chunking.
    assert b"".join(inflater.feed(coded[1])) == events[1]
    tail = b"".join(p for i in range(len(coded[2])) for p in inflater.feed(coded[2][i:i + 1]))
    assert tail == events[2] and inflater.ended and not inflater.broken
    # Nothing to change, or unreadable: None (every byte goes to the client as it came).
    same = zlib.compressobj(wbits=31)
    assert profiles.answer_opening(same.compress(_opening('"claude-x"')) + same.flush(), "gzip",
                                   UP, CLIENT) is None
    assert profiles.answer_opening(coded[0], "br", UP, CLIENT) is None
    assert profiles.answer_opening(b"\x1f\x8bnot gzip at all", "gzip", UP, CLIENT) is None
    assert profiles.answer_opening(_opening(f'"{ESCAPED}"'), "", UP, CLIENT) == \
        (_opening(json.dumps(CLIENT)), None)


def test_the_inflater_reads_members_in_turn_bounds_pieces_and_flags_corruption():
    import gzip

    from claude_router import decoding
    inflater = decoding.Inflater("gzip", piece=1000)
    pieces = list(inflater.feed(gzip.compress(b"a" * 5000) + gzip.compress(b"b" * 10)))
    assert b"".join(pieces) == b"a" * 5000 + b"b" * 10
    assert all(0 < len(p) <= 1000 for p in pieces) and inflater.ended
    bad = decoding.Inflater("gzip")
    assert list(bad.feed(gzip.compress(b"x") + b"garbage")) == [b"x"] and bad.broken
    assert list(bad.feed(gzip.compress(b"y"))) == []  # broken: nothing more
    assert decoding.Inflater("br").broken
    assert decoding.whole(gzip.compress(b"z" * 100), "gzip", limit=50) is None


@pytest.mark.parametrize("wbits", [15, -15], ids=["zlib", "raw"])
def test_a_deflate_stream_is_decoded_from_its_opening_on_too(wbits):
    import zlib
    z = zlib.compressobj(wbits=wbits)
    coded = z.compress(_opening(f'"{ESCAPED}"')) + z.flush(zlib.Z_SYNC_FLUSH)
    opening, inflater = profiles.answer_opening(coded, "deflate", UP, CLIENT)
    assert opening == _opening(json.dumps(CLIENT))
    assert b"".join(inflater.feed(z.compress(b"event: message_stop\n\n") + z.flush())) == \
        b"event: message_stop\n\n"
    assert inflater.ended and not inflater.broken


# -- edges found by mutation testing (./scripts/mutation, docs/mutation.md) -------------------

MAPPED = Profile(model_map=(("claude-x", "up-x"),))


def test_an_endpoint_id_maps_back_only_when_it_is_mapped():
    assert MAPPED.client_model("up-x") == "claude-x" and MAPPED.client_model("claude-x") is None


def test_a_body_without_json_or_rewrites_goes_unchanged():
    body = b'{"model": "claude-x"}'
    assert profiles.request_body(body, None, MAPPED) is body
    assert profiles.request_body(body, {"model": "claude-x"}, Profile()) is body


def test_removing_ttls_maps_the_model_and_writes_compact_ascii_json():
    doc = {"model": "claude-x",
           "system": [{"type": "text", "text": "é", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
           "tools": [{"name": "t", "cache_control": {"ttl": "1h"}}, "odd"],
           "messages": [{"role": "user",
                         "content": [{"type": "text", "text": "hi", "cache_control": {"ttl": "1h"}}, "s"]},
                        {"role": "user", "content": "plain"}, "odd"]}
    p = Profile(model_map=(("claude-x", "up-x"),), cache_ttl=False)
    out = profiles.request_body(json.dumps(doc).encode(), doc, p)
    assert out == json.dumps({
        "model": "up-x", "system": [{"type": "text", "text": "é", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "t", "cache_control": {}}, "odd"],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}, "s"]},
                     {"role": "user", "content": "plain"}, "odd"]}, separators=(",", ":")).encode()
    assert b"\\u00e9" in out


@pytest.mark.parametrize("doc", [
    {"messages": [{"role": "user", "content": [{"cache_control": {"ttl": "1h"}}]}]},
    {"tools": [{"cache_control": {"ttl": "1h"}}]},
])
def test_a_ttl_anywhere_is_removed(doc):
    out = json.loads(profiles.request_body(json.dumps(doc).encode(), doc, Profile(cache_ttl=False)))
    assert "ttl" not in json.dumps(out)


def test_a_body_without_ttls_is_kept_byte_for_byte():
    doc = {"model": "m", "messages": [{"role": "user", "content": [{"cache_control": "odd"}]}, "x"]}
    body = json.dumps(doc).encode()
    assert profiles.request_body(body, doc, Profile(cache_ttl=False)) is body


def test_dropped_betas_leave_the_others_joined_by_commas():
    p = Profile(drop_betas=("b",))
    assert profiles.request_headers([("anthropic-beta", "a, b ,c"), ("x", "1")], p) == [
        ("anthropic-beta", "a,c"), ("x", "1")]
    assert profiles.request_headers([("anthropic-beta", "b"), ("x", "1")], p) == [("x", "1")]


@pytest.mark.parametrize("messages, blocks", [
    ([], []),
    ([{"role": "user", "content": "q"}], []),
    ([{"role": "assistant", "content": "a"}], [{"type": "text", "text": "a"}]),
    ([{"role": "assistant", "content": [{"type": "x"}]}, {"role": "user", "content": "q"}], [{"type": "x"}]),
    (["odd", {"role": "assistant", "content": [{"type": "a"}]}, {"role": "assistant", "content": "b"}],
     [{"type": "a"}, {"type": "text", "text": "b"}]),
    ([{"role": "assistant", "content": [{"type": "a"}]}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": [{"type": "b"}]}], [{"type": "b"}]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "a"}]},
      {"role": "assistant", "content": [{"type": "b"}]}], [{"type": "a"}, {"type": "b"}]),
])
def test_the_last_assistant_turn_merges_consecutive_assistant_messages(messages, blocks):
    assert profiles.last_assistant_turn(messages) == blocks


def test_thinking_is_stripped_only_from_assistant_turns():
    doc = {"messages": [{"role": "user", "content": [{"type": "thinking"}]},
                        {"role": "assistant", "content": "text"}, "odd"]}
    assert profiles.without_thinking(doc) is None


@pytest.mark.parametrize("body, key, span", [
    (b'{"a": 1, "model": "m"}', "model", (18, 21)),
    (b'  {"model":"m","model":"n"}', "model", (23, 26)),  # duplicate keys: the last counts
    (b'{"a": {"model": "x"}, "b": [1, "]"]}', "model", None),  # not top level
    (b'{"a": "x\\\\", "model": "m"}', "model", (22, 25)),  # an escaped backslash ends the string
    (b'{"a": "x\\"", "model": "m"}', "model", (22, 25)),  # an escaped quote does not
    (b'{"mod\\u0065l": "m"}', "model", (15, 18)),
    (b'{"m\\u0065": "m"}', "model", None),
    (b'{"a": [{"b": "}"}], "model": true}', "model", (29, 33)),
    (b'{"a": 12, "model": null }', "model", (19, 23)),
    (b'{}', "model", None), (b'', "model", None), (b'   ', "model", None), (b'[]', "model", None),
    (b'{"a" 1}', "model", None), (b'{"a": ', "model", None), (b'{"a": "x', "model", None),
    (b'{"a": [1, 2', "model", None), (b'{"a": {"b": "x', "model", None), (b'{a: 1}', "model", None),
    (b'{"a', "model", None), (b'{"model": "m"', "model", (10, 13)), (b'{"model":', "model", None),
    (b'{"message": {"model": "m"}, "id": 1}', "message", (12, 26)),  # a nested value ends at its bracket
])
def test_a_top_level_value_is_found_without_parsing(body, key, span):
    assert profiles.top_level_span(body, key) == span


def test_replacing_a_value_keeps_every_other_byte_and_writes_utf8():
    body = b'{"model" : "up-x" ,"x":1}'
    assert profiles.replace_top_level_string(body, "model", "é") == '{"model" : "é" ,"x":1}'.encode()
    assert profiles.replace_top_level_string(b'{"model": 5}', "model", "m") is None
    assert profiles.replace_top_level_string(b'{"model": "a"}', "model", "m", only_if="b") is None


def test_a_json_answer_gets_the_clients_model_id_back():
    assert profiles.answer_json(b'{"model": "up-x"}', "up-x", "claude-x") == b'{"model": "claude-x"}'
    same = b'{"model": "up-x"}'
    assert profiles.answer_json(same, "up-x", "up-x") is same
    assert profiles.answer_json(b'{"\\u006dodel": "up-x"}', "up-x", "c") == b'{"\\u006dodel": "c"}'


def sse(*events: bytes) -> bytes:
    return b"".join(events)


def test_a_stream_opening_gets_the_clients_model_id_back():
    held = b'event: message_start\ndata: {"type":"message_start","message":{"model":"up-x"}}\n\n'
    assert profiles.answer_stream_opening(held, "up-x", "claude-x") == held.replace(b"up-x", b"claude-x")
    unnamed = b'data: {"type":"message_start","message":{"model":"up-x"}}\n\n'
    assert profiles.answer_stream_opening(unnamed, "up-x", "c") == unnamed.replace(b"up-x", b"c")
    other = b'event: ping\ndata: {"type":"ping"}\n\n' + held
    assert profiles.answer_stream_opening(other, "up-x", "c") == other.replace(b"up-x", b"c")
    nospace = held.replace(b"data: ", b"data:")
    assert profiles.answer_stream_opening(nospace, "up-x", "c") == nospace.replace(b"up-x", b"c")
    empty = b"event:message_start\ndata\n\n" + held  # an empty data line: not JSON, left alone
    assert profiles.answer_stream_opening(empty, "up-x", "c") is empty


def test_a_stream_opening_on_several_data_lines_is_written_again_as_one():
    held = (b'event: message_start\ndata: {"type":"message_start",\n'
            b'data: "message":{"model":"up-x","n":"\xc3\xa9"}}\n\nevent: ping\n\n')
    out = profiles.answer_stream_opening(held, "up-x", "c")
    assert out == ('event: message_start\ndata: {"type":"message_start","message":{"model":"c","n":"é"}}'
                   '\n\nevent: ping\n\n').encode()


def test_a_stream_opening_that_is_not_the_endpoints_model_is_left_alone():
    held = b'event: message_start\ndata: {"type":"message_start","message":{"model":"other"}}\n\n'
    assert profiles.answer_stream_opening(held, "up-x", "c") is held


def test_models_lists_skip_odd_entries_and_keep_looking():
    lists = [["odd", {"id": 5}, {"id": "up-x", "n": 1}, {"id": "claude-x"}, {"id": "up-y"}]]
    p = Profile(models=("claude-*",), model_map=(("claude-x", "up-x"), ("claude-y", "up-y")))
    assert profiles.union_models(lists, [p]) == [{"id": "claude-x", "n": 1}, {"id": "claude-y"}]


@pytest.mark.parametrize("body, span", [
    (b'{"model":1 ', (9, 10)), (b'{"model":1', (9, 10)), (b'{"model" ', None), (b'{"model" 1}', None),
    (b' {"model": "m"}', (11, 14)), (b'{"a": "", "model": "m"}', (19, 22)), (b'{"model":1 ,', (9, 10)),
])
def test_a_top_level_value_at_the_end_of_a_cut_or_odd_body(body, span):
    assert profiles.top_level_span(body, "model") == span


def test_an_opening_is_rewritten_past_data_less_events_and_on_unnamed_multiline_data():
    held = b'event: message_start\ndata: {"type":"message_start","message":{"model":"up-x"}}\n\n'
    assert profiles.answer_stream_opening(b"event: ping\n\n" + held, "up-x", "c") \
        == b"event: ping\n\n" + held.replace(b"up-x", b"c")
    unnamed = b'data: {"type":"message_start",\ndata: "message":{"model":"up-x"}}\n\n'
    assert profiles.answer_stream_opening(unnamed, "up-x", "c") \
        == b'data: {"type":"message_start","message":{"model":"c"}}\n\n'
    mixed = b'event: message_start\ndata:{"type":"message_start",\ndata: "message":\ndata:{"model":"up-x"}}\n\n'
    assert profiles.answer_stream_opening(mixed, "up-x", "c") \
        == b'event: message_start\ndata: {"type":"message_start","message":{"model":"c"}}\n\n'


def test_a_conversation_that_opens_with_assistant_messages():
    messages = [{"role": "assistant", "content": [{"type": "a"}]}, {"role": "assistant", "content": "b"}]
    assert profiles.last_assistant_turn(messages) == [{"type": "a"}, {"type": "text", "text": "b"}]


def test_removing_ttls_leaves_blocks_without_cache_control_alone():
    doc = {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {"ttl": "1h"}}]}
    out = json.loads(profiles.request_body(json.dumps(doc).encode(), doc, Profile(cache_ttl=False)))
    assert out["system"] == [{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {}}]


def test_models_an_endpoint_does_not_serve_are_left_out():
    p = Profile(models=("claude-*",))
    assert profiles.union_models([[{"id": "gpt-4"}, {"id": "claude-z"}]], [p]) == [{"id": "claude-z"}]


def _padded_opening(size: int) -> bytes:
    """A stream opening of exactly ``size`` bytes: the usual events, then a long comment line."""
    head = _opening(f'"{ESCAPED}"')
    return head + b":" + b"x" * (size - len(head) - 2) + b"\n"


def test_a_compressed_opening_of_exactly_the_bound_is_rewritten_whole():
    import gzip

    from claude_router import decoding
    plain = _padded_opening(4 * decoding.LIMIT)  # decoded in four pieces, at the bound
    opening, _ = profiles.answer_opening(gzip.compress(plain), "gzip", UP, CLIENT)
    assert opening == plain.replace(f'"{ESCAPED}"'.encode(), json.dumps(CLIENT).encode())


def test_a_compressed_opening_past_the_bound_is_sent_as_it_came():
    import gzip

    from claude_router import decoding
    plain = _padded_opening(4 * decoding.LIMIT + 1)
    assert profiles.answer_opening(gzip.compress(plain), "gzip", UP, CLIENT) is None
