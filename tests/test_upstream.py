"""The pooled upstream client against a raw loopback server: how a body's silences end."""

import asyncio
import errno
import os
import time

import pytest

from claude_router.endpoints import parse_endpoint
from claude_router.upstream import IdleWatch, Timeouts, Upstream, UpstreamError, _classify

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def serve(script):
    """A server that reads one request head, then runs ``script(writer)``."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        try:
            await script(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def send(port: int, idle: float):
    """A GET to the raw server through a new client; returns (client, response)."""
    up = Upstream()
    ep = parse_endpoint(f"a=http://127.0.0.1:{port}", 0)
    return up, await up.send(ep, "GET", "/", [], b"", Timeouts(connect=2, headers=idle))


async def body_of(port: int, idle: float) -> tuple[list[bytes], UpstreamError | None, float]:
    up, resp = await send(port, idle)
    got, err, t0 = [], None, time.monotonic()
    try:
        async for c in resp.chunks():
            got.append(c)
    except UpstreamError as e:
        err = e
    finally:
        resp.close()
        await up.close()
    return got, err, time.monotonic() - t0


@pytest.fixture(autouse=True)
def quick_sweep(monkeypatch):
    monkeypatch.setattr(IdleWatch, "SWEEP", 0.05)


async def test_a_body_silent_longer_than_the_limit_fails_as_a_timeout():
    async def script(w):
        w.write(HEAD + chunk(b"data: 1\n\n"))
        await asyncio.sleep(1.5)

    server, port = await serve(script)
    async with server:
        got, err, took = await body_of(port, idle=0.5)
    assert got == [b"data: 1\n\n"]
    assert err is not None and err.kind == "timeout"
    assert 0.4 < took < 2.0


async def test_gaps_shorter_than_the_limit_never_add_up_to_one():
    async def script(w):
        w.write(HEAD)
        for i in range(6):
            w.write(chunk(b"data: %d\n\n" % i))
            await asyncio.sleep(0.2)
        w.write(b"0\r\n\r\n")

    server, port = await serve(script)
    async with server:
        got, err, took = await body_of(port, idle=0.5)
    assert err is None and len(b"".join(got).split(b"\n\n")) == 7
    assert took > 1.0  # six gaps of 0.2 s: more than the limit in all


async def test_a_reader_that_pauses_is_not_an_upstream_silence():
    async def script(w):
        w.write(HEAD + chunk(b"data: 1\n\n"))
        await asyncio.sleep(0.1)
        w.write(chunk(b"data: 2\n\n") + b"0\r\n\r\n")

    server, port = await serve(script)
    async with server:
        up, resp = await send(port, idle=0.3)
        got = []
        async for c in resp.chunks():
            got.append(c)
            await asyncio.sleep(0.8)  # the client is slow: longer than the limit
        await up.close()
    assert b"".join(got) == b"data: 1\n\ndata: 2\n\n"


async def test_closing_the_client_stops_the_idle_sweep():
    async def script(w):
        w.write(HEAD + chunk(b"data: 1\n\n"))
        await asyncio.sleep(1.0)

    server, port = await serve(script)
    async with server:
        up, resp = await send(port, idle=5)
        body = resp.chunks()
        await body.__anext__()
        reading = asyncio.ensure_future(body.__anext__())  # waits: the sweep runs
        await asyncio.sleep(0.1)
        task = up.idle_watch._task
        assert task is not None and not task.done()
        reading.cancel()
        resp.close()
        await up.close()
        assert task.done()


def _connect_error(code: int) -> Exception:
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, OSError(code, os.strerror(code)))


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
def test_running_out_of_local_resources_is_the_routers_own_failure(code):
    e = _classify(_connect_error(code))
    assert e.kind == "local" and e.detail.startswith("the router is out of ")
    assert _classify(OSError(code, os.strerror(code))).kind == "local"  # unwrapped too


def test_a_refused_connection_is_still_the_endpoints():
    assert _classify(_connect_error(errno.ECONNREFUSED)).kind == "refused"


def test_a_certificate_error_is_a_tls_failure():
    import ssl

    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("127.0.0.1", 1, True, True, None, None, None)
    e = aiohttp.ClientConnectorCertificateError(key, ssl.SSLCertVerificationError("bad"))
    assert _classify(e).kind == "tls"


def test_a_failure_that_may_hide_exhaustion_is_checked_by_opening_a_socket(monkeypatch):
    import socket

    from claude_router import upstream

    assert upstream.out_of_descriptors() is None  # this process can open one

    def exhausted(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", exhausted)
    assert upstream.out_of_descriptors().kind == "local"


async def test_a_failed_lookup_is_the_routers_own_when_it_cannot_open_a_socket(monkeypatch):
    import socket

    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    async def lookup_fails(self, *a, **k):
        key = ConnectionKey("relay.example", 443, True, True, None, None, None)
        raise aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))

    monkeypatch.setattr(aiohttp.ClientSession, "request", lookup_fails)
    up = Upstream()
    ep = parse_endpoint("a=https://relay.example", 0)
    try:
        with pytest.raises(UpstreamError) as plain:
            await up.send(ep, "GET", "/", [], b"", Timeouts(connect=2, headers=2))
        assert plain.value.kind == "dns"  # descriptors to spare: the endpoint's name is bad

        def exhausted(*a, **k):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(socket, "socket", exhausted)
        with pytest.raises(UpstreamError) as hidden:
            await up.send(ep, "GET", "/", [], b"", Timeouts(connect=2, headers=2))
        assert hidden.value.kind == "local"
    finally:
        monkeypatch.undo()
        await up.close()
