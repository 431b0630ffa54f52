"""How --workers scales: requests per second and streams held, one router process against N
workers behind HAProxy (claude_router.cli.workers), all on this machine.

    ./scripts/bench --scaling [--workers 1 2] [--seconds 5]
        [--concurrency 64] [--rounds 3] [--streams 400] [--json FILE]

Targets, each in front of the same upstreams: for req/s nginx with one fixed Messages answer
(--upstream nginx, the default; installed with apt-get like haproxy and wrk: in real use the
upstream is another machine, here it shares the cores with the workers, so it should take as
little as a real server does) or the Python mock relay (--upstream mock, about a fifth of a core
at these rates); for the streams the mock relay (claude_router_dev.mock_relay), which paces SSE events:

    router     one plain mitmdump -s addon/router.py (memory store), no haproxy: the reference
    workers=N  claude_router.cli.workers: N workers + haproxy + their own redis-server

Throughput: --client wrk (the default when wrk is installed: a C load generator, one thread,
--concurrency keep-alive connections; every answer checked for 200 and X-Used-Endpoint) or
aiohttp (keep-alive clients, one connection each, like claude_router_dev.bench's; in Python it takes
a quarter to a third of a core at these rates, cores the proxies then lack), small
non-streaming POST /v1/messages, --seconds per target per round, rounds interleaved so machine
noise hits every target alike; the best and the median round are reported, with the CPU the
router processes used meanwhile (cores) and requests per router CPU-second, which machine noise
moves far less than req/s: equal values for N = 1 and N = 2 mean the workers scale with the
cores they get (the machine's busy cores, everyone's, are shown too). Streams held:
--streams concurrent SSE streams (10 words, 200 ms apart: ~2.5 s each) opened over --ramp s; how
many complete, the time to their first event (the router holds a stream until its first
content event, 2 mock gaps in), and how late their longest gap came. The client, the mock and
every server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from claude_router.cli import workers
from claude_router_dev import bench, harness

ROOT = workers.ROOT
HEADERS = {"content-type": "application/json", "x-api-key": "bench", "anthropic-version": "2023-06-01"}
BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
QUIET = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn"]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


def usage(pids: list[int], upstream: list[int]) -> tuple[float, float, float]:
    """CPU seconds so far of the router processes and the upstream, and the machine's busy
    seconds: take one before and one after a measurement and subtract."""
    return cpu_seconds(pids), cpu_seconds(upstream), machine_busy()


def since(before: tuple[float, float, float], pids: list[int], upstream: list[int]) -> dict:
    cpu, up, busy = (b - a for a, b in zip(before, usage(pids, upstream)))
    return {"cpu": cpu, "upstream_cpu": up, "busy": busy}


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def start_mock(tmp: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(harness.mock_argv("--port", "0", "--quiet", "--max-log", "1000",
                                              "--fault", 'slow={"event_gap_ms":200,"words":10}'),
                            stdout=subprocess.PIPE, stderr=open(tmp / "mock.log", "wb"), text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, line.strip().rsplit(" ", 1)[1]


# The throughput upstream: nginx answering every POST /ok/v1/messages with one fixed Messages
# answer. In real use the upstream is another machine; here it shares the two cores with the
# workers, so it should take as little of them as a real server does (the Python mock relay
# takes about a fifth of a core at these rates). The streams test keeps the mock (SSE pacing).
NGINX_ANSWER = json.dumps({
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello from ok."}], "stop_reason": "end_turn",
    "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 4}})
NGINX_CONF = bench.NGINX_HEAD + """\
    server {{
        listen 127.0.0.1:{port};
        location /ok/ {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
}}
"""


def wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str) -> str:
    """The URL of ``port`` once it accepts connections; RuntimeError if ``proc`` exits first
    or ``timeout`` passes."""
    try:
        harness.wait_port(port, proc, timeout)
    except (RuntimeError, TimeoutError):
        raise RuntimeError(f"{what} did not start") from None
    return f"http://127.0.0.1:{port}"


def start_nginx(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = harness.free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(master="off", tmp=tmp, port=port, answer=NGINX_ANSWER))
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx.log", "wb"),
                            stdin=subprocess.DEVNULL)
    return proc, wait_listening(proc, port, 10, f"nginx (see {tmp / 'nginx-error.log'})")


def start_router(tmp: Path, mock: str, ok: str | None = None) -> tuple[subprocess.Popen, str]:
    port = harness.free_port()
    proc = subprocess.Popen([workers.MITMDUMP, "-s", workers.ROUTER_SCRIPT, "--mode", workers.REVERSE,
                             "--listen-host", "127.0.0.1", "--listen-port", str(port),
                             "--set", f"confdir={tmp / 'conf'}", *QUIET,
                             "--set", f"router_endpoints=ok={ok or mock}/ok",
                             "--set", f"router_endpoints=slow={mock}/slow"],
                            stdout=open(tmp / "router.log", "wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return proc, wait_listening(proc, port, 60, "the router")


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["content-type"] = "application/json"
wrk.headers["x-api-key"] = "bench"
wrk.headers["anthropic-version"] = "2023-06-01"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or (headers["X-Used-Endpoint"] or headers["x-used-endpoint"]) ~= "ok" then
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d\\n", summary.requests, b,
    e.connect + e.read + e.write + e.timeout, summary.duration))
end
"""


async def throughput_wrk(url: str, conc: int, seconds: float, pids: list[int] = (),
                         upstream: list[int] = ()) -> dict:
    """The same measurement with wrk (C, one thread): the load generator then takes a small
    share of the cores the proxies compete for."""
    script = Path(tempfile.mkdtemp(prefix="wrk-")) / "post.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(BODY.decode())))

    async def run(secs: float) -> tuple[int, int, float]:
        proc = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{conc}", f"-d{secs:g}s", "--timeout", "30s", "-s", str(script),
            url + "/v1/messages", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        line = next((ln for ln in out.decode(errors="replace").splitlines()
                     if ln.startswith("WRK_RESULT")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result:\n{out.decode(errors='replace')[-800:]}")
        n, bad, failed, micros = (int(x) for x in line.split()[1:])
        return n - bad, bad + failed, micros / 1e6

    try:
        await run(1)  # connect and warm up
        before = usage(pids, upstream)
        done, errors, secs = await run(seconds)
        used = since(before, pids, upstream)
    finally:
        shutil.rmtree(script.parent, ignore_errors=True)
    await asyncio.sleep(0.2)
    return {"rps": done / secs, "errors": errors, **used}


async def throughput(url: str, conc: int, seconds: float, pids: list[int] = (),
                     upstream: list[int] = ()) -> dict:
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trust_env=False,
                                      timeout=aiohttp.ClientTimeout(total=30)) for _ in range(conc)]
    done = errors = 0

    async def post(s) -> bool:
        try:
            async with s.post(url + "/v1/messages", data=BODY, headers=HEADERS) as r:
                await r.read()
                return r.status == 200 and r.headers.get("x-used-endpoint") == "ok"
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    try:
        await asyncio.gather(*(post(s) for s in sessions))  # connect and warm up
        before = usage(pids, upstream)
        deadline = time.perf_counter() + seconds

        async def worker(s) -> None:
            nonlocal done, errors
            while time.perf_counter() < deadline:
                ok = await post(s)
                if time.perf_counter() > deadline:
                    break
                if ok:
                    done += 1
                else:
                    errors += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(s) for s in sessions))
        used = since(before, pids, upstream)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    await asyncio.sleep(0.2)
    return {"rps": done / seconds, "errors": errors, **used}


