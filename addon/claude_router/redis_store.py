"""Endpoint health shared in Redis by every router instance.

Key scheme. Every name the store uses in Redis is the prefix (``router_key_prefix``), the
separator ``|``, then a kind:

    {prefix}|ep|{name}   hash: one endpoint's breaker state (fields f=failures, e=ejections,
                         u=ejected-until ms, p=probe-until ms, v=version)
    {prefix}|disabled    set: endpoints an operator took out of rotation
    {prefix}|decided     hash: endpoints an operator enabled or disabled since Redis last
                         lost its state (an instance putting back a disabled endpoint it
                         held leaves a later decision alone)
    {prefix}|version     integer: the version counter of every state change
    {prefix}|healed|{name}  integer: the version of the success or reset that last healed
                         the endpoint (healthy is the absence of its state, so this is how a
                         heal is known to be newer than a cooldown an instance would put
                         back); expires after 2 x the longest cooldown
    {prefix}|salt        string: the secret that keys credential hashes (access.credential_id),
                         set once by the first instance, so every instance scopes a key alike
                         (an instance that knew it writes it back after Redis lost it)
    {prefix}|epoch       string: a random id set by the first instance to find Redis empty; a
                         new id tells the instances that Redis lost its state (restarted
                         without persistence, or flushed)
    {prefix}|events      pub/sub channel of state changes

The prefix may not contain ``|`` (the store refuses it) and endpoint names never do
(``[A-Za-z0-9][A-Za-z0-9_.-]*``), so the first ``|`` always ends the prefix and no two
(prefix, kind, name) triples share a key: an endpoint called ``disabled`` or ``events`` is
``{prefix}|ep|disabled``, and prefix ``p`` with endpoint ``adisabled`` (``p|ep|adisabled``)
never meets prefix ``pa``'s disabled set (``pa|disabled``).

Every transition is one Lua script, so it is atomic across instances, and it publishes the new
state on the events channel. Each instance keeps a local view fed by those messages (and
re-synced on every (re)connect), so the request path reads health without a round trip; only
failures, probes, the release of an abandoned probe and the first success after a failure write.

Redis is never allowed to fail a request: every call is bounded by a short timeout, and while
Redis is unreachable the store applies the same transitions to its local view, logs the outage
once and the recovery once, and re-syncs when Redis is back. The same holds for whatever Redis
(or something that is not Redis) answers: a reply of the wrong shape, a non-number, a protocol
error or no reply at all is an outage for that call, and the call takes the local transition.

Stray keys. A key under the prefix that this store did not write (another type, or a hash with
fields that are not non-negative integers) costs only itself: a re-sync reads it as healthy
(the disabled set as empty) and logs it once, and the next transition of that endpoint deletes
it and writes a proper state (the scripts check the type first, so WRONGTYPE never reaches
them). A version counter that is not a number is restarted at the current time in ms, which is
above every version a counter counting from 0 has handed out.
"""

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError

from .endpoints import _NAME as ENDPOINT_NAME, SUBJECT
from .health import HEALTHY, Breaker, Clock, Health, Scopes, after_failure, release_probe, try_probe

log = logging.getLogger("claude_router")

OP_TIMEOUT = 0.25  # seconds for one Redis round trip before the local view takes over
RETRY_EVERY = 1.0
REASSERT_SCOPES = 200  # client-key scopes one re-sync writes back at most
EPOCH_CHECK_EVERY = 2.0  # seconds between checks that Redis still holds the state it had
SEP = "|"  # ends the prefix in every key; never in a prefix, an endpoint name or a kind

# The version counter: INCR, or, when the key holds something else, restart it at now (ms).
_LUA_VERSION = """
local key, vkey = KEYS[1], KEYS[2]
local name, channel = ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
local function next_version()
  local ver = redis.pcall('INCR', vkey)
  if type(ver) == 'number' then return ver end
  redis.call('SET', vkey, now)
  return now
end
"""

