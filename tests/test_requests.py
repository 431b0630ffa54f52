"""What the router accepts from a client before any attempt: pure checks."""

import pytest

from claude_router.requests import Refused, json_body, unsendable, upstream_target


@pytest.mark.parametrize("raw, target", [
    (b"/v1/messages", "/v1/messages"),
    (b"/v1/messages?beta=true", "/v1/messages?beta=true"),
    (b"/v1/messages?q=\xc3\xa9", "/v1/messages?q=%C3%A9"),  # non-ASCII bytes are percent-encoded
    (b"/v1/caf\xc3\xa9", "/v1/caf%C3%A9"),
    (b"/v1/a%20b", "/v1/a%20b"),
    (b"/v1/models/claude-3.5", "/v1/models/claude-3.5"),  # dots inside a segment are fine
])
def test_targets_are_forwarded_ascii_only(raw, target):
    assert upstream_target(raw) == target


@pytest.mark.parametrize("raw", [
    b"/../../admin/keys", b"/%2e%2e/%2e%2e/admin", b"/v1/../droid/v1/messages", b"/%2E%2e/x",
    b"/v1/%2e/messages", b"/v1/./messages", b"/v1/a%2fb", b"/v1/a%2F..%2Fb", b"/v1\\..\\x",
    b"/v1/a%5cb", b"/v1/%00", b"v1/messages", b"*",
])
def test_targets_that_could_leave_the_endpoint_are_refused(raw):
    with pytest.raises(Refused):
        upstream_target(raw)


def test_dot_segments_in_the_query_are_not_a_path():
    assert upstream_target(b"/v1/messages?next=/../x") == "/v1/messages?next=/../x"


@pytest.mark.parametrize("method, fields", [
    (b"P@ST", []),
    (b"POST", [(b"X-Trace", b"a\x01b")]),
    (b"POST", [(b"X-Folded", b"a\r\n b")]),  # obs-fold as mitmproxy keeps it
    (b"POST", [(b"X-Nul", b"a\x00")]),
    (b"POST", [(b"Bad Name", b"v")]),
])
def test_what_the_upstream_client_would_refuse_is_named(method, fields):
    assert unsendable(method, fields)


def test_tabs_and_obs_text_in_values_are_sendable():
    assert unsendable(b"POST", [(b"X-A", b"a\tb"), (b"X-B", b"\xff\xfe")]) is None


@pytest.mark.parametrize("body, streaming", [
    (b'{"stream": true, "messages": []}', True),
    (b'{"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {"stream": true}}]}]}',
     False),
    (b'{"stream": "true"}', False),
    (b'{"messages": [{"content": "' + b"x" * (2 << 20) + b'"}], "stream": true}', True),
])
def test_streaming_is_the_top_level_field(body, streaming):
    from claude_router.routing import Request
    assert Request("POST", "/v1/messages", [], body).streaming is streaming


@pytest.mark.parametrize("body", [b"", b"[1]", b"nope", b"[" * 100_000, b'{"a": ' + b"[" * 100_000])
def test_json_body_is_none_for_anything_but_an_object(body):
    assert json_body(body) is None
