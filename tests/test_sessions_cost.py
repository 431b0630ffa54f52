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
    uid = ("user_" + "a" * 64 + "_account_11111111-2222-3333-4444-555555555555"
           "_session_66666666-7777-8888-9999-000000000000")
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

def test_misses_in_two_conversations_mean_it_does_not_cache():
    l = sessions.UNKNOWN
    assert l.caches
    l = sessions.observe(l, 0, "conv-a", NOW)
    assert l.caches
    l = sessions.observe(l, 0, "conv-b", NOW + 1)
    assert not l.caches and l.sources == ("conv-a", "conv-b")
    assert sessions.observe(l, 5000, "conv-c", NOW + 2).caches  # a read or write again: it caches after all


def test_misses_in_one_conversation_never_teach_it():
    l = sessions.UNKNOWN
    for i in range(10):
        l = sessions.observe(l, 0, "conv-a", NOW + i)
    assert l.caches and l.misses == 10 and l.sources == ("conv-a",)


def test_a_read_or_write_clears_the_misses_and_their_sources():
    l = sessions.observe(sessions.observe(sessions.UNKNOWN, 0, "a", NOW), 4000, "b", NOW)
    l = sessions.observe(l, 0, "c", NOW)
    assert l.caches and l.sources == ("c",) and l.hits == 1


def test_what_was_learned_expires_and_is_checked_again():
    l = sessions.observe(sessions.observe(sessions.UNKNOWN, 0, "a", NOW), 0, "b", NOW)
    assert not l.caches
    assert sessions.fresh({"x": l}, NOW + sessions.LEARNED_TTL - 1) == {"x": l}
    assert sessions.fresh({"x": l}, NOW + sessions.LEARNED_TTL) == {}  # tried again: optimistic
    # once stale, an answer starts the evidence afresh: one more miss does not condemn it
    again = sessions.observe(l, 0, "c", NOW + sessions.LEARNED_TTL + 5)
    assert again.caches and again.sources == ("c",)


def test_the_sources_kept_are_bounded():
    l = sessions.UNKNOWN
    for i in range(10):
        l = sessions.observe(l, 0, f"s{i}", NOW)
    assert len(l.sources) == sessions.MAX_SOURCES and not l.caches


def test_learned_facts_round_trip_through_the_shared_store():
    l = sessions.observe(sessions.observe(sessions.UNKNOWN, 0, "0a1b2c3d4e5f", NOW), 0, "ffffeeee0000", NOW)
    assert Learned.decode(l.encode()) == Learned(0, 2, 2, ("0a1b2c3d4e5f", "ffffeeee0000"), NOW)


@pytest.mark.parametrize("raw", ["0:2:2", "not:a:count", "x", "0:2:2:nan:a,b", "0:2:2:1e300:a",
                                 "-1:0:0:5:", "0:2:2:5:a,a", "0:2:2:5:a b,c", "0:2:2:5:" + ",".join("abcdef")])
def test_garbage_or_an_older_routers_learned_state_is_refused(raw):
    with pytest.raises(ValueError):
        Learned.decode(raw)


@pytest.mark.parametrize("ttl, prefix, prompt, minimum, expected", [
    (300, 5000, 5000, 4096, True),
    (300, 3000, 50_000, 4096, False),  # the prefix up to the breakpoint is under the minimum
    (300, 5000, 3000, 4096, False),  # the endpoint counted the whole prompt under it
    (300, 2048, 2048, 2048, True),
    (0, 50_000, 50_000, 1024, False),  # no breakpoints: nothing to cache
])
def test_a_miss_is_expected_only_where_the_prefix_was_cacheable(ttl, prefix, prompt, minimum, expected):
    assert sessions.expects_cache(ttl, prefix, prompt, minimum) is expected


LONG = "You are a careful assistant. " + "Follow the project's conventions closely. " * 450  # ~3.6k tokens
MARK = {"type": "ephemeral"}


