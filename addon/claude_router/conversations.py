"""Conversations, for the cost strategy: where a request's conversation is, a chooser that
weighs moving it against keeping its warm prompt cache, and what each answered turn teaches
(the conversation's new place and size, whether the endpoint cached what it should have).

The pieces are pure (``sessions``, ``cost``); this is the glue over the affinity store."""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import cost, profiles, sessions
from .affinity import MemoryAffinity
from .endpoints import Endpoint
from .routing import Request
from .status import Stats
from .usage import Usage

log = logging.getLogger("claude_router")

Chooser = Callable[[list[Endpoint]], tuple[str, str] | None]


@dataclass(frozen=True)
class Turn:
    """What the router must remember of a request until its answer is in: whose conversation
    record it is, and what its answer can teach."""

    key: str  # the record: the credential that started it and a hash of its id (sessions.record_key)
    pinned: bool  # the client chose the endpoint by path: the turn moves no conversation
    model: str | None  # the client's model id
    doc: dict = field(compare=False, repr=False)  # the request (parsed once, by the router)

    @property
    def source(self) -> str:
        return sessions.source(self.key)

    def minimum(self, ep: Endpoint) -> int:
        """The smallest prefix ``ep`` caches for it: its model's, or the one ``ep`` maps it to."""
        mapped = ep.profile.upstream_model(self.model) if self.model else None
        return sessions.min_cacheable(self.model, mapped)

    def prefix_tokens(self, cap: int) -> int:
        """Its prompt up to the last breakpoint, estimated (counted up to ``cap``): asked only
        when an answer showed no cache activity, so a caching endpoint costs nothing."""
        return sessions.breakpoint_prefix_tokens(self.doc, cap=cap)


class Conversations:
    def __init__(self, clock) -> None:
        self.clock = clock
        self.affinity: MemoryAffinity = MemoryAffinity(clock)  # or RedisAffinity
        self.strategy = "cost"  # router_strategy
        self.horizon = 8  # router_session_horizon
        self.cache_ttl = 0.0  # router_cache_ttl: 0 = as the request's cache_control says

    async def place(self, request: Request, target: str, endpoints: Sequence[Endpoint],
                    owner: str = "", pinned: bool = False
                    ) -> tuple[Turn | None, sessions.Session | None, float, Chooser | None]:
        """The request's conversation (its record, keyed by ``owner``, the credential hash, as
        well as its id), where it was, its cache TTL and a chooser for the routing loop.
        Nothing when the strategy is "order", it is not a Messages request, or an endpoint has
        no price (then nothing can be weighed). A request ``pinned`` to a tier by its path
        reads no record and gets no chooser: its answer only teaches what the endpoint does."""
        doc = request.json
        if (self.strategy != "cost" or doc is None or request.method != "POST"
                or target.split("?")[0] != "/v1/messages"
                or any(ep.price is None for ep in endpoints)):
            return None, None, 0.0, None
        sid = sessions.session_id(request.headers, doc)
        if sid is None:
            return None, None, 0.0, None
        # One conversation per model family: Claude Code's haiku side-calls share the session
        # id, but not its prompt or its cache.
        key = sessions.record_key(owner, sid, profiles.family(request.model) or "other")
        turn = Turn(key, pinned, request.model, doc)
        ttl = sessions.cache_ttl(doc)
        if ttl and self.cache_ttl:
            ttl = self.cache_ttl * (12 if ttl >= sessions.LONG_TTL else 1)
        if pinned:
            return turn, None, ttl, None
        prev = await self.affinity.lookup(key)
        prompt = prev.prompt_tokens if prev else len(request.body) // 4
        output = prev.output_tokens if prev else 0.0
        now = self.clock()
        learned = sessions.fresh(self.affinity.learned, now)

        def choose(candidates: list[Endpoint]) -> tuple[str, str] | None:
            c = cost.choose([(ep.name, ep.price) for ep in candidates], learned,
                            prev, prompt, output, ttl, now, self.horizon)
            return (c.endpoint, c.reason) if c else None

        return turn, prev, ttl, choose

    def record_turn(self, info, ep: Endpoint, u: Usage, stats: Stats) -> None:
        """What an answered turn showed (``info`` is the router's RouteInfo, its
        ``session_id`` a `Turn`): the conversation's new place and size, and whether the
        endpoint read or wrote the prefix it should have (only when that prefix was
        cacheable). A pinned turn moves no conversation, its own included."""
        turn: Turn = info.session_id
        prev = info.session
        prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
        now = self.clock()
        cached = u.cache_read_input_tokens + u.cache_creation_input_tokens
        # A read or write shows it caches; no read nor write is a miss only where one was due.
        if info.ttl > 0 and (cached > 0 or sessions.expects_cache(
                info.ttl, turn.prefix_tokens(minimum := turn.minimum(ep)), prompt, minimum)):
            before = self.affinity.learned.get(ep.name, sessions.UNKNOWN)
            was = before.caches or not before.fresh(now)
            learned = sessions.observe(before, cached, turn.source, now)
            self.affinity.put_learned(ep.name, learned)
            if was and not learned.caches:
                log.warning(f"router: endpoint {ep.name} does not seem to cache prompts "
                            f"(no cache read or write where one was due, in {len(learned.sources)} "
                            "conversations); pricing it accordingly")
        if turn.pinned:
            return
        if prev is not None and prev.endpoint != ep.name and ep.price is not None:
            write = cost.rates(ep.price, info.ttl)[1]
            stats.rewrite(ep.name, u.cache_creation_input_tokens * write)
        tried = [a for a in info.attempts if a.outcome not in ("skipped:model", "thinking_signature")]
        why = info.reason or ("failover" if len(tried) > 1 else
                              "warm cache" if prev is not None and prev.endpoint == ep.name else "cheapest")
        self.affinity.put(turn.key, sessions.after_turn(
            prev, ep.name, prompt, u.output_tokens, info.ttl, now, why))
