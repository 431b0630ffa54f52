"""The failure policy's pure parts: classification table, back-off hints, stream starts."""

import email.utils

import pytest

from claude_router import policy, sse
from claude_router.endpoints import parse_endpoints
from claude_router.health import HEALTHY, Breaker, after_failure, try_probe
from claude_router.policy import DEFAULT_RULES, Verdict, classify, cooldown_hint, parse_rules

C, K, R, S, Y = Verdict.CLIENT, Verdict.COUNT, Verdict.RETURN, Verdict.SKIP, Verdict.KEY


@pytest.mark.parametrize(
    "status, etype, verdict",
    [
        (500, None, K), (502, None, K), (503, None, K), (504, "timeout_error", K),
        (529, "overloaded_error", K), (408, None, K), (429, "rate_limit_error", K),
        (401, "authentication_error", K), (402, "billing_error", K), (403, "forbidden", K),
        (403, "permission_error", S),  # this relay's token may not use that model: next, no blame
        (401, "invalid_request_error", K),  # a status rule beats the body's type
        (400, "invalid_request_error", C), (413, "request_too_large", C), (422, None, C),
        (404, "not_found_error", C), (409, None, C),
        (400, "overloaded_error", K), (400, "api_error", K),  # a relay's own trouble, as a 400
        (400, "brand_new_error_type", C), (400, None, C),
        (500, "invalid_request_error", K),  # a 5xx is the endpoint's, whatever it says
    ],
)
def test_default_classification(status, etype, verdict):
    assert classify(DEFAULT_RULES, status=status, error_type=etype) is verdict


@pytest.mark.parametrize("kind", ["refused", "reset", "timeout", "tls", "dns", "empty_stream",
                                  "stream_error", "bad_response", "redirect"])
def test_transport_failures_count(kind):
    assert classify(DEFAULT_RULES, transport=kind) is K


def test_an_outcome_no_rule_names_blames_nobody():
    assert classify(DEFAULT_RULES, transport="something_new") is S


@pytest.mark.parametrize("status", [401, 402, 403, 429])
def test_credential_answers_of_an_endpoint_using_the_clients_key_fail_over_for_that_key(status):
    assert classify(DEFAULT_RULES, status=status, own_credentials=False) is Y


@pytest.mark.parametrize("status", [401, 403, 429])
def test_todays_return_rule_stays_available(status):
    rules = parse_rules([f"client-key:{status}=return"])
    assert classify(rules, status=status, own_credentials=False) is R
    assert classify(rules, status=status, own_credentials=True) is K


@pytest.mark.parametrize("spec", ["429=key", "5xx=key", "timeout=key", "type:rate_limit_error=key"])
def test_the_key_action_is_only_for_client_key_rules(spec):
    with pytest.raises(ValueError, match="client-key"):
        parse_rules([spec])


@pytest.mark.parametrize("status, verdict", [(401, K), (402, K), (429, K), (500, K), (400, C)])
def test_endpoints_with_their_own_key_keep_the_table(status, verdict):
    assert classify(DEFAULT_RULES, status=status, own_credentials=True) is verdict


def test_client_key_rules_can_be_overridden():
    rules = parse_rules(["client-key:429=count"])
    assert classify(rules, status=429, own_credentials=False) is K
    assert classify(rules, status=401, own_credentials=False) is Y


def test_rules_override_defaults_most_specific_first():
    rules = parse_rules(["404=count", "4xx=return", "429=skip", "timeout=skip",
                         "400:invalid_request_error=return"])
    assert classify(rules, status=404, error_type="not_found_error") is K
    assert classify(rules, status=418) is R
    assert classify(rules, status=429) is S
    assert classify(rules, transport="timeout") is S
    assert classify(rules, status=400, error_type="invalid_request_error") is R


@pytest.mark.parametrize("spec", ["404", "404=maybe", "200=count", "99x=count", "nonsense=count"])
def test_bad_rules_are_refused(spec):
    with pytest.raises(ValueError):
        policy.parse_rule(spec)


NOW = 1_700_000_000.0


