"""Alerts (issue 23) through real mitmdump instances: webhooks posted to a real receiver on
loopback when an endpoint cools down and recovers (once, from two routers sharing a real
redis-server), in JSON or Slack's format, never holding a key; a receiver that is down or slow
delays no request; a named client's budget at 80 % and 100 %."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from conftest import closed_port_url

TOKEN = "T0KEN-hook-5e6f7a8b9c"  # the webhook URL's own token: never in a log
AWS_KEY = "sk-endpoint-aws-1a2b3c4d"
DROID_KEY = "sk-endpoint-droid-5e6f7a8b"
CLIENT_KEY = "sk-client-9c0d1e2f"
ALICE_KEY = "sk-alice-3a4b5c6d"
MSG = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


class Receiver:
    """A webhook receiver on loopback recording every post; ``hold`` keeps each request open
    that long (or until ``release``) after recording it."""

    def __init__(self, hold: float = 0.0) -> None:
        self.posts: list[bytes] = []
        self.hold = hold
        self.holding = threading.Event()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver.posts.append(data)
                if receiver.hold:
                    receiver.holding.set()
                    receiver.released.wait(receiver.hold)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict]:
        return [json.loads(p) for p in list(self.posts)]

    def wait(self, predicate, timeout: float = 30.0, what: str = "a post"):
        deadline = time.monotonic() + timeout
        while not (found := predicate(self.events())):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.events()}")
            time.sleep(0.05)
        return found

    def count(self, event: str, subject: str) -> int:
        return sum(1 for e in self.events() if (e.get("event"), e.get("subject")) == (event, subject))


def has(event: str, subject: str, n: int = 1):
    return lambda events: sum(1 for e in events if (e["event"], e["subject"]) == (event, subject)) >= n


def write_config(path: Path, mock, hook_url: str, fmt: str = "json", extra: str = "") -> Path:
    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url("aws")}
    key: {AWS_KEY}
    price: {{input: 1000, output: 1000}}  # USD per million tokens: a request costs cents
  - name: droid
    url: {mock.url("droid")}
    key: {DROID_KEY}
client_keys: [{CLIENT_KEY}]
health: {{cooldown: 1}}
alerts:
  - url: {hook_url}
    format: {fmt}
{extra}""")
    return path


def post(router, key: str = CLIENT_KEY) -> httpx.Response:
    return httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"x-api-key": key}, timeout=30)


def cool_aws(mock, *routers) -> None:
    """The cheap relay fails 3 times: aws cools down (every request is still answered by droid).
    Requests go round the routers until aws has had its 3 (a router's view of Redis may lag)."""
    before = mock.count("aws")
    mock.fault("aws", status=503, times=3)
    deadline = time.monotonic() + 30
    i = 0
    while mock.count("aws") < before + 3:
        assert time.monotonic() < deadline, "aws was not tried 3 times"
        assert post(routers[i % len(routers)]).status_code == 200
        i += 1


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def test_a_cooldown_and_a_recovery_arrive_once_from_two_routers_sharing_redis(
        start_router, mock, tmp_path, redis_server):
    hook = Receiver()
    try:
        path = write_config(tmp_path / "r.yaml", mock, hook.url)
        routers = [start_router([], options={"router_config": str(path),
                                             "router_redis_url": redis_server.url}) for _ in range(2)]
        for r in routers:
            r.wait_log("(connected)")
        a, b = routers
        cool_aws(mock, a, b)
        (cooled,) = hook.wait(lambda ev: [e for e in ev if e["event"] == "cooled"], what="cooled")
        assert cooled["subject"] == "aws" and cooled["endpoint"] == "aws" and cooled["ejections"] == 1
        assert cooled["text"].startswith("endpoint aws is cooling down for ")
        # The cooldown (1 s) ends; the next request probes aws, which answers: recovered.
        wait_until(lambda: post(b).headers["x-used-endpoint"] == "aws", what="aws to serve again")
        hook.wait(has("recovered", "aws"), what="recovered")
        # A later transition (aws cools again) is the marker: by the time it arrives, both
        # routers have long seen the first two.
        cool_aws(mock, b, a)
        hook.wait(has("cooled", "aws", 2), what="the second cooldown")
        assert hook.count("cooled", "aws") == 2
        assert hook.count("recovered", "aws") == 1
        assert len({e["id"] for e in hook.events()}) == 3
        for raw in hook.posts:
            for secret in (AWS_KEY, DROID_KEY, CLIENT_KEY, TOKEN):
                assert secret.encode() not in raw
        for r in routers:
            assert TOKEN not in r.log()
        assert "alert cooled aws sent to alerts[0] (127.0.0.1)" in a.log() + b.log()
    finally:
        hook.stop()


