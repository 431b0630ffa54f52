"""Budget counters shared through Redis (``router_redis_url``): one budget for a client however
many workers and machines serve it.

Each client's spend per UTC day is a Redis float, ``{prefix}|spend|{client}|{day}``, added to
with INCRBYFLOAT (atomic: two workers never lose each other's spend) and expiring 40 days
after its last change. The request path never waits for Redis: spend goes to the client's
``pending`` (accounts), a background task adds it in Redis within ``EVERY`` seconds and reads
back the totals of every budgeted client's period (one MGET), which budgets then read from
memory. When Redis is away nothing fails: pending spend waits (and is added once Redis is
back), and budgets read this process's own spend, which the totals never go below.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence

from . import clients
from .accounts import Accounts
from .clients import Client

log = logging.getLogger("claude_router")

EVERY = 0.5  # seconds between rounds (add pending spend, read totals)
OP_TIMEOUT = 0.5
TTL = 40 * 86400  # a day's counter outlives the longest period (a month) that reads it
SEP = "|"


class SharedBudgets:
    def __init__(self, client, prefix: str, accounts: Accounts, configured: Callable[[], Sequence[Client]],
                 clock: Callable[[], float], every: float = EVERY, op_timeout: float = OP_TIMEOUT) -> None:
        self.client = client  # redis.asyncio client (the health store's)
        self.prefix = prefix
        self.accounts = accounts
        self.configured = configured
        self.clock = clock
        self.every = every
        self.op_timeout = op_timeout
        self.up: bool | None = None  # None: not tried yet
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def key(self, label: str, day: str) -> str:
        return f"{self.prefix}{SEP}spend{SEP}{label}{SEP}{day}"

    def add(self, label: str, day: str, usd: float) -> None:
        """Spend to add in Redis (called on the event loop, after ``accounts`` counted it)."""
        acct = self.accounts.get(label)
        acct.pending[day] = acct.pending.get(day, 0.0) + usd
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.every):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.round()
            await asyncio.sleep(min(0.1, self.every))  # a burst of spend is one round, not many

    async def round(self) -> None:
        """Add the pending spend, then read the totals of every budgeted client's period."""
        ok = await self.flush()
        if ok:
            ok = await self.refresh()
        self._health(ok)

    async def flush(self) -> bool:
        todo = [(label, day, usd) for label, acct in list(self.accounts.accounts.items())
                for day, usd in list(acct.pending.items()) if usd]
        if not todo:
            return True
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self.client.pipeline(transaction=False) as pipe:
                    for label, day, usd in todo:
                        pipe.incrbyfloat(self.key(label, day), usd)
                        pipe.expire(self.key(label, day), TTL)
                    replies = await pipe.execute()
        except Exception as e:  # noqa: BLE001 - Redis away: the spend waits for the next round
            self._down(e)
            return False
        for (label, day, usd), total in zip(todo, replies[::2]):
            acct = self.accounts.get(label)
            left = acct.pending.get(day, 0.0) - usd
            if abs(left) < 1e-12:
                acct.pending.pop(day, None)
            else:
                acct.pending[day] = left
            try:
                acct.shared[day] = float(total)
            except (TypeError, ValueError):
                pass
        return True

    async def refresh(self) -> bool:
        now = self.clock()
        wanted = [(c.label, d) for c in self.configured() if c.budget is not None
                  for d in clients.days_of(c.budget.per, now)]
        if not wanted:
            return True
        try:
            async with asyncio.timeout(self.op_timeout):
                values = await self.client.mget([self.key(label, d) for label, d in wanted])
        except Exception as e:  # noqa: BLE001
            self._down(e)
            return False
        seeds = []
        for (label, d), raw in zip(wanted, values):
            acct = self.accounts.get(label)
            if raw is None:
                # Redis does not have it (a new Redis, or one that lost its data): what this
                # process knows (the ledger's total at start-up, and its own spend since) seeds
                # it, unless another worker's seed got there first.
                known = acct.spend.get(d, 0.0) - acct.pending.get(d, 0.0)
                acct.shared[d] = 0.0
                if known > 0:
                    seeds.append((self.key(label, d), known))
                continue
            try:
                acct.shared[d] = float(raw)
            except (TypeError, ValueError):
                continue  # not a counter: this process's own spend counts
        if seeds:
            try:
                async with asyncio.timeout(self.op_timeout):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key, usd in seeds:
                            pipe.set(key, repr(usd), nx=True, ex=TTL)
                        await pipe.execute()
            except Exception as e:  # noqa: BLE001
                self._down(e)
                return False
        return True

    def _down(self, e: BaseException) -> None:
        if self.up is not False:
            log.warning(f"router: shared budgets: Redis unavailable ({type(e).__name__}); "
                        "budgets count this process's spend until it is back")
        self.up = False

    def _health(self, ok: bool) -> None:
        if ok and self.up is False:
            log.info("router: shared budgets: Redis is back; pending spend added")
        if ok:
            self.up = True
