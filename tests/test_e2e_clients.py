"""Named clients through a real mitmdump (issue 21): budgets, rpm and concurrency limits answered
429 in a shape the SDK (and Claude Code) handles, allow-lists with tier pinning, each client's
own usage, admins' status and metrics, and spend that survives a restart, a kill -9 and is
shared by two routers through a real redis-server."""

import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import anthropic
import httpx
import pytest

KEYS = {"alice": "sk-alice-0a1b2c", "bob": "sk-bob-3d4e5f", "carol": "sk-carol-6a7b8c",
        "dave": "sk-dave-9d0e1f", "erin": "sk-erin-2a3b4c"}
ADMIN = "sk-admin-5d6e7f"
PLAIN = "sk-plain-8a9b0c"
# 1,000 USD per million tokens: a small request costs a few cents.
PRICE = "{input: 1000, output: 1000}"
# The same costs, written apart (cache reads at the default 0.1 x input): droid is a price tier
# of its own, so requests go to aws first rather than being spread over both (see tiers).
DROID_PRICE = "{input: 1000, output: 1000, cache_read: 100}"


def write_config(path: Path, mock, alice_budget: float = 0.01, extra: str = "") -> Path:
    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
    price: {PRICE}
  - name: droid
    url: {mock.url("droid")}
    price: {DROID_PRICE}
clients:
  - name: alice
    key: {KEYS["alice"]}
    budget: {{usd: {alice_budget}, per: day}}
  - name: bob
    key: {KEYS["bob"]}
    budget: {{usd: 1000, per: month}}
  - name: carol
    key: {KEYS["carol"]}
    rpm: 2
  - name: dave
    key: {KEYS["dave"]}
    max_concurrency: 1
  - name: erin
    key: {KEYS["erin"]}
    endpoints: [droid]