def test_slack_format_posts_text_only(start_router, mock, tmp_path):
    hook = Receiver()
    try:
        path = write_config(tmp_path / "r.yaml", mock, hook.url, fmt="slack")
        router = start_router([], options={"router_config": str(path)})
        cool_aws(mock, router)
        (posted,) = hook.wait(lambda ev: ev, what="a post")
        assert set(posted) == {"text"}
        assert posted["text"].startswith("claude-router: endpoint aws is cooling down for ")
    finally:
        hook.stop()


def test_a_receiver_that_is_down_delays_no_request(start_router, mock, tmp_path):
    path = write_config(tmp_path / "r.yaml", mock, closed_port_url("hook") + f"/{TOKEN}")
    router = start_router([], options={"router_config": str(path)})
    cool_aws(mock, router)
    status = httpx.get(f"{router.base}/_router/status", headers={"x-api-key": CLIENT_KEY}, timeout=10)
    assert status.json()["alerts"]["webhooks"][0]["webhook"] == "alerts[0] (127.0.0.1)"
    for _ in range(5):  # while the alert is being retried
        assert post(router).status_code == 200
    assert TOKEN not in router.log() and TOKEN not in status.text


def test_a_slow_receiver_delays_no_request(start_router, mock, tmp_path):
    hook = Receiver(hold=30.0)
    try:
        path = write_config(tmp_path / "r.yaml", mock, hook.url)
        router = start_router([], options={"router_config": str(path)})
        cool_aws(mock, router)
        assert hook.holding.wait(30), "the alert never reached the receiver"
        answers = [post(router) for _ in range(5)]  # the receiver holds the alert's post meanwhile
        assert [a.status_code for a in answers] == [200] * 5
        assert not hook.released.is_set()  # all answered before the receiver answered
    finally:
        hook.stop()


def test_a_named_client_at_80_and_100_percent_of_its_budget(start_router, mock, tmp_path):
    hook = Receiver()
    path = tmp_path / "r.yaml"

    def config(budget: float) -> None:
        write_config(path, mock, hook.url, extra=f"""
clients:
  - name: alice
    key: {ALICE_KEY}
    budget: {{usd: {budget!r}, per: day}}
""")

    try:
        config(1000.0)
        router = start_router([], options={"router_config": str(path)})
        assert post(router, ALICE_KEY).status_code == 200
        usage = httpx.get(f"{router.base}/_router/usage", headers={"x-api-key": ALICE_KEY}, timeout=10).json()
        cost = usage["spent_usd"]
        assert cost > 0
        config(cost / 0.85)  # alice has now spent 85 % of her budget
        router.wait_log("config reloaded")
        (at80,) = hook.wait(lambda ev: [e for e in ev if e["event"] == "budget_80"], what="budget_80")
        assert (at80["client"], at80["per"], at80["percent"]) == ("alice", "day", 85.0)
        assert post(router, ALICE_KEY).status_code == 200  # below 100 %: admitted, now 170 %
        (at100,) = hook.wait(lambda ev: [e for e in ev if e["event"] == "budget_100"], what="budget_100")
        assert at100["client"] == "alice" and at100["percent"] >= 100
        assert post(router, ALICE_KEY).status_code == 429
        cool_aws(mock, router)  # the marker: a later event
        hook.wait(has("cooled", "aws"), what="the marker")
        assert [e["event"] for e in hook.events()] == ["budget_80", "budget_100", "cooled"]
        for raw in hook.posts:
            assert ALICE_KEY.encode() not in raw and AWS_KEY.encode() not in raw
    finally:
        hook.stop()


def test_every_endpoint_cooling_is_told_once(start_router, mock, tmp_path):
    hook = Receiver()
    try:
        path = write_config(tmp_path / "r.yaml", mock, hook.url)
        router = start_router([], options={"router_config": str(path)})
        for name in ("aws", "droid"):
            mock.fault(name, status=503, times=3)
        for _ in range(3):  # each request fails at both
            post(router)
        (every,) = hook.wait(lambda ev: [e for e in ev if e["event"] == "all_cooling"], what="all_cooling")
        assert every["endpoints"] == ["aws", "droid"]
        assert every["text"].startswith("every endpoint is cooling down (aws, droid); the first is back in")
        # Both answer again once their cooldowns end: recovered is the marker.
        wait_until(lambda: post(router).status_code == 200, what="an answer")
        hook.wait(has("recovered", "aws"), what="recovered")
        assert [hook.count(k, s) for k, s in (("cooled", "aws"), ("cooled", "droid"), ("all_cooling", ""))] \
            == [1, 1, 1]
    finally:
        hook.stop()
