"""Conversations, for the cost strategy: where a request's conversation is, a chooser that
weighs moving it against keeping its warm prompt cache, and what each answered turn teaches
(the conversation's new place and size, whether the endpoint cached what it should have).

The pieces are pure (``sessions``, ``cost``); this is the glue over the affinity store."""

import logging
from collections.abc import Callable, Sequence

from . import cost, profiles, sessions
from .affinity import MemoryAffinity
from .endpoints import Endpoint
from .routing import Request
from .status import Stats
from .usage import Usage

log = logging.getLogger("claude_router")

Chooser = Callable[[list[Endpoint]], tuple[str, str] | None]


class Conversations:
    def __init__(self, clock) -> None:
        self.clock = clock
        self.affinity: MemoryAffinity = MemoryAffinity(clock)  # or RedisAffinity
        self.strategy = "cost"  # router_strategy
        self.horizon = 8  # router_session_horizon
        self.cache_ttl = 0.0  # router_cache_ttl: 0 = as the request's cache_control says

    async def place(self, request: Request, target: str, endpoints: Sequence[Endpoint]
                    ) -> tuple[str | None, sessions.Session | None, float, Chooser | None]:
        """The request's conversation id, where it was, its cache TTL and a chooser for the
        routing loop. Nothing when the strategy is "order", it is not a Messages request, or
        an endpoint has no price (then nothing can be weighed)."""
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
        sid = f"{sid}#{profiles.family(request.model) or 'other'}"
        prev = await self.affinity.lookup(sid)
        ttl = sessions.cache_ttl(doc)
        if ttl and self.cache_ttl:
            ttl = self.cache_ttl * (12 if ttl >= sessions.LONG_TTL else 1)
        prompt = prev.prompt_tokens if prev else len(request.body) // 4
        output = prev.output_tokens if prev else 0.0
        now = self.clock()

        def choose(candidates: list[Endpoint]) -> tuple[str, str] | None:
            c = cost.choose([(ep.name, ep.price) for ep in candidates], self.affinity.learned,
                            prev, prompt, output, ttl, now, self.horizon)
            return (c.endpoint, c.reason) if c else None

        return sid, prev, ttl, choose

    def record_turn(self, info, ep: Endpoint, u: Usage, stats: Stats) -> None:
        """What an answered turn showed (``info`` is the router's RouteInfo): the
        conversation's new place and size, and whether the endpoint read the prefix it
        should have had cached."""
        prev = info.session
        prompt = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
        if sessions.expects_cache(info.ttl, prompt):
            learned = sessions.observe(self.affinity.learned.get(ep.name, sessions.UNKNOWN),
                                       u.cache_read_input_tokens + u.cache_creation_input_tokens)
            was = self.affinity.learned.get(ep.name, sessions.UNKNOWN).caches
            self.affinity.put_learned(ep.name, learned)
            if was and not learned.caches:
                log.warning(f"router: endpoint {ep.name} does not seem to cache prompts "
                            "(no cache read or write where one was due); pricing it accordingly")
        if prev is not None and prev.endpoint != ep.name and ep.price is not None:
            write = cost.rates(ep.price, info.ttl)[1]
            stats.rewrite(ep.name, u.cache_creation_input_tokens * write)
        tried = [a for a in info.attempts if a.outcome not in ("skipped:model", "thinking_signature")]
        why = info.reason or ("failover" if len(tried) > 1 else
                              "warm cache" if prev is not None and prev.endpoint == ep.name else "cheapest")
        self.affinity.put(info.session_id, sessions.after_turn(
            prev, ep.name, prompt, u.output_tokens, info.ttl, self.clock(), why))
