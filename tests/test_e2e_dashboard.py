"""The live dashboard (issue 23) through a real mitmdump: the page in a real Chromium (Debian's,
driven by Playwright), who may read it and act from it, actions another site cannot forge, no
secret in anything it serves, regular mode through the proxy, and one view of two routers that
share a redis-server and a ledger file."""

import base64
import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from claude_router.cli import workers
from claude_router_dev.harness import start_mock, stop

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = "sk-admin-5d6e7f"
ALICE = "sk-alice-0a1b2c"
PLAIN = "sk-plain-8a9b0c"
AWS_KEY = "sk-aws-upstream-7f3a9c"
DROID_KEY = "sk-droid-upstream-1b2d4e"
SECRETS = (ADMIN, ALICE, PLAIN, AWS_KEY, DROID_KEY)
MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def _no_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (the dev extras: pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (Debian's chromium: apt-get install chromium; ./scripts/test installs it)"
    return ""


needs_browser = pytest.mark.skipif(bool(_no_browser()), reason=_no_browser() or "-")


def write_config(path: Path, aws_url: str, droid_url: str, admin: bool = True) -> Path:
    path.write_text(f"""
endpoints:
  - name: aws
    url: {aws_url}
    key: {AWS_KEY}
    price: {{input: 1000, output: 1000}}
  - name: droid
    url: {droid_url}
    key: {DROID_KEY}
    price: {{input: 2000, output: 2000}}
clients:
  - name: alice
    key: {ALICE}
    budget: {{usd: 5, per: day}}
client_keys: [{PLAIN}]
{f"admin_keys: [{ADMIN}]" if admin else ""}
""")
    return path


@pytest.fixture(scope="module")
def second_mock():
    relay = start_mock()  # droid's relay: a process of its own
    yield relay
    stop(relay.proc)


@pytest.fixture
def dash(mock, second_mock, start_router, tmp_path):
    """A router with two relays (aws cheap, droid next), admin keys, a named client and a
    ledger file."""
    second_mock.reset()
    cfg = write_config(tmp_path / "router.yaml", mock.url("aws"), second_mock.url("droid"))
    router = start_router([], options={"router_config": str(cfg),
                                       "router_ledger": str(tmp_path / "ledger.sqlite3")})
    router.wait_log("endpoints in price order")
    return router


def basic(key: str, user: str = "admin") -> dict:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


def get(router, path: str, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.get(f"{router.base}/_router/{path}", headers=headers or {}, timeout=10, **kw)


def act(router, action: str, endpoint: str, headers: dict | None = None, **kw) -> httpx.Response:
    base = router if isinstance(router, str) else router.base
    h = {"x-api-key": ADMIN, "x-router-action": "1", "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{base}/_router/action", headers={k: v for k, v in h.items() if v is not None},
                      content=json.dumps({"action": action, "endpoint": endpoint}), timeout=10, **kw)


def ask(router, key: str = ALICE) -> httpx.Response:
    return httpx.post(f"{router.base}/v1/messages", headers={"x-api-key": key}, json=MSG, timeout=30)


def status(router) -> dict:
    return get(router, "status", {"x-api-key": ADMIN}).json()


def until(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.1)


# -- in a real browser --------------------------------------------------------------------------

@needs_browser
def test_the_page_shows_the_router_live_and_an_admin_disables_an_endpoint(dash, mock):
    from playwright.sync_api import expect, sync_playwright

    origin = urlsplit(dash.base).netloc
    requested: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(http_credentials={"username": "admin", "password": ADMIN})
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # CSP too
            page.goto(f"{dash.base}/_router/")
            rows = page.locator("#endpoints tbody tr")
            expect(rows).to_have_count(2, timeout=15_000)
            expect(rows.nth(0)).to_contain_text("aws")
            expect(rows.nth(1)).to_contain_text("droid")
            expect(rows.nth(0).locator(".state")).to_have_text("healthy")
            page.evaluate("window.sameDocument = true")  # gone if the page were reloaded

            hostile = "<img src=http://127.0.0.2:9/x.png>"  # a client's text is shown, never run
            httpx.post(f"{dash.base}/v1/messages", headers={"x-api-key": ALICE}, json=MSG | {"model": hostile},
                       timeout=30)
            expect(page.locator("#requests tbody tr").first).to_contain_text(hostile, timeout=15_000)

            mock.fault("aws", status=529)  # the cheap relay fails, the next one answers
            assert ask(dash).headers["x-router-attempts"] == "aws:529, droid:200"
            first = page.locator("#requests tbody tr").first
            expect(first).to_contain_text("aws:529, droid:200", timeout=15_000)
            expect(first).to_contain_text("alice")
            expect(page.locator("#chart-failed-total")).to_have_text("aws 1", timeout=15_000)
            expect(page.locator("#chart-requests-total")).to_have_text("aws 1, droid 1", timeout=15_000)
            expect(page.locator("#chart-totals")).to_have_attribute("data-failovers", "1")
            expect(page.locator("#chart-failed canvas")).to_have_count(1)
            expect(page.locator("#clients tbody tr[data-client=alice]")).to_contain_text("5.0000")
            assert page.evaluate("window.sameDocument") is True

            page.locator("button[data-action=disable][data-endpoint=droid]").click()
            expect(rows.nth(1).locator(".state")).to_have_text("disabled", timeout=15_000)
            assert status(dash)["endpoints"][1]["state"] == "disabled"
            expect(page.locator("button[data-action=enable][data-endpoint=droid]")).to_have_count(1)
            expect(page.locator("#problem")).to_be_hidden()
        finally:
            browser.close()
    assert requested and all(urlsplit(u).netloc == origin for u in requested), requested
    assert not errors


@pytest.mark.skipif(not os.environ.get("DASHBOARD_SCREENSHOT"), reason="set DASHBOARD_SCREENSHOT=PATH.png")
@needs_browser
def test_screenshot_for_the_docs(dash, mock):
    """DASHBOARD_SCREENSHOT=docs/dashboard.png pytest tests/test_e2e_dashboard.py -k screenshot"""
    from playwright.sync_api import expect, sync_playwright

    from claude_router import ledger

    db = ledger.connect(str(dash.confdir.parent / "ledger.sqlite3"))  # an hour of traffic before
    now = time.time()
    rows = []
    for i in range(360):
        t = now - 3600 + i * 10
        failover = (i // 30) % 4 == 1 and i % 3 == 0
        who = ("alice", "-", "alice", "bob")[i % 4]
        endpoint, attempts = ("droid", "aws:529, droid:200") if failover else ("aws", "aws:200")
        cost = (0.004 if endpoint == "aws" else 0.009) * (1 + i % 5)
        rows.append(ledger.Row(t, who, f"{i % 7:012x}", "claude-sonnet-4-5", endpoint, attempts, 200,
                               1200 + i, 300, 0, 4000 * (i % 3), cost).values())
    db.executemany(f"INSERT INTO requests ({', '.join(ledger.COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(ledger.COLUMNS))})", rows)
    db.close()
    mock.fault("aws", status=529)
    for _ in range(3):
        ask(dash)
    mock.fault("aws", status=200)
    for key in (ALICE, PLAIN, ALICE):
        ask(dash, key)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(http_credentials={"username": "admin", "password": ADMIN},
                                      viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.goto(f"{dash.base}/_router/")
        expect(page.locator("#requests tbody tr").first).to_contain_text("droid:200", timeout=15_000)
        page.wait_for_timeout(500)  # (the charts' last frame)
        page.screenshot(path=os.environ["DASHBOARD_SCREENSHOT"])
        browser.close()


# -- who may read it, who may act ----------------------------------------------------------------

def test_the_page_asks_a_browser_for_the_key(dash):
    r = get(dash, "")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="router"'
    wrong = get(dash, "", basic("sk-wrong"))
    assert wrong.status_code == 401 and "www-authenticate" in wrong.headers
    assert get(dash, "", basic(ADMIN)).status_code == 200
    assert get(dash, "", basic(ADMIN, user="")).status_code == 200  # any user name


def test_scripts_read_the_document_with_a_key_and_the_api_never_prompts(dash):
    assert get(dash, "dashboard.json", {"x-api-key": ADMIN}).json()["can_act"] is True
    assert get(dash, "dashboard.json", {"authorization": f"Bearer {ADMIN}"}).status_code == 200
    r = get(dash, "dashboard.json")
    assert r.status_code == 401 and "www-authenticate" not in r.headers  # only the page asks
    api = ask(dash, key="")
    assert api.status_code == 401 and "www-authenticate" not in api.headers


def test_a_client_key_cannot_read_the_dashboard(dash):
    for key in (ALICE, PLAIN):
        for path in ("", "dashboard.json", "static/dashboard.js"):
            r = get(dash, path, {"x-api-key": key})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert get(dash, "", basic(key)).status_code == 403
        assert act(dash, "disable", "aws", {"x-api-key": key}).status_code == 403
    assert status(dash)["endpoints"][0]["state"] == "healthy"


def test_basic_auth_is_for_the_dashboard_only_never_the_api(dash):
    """A browser sends a remembered password with any request to the router, a form of another
    site's page included: the API must not take it."""
    r = httpx.post(f"{dash.base}/v1/messages", headers=basic(ALICE), json=MSG, timeout=30)
    assert r.status_code == 401
    assert get(dash, "status", basic(ADMIN)).status_code == 401


def test_an_action_another_site_could_send_is_refused(dash):
    refused = [
        act(dash, "disable", "aws", {"x-router-action": None}),  # a plain form or fetch
        act(dash, "disable", "aws", {"content-type": "text/plain"}),  # a CORS "simple" request
        act(dash, "disable", "aws", {"origin": "https://evil.example"}),
        act(dash, "disable", "aws", {"origin": "null"}),
        act(dash, "disable", "aws", {"sec-fetch-site": "cross-site"}),
        act(dash, "disable", "aws", {"sec-fetch-site": "same-site", "origin": "http://other.localhost"}),
    ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert all("x-router-action" in r.json()["error"]["message"] for r in refused)
    assert httpx.get(f"{dash.base}/_router/action", headers={"x-api-key": ADMIN}, timeout=10).status_code == 405
    assert status(dash)["endpoints"][0]["state"] == "healthy"


def test_admin_actions_disable_enable_and_reset(dash, mock):
    same_origin = {"origin": dash.base, "sec-fetch-site": "same-origin"}  # as the page sends it
    assert act(dash, "disable", "aws", same_origin).json() == {"ok": True, "action": "disable", "endpoint": "aws"}
    assert status(dash)["endpoints"][0]["state"] == "disabled"
    assert ask(dash).headers["x-router-attempts"] == "droid:200"
    assert act(dash, "enable", "aws").status_code == 200
    mock.fault("aws", status=500)
    for _ in range(3):
        ask(dash)
    assert status(dash)["endpoints"][0]["state"] == "cooling"
    assert act(dash, "reset", "aws").status_code == 200
    assert status(dash)["endpoints"][0]["state"] == "healthy"
    assert act(dash, "drop", "aws").status_code == 400
    assert act(dash, "disable", "nope").status_code == 400


def test_nothing_it_serves_holds_a_secret(dash, mock):
    mock.fault("aws", status=401, message=f"invalid x-api-key {AWS_KEY}")
    ask(dash)
    ask(dash, PLAIN)
    until(lambda: get(dash, "dashboard.json", {"x-api-key": ADMIN}).json()["requests"], what="ledger rows")
    served = [get(dash, path, {"x-api-key": ADMIN}).text
              for path in ("", "dashboard.json", "static/dashboard.js", "static/dashboard.html")]
    for text in served:
        assert not any(secret in text for secret in SECRETS)
    doc = json.loads(served[1])
    assert "401" in doc["endpoints"][0]["last_error"]  # the relay's refusal is shown, not its echo


def test_without_admin_keys_it_follows_the_status_rule(mock, start_router, tmp_path):
    cfg = write_config(tmp_path / "router.yaml", mock.url("aws"), mock.url("droid"), admin=False)
    router = start_router([], options={"router_config": str(cfg)})
    router.wait_log("endpoints in price order")
    doc = get(router, "dashboard.json", {"x-api-key": PLAIN}).json()
    assert [e["name"] for e in doc["endpoints"]] == ["aws", "droid"] and doc["can_act"] is False
    assert act(router, "disable", "aws", {"x-api-key": PLAIN}).status_code == 403  # reading only
    open_router = start_router([f"aws={mock.url('aws')}"])  # no keys at all: on loopback only
    assert get(open_router, "dashboard.json").json()["can_act"] is True
    assert act(open_router, "disable", "aws", {"x-api-key": None}).status_code == 200


def test_without_any_key_a_page_that_rebinds_its_name_cannot_act(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}"])  # no keys at all: on loopback only
    rebound = {"x-api-key": None, "origin": "http://evil.example:8080", "sec-fetch-site": "same-origin"}
    refused = act(router, "disable", "aws", rebound)
    assert refused.status_code == 403 and "loopback" in refused.json()["error"]["message"]
    own = {"x-api-key": None, "origin": router.base, "sec-fetch-site": "same-origin"}  # the page itself
    assert act(router, "disable", "aws", own).status_code == 200


def test_the_page_and_its_files_come_from_the_router(dash):
    page = get(dash, "", basic(ADMIN))
    assert page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # every asset relative: no CDN
    for name in ("uPlot.iife.min.js", "uPlot.min.css", "dashboard.js", "dashboard.css"):
        r = get(dash, f"static/{name}", basic(ADMIN))
        assert r.status_code == 200 and len(r.content) > 500
        again = get(dash, f"static/{name}", basic(ADMIN) | {"if-none-match": r.headers["etag"]})
        assert again.status_code == 304
    for name in ("static/..%2fadmin.py", "static/dashboard.py", "static/uPlot.LICENSE"):
        assert get(dash, name, basic(ADMIN)).status_code in (400, 404)  # the listed files only


# -- where it is reached, and one view of several processes ----------------------------------------

def test_regular_mode_reaches_the_dashboard_through_the_proxy(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], mode="regular")
    with httpx.Client(proxy=router.base, timeout=10) as c:
        mock.fault("aws", status=529)
        c.post("http://api.anthropic.com/v1/messages", json=MSG)
        page = c.get("http://api.anthropic.com/_router/")
        assert page.status_code == 200 and "static/dashboard.js" in page.text
        doc = until(lambda: (d := c.get("http://api.anthropic.com/_router/dashboard.json").json())["requests"] and d,
                    what="the request in the document")
    assert [e["name"] for e in doc["endpoints"]] == ["aws", "droid"]
    assert doc["requests"][0]["attempts"] == "aws:529, droid:200"


def test_two_routers_on_one_redis_and_one_ledger_show_one_router(mock, start_router, redis_server, tmp_path):
    """As behind ./scripts/run --workers N: whichever process answers shows every process's
    requests, spend and failures (the shared ledger) and health (Redis)."""
    opts = {"router_redis_url": redis_server.url, "router_ledger": str(tmp_path / "shared.sqlite3")}
    a, b = (start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], options=opts)
            for _ in range(2))
    for r in (a, b):
        r.wait_log("(connected)")
    mock.fault("aws", status=529)
    ask(a), ask(a)
    mock.fault("aws", status=200)
    ask(b)

    def seen_by_both():
        docs = [get(r, "dashboard.json").json() for r in (a, b)]
        return docs if all(len(d["requests"]) == 3 for d in docs) else None

    for doc in until(seen_by_both, what="both routers show all three requests"):
        aws, droid = doc["endpoints"]
        assert (aws["served"], aws["failed"], droid["served"]) == (1, 2, 2)
        totals = doc["chart"]["totals"]
        assert (totals["requests"], totals["failovers"]) == (3, 2)
        assert sum(doc["chart"]["failed"]["aws"]) == 2
    assert act(a, "disable", "droid", {"x-api-key": None}).status_code == 200
    until(lambda: get(b, "dashboard.json").json()["endpoints"][1]["state"] == "disabled",
          what="B shows the endpoint A disabled")


@pytest.mark.skipif(shutil.which("haproxy") is None or shutil.which("redis-server") is None,
                    reason="haproxy and redis-server are needed (./scripts/test installs them as root)")
def test_behind_workers_whichever_worker_answers_shows_the_whole_router(mock, tmp_path):
    """./scripts/run --workers 2: requests served by each worker, and the page's document read
    through the balancer and from each worker, all show every request."""
    c = workers.start_cluster(2, [f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], tmp=tmp_path,
                              extra=["--set", f"confdir={tmp_path / 'conf'}"])
    try:
        mock.fault("aws", status=529)
        for url in c.worker_urls:  # each worker answers one failover
            assert httpx.post(f"{url}/v1/messages", json=MSG, timeout=30).headers["x-used-endpoint"] == "droid"

        def whole(url: str):
            doc = httpx.get(f"{url}/_router/dashboard.json", timeout=10).json()
            return doc if len(doc["requests"]) == 2 else None

        for url in (c.url, *c.worker_urls):
            doc = until(lambda url=url: whole(url), what=f"{url} shows both workers' requests")
            aws, droid = doc["endpoints"]
            assert (aws["failed"], droid["served"], doc["chart"]["totals"]["failovers"]) == (2, 2, 2)
        assert act(c.url, "disable", "aws", {"x-api-key": None}).status_code == 200
        for url in c.worker_urls:
            until(lambda url=url: httpx.get(f"{url}/_router/dashboard.json", timeout=10).json()
                  ["endpoints"][0]["state"] == "disabled", what=f"{url} shows aws disabled")
    finally:
        c.stop()
