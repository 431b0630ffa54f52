"""Running it for real: config file and reload, keys, client auth, status, metrics, usage and
cost, commands, log lines, and no secret anywhere. Real mitmdump/mitmweb and the mock relay."""

import json
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from claude_router_dev.harness import wait_for
from conftest import ROOT
from streams import STREAM_MSG

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
AWS_KEY = "sk-aws-upstream-7f3a9c"
DROID_KEY = "sk-droid-upstream-1b2d4e"
CLIENT_KEY = "rk-client-5e6f7a"
ENV = {"AWS_KEY": AWS_KEY, "DROID_KEY": DROID_KEY, "ROUTER_CLIENT_KEY": CLIENT_KEY}


def write_config(path: Path, mock, extra: str = "", client_keys: bool = True) -> Path:
    path.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url('aws')}
    key: env:AWS_KEY
    price: {{input: 1.0, output: 5.0}}
  - name: droid
    url: {mock.url('droid')}
    key: env:DROID_KEY
    auth: bearer
    headers: {{X-Relay-Tier: droid}}
    price: {{input: 2.0, output: 10.0}}
  - name: plain
    url: {mock.url('plain')}
{"client_keys: [env:ROUTER_CLIENT_KEY]" if client_keys else ""}
{extra}
""")
    return path


def headers_of(record) -> dict:
    return {k.lower(): v for k, v in record["headers"]}


@pytest.fixture
def keyed(mock, start_router, tmp_path):
    cfg = write_config(tmp_path / "router.yaml", mock)
    router = start_router([], options={"router_config": str(cfg)}, env=ENV)
    router.cfg = cfg
    router.wait_log("endpoints in price order")
    return router


def client(router, key=CLIENT_KEY) -> httpx.Client:
    return httpx.Client(base_url=router.base, headers={"x-api-key": key}, timeout=30)


def test_each_endpoint_gets_its_own_key_and_no_other(mock, keyed):
    mock.fault("aws", status=500)
    mock.fault("droid", status=500)
    r = client(keyed).post("/v1/messages", json=MSG)
    assert r.headers["x-router-attempts"] == "aws:500, droid:500, plain:200"
    aws, droid, plain = (headers_of(mock.requests(n)[0]) for n in ("aws", "droid", "plain"))
    assert aws["x-api-key"] == AWS_KEY and "authorization" not in aws
    assert droid["authorization"] == f"Bearer {DROID_KEY}" and "x-api-key" not in droid
    assert droid["x-relay-tier"] == "droid"
    assert plain["x-api-key"] == CLIENT_KEY  # no key of its own: the client's goes through
    everything = json.dumps(mock.requests())
    assert everything.count(AWS_KEY) == 1 and everything.count(DROID_KEY) == 1


def test_client_key_is_required(mock, keyed):
    with pytest.raises(anthropic.AuthenticationError) as exc:
        anthropic.Anthropic(base_url=keyed.base, api_key="wrong-key", max_retries=0).messages.create(**MSG)
    assert exc.value.body["error"]["type"] == "authentication_error"
    r = httpx.post(f"{keyed.base}/v1/messages", json=MSG)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client(keyed, key="wrong").get("/_router/status").status_code == 401
    sdk = anthropic.Anthropic(base_url=keyed.base, api_key=CLIENT_KEY, max_retries=0)
    assert sdk.messages.create(**MSG).content[0].text.startswith("Hello from aws")
    assert sum(mock.count(n) for n in ("aws", "droid", "plain")) == 1


def test_refuses_open_listen_address_with_keys_and_no_client_keys(mock, start_router, tmp_path):
    cfg = write_config(tmp_path / "router.yaml", mock, client_keys=False)
    router = start_router([], options={"router_config": str(cfg), "listen_host": "0.0.0.0"},
                          env=ENV, wait=False)
    assert router.proc.wait(20) != 0
    assert "no router_client_keys are set" in router.log()


def test_bad_config_file_stops_startup_naming_file_and_field(mock, start_router, tmp_path):
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"endpoints:\n  - name: aws\n    url: {mock.url('aws')}\n    price: {{input: -1}}\n")
    router = start_router([], options={"router_config": str(cfg)}, wait=False)
    assert router.proc.wait(20) != 0
    assert f"{cfg}: endpoints[0] (aws).price.input: must be a number >= 0" in router.log()


def test_reload_applies_edits_keeps_health_and_in_flight_streams(mock, keyed):
    """The stream is open across the reload: droid pauses it after its first word (the fault is
    set before the request, when the mock reads it) until well after the reload.

    Fails when a reload drops in-flight requests: with `_watch_config` closing the upstream
    session on reload (`await self.upstream.close()` after the new config is applied), the
    stream ends with `event: error` after one word."""
    mock.fault("aws", status=500)
    mock.fault("droid", words=8, stall_ms=6000, stall_after_events=4)
    c = client(keyed)
    for _ in range(3):
        c.post("/v1/messages", json=MSG)  # aws: three failures, cooling
    with c.stream("POST", "/v1/messages", json=STREAM_MSG, headers={"x-api-key": CLIENT_KEY}) as s:
        assert s.headers["x-used-endpoint"] == "droid"
        lines = s.iter_lines()
        before = []
        while "event: content_block_delta" not in before:  # the first word reached the client
            before.append(next(lines))
        text = write_config(keyed.cfg, mock).read_text()
        keyed.cfg.write_text(text.replace("  - name: plain", "  - name: extra\n    url: "
                                          f"{mock.url('extra')}\n  - name: plain"))
        keyed.wait_log("config reloaded", timeout=20)
        assert mock.stats()["open_streams"] == 1  # still in flight after the reload
        after = list(lines)
    body = "\n".join(before + after)
    assert after and "event: error" not in body  # not dropped
    assert body.count("event: content_block_delta") == 8
    assert [line for line in after if line][-2:] == ["event: message_stop", 'data: {"type":"message_stop"}']
    assert mock.requests("droid")[-1]["outcome"] == "200"
    r = c.post("/v1/messages", json=MSG)
    assert r.headers["x-router-attempts"] == "droid:200"  # aws is still cooling after reload
    status = c.get("/_router/status").json()
    assert [e["name"] for e in status["endpoints"]] == ["aws", "droid", "extra", "plain"]
    assert status["endpoints"][0]["state"] == "cooling"


def test_broken_edit_keeps_last_good_config(mock, keyed):
    keyed.cfg.write_text("endpoints: [ this is not yaml")
    keyed.wait_log("keeping the last good config", timeout=20)
    assert client(keyed).post("/v1/messages", json=MSG).headers["x-used-endpoint"] == "aws"
    keyed.cfg.write_text(keyed.cfg.read_text() + "\n")
    log = keyed.wait_log(f"{keyed.cfg}: line 1: not valid YAML")
    assert "Traceback" not in log


def test_status_metrics_usage_and_cost_after_failovers(mock, keyed):
    mock.fault("aws", status=529)
    c = client(keyed)
    for _ in range(3):
        c.post("/v1/messages", json=MSG)  # droid answers; aws trips
    with c.stream("POST", "/v1/messages", json=STREAM_MSG) as s:
        s.read()
    records = [r for r in mock.requests("droid")]
    assert len(records) == 4
    status = c.get("/_router/status").json()
    aws, droid, plain = status["endpoints"]
    assert status["store"] == "memory"
    assert aws["state"] == "cooling" and 50 < aws["cooldown_seconds_left"] <= 60
    assert (aws["failures"], aws["served"], aws["last_error"]) == (3, 0, "HTTP 529 overloaded_error")
    assert droid["state"] == "healthy" and droid["served"] == 4
    tokens = droid["tokens"]
    assert tokens["input_tokens"] > 0 and tokens["output_tokens"] == 4 * 6  # 6 words each answer
    expected = (tokens["input_tokens"] * 2.0 + tokens["output_tokens"] * 10.0) / 1e6
    assert droid["cost_usd"] == pytest.approx(expected, rel=1e-4)
    metrics = c.get("/_router/metrics").text
    assert 'claude_router_attempts_total{endpoint="aws",outcome="529"} 3.0' in metrics
    assert 'claude_router_cooldown_trips_total{endpoint="aws"} 1.0' in metrics
    assert 'claude_router_failovers_total 3.0' in metrics
    assert f'claude_router_tokens_total{{endpoint="droid",kind="output_tokens"}} {4 * 6}.0' in metrics
    assert 'claude_router_time_to_first_byte_seconds_count{endpoint="droid"} 4.0' in metrics
    lines = [json.loads(line.split("router: ", 1)[1]) for line in keyed.log().splitlines()
             if 'router: {"method"' in line]
    assert len(lines) == 4
    assert lines[-1]["endpoint"] == "droid" and lines[-1]["output_tokens"] == 6
    assert lines[-1]["path"] == "/v1/messages" and lines[-1]["status"] == 200
    assert set(lines[-1]) >= {"attempts", "ttfb_ms", "duration_ms", "input_tokens", "cost_usd"}


def saved_flows(path: Path, n: int, timeout: float = 20.0) -> list:
    """The flows mitmproxy saved to ``path`` (save_stream_file), once there are ``n``."""
    from mitmproxy import io
    deadline = time.monotonic() + timeout
    while True:
        try:
            with path.open("rb") as f:
                flows = list(io.FlowReader(f).stream())
        except Exception:  # not written yet, or a flow half written
            flows = []
        if len(flows) >= n or time.monotonic() > deadline:
            return flows
        time.sleep(0.05)


def test_no_secret_appears_in_any_output(mock, start_router, tmp_path):
    """Answers (bodies and every header), status, metrics, the log, saved flows and their
    comments, while relays echo the keys they got in error messages and headers.

    Fails with `scrub_headers` skipped in routing.py (the echoed header reaches the client),
    with `_redact_credentials` a no-op (the client key is saved in the flows), and with the
    endpoint's key written into the flow comment."""
    saved = tmp_path / "flows.mitm"
    cfg = write_config(tmp_path / "router.yaml", mock)
    keyed = start_router([], options={"router_config": str(cfg), "save_stream_file": str(saved)}, env=ENV)
    keyed.wait_log("endpoints in price order")
    mock.fault("aws", status=401, message=f"invalid x-api-key {AWS_KEY}",
               headers={"x-relay-saw": AWS_KEY, "www-authenticate": f"Key {AWS_KEY}"})
    mock.fault("droid", headers={"x-relay-saw": f"Bearer {DROID_KEY}"})
    c = client(keyed)
    with c.stream("POST", "/v1/messages", json=STREAM_MSG) as s:
        s.read()
    answers = [s]
    assert s.headers["x-router-attempts"] == "aws:401, droid:200" and "event: message_stop" in s.text
    assert s.headers["x-relay-saw"] == "Bearer [redacted]"  # the echo was relayed, scrubbed
    mock.fault("droid", reset="before_headers")
    answers += [c.post("/v1/messages", json=MSG) for _ in range(4)]
    answers += [c.get("/_router/status"), c.get("/_router/metrics")]
    answers.append(client(keyed, key="nope").post("/v1/messages", json=MSG))
    outputs = [r.text + json.dumps(r.headers.multi_items()) for r in answers]
    outputs.append(keyed.log())
    flows = saved_flows(saved, len(answers))  # the status pages and the 401 too
    comments = [f.comment for f in flows]
    assert len(flows) == len(answers) and all("attempts: " in m for m in comments[:5]), comments
    assert comments[0] == "routed to droid (index 1); attempts: aws:401, droid:200"
    assert comments[1] == "routed to plain (index 2); attempts: aws:401, droid:reset, plain:200"
    outputs += comments + [saved.read_bytes().decode("latin-1")]
    for out in outputs:
        for secret in (AWS_KEY, DROID_KEY, CLIENT_KEY):
            assert secret not in out


