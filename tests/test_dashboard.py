"""The dashboard's pure parts: what it reads from a ledger file, who may use Basic auth where,
which actions could come from another site, and how often it reads the ledger."""

import asyncio
import base64
import threading
import types

import pytest

from claude_router import access, dashboard, ledger, ledger_views

NOW = 1_800_000_000.0  # a minute boundary: 30_000_000 minutes


def write(path, rows) -> None:
    book = ledger.Ledger(str(path), clock=lambda: NOW)
    for row in rows:
        book.add(row)
    book.flush()
    book.close()


def row(t, endpoint, attempts, cost=0.0, status=200, client="alice", **kw) -> ledger.Row:
    return ledger.Row(t, client, None, "m", endpoint, attempts, status, cost_usd=cost, **kw)


@pytest.mark.parametrize("attempts, answered, failed", [
    ("aws:200", "aws", []),
    ("aws:529, droid:200", "droid", ["aws"]),
    ("aws:refused, aws:timeout, droid:200", "droid", ["aws", "aws"]),
    ("aws:529, droid:529", None, ["aws", "droid"]),
    ("", None, []),
])
def test_failed_attempts_are_those_that_did_not_answer(attempts, answered, failed):
    assert ledger_views.failed_attempts(attempts, answered) == failed


def test_the_window_counts_per_minute_and_endpoint(tmp_path):
    path = tmp_path / "l.sqlite3"
    write(path, [
        row(NOW - 7200, "aws", "aws:200", 9.0),  # more than an hour ago: not counted
        row(NOW - 3540, "aws", "aws:200", 0.5, input_tokens=100, cache_read_tokens=300),  # the first minute
        row(NOW - 30, "droid", "aws:529, droid:200", 0.25),
        row(NOW - 20, None, "aws:529, droid:503", status=503),
        row(NOW - 10, None, "", status=429),  # refused before routing: nobody tried
        row(NOW + 5, "gone", "gone:200", 1.0),  # an endpoint no longer configured
    ])
    win = ledger_views.read(ledger_views.connect(str(path)), NOW + 5, ["aws", "droid"])
    assert win.minutes[-1] == NOW and len(win.minutes) == 60
    aws, droid = win.endpoints["aws"], win.endpoints["droid"]
    assert (aws.served, aws.failed, aws.spend_usd) == (1, 2, 0.5)
    assert (droid.served, droid.failed, droid.spend_usd) == (1, 1, 0.25)
    assert aws.requests[0] == 1 and aws.failures[-2] == 2 and droid.failures[-2] == 1
    assert droid.requests[-2] == 1 and droid.spend[-2] == 0.25
    assert aws.cache_read_ratio == 0.75 and droid.cache_read_ratio is None
    assert (win.requests, win.failovers, win.spend_usd) == (5, 2, 1.75)
    assert [r["endpoint"] for r in win.recent] == ["gone", None, None, "droid", "aws", "aws"]
    assert win.recent[0]["attempts"] == "gone:200" and set(win.recent[0]) == set(ledger_views.RECENT_FIELDS)


def test_no_file_yet_is_an_empty_window_and_creates_none(tmp_path):
    path = tmp_path / "none.sqlite3"
    assert ledger_views.connect(str(path)) is None
    win = ledger_views.read(None, NOW, ["aws"])
    assert win.endpoints["aws"].served == 0 and win.recent == []
    assert not path.exists()


def test_the_connection_is_read_only(tmp_path):
    path = tmp_path / "l.sqlite3"
    write(path, [row(NOW, "aws", "aws:200")])
    db = ledger_views.connect(str(path))
    with pytest.raises(ledger_views.sqlite3.OperationalError):
        db.execute("DELETE FROM requests")


def test_basic_auth_only_on_the_dashboards_paths():
    assert all(dashboard.uses_basic(p) for p in ("/_router/", "/_router/dashboard.json", "/_router/action",
                                                 "/_router/static/dashboard.js", "/_router/?x=1"))
    assert not any(dashboard.uses_basic(p) for p in ("/_router/status", "/_router/metrics", "/_router/usage",
                                                     "/v1/messages", "/", "/droid/v1/messages"))
    assert dashboard.challenge("/_router/") == [("www-authenticate", 'Basic realm="router"')]
    assert dashboard.challenge("/_router/dashboard.json") == [] and dashboard.challenge("/v1/messages") == []


def test_the_key_in_basic_auth_is_the_password():
    def auth(raw: bytes) -> dict:
        return {"authorization": "Basic " + base64.b64encode(raw).decode()}

    assert access.presented_key(auth(b"admin:sk-1"), basic=True) == b"sk-1"
    assert access.presented_key(auth(b":sk-1:x"), basic=True) == b"sk-1:x"
    assert access.presented_key(auth(b"sk-1"), basic=True) == b""  # no colon: no password
    assert access.presented_key(auth(b"admin:sk-1")) == b""  # not where Basic is not taken
    assert access.presented_key({"authorization": "Basic !!"}, basic=True) == b""
    assert access.presented_key({"x-api-key": "sk-2"}, basic=True) == b"sk-2"


