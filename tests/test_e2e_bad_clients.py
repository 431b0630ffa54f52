"""Bad clients never poison an endpoint's health: requests that cannot be sent, the client's own
credentials, slow or vanishing readers, path tricks, oversized or unfinished requests, and
replays. A real mitmdump with the addon, the mock relay, and raw sockets, HTTP/2 (h2), httpx or
the anthropic SDK as the client.

"No blame" is checked the way a user would notice it: after the bad thing (repeated past the
failure threshold), a normal request is still served by the cheapest endpoint ("aws:200")."""

import json
import socket
import ssl
import time
from pathlib import Path

import anthropic
import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from claude_router_dev.harness import PeakRss
from conftest import launch_router, stop
from streams import STREAM_MSG
from test_e2e_operations import saved_flows

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
CLIENT_KEY = "s3cret-client-key"
AWS_KEY = "sk-aws-upstream-bc41"
DROID_KEY = "sk-droid-upstream-9e07"


def tiers(mock, *names: str) -> list[str]:
    return [f"{n}={mock.url(n)}" for n in names]


def attempts_of_a_normal_request(router, key: str = "k") -> str:
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": key}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-router-attempts"]


# -- raw HTTP/1.1 ------------------------------------------------------------------------------


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"RawResponse({self.status}, {self.headers}, {self.body[:300]!r})"


def _recv_until(sock: socket.socket, buf: bytearray, marker: bytes, deadline: float) -> int:
    while (i := buf.find(marker)) < 0:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}; got {bytes(buf[:300])!r}")
        buf += data
    return i