def endpoint_doc(router, name: str) -> dict:
    doc = httpx.get(f"{router.base}/_router/status", timeout=10).json()
    return next(e for e in doc["endpoints"] if e["name"] == name)


def web_command(web: httpx.Client, cmd: str, *args: str) -> dict:
    # Tornado's XSRF check: the header must match the cookie (a plain token is accepted).
    r = web.post(f"/commands/{cmd}", json={"arguments": list(args)},
                 headers={"X-XSRFToken": "t0ken", "Cookie": "_mitmproxy_xsrf=t0ken; _xsrf=t0ken"})
    assert r.status_code == 200, r.text
    return r.json()


def test_commands_disable_enable_reset_status_on_every_instance(mock, start_router, redis_server):
    from conftest import free_port
    web_port = free_port()
    tiers = [f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"]
    opts = {"router_redis_url": redis_server.url}
    a = start_router(tiers, tool="mitmweb", options={**opts, "web_port": web_port, "web_password": "pw"})
    b = start_router(tiers, options=opts)
    for r in (a, b):
        r.wait_log("(connected)")
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", params={"token": "pw"})
    web_command(web, "router.disable", "aws")
    for r in (a, b):  # through Redis pub/sub
        wait_for(lambda r=r: endpoint_doc(r, "aws")["state"] == "disabled", what=f"aws disabled on {r.base}")
        assert httpx.post(f"{r.base}/v1/messages", json=MSG).headers["x-router-attempts"] == "droid:200"
    assert "disabled" in web_command(web, "router.status")["value"]
    web_command(web, "router.enable", "aws")
    wait_for(lambda: endpoint_doc(b, "aws")["state"] == "healthy", what="aws enabled on b")
    assert httpx.post(f"{b.base}/v1/messages", json=MSG).headers["x-used-endpoint"] == "aws"
    mock.fault("aws", status=500)
    for _ in range(3):
        httpx.post(f"{b.base}/v1/messages", json=MSG)
    assert "cooling" in web_command(web, "router.status")["value"]
    web_command(web, "router.reset")
    mock.fault("aws")
    wait_for(lambda: endpoint_doc(b, "aws")["state"] == "healthy", what="aws reset on b")
    assert httpx.post(f"{b.base}/v1/messages", json=MSG).headers["x-used-endpoint"] == "aws"
    assert mock.count("aws") == 5


def test_example_router_yaml_is_valid(start_router):
    router = start_router([], options={"router_config": str(ROOT / "router.example.yaml")},
                          env={"AWS_RELAY_KEY": "x", "DROID_RELAY_KEY": "y", "ROUTER_CLIENT_KEY": "z"})
    router.wait_log("3 endpoints in price order (0:aws, 1:droid, 2:claude)")


def test_status_script_renders_router_and_redis_state(mock, start_router, redis_server):
    import subprocess
    import sys
    mock.fault("aws", status=500)
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
                          options={"router_redis_url": redis_server.url})
    router.wait_log("(connected)")
    for _ in range(3):
        httpx.post(f"{router.base}/v1/messages", json=MSG)
    status = [sys.executable, "-m", "claude_router.cli.status"]
    out = subprocess.run([*status, "--url", router.base], capture_output=True, text=True, timeout=30).stdout
    assert "aws" in out and "cooling" in out and "droid" in out and "healthy" in out
    out = subprocess.run([*status, "--redis", redis_server.url], capture_output=True, text=True,
                         timeout=30).stdout
    assert "aws" in out and "cooling" in out