def test_hint_from_retry_after_seconds_and_ms():
    assert cooldown_hint({"retry-after": "5"}, NOW) == 5
    assert cooldown_hint({"retry-after-ms": "1500"}, NOW) == 1.5
    assert cooldown_hint({"retry-after": "2", "retry-after-ms": "2500"}, NOW) == 2.5


def test_hint_from_retry_after_http_date():
    date = email.utils.formatdate(NOW + 30, usegmt=True)
    assert cooldown_hint({"retry-after": date}, NOW) == pytest.approx(30, abs=1)


def test_hint_from_exhausted_rate_limit_reset_only():
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:40Z",  # NOW + 20
        "anthropic-ratelimit-tokens-remaining": "5000",
        "anthropic-ratelimit-tokens-reset": "2023-11-14T22:23:20Z",  # not exhausted: ignored
    }
    assert cooldown_hint(headers, NOW) == pytest.approx(20)


def test_no_or_garbage_hint_is_zero():
    assert cooldown_hint({}, NOW) == 0
    assert cooldown_hint({"retry-after": "soon"}, NOW) == 0


def test_retry_after_value_is_whole_seconds_between_1_and_60():
    assert policy.retry_after_value(0.2) == "1"
    assert policy.retry_after_value(29.1) == "30"
    assert policy.retry_after_value(600) == "60"


def test_seconds_until_usable():
    eps = parse_endpoints(["a=http://h/a", "b=http://h/b"])
    b = Breaker(max_failures=1, cooldown=30)
    cooled_a = after_failure(HEALTHY, NOW, b)
    cooled_b = after_failure(HEALTHY, NOW - 20, b)
    assert policy.seconds_until_usable(eps, {"a": cooled_a, "b": cooled_b}, NOW) == pytest.approx(10)
    assert policy.seconds_until_usable(eps, {"a": cooled_a}, NOW) == 0
    probing = try_probe(cooled_b, NOW + 10, b)
    assert policy.seconds_until_usable(eps, {"a": cooled_a, "b": probing}, NOW + 10) == pytest.approx(20)


def ev(name, data="{}"):
    return f"event: {name}\ndata: {data}\n\n".encode()


def test_stream_start_waits_through_the_prelude():
    assert sse.scan_start(ev("message_start") + ev("ping")) == sse.Start()


def test_stream_start_content_event():
    assert sse.scan_start(ev("message_start") + ev("content_block_start")).content


def test_stream_start_error_event_before_content():
    err = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    start = sse.scan_start(ev("message_start") + ev("error", err))
    assert (start.error_type, start.error_message) == ("overloaded_error", "Overloaded")


def test_stream_start_incomplete_event_is_not_judged_yet():
    assert sse.scan_start(b"event: content_block_start\ndata: {") == sse.Start()


def test_stream_start_handles_crlf_and_comments():
    assert sse.scan_start(b": keep-alive\r\n\r\nevent: content_block_delta\r\ndata: {}\r\n\r\n").content


# -- edges found by mutation testing (./scripts/mutation, docs/mutation.md) -------------------


@pytest.mark.parametrize("spec, message", [
    ("404", "expected KEY=ACTION"),
    ("429=maybe", "is not one of count, skip, client, return, key"),
    ("429=skip=skip", "is not one of"),  # the first = splits
    ("429=key", "action key is only for client-key:STATUS rules"),
    ("type:=count", "is not a status"), ("client-key:4011=key", "is not a status"),
    ("client-key:abc=skip", "is not a status"), ("999:403=count", "only 4xx and 5xx"),
    ("6xx=count", "is not a status"), ("4ab=count", "is not a status"), ("xxx=count", "is not a status"),
    ("600=count", "600: only 4xx and 5xx answers can be failures"),
    ("nonsense=count", "one of refused, reset, timeout"),
])
def test_bad_rules_are_refused_saying_why(spec, message):
    with pytest.raises(ValueError, match=message):
        policy.parse_rule(spec)


@pytest.mark.parametrize("spec, key", [
    ("type:overloaded_error=skip", "type:overloaded_error"), ("599=count", "599"),
    ("client-key:429=key", "client-key:429"), ("4xx=count", "4xx"), ("5XX=skip", "5xx"),
])
def test_good_rules_are_parsed(spec, key):
    assert policy.parse_rule(spec)[0] == key


