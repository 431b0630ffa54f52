"""Where each conversation is, and what each endpoint showed about its prompt cache.

Behind one interface like the health store: memory by default (a bounded LRU), Redis when
configured, so that every router instance places a conversation the same way and shares what
it learned. The request path reads the local view; Redis is consulted only for a conversation
this instance has not seen lately (bounded by a short timeout, and any failure or garbage
falls back to the local view), and written in the background.
"""

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from .sessions import Learned, Session

log = logging.getLogger("claude_router")

MAX_SESSIONS = 100_000  # about 35 MiB of local state at most (./scripts/bench --affinity)
OP_TIMEOUT = 0.1

# KEYS: the session's key, the index of every session key (a sorted set scored by expiry, ms).
# ARGV: session JSON, TTL seconds, now ms, most sessions kept. Writes the session, drops index
# entries whose keys expired, then the sessions that expire soonest beyond the bound: Redis
# never holds more than that many conversations, however many ids clients invent.
PUT_SESSION_LUA = """
local ttl, now, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[2]) end
redis.call('ZADD', KEYS[2], now + ttl * 1000, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local over = redis.call('ZCARD', KEYS[2]) - most
if over > 0 then
  local gone = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #gone, 2 do redis.call('DEL', gone[i]) end
end
return 1
"""


class MemoryAffinity:
    """Sessions in an LRU bounded by ``max_sessions``; each expires with its cache TTL. Keyed
    by ``sessions.record_key``: the credential that started a conversation and a hash of its
    id, so one client's request never reads or moves another's conversation."""

    @property
    def description(self) -> str:
        return "memory"

    def __init__(self, clock: Callable[[], float] = time.time, max_sessions: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._learned: dict[str, Learned] = {}

    # -- sessions --------------------------------------------------------------------------

    def local(self, sid: str) -> Session | None:
        s = self._sessions.get(sid)
        if s is None:
            return None
        if _expired(s, self.clock()):
            del self._sessions[sid]
            return None
        self._sessions.move_to_end(sid)
        return s

    async def lookup(self, sid: str) -> Session | None:
        return self.local(sid)

    def put(self, sid: str, session: Session) -> None:
        self._sessions[sid] = session
        self._sessions.move_to_end(sid)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)

    def pinned(self) -> Counter:
        """Live sessions per endpoint."""
        now = self.clock()
        return Counter(s.endpoint for s in self._sessions.values() if not _expired(s, now))

    def recent(self, n: int = 20) -> list[tuple[str, Session]]:
        items = []
        for sid in reversed(self._sessions):
            items.append((sid, self._sessions[sid]))
            if len(items) >= n:
                break
        return items

    # -- what endpoints showed -------------------------------------------------------------

    @property
    def learned(self) -> dict[str, Learned]:
        return self._learned

    def put_learned(self, name: str, learned: Learned) -> None:
        self._learned[name] = learned

    async def forget(self, name: str | None = None) -> None:
        """Forget what was learned about one endpoint's caching, or all."""
        if name is None:
            self._learned.clear()
        else:
            self._learned.pop(name, None)

    async def close(self) -> None:
        pass


def _expired(s: Session, now: float) -> bool:
    # Kept a while past its TTL: its size and turn count still inform the next placement.
    return now - s.last > max(2 * s.ttl, 600.0)


class RedisAffinity(MemoryAffinity):
    """The memory view, shared through Redis: sessions as ``{prefix}|s|{key}`` (JSON, expiring
    with the session; the key is the credential hash and a hash of the conversation's id, see
    sessions.record_key), at most ``max_sessions`` of them (indexed by expiry in the sorted set
    ``{prefix}|sessions``: those expiring soonest go first), learned behaviour in the hash
    ``{prefix}|learned`` (see sessions.Learned.encode)."""

    def __init__(self, client, prefix: str, clock: Callable[[], float] = time.time,
                 max_sessions: int = MAX_SESSIONS, op_timeout: float = OP_TIMEOUT) -> None:
        super().__init__(clock, max_sessions)
        self.client = client
        self.prefix = prefix
        self.op_timeout = op_timeout
        self._fresh: dict[str, float] = {}  # sid -> when this instance last read or wrote it
        self._tasks: set[asyncio.Task] = set()
        self._refresher: asyncio.Task | None = None
        self._put_session = client.register_script(PUT_SESSION_LUA)
        self._index = f"{prefix}|sessions"

    @property
    def description(self) -> str:
        return "redis"

    def _key(self, sid: str) -> str:
        return f"{self.prefix}|s|{sid}"

    async def lookup(self, sid: str) -> Session | None:
        self._ensure_refresher()
        local = self.local(sid)
        now = self.clock()
        # Another instance may have served its later turns: ask Redis unless we saw it lately.
        if local is not None and now - self._fresh.get(sid, 0.0) < min(30.0, local.ttl / 2 or 30.0):
            return local
        raw = await self._call(self.client.get(self._key(sid)))
        if raw is None:
            return local
        try:
            remote = Session.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
            return local  # garbage under our key: the local view answers
        if local is None or remote.last >= local.last:
            super().put(sid, remote)
            self._fresh[sid] = now
            return remote
        return local

    def put(self, sid: str, session: Session) -> None:
        super().put(sid, session)
        self._fresh[sid] = self.clock()
        if len(self._fresh) > 2 * self.max_sessions:
            self._fresh = {k: v for k, v in self._fresh.items() if k in self._sessions}
        ttl = max(int(2 * session.ttl), 600)
        self._spawn(self._put_session(keys=[self._key(sid), self._index], args=[
            json.dumps(session.to_dict()), ttl, int(self.clock() * 1000), self.max_sessions]))

    def put_learned(self, name: str, learned: Learned) -> None:
        super().put_learned(name, learned)
        self._spawn(self.client.hset(f"{self.prefix}|learned", name, learned.encode()))

    async def forget(self, name: str | None = None) -> None:
        await super().forget(name)
        key = f"{self.prefix}|learned"
        await self._call(self.client.delete(key) if name is None else self.client.hdel(key, name))

    async def refresh_learned(self) -> None:
        raw = await self._call(self.client.hgetall(f"{self.prefix}|learned"))
        if not isinstance(raw, dict):
            return
        learned = {}
        for k, v in raw.items():
            try:
                learned[k.decode()] = Learned.decode(v.decode())
            except (ValueError, AttributeError, UnicodeDecodeError, OverflowError):
                continue  # one bad field costs only itself
        self._learned = learned

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        for t in list(self._tasks):
            t.cancel()

    def _ensure_refresher(self) -> None:
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh_learned()
            await asyncio.sleep(2.0)

    async def _call(self, awaitable):
        try:
            async with asyncio.timeout(self.op_timeout):
                return await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - Redis never fails a request: the local view answers
            return None

    def _spawn(self, coro) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._call(coro))
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
