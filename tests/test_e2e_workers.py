"""Several router processes behind one address (claude_router.cli.workers, `./scripts/run --workers N`):
HAProxy in front, health and commands shared through Redis, a killed worker restarted while
the clients of the other worker see nothing."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from claude_router.cli import workers
from conftest import ROOT, free_port

if shutil.which("haproxy") is None:
    pytest.skip("haproxy is not installed (./scripts/test installs it as root; or: apt-get install haproxy)",
                allow_module_level=True)
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (./scripts/test installs it as root)", allow_module_level=True)


MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
STREAM = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def cluster(mock_session, tmp_path_factory):
    """Two workers, haproxy and their own redis-server, through the supervisor script."""
    tmp = tmp_path_factory.mktemp("workers")
    eps = [f"{n}={mock_session.url(n)}" for n in ("aws", "droid", "ultra")]
    c = workers.start_cluster(2, eps, tmp=tmp, extra=[
        "--set", f"confdir={tmp / 'conf'}", "--set", "termlog_verbosity=info"])
    yield c
    c.stop()
    for w in c.refresh()["workers"]:
        assert not _alive(w["pid"]), "a worker outlived the supervisor"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def status_cmd(c, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "claude_router.cli.status", "--redis", c.redis_url,
                          *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def requests_served(worker_url: str) -> float:
    text = httpx.get(f"{worker_url}/_router/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^claude_router_requests_total\{[^}]*\} (\S+)$', text, re.M))


def state_on(worker_url: str, name: str) -> str:
    doc = httpx.get(f"{worker_url}/_router/status", timeout=10).json()
    return next(e["state"] for e in doc["endpoints"] if e["name"] == name)


def wait_for(check, timeout: float = 5.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return result


async def haproxy(c, command: str) -> str:
    return await workers.haproxy_command(c.info["haproxy"]["socket"], command)


async def server_up(c, name: str) -> bool:
    """haproxy sends the worker connections (operational state 2: running)."""
    for line in (await haproxy(c, "show servers state workers")).splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[3] == name:
            return fields[5] == "2"
    return False


def test_one_address_serves_and_every_worker_takes_a_share(cluster, mock):
    before = [requests_served(u) for u in cluster.worker_urls]

    async def burst():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{cluster.url}/v1/messages", json=MSG,
                                                      headers={"connection": "close"})
                                          for _ in range(16)))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 16
    assert {r.headers["x-used-endpoint"] for r in answers} == {"aws"}
    gained = [requests_served(u) - b for u, b in zip(cluster.worker_urls, before)]
    print(f"\nrequests per worker: {gained}")
    assert sum(gained) == 16 and all(g > 0 for g in gained), gained
    # One view: scripts/status over both workers sums their counters.
    out = subprocess.run([sys.executable, "-m", "claude_router.cli.status", "--json",
                          *(a for u in cluster.worker_urls for a in ("--url", u))],
                         capture_output=True, text=True, timeout=30)
    doc = json.loads(out.stdout)
    served = {e["name"]: e["served"] for e in doc["endpoints"]}
    assert served["aws"] == sum(before) + 16 and doc["routers"]["answered"] == 2, doc


def test_ports_picked_together_are_all_different():
    """The supervisor picks its own, haproxy's stats and every worker's port at once: one at a
    time, the kernel handed out a just-released port twice (stats and w1 both on one port)."""
    ports = workers.free_ports(64)
    assert len(set(ports)) == 64


def test_front_config_for_several_machines_is_valid_haproxy(tmp_path):
    out = subprocess.run([sys.executable, "-m", "claude_router.cli.workers", "--front-config",
                          "10.0.0.1:8080", "10.0.0.2:8080", "--host", "0.0.0.0", "--port", "8080"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "server m1 10.0.0.1:8080" in out and "balance leastconn" in out
    cfg = tmp_path / "front.cfg"
    cfg.write_text(out.replace("/run/haproxy-router.sock", str(tmp_path / "s.sock")))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_status_disable_takes_an_endpoint_out_on_every_worker(cluster, mock):
    out = status_cmd(cluster, "--disable", "aws")
    assert "aws disabled on every router" in out and re.search(r"aws\s+disabled", out)
    try:
        for url in cluster.worker_urls:
            wait_for(lambda url=url: state_on(url, "aws") == "disabled")
            for _ in range(3):
                r = httpx.post(f"{url}/v1/messages", json=MSG, timeout=30)
                assert r.headers["x-router-attempts"] == "droid:200"
        assert mock.count("aws") == 0
    finally:
        status_cmd(cluster, "--enable", "aws")
    for url in cluster.worker_urls:
        wait_for(lambda url=url: state_on(url, "aws") == "healthy")
        assert httpx.post(f"{url}/v1/messages", json=MSG, timeout=30).headers["x-used-endpoint"] == "aws"


def test_failures_seen_by_one_worker_cool_the_endpoint_for_the_other(cluster, mock):
    w1, w2 = cluster.worker_urls
    mock.fault("aws", status=503)
    try:
        for _ in range(3):  # three failures, all on w1: aws cools
            assert httpx.post(f"{w1}/v1/messages", json=MSG, timeout=30).headers[
                "x-router-attempts"] == "aws:503, droid:200"
        assert mock.count("aws") == 3
        wait_for(lambda: state_on(w2, "aws") == "cooling")
        for _ in range(3):  # w2 never saw aws fail, and skips it
            assert httpx.post(f"{w2}/v1/messages", json=MSG, timeout=30).headers[
                "x-router-attempts"] == "droid:200"
        assert mock.count("aws") == 3
        mock.reset()
        out = status_cmd(cluster, "--reset", "aws")  # the operator's reset reaches both
        assert "health reset for aws" in out
        for url in (w1, w2):
            wait_for(lambda url=url: state_on(url, "aws") == "healthy")
            assert httpx.post(f"{url}/v1/messages", json=MSG, timeout=30).headers[
                "x-router-attempts"] == "aws:200"
    finally:
        mock.reset()
        status_cmd(cluster, "--reset")


# ------------------------------------------------------------------------------ the drill

@dataclass
class Req:
    client: int
    keepalive: bool
    port: int  # the client's local port: haproxy's `show sess` says which worker it reached
    start: float
    opened: float = 0.0  # when its connection was opened (before `start` when kept alive)
    head: float = 0.0  # when the answer's status line and headers arrived
    end: float = 0.0
    ok: bool = False
    error: str = ""
    reader: asyncio.StreamReader | None = field(default=None, repr=False)


async def read_response(reader: asyncio.StreamReader,
                        req: Req | None = None) -> tuple[int, bytes, bool]:
    """(status, body, server keeps the connection) of one HTTP/1.1 response (noting in ``req``
    when its head arrived)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if req is not None:
        req.head = time.monotonic()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
        return status, body, False
    return status, body, headers.get("connection", "").lower() != "close"


