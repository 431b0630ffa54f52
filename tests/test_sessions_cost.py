"""Conversations and the cost rule: pure functions over a table of cases, injected times."""

import json

import pytest

from claude_router import cost, sessions
from claude_router.affinity import MemoryAffinity
from claude_router.sessions import Learned, Session
from claude_router.usage import Price

CHEAP = Price(input=2.0, output=10.0)
DEAR = Price(input=3.0, output=15.0)
NOW = 10_000.0


def sess(endpoint="dear", prompt=100_000, turns=6, age=30.0, ttl=300.0, output=500.0):
    return Session(endpoint, prompt, output, ttl, NOW - age, turns)


# -- identity --------------------------------------------------------------------------------

def test_claude_code_session_header_wins():
    assert sessions.session_id([("X-Claude-Code-Session-Id", "abc")], {"metadata": {"user_id": "x"}}) == "cc:abc"


def test_a_sub_agent_is_its_own_conversation():
    h = [("x-claude-code-session-id", "abc"), ("x-claude-code-agent-id", "ag1")]
    assert sessions.session_id(h, None) == "cc:abc/ag1"


def test_user_id_in_the_old_string_format():
    uid = "user_" + "a" * 64 + "_account_11111111-2222-3333-4444-555555555555_session_66666666-7777-8888-9999-000000000000"
    assert sessions.session_id([], {"metadata": {"user_id": uid}}) == "u:66666666-7777-8888-9999-000000000000"


def test_user_id_as_a_json_string():
    uid = json.dumps({"device_id": "d", "account_uuid": "a", "session_id": "s-123"})
    assert sessions.session_id([], {"metadata": {"user_id": uid}}) == "u:s-123"


def test_otherwise_the_cacheable_prefix_identifies_it():
    turn1 = {"system": "sys", "messages": [{"role": "user", "content": "hi"}]}
    turn2 = {"system": "sys", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                           {"role": "user", "content": "more"}]}
    other = {"system": "sys", "messages": [{"role": "user", "content": "bye"}]}
    a, b, c = (sessions.session_id([], d) for d in (turn1, turn2, other))
    assert a == b != c and a.startswith("p:")


def test_nothing_identifies_a_request_without_messages():
    assert sessions.session_id([], {"model": "m"}) is None and sessions.session_id([], None) is None


@pytest.mark.parametrize("doc, ttl", [
    ({"messages": [{"role": "user", "content": "x"}]}, 0.0),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]}, 300.0),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                 "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}, 3600.0),
])
def test_cache_ttl_from_the_breakpoints(doc, ttl):
    assert sessions.cache_ttl(doc) == ttl


# -- learning --------------------------------------------------------------------------------

def test_two_turns_without_cache_activity_mean_it_does_not_cache():
    l = sessions.UNKNOWN
    assert l.caches
    l = sessions.observe(l, 0)
    assert l.caches
    l = sessions.observe(l, 0)
    assert not l.caches
    assert sessions.observe(l, 5000).caches  # a read or write again: it caches after all


def test_cache_activity_is_expected_only_for_a_cacheable_prompt_with_breakpoints():
    assert sessions.expects_cache(300, 5000)
    assert not sessions.expects_cache(300, 3000)  # under some models' minimum
    assert not sessions.expects_cache(0, 50_000)  # no breakpoints: nothing to cache


def test_what_an_endpoint_may_still_hold_of_a_conversation():
    s = sessions.after_turn(None, "a", 8000, 100, 300, NOW - 100)
    s = sessions.after_turn(s, "b", 9000, 100, 300, NOW - 10)  # moved: a still holds 8000
    assert s.cached_at("b", NOW) == 9000 and s.cached_at("a", NOW) == 8000
    assert s.cached_at("a", NOW + 250) == 0 and s.cached_at("c", NOW) == 0


# -- the rule --------------------------------------------------------------------------------

