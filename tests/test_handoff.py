"""The handoff listener: it serves parked responses to what mitmproxy sends (a body-less request
for /handoff/<token>) and refuses anything else at once, without reading or piling up what the
peer sends. Every test runs twice: over an in-memory connection (how mitmproxy in this process
reaches it) and over a real loopback socket (how any other local process does)."""

import asyncio
import json
import socket

import pytest

from claude_router import handoff
from claude_router.handoff import HandoffServer, Parked

EOF_WITHIN = 2.0  # seconds: "closes at once", with room for a loaded machine


@pytest.fixture(autouse=True, params=["memory", "tcp"])
def via(request, monkeypatch):
    monkeypatch.setattr(request.module, "VIA", request.param)
    return request.param


VIA = "memory"


@pytest.fixture
async def server():
    s = HandoffServer()
    yield s
    await s.close()


@pytest.fixture
def conns(monkeypatch):
    """Every _Connection the listeners create, to look at what they buffer."""
    made = []

    class Recording(handoff._Connection):
        def __init__(self, srv):
            super().__init__(srv)
            made.append(self)

    monkeypatch.setattr(handoff, "_Connection", Recording)
    return made


def parked(*chunks: bytes, status=200, reason="OK", headers=None, length=None, gate=None) -> Parked:
    async def body():
        for chunk in chunks:
            if gate is not None:
                await gate.wait()
            yield chunk

    p = Parked(status=status, reason=reason, headers=headers or [("content-type", "application/json")],
               body=body(), close=lambda: closed.append(True), length=length)
    closed: list[bool] = []
    p.closed = closed
    return p


async def connect(port: int):
    if VIA == "memory":
        return await asyncio.open_connection("127.0.0.1", port)
    sock = socket.socket()  # a socket of its own: the in-memory path never takes those
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def request(path: str, method: str = "POST", extra: str = "content-length: 0\r\n") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{extra}\r\n".encode()


async def read_to_eof(reader) -> bytes:
    return await asyncio.wait_for(reader.read(), EOF_WITHIN)


async def read_response(reader) -> tuple[bytes, bytes]:
    """One response with a content-length: (head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EOF_WITHIN)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await asyncio.wait_for(reader.readexactly(length), EOF_WITHIN)


def assert_400_and_closed(data: bytes) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in head
    err = json.loads(body)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    return err


# --- serving what mitmproxy sends ---

async def test_parked_response_with_length_is_served_byte_for_byte(server):
    port, path = await server.park(parked(b'{"a":', b'1}', length=7), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path))
    head, body = await read_response(reader)
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"
    assert body == b'{"a":1}'
    writer.close()


async def test_parked_response_without_length_is_chunked(server):
    p = parked(b"event: a\n\n", b"event: b\n\n", headers=[("content-type", "text/event-stream")])
    port, path = await server.park(p, multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path, method="GET", extra=""))  # no content-length at all: fine too
    data = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), EOF_WITHIN)
    assert data == (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    b"a\r\nevent: a\n\n\r\na\r\nevent: b\n\n\r\n0\r\n\r\n")
    assert p.closed
    writer.close()


async def test_absolute_form_request_line_is_served(server):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(f"http://127.0.0.1:{port}{path}"))
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"{}"
    writer.close()


async def test_odd_client_headers_passed_on_by_mitmproxy_are_served(server):
    """The fields are the client's; only the framing is judged, so the billed answer still goes out."""
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(f"POST {path} HTTP/1.1\r\n".encode() + b"x-folded: a\r\n b\r\nx-obs: caf\xe9\r\n"
                 b"x-ctl: a\x01b\r\nContent-Length : 00\r\n\r\n")
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"{}"
    writer.close()


async def test_unknown_token_gets_502_and_the_connection_stays_open(server):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request("/handoff/no-such-token"))
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"expired" in body
    writer.write(request(path))  # same connection
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"{}"
    writer.close()


# --- refusing anything else ---

async def test_request_with_a_body_is_refused_at_once_without_reading_it(server, conns):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path, extra="content-length: 100000000\r\n"))  # and never the body
    err = assert_400_and_closed(await read_to_eof(reader))
    assert "no body" in err["error"]["message"]
    assert all(len(c.buf) == 0 for c in conns)
    writer.close()
    # the refused request claimed nothing: the real fetch still gets the response
    reader, writer = await connect(port)
    writer.write(request(path))
    assert (await read_response(reader))[1] == b"{}"
    writer.close()


async def test_body_bytes_sent_after_a_refused_head_are_not_buffered(server, conns):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path, extra="content-length: 1000000\r\n") + b"x" * 1_000_000)
    assert_400_and_closed(await read_to_eof(reader))
    assert all(len(c.buf) == 0 for c in conns)
    writer.close()


@pytest.mark.parametrize("extra", ["transfer-encoding: chunked\r\n", "Transfer-Encoding: identity\r\n",
                                   "content-length: 5\r\n", "content-length: -1\r\n",
                                   "content-length: 0\r\ncontent-length: 7\r\n", "content-length: 1e3\r\n"])
async def test_any_body_framing_is_refused(server, extra):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path, extra=extra))
    assert_400_and_closed(await read_to_eof(reader))
    writer.close()


@pytest.mark.parametrize("head", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, say
    b"HELLO\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET /handoff/ HTTP/1.1\r\n\r\n",
    b"GET /handoff/abc/../x HTTP/1.1\r\n\r\n",
    b"GET /other/abc HTTP/1.1\r\n\r\n",
    b"GET /handoff/abc HTTP/2.0\r\n\r\n",
    b"GET  /handoff/abc HTTP/1.1\r\n\r\n",
    b"GET /handoff/abc?x=1 HTTP/1.1\r\n\r\n",
    b"GET /handoff/abc HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /handoff/abc HTTP/1.1\r\n: no name\r\n\r\n",
    b"GET /handoff/abc\nHTTP/1.1\r\n\r\n",
])
async def test_garbage_or_other_path_gets_400_and_close(server, head):
    port, _ = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(head)
    assert_400_and_closed(await read_to_eof(reader))
    writer.close()


