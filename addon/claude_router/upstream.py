"""Upstream HTTP: one pooled aiohttp session that sends a request to an endpoint and hands
back the response as soon as its headers arrive, body unread, so it can be streamed on.

Every wait is bounded: connecting, the response headers, and each read of the body.
Transport failures become `UpstreamError` with a short kind ("refused", "timeout", ...).
"""

import asyncio
import contextlib
import errno
import http
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from . import compat
from .endpoints import Endpoint

# Headers that belong to one connection, never forwarded (RFC 9110 7.6.1), plus the ones the
# HTTP client sets itself from the target and the body it sends.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_SET_BY_CLIENT = frozenset({"host", "content-length"})

log = logging.getLogger("claude_router")


def end_to_end(fields: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Filter hop-by-hop headers (and those a Connection header names) out of a header list."""
    fields = list(fields)
    named = {
        token.strip().lower()
        for name, value in fields
        if name.lower() == "connection"
        for token in value.split(",")
    }
    skip = HOP_BY_HOP | named | drop
    return [(k, v) for k, v in fields if k.lower() not in skip]


def request_headers(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return end_to_end(fields, _SET_BY_CLIENT)


class UpstreamError(Exception):
    """A request that got no usable HTTP answer. ``kind`` is short and safe to show."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Timeouts:
    connect: float  # TCP + TLS handshake
    headers: float  # from sending the request to the response headers (and between body reads)


class IdleWatch:
    """Bounds every wait for the next bytes of a body with one periodic sweep.

    aiohttp's own read timeout re-arms a timer for every chunk it receives: at a thousand
    streams that is tens of thousands of timers a second. Instead a body notes when it starts
    waiting and when the wait ends (two dictionary operations), and one task, awake only while
    some body waits, closes those that waited longer than their limit (give or take SWEEP).
    Time a body spends not reading (its client is slow) is not a wait on the upstream.
    """

    SWEEP = 0.25

    def __init__(self) -> None:
        self._waiting: dict[UpstreamResponse, float] = {}
        self._task: asyncio.Task | None = None

    def waiting(self, resp: "UpstreamResponse") -> None:
        loop = asyncio.get_running_loop()
        self._waiting[resp] = loop.time()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._sweep())

    def done(self, resp: "UpstreamResponse") -> None:
        self._waiting.pop(resp, None)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                await asyncio.sleep(self.SWEEP)
                now = loop.time()
                for resp, since in list(self._waiting.items()):
                    if now - since > resp.idle_timeout:
                        del self._waiting[resp]
                        try:
                            resp.expire()
                        except Exception:  # noqa: BLE001 - the sweep must outlive one body
                            log.exception("upstream: closing an idle body failed")
        finally:
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class UpstreamResponse:
    """A response whose headers have arrived and whose body has not been read yet."""

    def __init__(self, resp: aiohttp.ClientResponse, idle_timeout: float = 0.0,
                 watch: IdleWatch | None = None) -> None:
        self._resp = resp
        self.idle_timeout = idle_timeout
        self.timed_out = False
        self._watch = watch
        if watch is not None and not compat.disarm_read_timeout(resp):
            self._watch = None  # this aiohttp keeps its own per-read timeout (the same bound)
        self.status = resp.status
        self.reason = _reason(resp.status, resp.reason or "")
        # Framing headers go too: whoever passes the body on frames it again.
        self.headers: list[tuple[str, str]] = end_to_end(
            ((k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers),
            frozenset({"content-length"}),
        )

    def header(self, name: str) -> str | None:
        return self._resp.headers.get(name)

    @property
    def is_event_stream(self) -> bool:
        return (self.header("content-type") or "").lower().startswith("text/event-stream")

    @property
    def length(self) -> int | None:
        return self._resp.content_length

    async def chunks(self) -> AsyncIterator[bytes]:
        """The raw body as it arrives (content-encoding untouched)."""
        stream = self._resp.content
        watch = self._watch
        while True:
            try:
                if watch is None:  # aiohttp's sock_read timeout bounds each read
                    chunk = await stream.readany()
                else:
                    watch.waiting(self)
                    try:
                        chunk = await stream.readany()
                    finally:
                        watch.done(self)
            except (aiohttp.ClientError, OSError) as e:
                if self.timed_out:
                    raise UpstreamError(
                        "timeout", f"no data for {self.idle_timeout:g}s") from None
                raise _classify(e) from None
            if not chunk:
                return
            yield chunk

    def expire(self) -> None:
        """The idle watch gave up on this body: the pending read fails as a timeout."""
        self.timed_out = True
        self._resp.close()

    async def read(self, limit: int) -> tuple[bytes, bool]:
        """Read up to ``limit`` bytes of body; True when that was all of it."""
        buf = bytearray()
        async for chunk in self.chunks():
            buf += chunk
            if len(buf) > limit:
                return bytes(buf), False
        return bytes(buf), True

    def close(self) -> None:
        """Abort: the upstream connection is closed, not reused."""
        self._resp.close()



def _reason(status: int, reason: str) -> str:
    """The upstream's reason phrase if it is plain printable ASCII, else the standard one (a
    GBK relay's phrase arrives as undecodable bytes and could not be sent on)."""
    if reason.isascii() and reason.isprintable():
        return reason
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


# The router's own process or machine ran out of something it needs to open a connection: no
# endpoint is to blame, and the next one would most likely fail the same way ("local").
LOCAL_ERRNOS: dict[int | None, str] = {  # looked up by OSError.errno, which may be None
    errno.EMFILE: "file descriptors (raise `ulimit -n`)",
    errno.ENFILE: "file descriptors (the system's limit)",
    errno.ENOBUFS: "socket buffers",
    errno.ENOMEM: "memory",
}


def out_of_descriptors() -> UpstreamError | None:
    """Whether this process can open a socket now: a failed name lookup or a connect that
    failed several ways at once may hide a process out of descriptors (the resolver needs one
    too), which is not the endpoint's fault."""
    try:
        socket.socket().close()
    except OSError as e:
        if what := LOCAL_ERRNOS.get(e.errno):
            return UpstreamError("local", f"the router is out of {what}")
    return None


def _classify(e: BaseException) -> UpstreamError:
    """Turn an aiohttp/OS exception into a short, secret-free failure kind."""
    # (getattr: older aiohttp's certificate error has no os_error and raises on the property)
    os_error = getattr(e, "os_error", None) if isinstance(e, aiohttp.ClientConnectorError) else e
    if isinstance(os_error, OSError) and (what := LOCAL_ERRNOS.get(os_error.errno)):
        return UpstreamError("local", f"the router is out of {what}")
    if isinstance(e, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return UpstreamError("tls", "TLS handshake failed")
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return UpstreamError("dns", "host name did not resolve")
    if isinstance(e, aiohttp.ConnectionTimeoutError):
        return UpstreamError("timeout", "connect timed out")
    if isinstance(e, aiohttp.ClientConnectorError):
        if e.os_error.errno == errno.ECONNREFUSED:
            return UpstreamError("refused", "connection refused")
        return UpstreamError("connect", f"connect failed ({e.os_error.strerror or 'error'})")
    if isinstance(e, (aiohttp.ServerTimeoutError, TimeoutError)):
        return UpstreamError("timeout", "no data within the read timeout")
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)):
        return UpstreamError("reset", "connection closed before a complete answer")
    if isinstance(e, aiohttp.ClientResponseError):
        return UpstreamError("bad_response", "answer was not valid HTTP")
    return UpstreamError("error", type(e).__name__)


