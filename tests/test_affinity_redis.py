"""The shared conversation store against a real redis-server: a count bound as well as a TTL."""

import asyncio
import time

import redis.asyncio as aioredis

from claude_router.affinity import RedisAffinity
from claude_router.sessions import after_turn

# The store gives a Redis call 0.1 s and then goes on without it, by design; here every write
# must land, also on a loaded machine.
LANDS = 5.0


async def until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


async def test_redis_never_holds_more_conversations_than_the_bound(redis_server):
    client = aioredis.from_url(redis_server.url)
    store = RedisAffinity(client, "bound", max_sessions=50, op_timeout=LANDS)
    now = time.time()
    for i in range(20_000):  # a client inventing session ids (the figure)
        store.put(f"owner:{i:032x}#sonnet", after_turn(None, "aws", 5_000, 10, 300.0, now, "cheapest"))
        if i % 500 == 0:
            await asyncio.sleep(0)  # let the background writes go

    async def settled() -> bool:
        return not store._tasks

    assert await until(settled)
    keys = [k.decode() async for k in client.scan_iter(match="bound|s|*")]
    assert len(keys) <= 50
    assert await client.zcard("bound|sessions") == len(keys)
    # a conversation written later, expiring later, is kept
    store.put("owner:late#sonnet", after_turn(None, "aws", 5_000, 10, 300.0, now + 5, "cheapest"))
    assert await until(settled)
    assert await client.exists("bound|s|owner:late#sonnet") == 1
    assert await client.zcard("bound|sessions") <= 50
    await store.close()
    await client.aclose()


async def test_a_stray_index_key_is_replaced(redis_server):
    client = aioredis.from_url(redis_server.url)
    await client.set("stray|sessions", "not a sorted set")
    store = RedisAffinity(client, "stray", max_sessions=5, op_timeout=LANDS)
    store.put("o:1#sonnet", after_turn(None, "aws", 5_000, 10, 300.0, time.time(), "cheapest"))

    async def written() -> bool:
        return await client.exists("stray|s|o:1#sonnet") == 1

    assert await until(written)
    assert await client.type("stray|sessions") == b"zset"
    await store.close()
    await client.aclose()