def request_bytes(keepalive: bool) -> bytes:
    body = json.dumps(STREAM).encode()
    return (b"POST /v1/messages HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
            b"x-api-key: drill\r\nanthropic-version: 2023-06-01\r\n"
            + (b"" if keepalive else b"connection: close\r\n")
            + b"content-length: %d\r\n\r\n" % len(body) + body)


async def client_loop(n: int, keepalive: bool, host: str, port: int, stop: asyncio.Event,
                      log: list[Req], timeout: float = 15, gate: asyncio.Event | None = None,
                      reuse_gate: asyncio.Event | None = None) -> None:
    """One client: a stream after another, on a new connection each time (curl, a fresh SDK
    client) or on one kept-alive connection (Claude Code's pool), reconnecting as a pool does
    when the connection was closed. A cleared ``gate`` holds the client's next request; a
    cleared ``reuse_gate`` holds only a request on a kept-alive connection."""
    conn, opened = None, 0.0
    while not stop.is_set():
        if gate is not None:
            await gate.wait()
        if reuse_gate is not None and conn is not None:
            await reuse_gate.wait()
        if conn is None or conn[0].at_eof() or conn[0].exception() is not None:
            if conn is not None:
                conn[1].close()
            conn = None
        req = Req(n, keepalive, 0, time.monotonic())
        log.append(req)
        try:
            async with asyncio.timeout(timeout):
                if conn is None:
                    opened = time.monotonic()
                    conn = await asyncio.open_connection(host, port)
                req.opened = opened
                reader, writer = conn
                req.reader = reader
                req.port = writer.get_extra_info("sockname")[1]
                writer.write(request_bytes(keepalive))
                await writer.drain()
                status, body, keep = await read_response(reader, req)
            req.ok = status == 200 and b"event: message_stop" in body
            req.error = "" if req.ok else f"HTTP {status}, {len(body)} bytes"
            if not (keepalive and keep):
                writer.close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                TimeoutError) as e:
            req.error = type(e).__name__
            if conn is not None:
                conn[1].close()
            conn = None
        req.end = time.monotonic()
        if not req.ok:
            await asyncio.sleep(0.01)