# Load a state (a key of another type, or with a field that is not a non-negative integer, is a
# stray: read as healthy, deleted by the save), store it with TTL and version, publish it. The
# TTL outlives a probe in flight (p): a probe longer than 2 x cooldown would otherwise find its
# state gone when it ends, and its success would reach no other instance.
_LUA_COMMON = _LUA_VERSION + """
local function int(s)
  if not s then return 0 end
  if #s <= 15 and string.match(s, '^%d+$') then return tonumber(s) end
  return nil
end
local f, e, u, p, stray = 0, 0, 0, 0, false
local kind = redis.call('TYPE', key)['ok']
if kind == 'hash' then
  local v = redis.call('HMGET', key, 'f', 'e', 'u', 'p')
  f, e, u, p = int(v[1]), int(v[2]), int(v[3]), int(v[4])
  if not (f and e and u and p) then f, e, u, p, stray = 0, 0, 0, 0, true end
elseif kind ~= 'none' then
  stray = true
end
local function save(min_ttl)
  if stray then redis.call('DEL', key) end
  local ver = next_version()
  redis.call('HSET', key, 'f', f, 'e', e, 'u', u, 'p', p, 'v', ver)
  redis.call('PEXPIRE', key, math.max(min_ttl, 2 * (u - now), p - now))
  redis.call('PUBLISH', channel, table.concat({name, f, e, u, p, ver}, '|'))
  return {f, e, u, p, ver}
end
"""

# KEYS: state, version. ARGV: name, channel, now_ms, max_failures, cooldown_ms, max_cooldown_ms,
# jitter, rand, at_least_ms, min_ttl_ms.  Mirrors health.after_failure exactly.
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

# KEYS: state, version. ARGV: name, channel, now_ms, probe_timeout_ms, min_ttl_ms.
# Returns {go, f, e, u, p, v}: go=1 when the caller may use the endpoint (it is healthy, or it
# won the half-open probe, which is the case exactly when v >= 0).
PROBE_LUA = _LUA_COMMON + """
if now < u then return {0, f, e, u, p, -1} end
if e == 0 then return {1, f, e, u, p, -1} end
if now < p then return {0, f, e, u, p, -1} end
p = now + tonumber(ARGV[4])
local s = save(tonumber(ARGV[5]))
return {1, s[1], s[2], s[3], s[4], s[5]}
"""

# KEYS: state, version. ARGV: name, channel, now_ms, held_ms, min_ttl_ms. Mirrors
# health.release_probe: frees the probe in flight if it is still the one the caller took.
RELEASE_LUA = _LUA_COMMON + """
if e > 0 and now >= u and now < p and p == tonumber(ARGV[4]) then
  p = 0
  return save(tonumber(ARGV[5]))
end
return {f, e, u, p, -1}
"""

# KEYS: state, version, healed. ARGV: name, channel, now_ms, healed_ttl_ms. A success: the
# endpoint is healthy, which is the absence of a key (of any type); the heal's version is kept.
SUCCESS_LUA = _LUA_VERSION + """
if redis.call('DEL', key) == 1 then
  local ver = next_version()
  redis.call('SET', KEYS[3], ver, 'PX', tonumber(ARGV[4]))
  redis.call('PUBLISH', channel, table.concat({name, 0, 0, 0, 0, ver}, '|'))
  return ver
end
return 0
"""

# KEYS: state, version, healed. ARGV: name, channel, now_ms, f, e, u_ms, min_ttl_ms, known. An
# instance puts back a cooldown it holds that Redis lost or never heard of: only if it ends
# later than whatever Redis holds now, and (known >= 0) only if no decision about the endpoint
# newer than version ``known`` (what the instance had heard of) was made since: a failure, or
# a success or reset that healed it.
ASSERT_LUA = _LUA_COMMON + """
local known = tonumber(ARGV[8])
if known >= 0 then
  local newest = 0
  if kind == 'hash' then newest = tonumber(redis.call('HGET', key, 'v') or '0') or 0 end
  local healed = redis.pcall('GET', KEYS[3])
  if type(healed) == 'string' and string.match(healed, '^%d+$') then
    newest = math.max(newest, tonumber(healed))
  end
  if newest > known then return {f, e, u, p, -1} end
end
if tonumber(ARGV[6]) <= u then return {f, e, u, p, -1} end
f, e, u, p = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), 0
return save(tonumber(ARGV[7]))
"""

# KEYS: disabled set, decided hash. ARGV: name, channel, '1' or '0', 'operator' or 'assert'.
# An operator's decision is recorded in the decided hash; an instance putting back a disabled
# endpoint after Redis lost its state ('assert') leaves alone one an operator decided since
# (returns 0). A stray key of another type is replaced.
DISABLED_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'set' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[2]) end
if ARGV[4] == 'assert' then
  if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