@pytest.mark.parametrize("headers, host, ok", [
    ({}, "api.anthropic.com", True),  # a script: no Origin
    ({"origin": "http://127.0.0.1:8080"}, "127.0.0.1:8080", True),
    ({"origin": "https://api.anthropic.com"}, "api.anthropic.com", True),
    ({"origin": "https://api.anthropic.com"}, "api.anthropic.com:443", True),
    ({"origin": "http://127.0.0.1:8080", "sec-fetch-site": "same-origin"}, "api.anthropic.com", True),
    ({"origin": "https://evil.example"}, "api.anthropic.com", False),
    ({"origin": "http://127.0.0.1:9999"}, "127.0.0.1:8080", False),
    ({"origin": "null"}, "127.0.0.1:8080", False),
    ({"origin": "ftp://127.0.0.1:8080"}, "127.0.0.1:8080", False),
    ({"sec-fetch-site": "cross-site"}, "127.0.0.1:8080", False),
    ({"sec-fetch-site": "same-site", "origin": "http://a.localhost"}, "a.localhost", False),
])
def test_actions_from_another_origin_are_refused(headers, host, ok):
    assert dashboard.same_origin(headers, host) is ok


async def test_the_ledger_is_read_at_most_once_a_second_whoever_asks(tmp_path, monkeypatch):
    path = tmp_path / "l.sqlite3"
    write(path, [row(NOW, "aws", "aws:200")])
    reads = []
    real = ledger_views.read
    monkeypatch.setattr(ledger_views, "read", lambda *a, **k: reads.append(1) or real(*a, **k))
    router = types.SimpleNamespace(ledger=types.SimpleNamespace(path=str(path)))
    board = dashboard.Dashboard(router)  # type: ignore[arg-type]
    wins = await asyncio.gather(*(board.window(NOW, ["aws"]) for _ in range(5)))
    assert len(reads) == 1 and all(w is wins[0] for w in wins)
    assert await board.window(NOW + 0.5, ["aws"]) is wins[0] and len(reads) == 1
    assert (await board.window(NOW + 1.5, ["aws"])).endpoints["aws"].served == 1 and len(reads) == 2
    board.close()


async def test_a_slow_ledger_read_does_not_hold_the_page(tmp_path, monkeypatch):
    path = tmp_path / "l.sqlite3"
    write(path, [row(NOW, "aws", "aws:200")])
    monkeypatch.setattr(dashboard, "READ_TIMEOUT", 0.2)
    release = threading.Event()

    def stuck(*a, **k):
        release.wait(10)
        raise ledger_views.sqlite3.OperationalError("interrupted")

    monkeypatch.setattr(ledger_views, "read", stuck)
    router = types.SimpleNamespace(ledger=types.SimpleNamespace(path=str(path)))
    board = dashboard.Dashboard(router)  # type: ignore[arg-type]
    assert await board.window(NOW, ["aws"]) is None  # nothing read yet: no figures
    assert board.read_failures == 1
    release.set()
    board.close()


async def test_a_stuck_ledger_read_is_not_joined_by_more_threads(tmp_path, monkeypatch):
    path = tmp_path / "l.sqlite3"
    write(path, [row(NOW, "aws", "aws:200")])
    real = ledger_views.read
    monkeypatch.setattr(dashboard, "READ_TIMEOUT", 0.1)
    release, reads = threading.Event(), []

    def first_stuck(*a, **k):
        reads.append(1)
        if len(reads) == 2:
            release.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(ledger_views, "read", first_stuck)
    router = types.SimpleNamespace(ledger=types.SimpleNamespace(path=str(path)))
    board = dashboard.Dashboard(router)  # type: ignore[arg-type]
    first = await board.window(NOW, ["aws"])
    assert first is not None
    for i in range(1, 6):  # polls while the second read is stuck: the last figures, no new thread
        assert await board.window(NOW + 2 * i, ["aws"]) is first
    assert len(reads) == 2
    release.set()
    async with asyncio.timeout(10):
        while board._pending is not None and not board._pending.done():
            await asyncio.sleep(0.01)
    assert await board.window(NOW + 20, ["aws"]) is not first and len(reads) == 3
    board.close()


@pytest.mark.parametrize("host, ok", [
    ("localhost", True), ("localhost:8080", True), ("127.0.0.1:8080", True), ("127.9.9.9", True),
    ("[::1]:8080", True), ("::1", True), ("LOCALHOST.", True),
    ("evil.example:8080", False), ("10.0.0.1:8080", False), ("localhost.evil.example", False),
    ("[::2]:8080", False), ("", False),
])
def test_loopback_names(host, ok):
    assert dashboard.loopback(host) is ok