def sessions_by_port(show_sess: str) -> dict[int, str]:
    """Client port -> worker, from haproxy's `show sess`."""
    return {int(port): srv for port, srv in
            re.findall(r"src=[\d.]+:(\d+) fe=router be=workers srv=(\w+)", show_sess)}


DRILL_WORDS, DRILL_GAP = 20, 0.04  # a drill stream: 6 + 20 events, 40 ms apart at the mock
# The mock cannot send a stream faster than its pauses (one fewer than the events; one more
# left out for safety): a request younger than this cannot have had its end sent by anyone.
STREAM_AT_LEAST = (6 + DRILL_WORDS - 2) * DRILL_GAP


def test_drill_kill_9_one_worker_under_load(cluster, mock):
    """kill -9 one worker while 8 clients stream through the one address (4 on a new
    connection each time, 4 on kept-alive ones): the failures are exactly the streams in
    flight on the killed worker, every stream in flight on the other worker ends whole, every
    request started after the kill succeeds, and the worker is back and serves within seconds.

    Which worker served a stream: haproxy's `show sess` (client port -> server), taken just
    before the kill while no new request may start (a gate held for that moment), once every
    request in flight is listed there. The kill is made when every stream in flight on the
    victim is younger than the mock's shortest possible stream, so none of them can have been
    sent whole: each of them must fail, not just may. New connections go on at the kill;
    requests on kept-alive connections wait until the client has seen its connection to the
    killed worker closed (as a pool learns of it), then reconnect.

    Mutation that fails it (observed): in claude_router/cli/workers.py, haproxy not told of the death
    (no `state maint` in watch()) and no redispatch (`retries 0`, no `option redispatch`):
    requests started after the kill fail on the dead worker's port."""
    mock.fault("aws", event_gap_ms=round(DRILL_GAP * 1000), words=DRILL_WORDS)  # ~1 s streams
    host, port = "127.0.0.1", cluster.info["port"]
    victim = cluster.refresh()["workers"][0]
    survivor = cluster.info["workers"][1]

    async def drill():
        stop, gate, reuse = asyncio.Event(), asyncio.Event(), asyncio.Event()
        gate.set()
        reuse.set()
        log: list[Req] = []
        clients = [asyncio.create_task(client_loop(i, i % 2 == 1, host, port, stop, log,
                                                   gate=gate, reuse_gate=reuse))
                   for i in range(8)]
        # Before any kill: streams complete through the one address, and none fails.
        began = time.monotonic()
        while sum(r.ok for r in log) < 16:
            assert time.monotonic() - began < 60, f"streams do not complete before the kill: {log}"
            await asyncio.sleep(0.1)
        assert all(r.ok for r in log if r.end), [r for r in log if r.end and not r.ok]
        tries = 0
        while True:
            tries += 1
            assert tries < 100, "never a moment with young streams on both workers"
            gate.clear()  # no new request until the kill
            deadline = time.monotonic() + 10
            while True:  # every request in flight is on a connection haproxy lists
                where = sessions_by_port(await haproxy(cluster, "show sess"))
                flying = [r for r in log if not r.end]
                if all(r.port in where for r in flying):
                    break
                assert time.monotonic() < deadline, (flying, where)
                await asyncio.sleep(0.01)
            now = time.monotonic()
            on_victim = [r for r in flying if where[r.port] == victim["name"]]
            on_survivor = [r for r in flying if where[r.port] == survivor["name"]]
            if on_victim and on_survivor and all(now - r.start < STREAM_AT_LEAST - 0.1 for r in on_victim):
                break
            gate.set()
            await asyncio.sleep(0.1)
        reuse.clear()
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        gate.set()  # new connections at once: they must all be served by the other worker
        while _alive(victim["pid"]):
            await asyncio.sleep(0.001)
        dead = time.monotonic()
        # Kept-alive connections to the killed worker: their clients see them closed.
        stale = [r for r in log if r.keepalive and where.get(r.port) == victim["name"]
                 and r.reader is not None]
        while not all(r.reader.at_eof() or r.reader.exception() is not None
                      or (r.end and not r.ok) for r in stale):
            assert time.monotonic() - killed < 15, "a kept-alive connection to the dead worker stayed open"
            await asyncio.sleep(0.01)
        reuse.set()
        # Back: a new process listening, and haproxy sending it connections again.
        while True:
            info = cluster.refresh()["workers"][0]
            if info["pid"] != victim["pid"] and await server_up(cluster, victim["name"]):
                break
            assert time.monotonic() - killed < 30, "the killed worker was not restarted"
            await asyncio.sleep(0.05)
        back = time.monotonic()
        served_before = requests_served(victim["url"])
        while requests_served(victim["url"]) <= served_before:  # and it serves again
            assert time.monotonic() - back < 30, "the restarted worker gets no request"
            await asyncio.sleep(0.1)
        while sum(r.start > back for r in log) < 16:  # load goes on after its return
            assert time.monotonic() - back < 60
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*clients)
        return log, where, on_victim, on_survivor, killed, dead, back, info, tries

    log, where, on_victim, on_survivor, killed, dead, back, info, tries = asyncio.run(drill())
    failed = [r for r in log if not r.ok]
    after = [r for r in log if r.start > killed]
    print(f"\ndrill: {len(log)} streams by 8 clients (4 new-connection, 4 keep-alive); "
          f"kill -9 of {victim['name']} (at try {tries}) with {len(on_victim)} in flight on it "
          f"and {len(on_survivor)} on {survivor['name']}; {len(failed)} failed: "
          f"{[(r.client, where.get(r.port, '?'), r.error) for r in failed]}; "
          f"{len(after)} started after the kill, {sum(r.ok for r in after)} ok "
          f"(slowest {max((r.end - r.start for r in after), default=0):.2f} s); dead "
          f"{(dead - killed) * 1000:.0f} ms after the kill, back in {back - killed:.2f} s, "
          f"pid {victim['pid']} -> {info['pid']}")
    # Exactly the streams in flight on the killed worker failed.
    assert sorted(id(r) for r in failed) == sorted(id(r) for r in on_victim), (failed, on_victim)
    assert all(r.ok for r in on_survivor)
    # Every request started after the kill was served.
    assert len(after) >= 16 and all(r.ok for r in after), [r for r in after if not r.ok]
    # Restarted within seconds, and serving again through the one address.
    assert back - killed < 20
    assert info["restarts"] == 1


