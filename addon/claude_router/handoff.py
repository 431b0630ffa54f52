"""Handoff: give mitmproxy an upstream response that the router already holds, as a stream.

mitmproxy can only stream a response it reads from a server connection of its own; a response
an addon sets is sent as one buffered body. So after failover the router parks the winning,
still-unread upstream response here under a one-time token, re-points the flow at this small
loopback HTTP/1.1 server, and mitmproxy reads it from here chunk by chunk.

mitmproxy opens at most 5 connections per client connection to one address, holds each slot
for the connection's lifetime, and never reuses HTTP/1.1 server connections for HTTP/2
clients (it closes each after its response). So the server listens on several ports and
spreads an HTTP/2 client's concurrent responses over them, opening another port when a client
connection has filled one. (Closing from this side as well races mitmproxy's own close and
leaves sockets in CLOSE_WAIT.)

mitmproxy opens its connections with ``asyncio.open_connection``, that is through the event
loop's ``create_connection``. The server wraps that method on its own loop (the instance, not
the class: ``compat.divert_connections``) so that a connection to one of its listeners from
inside this process is an in-memory pair (``pipes``) instead of loopback TCP: no file
descriptors, no connect or accept, no system calls per chunk. Every other connection goes to
the loop's own method untouched, and where the wrap is impossible (another loop type, or a
mitmproxy that compat does not recognise) the listeners serve over TCP as before.

The listeners accept only what mitmproxy sends them: a request head for ``/handoff/<token>``
with no body. Anything else gets a 400 and the connection is closed; a body is never read.
"""

import asyncio
import http
import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from . import compat, pipes
from .connections import Delivery
from .errors import error_body, sse_error_event
from .upstream import UpstreamError

log = logging.getLogger(__name__)

PER_PORT = 4  # below mitmproxy's limit of 5, so a slot freed late never stalls a request
MAX_PORTS = 64
CLAIM_TIMEOUT = 30.0  # a parked response nobody fetched is dropped after this
IDLE_TIMEOUT = 30.0  # a connection that sends no complete request head within this is closed
UPLOAD_TIMEOUT = 600.0  # after an answer given from the request head (mitmproxy's tcp_timeout)
LINGER = 2.0  # after refusing a request: seconds to drain (and drop) what the peer still sends
_MAX_HEAD = 64 * 1024

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(
    rf"({_TCHAR}+) (?:http://[^/\s]+)?/handoff/([A-Za-z0-9_-]{{1,128}}) HTTP/1\.[01]")
