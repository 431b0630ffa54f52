"""Client connections are bounded while they are not being served: every request head, the
wait for the next one on a kept-alive connection, and every request body.

mitmproxy has no such timeout: its only one (``tcp_timeout``, 600 s) is for inactivity, so a
client that sends a byte now and then, or nothing after the TLS handshake, holds a connection
(and its memory) for as long as it likes. The router starts a head deadline when a client
connects, again after a CONNECT, and again whenever the connection becomes idle (every request
on it answered); only a complete request head (``requestheaders``) lifts it, so a byte every
few seconds never resets it. A request's body has a deadline of its own, from its head until
it is complete. A request being answered, or a response still streaming, is never cut. At a
deadline the router closes the connection through mitmproxy's own connection handler, exactly
as mitmproxy's inactivity timeout does.
"""

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("claude_router")

_REQUEST, _RESPONSE = 1, 2  # the parts of an exchange that must end before a connection is idle


class HeadDeadlines:
    """Deadlines per client connection (head and idle) and per request (body)."""

    def __init__(self) -> None:
        self.timeout = 30.0  # router_head_timeout (0: off)
        self.body_timeout = 300.0  # router_body_timeout (0: off)
        self._close: dict[str, Callable[[], None]] = {}  # connected clients
        self._timers: dict[str, asyncio.TimerHandle] = {}  # client -> head/idle deadline
        self._busy: dict[str, dict[str, int]] = {}  # client -> {flow id: parts ended}
        self._bodies: dict[str, asyncio.TimerHandle] = {}  # flow id -> body deadline

    def connected(self, client_id: str, close: Callable[[], None]) -> None:
        """``close`` is called (sync) at a deadline."""
        self._close[client_id] = close
        self._idle(client_id)

    def connect_seen(self, client_id: str) -> None:
        """A CONNECT head is complete: the TLS handshake and the first request head inside
        the tunnel get a deadline of their own."""
        self._cancel(client_id)
        self._idle(client_id)

    def tunnel(self, client_id: str) -> None:
        """The connection is passed through untouched (no heads to wait for): no deadlines."""
        self._cancel(client_id)
        self._close.pop(client_id, None)
        self._busy.pop(client_id, None)

    def head_seen(self, client_id: str, flow_id: str = "") -> None:
        """A complete request head: the head deadline stops until the exchange has ended."""
        self._cancel(client_id)
        if client_id in self._close and flow_id:
            self._busy.setdefault(client_id, {})[flow_id] = 0

    def body_started(self, client_id: str, flow_id: str) -> None:
        """A request body follows its head: it must be complete within ``body_timeout``."""
        if self.body_timeout > 0 and client_id in self._close and flow_id not in self._bodies:
            self._bodies[flow_id] = asyncio.get_running_loop().call_later(
                self.body_timeout, self._expire_body, client_id, flow_id)

    def request_done(self, client_id: str, flow_id: str) -> None:
        """The request (its body too) is complete."""
        self._stop_body(flow_id)
        self._ended(client_id, flow_id, _REQUEST)

    def response_done(self, client_id: str, flow_id: str) -> None:
        """The response is complete (a streamed one: its last byte went out)."""
        self._ended(client_id, flow_id, _RESPONSE)

    def failed(self, client_id: str, flow_id: str) -> None:
        """The exchange ended with an error."""
        self._stop_body(flow_id)
        self._ended(client_id, flow_id, _REQUEST | _RESPONSE)

    def disconnected(self, client_id: str) -> None:
        self._cancel(client_id)
        self._close.pop(client_id, None)
        for flow_id in self._busy.pop(client_id, {}):
            self._stop_body(flow_id)

    def busy(self, client_id: str) -> int:
        """Exchanges in progress on a connection (for tests and status)."""
        return len(self._busy.get(client_id, ()))

    # -- inside --------------------------------------------------------------------------

    def _ended(self, client_id: str, flow_id: str, part: int) -> None:
        busy = self._busy.get(client_id)
        if busy is None or flow_id not in busy:
            return
        busy[flow_id] |= part
        if busy[flow_id] == _REQUEST | _RESPONSE:
            del busy[flow_id]
            if not busy:
                del self._busy[client_id]
                self._idle(client_id)

    def _idle(self, client_id: str) -> None:
        """Start the head deadline (the connection waits for a request head)."""
        if self.timeout <= 0 or client_id not in self._close or client_id in self._timers:
            return
        self._timers[client_id] = asyncio.get_running_loop().call_later(
            self.timeout, self._expire, client_id)

    def _cancel(self, client_id: str) -> None:
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()

    def _stop_body(self, flow_id: str) -> None:
        timer = self._bodies.pop(flow_id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, client_id: str) -> None:
        if self._timers.pop(client_id, None) is not None and (close := self._close.get(client_id)):
            log.info(f"router: closing a client connection that sent no complete request head "
                     f"within {self.timeout:g} s")
            close()

    def _expire_body(self, client_id: str, flow_id: str) -> None:
        if self._bodies.pop(flow_id, None) is not None and (close := self._close.get(client_id)):
            log.info(f"router: closing a client connection whose request body was not complete "
                     f"within {self.body_timeout:g} s (router_body_timeout)")
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


class Collector:
    """A routed request's body, read as mitmproxy streams it (``flow.request.stream``): the
    chunks are kept, never sent on, up to ``limit`` bytes. The first chunk past the limit
    calls ``over`` once; what was kept is dropped then, and so is all that follows. The
    request's head (what the router re-pointed) is kept in ``origin``."""

    __slots__ = ("answer", "chunks", "limit", "origin", "over", "path", "refused", "size", "streamed")

    def __init__(self, limit: int, over: Callable[[int], None]) -> None:
        self.limit = limit
        self.over = over
        self.chunks: list[bytes] = []
        self.size = 0
        self.streamed = False  # mitmproxy called it: the body streamed (else it was buffered)
        self.refused = False
        self.origin: tuple = ()
        self.path = ""  # the handoff path the request head went to
        self.answer: asyncio.Future | None = None

    def __call__(self, chunk: bytes) -> list[bytes]:
        self.streamed = True
        if not self.refused:
            self.size += len(chunk)
            if self.size > self.limit:
                self.refused = True
                self.chunks.clear()
                self.over(self.size)
            elif chunk:
                self.chunks.append(chunk)
        return []  # nothing goes on to the (handoff) server

    def body(self) -> bytes:
        return b"".join(self.chunks)
