"""Process-wide settings that suit a long-running proxy holding many streams.

Every held stream costs two file descriptors; a common default soft limit of 1,024 would stop
one process near 500 streams. ``raise_fd_limit()`` raises the soft limit to the hard one (any
process may), as nginx's ``worker_rlimit_nofile`` does.

Out of file descriptors, asyncio reports every failed ``accept()`` through the event loop's
exception handler, which mitmproxy prints as "Unhandled error in task" with a traceback: up to
a listener's backlog (100) times in a row, and again every second while it lasts. ``AcceptErrors``
says it once every ten seconds instead, in one line that tells the operator what to do, and
passes every other report on to the handler it replaced.

Python's cyclic garbage collector stops the event loop while it runs, and a full collection
scans every tracked object: at a thousand held streams that is several hundred thousand
objects and a pause of a few hundred milliseconds in every stream. Two settings make it cheaper:

- ``gc.freeze()`` once start-up is done: the modules, mitmproxy's addons and options and the
  router's configuration live as long as the process, so no collection scans them again;
- a larger first-generation threshold: fewer, slightly longer young collections, and so fewer
  of the older ones that follow them. Garbage in cycles is still collected, a little later.
"""

import asyncio
import gc
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("claude_router")

GEN0_THRESHOLD = 10_000  # CPython's default is 700 (2,000 from 3.13 on some builds)


_tuned = False


def tune_gc() -> None:
    """Once per process (a second router, or a reloaded script, must not freeze live flows)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0:  # 0: collection is off; leave it so
        gc.set_threshold(max(gen0, GEN0_THRESHOLD), gen1, gen2)
    log.debug(f"router: {gc.get_freeze_count()} start-up objects frozen; gc thresholds "
              f"{gc.get_threshold()}")


FD_CAP = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (at most FD_CAP);
    return (before, after). A limit that cannot be raised is left as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(FD_CAP, _nr_open()) if hard == resource.RLIM_INFINITY else min(hard, FD_CAP)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft, soft
    log.debug(f"router: open files limit raised from {soft} to {want}")
    return soft, want


def _nr_open() -> int:
    """The kernel's ceiling for any process's limit (an unlimited hard limit still stops there)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return FD_CAP


ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message (selector_events)


class AcceptErrors:
    """The event loop's exception handler while installed: failed accepts of a process out of
    resources become one warning per ``every`` seconds; everything else goes on as before."""

    def __init__(self, every: float = 10.0, clock=time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.failed = 0  # accepts that failed since the last warning
        self._warned = float("-inf")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        current = loop.get_exception_handler()
        if self._loop is None and not isinstance(getattr(current, "__self__", None), AcceptErrors):
            # (one per loop: a reloaded router script finds its predecessor's still in place)
            self._loop, self._previous = loop, current
            loop.set_exception_handler(self.handle)

    def uninstall(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.get_exception_handler() == self.handle:
            loop.set_exception_handler(self._previous)

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_ERROR and isinstance(exc, OSError):
            self.failed += 1
            now = self.clock()
            if now - self._warned >= self.every:
                self._warned = now
                log.warning(f"router: cannot accept new connections: {exc.strerror or exc} "
                            f"({self.failed} failed accepts; the listener retries every second). "
                            "Raise `ulimit -n`: an open stream takes about 2 descriptors")
                self.failed = 0
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)
