"""A scripted raw HTTP/1.1 upstream for end-to-end tests: it answers with exact bytes.

The mock relay speaks well-formed HTTP through aiohttp; this one sends whatever a test scripts,
so a test can play a relay that misbehaves on the wire (odd reason phrases, odd header bytes,
deep JSON, compressed bodies it was not asked for, thousands of tiny writes).

It runs in background threads on a free loopback port. For each connection it reads a request
head and its body (content-length or chunked), records it as a `Recorded`, and answers with the
current script, which is one of:

* ``bytes``: written as they are;
* a list whose items are ``bytes`` (each written with its own ``sendall``, TCP_NODELAY on),
  numbers (a pause of that many seconds) or a ``threading.Event`` (wait until it is set; at
  most ``EVENT_TIMEOUT`` seconds, so a failing test cannot hang);
* a callable ``script(recorded) -> bytes | list``.

After the answer the connection is closed (``close=True``, the default) or kept open for the
next request. Helpers build the bytes: `response`, `head`, `chunk`, `LAST_CHUNK`, `sse`.

    def test_x(scripted, start_router, mock):
        scripted.answer(response(500, b"oops"))
        router = start_router([f"bad={scripted.url()}", f"good={mock.url('good')}"])
        ...
        assert scripted.requests[0].target == "/bad/v1/messages"
"""

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

EVENT_TIMEOUT = 15.0  # a script never waits longer than this on an Event
READ_TIMEOUT = 15.0  # nor on a request that does not come
MAX_HEAD = 1 << 20


@dataclass
class Recorded:
    """One request as it arrived on the wire."""

    method: str
    target: str  # as sent, decoded latin-1 (so any byte maps to one character)
    headers: list[tuple[bytes, bytes]]  # raw (name, value) pairs, in order
    body: bytes

    @property
    def raw_target(self) -> bytes:
        return self.target.encode("latin-1")

    def header(self, name: str) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        want = name.lower().encode()
        return next((v for k, v in self.headers if k.lower() == want), None)

    def header_values(self, name: str) -> list[bytes]:
        want = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == want]

    def json(self) -> Any:
        return json.loads(self.body)


Script = bytes | list | Callable[[Recorded], "bytes | list"]


class ScriptedUpstream:
    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.requests: list[Recorded] = []
        self.errors: list[BaseException] = []  # what went wrong in the server threads
        self._script: Script = response(500, b'{"type":"error","error":{"type":"api_error",'
                                             b'"message":"scripted upstream has no script"}}')
        self._close = True
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name=f"scripted:{self.port}", daemon=True)
        self._thread.start()

    def url(self, name: str = "bad") -> str:
        """The endpoint URL; the router appends the client's path (/bad/v1/messages)."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def answer(self, script: Script, close: bool = True) -> None:
        """Answer every following request with ``script``."""
        with self._lock:
            self._script, self._close = script, close

    # -- server ------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(READ_TIMEOUT)
        buf = bytearray()
        try:
            while not self._stopped:
                rec = _read_request(conn, buf)
                if rec is None:
                    return
                with self._lock:
                    self.requests.append(rec)
                    script, close = self._script, self._close
                if callable(script):
                    script = script(rec)
                self._play(conn, script)
                if close:
                    return
        except (OSError, TimeoutError):
            pass  # the router went away or reset: nothing to answer
        except BaseException as e:  # noqa: BLE001 - kept for the test to look at
            self.errors.append(e)
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _play(self, conn: socket.socket, script: bytes | list) -> None:
        if isinstance(script, (bytes, bytearray)):
            conn.sendall(script)
            return
        for item in script:
            if isinstance(item, (bytes, bytearray)):
                if item:
                    conn.sendall(item)
            elif isinstance(item, threading.Event):
                item.wait(EVENT_TIMEOUT)
            elif isinstance(item, (int, float)):
                time.sleep(item)
            else:
                raise TypeError(f"script item {item!r}: expected bytes, a pause or an Event")

    def close(self) -> None:
        self._stopped = True
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _read_request(conn: socket.socket, buf: bytearray) -> Recorded | None:
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            raise ValueError("request head too large")
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    lines = bytes(buf[:end]).split(b"\r\n")
    del buf[: end + 4]
    method, target, _ = (lines[0].split(b" ", 2) + [b"", b""])[:3]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    rec = Recorded(method.decode("latin-1"), target.decode("latin-1"), headers, b"")
    te = (rec.header("transfer-encoding") or b"").lower()
    if b"chunked" in te:
        rec.body = _read_chunked(conn, buf)
    else:
        n = int(rec.header("content-length") or b"0")
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("request body cut")
            buf += data
        rec.body = bytes(buf[:n])
        del buf[:n]
    return rec


def _read_chunked(conn: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()

    def need(n: int) -> None:
        while len(buf) < n:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("request body cut")
            buf.extend(data)  # in place: `buf += data` here would make buf local to need()

    while True:
        while (eol := buf.find(b"\r\n")) < 0:
            need(len(buf) + 1)
        size = int(bytes(buf[:eol]).split(b";")[0], 16)
        del buf[: eol + 2]
        if size == 0:
            while (eol := buf.find(b"\r\n")) != 0:  # trailers, then the blank line
                if eol < 0:
                    need(len(buf) + 1)
                else:
                    del buf[: eol + 2]
            del buf[:2]
            return bytes(body)
        need(size + 2)
        body += buf[:size]
        del buf[: size + 2]


# -- building answers --------------------------------------------------------------------------


def head(status: int, headers: list[tuple[bytes | str, bytes | str]] = (), reason: bytes | str = b"X") -> bytes:
    """A status line and headers, up to and including the blank line. Nothing is added."""
    def b(x):
        return x if isinstance(x, bytes) else x.encode("latin-1")
    out = b"HTTP/1.1 %d %s\r\n" % (status, b(reason))
    for k, v in headers:
        out += b(k) + b": " + b(v) + b"\r\n"
    return out + b"\r\n"


def response(status: int, body: bytes = b"", headers: list[tuple[bytes | str, bytes | str]] = (),
             reason: bytes | str = b"X", content_type: str | None = "application/json") -> bytes:
    """A complete answer with a content-length (and the content type unless None)."""
    fields = list(headers)
    if content_type is not None and not any(_lower(k) == b"content-type" for k, _ in fields):
        fields.insert(0, ("content-type", content_type))
    fields.append(("content-length", str(len(body))))
    return head(status, fields, reason) + body


def _lower(k: bytes | str) -> bytes:
    return (k if isinstance(k, bytes) else k.encode("latin-1")).lower()


def chunk(data: bytes) -> bytes:
    """One chunk of a ``transfer-encoding: chunked`` body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def sse(name: str, data: Any) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already bytes."""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    return b"event: " + name.encode() + b"\ndata: " + payload + b"\n\n"


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


@pytest.fixture
def scripted():
    """A `ScriptedUpstream` on a free loopback port, closed after the test."""
    server = ScriptedUpstream()
    yield server
    server.close()