CASES = [
    # (what, candidates in price order, session, learned, expected choice)
    ("new session: cheapest", [("cheap", CHEAP), ("dear", DEAR)], None, {}, "cheap"),
    ("warm on dear, prices close: stays",
     [("cheap", Price(input=2.9, output=15.0)), ("dear", DEAR)], sess("dear", turns=3), {}, "dear"),
    ("warm on dear, cheap far cheaper and a long session: moves",
     [("cheap", Price(input=0.5, output=2.5)), ("dear", DEAR)], sess("dear", turns=10), {}, "cheap"),
    ("warm on dear but only 1 turn seen: a move does not pay back yet",
     [("cheap", CHEAP), ("dear", DEAR)], sess("dear", turns=1), {}, "dear"),
    ("cache gone cold: cheapest",
     [("cheap", CHEAP), ("dear", DEAR)], sess("dear", age=600), {}, "cheap"),
    ("cheap does not cache: avoided for a cached conversation",
     [("cheap", Price(input=2.25, output=15.0)), ("dear", DEAR)], None,
     {"cheap": Learned(0, 2, 2)}, "dear"),
    ("back on cheap: the endpoint it left still holds most of its prefix",
     [("cheap", Price(input=2.4, output=12.0)), ("dear", DEAR)],
     Session("dear", 8078, 400.0, 300.0, NOW - 1, 6, "cheap", "", NOW - 3, 7700), {}, "cheap"),
    ("no breakpoints asked: list price only",
     [("cheap", CHEAP), ("dear", DEAR)], sess("dear", ttl=0.0), {}, "cheap"),
]


@pytest.mark.parametrize("what, candidates, session, learned, expected", CASES, ids=[c[0] for c in CASES])
def test_the_decision_rule(what, candidates, session, learned, expected):
    ttl = session.ttl if session else 300.0
    prompt = session.prompt_tokens if session else 50_000
    output = session.output_tokens if session else 0.0
    choice = cost.choose(candidates, learned, session, prompt, output, ttl, NOW, horizon=8)
    assert choice.endpoint == expected
    assert bool(choice.reason) == (expected != candidates[0][0])


def test_without_prices_nothing_is_weighed():
    assert cost.choose([("a", None), ("b", DEAR)], {}, None, 1000, 0, 300, NOW, 8) is None


def test_a_one_hour_write_costs_twice_the_input():
    inp, write, read = cost.rates(Price(input=3.0), 3600)
    assert (inp, write, read) == (3e-6, 6e-6, pytest.approx(0.3e-6))


def test_the_horizon_bounds_the_turns_assumed():
    assert cost.turns_to_come(sess(turns=50), 300, 8) == 8
    assert cost.turns_to_come(None, 300, 8) == 4
    assert cost.turns_to_come(sess(turns=50), 0, 8) == 1


# -- the local store -------------------------------------------------------------------------

def test_sessions_are_an_lru_bounded_in_size():
    a = MemoryAffinity(clock=lambda: NOW, max_sessions=3)
    for i in range(5):
        a.put(f"s{i}", sess())
    assert len(a) == 3 and a.local("s0") is None and a.local("s4") is not None


def test_old_sessions_expire():
    t = [NOW]
    a = MemoryAffinity(clock=lambda: t[0])
    a.put("s", sess(age=0))
    t[0] += 3600
    assert a.local("s") is None


def test_a_turn_updates_the_session():
    s = sessions.after_turn(None, "a", 1000, 100, 300, NOW)
    s = sessions.after_turn(s, "b", 2000, 300, 300, NOW + 5, "failover")
    assert (s.endpoint, s.prompt_tokens, s.output_tokens, s.turns, s.moved_from) == ("b", 2000, 200.0, 2, "a")


@pytest.mark.parametrize("field, value", [("p", 1e400), ("p", 10 ** 400), ("t", float("inf")),
                                          ("l", float("nan")), ("n", 0)])
def test_garbage_session_state_is_refused(field, value):
    d = sess().to_dict() | {field: value}
    with pytest.raises((ValueError, OverflowError)):
        Session.from_dict(d)
