"""Client connections that never finish a request head are closed after a bounded time.

mitmproxy has no such timeout: its only one (``tcp_timeout``, 600 s) is for inactivity, so a
client that sends a byte now and then, or nothing after the TLS handshake, holds a connection
(and its memory) for as long as it likes. The router starts a deadline when a client connects
and lifts it when the connection's first request head is complete (``requestheaders``). At the
deadline it closes the connection through mitmproxy's own connection handler, exactly as
mitmproxy's inactivity timeout does.
"""

import asyncio
import logging

log = logging.getLogger("claude_router")


class HeadDeadlines:
    def __init__(self) -> None:
        self.timeout = 30.0
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def connected(self, client_id: str, close) -> None:
        """``close`` is called (sync) at the deadline unless ``head_seen`` came first."""
        if self.timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        self._timers[client_id] = loop.call_later(self.timeout, self._expire, client_id, close)

    def head_seen(self, client_id: str) -> None:
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()

    disconnected = head_seen

    def _expire(self, client_id: str, close) -> None:
        if self._timers.pop(client_id, None) is not None:
            log.info(f"router: closing a client connection that sent no complete request head "
                     f"within {self.timeout:g} s")
            close()


class Delivery:
    """How a client is taking a streamed answer: the handoff notes when the client stops
    reading (its buffers are full), so a relay that gives up on it is not blamed. After a
    long pause the bytes held on the way drain in many short pauses before the break shows,
    so the last *long* pause is kept, not the last one."""

    __slots__ = ("paused_at", "stall", "stall_end", "threshold")

    def __init__(self, threshold: float = 1.0) -> None:
        self.threshold = threshold
        self.paused_at: float | None = None  # monotonic time the client stopped taking bytes
        self.stall = 0.0  # the last pause of at least ``threshold`` seconds
        self.stall_end = 0.0

    def pause(self, now: float) -> None:
        self.paused_at = now

    def resume(self, now: float) -> None:
        if self.paused_at is not None:
            if now - self.paused_at >= self.threshold:
                self.stall, self.stall_end = now - self.paused_at, now
            self.paused_at = None

    def stalled_recently(self, now: float, window: float = 10.0) -> bool:
        """Is the client not reading now (for ``threshold`` or more), or did it end a pause
        that long within ``window`` seconds?"""
        if self.paused_at is not None and now - self.paused_at >= self.threshold:
            return True
        return self.stall > 0 and now - self.stall_end < window