def text(t, mark=False):
    return {"type": "text", "text": t, **({"cache_control": MARK} if mark else {})}


@pytest.mark.parametrize("what, doc, low, high", [
    ("a tiny marked first block before a long unmarked one",
     {"system": [text("Be brief.", True)], "messages": [{"role": "user", "content": LONG * 3}]}, 0, 10),
    ("the same with the long block unmarked in a list",
     {"system": [text("Be brief.", True), text(LONG * 3)], "messages": [{"role": "user", "content": "hi"}]}, 0, 10),
    ("a long marked system prompt", {"system": [text(LONG, True)], "messages": []}, 3000, 4900),
    ("the newest message marked: everything before it counts",
     {"system": [text(LONG)], "messages": [{"role": "user", "content": [text("hi", True)]}]}, 3000, 4900),
    ("a top-level cache_control marks the last block",
     {"cache_control": MARK, "system": LONG, "messages": [{"role": "user", "content": "hi"}]}, 3000, 4900),
    ("no breakpoint", {"system": LONG, "messages": [{"role": "user", "content": LONG}]}, 0, 0),
    ("padding that tokenizes into few tokens", {"system": [text("a" * 16000 + " " * 16000, True)]}, 0, 2000),
    ("an image's payload is not text",
     {"messages": [{"role": "user", "content": [{"type": "image", "source": {
         "type": "base64", "media_type": "image/png", "data": "iVBORw0K" * 5000}, "cache_control": MARK}]}]}, 0, 0),
    ("earlier turns' thinking is dropped by the API",
     {"messages": [{"role": "assistant", "content": [{"type": "thinking", "thinking": LONG, "signature": "s" * 9000}]},
                   {"role": "user", "content": [text("hi", True)]}]}, 0, 2),
    ("tools count, before the system prompt",
     {"tools": [{"name": "Read", "description": LONG, "input_schema": {"type": "object"}, "cache_control": MARK}]},
     3000, 4900),
    ("garbage", {"system": [7, None, {"cache_control": "x"}], "messages": "no"}, 0, 0),
])
def test_the_prefix_up_to_the_last_breakpoint_is_estimated_low(what, doc, low, high):
    assert low <= sessions.breakpoint_prefix_tokens(doc) <= high


def test_the_prefix_estimate_stops_counting_at_its_cap():
    doc = {"system": [text(LONG * 100)], "messages": [{"role": "user", "content": [text("hi", True)]}]}
    assert sessions.breakpoint_prefix_tokens(doc, cap=2048) == 2048
    assert sessions.breakpoint_prefix_tokens(None) == 0


@pytest.mark.parametrize("model, minimum", [("claude-sonnet-4-5", 2048), ("claude-haiku-4-5", 4096),
                                            ("claude-opus-4-6", 4096), ("gpt-x", 4096), (None, 4096)])
def test_each_family_gets_its_largest_minimum_cacheable_prefix(model, minimum):
    assert sessions.min_cacheable(model) == minimum


def test_a_model_an_endpoint_maps_to_counts_too():
    assert sessions.min_cacheable("claude-sonnet-4-5", "anthropic.claude-haiku-4-5-v1:0") == 4096
    assert sessions.min_cacheable("claude-sonnet-4-5", "claude-sonnet-4-5") == 2048


# -- whose conversation it is --------------------------------------------------------------

def test_a_conversation_record_is_keyed_by_its_credential_and_never_holds_its_id():
    a = sessions.record_key("aaaaaaaaaaaaaaaa", "cc:secret-session-1234", "sonnet")
    b = sessions.record_key("bbbbbbbbbbbbbbbb", "cc:secret-session-1234", "sonnet")
    assert a != b and a.startswith("aaaaaaaaaaaaaaaa:") and a.endswith("#sonnet")
    assert "secret" not in a and "secret" not in json.dumps(sessions.shown(a))
    assert sessions.shown(a) == {"session": a.split(":")[1][:12] + "#sonnet", "client": "aaaaaaaaaaaaaaaa"}
    assert sessions.source(a) != sessions.source(b)


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
     {"cheap": Learned(0, 2, 2, ("a", "b"), NOW)}, "dear"),
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


