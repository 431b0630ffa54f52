"""mitmproxy addon for the benchmark: how long does the event loop stall, and is it the GC?

Load it into every proxy under test (``mitmdump -s addon/claude_router_dev/addons/loopmon.py``),
so each pays the same small cost (one timer wake-up every 5 ms):

- a task sleeps ``loopmon_interval_ms`` (5) in a loop; how late it wakes is the loop's stall
  (max, count over 20/50/100 ms, and the gc time inside each of the longest stalls);
- ``gc.callbacks`` time every collection (count, total and longest per generation).

Results go to the JSON file named by the option ``loopmon_file`` (else the environment variable
``LOOPMON_FILE``; neither: the addon does nothing), rewritten every second and on ``done``.
SIGUSR1 zeroes the counters (the benchmark sends it after its warm-up, so start-up and first
requests are not counted) and rewrites the file at once.

With ``loopmon_callbacks`` (or ``LOOPMON_CALLBACKS=1``; diagnosis, it costs about a
microsecond per callback) every event-loop callback is timed as well: each stall then says how
many callbacks ran in it and which was the slowest, and the slowest kinds of callback are
listed. A stall made of thousands of short callbacks is a saturated loop; one made of a single
long callback is that callback (or the gc inside it).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import signal
import time
from pathlib import Path

from mitmproxy import ctx

clock = time.monotonic
THRESHOLDS_MS = (20, 50, 100)
KEEP = 10  # longest stalls kept


class LoopMon:
    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.path: Path | None = None
        self._gc_start = 0.0
        self._gc_installed = False
        self._orig_run = None
        self.timing = False  # callbacks timed
        self.reset()

    def reset(self) -> None:
        self.started = clock()
        self.ticks = 0
        self.max_lateness = 0.0
        self.over = {t: 0 for t in THRESHOLDS_MS}
        self.stalls: list[tuple] = []  # (lateness s, gc s inside, at, callbacks, slowest s, name)
        self.gc_total = 0.0
        self.gc = {g: {"count": 0, "total_ms": 0.0, "max_ms": 0.0} for g in (0, 1, 2)}
        self.callbacks = 0
        self.callback_s = 0.0
        self.slowest = (0.0, "")  # since the last tick
        self.slow: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])

    # -- mitmproxy hooks ----------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option("loopmon_file", str, "", "loopmon: write stall/gc JSON here")
        loader.add_option("loopmon_interval_ms", int, 5, "loopmon: timer period")
        loader.add_option("loopmon_callbacks", bool, False,
                          "loopmon: time every event-loop callback (diagnosis)")

    def configure(self, updated) -> None:
        path = ctx.options.loopmon_file or os.environ.get("LOOPMON_FILE", "")
        self.path = Path(path) if path else None
        if self.path is not None and not self._gc_installed:
            gc.callbacks.append(self._on_gc)
            self._gc_installed = True

    def running(self) -> None:
        if self.path is None or self.task is not None:
            return
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._tick())
        loop.add_signal_handler(signal.SIGUSR1, self._reset_now)
        if ctx.options.loopmon_callbacks or os.environ.get("LOOPMON_CALLBACKS") == "1":
            self._time_callbacks()
        self.write()  # the file exists once SIGUSR1 is safe to send

    def _reset_now(self) -> None:
        self.reset()
        self.write()

    def done(self) -> None:
        if self._orig_run is not None:
            asyncio.events.Handle._run = self._orig_run
            self._orig_run = None
        if self.task is not None:
            self.task.cancel()
        if self._gc_installed:
            gc.callbacks.remove(self._on_gc)
            self._gc_installed = False
        self.write()

    # -- measuring ----------------------------------------------------------------------------

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        dt = time.perf_counter() - self._gc_start
        self.gc_total += dt
        g = self.gc[min(2, info.get("generation", 2))]
        g["count"] += 1
        g["total_ms"] += dt * 1000
        g["max_ms"] = max(g["max_ms"], dt * 1000)

    def _time_callbacks(self) -> None:
        orig = self._orig_run = asyncio.events.Handle._run
        self.timing = True
        perf = time.perf_counter
        mon = self

        def _run(handle) -> None:
            t = perf()
            orig(handle)
            dt = perf() - t
            mon.callbacks += 1
            mon.callback_s += dt
            if dt > 0.002:
                name = callback_name(handle)
                rec = mon.slow[name]
                rec[0] += 1
                rec[1] += dt
                rec[2] = max(rec[2], dt)
                if dt > mon.slowest[0]:
                    mon.slowest = (dt, name)

        asyncio.events.Handle._run = _run

    async def _tick(self) -> None:
        period = max(1, ctx.options.loopmon_interval_ms) / 1000
        last_write = clock()
        while True:
            gc0 = self.gc_total
            cb0 = self.callbacks
            self.slowest = (0.0, "")
            due = clock() + period
            await asyncio.sleep(period)
            t = clock()
            self.heartbeat = t
            late = t - due
            self.ticks += 1
            if late > self.max_lateness:
                self.max_lateness = late
            ms = late * 1000
            for th in THRESHOLDS_MS:
                if ms > th:
                    self.over[th] += 1
            if ms > THRESHOLDS_MS[0]:
                self.stalls.append((late, max(0.0, self.gc_total - gc0), t - self.started,
                                    max(0, self.callbacks - cb0), *self.slowest))
                self.stalls.sort(reverse=True)
                del self.stalls[KEEP:]
            if t - last_write >= 1.0:
                last_write = t
                self.write()

    def snapshot(self) -> dict:
        return {
            "seconds": clock() - self.started,
            "ticks": self.ticks,
            "interval_ms": ctx.options.loopmon_interval_ms,
            "max_stall_ms": self.max_lateness * 1000,
            "stalls_over_ms": {str(k): v for k, v in self.over.items()},
            "longest_stalls": [
                {"ms": s * 1000, "gc_ms": g * 1000, "at_s": at,
                 **({"callbacks": n, "slowest_ms": sl * 1000, "slowest": name}
                    if self.timing else {})}
                for s, g, at, n, sl, name in self.stalls],
            "gc": {str(k): v for k, v in self.gc.items()},
            "gc_total_ms": self.gc_total * 1000,
            **({"callbacks": self.callbacks, "callback_ms": self.callback_s * 1000,
                "slow_callbacks": [  # over 2 ms, by kind, the most total time first
                    {"name": k, "count": c, "total_ms": t * 1000, "max_ms": m * 1000}
                    for k, (c, t, m) in sorted(self.slow.items(), key=lambda kv: -kv[1][1])[:15]]}
               if self.timing else {}),
        }

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.path)
        except OSError:
            pass


def callback_name(handle) -> str:
    """What a loop callback is: a task's coroutine, a transport's protocol, or the function."""
    cb = handle._callback
    owner = getattr(cb, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {getattr(coro, '__qualname__', type(coro).__name__)}"
    name = getattr(cb, "__qualname__", None) or type(cb).__name__
    proto = getattr(owner, "_protocol", None)
    if proto is not None:
        return f"{name} -> {type(proto).__qualname__}"
    return name


addons = [LoopMon()]