class Upstream:
    """The pooled HTTP client for every endpoint."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.idle_watch = IdleWatch()

    def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,  # bytes pass through exactly as the upstream sent them
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            # aiohttp quietly re-sends an idempotent request once when its connection fails;
            # the router decides about every attempt itself (and must count the failure).
            compat.no_connection_retry(self._session)
        return self._session

    async def send(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        """Send one attempt; return once the response headers are in."""
        session = self._ensure()
        # connect bounds pool wait + TCP + TLS; sock_read bounds the wait for headers and
        # every later read of the body.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=timeouts.connect, sock_read=timeouts.headers
        )
        try:
            async with asyncio.timeout(timeouts.connect + timeouts.headers):
                resp = await session.request(
                    method,
                    URL(endpoint.url_for(path), encoded=True),
                    headers=headers,
                    data=body if body or method not in ("GET", "HEAD") else None,
                    timeout=timeout,
                    allow_redirects=False,
                    read_until_eof=True,
                    proxy=None,
                )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamError("timeout", f"connect timed out after {timeouts.connect:g}s") from None
        except TimeoutError:
            raise UpstreamError("timeout", f"no response headers within {timeouts.headers:g}s") from None
        except (aiohttp.ClientError, OSError) as e:
            failure = _classify(e)
            if failure.kind in ("dns", "connect", "error"):
                failure = out_of_descriptors() or failure
            raise failure from None
        except (ValueError, TypeError, UnicodeError) as e:
            # aiohttp refused the request before sending it (a header it will not write):
            # no endpoint saw it, so none is to blame.
            raise UpstreamError("unsendable", f"the HTTP client refused it ({type(e).__name__})") from None
        except Exception as e:  # anything else: this attempt failed, cause unknown
            raise UpstreamError("error", f"request could not be sent ({type(e).__name__})") from None
        return UpstreamResponse(resp, timeouts.headers, self.idle_watch)

    async def close(self) -> None:
        await self.idle_watch.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
