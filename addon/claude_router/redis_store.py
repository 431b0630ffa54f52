"""Endpoint health shared in Redis by every router instance.

Each endpoint's breaker state is a hash ``{prefix}{name}`` (fields f=failures, e=ejections,
u=ejected-until ms, p=probe-until ms, v=version). Every transition is one Lua script, so it is
atomic across instances, and it publishes the new state on ``{prefix}events``. Each instance
keeps a local view fed by those messages (and re-synced on every (re)connect), so the request
path reads health without a round trip; only failures, probes and the first success after a
failure write.

Redis is never allowed to fail a request: every call is bounded by a short timeout, and while
Redis is unreachable the store applies the same transitions to its local view, logs the outage
once and the recovery once, and re-syncs when Redis is back.
"""

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from .health import HEALTHY, Breaker, Clock, Health, after_failure, try_probe

log = logging.getLogger("claude_router")

OP_TIMEOUT = 0.25  # seconds for one Redis round trip before the local view takes over
RETRY_EVERY = 1.0

# Shared Lua helpers: load a state, say its phase, store it (with TTL and version), publish it.
_LUA_COMMON = """
local key, name, channel = KEYS[1], ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
local v = redis.call('HMGET', key, 'f', 'e', 'u', 'p')
local f, e, u, p = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
local function save(min_ttl)
  local ver = redis.call('INCR', channel .. ':version')
  redis.call('HSET', key, 'f', f, 'e', e, 'u', u, 'p', p, 'v', ver)
  redis.call('PEXPIRE', key, math.max(min_ttl, 2 * (u - now)))
  redis.call('PUBLISH', channel, table.concat({name, f, e, u, p, ver}, '|'))
  return {f, e, u, p, ver}
end
"""

# ARGV: name, channel, now_ms, max_failures, cooldown_ms, max_cooldown_ms, jitter, rand,
#       at_least_ms, min_ttl_ms.  Mirrors health.after_failure exactly.
FAILURE_LUA = _LUA_COMMON + """
local max_failures, cooldown, max_cooldown = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local jitter, rand, at_least = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local function ejection_time(n)
  if n <= 1 then return cooldown end
  local grown = math.min(cooldown * 2 ^ (n - 1), max_cooldown)
  return math.min(grown * (1 + jitter * rand), max_cooldown)
end
if now < u then
  if now + at_least <= u then return {f, e, u, p, -1} end
  u = now + at_least
else
  f = f + 1
  if e > 0 or f >= max_failures then
    e = e + 1
    u = math.max(u, now + math.floor(math.max(ejection_time(e), at_least)))
    f, p = 0, 0
  elseif at_least > 0 then
    f, e, u, p = 0, e + 1, now + at_least, 0
  end
end
return save(tonumber(ARGV[10]))
"""

# ARGV: name, channel, now_ms, probe_timeout_ms, min_ttl_ms. Returns {go, f, e, u, p, v}:
# go=1 when the caller may use the endpoint (it is healthy, or it won the half-open probe).
PROBE_LUA = _LUA_COMMON + """
if now < u then return {0, f, e, u, p, -1} end
if e == 0 then return {1, f, e, u, p, -1} end
if now < p then return {0, f, e, u, p, -1} end
p = now + tonumber(ARGV[4])
local s = save(tonumber(ARGV[5]))
return {1, s[1], s[2], s[3], s[4], s[5]}
"""

# ARGV: name, channel. A success: the endpoint is healthy, which is the absence of a key.
SUCCESS_LUA = """
if redis.call('DEL', KEYS[1]) == 1 then
  local ver = redis.call('INCR', ARGV[2] .. ':version')
  redis.call('PUBLISH', ARGV[2], table.concat({ARGV[1], 0, 0, 0, 0, ver}, '|'))
  return ver
end
return 0
"""


def _health(f, e, u, p) -> Health:
    return Health(failures=int(f), ejections=int(e), ejected_until=int(u) / 1000, probe_until=int(p) / 1000)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def redacted(url: str) -> str:
    """The URL without its password (user:password@ or ?password=), for messages."""
    scheme, sep, rest = url.partition("://")
    rest, q, _ = rest.partition("?")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}" + ("?***" if q else "")


