"""Load within a price tier: which of several equal-priced endpoints a request goes to first.

Endpoints with the same price (all four fields equal, as written in router.yaml) form a tier;
an endpoint without a price is a tier of its own. Tiers keep price order: a tier stands where
its first member stands in the list, and a request falls to the next tier only when its own
has nothing left to try.

Within the tier the request lands in (the first with a member below its ``max_concurrency``):

- a conversation that has an endpoint there (``keep``: where its cache is, or where the cost
  chooser sent it) goes back to it;
- anything else (a new conversation, a request without one) goes where a smooth weighted
  round-robin says (nginx's algorithm, per process): each free member adds its ``weight`` to
  its current weight, the largest goes first and gives back the sum of the free members'
  weights. The split is exact, not random: weights 1:1 alternate, 3:1 give a a b a, a a b a...

Members at their ``max_concurrency`` come first in their tier, in list order, so that the
attempt loop records each as skipped (``busy`` in X-Router-Attempts, blaming nobody) before
it tries the free members; they are not tried later in the same request. Pure: no I/O, no
clock; the round-robin's state goes in and comes out.
"""

from collections.abc import Collection, Mapping, Sequence

from .endpoints import Endpoint


def tiers(endpoints: Sequence[Endpoint]) -> list[list[Endpoint]]:
    """The endpoints grouped by equal price, each group where its first member stands."""
    out: list[list[Endpoint]] = []
    for ep in endpoints:
        group = next((g for g in out if ep.price is not None and g[0].price == ep.price), None)
        if group is None:
            out.append([ep])
        else:
            group.append(ep)
    return out


def pick(members: Sequence[tuple[str, float]], current: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    """Smooth weighted round-robin: the member (name, weight) to use next, and the current
    weights after it (only the members given change). Ties go to the earlier member."""
    now = {name: current.get(name, 0.0) + weight for name, weight in members}
    best = max(members, key=lambda m: now[m[0]])[0]  # max keeps the first of equals
    now[best] -= sum(weight for _, weight in members)
    return best, now


def order(endpoints: Sequence[Endpoint], busy: Collection[str], keep: str | None, spread: bool,
          current: Mapping[str, float]) -> tuple[list[Endpoint], dict[str, float]]:
    """The endpoints (usable for this request, in price order, possibly with the cost
    chooser's pick moved first) in the order to try them, and the round-robin's current
    weights after this request (``current`` unchanged when no weighted pick was made).

    ``busy``: names at their max_concurrency now. ``keep``: the conversation's endpoint, kept
    first in its tier while it is free. ``spread``: whether a request without one is spread
    by weight (False: the list order holds within each tier)."""
    out: list[Endpoint] = []
    after = dict(current)
    landed = False
    for group in tiers(endpoints):
        free = [ep for ep in group if ep.name not in busy]
        full = [ep for ep in group if ep.name in busy]
        first: Endpoint | None = next((ep for ep in free if ep.name == keep), None)
        if first is None and free and not landed and spread and len(free) > 1:
            name, now = pick([(ep.name, ep.weight) for ep in free], after)
            after.update(now)
            first = next(ep for ep in free if ep.name == name)
        if first is not None:
            free = [first] + [ep for ep in free if ep is not first]
        landed = landed or bool(free)
        out += full + free  # the busy ones are skipped (and shown) before the free ones
    return out, after


def spreads(strategy: str, endpoints: Sequence[Endpoint]) -> bool:
    """Whether requests are spread by weight: only where the router keeps each conversation
    on its endpoint (the cost strategy, every endpoint priced). Otherwise each tier keeps its
    list order, and router_strategy=order its strict cheapest-first order."""
    return strategy == "cost" and all(ep.price is not None for ep in endpoints)