client_keys: [{PLAIN}]
admin_keys: [{ADMIN}]
{extra}""")
    return path


def start(start_router, mock, tmp_path, name: str = "r", options: dict | None = None, **kw):
    path = tmp_path / f"{name}.yaml"
    if not path.exists():
        write_config(path, mock, **kw)
    return start_router([], options={"router_config": str(path), **(options or {})})


def sdk(router, who: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base, api_key=KEYS.get(who, who), max_retries=0,
                               timeout=30)


def ask(router, who: str, text: str = "hello", base: str = ""):
    client = anthropic.Anthropic(base_url=router.base + base, api_key=KEYS.get(who, who),
                                 max_retries=0, timeout=30)
    return client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=32, messages=[{"role": "user", "content": text}])


def page(router, name: str, key: str) -> httpx.Response:
    return httpx.get(f"{router.base}/_router/{name}", headers={"x-api-key": key}, timeout=10)


def usage(router, who: str) -> dict:
    r = page(router, "usage", KEYS.get(who, who))
    assert r.status_code == 200, r.text
    return r.json()


def seconds_to_midnight() -> float:
    now = time.time()
    return 86400 - now % 86400


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def refused_for_budget(router, who: str = "alice") -> anthropic.RateLimitError:
    with pytest.raises(anthropic.RateLimitError) as exc:
        ask(router, who)
    return exc.value


@pytest.fixture(autouse=True)
def _not_at_midnight():
    if seconds_to_midnight() < 180 or seconds_to_midnight() > 86400 - 5:
        pytest.skip("a daily budget resets at 00:00 UTC, within this test's run")


# --- budgets ---

def test_a_client_over_budget_gets_429_naming_its_budget_while_another_is_served(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    assert ask(router, "alice").http_response.status_code == 200  # spends more than $0.01
    served_before = mock.count("aws") + mock.count("droid")
    e = refused_for_budget(router)
    assert e.status_code == 429
    assert e.body["error"]["type"] == "rate_limit_error"
    assert e.body["error"]["message"] == "alice: daily budget $0.01 spent; resets 00:00 UTC"
    retry_after = int(e.response.headers["retry-after"])
    assert abs(retry_after - seconds_to_midnight()) < 30
    assert retry_after > 60  # Claude Code stops retrying and shows the message
    assert e.response.headers["x-should-retry"] == "false"
    assert mock.count("aws") + mock.count("droid") == served_before  # no endpoint was tried
    assert ask(router, "bob").http_response.status_code == 200
    doc = page(router, "status", ADMIN).json()
    assert all(ep["failures"] == 0 and ep["state"] == "healthy" for ep in doc["endpoints"])


def test_a_refused_client_is_never_sent_401_or_403_and_others_are_unaffected(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    for _ in range(3):
        assert refused_for_budget(router).status_code == 429
    for who in ("bob", "erin", PLAIN):
        assert ask(router, who).http_response.status_code == 200


def test_streams_are_refused_the_same_way(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    with pytest.raises(anthropic.RateLimitError) as exc:
        with sdk(router, "alice").messages.stream(model="claude-sonnet-4-5", max_tokens=16,
                                                  messages=[{"role": "user", "content": "hi"}]) as s:
            s.get_final_message()
    assert "daily budget" in exc.value.body["error"]["message"]


def test_spend_of_streams_counts(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    with sdk(router, "alice").messages.stream(model="claude-sonnet-4-5", max_tokens=16,
                                              messages=[{"role": "user", "content": "hi there"}]) as s:
        s.get_final_message()
    wait_for(lambda: usage(router, "alice")["spent_usd"] > 0.01, what="the stream's spend")
    assert refused_for_budget(router).status_code == 429


def test_live_reload_keeps_spend_and_applies_a_new_budget(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    spent = usage(router, "alice")["spent_usd"]
    refused_for_budget(router)
    write_config(tmp_path / "r.yaml", mock, alice_budget=100)
    u = wait_for(lambda: (u := usage(router, "alice"))["budget_usd"] == 100 and u, what="the reload")
    assert u["spent_usd"] == spent and u["budget_usd"] == 100
    assert ask(router, "alice").http_response.status_code == 200
    write_config(tmp_path / "r.yaml", mock, alice_budget=0.01)
    wait_for(lambda: usage(router, "alice")["budget_usd"] == 0.01, what="the second reload")
    assert refused_for_budget(router).status_code == 429


# --- rpm and concurrency ---

def test_over_rpm_is_429_with_a_short_retry_after(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "carol")
    ask(router, "carol")
    with pytest.raises(anthropic.RateLimitError) as exc:
        ask(router, "carol")
    e = exc.value
    assert 1 <= int(e.response.headers["retry-after"]) <= 60
    assert "x-should-retry" not in e.response.headers
    assert "carol: 2 requests per minute" in e.body["error"]["message"]
    assert ask(router, "bob").http_response.status_code == 200


def test_over_concurrency_is_429_with_a_short_retry_after_until_one_is_answered(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    mock.fault("aws", delay_ms=8000, key=KEYS["dave"], times=1)
    slow: dict = {}
    t = threading.Thread(target=lambda: slow.setdefault("r", ask(router, "dave")))
    t.start()
    try:
        wait_for(lambda: usage(router, "dave")["in_flight"] == 1, what="dave's request in flight")
        with pytest.raises(anthropic.RateLimitError) as exc:
            ask(router, "dave")
        assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
        assert "max_concurrency" in exc.value.body["error"]["message"]
        assert ask(router, "bob").http_response.status_code == 200  # others are not held up
    finally:
        t.join(30)
    assert slow["r"].http_response.status_code == 200
    wait_for(lambda: usage(router, "dave")["in_flight"] == 0, what="dave's request to end")
    assert ask(router, "dave").http_response.status_code == 200


def test_a_client_that_leaves_is_no_longer_in_flight(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    mock.fault("aws", delay_ms=5000, key=KEYS["dave"], times=1)
    client = anthropic.Anthropic(base_url=router.base, api_key=KEYS["dave"], max_retries=0, timeout=1.0)
    with pytest.raises(anthropic.APITimeoutError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8,
                               messages=[{"role": "user", "content": "hi"}])
    wait_for(lambda: usage(router, "dave")["in_flight"] == 0, what="the abandoned request to end")
    assert ask(router, "dave").http_response.status_code == 200


# --- allow-lists ---

def test_an_allow_list_keeps_a_client_on_its_endpoints(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    assert ask(router, "erin").headers["x-used-endpoint"] == "droid"  # aws is cheaper, not hers
    assert ask(router, "bob").headers["x-used-endpoint"] == "aws"


def test_an_allow_list_holds_when_its_endpoints_fail(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    mock.fault("droid", status=529)
    with pytest.raises(anthropic.APIStatusError) as exc:
        ask(router, "erin")
    assert exc.value.status_code == 529
    assert mock.count("aws") == 0


def test_an_allow_list_holds_with_tier_pinning(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    with pytest.raises(anthropic.BadRequestError) as exc:
        ask(router, "erin", base="/aws")
    assert "erin may not use endpoint aws" in exc.value.body["error"]["message"]
    assert mock.count("aws") == 0
    assert ask(router, "erin", base="/claude/droid").headers["x-used-endpoint"] == "droid"
    assert ask(router, "bob", base="/aws").headers["x-used-endpoint"] == "aws"


def test_an_allow_list_limits_the_models_list(start_router, mock, tmp_path):
    mock.profile("aws", models=["claude-opus-4-1"])
    mock.profile("droid", models=["claude-haiku-4-5"])
    router = start(start_router, mock, tmp_path, extra="")
    path = tmp_path / "r.yaml"
    path.write_text(path.read_text().replace(f"url: {mock.url('aws')}",
                                             f"url: {mock.url('aws')}\n    models: [claude-opus-*]"))
    # (applied by the watcher, or by start-up itself when the edit came that early)
    wait_for(lambda: [m.id for m in sdk(router, "bob").models.list().data] == ["claude-opus-4-1", "claude-haiku-4-5"],
             what="the profile in effect")
    assert [m.id for m in sdk(router, "erin").models.list().data] == ["claude-haiku-4-5"]
    assert [m.id for m in sdk(router, "bob").models.list().data] == ["claude-opus-4-1", "claude-haiku-4-5"]


# --- usage, status, metrics ---

def test_a_client_reads_only_its_own_usage(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    ask(router, "bob")
    mine = usage(router, "bob")
    assert mine["client"] == "bob" and mine["budget_usd"] == 1000 and mine["period"] == "month"
    assert mine["spent_usd"] > 0 and mine["remaining_usd"] == pytest.approx(1000 - mine["spent_usd"])
    assert mine["resets_at"].endswith("T00:00:00Z") and mine["in_flight"] == 0
    assert "alice" not in json.dumps(mine)
    assert list(mine["by_endpoint"]) == ["aws"] and list(mine["by_model"]) == ["claude-sonnet-4-5"]


def test_a_client_key_cannot_read_status_or_metrics_when_admin_keys_are_set(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    for name in ("status", "metrics"):
        r = page(router, name, KEYS["alice"])
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert page(router, name, "sk-wrong").status_code == 401


def test_admins_see_every_client(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    ask(router, "bob")
    ask(router, PLAIN)
    status = page(router, "status", ADMIN).json()
    by_name = {c["client"]: c for c in status["clients"]}
    assert set(by_name) == {"alice", "bob", "carol", "dave", "erin", None}
    assert by_name["alice"]["spent_usd"] > 0.01 and by_name["alice"]["remaining_usd"] == 0
    assert by_name[None]["requests"] == 1
    everyone = usage(router, ADMIN)
    assert {c["client"] for c in everyone["clients"]} == set(by_name)


def test_metrics_label_only_configured_names(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    refused_for_budget(router)
    ask(router, PLAIN)
    with pytest.raises(anthropic.AuthenticationError):
        ask(router, "sk-made-up-key")
    text = page(router, "metrics", ADMIN).text
    labels = set(re.findall(r'client="([^"]*)"', text))
    assert labels <= {"alice", "bob", "carol", "dave", "erin", "-"}
    assert {"alice", "-"} <= labels
    assert 'claude_router_client_refused_total{client="alice",reason="budget"} 1.0' in text
    assert re.search(r'claude_router_client_cost_usd_total\{client="alice"\} 0\.0[1-9]', text)
    for secret in [*KEYS.values(), ADMIN, PLAIN, "sk-made-up-key"]:
        assert secret not in text


def test_the_log_line_names_the_client_never_its_key(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    ask(router, PLAIN)
    log = router.wait_log('"client": "-"')
    assert '"client": "alice"' in log
    for secret in [*KEYS.values(), ADMIN, PLAIN]:
        assert secret not in log


# --- the ledger: restarts, kill -9, the usage report ---

def ledger_spend(path: Path, client: str) -> float:
    import sqlite3
    if not path.exists():
        return 0.0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        got = db.execute("SELECT SUM(usd) FROM spend WHERE client = ?", (client,)).fetchone()[0]
        db.close()
    except sqlite3.Error:
        return 0.0
    return got or 0.0


def test_the_ledger_is_in_the_confdir_by_default(start_router, mock, tmp_path):
    router = start(start_router, mock, tmp_path)
    ask(router, "alice")
    path = router.confdir / "router-ledger.sqlite3"
    assert wait_for(lambda: ledger_spend(path, "alice") > 0.01, what="alice's spend in the ledger")


def test_a_restart_keeps_spend_and_the_refused_client_stays_refused(start_router, mock, tmp_path):
    opts = {"router_ledger": str(tmp_path / "ledger.sqlite3")}
    router = start(start_router, mock, tmp_path, options=opts)
    ask(router, "alice")
    spent = usage(router, "alice")["spent_usd"]
    refused_for_budget(router)
    router.proc.terminate()
    router.proc.wait(20)
    again = start(start_router, mock, tmp_path, options=opts)
    assert usage(again, "alice")["spent_usd"] == pytest.approx(spent)
    e = refused_for_budget(again)
    assert e.body["error"]["message"] == "alice: daily budget $0.01 spent; resets 00:00 UTC"
    assert ask(again, "bob").http_response.status_code == 200


def test_a_kill_9_loses_at_most_the_last_second(start_router, mock, tmp_path):
    path = tmp_path / "ledger.sqlite3"
    opts = {"router_ledger": str(path)}
    router = start(start_router, mock, tmp_path, options=opts)
    ask(router, "alice")
    answered = time.monotonic()
    spent = usage(router, "alice")["spent_usd"]
    # Written within a second on a quiet machine; this one is busy, so the bound is generous.
    wait_for(lambda: ledger_spend(path, "alice") >= spent - 1e-9, timeout=20, what="the batch")
    lag = time.monotonic() - answered
    router.proc.kill()
    router.proc.wait(20)
    again = start(start_router, mock, tmp_path, options=opts)
    assert refused_for_budget(again).status_code == 429
    assert usage(again, "alice")["spent_usd"] == pytest.approx(spent)
    print(f"\nledger lag before kill -9: {lag * 1000:.0f} ms")


def test_the_usage_report_prints_spend_by_client_day_endpoint_and_model(start_router, mock, tmp_path):
    import subprocess
    import sys
    path = tmp_path / "ledger.sqlite3"
    router = start(start_router, mock, tmp_path, options={"router_ledger": str(path)})
    ask(router, "alice")
    ask(router, "bob")
    ask(router, "erin")
    refused_for_budget(router)
    wait_for(lambda: ledger_spend(path, "erin") > 0, what="the ledger's batch")
    wait_for(lambda: "refused" in _report(path, "alice") and ",1," in _report(path, "alice").splitlines()[1],
             what="the refusal's row")
    out = subprocess.run([sys.executable, "-m", "claude_router.spend_report", "--ledger", str(path), "--csv"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert lines[0] == ("client,day,endpoint,model,requests,refused,input_tokens,output_tokens,"
                        "cache_write_tokens,cache_read_tokens,cost_usd")
    assert any(line.startswith(f"alice,{today},aws,claude-sonnet-4-5,1,0,") for line in lines)
    assert any(line.startswith(f"alice,{today},-,-,1,1,") for line in lines)
    assert any(line.startswith(f"erin,{today},droid,claude-sonnet-4-5,1,0,") for line in lines)
    table = subprocess.run([sys.executable, "-m", "claude_router.spend_report", "--ledger", str(path)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "bob" in table and "total" in table
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite3*"))  # WAL too
    for secret in [*KEYS.values(), ADMIN, PLAIN]:
        assert secret not in out and secret not in table and secret.encode() not in stored


def test_a_ledger_row_names_the_client_and_a_hash_of_the_session(start_router, mock, tmp_path):
    import hashlib
    import sqlite3
    path = tmp_path / "ledger.sqlite3"
    router = start(start_router, mock, tmp_path, options={"router_ledger": str(path)})
    sdk(router, "bob").messages.create(model="claude-sonnet-4-5", max_tokens=8,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"X-Claude-Code-Session-Id": "sess-private-42"})
    wait_for(lambda: ledger_spend(path, "bob") > 0, what="the row")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    row = db.execute("SELECT client, session, model, endpoint, attempts, status, input_tokens, "
                     "output_tokens, cost_usd FROM requests").fetchone()
    assert row[:6] == ("bob", hashlib.sha256(b"cc:sess-private-42").hexdigest()[:16],
                       "claude-sonnet-4-5", "aws", "aws:200", 200)
    assert row[6] > 0 and row[7] > 0 and row[8] > 0
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite3*"))  # WAL too
    assert b"bob" in stored and b"sess-private-42" not in stored and KEYS["bob"].encode() not in stored


def _report(path: Path, client: str) -> str:
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "claude_router.spend_report", "--ledger", str(path),
                           "--csv", "--client", client], capture_output=True, text=True, timeout=60).stdout


# --- one budget for every worker, through a real redis-server ---

def test_two_routers_share_one_budget_through_redis(start_router, mock, tmp_path, redis_server):
    config = write_config(tmp_path / "shared.yaml", mock, alice_budget=0.05)
    opts = {"router_config": str(config), "router_redis_url": redis_server.url}
    a = start_router([], options=opts)
    b = start_router([], options=opts)
    for r in (a, b):
        r.wait_log("(connected)")
    ask(a, "alice")
    first = usage(a, "alice")["spent_usd"]
    assert 0 < first < 0.05  # one request alone stays under the budget
    wait_for(lambda: usage(b, "alice")["spent_usd"] == pytest.approx(first), what="b sees a's spend")
    ask(b, "alice")  # under budget on b too: the two together are over it
    wait_for(lambda: usage(a, "alice")["spent_usd"] > 0.05, what="a sees b's spend")
    assert refused_for_budget(a).status_code == 429
    assert refused_for_budget(b).status_code == 429
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert float(redis_server.cli("GET", f"endpoint_health_|spend|alice|{today}")) > 0.05
    assert ask(a, "bob").http_response.status_code == 200


def test_a_router_serves_on_its_own_count_when_redis_is_away(start_router, mock, tmp_path, own_redis):
    server = own_redis()
    config = write_config(tmp_path / "away.yaml", mock)
    router = start_router([], options={"router_config": str(config), "router_redis_url": server.url})
    router.wait_log("(connected)")
    server.stop()
    assert ask(router, "bob").http_response.status_code == 200
    ask(router, "alice")
    assert refused_for_budget(router).status_code == 429  # its own count holds the budget
    router.wait_log("shared budgets: Redis unavailable")


def test_two_workers_of_one_supervisor_share_one_budget(mock, tmp_path):
    """`./scripts/run --workers 2`: the supervisor's own redis-server carries the budget."""
    import shutil

    from claude_router.cli import workers
    if shutil.which("haproxy") is None or shutil.which("redis-server") is None:
        pytest.skip("haproxy and redis-server are needed for --workers")
    config = write_config(tmp_path / "workers.yaml", mock, alice_budget=0.05)
    c = workers.start_cluster(2, [], tmp=tmp_path, extra=[
        "--set", f"confdir={tmp_path / 'conf'}", "--set", f"router_config={config}"])
    try:
        one, two = (type("W", (), {"base": url})() for url in c.worker_urls)
        ask(one, "alice")
        assert 0 < usage(one, "alice")["spent_usd"] < 0.05
        ask(two, "alice")
        for w in (one, two):
            wait_for(lambda w=w: usage(w, "alice")["spent_usd"] > 0.05, what="the shared spend")
            assert refused_for_budget(w).status_code == 429
        front = type("F", (), {"base": c.url})()
        assert refused_for_budget(front).status_code == 429
        assert ask(front, "bob").http_response.status_code == 200
    finally:
        c.stop()
