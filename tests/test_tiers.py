"""The pure order within price tiers: equal prices form a tier, tiers keep price order, a
conversation goes back to its endpoint, anything else is spread by a smooth weighted
round-robin over the free members, and members at their cap come first in their tier (the
attempt loop skips them, showing them as busy)."""

from collections import Counter

from claude_router import tiers
from claude_router.endpoints import Endpoint
from claude_router.usage import Price

CHEAP = Price(input=1.0, output=5.0)
DEAR = Price(input=3.0, output=15.0)


def ep(name: str, price: Price | None = CHEAP, weight: float = 1.0, cap: int | None = None) -> Endpoint:
    return Endpoint(name, f"http://relay.example/{name}", price=price, weight=weight, max_concurrency=cap)


def names(eps) -> list[str]:
    return [e.name for e in eps]


def firsts(endpoints, n: int, busy=(), keep=None, spread=True) -> list[str]:
    """Where ``n`` requests in a row go first, carrying the round-robin's state along."""
    current: dict = {}
    out = []
    for _ in range(n):
        ordered, current = tiers.order(endpoints, set(busy), keep, spread, current)
        out.append(ordered[0].name)
    return out


def test_equal_prices_form_a_tier_and_tiers_keep_price_order():
    a, b, c, d = ep("a"), ep("b"), ep("c", DEAR), ep("d", DEAR)
    assert [names(t) for t in tiers.tiers([a, b, c, d])] == [["a", "b"], ["c", "d"]]


def test_a_tier_stands_where_its_first_member_stands():
    a, c, b = ep("a"), ep("c", DEAR), ep("b")
    assert [names(t) for t in tiers.tiers([a, c, b])] == [["a", "b"], ["c"]]


def test_endpoints_without_a_price_are_each_a_tier_of_their_own():
    x, y = ep("x", None), ep("y", None)
    assert [names(t) for t in tiers.tiers([x, y])] == [["x"], ["y"]]


def test_a_price_differing_in_one_field_is_another_tier():
    a, b = ep("a"), ep("b", Price(input=1.0, output=5.0, cache_read=0.05))
    assert [names(t) for t in tiers.tiers([a, b])] == [["a"], ["b"]]


def test_weights_one_to_one_alternate_exactly():
    went = firsts([ep("a"), ep("b"), ep("c", DEAR)], 200)
    assert went[:4] == ["a", "b", "a", "b"]
    assert Counter(went) == {"a": 100, "b": 100}


def test_weights_three_to_one_split_three_to_one_smoothly():
    went = firsts([ep("a", weight=3), ep("b")], 200)
    assert went[:4] == ["a", "a", "b", "a"]  # nginx's smooth order, not a a a b
    assert Counter(went) == {"a": 150, "b": 50}


def test_the_rest_of_the_tier_then_the_next_tier_follow_the_pick():
    ordered, _ = tiers.order([ep("a"), ep("b"), ep("c", DEAR)], set(), None, True, {"a": 5.0})
    assert names(ordered) == ["a", "b", "c"]
    ordered, _ = tiers.order([ep("a"), ep("b"), ep("c", DEAR)], set(), None, True, {"b": 5.0})
    assert names(ordered) == ["b", "a", "c"]


def test_a_conversation_goes_back_to_its_endpoint_and_moves_no_round_robin():
    endpoints = [ep("a"), ep("b")]
    ordered, after = tiers.order(endpoints, set(), "b", True, {"a": 0.5})
    assert names(ordered) == ["b", "a"]
    assert after == {"a": 0.5}
    assert firsts(endpoints, 3, keep="a") == ["a", "a", "a"]


def test_a_conversation_whose_endpoint_is_busy_goes_to_a_free_one():
    ordered, _ = tiers.order([ep("a"), ep("b", cap=1)], {"b"}, "b", True, {})
    assert names(ordered) == ["b", "a"]  # b is skipped as busy, a serves


def test_busy_members_come_first_in_their_tier_and_are_not_picked():
    a, b, c = ep("a", cap=1), ep("b"), ep("c", DEAR)
    current: dict = {}
    for _ in range(5):
        ordered, current = tiers.order([a, b, c], {"a"}, None, True, current)
        assert names(ordered) == ["a", "b", "c"]
    assert current == {}  # one free member: no round to take part in


def test_a_whole_tier_busy_sends_the_request_to_the_next_tier_by_weight():
    a, b = ep("a", cap=1), ep("b", cap=1)
    c, d = ep("c", DEAR, weight=1), ep("d", DEAR, weight=1)
    ordered, _ = tiers.order([a, b, c, d], {"a", "b"}, None, True, {})
    assert names(ordered) == ["a", "b", "c", "d"]  # a and b are skipped as busy
    went = []
    current: dict = {}
    for _ in range(4):
        ordered, current = tiers.order([a, b, c, d], {"a", "b"}, None, True, current)
        went.append([e.name for e in ordered if e.name not in {"a", "b"}][0])
    assert went == ["c", "d", "c", "d"]


def test_without_spreading_each_tier_keeps_its_list_order():
    assert firsts([ep("a"), ep("b")], 3, spread=False) == ["a", "a", "a"]
    ordered, after = tiers.order([ep("b"), ep("a", cap=1)], {"a"}, None, False, {})
    assert names(ordered) == ["a", "b"] and after == {}


def test_a_tier_of_one_moves_no_round_robin():
    ordered, after = tiers.order([ep("a"), ep("c", DEAR)], set(), None, True, {})
    assert names(ordered) == ["a", "c"] and after == {}


def test_pick_is_nginx_smooth_weighted_round_robin():
    current: dict = {}
    seq = []
    for _ in range(7):
        name, current = tiers.pick([("a", 5), ("b", 1), ("c", 1)], current)
        seq.append(name)
    assert seq == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's documented sequence for 5:1:1
    assert current == {"a": 0, "b": 0, "c": 0}


def test_spreading_needs_the_cost_strategy_and_every_endpoint_priced():
    assert tiers.spreads("cost", [ep("a"), ep("b")])
    assert not tiers.spreads("order", [ep("a"), ep("b")])
    assert not tiers.spreads("cost", [ep("a"), ep("x", None)])