class RedisHealthStore:
    def __init__(
        self,
        url: str,
        breaker: Breaker,
        prefix: str = "endpoint_health_",
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        # Raises ValueError for a URL redis-py cannot parse (the router turns that into an
        # OptionsError); connecting happens later, in the background.
        self._client = aioredis.from_url(
            url,
            socket_connect_timeout=op_timeout * 2,
            socket_timeout=op_timeout * 2,
            retry=Retry(NoBackoff(), 0),
            client_name="claude-router",
        )
        self.url = redacted(url)
        self.breaker = breaker
        self.prefix = prefix
        self.channel = f"{prefix}events"
        self._clock = clock
        self._rand = rand
        self._op_timeout = op_timeout
        self._failure = self._client.register_script(FAILURE_LUA)
        self._probe = self._client.register_script(PROBE_LUA)
        self._success = self._client.register_script(SUCCESS_LUA)
        self._states: dict[str, Health] = {}
        self._versions: dict[str, int] = {}
        self._disabled: set[str] = set()
        self._names: tuple[str, ...] = ()
        self._up = False
        self._outage_logged = False
        self._supervisor: asyncio.Task | None = None
        self._synced = asyncio.Event()

    @property
    def description(self) -> str:
        return f"redis {self.url} ({'connected' if self._up else 'unreachable: local view'})"

    @property
    def connected(self) -> bool:
        return self._up

    def track(self, names: Iterable[str]) -> None:
        self._names = tuple(names)

    # -- the HealthStore interface -------------------------------------------------------

    async def view(self) -> Mapping[str, Health]:
        self._ensure_started()
        return self._states

    def current(self) -> Mapping[str, Health]:
        return self._states

    async def try_probe(self, name: str) -> bool:
        now = self._clock()
        if self._up:
            res = await self._call(
                self._probe(keys=[self._key(name)], args=[name, self.channel, _ms(now),
                            _ms(self.breaker.probe_timeout), self._min_ttl()])
            )
            if res is not None:
                self._apply(name, res[1:])
                return bool(res[0])
        local = try_probe(self._states.get(name, HEALTHY), now, self.breaker)
        if local is None:
            return False
        self._states[name] = local
        return True

    async def record_failure(self, name: str, at_least: float = 0.0) -> Health:
        now, rand, b = self._clock(), self._rand(), self.breaker
        if self._up:
            res = await self._call(
                self._failure(keys=[self._key(name)], args=[
                    name, self.channel, _ms(now), b.max_failures, _ms(b.cooldown),
                    _ms(b.max_cooldown), b.jitter, rand, _ms(at_least), self._min_ttl()])
            )
            if res is not None:
                self._apply(name, res)
                return self._states.get(name, HEALTHY)
        h = after_failure(self._states.get(name, HEALTHY), now, b, at_least, rand)
        self._states[name] = h
        return h

    async def record_success(self, name: str) -> None:
        if name in self._states:  # healthy here: a success writes nothing
            await self._heal(name)

    async def reset(self, name: str | None = None) -> None:
        for n in self._names if name is None else (name,):
            await self._heal(n)

    @property
    def disabled(self) -> frozenset[str]:
        return frozenset(self._disabled)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """Shared: every instance takes the endpoint out of (or back into) rotation."""
        (self._disabled.add if disabled else self._disabled.discard)(name)
        if self._up:
            key = f"{self.prefix}disabled"
            pipe = self._client.pipeline(transaction=True)
            (pipe.sadd if disabled else pipe.srem)(key, name)
            pipe.publish(self.channel, f"!disabled|{name}|{int(disabled)}")
            await self._call(pipe.execute())

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._client.aclose()

    async def wait_synced(self, timeout: float) -> bool:
        """For start-up and tests: wait until the first sync with Redis (False on timeout)."""
        self._ensure_started()
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
            return True
        except TimeoutError:
            return False

    # -- internals -----------------------------------------------------------------------

    async def _heal(self, name: str) -> None:
        if self._up:
            ver = await self._call(self._success(keys=[self._key(name)], args=[name, self.channel]))
            if ver:
                self._versions[name] = max(int(ver), self._versions.get(name, 0))
        self._states.pop(name, None)

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _min_ttl(self) -> int:
        return _ms(2 * self.breaker.cooldown)

    def _apply(self, name: str, fields, version: int | None = None) -> None:
        """Take a state from Redis into the local view unless a newer one is already here."""
        f, e, u, p, ver = (int(x) for x in fields[:5]) if version is None else (*map(int, fields), version)
        if ver < 0:  # unchanged by the script: the state is current as read
            ver = self._versions.get(name, 0)
        elif ver < self._versions.get(name, 0):
            return
        self._versions[name] = ver
        h = _health(f, e, u, p)
        if h == HEALTHY:
            self._states.pop(name, None)
        else:
            self._states[name] = h

    async def _call(self, awaitable):
        """One bounded Redis round trip; None (and the outage noted) if it fails."""
        try:
            async with asyncio.timeout(self._op_timeout):
                return await awaitable
        except (RedisError, OSError, TimeoutError) as e:
            self._down(e)
            return None

    def _down(self, e: BaseException) -> None:
        self._up = False
        if not self._outage_logged:
            self._outage_logged = True
            log.warning(f"router: Redis {self.url} unavailable ({_reason(e)}); "
                        "serving on the local health view until it is back")

    def _ensure_started(self) -> None:
        if self._supervisor is None:
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _supervise(self) -> None:
        """Keep a subscription to the events channel; re-sync and mark Redis up on every
        (re)connect; notice an outage and retry once a second."""
        while True:
            pubsub = self._client.pubsub()
            try:
                async with asyncio.timeout(self._op_timeout * 4):
                    await pubsub.subscribe(self.channel)
                    await self._resync()
                self._mark_up()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=RETRY_EVERY)
                    if msg is not None:
                        self._on_message(msg["data"])
                    if not self._up:  # a command failed meanwhile: check and re-sync
                        async with asyncio.timeout(self._op_timeout * 4):
                            await self._resync()
                        self._mark_up()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure here means "Redis is not usable now"
                self._down(e)
            finally:
                try:
                    await asyncio.wait_for(pubsub.aclose(), self._op_timeout)
                except Exception:  # noqa: BLE001
                    pass
            await asyncio.sleep(RETRY_EVERY)

    async def _resync(self) -> None:
        """Replace the local view with what Redis holds for every tracked endpoint."""
        async with self._client.pipeline(transaction=False) as pipe:
            for name in self._names:
                pipe.hmget(self._key(name), "f", "e", "u", "p", "v")
            pipe.smembers(f"{self.prefix}disabled")
            *rows, disabled = await pipe.execute()
        self._disabled = {n.decode() for n in disabled}
        self._states.clear()
        self._versions.clear()
        for name, row in zip(self._names, rows):
            if row[0] is not None:
                self._apply(name, row[:4], version=int(row[4] or 0))

    def _mark_up(self) -> None:
        was_out = self._outage_logged
        self._up = True
        self._outage_logged = False
        self._synced.set()
        if was_out:
            log.info(f"router: Redis {self.url} reachable again; health view re-synced")

    def _on_message(self, data: bytes) -> None:
        try:
            name, *fields = data.decode().split("|")
            if name == "!disabled":
                (self._disabled.add if fields[1] == "1" else self._disabled.discard)(fields[0])
                return
            self._apply(name, fields)
        except (ValueError, IndexError):
            log.debug("router: ignoring a malformed health message")


def _reason(e: BaseException) -> str:
    if isinstance(e, AuthenticationError) or (isinstance(e, ResponseError) and "auth" in str(e).lower()):
        return "authentication failed: check the password in router_redis_url"
    if isinstance(e, TimeoutError):
        return "timed out"
    return type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:120]}"