def read_response(sock: socket.socket, timeout: float = 10.0, buf: bytearray | None = None) -> RawResponse:
    """One HTTP/1.1 response (content-length, chunked or until close) from a raw socket."""
    deadline = time.monotonic() + timeout
    buf = bytearray() if buf is None else buf
    end = _recv_until(sock, buf, b"\r\n\r\n", deadline)
    head, rest = bytes(buf[:end]).decode("latin-1"), bytearray(buf[end + 4:])
    buf.clear()
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            rest += data
        buf += rest[n:]
        return RawResponse(status, headers, bytes(rest[:n]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            i = _recv_until(sock, rest, b"\r\n", deadline)
            size = int(bytes(rest[:i]).split(b";")[0], 16)
            del rest[:i + 2]
            while len(rest) < size + 2:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed inside a chunk")
                rest += data
            body += rest[:size]
            del rest[:size + 2]
            if size == 0:
                buf += rest
                return RawResponse(status, headers, bytes(body))
    while True:  # until the connection closes
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        if not data:
            return RawResponse(status, headers, bytes(rest))
        rest += data


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> RawResponse:
    """Send exact bytes (a request head without its blank line, then the body); read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        return read_response(s, timeout)


def raw_post(port: int, path: str = "/v1/messages", extra: bytes = b"", method: bytes = b"POST",
             body: dict | None = None) -> RawResponse:
    data = json.dumps(MSG if body is None else body).encode()
    head = (method + b" " + path.encode() + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\nx-api-key: k\r\n" + extra)
    return raw_request(port, head, data)


def assert_invalid_request(status: int, body: bytes) -> None:
    assert status == 400, body[:500]
    doc = json.loads(body)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error", doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"]


# -- HTTP/2 ------------------------------------------------------------------------------------


def h2_request(port: int, method: str, path: str, body: bytes = b"",
               timeout: float = 10.0) -> tuple[int | None, dict, bytes, str]:
    """One request on a TLS connection that offers only h2. Returns (status, headers, body,
    what ended it): status None when the router reset the stream or closed the connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                           server_hostname="localhost")
    try:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", method), (":path", path), (":scheme", "https"),
                              (":authority", "localhost"), ("content-type", "application/json"),
                              ("x-api-key", "k"), ("content-length", str(len(body)))],
                          end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, headers, data = None, {}, bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            raw = sock.recv(65536)
            if not raw:
                return status, headers, bytes(data), "connection closed"
            for ev in conn.receive_data(raw):
                if isinstance(ev, h2.events.ResponseReceived):
                    headers = {k.decode(): v.decode() for k, v in ev.headers}
                    status = int(headers[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    data += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, headers, bytes(data), "ended"
                elif isinstance(ev, h2.events.StreamReset):
                    return None, headers, bytes(data), f"stream reset ({ev.error_code!r})"
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return None, headers, bytes(data), f"connection terminated ({ev.error_code!r})"
            sock.sendall(conn.data_to_send())
        raise TimeoutError("no answer over HTTP/2")
    finally:
        sock.close()


# == 1. requests that cannot be sent =============================================================

UNSENDABLE = {
    "control byte in a header value": (b"POST", b"x-trace: a\x01b\r\n"),
    "obs-folded header": (b"POST", b"x-trace: first\r\n  continued\r\n"),
    "method with a non-token character": (b"P@ST", b""),
}


@pytest.mark.parametrize("case", list(UNSENDABLE))
def test_unsendable_request_gets_400_at_once_and_blames_nobody(mock, start_router, case):
    method, extra = UNSENDABLE[case]
    router = start_router(tiers(mock, "aws", "droid"))
    for _ in range(5):
        started = time.monotonic()
        r = raw_post(router.port, extra=extra, method=method)
        assert time.monotonic() - started < 3
        assert_invalid_request(r.status, r.body)
        assert "x-router-attempts" not in r.headers
    assert mock.count("aws") == 0 and mock.count("droid") == 0
    assert attempts_of_a_normal_request(router) == "aws:200"


def test_unsendable_method_over_http2_gets_400_and_blames_nobody(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    body = json.dumps(MSG).encode()
    for _ in range(5):
        status, headers, data, ended = h2_request(router.port, "P@ST", "/v1/messages", body)
        assert status is not None, f"no answer: {ended}"
        assert_invalid_request(status, data)
        assert "x-router-attempts" not in headers
    assert mock.count("aws") == 0 and mock.count("droid") == 0
    assert attempts_of_a_normal_request(router) == "aws:200"


# == 2. the client's own credentials =============================================================

CLIENT_CREDENTIAL_ERRORS = [
    (401, "authentication_error", {}),
    (403, "permission_error", {}),
    (429, "rate_limit_error", {"retry_after": 600}),
]


@pytest.mark.parametrize("status,etype,extra", CLIENT_CREDENTIAL_ERRORS,
                         ids=[str(s) for s, _, _ in CLIENT_CREDENTIAL_ERRORS])
def test_keyless_endpoint_rejecting_the_clients_key_fails_over_and_blames_nobody(
        mock, start_router, status, etype, extra):
    router = start_router(tiers(mock, "aws", "droid"))
    mock.fault("aws", status=status, key="client-own-key", **extra)
    client = anthropic.Anthropic(base_url=router.base, api_key="client-own-key", max_retries=0)
    raw = client.messages.with_raw_response.create(**MSG)
    assert raw.headers["x-router-attempts"] == f"aws:{status}, droid:200"
    for _ in range(4):  # aws is cooling for this key: droid at once
        assert client.messages.with_raw_response.create(**MSG).headers["x-router-attempts"] == "droid:200"
    assert mock.count("aws") == 1
    assert attempts_of_a_normal_request(router) == "aws:200"  # another key: aws, never cooled
    aws = httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"][0]
    assert (aws["state"], aws["failures"]) == ("healthy", 0)


@pytest.mark.parametrize("status,etype,extra", CLIENT_CREDENTIAL_ERRORS,
                         ids=[str(s) for s, _, _ in CLIENT_CREDENTIAL_ERRORS])
def test_a_key_every_keyless_endpoint_rejects_gets_the_last_answer_as_sent(
        mock, start_router, status, etype, extra):
    router = start_router(tiers(mock, "aws", "droid"))
    for name in ("aws", "droid"):
        mock.fault(name, status=status, key="client-own-key", **extra)
    client = anthropic.Anthropic(base_url=router.base, api_key="client-own-key", max_retries=0)
    for i in range(3):
        with pytest.raises(anthropic.APIStatusError) as exc:
            client.messages.create(**MSG)
        assert exc.value.status_code == status
        assert exc.value.body["error"]["type"] == etype
        if i == 0:
            assert exc.value.response.headers["x-router-attempts"] == f"aws:{status}, droid:{status}"
    assert (mock.count("aws"), mock.count("droid")) == (1, 1)  # then answered at once


def write_keyed_config(path: Path, mock) -> Path:
    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url('aws')}
    key: env:AWS_KEY
  - name: droid
    url: {mock.url('droid')}
    key: env:DROID_KEY
""")
    return path


@pytest.fixture
def keyed(mock, start_router, tmp_path):
    cfg = write_keyed_config(tmp_path / "router.yaml", mock)
    router = start_router([], options={"router_config": str(cfg)},
                          env={"AWS_KEY": AWS_KEY, "DROID_KEY": DROID_KEY})
    router.wait_log("endpoints in price order")
    return router


@pytest.mark.parametrize("status", [401, 402])
def test_keyed_endpoint_rejecting_its_own_key_fails_over_and_is_cooled(mock, keyed, status):
    mock.fault("aws", status=status)
    for _ in range(3):
        assert attempts_of_a_normal_request(keyed) == f"aws:{status}, droid:200"
    assert attempts_of_a_normal_request(keyed) == "droid:200"  # aws is cooling down


def test_keyed_endpoint_answering_permission_error_fails_over_without_blame(mock, keyed):
    mock.fault("aws", status=403)
    for _ in range(5):
        assert attempts_of_a_normal_request(keyed) == "aws:403, droid:200"
    mock.fault("aws")
    assert attempts_of_a_normal_request(keyed) == "aws:200"


# == 3. which timeout applies: the top-level "stream" field only =================================

TOOL_HISTORY = [
    {"role": "user", "content": "run the tool"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "run",
                                       "input": {"stream": True}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "ok"}]},
]


@pytest.fixture
def slow_aws_router(mock, start_router):
    mock.fault("aws", delay_ms=2500)
    return start_router(tiers(mock, "aws", "droid"),
                        options={"router_stream_timeout": 1, "router_headers_timeout": 30})


def test_stream_true_inside_a_tool_input_does_not_make_a_request_streaming(mock, slow_aws_router):
    body = json.dumps({"model": "mock-model", "max_tokens": 16, "messages": TOOL_HISTORY})
    assert '"stream": true' in body
    r = httpx.post(f"{slow_aws_router.base}/v1/messages", content=body,
                   headers={"content-type": "application/json", "x-api-key": "k"}, timeout=30)
    assert r.status_code == 200 and r.json()["type"] == "message"
    assert r.headers["x-router-attempts"] == "aws:200"  # the headers timeout (30 s) applied


def test_stream_true_after_a_megabyte_of_history_still_gets_the_stream_timeout(mock, slow_aws_router):
    mock.fault("droid", words=3)
    history = [{"role": "user", "content": "x " * (600 * 1024)},
               {"role": "assistant", "content": "ok"},
               {"role": "user", "content": "hi"}]
    body = json.dumps({"model": "mock-model", "max_tokens": 16, "messages": history, "stream": True})
    assert len(body) > 1 << 20 and body.rstrip("}").endswith('"stream": true')
    r = httpx.post(f"{slow_aws_router.base}/v1/messages", content=body,
                   headers={"content-type": "application/json", "x-api-key": "k"}, timeout=30)
    assert r.status_code == 200 and "event: message_stop" in r.text
    assert r.headers["x-router-attempts"] == "aws:timeout, droid:200"  # the 1 s stream timeout


# == 4. slow readers and failures after the stream started =======================================


def _pause_reading_a_long_stream(port: int, mock, pause_until_give_up: float = 15.0) -> str:
    """Start a long stream, read its headers, then stop reading until the mock relay gives up
    on its blocked writes; then read on to the end. Returns the mock's outcome for it."""
    data = json.dumps(STREAM_MSG).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # before connect: no autotuning
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"x-api-key: k\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                  % (len(data), data))
        buf = bytearray()
        _recv_until(s, buf, b"\r\n\r\n", time.monotonic() + 20)
        assert buf.startswith(b"HTTP/1.1 200"), bytes(buf[:300])
        deadline = time.monotonic() + pause_until_give_up
        outcome = "pending"
        while time.monotonic() < deadline:  # not reading: the relay's writes block
            outcome = mock.requests("aws")[-1]["outcome"]
            if outcome != "pending":
                break
            time.sleep(0.2)
        time.sleep(0.5)
        s.settimeout(30)
        while s.recv(1 << 20):  # the rest of what was buffered on the way, then the end
            pass
    except (ConnectionError, TimeoutError):
        pass
    finally:
        s.close()
    return outcome


def test_client_that_stops_reading_until_the_relay_gives_up_does_not_cool_it(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    mock.fault("aws", words=2000, event_bytes=32 * 1024, write_timeout_ms=2000)  # a 64 MB stream
    for _ in range(3):
        assert _pause_reading_a_long_stream(router.port, mock) == "write_timeout"
    time.sleep(0.3)  # (a blamed cut is recorded in the background: give it time to show)
    aws = httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"][0]
    # A stream's start is a success, so a blamed cut shows as one consecutive failure here.
    assert (aws["state"], aws["consecutive_failures"], aws["failures"]) == ("healthy", 0, 0), aws
    assert aws["client_stalls"] == 3  # each seen as its client's stall
    mock.fault("aws")
    assert attempts_of_a_normal_request(router) == "aws:200"


def test_failure_after_the_stream_started_shows_in_status(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"))
    mock.fault("aws", words=20, reset="mid_stream", reset_after_events=5)  # 2 words, then RST
    r = httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, headers={"x-api-key": "k"}, timeout=30)
    assert r.headers["x-router-attempts"] == "aws:200"
    assert "event: error" in r.text and "event: message_stop" not in r.text
    aws = httpx.get(f"{router.base}/_router/status", timeout=10).json()["endpoints"][0]
    assert aws["name"] == "aws"
    assert aws["failures"] >= 1 and aws["last_error"], aws


# == 5. a cancelled half-open probe ==============================================================


def test_client_cancelling_the_half_open_probe_releases_it_at_once(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"),
                          options={"router_cooldown": 1, "router_max_failures": 1})
    mock.fault("aws", status=500, times=1)
    assert attempts_of_a_normal_request(router) == "aws:500, droid:200"
    assert attempts_of_a_normal_request(router) == "droid:200"  # aws is cooling
    time.sleep(1.3)  # half-open now
    mock.fault("aws", delay_ms=5000)
    data = json.dumps(MSG).encode()
    with socket.create_connection(("127.0.0.1", router.port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"x-api-key: k\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
        deadline = time.monotonic() + 20
        while mock.count("aws") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mock.count("aws") == 2  # the probe reached aws
        time.sleep(0.3)
    left = time.monotonic()
    mock.fault("aws")
    # Released when the client left, not when aws would have answered (5 s after the probe).
    while not attempts_of_a_normal_request(router).startswith("aws:"):
        assert time.monotonic() - left < 3, "the probe was not released when its client left"
        time.sleep(0.05)


# == 6. paths stay under their endpoint ==========================================================

ESCAPING_PATHS = ["/../../admin/keys", "/%2e%2e/%2e%2e/admin", "/v1/../droid/v1/messages",
                  "/%2E%2e/x", "/v1/%2e/messages", "/v1%2fmessages", "/v1/messages%2F..%2F..%2Fadmin"]


@pytest.fixture(scope="module")
def path_router(tmp_path_factory, mock_session):
    router = launch_router(tmp_path_factory.mktemp("paths"), "p", tiers(mock_session, "aws", "droid"))
    yield router
    stop(router.proc)


@pytest.mark.parametrize("path", ESCAPING_PATHS)
def test_path_that_could_leave_its_endpoint_is_refused_over_http1(mock, path_router, path):
    r = raw_post(path_router.port, path=path)
    assert_invalid_request(r.status, r.body)
    assert mock.requests() == []


def test_path_that_could_leave_its_endpoint_is_refused_over_http2(mock, path_router):
    status, _, data, ended = h2_request(path_router.port, "POST", "/%2e%2e/%2e%2e/admin",
                                        json.dumps(MSG).encode())
    assert status is not None, f"no answer: {ended}"
    assert_invalid_request(status, data)
    assert mock.requests() == []


# == 7. resources before trust ===================================================================


@pytest.fixture
def locked_router(mock, start_router):
    return start_router(tiers(mock, "aws", "droid"), options={"router_client_keys": CLIENT_KEY})


def test_keyless_request_announcing_a_huge_body_is_answered_before_the_body(mock, locked_router):
    with socket.create_connection(("127.0.0.1", locked_router.port), timeout=10) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 268435456\r\n\r\n" + b'{"messages": [' + b"x" * 4096)
        started = time.monotonic()
        try:
            r = read_response(s, timeout=5)
        except TimeoutError:
            pytest.fail("no answer within 5 s: the router waits for the 256 MiB body")
        took = time.monotonic() - started
    assert r.status in (401, 413), r
    assert took < 3
    assert mock.count("aws") == 0 and mock.count("droid") == 0


def test_keyless_chunked_upload_of_64_mib_does_not_grow_the_router(mock, locked_router):
    """httpx (the SDK's transport) sends the whole body before it reads the answer, unless
    the connection fails first: the router must close it or take the body, not just stop."""
    piece = b"x" * (1 << 20)
    with PeakRss(locked_router.proc.pid) as rss:
        before = rss.peak
        try:
            r = httpx.post(f"{locked_router.base}/v1/messages", content=(piece for _ in range(64)),
                           headers={"content-type": "application/json"}, timeout=15)
        except httpx.TimeoutException as e:
            pytest.fail(f"the client never got an answer: {e!r}")
    print(f"\nrouter RSS {before:.1f} -> peak {rss.peak:.1f} MiB")
    assert r.status_code in (401, 413), r.text
    assert rss.peak - before < 100
    assert mock.count("aws") == 0 and mock.count("droid") == 0


def test_keyed_request_over_the_body_limit_gets_413(mock, locked_router):
    client = anthropic.Anthropic(base_url=locked_router.base, api_key=CLIENT_KEY, max_retries=0,
                                 timeout=20)
    with pytest.raises(anthropic.APIError) as exc:
        client.messages.create(**MSG, system="x" * (40 * 1000 * 1000))
    assert isinstance(exc.value, anthropic.APIStatusError), f"no answer: {exc.value!r}"
    assert exc.value.status_code == 413
    assert mock.count("aws") == 0 and mock.count("droid") == 0


# == 8. an unfinished request head ===============================================================


@pytest.fixture
def head_timeout_router(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid"), options={"router_head_timeout": 1})
    deadline = time.monotonic() + 10
    while "endpoints in price order" not in router.log():
        if router.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the router did not run with router_head_timeout:\n{router.log()[-1500:]}")
        time.sleep(0.05)
    yield router
    assert router.proc.poll() is None, "the router exited"


@pytest.mark.parametrize("opening", [b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n",
                                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],  # half a ClientHello
                         ids=["http", "tls"])
def test_connection_that_never_finishes_its_request_head_is_closed(head_timeout_router, opening):
    with socket.create_connection(("127.0.0.1", head_timeout_router.port)) as s:
        s.sendall(opening)
        started = time.monotonic()
        s.settimeout(10)
        try:
            while s.recv(65536):  # an answer (a 408, say) may come first; then the close
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the router kept a half-sent request head open for 10 s")
    print(f"\nclosed after {time.monotonic() - started:.1f} s")


def test_keep_alive_connection_sending_requests_promptly_is_not_cut(mock, head_timeout_router):
    data = json.dumps(MSG).encode()
    with socket.create_connection(("127.0.0.1", head_timeout_router.port), timeout=10) as s:
        buf = bytearray()
        for i in range(4):
            if i:
                time.sleep(0.7)  # idle between requests, under the head timeout each time
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"x-api-key: k\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
            r = read_response(s, timeout=10, buf=buf)
            assert r.status == 200 and r.headers["x-router-attempts"] == "aws:200", r


# == 9. saved flows and replays ==================================================================


def save_one_flow(mock, start_router, saved: Path) -> None:
    """One keyed request through a router that saves its flows; the router is stopped after."""
    router = start_router(tiers(mock, "aws", "droid"),
                          options={"router_client_keys": CLIENT_KEY, "save_stream_file": str(saved)})
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": CLIENT_KEY}, timeout=30)
    assert r.status_code == 200 and r.headers["x-router-attempts"] == "aws:200"
    assert len(saved_flows(saved, 1)) == 1
    stop(router.proc)
    assert saved.stat().st_size > 0, "no flow was saved"


def test_saved_flows_do_not_hold_the_client_key(mock, start_router, tmp_path):
    saved = tmp_path / "flows"
    save_one_flow(mock, start_router, saved)
    assert CLIENT_KEY.encode() not in saved.read_bytes()


def test_replayed_flow_reaches_the_endpoint_at_its_own_path(mock, start_router, tmp_path):
    saved = tmp_path / "flows"
    save_one_flow(mock, start_router, saved)
    mock.reset()
    replay = start_router(tiers(mock, "aws", "droid"), options={"client_replay": str(saved)})
    assert replay.proc.wait(30) == 0  # mitmdump exits once the replay is done
    records = mock.requests()
    # The saved request is replayed once, to /aws/v1/messages (not /aws/aws/v1/messages).
    assert [(r["endpoint"], r["path"]) for r in records] == [("aws", "/v1/messages")], (
        records, replay.log()[-2000:])


def test_a_replay_needs_no_client_key_and_a_refused_client_key_blames_nobody(mock, start_router, tmp_path):
    saved = tmp_path / "flows"
    save_one_flow(mock, start_router, saved)
    mock.reset()
    mock.fault("aws", status=401)  # keyless aws: it needed the client's key, which was redacted
    replay = start_router(tiers(mock, "aws", "droid"),
                          options={"client_replay": str(saved), "keepserving": "true",
                                   "router_client_keys": ["s3cret-client-key"]})
    deadline = time.monotonic() + 20
    while len(mock.requests()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Replayed without a key: aws refused it, and the request failed over to droid.
    assert [r["endpoint"] for r in mock.requests()] == ["aws", "droid"]
    assert "s3cret-client-key" not in json.dumps(mock.requests())
    aws = httpx.get(f"{replay.base}/_router/status", headers={"x-api-key": "s3cret-client-key"},
                    timeout=10).json()["endpoints"][0]
    assert (aws["state"], aws["failures"]) == ("healthy", 0)
