"""In-memory connections: a pair of asyncio transports joined back to back, with no socket.

The handoff (``handoff``) hands mitmproxy a routed response over a connection mitmproxy opens
itself. Over loopback TCP that costs two file descriptors, a connect, an accept and two system
calls per chunk for every stream. When both ends are in this process, a ``Pair`` does the same
job in memory: each end is an ``asyncio.Transport`` that delivers what is written to it to the
other end's protocol on the next turn of the event loop, with the same flow control a socket
gives (a reader that pauses makes the writer pause once HIGH_WATER bytes wait for it), the same
half-close (``write_eof`` -> ``eof_received``) and the same abort (the peer sees a reset).
"""

import asyncio
from typing import Any, cast

HIGH_WATER = 64 * 1024  # bytes waiting for a paused reader before its writer is paused
LOW_WATER = 16 * 1024
READ_SIZE = 256 * 1024  # at most this much per data_received, as a socket transport reads


class End(asyncio.Transport):
    """One end of an in-memory connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._loop = loop
        # A streaming protocol (data goes to data_received); set by pair(), dropped once lost.
        self._protocol: asyncio.Protocol | None = None
        self._peer: End | None = None
        self._inbox = bytearray()  # written by the peer, not yet given to our protocol
        self._eof_in = False  # the peer wrote EOF: give it to our protocol after the inbox
        self._reset: Exception | None = None  # the peer aborted: our protocol sees this
        self._flush_due = False
        self._reading_paused = False
        self._writing_paused = False  # our protocol was told to pause writing
        self._eof_out = False  # we wrote EOF (or closed): no more writes
        self._closing = False
        self._lost = False

    # -- asyncio.BaseTransport ---------------------------------------------------------------

    def get_protocol(self) -> asyncio.BaseProtocol:
        # None once the connection is lost, as asyncio's own transports (typeshed omits it).
        return self._protocol  # type: ignore[return-value]

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        # (typed BaseProtocol by the Transport interface: only a streaming one is served here)
        self._protocol = cast(asyncio.Protocol, protocol)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Like a socket's close: what was written still reaches the peer, then its EOF."""
        if self._closing:
            return
        self._closing = True
        self._send_eof()
        self._loop.call_soon(self._connection_lost, None)

    def abort(self) -> None:
        """Like a reset: the peer loses what it has not read yet and sees an error."""
        if self._lost:
            return
        self._closing = self._eof_out = True
        peer = self._peer
        if peer is not None and not peer._lost:
            peer._inbox.clear()
            peer._reset = ConnectionResetError("connection reset by peer")
            peer._schedule_flush()
        self._loop.call_soon(self._connection_lost, None)

    # -- asyncio.ReadTransport -----------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._schedule_flush()

    # -- asyncio.WriteTransport ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_out or not data:
            return  # like a socket transport after close: dropped
        peer = self._peer
        if peer is None or peer._lost:
            # Like writing to a socket the peer has closed: this end breaks.
            self._closing = self._eof_out = True
            self._loop.call_soon(self._connection_lost, BrokenPipeError("the peer closed"))
            return
        peer._inbox += data
        peer._schedule_flush()
        if peer._reading_paused and len(peer._inbox) > HIGH_WATER:
            self._pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._send_eof()

    def get_write_buffer_size(self) -> int:
        peer = self._peer
        return len(peer._inbox) if peer is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return LOW_WATER, HIGH_WATER

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # fixed limits

    # -- internals -------------------------------------------------------------------------

    def _send_eof(self) -> None:
        if self._eof_out:
            return
        self._eof_out = True
        peer = self._peer
        if peer is not None and not peer._lost:
            peer._eof_in = True
            peer._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_due and not self._lost:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Give the protocol what waits for it, as a socket transport's read callback does."""
        self._flush_due = False
        if self._lost:
            return
        if self._reset is not None:
            self._connection_lost(self._reset)
            return
        if self._reading_paused or self._closing:
            return  # like a socket transport: no reads after close() or abort()
        if self._inbox:
            data = bytes(self._inbox[:READ_SIZE])
            del self._inbox[:READ_SIZE]
            protocol = self._protocol
            assert protocol is not None  # (not lost)
            try:
                protocol.data_received(data)
            except BaseException as e:  # noqa: BLE001 - as asyncio does: the connection dies
                self._fatal(e)
                return
            peer = self._peer
            if peer is not None and peer._writing_paused and len(self._inbox) <= LOW_WATER:
                peer._resume_writing()
            if self._inbox or self._reset is not None:  # written during data_received
                self._schedule_flush()
                return
        if self._eof_in and not self._lost and not self._reading_paused:
            self._eof_in = False
            keep_open = False
            protocol = self._protocol
            assert protocol is not None  # (not lost)
            try:
                keep_open = bool(protocol.eof_received())
            except BaseException as e:  # noqa: BLE001
                self._fatal(e)
                return
            if not keep_open:
                self.close()

    def _pause_writing(self) -> None:
        if not self._writing_paused:
            self._writing_paused = True
            assert self._protocol is not None  # (a lost end has written EOF: it writes no more)
            self._protocol.pause_writing()

    def _resume_writing(self) -> None:
        if self._writing_paused and not self._lost:
            self._writing_paused = False
            assert self._protocol is not None  # (not lost)
            self._protocol.resume_writing()

    def _fatal(self, exc: BaseException) -> None:
        """A protocol callback raised: report it as asyncio does, and reset the connection."""
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise exc
        self._loop.call_exception_handler({
            "message": "Fatal error: protocol callback failed on an in-memory connection",
            "exception": exc, "transport": self, "protocol": self._protocol})
        self.abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        sent_eof = self._eof_out
        self._lost = self._closing = self._eof_out = True
        self._inbox.clear()
        peer = self._peer
        if peer is not None and not peer._lost and not sent_eof and exc is None:
            peer._eof_in = True  # we are gone without having said so: the peer reads EOF
            peer._schedule_flush()
        if peer is not None and peer._writing_paused:
            peer._resume_writing()  # its next write finds us gone and breaks
        self._writing_paused = False
        protocol, self._protocol = self._protocol, None
        assert protocol is not None  # (set by pair(); only this, once, drops it)
        try:
            protocol.connection_lost(exc)
        finally:
            self._peer = None


def pair(loop: asyncio.AbstractEventLoop, a: asyncio.Protocol, b: asyncio.Protocol,
         a_extra: dict[str, Any], b_extra: dict[str, Any]) -> tuple[End, End]:
    """Join protocols ``a`` and ``b``; both are told ``connection_made`` now."""
    ea, eb = End(loop, a_extra), End(loop, b_extra)
    ea._peer, eb._peer = eb, ea
    ea._protocol, eb._protocol = a, b
    a.connection_made(ea)
    b.connection_made(eb)
    return ea, eb