else
  redis.call('HSET', KEYS[2], ARGV[1], '1')
end
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[1], ARGV[1])
else
  redis.call('SREM', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], '!disabled|' .. ARGV[1] .. '|' .. ARGV[3])
return 1
"""

State = tuple[int, int, int, int, int]  # f, e, u (ms), p (ms), version (-1: unchanged)

_INT = re.compile(r"-?[0-9]{1,15}")


class MalformedReply(ValueError):
    """Redis (or whatever answered in its place) replied with something of the wrong shape."""


def _int(x, least: int = 0) -> int:
    """A reply's integer (an int, or bytes/str of at most 15 digits) no smaller than ``least``."""
    if isinstance(x, bytes):
        x = x.decode("ascii", "replace")
    if isinstance(x, str) and _INT.fullmatch(x):
        x = int(x)
    if type(x) is not int or not least <= x < 10**15:
        raise MalformedReply("a number was expected")
    return x


def _state(fields, version: int | None = None) -> State:
    """f, e, u, p and version from a script's reply or a message (version -1: unchanged)."""
    want = 5 if version is None else 4
    if not isinstance(fields, (list, tuple)) or len(fields) != want:
        raise MalformedReply(f"{want} numbers were expected")
    f, e, u, p = (_int(x) for x in fields[:4])
    return f, e, u, p, _int(fields[4], least=-1) if version is None else version


