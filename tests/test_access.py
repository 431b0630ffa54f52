"""Who may use the router: client keys, how they are presented, and the open-door refusal."""

import pytest

from claude_router import access
from claude_router.endpoints import parse_endpoints

KEYED = parse_endpoints(["paid=https://user:secret@relay.example"])
OPEN = parse_endpoints(["free=https://relay.example"])


def test_client_keys_come_from_the_option_the_environment_and_the_file():
    keys = access.client_keys(["plain", "env:TEAM_KEY"], ["from-file"], environ={"TEAM_KEY": "t"})
    assert keys == (b"plain", b"t", b"from-file")


@pytest.mark.parametrize("refs, env, problem", [
    ([""], {}, "router_client_keys[0] is empty"),
    (["ok", "  "], {}, "router_client_keys[1] is empty"),
    (["env:UNSET"], {}, "environment variable UNSET is not set"),
    (["env:EMPTY"], {"EMPTY": ""}, "environment variable EMPTY is not set"),
])
def test_a_key_that_would_let_everyone_in_is_refused(refs, env, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        access.client_keys(refs, environ=env)


@pytest.mark.parametrize("headers", [
    {"x-api-key": "k1"},
    {"authorization": "Bearer k1"},
    {"authorization": "bearer   k1 "},
])
def test_a_key_is_presented_as_x_api_key_or_a_bearer_token(headers):
    assert access.authorized(headers, (b"k0", b"k1"))


@pytest.mark.parametrize("headers", [
    {},
    {"x-api-key": "k2"},
    {"x-api-key": "", "authorization": "Basic k1"},
    {"x-api-key": "k1\udcff"},  # undecodable bytes as mitmproxy hands them over
])
def test_anything_else_is_not_authorized(headers):
    assert not access.authorized(headers, (b"k1",))


def test_x_api_key_wins_over_a_bearer_token():
    assert not access.authorized({"x-api-key": "wrong", "authorization": "Bearer k1"}, (b"k1",))


@pytest.mark.parametrize("listen, modes, door", [
    ("0.0.0.0", [], "0.0.0.0"),
    ("", [], ""),  # every interface
    ("127.0.0.1", ["reverse:https://relay.example@0.0.0.0:8080"], "0.0.0.0"),
    ("127.0.0.1", ["reverse:https://relay.example"], None),
    ("localhost", [], None),
    ("::1", [], None),
])
def test_endpoint_keys_behind_a_listener_others_reach_need_client_keys(listen, modes, door):
    assert access.open_door(KEYED, (), listen, modes) == door


def test_the_door_is_shut_by_client_keys_or_by_endpoints_without_keys():
    assert access.open_door(KEYED, (b"k",), "0.0.0.0", []) is None
    assert access.open_door(OPEN, (), "0.0.0.0", []) is None


@pytest.mark.parametrize("path, base", [
    ("/", True), ("", True), ("/api/hello", True), ("/droid", True), ("/droid/", True),
    ("/claude/droid", True), ("/claude/droid/api/hello?x=1", True),
    ("/v1/messages", False), ("/other", False), ("/x/droid", False),
])
def test_claude_codes_reachability_checks_are_base_urls(path, base):
    assert access.is_base_url(path, ["droid"]) is base


# -- key-less HEAD: the same answer for every path (no oracle for endpoint names) -----------------

@pytest.mark.parametrize("path", ["/", "/droid", "/claude/droid", "/nope", "/claude/nope",
                                  "/v1/messages", "/_router/status", "/droid/api/hello"])
def test_a_keyless_head_is_answered_here_whatever_its_path(path):
    assert access.answered_here("HEAD", path, ["droid"], keyed=False) is True


@pytest.mark.parametrize("path, here", [("/", True), ("/droid", True), ("/claude/droid/api/hello", True),
                                        ("/nope", False), ("/v1/models", False)])
def test_a_keyed_head_is_answered_here_only_for_a_base_url(path, here):
    assert access.answered_here("HEAD", path, ["droid"], keyed=True) is here


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS", "head"])
@pytest.mark.parametrize("keyed", [True, False])
def test_only_head_is_answered_here(method, keyed):
    assert access.answered_here(method, "/", ["droid"], keyed) is False


def test_the_key_of_mitmproxy_headers_follows_every_change_to_them():
    from mitmproxy.http import Headers
    h = Headers(x_api_key="k1")
    assert access.presented_key(h) == b"k1" and access.authorized(h, (b"k0", b"k1"))
    h["x-api-key"] = "k2"  # (mitmproxy replaces the fields tuple the answer is kept by)
    assert access.presented_key(h) == b"k2" and not access.authorized(h, (b"k0", b"k1"))
    del h["x-api-key"]
    h["authorization"] = "Bearer k0"
    assert access.presented_key(h) == b"k0"
    other = Headers(x_api_key="k1")
    assert access.presented_key(other) == b"k1" and access.presented_key(h) == b"k0"


def test_keys_in_a_list_are_compared_too():
    keys = [b"k0"]
    assert access.authorized({"x-api-key": "k0"}, keys)
    keys[0] = b"k9"  # a list may change: it is never indexed
    assert not access.authorized({"x-api-key": "k0"}, keys)
