"""Issue 19, a second hostile review: edges a hostile or careless client can reach, each through a
real mitmdump with the addon, the mock relay, and raw sockets (or httpx) as the client.

- ``stream_large_bodies`` never sends a routed request past the router (to the reverse target);
- every request head (and the wait for the next one) has a deadline a dribble cannot reset;
- a keyed chunked upload is refused with a 413 as it crosses ``router_max_body_mb``, and an
  upload that never ends is bounded in time (``router_body_timeout``);
- without a key, HEAD answers the same for every path (no oracle for endpoint names).

Nothing here depends on a fixed sleep being long enough: every wait polls with a generous
deadline, and times are measured and printed, never asserted tightly."""

import hashlib
import json
import os
import select
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from claude_router_dev.harness import PeakRss, rss_mib

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
KEY = "hostile-edges-client-key"


def tiers(mock, *names: str) -> list[str]:
    return [f"{n}={mock.url(n)}" for n in names]


def wait_running(router, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while "endpoints in price order" not in router.log():
        if router.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the router did not run:\n{router.log()[-2000:]}")
        time.sleep(0.05)


def big_message(size: int) -> bytes:
    """A Messages request body of about ``size`` bytes."""
    return json.dumps({**MSG, "system": "x" * size}).encode()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Catcher:
    """A TCP listener that records every connection and byte it gets (it must get none)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    self.received += data
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


# -- raw HTTP/1.1 ------------------------------------------------------------------------------


def recv_head(sock: socket.socket, buf: bytearray, deadline: float) -> bytes:
    """The next response head (status line and fields, without the blank line)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a response head; got {bytes(buf[:300])!r}")
        buf += data
    head = bytes(buf[:end])
    del buf[: end + 4]
    return head


def fields_of(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out[name.strip().lower()] = value.strip()
    return out


def recv_body(sock: socket.socket, buf: bytearray, head: bytes, deadline: float) -> bytes:
    fields = fields_of(head)
    if "content-length" in fields:
        n = int(fields["content-length"])
        while len(buf) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed in the body")
            buf += data
        body = bytes(buf[:n])
        del buf[:n]
        return body
    assert fields.get("transfer-encoding") == "chunked", head
    body = bytearray()
    while True:
        while (i := buf.find(b"\r\n")) < 0:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            buf += sock.recv(65536)
        size = int(bytes(buf[:i]).split(b";")[0], 16)
        while len(buf) < i + 2 + size + 2:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            buf += sock.recv(65536)
        body += buf[i + 2: i + 2 + size]
        del buf[: i + 2 + size + 2]
        if size == 0:
            return bytes(body)


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def chunked_head(path: str = "/v1/messages", key: str | None = KEY) -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%stransfer-encoding: chunked\r\n\r\n"
            % (path.encode(), b"x-api-key: %s\r\n" % key.encode() if key else b""))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def wait_closed(sock: socket.socket, timeout: float, poke: bytes = b"") -> float:
    """Seconds until the peer closes ``sock``; sends ``poke`` (a byte of a dribble) every
    0.5 s meanwhile. Fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if poke:
                sock.sendall(poke)
            sock.settimeout(0.5)
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
    pytest.fail(f"the connection was still open after {timeout} s")


# == 2. stream_large_bodies never bypasses the router ===========================================


@pytest.fixture
def streaming_router(mock, start_router):
    """Reverse mode to a catcher (docs/operations.md's api.anthropic.com stand-in) that must get
    nothing, with mitmproxy's request streaming above 1 KB."""
    catcher = Catcher()
    router = start_router(tiers(mock, "aws", "droid"), mode="custom", options={
        "mode": f"reverse:http://127.0.0.1:{catcher.port}", "stream_large_bodies": "1k",
        "router_client_keys": KEY})
    wait_running(router)
    yield router, catcher
    catcher.close()


def assert_routed_whole(mock, body: bytes) -> None:
    records = mock.requests("aws")
    assert len(records) == 1, records
    assert records[0]["body_len"] == len(body)
    assert records[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


def assert_caught_nothing(catcher: Catcher) -> None:
    time.sleep(0.3)  # (a connection on its way would show; nothing here depends on it)
    assert catcher.connections == 0 and not catcher.received, bytes(catcher.received[:300])


def test_stream_large_bodies_content_length_request_is_routed_whole(mock, streaming_router):
    router, catcher = streaming_router
    body = big_message(6000)
    r = httpx.post(f"{router.base}/v1/messages", content=body, timeout=30,
                   headers={"x-api-key": KEY, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.headers["x-used-endpoint"] == "aws"
    assert r.json()["content"][0]["text"].startswith("Hello from aws")
    assert_routed_whole(mock, body)
    assert_caught_nothing(catcher)


def test_stream_large_bodies_chunked_request_is_routed_whole(mock, streaming_router):
    router, catcher = streaming_router
    body = big_message(20000)
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(chunked_head())
        for i in range(0, len(body), 700):
            s.sendall(chunk(body[i:i + 700]))
        s.sendall(b"0\r\n\r\n")
        buf = bytearray()
        deadline = time.monotonic() + 30
        head = recv_head(s, buf, deadline)
        answer = recv_body(s, buf, head, deadline)
    assert status_of(head) == 200, (head, answer[:300])
    assert fields_of(head)["x-used-endpoint"] == "aws"
    assert_routed_whole(mock, body)
    assert_caught_nothing(catcher)


def test_stream_large_bodies_streaming_answer_still_streams(mock, streaming_router):
    router, catcher = streaming_router
    body = json.dumps({**MSG, "stream": True, "system": "x" * 5000}).encode()
    with httpx.stream("POST", f"{router.base}/v1/messages", content=body, timeout=30,
                      headers={"x-api-key": KEY, "content-type": "application/json"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert "message_stop" in text
    assert_routed_whole(mock, body)
    assert_caught_nothing(catcher)


# == 6. every request head has a deadline =======================================================


@pytest.fixture
def head_router(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"), options={
        "router_head_timeout": 2, "router_client_keys": KEY})
    wait_running(router)
    yield router
    assert router.proc.poll() is None, "the router exited"


def test_dribbled_second_head_gets_the_connection_closed(head_router):
    with socket.create_connection(("127.0.0.1", head_router.port), timeout=10) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
        buf = bytearray()
        head = recv_head(s, buf, time.monotonic() + 10)
        assert status_of(head) == 200
        took = wait_closed(s, 30, poke=b"G")  # one byte of the next head every 0.5 s
    print(f"\ndribbled second head: closed after {took:.1f} s (router_head_timeout 2)")


def test_forty_dribbling_connections_are_all_closed(head_router):
    pid = head_router.proc.pid
    before = open_fds(pid)
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", head_router.port), timeout=10)
        s.sendall(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
        socks.append((s, bytearray()))
    for s, buf in socks:
        assert status_of(recv_head(s, buf, time.monotonic() + 20)) == 200
    during = open_fds(pid)
    started = time.monotonic()
    open_socks = [s for s, _ in socks]
    while open_socks:  # a byte every 0.5 s on every connection until the router closes it
        if time.monotonic() - started > 40:
            pytest.fail(f"{len(open_socks)} of 40 dribbling connections still open after 40 s")
        for s in list(open_socks):
            try:
                s.sendall(b"P")
                s.setblocking(False)
                if s.recv(65536) == b"":
                    open_socks.remove(s)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                open_socks.remove(s)
        time.sleep(0.5)
    took = time.monotonic() - started
    for s, _ in socks:
        s.close()
    deadline = time.monotonic() + 20
    while (after := open_fds(pid)) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"\n40 dribbling connections closed within {took:.1f} s; router fds {before} -> "
          f"{during} -> {after}")
    assert after <= before + 2


def test_keep_alive_connection_with_prompt_requests_outlives_the_head_timeout(mock, head_router):
    data = json.dumps(MSG).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", head_router.port), timeout=10) as s:
        buf = bytearray()
        for i in range(8):
            if i:
                time.sleep(0.5)  # idle between requests, well under the head timeout each time
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"x-api-key: %s\r\ncontent-length: %d\r\n\r\n%s" % (KEY.encode(), len(data), data))
            deadline = time.monotonic() + 20
            head = recv_head(s, buf, deadline)
            recv_body(s, buf, head, deadline)
            assert status_of(head) == 200 and fields_of(head)["x-router-attempts"] == "aws:200", head
    # The connection lived longer than one head timeout: each answer restarted it.
    assert time.monotonic() - started > 2


def test_slow_answer_and_slow_stream_are_not_cut(mock, head_router):
    """A request in flight (the endpoint takes 3 s) and a stream whose events come 0.5 s apart
    for longer than the head timeout are answered whole."""
    mock.fault("aws", delay_ms=3000, times=1)
    r = httpx.post(f"{head_router.base}/v1/messages", json=MSG, headers={"x-api-key": KEY}, timeout=30)
    assert r.status_code == 200 and r.headers["x-router-attempts"] == "aws:200", r.text
    mock.fault("aws", event_gap_ms=500, words=8, times=1)
    with httpx.stream("POST", f"{head_router.base}/v1/messages", json={**MSG, "stream": True},
                      headers={"x-api-key": KEY}, timeout=30) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert "message_stop" in text and "w8" in text


def test_slow_upload_under_the_body_timeout_is_not_cut(mock, head_router):
    """A chunked body that takes longer than the head timeout to arrive is routed."""
    body = big_message(3000)
    with socket.create_connection(("127.0.0.1", head_router.port), timeout=10) as s:
        s.sendall(chunked_head())
        step = len(body) // 8 + 1
        for i in range(0, len(body), step):
            s.sendall(chunk(body[i:i + step]))
            time.sleep(0.5)
        s.sendall(b"0\r\n\r\n")
        buf = bytearray()
        deadline = time.monotonic() + 30
        head = recv_head(s, buf, deadline)
        recv_body(s, buf, head, deadline)
    assert status_of(head) == 200, head
    assert_routed_whole(mock, body)


def test_regular_mode_passthrough_tunnel_is_not_cut(mock, start_router):
    """HTTPS_PROXY mode: a CONNECT to a host the router does not route is passed through
    untouched; it carries no request heads, so no head deadline applies to it."""
    router = start_router(tiers(mock, "aws", "droid"), mode="regular",
                          options={"router_head_timeout": 2})
    wait_running(router)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(router.confdir / "mitmproxy-ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    tls_port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(30)
            while data := tls.recv(65536):
                tls.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n\r\n" % (tls_port, tls_port))
        buf = bytearray()
        assert status_of(recv_head(s, buf, time.monotonic() + 10)) == 200
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
        with client_ctx.wrap_socket(s, server_hostname="passthrough.example") as tls:
            tls.sendall(b"one")
            assert tls.recv(100) == b"one"
            time.sleep(5)  # idle for more than two head timeouts: a tunnel has none
            tls.sendall(b"two")
            assert tls.recv(100) == b"two"
    listener.close()


# == 7. a chunked upload is refused as it crosses router_max_body_mb ============================


@pytest.fixture
def small_limit_router(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"), options={
        "router_max_body_mb": 2, "router_client_keys": KEY, "router_body_timeout": 6})
    wait_running(router)
    yield router
    assert router.proc.poll() is None, "the router exited"


def test_keyed_chunked_uploads_over_the_limit_get_413_as_they_cross_it(mock, small_limit_router):
    """Two keyed connections send 100 MiB of chunks each, without end: each gets a 413
    request_too_large (Anthropic shape) long before it has sent them, and the router's memory
    grows by about the limit, not by what was sent."""
    pid = small_limit_router.proc.pid
    piece = chunk(b"x" * 65536)
    total = 100 * 1024 * 1024
    results: dict[int, tuple] = {}

    def upload(n: int) -> None:
        with socket.create_connection(("127.0.0.1", small_limit_router.port), timeout=10) as s:
            s.sendall(chunked_head())
            sent, buf, head = 0, bytearray(), None
            while sent < total:
                s.sendall(piece)
                sent += 65536
                s.setblocking(False)
                try:
                    data = s.recv(65536)
                    if not data:
                        break
                    buf += data
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
                if head is None and b"\r\n\r\n" in buf:
                    head = recv_head(s, buf, time.monotonic() + 10)
                    body = recv_body(s, buf, head, time.monotonic() + 10)
                    results[n] = (head, body, sent)
            results.setdefault(n, (None, bytes(buf), sent))

    before = rss_mib(pid)
    with PeakRss(pid) as rss:
        threads = [threading.Thread(target=upload, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "an upload thread hung"
    for n in range(2):
        head, body, sent = results[n]
        assert head is not None, f"no answer while uploading: {body[:300]!r}"
        assert status_of(head) == 413, head
        err = json.loads(body)
        assert err["type"] == "error" and err["error"]["type"] == "request_too_large", err
        assert "router_max_body_mb" in err["error"]["message"]
        print(f"\nupload {n}: 413 after {sent / 2**20:.1f} MiB sent (limit 2 MB); "
              f"then it went on to {total / 2**20:.0f} MiB")
        assert sent < total  # answered as it crossed the limit, not once it was all sent
    print(f"router RSS {before:.1f} -> peak {rss.peak:.1f} MiB (+{rss.peak - before:.1f}) for 2 x 100 MiB")
    assert rss.peak - before < 2 * 2 * 1.05 + 25  # the limit per upload, plus some slack
    assert mock.count("aws") == 0 and mock.count("droid") == 0


def test_unfinished_upload_is_closed_at_the_body_timeout(mock, small_limit_router):
    """A keyed chunked upload under the limit that never ends: its connection is closed at
    router_body_timeout (6 s here), and what it sent is let go."""
    with socket.create_connection(("127.0.0.1", small_limit_router.port), timeout=10) as s:
        s.sendall(chunked_head())
        s.sendall(chunk(b"x" * 500_000))
        took = wait_closed(s, 40)
    print(f"\nunfinished upload closed after {took:.1f} s (router_body_timeout 6)")
    assert mock.count("aws") == 0


def test_chunked_upload_under_the_limit_is_routed_whole(mock, small_limit_router):
    body = big_message(1_500_000)
    with socket.create_connection(("127.0.0.1", small_limit_router.port), timeout=10) as s:
        s.sendall(chunked_head())
        for i in range(0, len(body), 50_000):
            s.sendall(chunk(body[i:i + 50_000]))
        s.sendall(b"0\r\n\r\n")
        buf = bytearray()
        deadline = time.monotonic() + 30
        head = recv_head(s, buf, deadline)
        recv_body(s, buf, head, deadline)
    assert status_of(head) == 200, head
    assert_routed_whole(mock, body)


def test_httpx_chunked_upload_under_the_limit_streams_its_answer(mock, small_limit_router):
    body = json.dumps({**MSG, "stream": True, "system": "y" * 300_000}).encode()
    pieces = (body[i:i + 10_000] for i in range(0, len(body), 10_000))
    with httpx.stream("POST", f"{small_limit_router.base}/v1/messages", content=pieces, timeout=30,
                      headers={"x-api-key": KEY, "content-type": "application/json"}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert "message_stop" in text
    assert_routed_whole(mock, body)


def h2_upload(port: int, body: bytes, total: int | None = None, timeout: float = 30.0
              ) -> tuple[int | None, bytes, int]:
    """A keyed POST over HTTP/2 (TLS, h2 only) with no content-length: ``body`` sent in DATA
    frames as flow control allows, repeated up to ``total`` bytes if given. Returns (status,
    response body, bytes sent when the response came)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                           server_hostname="localhost")
    total = len(body) if total is None else total
    try:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/v1/messages"), (":scheme", "https"),
                              (":authority", "localhost"), ("content-type", "application/json"),
                              ("x-api-key", KEY)])
        sock.sendall(conn.data_to_send())
        sent, status, at, data = 0, None, 0, bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sent < total and status is None:
                room = min(conn.local_flow_control_window(1), conn.max_outbound_frame_size)
                if room > 0:
                    n = min(room, total - sent)
                    piece = (body * (n // len(body) + 2))[sent % len(body): sent % len(body) + n]
                    sent += n
                    conn.send_data(1, piece, end_stream=sent >= total)
                    sock.sendall(conn.data_to_send())
                    if not (sock.pending() or select.select([sock], [], [], 0)[0]):
                        continue  # nothing to read yet: send on
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            raw = sock.recv(65536)
            if not raw:
                return status, bytes(data), at
            for ev in conn.receive_data(raw):
                if isinstance(ev, h2.events.ResponseReceived):
                    status, at = int(dict(ev.headers)[b":status"]), sent
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    data += ev.data
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, bytes(data), at
            sock.sendall(conn.data_to_send())
        raise TimeoutError("no answer over HTTP/2")
    finally:
        sock.close()


def test_http2_upload_without_content_length_is_routed_whole(mock, small_limit_router):
    body = big_message(300_000)
    status, answer, _ = h2_upload(small_limit_router.port, body)
    assert status == 200, answer[:300]
    assert_routed_whole(mock, body)


def test_http2_upload_without_content_length_over_the_limit_gets_413(mock, small_limit_router):
    status, answer, at = h2_upload(small_limit_router.port, b"x" * 65536, total=40 * 2**20)
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["type"] == "request_too_large"
    print(f"\nHTTP/2: 413 after {at / 2**20:.1f} MiB sent (limit 2 MB)")
    assert at < 40 * 2**20
    assert mock.count("aws") == 0


# == 8. no name oracle ===========================================================================


@pytest.fixture
def keyed_router(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"), options={"router_client_keys": KEY})
    wait_running(router)
    return router


def raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        buf = bytearray()
        deadline = time.monotonic() + 20
        head = recv_head(s, buf, deadline)
        if request.startswith(b"HEAD "):
            return head, b""
        return head, recv_body(s, buf, head, deadline)


def without_date(head: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:"))


PROBES = ["/aws", "/droid", "/nope", "/claude/aws", "/claude/nope", "/", "/api/hello", "/aws/api/hello",
          "/v1/messages", "/_router/status"]


def test_keyless_head_is_the_same_for_every_path(keyed_router):
    heads = {p: without_date(raw_exchange(keyed_router.port, b"HEAD %s HTTP/1.1\r\nhost: x\r\n\r\n"
                                          % p.encode())[0]) for p in PROBES}
    assert len(set(heads.values())) == 1, heads
    assert status_of(heads["/"]) == 200  # Claude Code's reachability check still passes
    print(f"\nevery key-less HEAD: {heads['/']!r}")


def test_keyless_head_with_a_wrong_key_is_the_same_too(keyed_router):
    heads = {without_date(raw_exchange(keyed_router.port, b"HEAD %s HTTP/1.1\r\nhost: x\r\n"
                                       b"x-api-key: wrong\r\n\r\n" % p.encode())[0]) for p in PROBES}
    assert len(heads) == 1 and status_of(next(iter(heads))) == 200, heads


@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_keyless_get_and_post_are_401_for_every_path(keyed_router, method):
    answers = set()
    for p in PROBES:
        extra = b"content-length: 2\r\n\r\n{}" if method == b"POST" else b"\r\n"
        head, body = raw_exchange(keyed_router.port, b"%s %s HTTP/1.1\r\nhost: x\r\n%s"
                                  % (method, p.encode(), extra))
        error = json.loads(body)
        error.pop("request_id", None)  # (one per answer)
        answers.add((without_date(head), json.dumps(error)))
    assert len(answers) == 1, answers
    head, body = answers.pop()
    assert status_of(head) == 401
    assert json.loads(body)["error"]["type"] == "authentication_error"


def test_keyed_head_of_a_base_url_is_still_answered_here(mock, keyed_router):
    r = httpx.head(f"{keyed_router.base}/aws", headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 200
    r = httpx.head(f"{keyed_router.base}/", headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 200
    assert mock.count("aws") == 0 and mock.count("droid") == 0
