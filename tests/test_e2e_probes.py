"""Out-of-band probes and subscription windows through a real mitmdump (issue 22, points 1 and
3): a cooling endpoint is probed by the router itself and recovers without a user request; a
failing probe keeps it cooling; two instances on one real redis-server send one probe per
interval between them; a 429 saying the 5-hour window is used up cools the endpoint until the
window's reset, capped by router_window_cap."""

import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from claude_router_dev.harness import wait_for

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
EVERY = 0.3  # seconds between probes


def write_config(path: Path, mock, probe: str = f"{{every: {EVERY}}}", extra: str = "",
                 cheap_key: bool = True) -> Path:
    path.write_text(f"""
endpoints:
  - name: cheap
    url: {mock.url("cheap")}
{"    key: sk-cheap-0a1b2c3d" if cheap_key else ""}
    probe: {probe}
  - name: dear
    url: {mock.url("dear")}
    key: sk-dear-4e5f6a7b
health:
  cooldown: 60
{extra}
""")
    return path


def post(router, **headers) -> httpx.Response:
    return httpx.post(f"{router.base}/v1/messages", json=MSG, headers=headers, timeout=30)


def status(router, name: str = "cheap") -> dict:
    doc = httpx.get(f"{router.base}/_router/status", timeout=10).json()
    return next(e for e in doc["endpoints"] if e["name"] == name)


def probes_seen(mock, name: str = "cheap") -> list[dict]:
    return [r for r in mock.requests(name) if r["path"] == "/v1/models"]


def user_requests(mock, name: str = "cheap") -> list[dict]:
    return [r for r in mock.requests(name) if r["path"] == "/v1/messages"]


def cool_cheap(router, mock) -> None:
    mock.fault("cheap", status=529, error_type="overloaded_error")
    for _ in range(3):
        assert post(router).headers["x-router-attempts"] == "cheap:529, dear:200"
    assert status(router)["state"] == "cooling"


def test_a_cooling_endpoint_recovers_through_probes_without_a_user_request(mock, start_router, tmp_path):
    router = start_router([], options={"router_config": str(write_config(tmp_path / "r.yaml", mock))})
    cool_cheap(router, mock)
    seen = wait_for(lambda: probes_seen(mock), what="a probe at the mock")
    headers = {k.lower(): v for k, v in seen[0]["headers"]}
    assert headers["x-api-key"] == "sk-cheap-0a1b2c3d"  # the endpoint's own key, nothing of a client's
    mock.call("DELETE", "/_mock/faults/cheap")  # the relay recovers
    wait_for(lambda: status(router)["state"] == "healthy", what="cheap healthy again")
    assert len(user_requests(mock)) == 3  # no user request paid for the recovery
    doc = status(router)["probe"]
    assert doc["last"] == "pass" and doc["passed"] == 1 and doc["path"] == "/v1/models"
    assert post(router).headers["x-router-attempts"] == "cheap:200"
    assert "probe of cheap passed" in router.log()


def test_a_failing_probe_keeps_the_endpoint_cooling(mock, start_router, tmp_path):
    router = start_router([], options={"router_config": str(write_config(tmp_path / "r.yaml", mock))})
    cool_cheap(router, mock)
    wait_for(lambda: len(probes_seen(mock)) >= 3, what="three probes")
    cheap = status(router)
    assert cheap["state"] == "cooling" and cheap["cooldown_seconds_left"] > 30
    assert cheap["probe"]["last"] == "fail" and cheap["probe"]["failed"] >= 3
    assert cheap["probe"]["last_outcome"] == "529"
    assert post(router).headers["x-router-attempts"] == "dear:200"
    assert len(user_requests(mock)) == 3


def test_a_count_tokens_probe_for_an_endpoint_that_takes_the_clients_key(mock, start_router, tmp_path):
    config = write_config(tmp_path / "r.yaml", mock, cheap_key=False,
                          probe=f"{{path: /v1/messages/count_tokens, model: mock-model, every: {EVERY}, "
                                "key: sk-probe-5e6f7a8b}")
    router = start_router([], options={"router_config": str(config)})
    mock.fault("cheap", status=529, error_type="overloaded_error")
    for _ in range(3):
        post(router, **{"x-api-key": "sk-client-1a2b3c4d"})
    seen = wait_for(lambda: [r for r in mock.requests("cheap") if r["path"] == "/v1/messages/count_tokens"],
                 what="a count_tokens probe")
    keys = {v for k, v in seen[0]["headers"] if k.lower() == "x-api-key"}
    assert keys == {"sk-probe-5e6f7a8b"}  # the probe's key, never the client's
    mock.call("DELETE", "/_mock/faults/cheap")
    wait_for(lambda: status(router)["state"] == "healthy", what="cheap healthy again")


def test_two_instances_on_one_redis_send_one_probe_per_interval(mock, start_router, tmp_path, redis_server):
    every = 1.0
    config = write_config(tmp_path / "r.yaml", mock, probe=f"{{every: {every}}}")
    opts = {"router_config": str(config), "router_redis_url": redis_server.url}
    a, b = start_router([], options=opts), start_router([], options=opts)
    for r in (a, b):
        r.wait_log("(connected)")
    cool_cheap(a, mock)
    wait_for(lambda: status(b)["state"] == "cooling", what="B sees the cooldown")
    seen = wait_for(lambda: p if len(p := probes_seen(mock)) >= 6 else None, timeout=30, what="six probes")
    times = sorted(r["t"] for r in seen)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    # The lock lasts one interval: probes are about `every` apart whichever instance sends
    # them (without it, two instances' probes land anywhere, often a few ms apart).
    assert min(gaps) >= 0.5 * every, gaps
    sent = status(a)["probe"]["sent"] + status(b)["probe"]["sent"]
    assert sent >= len(seen)
    mock.call("DELETE", "/_mock/faults/cheap")
    for r in (a, b):
        wait_for(lambda r=r: status(r)["state"] == "healthy", what="healthy on both instances")