async def streams_held(url: str, n: int, ramp: float = 1.0) -> dict:
    """n concurrent streams, each on its own connection, opened evenly over ``ramp`` seconds
    (a burst of thousands of connects at one instant measures the accept queue instead).
    Each stream has 10 words 200 ms apart; lateness is how far the longest gap of a stream
    exceeded those 200 ms."""
    conn = aiohttp.TCPConnector(limit=0)
    firsts: list[float] = []
    late: list[float] = []
    errors: collections.Counter = collections.Counter()
    ok = 0
    async with aiohttp.ClientSession(connector=conn, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def one(i: int) -> None:
            nonlocal ok
            await asyncio.sleep(ramp * i / n)
            t0 = time.perf_counter()
            try:
                async with s.post(url + "/slow/v1/messages", data=STREAM_BODY, headers=HEADERS) as r:
                    first = last = None
                    gap = 0.0
                    body = b""
                    async for chunk in r.content.iter_any():
                        now = time.perf_counter()
                        if first is None:
                            first = now - t0
                        elif b"content_block_delta" in chunk:
                            gap = max(gap, now - last)
                        last = now
                        body += chunk
                    if r.status == 200 and b"message_stop" in body:
                        ok += 1
                        firsts.append(first)
                        late.append(max(0.0, gap - 0.2))
                    else:
                        errors[f"HTTP {r.status}" if r.status != 200 else "cut"] += 1
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                errors[type(e).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    firsts.sort()
    late.sort()

    def pick(xs: list[float], q: float):
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    return {"ok": ok, "of": n, "first_event_p50_ms": pick(firsts, 0.5),
            "first_event_p99_ms": pick(firsts, 0.99), "late_gap_p99_ms": pick(late, 0.99),
            "wall_s": round(wall, 2), "errors": dict(errors)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=400, help="0: skip the streams test")
    ap.add_argument("--ramp", type=float, default=1.0, help="seconds over which the streams open")
    ap.add_argument("--client", choices=["wrk", "aiohttp"],
                    help="load generator for req/s: wrk (C; the default when installed) or "
                         "aiohttp (Python, as ./scripts/bench: it takes a larger share of the cores)")
    ap.add_argument("--upstream", choices=["nginx", "mock"],
                    help="upstream for req/s: nginx with a fixed answer (the default when "
                         "installed or installable: a real server takes little of the cores the "
                         "workers need) or the Python mock relay")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.upstream is None:
        try:
            workers.ensure_installed("nginx", "nginx")
        except SystemExit:
            print("# nginx could not be installed: the mock relay is the upstream", flush=True)
        args.upstream = "nginx" if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "mock"
    if args.client is None:
        try:
            workers.ensure_installed("wrk", "wrk")  # apt-get, as for haproxy
        except SystemExit:
            print("# wrk could not be installed: measuring with the aiohttp client", flush=True)
        args.client = "wrk" if shutil.which("wrk") else "aiohttp"
    measure = throughput_wrk if args.client == "wrk" else throughput
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    procs: list[subprocess.Popen] = []
    clusters: list[workers.Cluster] = []
    ok = False
    try:
        mock_proc, mock = start_mock(tmp)
        procs.append(mock_proc)
        up_proc, ok = start_nginx(tmp) if args.upstream == "nginx" else (mock_proc, mock)
        if up_proc is not mock_proc:
            procs.append(up_proc)
        router_proc, router_url = start_router(tmp, mock, ok)
        procs.append(router_proc)
        targets = {"router": router_url}
        procs_of = {"router": lambda: [router_proc.pid]}
        for n in args.workers:
            (tmp / f"w{n}").mkdir()
            c = workers.start_cluster(n, [f"ok={ok}/ok", f"slow={mock}/slow"], tmp=tmp / f"w{n}",
                                      extra=["--set", f"confdir={tmp / 'conf'}", *QUIET])
            clusters.append(c)
            targets[f"workers={n}"] = c.url
            procs_of[f"workers={n}"] = lambda c=c: [w["pid"] for w in c.refresh()["workers"]]
        print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before; concurrency "
              f"{args.concurrency}, {args.seconds:g} s x {args.rounds} rounds per target, "
              f"client {args.client}, upstream {args.upstream}", flush=True)
        rps: dict[str, list[float]] = {t: [] for t in targets}
        errs: dict[str, int] = {t: 0 for t in targets}
        router_cpu = {t: 0.0 for t in targets}  # CPU seconds of the router processes
        busy = {t: 0.0 for t in targets}  # the machine's busy CPU seconds (everyone's)
        upstream_cpu = {t: 0.0 for t in targets}
        names = list(targets)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for t in order:
                res = asyncio.run(measure(targets[t], args.concurrency, args.seconds, procs_of[t](),
                                          [up_proc.pid]))
                router_cpu[t] += res["cpu"]
                upstream_cpu[t] += res["upstream_cpu"]
                busy[t] += res["busy"]
                rps[t].append(res["rps"])
                errs[t] += res["errors"]
                print(f"round {rnd + 1}: {t:10} {res['rps']:7.0f} req/s  errors {res['errors']}", flush=True)
        wall = args.rounds * args.seconds
        held = {}
        if args.streams:
            for t in names:
                held[t] = asyncio.run(streams_held(targets[t], args.streams, args.ramp))
                print(f"streams: {t:10} {held[t]}", flush=True)
        base = statistics.median(rps["router"])
        one = statistics.median(rps["workers=1"]) if "workers=1" in rps else None
        print("\n| target | req/s median | req/s best | vs router | vs workers=1 | errors | router "
              "CPU cores | req per router CPU-s | upstream cores | machine busy cores |"
              + (f" streams ok of {args.streams} | first event p50 / p99 ms | late gap p99 ms |"
                 if held else ""))
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if held else ""))
        for t in names:
            med = statistics.median(rps[t])
            served = sum(rps[t]) * args.seconds
            row = (f"| {t} | {med:.0f} | {max(rps[t]):.0f} | {med / base:.2f}x | "
                   f"{f'{med / one:.2f}x' if one else 'n/a'} | {errs[t]} | "
                   f"{router_cpu[t] / wall:.2f} | {served / router_cpu[t]:.0f} | "
                   f"{upstream_cpu[t] / wall:.2f} | {busy[t] / wall:.2f} |")
            if held:
                h = held[t]
                row += (f" {h['ok']} | {h['first_event_p50_ms']} / {h['first_event_p99_ms']} |"
                        f" {h['late_gap_p99_ms']} |")
            print(row)
        if args.json:
            args.json.write_text(json.dumps({"rps": rps, "errors": errs, "streams": held,
                                             "router_cpu_s": router_cpu, "machine_busy_s": busy,
                                             "upstream_cpu_s": upstream_cpu,
                                             "args": {k: str(v) for k, v in vars(args).items()}},
                                            indent=2))
        ok = True
    finally:
        for c in clusters:
            c.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