# -- the glue: placement and what a turn teaches, through Conversations (injected clock) -----

from types import SimpleNamespace  # noqa: E402

from claude_router.conversations import Conversations  # noqa: E402
from claude_router.endpoints import Endpoint  # noqa: E402
from claude_router.routing import Request  # noqa: E402
from claude_router.status import Stats  # noqa: E402
from claude_router.usage import Usage  # noqa: E402

EPS = (Endpoint("cheap", "http://x/cheap", 0, price=Price(input=2.8, output=14.0)),
       Endpoint("dear", "http://x/dear", 1, price=DEAR))
A, B = "a" * 16, "b" * 16  # two clients' credential hashes (access.credential_id)


def body(system, sid="sess-1", messages=None):
    doc = {"model": "claude-sonnet-4-5", "max_tokens": 8, "system": system,
           "messages": messages or [{"role": "user", "content": [text("hi", True)]}]}
    return Request("POST", "/v1/messages", [("x-claude-code-session-id", sid)], json.dumps(doc).encode())


CACHED = [text(LONG, True)]  # a cacheable prefix (~3.6k tokens, over Sonnet's 2,048)
POISON = [text("Be brief.", True), text(LONG * 3)]  # a tiny marked block, then a long unmarked one


class Clock:
    def __init__(self):
        self.t = NOW

    def __call__(self):
        return self.t


async def turn(conv, req, owner, endpoint, usage, pinned=False, attempts=()):
    """Place a request, then record its answer from ``endpoint``: what _route and _finish do."""
    t, prev, ttl, choose = await conv.place(req, "/v1/messages", EPS, owner=owner, pinned=pinned)
    picked = choose(list(EPS)) if choose else None
    ep = next(e for e in EPS if e.name == endpoint)
    info = SimpleNamespace(session_id=t, session=prev, ttl=ttl, attempts=list(attempts), reason="")
    conv.record_turn(info, ep, usage, Stats())
    return picked


MISS = Usage(input_tokens=14_000, output_tokens=10)  # no cache read nor write
WRITE = Usage(input_tokens=10, output_tokens=10, cache_creation_input_tokens=14_000)
READ = Usage(input_tokens=10, output_tokens=10, cache_read_input_tokens=14_000)


async def test_tiny_breakpoints_before_long_unmarked_blocks_teach_nothing():
    conv = Conversations(Clock())
    for i in range(5):  # one client, several conversations: a caching relay writes nothing below the minimum
        await turn(conv, body(POISON, f"attack-{i}", [{"role": "user", "content": "hi"}]), A, "cheap", MISS)
    assert "cheap" not in conv.affinity.learned
    assert (await turn(conv, body(CACHED, "victim"), B, "cheap", WRITE)) == ("cheap", "")


async def test_a_relay_is_judged_not_to_cache_only_on_misses_in_two_conversations():
    clock = Clock()
    conv = Conversations(clock)
    for _ in range(3):  # one conversation's misses: not enough
        await turn(conv, body(CACHED, "one"), A, "cheap", MISS)
    assert conv.affinity.learned["cheap"].caches
    await turn(conv, body(CACHED, "two"), A, "cheap", MISS)  # a second conversation (same client)
    assert not conv.affinity.learned["cheap"].caches
    picked = await turn(conv, body(CACHED, "new"), B, "dear", WRITE)
    assert picked[0] == "dear" and "does not cache" in picked[1]
    clock.t += sessions.LEARNED_TTL  # an hour on, with nothing seen: tried again
    assert (await turn(conv, body(CACHED, "later"), B, "cheap", WRITE)) == ("cheap", "")
    assert conv.affinity.learned["cheap"].caches and conv.affinity.learned["cheap"].hits == 1


