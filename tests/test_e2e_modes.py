"""Regular (HTTPS_PROXY) mode, passthrough of other hosts, and what mitmweb shows."""

import datetime
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import closed_port_url, free_port
from streams import EVENTS, STREAM_MSG, timed_stream, timing
from test_e2e_streaming import assert_streamed

MSG = {"model": "mock-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def proxied_sdk(monkeypatch):
    """The SDK as a tool that ignores base URLs uses it: HTTPS_PROXY + the mitmproxy CA."""

    def make(router) -> anthropic.Anthropic:
        for var in ("NO_PROXY", "no_proxy", "ANTHROPIC_BASE_URL"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", router.base)
        monkeypatch.setenv("SSL_CERT_FILE", router.ca)
        return anthropic.Anthropic(api_key="k", max_retries=0)

    return make


def test_regular_mode_routes_api_host_with_failover(mock, start_router, proxied_sdk):
    mock.fault("aws", status=529)
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], mode="regular")
    raw = proxied_sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.parse().content[0].text.startswith("Hello from droid.")
    assert raw.headers["x-router-attempts"] == "aws:529, droid:200"


def test_regular_mode_streams_event_by_event(mock, start_router, proxied_sdk):
    mock.fault("aws", status=529)
    mock.fault("droid", event_gap_ms=300, words=3)
    router = start_router([f"aws={mock.url('aws')}", f"dead={closed_port_url()}",
                           f"droid={mock.url('droid')}"], mode="regular")
    types, times, headers = timed_stream(proxied_sdk(router))
    assert types == EVENTS and headers["x-used-endpoint"] == "droid"
    assert_streamed(timing(types, times))


def test_regular_mode_leaves_other_plain_http_hosts_untouched(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}"], mode="regular")
    r = httpx.get(f"{mock.base}/other/echo", proxy=router.base)
    assert r.status_code == 200 and "x-used-endpoint" not in r.headers
    assert r.json()["endpoint"] == "other"
    assert mock.count("aws") == 0


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on loopback with its own self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_pem, key_pem)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], str(cert_pem)
    server.shutdown()


def test_regular_mode_passes_other_tls_hosts_through_uninspected(mock, start_router, tls_server):
    port, cert = tls_server
    router = start_router([f"aws={mock.url('aws')}"], mode="regular")
    # Verifying against the server's own certificate proves mitmproxy did not intercept.
    r = httpx.get(f"https://localhost:{port}/", proxy=router.base, verify=ssl.create_default_context(cafile=cert))
    assert r.text == "hello"


def test_mitmweb_shows_real_upstream_url_attempts_and_streamed_body(mock, start_router):
    mock.fault("aws", status=529)
    web_port = free_port()
    router = start_router(
        [f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
        tool="mitmweb",
        options={"web_port": web_port, "web_password": "test-pass", "store_streamed_bodies": "true"},
    )
    httpx.post(f"{router.base}/v1/messages?beta=true", json=STREAM_MSG, headers={"x-api-key": "k"})
    httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": "k"})
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", params={"token": "test-pass"})
    flows = web.get("/flows").json()
    assert len(flows) == 2  # one flow per client request, no loopback hop flows
    for flow, path in zip(flows, ["/v1/messages?beta=true", "/v1/messages"]):
        req = flow["request"]
        assert f'{req["scheme"]}://{req["host"]}:{req["port"]}{req["path"]}' == mock.url("droid") + path
        assert flow["comment"] == "routed to droid (index 1); attempts: aws:529, droid:200"
        assert flow["response"]["status_code"] == 200
    streamed = web.get(f"/flows/{flows[0]['id']}/response/content.data").text
    assert "event: message_stop" in streamed
    sent = web.get(f"/flows/{flows[0]['id']}/request/content.data").json()
    assert sent["stream"] is True  # the request body shown is the one sent upstream