def test_scripts_run_workers_demo_and_clean_stop(tmp_path):
    """The real entry point: ./scripts/run --workers 2 --demo, then SIGTERM stops everything."""
    info_file = tmp_path / "workers.json"
    port = free_port()
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run"), "--workers", "2", "--demo", "--port", str(port),
         "--worker-base", "0", "--info-file", str(info_file), "--log-dir", str(tmp_path),
         "--", "--set", f"confdir={tmp_path / 'conf'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        info = workers.wait_ready(proc, info_file, timeout=90)
        r = httpx.post(f"{info['url']}/v1/messages", json=MSG, timeout=30)
        assert r.status_code == 200
        assert r.headers["x-router-attempts"] == "aws:529, droid:reset, ultra:200"
        pids = [w["pid"] for w in info["workers"]] + [info["haproxy"]["pid"]]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"2 router workers behind haproxy on http://127.0.0.1:{port}" in out
    assert "--disable NAME" in out and "Demo: mock relay" in out
    assert not any(_alive(p) for p in pids)
    assert not Path(info["run_dir"]).exists()


def test_a_second_ctrl_c_stops_at_once(mock, tmp_path):
    """./scripts/run --workers 2, as in a terminal (SIGINT to its process group): the first
    Ctrl-C drains (a long stream in flight goes on, the supervisor waits for it); a second one
    stops everything at once: the stream is cut and every process is gone within seconds, long
    before the stream or the drain (60 s) would have ended.

    Mutation that fails it (observed): in claude_router/cli/workers.py, on_signal() without its
    ``signals > 1`` branch (a second Ctrl-C ignored): the supervisor waits for the stream."""
    mock.fault("aws", event_gap_ms=100, words=300)  # a stream of about 30 s
    info_file = tmp_path / "workers.json"
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run"), "--workers", "2", "--port", str(free_port()),
         "--worker-base", "0", "--info-file", str(info_file), "--log-dir", str(tmp_path),
         "--drain", "60", "--", "--set", f"confdir={tmp_path / 'conf'}",
         "--set", f"router_endpoints=aws={mock.url('aws')}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cut, events_after_first = False, 0
    try:
        info = workers.wait_ready(proc, info_file, timeout=90)
        pids = [w["pid"] for w in info["workers"]] + [info["haproxy"]["pid"], info["redis_pid"]]
        with httpx.stream("POST", f"{info['url']}/v1/messages", json=STREAM, timeout=60) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            while "content_block_delta" not in next(lines):
                pass
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            while events_after_first < 10:  # the stream goes on while the workers drain
                events_after_first += next(lines).startswith("event:")
            assert proc.poll() is None, "the first Ctrl-C did not wait for the stream in flight"
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C again
            second = time.monotonic()
            try:
                for line in lines:
                    assert "message_stop" not in line, "the stream ran to its end"
                    assert time.monotonic() - second < 20, "the stream goes on after a second Ctrl-C"
            except httpx.HTTPError:
                cut = True
        out, _ = proc.communicate(timeout=max(1.0, 20 - (time.monotonic() - second)))
        stopped = time.monotonic() - second
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"\nsecond Ctrl-C: everything stopped in {stopped:.2f} s ({events_after_first} events "
          f"arrived after the first); the stream was cut: {cut}")
    assert cut
    assert stopped < 20  # (the stream had more than 25 s to go)
    assert not any(_alive(p) for p in pids if p)
    assert "2 router workers behind haproxy" in out