async def test_another_clients_request_with_the_same_session_id_neither_reads_nor_moves_it():
    conv = Conversations(Clock())
    await turn(conv, body(CACHED, "shared-id"), A, "dear", WRITE)  # A's conversation is warm on dear
    assert (await turn(conv, body(CACHED, "shared-id"), A, "dear", READ))[0] == "dear"
    picked = await turn(conv, body(CACHED, "shared-id"), B, "cheap", WRITE)  # B: its own, new record
    assert picked == ("cheap", "")
    assert len(conv.affinity) == 2
    mine = next(s for k, s in conv.affinity.recent() if k.startswith(A))
    assert (mine.endpoint, mine.turns) == ("dear", 2)
    assert (await turn(conv, body(CACHED, "shared-id"), A, "dear", READ))[0] == "dear"


async def test_a_pinned_request_moves_no_conversation_not_even_its_own():
    conv = Conversations(Clock())
    await turn(conv, body(CACHED, "s"), A, "dear", WRITE)
    before = dict(conv.affinity.recent())
    for owner in (A, B):
        assert (await turn(conv, body(CACHED, "s"), owner, "cheap", WRITE, pinned=True)) is None
    assert dict(conv.affinity.recent()) == before  # nothing placed, nothing moved
    picked = await turn(conv, body(CACHED, "s"), A, "dear", READ)
    assert picked[0] == "dear" and "warm" in picked[1]


async def test_a_pinned_request_still_teaches_what_the_endpoint_does():
    conv = Conversations(Clock())
    for sid in ("p1", "p2"):
        await turn(conv, body(CACHED, sid), A, "cheap", MISS, pinned=True)
    assert not conv.affinity.learned["cheap"].caches and len(conv.affinity) == 0


async def test_the_status_shows_hashed_ids_and_facts_that_are_still_believed():
    clock = Clock()
    conv = Conversations(clock)
    await turn(conv, body(CACHED, "secret-session-id-0001"), A, "dear", WRITE)
    for sid in ("x1", "x2"):
        await turn(conv, body(CACHED, sid), A, "cheap", MISS)
    doc = Stats().document(EPS, {}, clock(), set(), "memory", conv.affinity)
    assert "secret-session-id" not in json.dumps(doc) and "x1" not in json.dumps(doc)
    assert [e["caches"] for e in doc["endpoints"]] == [False, True]
    assert {r["client"] for r in doc["sessions"]["recent"]} == {A}
    assert all(len(r["session"]) == len("0123456789ab#sonnet") for r in doc["sessions"]["recent"])
    clock.t += sessions.LEARNED_TTL
    doc = Stats().document(EPS, {}, clock(), set(), "memory", conv.affinity)
    assert [e["caches"] for e in doc["endpoints"]] == ["unknown", "unknown"]


async def test_a_prefix_under_the_minimum_of_the_model_an_endpoint_maps_to_teaches_nothing():
    from dataclasses import replace as copy

    from claude_router.profiles import Profile
    conv = Conversations(Clock())
    mapped = copy(EPS[0], profile=Profile(model_map=(("claude-sonnet-4-5", "claude-haiku-4-5"),)))
    for sid in ("m1", "m2"):  # ~3.6k tokens: over Sonnet's 2,048, under Haiku 4.5's 4,096
        t, prev, ttl, _ = await conv.place(body(CACHED, sid), "/v1/messages", EPS, owner=A)
        conv.record_turn(SimpleNamespace(session_id=t, session=prev, ttl=ttl, attempts=[], reason=""),
                         mapped, MISS, Stats())
    assert "cheap" not in conv.affinity.learned


# -- what a shared store holds: exact formats and the edges of what is believed ---------------
# (killed mutants: docs/mutation.md; a store written by one router is read by another)