@pytest.mark.parametrize("headers, host, ok", [
    ({}, "127.0.0.1:8080", True),  # a script on this machine
    ({"origin": "http://127.0.0.1:8080"}, "127.0.0.1:8080", True),
    ({"origin": "http://localhost:8080"}, None, True),  # reverse mode replaced the Host
    ({}, None, True),
    # A page that re-bound its own name to 127.0.0.1: same-origin to the browser.
    ({"origin": "http://evil.example:8080", "sec-fetch-site": "same-origin"}, "evil.example:8080", False),
    ({"origin": "http://evil.example:8080", "sec-fetch-site": "same-origin"}, None, False),
    ({}, "evil.example:8080", False),
    ({"origin": "null"}, "127.0.0.1:8080", False),
])
def test_without_keys_actions_need_a_loopback_name(headers, host, ok):
    assert dashboard.named_locally(headers, host) is ok


def keyless_router():
    return types.SimpleNamespace(admin_keys=(), client_keys=(), endpoints=[types.SimpleNamespace(name="aws")],
                                 store=types.SimpleNamespace(set_disabled=_noop), ledger=None)


async def _noop(*a, **k) -> None:
    return None


def action_flow(origin: str):
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import tflow
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
    f.request.method, f.request.path = "POST", "/_router/action"
    f.request.headers.update({"x-router-action": "1", "content-type": "application/json", "origin": origin,
                              "sec-fetch-site": "same-origin"})
    f.request.content = b'{"action": "disable", "endpoint": "aws"}'
    return f


@pytest.mark.parametrize("origin, code", [("http://evil.example:8080", 403), ("http://127.0.0.1:8080", 200)])
async def test_without_keys_a_rebound_page_cannot_act(origin, code):
    board = dashboard.Dashboard(keyless_router())  # type: ignore[arg-type]
    f = action_flow(origin)
    await board.serve(f, dashboard.ACTION, may_read=True, may_act=True)
    assert f.response is not None and f.response.status_code == code
    if code == 403:
        assert f.response.json()["type"] == "error" and "loopback" in f.response.json()["error"]["message"]


def test_closing_twice_and_closing_while_a_read_holds_the_connection_do_not_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(dashboard, "READ_TIMEOUT", 0.1)
    board = dashboard.Dashboard(types.SimpleNamespace(ledger=None))  # type: ignore[arg-type]
    with board._db_lock:  # (a read stuck in its thread)
        board.close()  # gives up after READ_TIMEOUT
    board.close()
    with pytest.raises(ledger_views.sqlite3.Error):
        board._read(str(tmp_path / "l.sqlite3"), NOW, ["aws"])  # closed: no new connection


def fake_router(status_doc: dict, ledger_path=None):
    async def status_document():
        return status_doc

    return types.SimpleNamespace(
        admin=types.SimpleNamespace(status_document=status_document), clock=lambda: NOW,
        ledger=None if ledger_path is None else types.SimpleNamespace(path=str(ledger_path)))


def endpoint_doc(name: str, index: int, **more) -> dict:
    return {"name": name, "index": index, "origin": "https://relay", "state": "healthy", "served": 7,
            "failures": 1, "cost_usd": 0.5, "cooldown_seconds_left": 0, "consecutive_failures": 0,
            "last_error": "", "cooling_for_keys": 0, **more}


async def test_the_document_shows_a_balance_where_the_status_has_one():
    doc = {"store": "memory", "endpoints": [
        endpoint_doc("aws", 0, balance_usd=12.5, balance_checked="2026-12-06T16:00:00Z"), endpoint_doc("droid", 1)]}
    out = await dashboard.Dashboard(fake_router(doc)).document()  # type: ignore[arg-type]
    aws, droid = out["endpoints"]
    assert (aws["balance_usd"], aws["balance_checked"]) == (12.5, "2026-12-06T16:00:00Z")
    assert "balance_usd" not in droid


async def test_without_a_ledger_the_document_has_this_process_figures_and_no_history():
    doc = {"store": "memory", "endpoints": [endpoint_doc("aws", 0)]}
    out = await dashboard.Dashboard(fake_router(doc)).document()  # type: ignore[arg-type]
    assert out["source"] == "off" and "chart" not in out and "requests" not in out
    aws = out["endpoints"][0]
    assert (aws["served"], aws["failed"], aws["spend_usd"]) == (7, 1, 0.5)


async def test_with_a_ledger_the_hour_comes_from_it(tmp_path):
    path = tmp_path / "l.sqlite3"
    write(path, [row(NOW - 5, "droid", "aws:529, droid:200", 0.25)])
    doc = {"store": "redis", "endpoints": [endpoint_doc("aws", 0), endpoint_doc("droid", 1)]}
    board = dashboard.Dashboard(fake_router(doc, path))  # type: ignore[arg-type]
    out = await board.document(may_act=True)
    board.close()
    aws, droid = out["endpoints"]
    assert out["source"] == "ledger" and out["can_act"] is True
    assert (aws["served"], aws["failed"], droid["served"], droid["spend_usd"]) == (0, 1, 1, 0.25)
    assert out["chart"]["failed"]["aws"][-2] == 1 and out["requests"][0]["attempts"] == "aws:529, droid:200"


async def test_the_routers_done_closes_the_dashboards_ledger_connection():
    from mitmproxy.test import taddons

    from claude_router.addon import Router
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, router_endpoints=["aws=http://127.0.0.1:1"])
        await r.done()
    assert r.admin.dashboard._closed