async def test_oversized_head_gets_400_and_close(server, conns):
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(f"GET {path} HTTP/1.1\r\n".encode() + b"x-pad: " + b"a" * (handoff._MAX_HEAD + 10))
    assert_400_and_closed(await read_to_eof(reader))
    assert all(len(c.buf) == 0 for c in conns)
    writer.close()


async def test_silent_connection_is_closed_after_the_idle_timeout(server, monkeypatch):
    monkeypatch.setattr(handoff, "IDLE_TIMEOUT", 0.3)
    port, _ = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    assert await read_to_eof(reader) == b""
    writer.close()


async def test_head_that_never_completes_is_closed_after_the_idle_timeout(server, monkeypatch):
    monkeypatch.setattr(handoff, "IDLE_TIMEOUT", 0.5)
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    for piece in (b"GET ", path.encode(), b" HTTP/1.1\r\n"):  # trickled, never finished
        writer.write(piece)
        await asyncio.sleep(0.1)
    assert await read_to_eof(reader) == b""
    writer.close()


async def test_idle_timeout_does_not_cut_a_response_being_served(server, monkeypatch):
    monkeypatch.setattr(handoff, "IDLE_TIMEOUT", 0.2)
    gate = asyncio.Event()
    port, path = await server.park(parked(b"{}", length=2, gate=gate), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path))
    await asyncio.sleep(0.5)  # longer than the idle timeout, while the body is awaited
    gate.set()
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"{}"
    writer.close()


async def test_bytes_sent_while_serving_are_not_piled_up(server, conns):
    gate = asyncio.Event()
    port, path = await server.park(parked(b"{}", length=2, gate=gate), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path))
    await asyncio.sleep(0.1)
    writer.write(b"y" * 4_000_000)  # not a head; more than any head may be
    await asyncio.sleep(0.5)
    (conn,) = conns
    assert len(conn.buf) <= handoff._MAX_HEAD + 256 * 1024  # at most one read past the limit
    gate.set()
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"{}"
    assert_400_and_closed(await read_to_eof(reader))  # then the too-large "head" is refused
    writer.close()


async def test_one_pipelined_head_waits_and_is_served_next(server, conns):
    gate = asyncio.Event()
    port, first = await server.park(parked(b"1", length=1, gate=gate), multiplexed=False)
    _, second = await server.park(parked(b"2", length=1), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(first) + request(second))
    await asyncio.sleep(0.1)
    (conn,) = conns
    assert conn.paused  # the second head waits; nothing more is read meanwhile
    gate.set()
    assert (await read_response(reader))[1] == b"1"
    assert (await read_response(reader))[1] == b"2"
    assert not conn.paused
    writer.close()


# --- writing what it cannot encode ---

async def fetch(server, p: Parked) -> bytes:
    port, path = await server.park(p, multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path))
    head, _ = await read_response(reader)
    writer.close()
    return head


async def test_non_latin1_reason_is_replaced_with_the_standard_phrase(server):
    head = await fetch(server, parked(b"{}", reason="Ça va ☃", length=2))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_undecodable_reason_from_the_upstream_is_replaced(server):
    head = await fetch(server, parked(b"{}", status=404, reason="Nope \udcff", length=2))  # surrogateescape
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")


async def test_reason_with_crlf_is_replaced(server):
    head = await fetch(server, parked(b"{}", status=201, reason="Created\r\nx-evil: 1", length=2))
    assert head.startswith(b"HTTP/1.1 201 Created\r\n") and b"x-evil" not in head


async def test_unknown_status_with_bad_reason_gets_status(server):
    head = await fetch(server, parked(b"{}", status=599, reason="\x00", length=2))
    assert head.startswith(b"HTTP/1.1 599 Status\r\n")


async def test_empty_reason_gets_the_standard_phrase(server):
    assert (await fetch(server, parked(b"{}", status=429, reason="", length=2))).startswith(
        b"HTTP/1.1 429 Too Many Requests\r\n")


async def test_latin1_reason_is_kept(server):
    head = await fetch(server, parked(b"{}", reason="Très bien", length=2))
    assert head.startswith("HTTP/1.1 200 Très bien\r\n".encode("latin-1"))


async def test_odd_headers_are_dropped_or_replaced_never_breaking_the_response(server):
    headers = [("x-ok", "fine"), ("x-split", "a\r\nx-evil: 1"), ("x-lf", "a\nb"), ("x-nul", "a\x00b"),
               ("bad name", "v"), ("x-evil\r\n", "v"), ("x-snow", "snow ☃ \udcff"),
               ("content-length", "999"), ("transfer-encoding", "chunked"), ("x-latin", "é")]
    head = await fetch(server, parked(b"{}", headers=headers, length=2))
    assert head == (b"HTTP/1.1 200 OK\r\nx-ok: fine\r\nx-snow: snow ? ?\r\nx-latin: \xe9\r\n"
                    b"content-length: 2\r\n\r\n")


async def test_each_variant_reaches_the_listener_its_own_way(server, conns, via):
    from claude_router import pipes
    port, path = await server.park(parked(b"{}", length=2), multiplexed=False)
    reader, writer = await connect(port)
    writer.write(request(path))
    assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EOF_WITHIN)
    assert isinstance(conns[0].transport, pipes.End) == (via == "memory")
    writer.close()