FULL = Session("dear", 1234, 56.78, 3600.0, 1700000000.12345, 7, "cheap", "why", 1699999999.9876, 999)


def test_a_session_is_stored_in_its_exact_shared_format():
    assert FULL.to_dict() == {"e": "dear", "p": 1234, "o": 56.8, "t": 3600.0, "l": 1700000000.123,
                              "n": 7, "m": "cheap", "w": "why", "la": 1699999999.988, "lp": 999}


def test_a_stored_session_reads_back_whole():
    back = Session.from_dict(FULL.to_dict())
    assert (back.endpoint, back.prompt_tokens, back.turns, back.moved_from, back.why, back.left_prompt) \
        == ("dear", 1234, 7, "cheap", "why", 999)
    assert (back.output_tokens, back.last, back.left_at) == (56.8, 1700000000.123, 1699999999.988)


def test_a_stored_session_without_its_optional_fields_is_a_first_turn():
    s = Session.from_dict({"e": "x", "p": 10, "o": 1.0, "t": 300, "l": 5.0})
    assert (s.turns, s.moved_from, s.why, s.left_at, s.left_prompt) == (1, "", "", 0.0, 0)


BASE = {"e": "x", "p": 10, "o": 1.0, "t": 300.0, "l": 5.0, "n": 2, "m": "", "w": "", "la": 0.0, "lp": 0}


@pytest.mark.parametrize("field, value", [
    ("p", 0), ("p", (1 << 40) - 1), ("o", 0.0), ("o", 1e12 - 1), ("lp", 0), ("lp", (1 << 40) - 1),
    ("la", 0.0), ("la", 1e11 - 1), ("t", 0.0), ("t", 86400.0), ("l", 0.0), ("l", 1e11 - 1),
    ("n", 1), ("n", (1 << 31) - 1), ("e", "e" * 64),
])
def test_session_state_at_the_edge_of_its_range_is_believed(field, value):
    assert Session.from_dict({**BASE, field: value}).to_dict().get(field) is not None


@pytest.mark.parametrize("field, value", [
    ("p", -1), ("p", 1 << 40), ("o", -0.5), ("o", 1e12), ("lp", -1), ("lp", 1 << 40),
    ("la", -0.5), ("la", 1e11), ("t", -1.0), ("t", 86400.5), ("l", -0.5), ("l", 1e11),
    ("n", 0), ("n", 1 << 31), ("e", "e" * 65),
])
def test_session_state_just_out_of_range_is_refused(field, value):
    with pytest.raises(ValueError, match="session state out of range"):
        Session.from_dict({**BASE, field: value})


def test_learned_state_is_stored_in_its_exact_shared_format():
    assert Learned(3, 1, 4, ("ab12", "cd34"), 12.34567).encode() == "3:1:4:12.346:ab12,cd34"


@pytest.mark.parametrize("raw", [
    "0:0:0:0.000:", f"{(1 << 62) - 1}:{(1 << 62) - 1}:{(1 << 62) - 1}:99999999999.000:a,b,c,d",
    "1:2:3:4.000:" + "a" * 16,
])
def test_learned_state_at_the_edge_of_its_range_is_believed(raw):
    assert Learned.decode(raw).encode() == raw


@pytest.mark.parametrize("raw", [
    "-1:0:0:0.000:", f"{1 << 62}:0:0:0.000:", "0:-1:0:0.000:", f"0:{1 << 62}:0:0.000:",
    "0:0:-1:0.000:", f"0:0:{1 << 62}:0.000:", "0:0:0:-0.5:", "0:0:0:100000000000.0:",
    "0:0:0:0.0:a,b,c,d,e", "0:0:0:0.0:a,a", "0:0:0:0.0:" + "a" * 17, "0:0:0:0.0:a-b",
])
def test_learned_state_just_out_of_range_is_refused(raw):
    with pytest.raises(ValueError, match="learned state out of range"):
        Learned.decode(raw)