def _health(f: int, e: int, u: int, p: int) -> Health:
    return Health(failures=f, ejections=e, ejected_until=u / 1000, probe_until=p / 1000)


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
        if SEP in prefix:
            raise ValueError(f"router_key_prefix must not contain {SEP!r}, which ends the prefix "
                             f"in every Redis key (got {prefix!r})")
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
        self.scopes = Scopes()
        self.breaker = breaker
        self.prefix = prefix
        self.channel = f"{prefix}{SEP}events"
        self._disabled_key = f"{prefix}{SEP}disabled"
        self._decided_key = f"{prefix}{SEP}decided"
        self._version_key = f"{prefix}{SEP}version"
        self._clock = clock
        self._rand = rand
        self._op_timeout = op_timeout
        self._failure = self._client.register_script(FAILURE_LUA)
        self._probe = self._client.register_script(PROBE_LUA)
        self._release = self._client.register_script(RELEASE_LUA)
        self._success = self._client.register_script(SUCCESS_LUA)
        self._set_disabled = self._client.register_script(DISABLED_LUA)
        self._assert = self._client.register_script(ASSERT_LUA)
        self._epoch_key = f"{prefix}{SEP}epoch"
        self._epoch: bytes | None = None  # the epoch of the last sync (None: never synced)
        self._states: dict[str, Health] = {}
        self._versions: dict[str, int] = {}
        self._held: dict[str, float] = {}  # probes won here: name -> the probe_until we set
        self.salt = os.urandom(32).hex().encode()  # replaced by the one shared in Redis once synced
        self._salt_key = f"{prefix}{SEP}salt"
        self._disabled: set[str] = set()
        self._decisions: dict[str, bool] = {}  # operator's enable/disable not yet in Redis
        self._names: tuple[str, ...] = ()
        self._strays: set[str] = set()  # stray keys already logged
        self._up = False
        self._outage_logged = False
        self._supervisor: asyncio.Task | None = None
        self._synced = asyncio.Event()
        # One re-sync at a time: one that read Redis before a newer change must not finish
        # after one that read it later and put the older state back.
        self._resync_lock = asyncio.Lock()

    @property
    def breaker(self) -> Breaker:
        return self._breaker

    @breaker.setter
    def breaker(self, breaker: Breaker) -> None:
        """A new breaker (``router_cooldown`` changed live) also sets how long a credential
        scope is kept after its cooldown: twice the cooldown, as its Redis key is."""
        self._breaker = breaker
        self.scopes.ttl = 2 * breaker.cooldown

    @property
    def description(self) -> str:
        return f"redis {self.url} ({'connected' if self._up else 'unreachable: local view'})"

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def client(self):
        """The Redis client, shared with the affinity store."""
        return self._client

    def track(self, names: Iterable[str]) -> None:
        self._names = tuple(names)

    def key(self, name: str) -> str:
        """The Redis key of an endpoint's state."""
        return f"{self.prefix}{SEP}ep{SEP}{name}"

    # -- the HealthStore interface -------------------------------------------------------
    # None of these raises because of Redis: a failed or malformed round trip is an outage
    # for that call (`_call` returns None) and the call applies the local transition.

    async def view(self) -> Mapping[str, Health]:
        self._ensure_started()
        return self._states

    def current(self) -> Mapping[str, Health]:
        return self._states

    async def try_probe(self, name: str) -> bool:
        now = self._clock()
        if self._up:
            res = await self._call(
                self._probe(keys=self._keys(name), args=[name, self.channel, _ms(now),
                            _ms(self.breaker.probe_timeout), self._min_ttl()]),
                _probe_reply,
            )
            if res is not None:
                go, state = res
                self._apply(name, state)
                if go and state[4] >= 0:  # it took the probe (not merely healthy)
                    self._held[name] = state[3] / 1000
                return go
        local = try_probe(self._states.get(name, HEALTHY), now, self.breaker)
        if local is None:
            return False
        self._put(name, local)
        self._held[name] = local.probe_until
        return True

    async def release_probe(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is None:  # no probe of ours to free
            return
        now = self._clock()
        if self._up:
            res = await self._call(
                self._release(keys=self._keys(name), args=[name, self.channel, _ms(now), _ms(held),
                              self._min_ttl()]),
                _state,
            )
            if res is not None:
                self._apply(name, res)
                return
        if name in self._states:
            self._put(name, release_probe(self._states[name], now, held))

    async def record_failure(self, name: str, at_least: float = 0.0) -> Health:
        now, rand, b = self._clock(), self._rand(), self.breaker
        self._held.pop(name, None)
        if self._up:
            res = await self._call(
                self._failure(keys=self._keys(name), args=[
                    name, self.channel, _ms(now), b.max_failures, _ms(b.cooldown),
                    _ms(b.max_cooldown), b.jitter, rand, _ms(at_least), self._min_ttl()]),
                _state,
            )
            if res is not None:
                self._apply(name, res)
                return self._states.get(name, HEALTHY)
        h = after_failure(self._states.get(name, HEALTHY), now, b, at_least, rand)
        self._put(name, h)
        return h

    async def record_success(self, name: str) -> None:
        self._held.pop(name, None)
        if name in self._states:  # healthy here: a success writes nothing
            await self._heal(name)

    async def reset(self, name: str | None = None) -> None:
        scoped = [s for s in self.scopes.names() if name is None or s.partition("@")[0] == name]
        for n in (self._names if name is None else (name,)) + tuple(scoped):
            self._held.pop(n, None)
            await self._heal(n)

    @property
    def disabled(self) -> frozenset[str]:
        return frozenset(self._disabled)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """Shared: every instance takes the endpoint out of (or back into) rotation. Given while
        Redis is away (or while this instance re-syncs), the decision holds here at once and is
        written to Redis as soon as it is reachable: a re-sync never undoes it."""
        (self._disabled.add if disabled else self._disabled.discard)(name)
        self._decisions[name] = disabled
        if self._up:
            await self._write_decisions()

    async def _write_decisions(self) -> None:
        """Write the operator's decisions not yet in Redis, in the order given; stop at the
        first that fails (kept for the next try)."""
        for name, disabled in list(self._decisions.items()):
            done = await self._call(self._set_disabled(keys=[self._disabled_key, self._decided_key],
                                                       args=[name, self.channel, int(disabled),
                                                             "operator"]), _one)
            if done is None:
                return
            if self._decisions.get(name) == disabled:  # (not if a newer one came meanwhile)
                del self._decisions[name]
                (self._disabled.add if disabled else self._disabled.discard)(name)

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        await self._client.aclose()

    async def shared_salt(self, timeout: float = 1.0) -> bytes:
        """The salt every instance shares, once this one has synced with Redis (waiting at most
        ``timeout`` for the first sync after start; this instance's own salt if Redis is away)."""
        if not self._synced.is_set():
            await self.wait_synced(timeout)
        return self.salt

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
            ver = await self._call(
                self._success(keys=self._keys(name, healed=True),
                              args=[name, self.channel, _ms(self._clock()), self._healed_ttl()]),
                _int,
            )
            if ver:
                self._versions[name] = max(ver, self._versions.get(name, 0))
        self._states.pop(name, None)
        self.scopes.touched(self._states, name)

    def _keys(self, name: str, healed: bool = False) -> list[str]:
        """A script's keys: the state and the version counter (and the heal's version)."""
        keys = [self.key(name), self._version_key]
        return keys + [f"{self.prefix}{SEP}healed{SEP}{name}"] if healed else keys

    def _healed_ttl(self) -> int:
        """How long a heal's version is kept: a cooldown held here cannot outlive it."""
        return _ms(2 * max(self.breaker.cooldown, self.breaker.max_cooldown))

    def _min_ttl(self) -> int:
        return _ms(2 * self.breaker.cooldown)

    def _apply(self, name: str, state: State) -> None:
        """Take a state from Redis into the local view unless a newer one is already here."""
        f, e, u, p, ver = state
        if ver < 0:  # unchanged by the script: the state is current as read
            ver = self._versions.get(name, 0)
        elif ver < self._versions.get(name, 0):
            return
        self._versions[name] = ver
        self._put(name, _health(f, e, u, p))

    def _put(self, name: str, h: Health) -> None:
        if h == HEALTHY:
            self._states.pop(name, None)
        else:
            self._states[name] = h
        self.scopes.touched(self._states, name, self._clock())

    async def _call(self, awaitable, parse: Callable = lambda reply: reply):
        """One bounded Redis round trip, its reply checked by ``parse``; None (and the outage
        noted) if it fails, times out or answers something malformed. Never raises (but a
        cancellation of the caller goes through)."""
        try:
            async with asyncio.timeout(self._op_timeout):
                reply = await awaitable
            return parse(reply)
        except Exception as e:  # noqa: BLE001 - whatever Redis did, the request goes on locally
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
        (re)connect; notice an outage (or a server answering garbage) and retry once a second."""
        while True:
            pubsub = None
            try:
                pubsub = self._client.pubsub()
                async with asyncio.timeout(self._op_timeout * 4):
                    await pubsub.subscribe(self.channel)
                    await self._resync()
                self._mark_up()
                checked = time.monotonic()
                while True:
                    async with asyncio.timeout(RETRY_EVERY + self._op_timeout * 4):
                        msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=RETRY_EVERY)
                    if msg is not None:
                        self._on_message(msg)
                    if self._up and self._decisions:  # given while this instance re-synced
                        await self._write_decisions()
                    if self._up and time.monotonic() - checked >= EPOCH_CHECK_EVERY:
                        # A flush (or a restart the connection survived) empties Redis
                        # without an outage: a changed epoch says so, and a re-sync puts back
                        # what this instance holds.
                        checked = time.monotonic()
                        epoch = await self._call(self._client.get(self._epoch_key))
                        if self._up and epoch != self._epoch:
                            self._up = False
                    if not self._up:  # a command failed meanwhile: check and re-sync
                        async with asyncio.timeout(self._op_timeout * 4):
                            await self._resync()
                        self._mark_up()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure here means "Redis is not usable now"
                self._down(e)
            finally:
                if pubsub is not None:
                    try:
                        await asyncio.wait_for(pubsub.aclose(), self._op_timeout)
                    except Exception:  # noqa: BLE001
                        pass
            await asyncio.sleep(RETRY_EVERY)

    async def _resync(self) -> None:
        """Replace the local view with what Redis holds for every tracked endpoint.

        A stray key (another type, or fields that are not ours) is read as healthy and logged
        once; a reply that no Redis would give (the wrong shape) raises: not usable now.
        Re-syncs run one at a time (each bounded by its caller's timeout)."""
        async with self._resync_lock:
            await self._resync_now()

    async def _resync_now(self) -> None:
        # The endpoints and families tracked, and the credential scopes in Redis or held here.
        scoped = dict.fromkeys(self.scopes.names())
        scoped.update(dict.fromkeys(await self._scan_scopes()))
        names = self._names + tuple(scoped)
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self.key(name), "f", "e", "u", "p", "v")
            for name in names:
                pipe.get(self._keys(name, healed=True)[2])
            pipe.smembers(self._disabled_key)
            pipe.set(self._salt_key, self.salt, nx=True)  # Redis lost it: put back the one we know
            pipe.get(self._salt_key)
            pipe.set(self._epoch_key, os.urandom(16).hex(), nx=True)
            pipe.get(self._epoch_key)
            replies = await pipe.execute(raise_on_error=False)
        if not isinstance(replies, list) or len(replies) != 2 * len(names) + 5:
            raise MalformedReply("a re-sync reply of the wrong length")
        *rows, members, _, salt, _, epoch = replies
        rows, heals = rows[:len(names)], rows[len(names):]
        # The version of each endpoint's last heal, where Redis keeps one (anything else: none).
        healed = {name: int(h) for name, h in zip(names, heals)
                  if isinstance(h, bytes) and h.isdigit() and len(h) <= 15}
        if isinstance(salt, bytes) and len(salt) >= 32:
            self.salt = salt
        else:  # keep this instance's own salt: its key scopes are then its own
            self._stray(self._salt_key, "not a salt this router wrote", "absent")
        states: dict[str, State] = {}
        for name, row in zip(names, rows):
            if _wrong_type(row):
                self._stray(self.key(name), "not a hash", "healthy")
                continue
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, list) or len(row) != 5 or not all(
                    x is None or isinstance(x, bytes) for x in row):
                raise MalformedReply("HMGET did not answer a list of 5 strings")
            if all(x is None for x in row[:4]):
                continue  # healthy: no state
            try:
                f, e, u, p, ver = (0 if x is None else _int(x) for x in row)
            except MalformedReply:
                self._stray(self.key(name), "a hash with fields that are not ours", "healthy")
                continue
            states[name] = (f, e, u, p, ver)
        if _wrong_type(members):
            self._stray(self._disabled_key, "not a set", "empty")
            members = set()
        if isinstance(members, Exception):
            raise members
        if not isinstance(members, (set, list)) or not all(isinstance(m, bytes) for m in members):
            raise MalformedReply("SMEMBERS did not answer a set of strings")
        remote_disabled = {m.decode("utf-8", "replace") for m in members}
        if not isinstance(epoch, bytes):
            self._stray(self._epoch_key, "not an epoch this router wrote", "unchanged")
            epoch = self._epoch
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        held, known, held_disabled = dict(self._states), dict(self._versions), set(self._disabled)
        self._disabled = remote_disabled | held_disabled if lost else remote_disabled
        for name, disabled in self._decisions.items():  # (written to Redis below)
            (self._disabled.add if disabled else self._disabled.discard)(name)
        self._states.clear()
        self._versions.clear()
        self.scopes.clear()
        for name, ver in healed.items():
            if name not in states:
                self._versions[name] = ver
        for name, state in states.items():
            self._apply(name, state)
        # Cooldowns running here that Redis lost, or learned while Redis was away, are kept
        # (and put back for the other instances) unless Redis holds a newer decision: a newer
        # failure, or a newer success or reset (an operator's reset must not be undone by an
        # instance that had not heard of it yet). The script that puts one back checks again.
        now = self._clock()
        newest = {name: max(states[name][4] if name in states else 0, healed.get(name, 0))
                  for name in held}
        kept = [name for name, h in held.items() if now < h.ejected_until and SUBJECT.fullmatch(name)
                and (lost or newest[name] <= known.get(name, 0))
                and self._states.get(name, HEALTHY).ejected_until < h.ejected_until]
        for name in kept:
            self._put(name, held[name])
        await self._reassert(kept, held, sorted(held_disabled - remote_disabled - set(self._decisions))
                             if lost else [], None if lost else known, newest)
        await self._write_decisions()  # an operator's word given while Redis was away wins
        if lost:
            log.warning(f"router: Redis {self.url} lost the router's state (restarted empty or "
                        f"flushed); put back {len(held_disabled - remote_disabled)} disabled "
                        f"endpoint(s) and {len(kept)} cooldown(s) this instance held")
        elif kept:
            log.info(f"router: kept {len(kept)} cooldown(s) learned while Redis was away "
                     f"({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})")

    async def _reassert(self, names: list[str], held: Mapping[str, Health], disabled: list[str],
                        known: Mapping[str, int] | None, newest: Mapping[str, int]) -> None:
        """Write back what this instance holds and Redis does not: cooldowns (only where they
        end later than what Redis holds, and no decision newer than the version ``known`` here
        was made since; ``known`` None: Redis lost its state, every version is void) and
        disabled endpoints. Each call is bounded; a cooldown Redis refuses is replaced here by
        what Redis holds, at least as new as ``newest`` (the versions the re-sync read)."""
        now = self._clock()
        # Endpoints and families first; client-key scopes only up to REASSERT_SCOPES (a
        # re-sync must stay within its bound; a scope not put back is re-learned on its key's
        # next refusal).
        endpoints = [n for n in names if "@" not in n]
        for name in endpoints + [n for n in names if "@" in n][:REASSERT_SCOPES]:
            h = held[name]
            self._versions.pop(name, None)  # whatever Redis answers is at least as new
            res = await self._call(self._assert(keys=self._keys(name, healed=True), args=[
                name, self.channel, _ms(now), h.failures, h.ejections, _ms(h.ejected_until),
                self._min_ttl(), -1 if known is None else known.get(name, 0)]), _state)
            if res is not None and res[4] >= 0:
                self._versions[name] = res[4]
            elif res is not None:  # refused: Redis holds a newer decision or a longer cooldown
                self._apply(name, res[:4] + (newest.get(name, 0),))
        for name in disabled:
            put = await self._call(self._set_disabled(keys=[self._disabled_key, self._decided_key],
                                                      args=[name, self.channel, 1, "assert"]),
                                   _int)
            if put == 0:  # an operator enabled it since Redis lost its state: that holds
                self._disabled.discard(name)

    async def _scan_scopes(self) -> list[str]:
        """The credential scopes (``endpoint@keyhash``) Redis holds, at most ``scopes.limit``:
        best effort within one round trip's time (what is missed arrives with its next change)."""
        head = self.key("")
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", head) + "*@*"
        found: list[str] = []
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                async for key in self._client.scan_iter(match=pattern, count=1000):
                    name = key.decode("utf-8", "replace")[len(head):] if isinstance(key, bytes) else ""
                    if SUBJECT.fullmatch(name):
                        found.append(name)
                    if len(found) >= self.scopes.limit:
                        break
        except TimeoutError:
            pass
        return found

    def _stray(self, key: str, what: str, read_as: str) -> None:
        """Log a stray key once (its name only: keys hold no secrets)."""
        if key not in self._strays:
            self._strays.add(key)
            log.warning(f"router: Redis key {key!r} is {what}; read as {read_as}, and replaced "
                        "on the next change")

    def _mark_up(self) -> None:
        was_out = self._outage_logged
        self._up = True
        self._outage_logged = False
        self._synced.set()
        if was_out:
            log.info(f"router: Redis {self.url} reachable again; health view re-synced")

    def _on_message(self, msg) -> None:
        try:
            name, *fields = msg["data"].decode().split(SEP)
            if name == "!disabled":
                if len(fields) != 2 or fields[1] not in ("0", "1") or not ENDPOINT_NAME.fullmatch(fields[0]):
                    raise MalformedReply("a malformed disabled message")
                (self._disabled.add if fields[1] == "1" else self._disabled.discard)(fields[0])
                return
            if not SUBJECT.fullmatch(name):
                raise MalformedReply("not an endpoint name")
            self._apply(name, _state(fields))
        except Exception:  # noqa: BLE001 - a message we cannot read is skipped, never fatal
            log.debug("router: ignoring a malformed health message")


def _wrong_type(reply) -> bool:
    """A key of another type. Any other error reply (an ACL refusal, say) is raised by the
    re-sync's shape checks instead: Redis is then not usable, not merely holding a stray."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _probe_reply(reply) -> tuple[bool, State]:
    if not isinstance(reply, list) or len(reply) != 6 or reply[0] not in (0, 1):
        raise MalformedReply("the probe script answered the wrong shape")
    return bool(reply[0]), _state(reply[1:])


def _one(reply) -> int:
    if reply != 1:
        raise MalformedReply("1 was expected")
    return reply


def _reason(e: BaseException) -> str:
    if isinstance(e, AuthenticationError) or (isinstance(e, ResponseError) and "auth" in str(e).lower()):
        return "authentication failed: check the password in router_redis_url"
    if isinstance(e, TimeoutError):
        return "timed out"
    return type(e).__name__ if not str(e) else f"{type(e).__name__}: {str(e)[:120]}"