def test_tls_and_http2_pass_through_the_balancer_untouched(cluster, mock):
    """HAProxy runs in mode tcp: a client's TLS handshake and HTTP/2 reach a worker's own
    mitmproxy, which streams as it does without the balancer: each event on its own, about
    when the upstream sent it (the checks of tests/test_e2e_streaming.py, margins for a busy
    machine), not bunched at the end.

    Mutation that fails it (observed): in claude_router/cli/workers.py, every worker also loads an addon
    that sets ``flow.response.stream = False`` after the router (buffered answers): the gaps
    collapse to ~0 and the stream arrives at once."""
    from streams import GAP, WIRE_EVENTS, h2_streams, timing
    from test_e2e_streaming import assert_streamed
    mock.fault("aws", event_gap_ms=round(GAP * 1000), words=3)
    port = int(cluster.url.rsplit(":", 1)[1])
    alpn, results = h2_streams(port, 3)
    assert alpn == "h2"
    pairs = []
    for headers, types, times in results:
        assert headers[":status"] == "200" and headers["x-used-endpoint"] == "aws"
        assert types == WIRE_EVENTS
        p = timing(types, times)
        pairs += p
        # The first content event came well before the last: spread out, not one flush.
        first = next(i for i, t in enumerate(types) if t not in ("message_start", "ping"))
        assert times[-1] - times[first] >= 0.5 * sum(e for _, e in p), (types, times)
    gaps = sorted(m for m, _ in pairs)
    assert gaps[len(gaps) // 2] >= 0.5 * GAP, gaps  # the median gap: at least half the mock's
    assert_streamed(pairs)


ROLLING_AT_LEAST = 1000  # answered while the workers are being replaced (docs/operations.md)


def test_a_rolling_restart_under_load_loses_no_request(mock, tmp_path):
    """SIGUSR2 to the supervisor: each worker drained (no new connections, keep-alive clients
    told to leave, its requests finished) and replaced, one at a time, while SDK clients keep
    sending requests and streams: not one fails, even with the SDK's retries off, out of the
    thousand or so answered while the workers are being replaced.

    Mutation that fails it (observed): in claude_router/cli/workers.py, rolling_restart() stops the
    worker with SIGTERM (mitmproxy's own stop, at once) instead of SIGUSR1 (drain): the
    requests it had in flight fail."""
    import threading

    import anthropic

    mock.fault("aws", event_gap_ms=40, words=10)  # streams of about half a second
    c = workers.start_cluster(2, [f"aws={mock.url('aws')}"], tmp=tmp_path, extra=[
        "--set", f"confdir={tmp_path / 'conf'}", "--set", "termlog_verbosity=info"])
    try:
        before = {w["name"]: w["pid"] for w in c.info["workers"]}
        stop = threading.Event()
        done: list[tuple[int, float]] = []
        failed: list[str] = []
        threads: list[threading.Thread] = []

        def load(n: int) -> None:
            client = anthropic.Anthropic(base_url=c.url, api_key="test", max_retries=0, timeout=30)
            while not stop.is_set():
                try:
                    if n % 4 == 3:
                        with client.messages.stream(**MSG) as s:
                            assert s.get_final_message().stop_reason == "end_turn"
                    else:
                        assert client.messages.create(**MSG).content
                    done.append((n, time.monotonic()))
                except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                    failed.append(f"{e!r} ({e.__cause__!r})")

        threads += [threading.Thread(target=load, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: len(done) >= 50, timeout=60, every=0.1)  # the load runs
        c.proc.send_signal(signal.SIGUSR2)
        began = time.monotonic()
        replaced = wait_for(lambda: all(
            w["pid"] != before[w["name"]] for w in c.refresh()["workers"]), timeout=120, every=0.2)
        # ... and both successors are in rotation again (the supervisor's rolling restart done).
        wait_for(lambda: all(asyncio.run(server_up(c, w["name"])) for w in c.info["workers"]),
                 timeout=90, every=0.2)
        ended = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        c.stop()
    assert replaced, f"the workers were not replaced: {c.info['workers']}"
    during = [t for _, t in done if began <= t <= ended]
    print(f"\nrolling restart of 2 workers in {ended - began:.1f} s: {len(during)} requests answered "
          f"meanwhile ({len(done)} in all, by 8 SDK clients, 2 of them streaming), {len(failed)} failed")
    assert failed == [], (len(done), failed[:5])
    assert len(during) >= ROLLING_AT_LEAST, len(during)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stopping_the_workers_lets_the_stream_in_flight_finish(mock, tmp_path, sig):
    """SIGTERM (as Ctrl-C) or SIGHUP (the terminal closed) to the supervisor: haproxy takes no
    new connections, the stream in flight ends whole, then everything exits."""
    mock.fault("aws", event_gap_ms=100, words=20)  # about 2.5 s
    c = workers.start_cluster(2, [f"aws={mock.url('aws')}"], tmp=tmp_path, extra=[
        "--set", f"confdir={tmp_path / 'conf'}", "--set", "termlog_verbosity=info"])
    pids = [w["pid"] for w in c.info["workers"]]
    try:
        with httpx.stream("POST", f"{c.url}/v1/messages", json=STREAM, timeout=30) as s:
            assert s.status_code == 200
            c.proc.send_signal(sig)
            body = s.read().decode()
        assert "message_stop" in body
        assert c.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{c.url}/v1/messages", json=MSG, timeout=5)
    finally:
        c.stop()
    assert not any(_alive(p) for p in pids)


def test_a_rolling_restart_stops_at_a_successor_that_cannot_start(mock, tmp_path):
    """A bad deploy (here: a config file broken after start) must not take every worker down:
    the first successor fails, the restart stops there, and the other worker goes on serving."""
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"endpoints:\n  - name: aws\n    url: {mock.url('aws')}\n")
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        c = workers.start_cluster(2, [], tmp=tmp_path, stdout=out, stderr=subprocess.STDOUT, extra=[
            "--set", f"confdir={tmp_path / 'conf'}", "--set", f"router_config={cfg}"])
    try:
        before = {w["name"]: w["pid"] for w in c.info["workers"]}
        cfg.write_text("endpoints: [this is not a config\n")
        time.sleep(1.5)  # the running workers see the broken file and keep their last good one
        c.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "stopping here" in log.read_text(), timeout=60, every=0.2)
        after = {w["name"]: w["pid"] for w in c.refresh()["workers"]}
        assert after["w2"] == before["w2"] and _alive(before["w2"])
        for _ in range(6):
            r = httpx.post(f"{c.url}/v1/messages", json=MSG, timeout=30)
            assert r.status_code == 200 and r.headers["x-used-endpoint"] == "aws"
    finally:
        c.stop()