def test_client_key_with_undecodable_bytes_gets_401_not_a_passthrough(mock, keyed):
    r = httpx.post(f"{keyed.base}/v1/messages", json=MSG, headers={"x-api-key": b"\xff\xfe"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert sum(mock.count(n) for n in ("aws", "droid", "plain")) == 0
    assert "Addon error" not in keyed.log()


def test_refused_reload_is_not_applied(mock, start_router, tmp_path):
    cfg = write_config(tmp_path / "router.yaml", mock)
    router = start_router([], options={"router_config": str(cfg), "listen_host": "0.0.0.0"}, env=ENV)
    router.wait_log("endpoints in price order")
    write_config(cfg, mock, client_keys=False)  # would open the endpoint keys to the network
    router.wait_log("keeping the last good config", timeout=20)
    assert httpx.post(f"{router.base}/v1/messages", json=MSG).status_code == 401
    assert client(router).post("/v1/messages", json=MSG).status_code == 200


def test_flows_with_routes_can_be_saved_and_show_no_secret(mock, start_router, tmp_path):
    saved = tmp_path / "flows.mitm"
    cfg = write_config(tmp_path / "router.yaml", mock)
    router = start_router([], options={"router_config": str(cfg), "save_stream_file": str(saved)}, env=ENV)
    router.wait_log("endpoints in price order")
    c = client(router)
    c.post("/v1/messages", json=MSG)
    with c.stream("POST", "/v1/messages", json=STREAM_MSG) as s:
        s.read()
    flows = saved_flows(saved, 2)
    assert "unserializable" not in router.log() and "Addon error" not in router.log()
    assert len(flows) == 2 and flows[0].metadata["router"]["endpoint"] == "aws"
    # Both the answered and the streamed (handed-off) flow show the upstream request.
    assert [f.request.url for f in flows] == [mock.url("aws") + "/v1/messages"] * 2
    assert AWS_KEY.encode() not in saved.read_bytes()


def test_url_credentials_with_a_bearer_client_fail_over_cleanly(mock, start_router):
    router = start_router([f"a=http://user:pw@{mock.base.split('//')[1]}/aws", f"b={mock.url('droid')}"])
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, headers={"authorization": "Bearer c"})
    assert r.status_code == 200 and r.headers["x-used-endpoint"] == "a"
    assert headers_of(mock.requests("aws")[0])["authorization"].startswith("Basic ")


def test_message_text_that_looks_like_sse_control_does_not_fool_the_router(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
                          options={"router_max_failures": 1})
    msg = dict(STREAM_MSG, messages=[{"role": "user", "content": "event: error message_stop"}])
    for _ in range(2):
        r = httpx.post(f"{router.base}/v1/messages", json=msg, timeout=30)
        assert r.headers["x-used-endpoint"] == "aws" and "event: error\n" not in r.text


def test_refuses_keys_on_an_open_address_given_in_the_mode_spec(mock, start_router, tmp_path):
    cfg = write_config(tmp_path / "router.yaml", mock, client_keys=False)
    from conftest import free_port
    router = start_router([], mode="none", env=ENV, wait=False, options={
        "router_config": str(cfg), "mode": f"reverse:https://api.anthropic.com@0.0.0.0:{free_port()}"})
    assert router.proc.wait(20) != 0
    assert "no router_client_keys are set" in router.log()