def test_an_error_body_gives_its_type_and_message():
    body = b'{"error": {"type": "overloaded_error", "message": "busy"}}'
    assert policy.error_of(body) == ("overloaded_error", "busy")
    assert policy.error_of(b'{"error": {"type": 5, "message": "' + b"m" * 600 + b'"}}') == (None, "m" * 500)
    assert policy.error_of(b'{"error": {"type": "x", "message": 5}}') == ("x", "")


@pytest.mark.parametrize("body", [b"not json", b'{"error": "text"}', b'{"ERROR": {"type": "x"}}', b"[1]"])
def test_an_error_body_without_an_error_object_gives_nothing(body):
    assert policy.error_of(body) == (None, "")


@pytest.mark.parametrize("status, etype, message, model, unknown", [
    (404, None, "Model claude-x not found", "claude-x", True),
    (404, "not_found_error", "no such thing: claude-x", "claude-x", True),  # names the model
    (404, "not_found_error", "no such page", "claude-x", False),
    (404, None, "model not found", "claude-x", True),  # says "model", not which  # neither "model" nor the id
    (404, "api_error", "model claude-x: internal error", "claude-x", False),
    (400, None, "model claude-x is busy", "claude-x", False),
    (500, None, "model claude-x not found", "claude-x", False),
    (400, "invalid_request_error", "model CLAUDE-X: not found", "claude-X", True),
    (400, "invalid_request_error", "model claude-x is great", "claude-x", False),  # not unknown
    (400, "invalid_request_error", "this model: not found", "claude-x", False),  # not this model
])
def test_an_unknown_model_answer(status, etype, message, model, unknown):
    assert policy.names_unknown_model(status, etype, message, model) is unknown


def test_a_subscription_reset_counts_only_when_rejected():
    reset = {"anthropic-ratelimit-unified-reset": str(int(NOW + 50))}
    assert cooldown_hint(reset, NOW) == 0  # no status: not rejected
    assert cooldown_hint({**reset, "anthropic-ratelimit-unified-status": "Rejected"}, NOW) == 50
    assert cooldown_hint({"anthropic-ratelimit-unified-reset": "2023-11-14T22:13:40Z",
                          "anthropic-ratelimit-unified-status": "allowed",
                          "anthropic-ratelimit-unified-remaining": "0"}, NOW) == 0


def test_every_exhausted_limit_is_read_and_only_anthropic_ones():
    later = "2023-11-14T22:13:40Z"  # NOW + 20
    assert cooldown_hint({"anthropic-ratelimit-unified-reset": "1",
                          "anthropic-ratelimit-tokens-reset": later,
                          "anthropic-ratelimit-tokens-remaining": "0"}, NOW) == pytest.approx(20)
    assert cooldown_hint({"x-foo-reset": later, "x-foo-remaining": "0"}, NOW) == 0
    assert cooldown_hint({"anthropic-ratelimit-tokens-reset": later,
                          "anthropic-ratelimit-tokens-remaining": "1"}, NOW) == 0


@pytest.mark.parametrize("headers, hint", [
    ({"retry-after-ms": "soon"}, 0), ({"retry-after-ms": "inf"}, 0), ({"retry-after-ms": "nan"}, 0),
    ({"retry-after": "1.5"}, 1.5), ({"retry-after": " 7 "}, 7),
])
def test_odd_retry_after_values(headers, hint):
    assert cooldown_hint(headers, NOW) == hint


def test_seconds_until_usable_while_only_probes_are_in_flight():
    eps = parse_endpoints(["a=http://h/a"])
    b = Breaker(max_failures=1, cooldown=30, probe_timeout=10)
    probing = try_probe(after_failure(HEALTHY, NOW - 30, b), NOW, b)
    assert policy.seconds_until_usable(eps, {"a": probing}, NOW + 9.5) == pytest.approx(0.5)
    assert policy.seconds_until_usable([], {}, NOW) == 0