def test_a_sessions_cache_is_warm_until_its_ttl_has_passed():
    s = Session("dear", 100, 1.0, 300.0, NOW, moved_from="cheap", left_at=NOW - 100, left_prompt=80)
    assert s.warm(NOW + 299.9) and not s.warm(NOW + 300)
    assert s.cached_at("dear", NOW + 299.9) == 100 and s.cached_at("dear", NOW + 300) == 0
    assert s.cached_at("cheap", NOW + 199.9) == 80 and s.cached_at("cheap", NOW + 200) == 0
    assert not Session("dear", 100, 1.0, 0.0, NOW).warm(NOW)
    assert Session("dear", 100, 1.0, 0.0, NOW).cached_at("dear", NOW - 1) == 0  # no caching asked
    assert Session("dear", 100, 1.0, 0.5, NOW).warm(NOW + 0.1)
    assert Session("dear", 100, 1.0, 0.5, NOW).cached_at("dear", NOW + 0.1) == 100


def test_a_first_turn_starts_a_session_that_has_not_moved():
    s = sessions.after_turn(None, "dear", 100, 40, 300.0, NOW, why="cheapest")
    assert s == Session("dear", 100, 40.0, 300.0, NOW, 1, "", "cheapest")
    assert sessions.after_turn(None, "dear", 100, 40, 300.0, NOW).why == ""


def test_a_turn_elsewhere_records_the_move_and_keeps_the_ttl_when_none_is_asked():
    prev = Session("cheap", 100, 40.0, 3600.0, NOW, 1, "", "old")
    s = sessions.after_turn(prev, "dear", 200, 60, 0.0, NOW + 10, why="new")
    assert s == Session("dear", 200, 50.0, 3600.0, NOW + 10, 2, "cheap", "new", NOW, 100)
    t = sessions.after_turn(s, "dear", 300, 80, 300.0, NOW + 20, why="again")
    assert (t.prompt_tokens, t.output_tokens, t.ttl, t.last, t.turns, t.why) == (300, 60.0, 300.0, NOW + 20, 3, "again")
    assert sessions.after_turn(s, "dear", 300, 80, 0.0, NOW + 20).ttl == 3600.0
    assert sessions.after_turn(prev, "dear", 300, 80, 300.0, NOW + 20).ttl == 300.0


def test_record_keys_and_sources_are_fixed_length_hashes():
    key = sessions.record_key("owner1", "sid\udc80", "opus")
    owner, _, rest = key.partition(":")
    assert owner == "owner1" and len(rest) == 32 + len("#opus") and rest.endswith("#opus")
    assert len(sessions.source(key)) == 12 and sessions.source("k\udc80") != sessions.source("k")
    assert sessions.shown(key) == {"session": rest[:12] + "#opus", "client": "owner1"}
    assert sessions.shown("o" * 20 + ":" + "d" * 32) == {"session": "d" * 12, "client": "o" * 16}


# -- the rule's arithmetic (edges found by mutation testing, docs/mutation.md) -----------------

PRICED = Price(input=3.0, output=15.0, cache_write=4.0, cache_read=0.5)


def test_a_relays_own_cache_prices_are_used_for_short_caches():
    assert cost.rates(PRICED, 300) == (3.0 / 1e6, 4.0 / 1e6, 0.5 / 1e6)
    assert cost.rates(PRICED, 3600) == (3.0 / 1e6, 6.0 / 1e6, 0.5 / 1e6)  # 1 h: twice the input
    assert cost.rates(Price(input=3.0), 300)[1:] == (3.75 / 1e6, 3.0 * 0.1 / 1e6)


