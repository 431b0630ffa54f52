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
"""

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .errors import error_body, sse_error_event
from .upstream import UpstreamError

log = logging.getLogger(__name__)

PER_PORT = 4  # below mitmproxy's limit of 5, so a slot freed late never stalls a request
MAX_PORTS = 64
CLAIM_TIMEOUT = 30.0  # a parked response nobody fetched is dropped after this
_MAX_HEAD = 64 * 1024


@dataclass(eq=False)
class Parked:
    """A response waiting for mitmproxy to fetch it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]  # end-to-end headers, without framing headers
    body: AsyncIterator[bytes]  # the rest of the body, raw
    close: Callable[[], None]  # aborts the upstream response
    length: int | None = None  # known body length, else sent chunked
    event_stream: bool = False  # end a failed SSE body with an `event: error`
    client: str = ""
    port: int = 0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class HandoffServer:
    """Loopback HTTP/1.1 listeners serving parked responses by token."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._servers: list[asyncio.Server] = []
        self._ports: list[int] = []
        self._parked: dict[str, Parked] = {}
        self._inflight: defaultdict[tuple[str, int], int] = defaultdict(int)
        self._grow_lock = asyncio.Lock()

    async def _listen(self) -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), self.host, 0)
        port = server.sockets[0].getsockname()[1]
        self._servers.append(server)
        self._ports.append(port)
        return port

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
        for server in self._servers:
            server.close()
        self._servers.clear()
        self._ports.clear()


class _Connection(asyncio.Protocol):
    """One loopback connection from mitmproxy: read request heads, serve parked responses.

    One task per connection serves its requests in order; it is cancelled when mitmproxy
    closes the connection (its client went away), which aborts the upstream at once.
    """

    def __init__(self, server: HandoffServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.readable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def _run(self) -> None:
        try:
            while not self.transport.is_closing():
                request = self._take_request()
                if request is None:
                    self.readable.clear()
                    await self.readable.wait()
                    continue
                if not await self._serve(*request):
                    self.transport.close()
                    return
        except asyncio.CancelledError:
            pass

    def _take_request(self) -> tuple[str, str] | None:
        """The next complete request head (and its body, normally empty), or None."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self.transport.close()
            return None
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        body_len = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                body_len = int(value.strip()) if value.strip().isdigit() else 0
        if len(self.buf) < end + 4 + body_len:
            return None
        del self.buf[: end + 4 + body_len]
        method, _, rest = head[0].partition(" ")
        return method, rest.partition(" ")[0].rpartition("/")[2]

    async def _serve(self, method: str, token: str) -> bool:
        """Serve one request; False when the connection must close afterwards."""
        parked = self.server._claim(token)
        if parked is None:
            self._write_gone()
            return True
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
        lines = [f"HTTP/1.1 {p.status} {p.reason or 'Status'}"]
        lines += [f"{k}: {v}" for k, v in p.headers]
        if chunked:
            lines.append("transfer-encoding: chunked")
        elif p.length is not None:
            lines.append(f"content-length: {p.length}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if no_body:
            return
        try:
            async for chunk in p.body:
                await self._send(chunk, chunked)
        except UpstreamError as e:
            if not (chunked and p.event_stream):
                raise _Cut from None
            # After content has flowed, end the stream with a proper error event.
            await self._send(sse_error_event(f"upstream failed mid-stream: {e.detail}"), True)
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    async def _send(self, chunk: bytes, chunked: bool) -> None:
        if chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        else:
            self.transport.write(chunk)
        if not self.writable.is_set():
            await self.writable.wait()  # back-pressure: a slow client bounds our memory
        if self.transport.is_closing():
            raise asyncio.CancelledError


class _Cut(Exception):
    """The upstream body broke where the client cannot be told in-band."""
