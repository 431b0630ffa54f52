"""Two real router instances sharing health through a real redis-server."""

import asyncio
import threading
import time

import httpx

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def pair(start_router, mock, url, **options):
    """Two routers (A, B) on one Redis, both synced before use."""
    opts = {"router_redis_url": url, **{k: str(v) for k, v in options.items()}}
    routers = [start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"], options=opts)
               for _ in range(2)]
    for r in routers:
        r.wait_log("(connected)")
    return routers


def post(router) -> httpx.Response:
    return httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)


def test_failures_on_any_instance_cool_the_endpoint_for_all(mock, start_router, redis_server):
    mock.fault("aws", status=503)
    a, b = pair(start_router, mock, redis_server.url)
    post(a), post(b), post(a)  # three failures, seen by two instances
    assert mock.count("aws") == 3
    for router in (a, b, b, a):
        assert post(router).headers["x-router-attempts"] == "droid:200"
    assert mock.count("aws") == 3


def test_a_trip_on_one_instance_is_skipped_by_the_other_within_a_second(mock, start_router, redis_server):
    mock.fault("aws", status=503)
    a, b = pair(start_router, mock, redis_server.url)
    for _ in range(3):
        post(a)
    with httpx.Client(base_url=b.base, timeout=30) as client:
        client.get("/v1/models")  # connect first, so the timing below is one request
        tripped, tries = time.monotonic(), 0
        while "aws" in client.post("/v1/messages", json=MSG).headers["x-router-attempts"]:
            tries += 1
            assert time.monotonic() - tripped < 1.0
    print(f"\ninstance B skipped aws {1000 * (time.monotonic() - tripped):.1f} ms after A tripped it "
          f"({tries} requests still tried it)")


def test_exactly_one_probe_across_instances_after_cooldown(mock, start_router, redis_server):
    mock.fault("aws", status=503)
    a, b = pair(start_router, mock, redis_server.url, router_cooldown=1)
    for _ in range(3):
        post(a)
    # Recovered, but slow: the probe is still in flight when the last of the burst arrives,
    # however busy the machine (at 0.5 s, a loaded machine sent part of the burst after it).
    mock.fault("aws", delay_ms=5000)
    time.sleep(1.1)

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(
                client.post(f"{r.base}/v1/messages", json=MSG) for _ in range(25) for r in (a, b)))

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    assert mock.count("aws") == 3 + 1  # the three failures, then one probe
    assert sum(r.headers["x-used-endpoint"] == "aws" for r in answers) == 1
    # The probe succeeded: healthy again, on both instances once B has heard it from Redis
    # (within a second on a quiet machine; waited for, not timed, on a busy one).
    deadline = time.monotonic() + 30
    while (state := endpoint_state(b, "aws")) != "healthy":
        assert time.monotonic() < deadline, f"aws still {state} at B"
        time.sleep(0.1)
    assert post(b).headers["x-used-endpoint"] == "aws"


def endpoint_state(router, name: str) -> str:
    doc = httpx.get(f"{router.base}/_router/status", timeout=30).json()
    return next(e["state"] for e in doc["endpoints"] if e["name"] == name)


def test_repeated_trips_cool_for_longer(mock, start_router, redis_server):
    mock.fault("aws", status=503)
    a, b = pair(start_router, mock, redis_server.url, router_cooldown=1)
    for _ in range(3):
        post(a)
    time.sleep(1.05)
    assert "aws:503" in post(b).headers["x-router-attempts"]  # the probe fails: cooled again
    probed = time.monotonic()
    while time.monotonic() - probed < 1.6:  # the second cooldown is 2-2.4 s, not 1 s
        assert post(a).headers["x-router-attempts"] == "droid:200"
        time.sleep(0.1)
    assert mock.count("aws") == 4


def test_redis_killed_and_restarted_mid_load_fails_no_request(mock, start_router, own_redis):
    server = own_redis()
    a, b = pair(start_router, mock, server.url)
    results: list[int] = []
    stop = threading.Event()

    def load(router):
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                results.append(client.post(f"{router.base}/v1/messages", json=MSG).status_code)

    threads = [threading.Thread(target=load, args=(r,)) for r in (a, b) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    server.stop()
    time.sleep(1.5)
    server.start()
    for r in (a, b):
        r.wait_log("reachable again", timeout=10)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    print(f"\n{len(results)} requests during the Redis outage drill")
    assert len(results) > 100 and set(results) == {200}
    for r in (a, b):
        assert r.log().count("unavailable") == 1
        assert r.log().count("reachable again") == 1


def test_wrong_redis_password_is_reported_and_the_router_serves(mock, start_router, own_redis):
    server = own_redis(password="right-password")
    url = server.url.replace("right-password", "wrong-password")
    router = start_router([f"aws={mock.url('aws')}"], options={"router_redis_url": url})
    log = router.wait_log("endpoints in price order")
    assert "authentication failed" in log
    assert post(router).status_code == 200
    assert "wrong-password" not in router.log()


def test_redis_down_at_startup_serves_locally_then_joins_when_it_comes_up(mock, start_router, tmp_path):
    from conftest import RedisServer, _need_redis
    _need_redis()
    server = RedisServer(tmp_path)  # not started yet
    mock.fault("aws", status=503)
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
                          options={"router_redis_url": server.url})
    log = router.wait_log("endpoints in price order")
    assert "unreachable: local view" in log and "unavailable" in log
    for _ in range(3):
        assert post(router).status_code == 200  # served on local state
    assert post(router).headers["x-router-attempts"] == "droid:200"  # cooled locally
    try:
        server.start()
        router.wait_log("reachable again", timeout=10)
        assert post(router).status_code == 200
        assert router.log().count("unavailable") == 1
    finally:
        server.stop()


def test_invented_session_ids_keep_redis_under_its_bound(mock, start_router, tmp_path, redis_server):
    """One client inventing a session id per request (20,000 in the issue; 3,000 here against a
    bound of 200, the same code path) never grows Redis past the bound."""
    from concurrent.futures import ThreadPoolExecutor

    from test_e2e_sessions import start
    router = start(start_router, mock, tmp_path, cheap=1.0, router_redis_url=redis_server.url,
                   router_key_prefix="bounded", router_max_sessions=200)
    router.wait_log("(connected)")
    body = {"model": "claude-sonnet-4-5", "max_tokens": 8,
            "system": [{"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hi"}]}

    local = threading.local()

    def ask(i: int) -> int:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=router.base, timeout=30)
        return local.client.post("/v1/messages", json=body, headers={
            "x-claude-code-session-id": f"invented-{i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(3_000))) == {200}
    deadline = time.monotonic() + 20
    while router.log().count('"path": "/v1/messages"') < 3_000 and time.monotonic() < deadline:
        time.sleep(0.1)
    sessions = [k for k in redis_server.cli("--scan", "--pattern", "bounded|s|*").split()]
    assert 150 <= len(sessions) <= 200