def window_fault(mock, name: str, reset: str, window: str = "5h") -> None:
    mock.fault(name, status=429, error_type="rate_limit_error", times=1, headers={
        f"anthropic-ratelimit-unified-{window}-status": "rejected",
        f"anthropic-ratelimit-unified-{window}-reset": reset,
        "anthropic-ratelimit-unified-status": "rejected",
    })


def test_a_used_up_5h_window_cools_the_endpoint_until_its_reset(mock, start_router, tmp_path):
    router = start_router([], options={"router_config": str(write_config(tmp_path / "r.yaml", mock))})
    window_fault(mock, "cheap", str(int(time.time()) + 7200))
    assert post(router).headers["x-router-attempts"] == "cheap:429, dear:200"  # one answer is enough
    cheap = status(router)
    assert cheap["state"] == "cooling"
    assert 7000 < cheap["cooldown_seconds_left"] <= 7200
    assert cheap["probe"]["held_seconds_left"] > 7000  # no probe: the window will not reopen sooner
    assert post(router).headers["x-router-attempts"] == "dear:200"
    assert "subscription window is used up" in router.log()


def test_a_window_cooldown_is_capped_by_router_window_cap(mock, start_router, tmp_path):
    config = write_config(tmp_path / "r.yaml", mock, extra="  window_cap: 600")
    router = start_router([], options={"router_config": str(config)})
    reset = datetime.fromtimestamp(time.time() + 3 * 86400, UTC).isoformat().replace("+00:00", "Z")
    window_fault(mock, "cheap", reset, window="7d")  # RFC 3339, three days away
    post(router)
    cheap = status(router)
    assert cheap["state"] == "cooling" and 500 < cheap["cooldown_seconds_left"] <= 600


def test_a_window_on_the_clients_own_key_cools_only_that_key(mock, start_router, tmp_path):
    config = write_config(tmp_path / "r.yaml", mock, cheap_key=False, probe="false",
                          )
    router = start_router([], options={"router_config": str(config)})
    window_fault(mock, "cheap", str(int(time.time()) + 7200))
    assert post(router, **{"x-api-key": "sk-client-1a2b3c4d"}).status_code == 200
    cheap = status(router)
    assert cheap["state"] == "healthy" and cheap["cooling_for_keys"] == 1
    assert 7000 < cheap["keys_cooldown_seconds_left"] <= 7200
    assert post(router, **{"x-api-key": "sk-client-9f8e7d6c"}).headers["x-router-attempts"] == "cheap:200"


def test_an_overloaded_model_family_recovers_through_a_one_token_message_probe(mock, start_router, tmp_path):
    sonnet = {**MSG, "model": "claude-sonnet-4-5"}
    config = write_config(tmp_path / "r.yaml", mock, probe=f"{{path: /v1/messages, model: claude-sonnet-4-5, "
                                                           f"every: {EVERY}, usd_per_hour: 1}}")
    config.write_text(config.read_text().replace("    probe:", "    price: {input: 1, output: 5}\n    probe:", 1))
    router = start_router([], options={"router_config": str(config)})
    mock.fault("cheap", status=529, error_type="overloaded_error")
    for _ in range(3):
        httpx.post(f"{router.base}/v1/messages", json=sonnet, timeout=30)
    cheap = status(router)
    assert cheap["families"]["sonnet"]["state"] == "cooling"  # a 529 on one model cools its family
    wait_for(lambda: status(router)["probe"]["failed"] >= 1, what="a failed probe")
    mock.call("DELETE", "/_mock/faults/cheap")
    wait_for(lambda: "sonnet" not in (status(router).get("families") or {}), what="the family healthy again")
    sent = [r for r in user_requests(mock)
            if not any(k.lower() == "user-agent" and "httpx" in v for k, v in r["headers"])]
    assert len(sent) >= 2 and sent[-1]["outcome"] == "200"  # failed probes, then the passing one
    r = httpx.post(f"{router.base}/v1/messages", json=sonnet, timeout=30)
    assert r.headers["x-router-attempts"] == "cheap:200"
    assert status(router)["probe"]["usd_last_hour"] > 0


def test_a_window_seen_by_one_instance_stops_every_instances_probes(mock, start_router, tmp_path, redis_server):
    config = write_config(tmp_path / "r.yaml", mock)
    opts = {"router_config": str(config), "router_redis_url": redis_server.url}
    a, b = start_router([], options=opts), start_router([], options=opts)
    for r in (a, b):
        r.wait_log("(connected)")
    window_fault(mock, "cheap", str(int(time.time()) + 7200))
    assert post(a).headers["x-router-attempts"] == "cheap:429, dear:200"
    wait_for(lambda: status(b)["state"] == "cooling", what="B sees the cooldown")
    # B finds the pause A was asked for in Redis when its first probe is due, and keeps it.
    wait_for(lambda: status(b)["probe"]["held_seconds_left"] > 7000, what="B holds its probes")
    assert probes_seen(mock) == [] and status(b)["probe"]["sent"] == 0
    assert redis_server.cli("PTTL", "endpoint_health_|hold|cheap").isdigit()
