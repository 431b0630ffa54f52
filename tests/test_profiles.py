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
