import pytest

from claude_router.endpoints import parse_endpoint, parse_endpoints


def test_parse_keeps_path_prefix_and_strips_trailing_slash():
    ep = parse_endpoint("aws=https://relay.example/claude/aws/", 0)
    assert (ep.name, ep.url, ep.index) == ("aws", "https://relay.example/claude/aws", 0)


def test_url_for_appends_client_path_and_query():
    ep = parse_endpoint("aws=https://relay.example/claude/aws", 0)
    assert ep.url_for("/v1/messages?beta=true") == "https://relay.example/claude/aws/v1/messages?beta=true"


def test_url_for_bare_host():
    ep = parse_endpoint("direct=https://api.anthropic.com", 3)
    assert ep.url_for("/v1/models") == "https://api.anthropic.com/v1/models"


def test_origin_has_no_path_or_credentials():
    ep = parse_endpoint("a=https://user:secret@relay.example:8443/x", 0)
    assert ep.origin == "https://relay.example:8443"


@pytest.mark.parametrize(
    "spec",
    ["noequals", "=https://x", "a=", "a=ftp://x", "a=https://", "bad name=https://x",
     "a=https://x/?k=v", "a=https://x:99999"],
)
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError):
        parse_endpoint(spec, 0)


def test_indexes_follow_price_order():
    eps = parse_endpoints(["a=http://h/a", "b=http://h/b"])
    assert [(e.name, e.index) for e in eps] == [("a", 0), ("b", 1)]


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="used twice"):
        parse_endpoints(["a=http://h/a", "a=http://h/b"])


def test_shown_url_drops_credentials():
    ep = parse_endpoint("a=https://user:secret@relay.example/x", 0)
    assert ep.shown_url_for("/v1/messages?beta=true") == "https://relay.example/x/v1/messages?beta=true"
    assert ep.url_for("/v1/messages").startswith("https://user:secret@")


def test_key_replaces_client_credentials_only_for_that_endpoint():
    from claude_router.endpoints import Endpoint
    ep = Endpoint("a", "https://r/a", 0, key="sk-own", auth="bearer", headers=(("X-Tier", "a"),))
    client = [("x-api-key", "sk-client"), ("Authorization", "Bearer sk-client"), ("anthropic-version", "v")]
    assert ep.request_headers(client) == [("anthropic-version", "v"), ("authorization", "Bearer sk-own"),
                                          ("X-Tier", "a")]
    plain = Endpoint("b", "https://r/b", 1)
    assert plain.request_headers(client) is client


def test_repr_never_shows_key_url_credentials_or_extra_headers():
    from claude_router.endpoints import Endpoint
    ep = Endpoint("a", "https://user:hunter2@r/a", 0, key="sk-own", headers=(("x-relay-token", "tok-9"),))
    assert not any(s in repr(ep) for s in ("hunter2", "sk-own", "tok-9"))


def test_url_credentials_replace_both_of_the_clients_credentials():
    ep = parse_endpoint("a=https://user:pw@r/a", 0)
    assert ep.request_headers([("Authorization", "Bearer c"), ("x-api-key", "k"), ("x", "1")]) == [("x", "1")]


def test_url_credentials_are_the_endpoints_own_and_a_secret():
    import base64
    ep = parse_endpoint("a=https://user:p%40ss-0123456789@r/a", 0)
    basic = base64.b64encode(b"user:p@ss-0123456789").decode()
    assert ep.own_credentials and ep.holds_secrets
    assert ep.secrets == ("p%40ss-0123456789", "p@ss-0123456789", basic)


def test_an_endpoint_without_credentials_uses_the_clients():
    ep = parse_endpoint("a=https://r/a", 0)
    assert not ep.own_credentials and not ep.holds_secrets and ep.secrets == ()


def test_a_credential_named_extra_header_is_the_endpoints_own():
    from claude_router.endpoints import Endpoint
    assert Endpoint("a", "https://r", headers=(("X-Relay-Token", "t0123456789"),)).own_credentials
    assert not Endpoint("a", "https://r", headers=(("anthropic-beta", "x"),)).own_credentials


def test_an_endpoint_url_with_a_control_character_is_refused():
    with pytest.raises(ValueError, match="control"):
        parse_endpoint("a=https://r/a\r\nX: y", 0)


def test_redis_url_redaction_hides_both_password_forms():
    from claude_router.redis_store import redacted
    assert redacted("redis://:s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert redacted("unix:///run/redis.sock?password=s3cret&db=1") == "unix:///run/redis.sock?***"


def test_shown_parts_hold_no_credentials_and_keep_the_path_prefix():
    ep = parse_endpoint("a=https://user:pw@relay.example:8443/claude/aws/", 0)
    assert ep.shown_parts == ("https", "relay.example", 8443, "/claude/aws")
    assert parse_endpoint("b=http://[::1]/x", 1).shown_parts == ("http", "::1", 80, "/x")