_TOKEN = re.compile(rf"{_TCHAR}+")
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(eq=False)
class Parked:
    """A response waiting for mitmproxy to fetch it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # end-to-end headers, without framing headers
    body: AsyncGenerator[bytes, None]  # the rest of the body, raw; aclose() runs its clean-up
    close: Callable[[], object]  # aborts the upstream response (what it returns is ignored)
    length: int | None = None  # known body length, else sent chunked
    event_stream: bool = False  # end a failed SSE body with an `event: error`
    client: str = ""
    port: int = 0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    delivery: Delivery | None = None  # told when the client stops and starts reading again
    # An answer given from the request head while the client may still be uploading a body
    # that mitmproxy drops: the connection must outlive the upload, not the idle timeout.
    keep_open: bool = False
    # An answer not made yet (see HandoffServer.pending): the listener waits for this future,
    # which the router resolves with the Parked to serve.
    answer: "asyncio.Future[Parked] | None" = field(default=None, repr=False)


class HandoffServer:
    """Loopback HTTP/1.1 listeners serving parked responses by token."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._servers: list[asyncio.Server] = []
        self._ports: list[int] = []
        self._parked: dict[str, Parked] = {}
        self._inflight: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._grow_lock = asyncio.Lock()
        self._wrapped: asyncio.AbstractEventLoop | None = None
        self._wrapper: Callable[[], None] | None = None

    async def _listen(self) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), self.host, 0)
        port = server.sockets[0].getsockname()[1]
        self._servers.append(server)
        self._ports.append(port)
        self._wrap(loop)
        return port

    def _wrap(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve this process's own connections to the listeners in memory (see above)."""
        if self._wrapped is loop:
            return
        undo = compat.divert_connections(
            loop, self.host, self._ports,
            lambda protocol_factory, port: self._connect_in_memory(loop, protocol_factory, port))
        if undo is None:  # (compat: another loop type, or a mitmproxy that connects otherwise)
            log.info("handoff: in-memory connections unavailable here; serving over loopback TCP")
        self._wrapper = undo
        self._wrapped = loop

    def _connect_in_memory(self, loop, protocol_factory, port: int):
        client = protocol_factory()
        here, there = (self.host, port), (self.host, 0)
        transport, _ = pipes.pair(loop, client, _Connection(self),
                                  {"peername": here, "sockname": there},
                                  {"peername": there, "sockname": here})
        return transport, client

    def _unwrap(self) -> None:
        undo, self._wrapped, self._wrapper = self._wrapper, None, None
        if undo is not None:
            undo()  # the loop's own method again (unless wrapped since)

    async def _port_for(self, client: str, multiplexed: bool) -> int:
        if not multiplexed:  # HTTP/1.1 clients send one request at a time per connection
            return self._ports[0] if self._ports else await self._listen()
        async with self._grow_lock:
            for port in self._ports:
                if self._inflight[(client, port)] < PER_PORT:
                    return port
            if len(self._ports) >= MAX_PORTS:
                return min(self._ports, key=lambda p: self._inflight[(client, p)])
            return await self._listen()

    async def park(self, parked: Parked, multiplexed: bool) -> tuple[int, str]:
        """Park a response; return the loopback (port, path) mitmproxy must fetch it from."""
        parked.port = await self._port_for(parked.client, multiplexed)
        token = secrets.token_urlsafe(16)
        self._parked[token] = parked
        self._inflight[(parked.client, parked.port)] += 1
        parked.expiry = asyncio.get_running_loop().call_later(
            CLAIM_TIMEOUT, self._expire, token
        )
        return parked.port, f"/handoff/{token}"

    async def pending(self, client: str, multiplexed: bool) -> tuple[int, str, "asyncio.Future[Parked]"]:
        """Park an answer that is not made yet, for a request whose body the router reads as
        it streams through (mitmproxy sends the request head here at once, before the body).
        The listener that gets the head waits until the router resolves the future with the
        Parked to serve (``take`` one it parked for itself, or a new one)."""
        answer: asyncio.Future[Parked] = asyncio.get_running_loop().create_future()

        async def nothing() -> AsyncGenerator[bytes, None]:
            return
            yield b""

        parked = Parked(status=500, reason="", headers=[], body=nothing(), close=answer.cancel,
                        client=client, keep_open=True, answer=answer)
        port, path = await self.park(parked, multiplexed)
        return port, path, answer

    def take(self, path: str) -> Parked | None:
        """Take back a parked response unserved, to hand it to a pending answer."""
        parked = self._claim(path.rpartition("/")[2])
        if parked is not None:
            self.done(parked)
        return parked

    def discard(self, path: str) -> None:
        """The flow will never fetch it (the client went away): abort the upstream."""
        parked = self._claim(path.rpartition("/")[2])
        if parked:
            self._drop(parked)

    def _claim(self, token: str) -> Parked | None:
        parked = self._parked.pop(token, None)
        if parked and parked.expiry:
            parked.expiry.cancel()
        return parked

    def _expire(self, token: str) -> None:
        parked = self._parked.pop(token, None)
        if parked:
            log.warning("dropping a routed response nobody fetched within %ss", CLAIM_TIMEOUT)
            self._drop(parked)

    def _drop(self, parked: Parked) -> None:
        parked.close()
        self.done(parked)

    def done(self, parked: Parked) -> None:
        key = (parked.client, parked.port)
        self._inflight[key] -= 1
        if self._inflight[key] <= 0:
            del self._inflight[key]

    async def close(self) -> None:
        for token in list(self._parked):
            self._expire(token)
        self._unwrap()
        for server in self._servers:
            server.close()
        self._servers.clear()
        self._ports.clear()


class _Connection(asyncio.Protocol):
    """One loopback connection from mitmproxy: read request heads, serve parked responses.

    One task per connection serves its requests in order; it is cancelled when mitmproxy
    closes the connection (its client went away), which aborts the upstream at once.

    Only request heads are read: a request with a body, a malformed head or a path other than
    ``/handoff/<token>`` is answered 400 and the connection closed, the body never read. While
    a complete head waits to be served, reading pauses, so at most one pipelined head (and
    what arrived with it) is held. A connection that delivers no complete head within
    IDLE_TIMEOUT is closed.
    """

    transport: asyncio.Transport  # set by connection_made, before any other call

    def __init__(self, server: HandoffServer) -> None:
        self.server = server
        self.idle = IDLE_TIMEOUT
        self.buf = bytearray()
        self.task: asyncio.Task | None = None
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.paused = False  # reading paused: a complete head (or a full buffer) is waiting
        self.refused = False  # answered 400: what still arrives is dropped until the close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # draining before the close: never buffered
        scan_from = max(0, len(self.buf) - 3)
        self.buf += data
        if len(self.buf) > _MAX_HEAD or self.buf.find(b"\r\n\r\n", scan_from) >= 0:
            self._pause()
        self.readable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and len(self.buf) <= _MAX_HEAD and self.buf.find(b"\r\n\r\n") < 0:
            self.paused = False
            self.transport.resume_reading()

    async def _run(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + IDLE_TIMEOUT
            while not self.transport.is_closing():
                try:
                    request = self._take_request()
                except _BadRequest as e:
                    self._refuse(str(e))
                    return
                if request is None:
                    self.readable.clear()
                    try:
                        async with asyncio.timeout_at(deadline):
                            await self.readable.wait()
                    except TimeoutError:
                        self.transport.close()  # idle, or a head that never completes
                        return
                    continue
                self._resume()
                self.idle = IDLE_TIMEOUT
                if not await self._serve(*request):
                    self.transport.close()
                    return
                deadline = loop.time() + self.idle
        except asyncio.CancelledError:
            pass

    def _take_request(self) -> tuple[str, str] | None:
        """The next complete request head as (method, token), or None if it is not all here.
        Raises _BadRequest for anything mitmproxy would not send."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                raise _BadRequest("request head too large")
            return None
        if end > _MAX_HEAD:
            raise _BadRequest("request head too large")
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        line = _REQUEST_LINE.fullmatch(head[0])
        if line is None:
            raise _BadRequest("not a handoff request")
        # The fields are the client's, passed on by mitmproxy (which folds nothing and checks
        # little): only the framing is judged here, so an odd client header never costs a
        # response the upstream already answered.
        for field_line in head[1:]:
            if field_line[:1] in (" ", "\t"):
                continue  # a continuation of the previous field's value
            name, colon, value = field_line.partition(":")
            name, value = name.strip().lower(), value.strip(" \t")
            if not colon or not name:
                raise _BadRequest("malformed request header")
            if name == "transfer-encoding" or (
                    name == "content-length" and not (value.isdigit() and int(value) == 0)):
                raise _BadRequest("handoff requests carry no body")
        return line[1], line[2]

    def _refuse(self, message: str) -> None:
        """Answer 400 and close, without reading whatever body follows. The write side is
        shut at once; what the peer still sends is dropped for up to LINGER seconds, so the
        close does not reset the connection before the peer has read the answer."""
        self.refused = True
        self.buf.clear()
        body = error_body(400, f"handoff: {message}")
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            asyncio.get_running_loop().call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    async def _serve(self, method: str, token: str) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        parked = self.server._claim(token)
        if parked is None:
            self._write_gone()
            return True
        if parked.keep_open:
            self.idle = UPLOAD_TIMEOUT
        if (answer := parked.answer) is not None:  # made while the body streams through (see `pending`)
            pending = parked
            try:
                parked = await answer
            except asyncio.CancelledError:
                self.server.done(pending)
                self.transport.abort()  # (already gone, unless the answer itself was dropped)
                raise
            # It is served on the slot the pending answer holds.
            parked.client, parked.port = pending.client, pending.port
        try:
            await self._write_response(parked, head_only=method == "HEAD")
        except _Cut:
            self.transport.abort()  # a cut body must look cut, never complete
            return False
        except Exception:  # never let one broken response take the listener down
            log.exception("handoff failed")
            self.transport.abort()
            return False
        finally:
            parked.close()  # no-op after a complete body; aborts the upstream otherwise
            self.server.done(parked)
            try:
                await parked.body.aclose()  # runs the body's clean-up (stats, log line) now
            except Exception:  # noqa: BLE001 - clean-up must not take the connection down
                log.exception("handoff: closing a response body failed")
        return True

    def _write_gone(self) -> None:
        body = error_body(502, "the routed response expired before it was fetched")
        self.transport.write(
            b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def _write_response(self, p: Parked, head_only: bool) -> None:
        no_body = head_only or p.status in (204, 304) or 100 <= p.status < 200
        chunked = not no_body and p.length is None
        lines = [b"HTTP/1.1 %d %s" % (p.status, _reason(p.status, p.reason))]
        lines += [b"%s: %s" % field for field in _fields(p.headers)]
        if chunked:
            lines.append(b"transfer-encoding: chunked")
        elif p.length is not None:
            lines.append(b"content-length: %d" % p.length)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if no_body:
            return
        try:
            async for chunk in p.body:
                await self._send(chunk, chunked, p.delivery)
        except UpstreamError as e:
            if not (chunked and p.event_stream):
                raise _Cut from None
            # After content has flowed, end the stream with a proper error event.
            await self._send(sse_error_event(f"upstream failed mid-stream: {e.detail}"), True)
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def _send(self, chunk: bytes, chunked: bool, delivery: Delivery | None = None) -> None:
        if chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.transport.write(chunk)
        if not self.writable.is_set():
            # back-pressure: a slow client bounds our memory (and must not be blamed on the relay)
            if delivery is not None:
                delivery.pause(time.monotonic())
            await self.writable.wait()
            if delivery is not None:
                delivery.resume(time.monotonic())
        if self.transport.is_closing():
            raise asyncio.CancelledError


class _Cut(Exception):
    """The upstream body broke where the client cannot be told in-band."""


class _BadRequest(Exception):
    """A request the handoff listener does not serve (the message is safe to send back)."""


_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _reason(status: int, reason: str) -> bytes:
    """The reason phrase as sent: the upstream's if it is one line of latin-1, else the
    standard phrase for the status."""
    if reason and not _UNSAFE.search(reason):
        try:
            return reason.encode("latin-1")
        except UnicodeEncodeError:
            pass
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Status"


def _fields(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Header fields as sent. A field that could split or reframe the response (a CR, LF or
    NUL, a name that is not a token, a framing header: this side frames the body) is dropped;
    a value that is not latin-1 is sent with the odd characters replaced, never failing."""
    out = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or name.lower() in _FRAMING:
            continue
        if "\r" in value or "\n" in value or "\x00" in value:
            continue
        out.append((name.encode("ascii"), value.encode("latin-1", errors="replace")))
    return out