def test_a_turn_costs_its_prompt_and_its_output():
    # no caching: every turn is the prompt at input price plus the output
    assert cost.total(PRICED, Learned(), 0, 1000, 100, 0.0, 2) == pytest.approx(
        2 * (1000 * 3e-6 + 100 * 15e-6), rel=1e-12)
    assert cost.total(PRICED, Learned(), 0, 1000, 100, 0.5, 1) == pytest.approx(1000 * 4e-6 + 100 * 15e-6)
    # cached: the held part read, the rest written, then later turns read the whole prompt
    first = 600 * 0.5e-6 + 400 * 4e-6 + 100 * 15e-6
    assert cost.total(PRICED, Learned(), 600, 1000, 100, 300, 3) == pytest.approx(
        first + 2 * (1000 * 0.5e-6 + 100 * 15e-6))
    assert cost.total(PRICED, Learned(), 600, 1000, 100, 300, 1) == pytest.approx(first)


def test_a_young_conversation_is_assumed_to_go_on_a_few_turns():
    assert cost.turns_to_come(None, 0.5, 8) == 4
    assert cost.turns_to_come(sess(turns=6), 300, 8) == 6
    assert cost.turns_to_come(None, 300, 3) == 3  # the horizon beats the minimum


@pytest.mark.parametrize("candidates, session, learned, reason", [
    ([("cheap", CHEAP), ("dear", DEAR)], sess("dear", turns=3, output=0.0), {},
     "session cache warm here (saves $0.0850 over 4 turns)"),
    ([("cheap", Price(input=2.25, output=15.0)), ("dear", DEAR)], None,
     {"cheap": Learned(0, 2, 2, ("a", "b"), NOW)}, "cheap does not cache prompts (saves $0.2175 over 4 turns)"),
    ([("cheap", Price(input=2.0, output=100.0)), ("dear", DEAR)], None, {},
     "cheaper over 4 turns (saves $0.0925)"),  # 0.3550 - 0.2625
])
def test_a_move_off_the_cheapest_says_why_and_what_it_saves(candidates, session, learned, reason):
    choice = cost.choose(candidates, learned, session, 50_000, 500.0, 300, NOW, horizon=8)
    assert choice.reason == reason


# -- identity and estimates at the edges (found by mutation testing, docs/mutation.md) --------


def test_the_prefix_id_is_stable_across_routers():
    # Shared stores (Redis) key conversations by it: the same request must give the same id on
    # every instance and version (keys sorted, compact, UTF-8, 32 hex digits).
    doc = {"tools": [{"name": "t", "b": 1, "a": 2}], "system": "sé", "messages": [{"role": "user", "content": "hi"}]}
    assert sessions.session_id([], doc) == "p:3a81a0a8d6e09eb0792eb81367c0f0a6"
    assert sessions.session_id([], {**doc, "tools": None}) != sessions.session_id([], doc)
    assert sessions.session_id([], {**doc, "system": "other"}) != sessions.session_id([], doc)
    assert sessions.session_id([], {**doc, "system": "\ud800"}).startswith("p:")  # a lone surrogate


def test_ids_are_cut_to_128_characters_and_other_headers_are_ignored():
    long = "s" * 200
    h = [("x-claude-code-session-id", long), ("x-other", "zzz"), ("x-claude-code-agent-id", "a" * 200)]
    assert sessions.session_id(h, None) == f"cc:{'s' * 128}/{'a' * 128}"
    assert sessions.session_id([("x-claude-code-session-id", "abc"), ("x-other", "zzz")], None) == "cc:abc"
    uid = json.dumps({"session_id": long})
    assert sessions.session_id([], {"metadata": {"user_id": uid}}) == f"u:{'s' * 128}"


@pytest.mark.parametrize("doc", [
    {"metadata": {"user_id": json.dumps({"session_id": 5})}, "messages": [{"role": "user", "content": "x"}]},
    {"metadata": {"user_id": json.dumps({"session_id": ""})}, "messages": [{"role": "user", "content": "x"}]},
])
def test_a_user_id_without_a_usable_session_falls_back_to_the_prefix(doc):
    assert sessions.session_id([], doc).startswith("p:")


def test_messages_that_are_not_a_list_identify_nothing():
    assert sessions.session_id([], {"messages": "abc"}) is None


def nested(depth_of_dict: int, cc: dict) -> dict:
    """A request whose cache_control sits in a dict ``depth_of_dict`` levels down (even)."""
    node = {"type": "text", "cache_control": cc}
    depth = depth_of_dict
    while depth > 4:
        node, depth = {"type": "tool_result", "content": [node]}, depth - 2
    return {"messages": [{"role": "user", "content": [node]}]}


def test_breakpoints_are_looked_for_eight_levels_deep():
    assert sessions.cache_ttl(nested(8, {"ttl": "1h"})) == 3600
    assert sessions.cache_ttl(nested(10, {"ttl": "1h"})) == 0
    deep = nested(8, "none")
    deep["messages"][0]["content"][0]["content"][0]["content"][0]["content"] = {"cache_control": {"ttl": "1h"}}
    assert sessions.cache_ttl(deep) == 0  # that one is nine levels down


def test_any_one_hour_breakpoint_makes_the_request_one_hour():
    assert sessions.cache_ttl({"tools": [{"cache_control": {"ttl": "1h"}}],
                               "messages": [{"role": "user", "content": [{"cache_control": {}}]}]}) == 3600
    assert sessions.cache_ttl({"system": [{"cache_control": {"ttl": "1h"}}, {"cache_control": {}}]}) == 3600


def test_text_tokens_are_at_most_one_per_four_characters():
    assert sessions.text_tokens("a," * 8, 100) == 4  # 16 characters, 16 marks
    assert sessions.text_tokens("a," * 8, 3) == 3


def test_what_a_block_renders_is_counted_and_nothing_else():
    def prefix(block):
        return sessions.breakpoint_prefix_tokens({"messages": [{"role": "user", "content": [
            {**block, "cache_control": {"type": "ephemeral"}}]}]})
    assert prefix({"type": "text", "text": "one two three"}) == 3
    assert prefix({"type": "image", "text": "one two three"}) == 0
    assert prefix({"type": "redacted_thinking", "text": "one two three"}) == 0
    assert prefix({"type": "tool_result", "content": ["one two", "three"], "n": 12345}) == 3
    assert sessions.breakpoint_prefix_tokens({"system": "one two three", "cache_control": {}}, cap=1) == 1


def test_blocks_are_counted_twelve_levels_deep():
    def deep(levels):
        node = "word"
        for _ in range(levels):
            node = [node]
        return {"system": [{"type": "text", "text": node, "cache_control": {}}]}
    assert sessions.breakpoint_prefix_tokens(deep(11)) == 1  # the string is 12 levels down
    assert sessions.breakpoint_prefix_tokens(deep(12)) == 0


def test_no_model_gets_the_largest_minimum():
    assert sessions.min_cacheable() == 4096


def test_a_one_token_read_is_cache_activity_and_clears_the_misses():
    missed = sessions.observe(Learned(), 0, "a", NOW)
    hit = sessions.observe(missed, 1, "b", NOW)
    assert (hit.hits, hit.misses, hit.expected, hit.sources) == (1, 0, 2, ())
    assert sessions.expects_cache(0.5, 5000, 5000, 4096)


def test_the_turns_weighed_are_the_sessions_own():
    choice = cost.choose([("cheap", CHEAP), ("dear", DEAR)], {}, sess("dear", turns=6, output=0.0), 50_000, 500.0,
                         300, NOW, horizon=8)
    assert choice.reason.endswith("over 6 turns)")


def test_messages_that_are_not_objects_are_passed_over_in_the_prefix():
    doc = {"messages": ["odd", {"role": "user", "content": [{"type": "text", "text": "one two", "cache_control": {}}]}]}
    assert sessions.breakpoint_prefix_tokens(doc) == 2
