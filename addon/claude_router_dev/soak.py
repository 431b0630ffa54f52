"""Soak: many mixed requests through a real router while faults come and go on every endpoint.

Run it through ``scripts/soak`` (it picks the project's venv). Everything runs on 127.0.0.1:
the mock relay (claude_router_dev.mock_relay), a raw server that answers garbage, a port where nothing
listens, one mitmdump with the router in front of them, and asyncio clients (HTTP/1.1, and
HTTP/2 for every 8th request).

    ./scripts/soak                          20,000 requests, concurrency 32
    ./scripts/soak --requests 2000          a short run (what the drill suite does)
    ./scripts/soak --seed 7 --json out.json the same faults again; the figures as JSON

Endpoints, cheapest first: a, dead (refused), b, junk (not HTTP), c, d. Every 100 ms a random
mock endpoint gets a random fault: error statuses (5xx, 429, 4xx), resets before the headers,
after them and mid-stream, error events and stalls before and after content, slow headers.
`d`, the last tier, only gets brief faults, as a reliable official API would.

Each answer is checked and falls in one of three classes:

    ok                 200 with the right body (the client's own nonce in the answer text)
    upstream error     an upstream's failure, answered in the Anthropic error shape: a JSON
                       error body (the upstream's, or the router's 502/529 naming the upstream
                       failures), or a stream that ends with a well-formed `event: error`
                       after content had reached the client
    router error       anything else: a transport error, a cut stream, mitmproxy's own HTML
                       502, the router's 500 "failed internally", a wrong or missing nonce

It prints the figures and exits 1 if there was any router error, a traceback or addon error in
the router log, attempts the upstreams saw that no answer accounts for, memory growth over
--max-growth MiB between warm-up and the end, or sockets the router left in CLOSE_WAIT once the
clients have gone (fds it will never close).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from claude_router_dev import harness
from claude_router_dev.harness import MockRelay, free_port, sse_events

MOCK_ENDPOINTS = ("a", "b", "c", "d")
LOG_PROBLEMS = ("Traceback", "Addon error", "failed internally", "handoff failed")

# (weight, fault). Faults may also hit after content has reached the client: then the stream
# must end with an `event: error`. `d` gets faults too, less often (see FaultFlipper).
FAULTS = [
    (20, {}),
    (2, {"status": 529}), (2, {"status": 500}), (1, {"status": 503, "retry_after": 1}),
    (1, {"status": 429, "retry_after": 1}), (1, {"status": 401}),
    (1, {"status": 400, "error_type": "invalid_request_error", "message": "bad request (drill)"}),
    (1, {"status": 404}), (1, {"status": 413}),
    (2, {"reset": "before_headers"}), (1, {"reset": "after_headers"}),
    (1, {"reset": "mid_stream", "reset_after_events": 1}),
    (1, {"reset": "mid_stream", "reset_after_events": 5}),
    (1, {"stream_error": "overloaded_error", "stream_error_after": 1}),
    (1, {"stream_error": "api_error", "stream_error_after": 5}),
    (1, {"end_after_events": 1}),
    (1, {"delay_ms": 100}), (1, {"delay_ms": 2500}),
    (1, {"stall_ms": 1500, "stall_after_events": 1}),
    (1, {"stall_ms": 1500, "stall_after_events": 5}),
    (1, {"event_gap_ms": 5}),
]
# `d`, the last and dearest tier, is the reliable one: its faults are brief (`times`).
LAST_TIER_FAULTS = [
    (12, {}),
    (1, {"status": 529, "times": 2}), (1, {"reset": "before_headers", "times": 2}),
    (1, {"reset": "mid_stream", "reset_after_events": 5, "times": 1}),
    (1, {"delay_ms": 100}), (1, {"event_gap_ms": 5}),
]


def close_wait(pid: int) -> int:
    """The process's TCP sockets in CLOSE_WAIT: closed by the peer, never by the process."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            count += parts[9] in inodes and parts[3] == "08"
    return count


def proc_stats(pid: int) -> dict:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return {"rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "hwm_mib": round(int(fields["VmHWM"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "close_wait": close_wait(pid)}


# -- the parts -----------------------------------------------------------------------------------


class Junk:
    """Answers every connection with bytes that are not HTTP."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(1)
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\nProtocol mismatch.\r\n")
            except OSError:
                pass
            finally:
                conn.close()

    def stop(self) -> None:
        self.sock.close()


class Router:
    def __init__(self, mock: MockRelay, junk: Junk, workdir: Path, options: dict) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "router.log"
        endpoints = [f"a={mock.base}/a", f"dead=http://127.0.0.1:{free_port()}/dead", f"b={mock.base}/b",
                     f"junk=http://127.0.0.1:{junk.port}/junk", f"c={mock.base}/c", f"d={mock.base}/d"]
        args = harness.router_argv(self.port, endpoints, confdir=workdir, options=options)
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     env=harness.clean_env())
        try:
            harness.wait_port(self.port, self.proc, timeout=30)
        except RuntimeError:
            raise RuntimeError(f"router exited:\n{self.log()}") from None
        except TimeoutError:
            raise RuntimeError(f"router did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        harness.stop(self.proc, grace=10)


class FaultFlipper:
    """Every ``every`` seconds, one random mock endpoint gets one random fault (or none)."""

    def __init__(self, mock: MockRelay, rand: random.Random, every: float = 0.1) -> None:
        self.mock, self.rand, self.every = mock, rand, every
        self.flips = 0
        self.injected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            name = self.rand.choice(MOCK_ENDPOINTS)
            weights, faults = zip(*(LAST_TIER_FAULTS if name == "d" else FAULTS))
            fault = self.rand.choices(faults, weights=weights)[0]
            try:
                self.mock.fault(name, **fault)
            except OSError:
                continue
            self.flips += 1
            self.injected += bool(fault) and fault != {"event_gap_ms": 5}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for name in MOCK_ENDPOINTS:
            self.mock.fault(name)


# -- checking answers ------------------------------------------------------------------------------


def is_error_shape(doc) -> bool:
    return (isinstance(doc, dict) and doc.get("type") == "error" and isinstance(doc.get("error"), dict)
            and isinstance(doc["error"].get("type"), str) and isinstance(doc["error"].get("message"), str))


def classify(kind: str, nonce: str, status: int, headers, body: bytes) -> tuple[str, str]:
    """('ok' | 'upstream' | 'router', detail)."""
    if status != 200:
        try:
            doc = json.loads(body)
        except ValueError:
            return "router", f"{status} with a body that is not JSON: {body[:80]!r}"
        if not is_error_shape(doc):
            return "router", f"{status} not in the Anthropic error shape: {body[:120]!r}"
        if "failed internally" in doc["error"]["message"]:
            return "router", f"{status} {doc['error']['message']}"
        return "upstream", f"{status} {doc['error']['type']}"
    used = headers.get("x-used-endpoint")
    expected = f"Hello from {used}. You said: {nonce}"
    if kind == "stream":
        events = sse_events(body, lenient=True)
        names = [n for n, _ in events]
        text = "".join(d["delta"].get("text", "") for n, d in events
                       if n == "content_block_delta" and isinstance(d, dict))
        if not names or names[0] != "message_start" or names.count("message_start") != 1:
            return "router", f"stream without one message_start: {names[:5]}"
        if names[-1] == "message_stop" and "error" not in names and text == expected:
            return "ok", ""
        if names[-1] == "error" and names.count("error") == 1 and is_error_shape(events[-1][1]) \
                and expected.startswith(text):
            return "upstream", "stream ended with event: error"
        return "router", f"stream cut or wrong: last events {names[-3:]}, text {text[:60]!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return "router", f"200 body not JSON: {body[:80]!r}"
    if kind == "message":
        ok = isinstance(doc, dict) and doc.get("content", [{}])[0].get("text") == expected
    elif kind == "count":
        ok = isinstance(doc, dict) and doc.get("input_tokens", 0) > 0
    else:
        ok = isinstance(doc, dict) and doc.get("data", [{}])[0].get("id") == "claude-sonnet-4-5"
    return ("ok", "") if ok else ("router", f"wrong 200 body for {kind}: {body[:120]!r}")


# -- the run ----------------------------------------------------------------------------------------


class _H2Only(ssl.SSLContext):
    """Offer only h2 in ALPN: httpx offers http/1.1 too, and mitmproxy would pick it."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(["h2"])


def _h2_context() -> ssl.SSLContext:
    ctx = _H2Only(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def _one(client: httpx.AsyncClient, kind: str) -> tuple[str, str, str]:
    nonce = f"nonce-{secrets.token_hex(8)}"
    msg = {"model": "mock-model", "max_tokens": 32, "messages": [{"role": "user", "content": nonce}]}
    if kind == "stream":
        req = client.build_request("POST", "/v1/messages", json={**msg, "stream": True})
    elif kind == "message":
        req = client.build_request("POST", "/v1/messages", json=msg)
    elif kind == "count":
        req = client.build_request("POST", "/v1/messages/count_tokens", json=msg)
    else:
        req = client.build_request("GET", "/v1/models")
    try:
        r = await client.send(req, stream=True)
        try:
            body = await r.aread()
        finally:
            await r.aclose()
    except Exception as e:  # noqa: BLE001 - any client-side failure is the router's to explain
        proto = "HTTP/2" if client._transport._pool._http2 else "HTTP/1.1"
        return "router", f"{proto} {kind}: {type(e).__name__}: {e}"[:200], ""
    cls, detail = classify(kind, nonce, r.status_code, r.headers, body)
    return cls, detail, r.headers.get("x-router-attempts", "")


async def _drive(base: str, port: int, n: int, concurrency: int, rand: random.Random,
                 on_progress) -> list[tuple[str, str, str, str]]:
    kinds = rand.choices(["stream", "message", "count", "models"], weights=[50, 35, 10, 5], k=n)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    results: list[tuple[str, str, str, str]] = []
    todo = iter(enumerate(kinds))
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as h1, \
            httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}", http1=False, http2=True,
                              verify=_h2_context(), timeout=60) as h2:
        async def worker():
            for i, kind in todo:
                cls, detail, attempts = await _one(h2 if i % 8 == 7 else h1, kind)
                results.append((kind, cls, detail, attempts))
                on_progress(len(results))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def run(requests: int = 20_000, concurrency: int = 32, seed: int | None = None, quiet: bool = False,
        max_growth: float = 30.0, settle: float = 0.0, keep_log: bool = True) -> dict:
    """Run the soak; return the figures (see ``report``). ``settle`` seconds are waited at the end
    for the idle upstream pool to drain before the last fd count. Without ``keep_log`` the
    router's log is deleted unless it shows a problem or a router error was seen."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rand = random.Random(seed)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    workdir = Path(tempfile.mkdtemp(prefix="claude-router-soak-"))
    mock, junk = harness.start_mock("--max-log", "0"), Junk()
    router = None
    try:
        router = Router(mock, junk, workdir, {"router_max_failures": 3, "router_cooldown": 1,
                                              "router_stream_timeout": 1, "router_headers_timeout": 2})
        pid = router.proc.pid
        say(f"soak: {requests} requests, concurrency {concurrency}, seed {seed}; router pid {pid}, "
            f"log {router.log_path}")
        flipper = FaultFlipper(mock, rand)
        samples: dict[str, dict] = {"start": proc_stats(pid)}
        warm_at, step = max(1, requests // 10), max(1, requests // 10)

        def progress(done: int) -> None:
            if done == warm_at:
                samples["warm"] = proc_stats(pid)
            if not quiet and done % step == 0:
                s = proc_stats(pid)
                say(f"  {done:>6} done, {time.monotonic() - started:6.1f} s, RSS {s['rss_mib']} MiB, "
                    f"fds {s['fds']}")

        started = time.monotonic()
        flipper.start()
        try:
            results = asyncio.run(_drive(router.base, router.port, requests, concurrency, rand, progress))
        finally:
            flipper.stop()
        took = time.monotonic() - started
        samples["end"] = proc_stats(pid)
        if settle:
            deadline = time.monotonic() + settle
            while proc_stats(pid)["fds"] > samples["start"]["fds"] + 5 and time.monotonic() < deadline:
                time.sleep(0.5)
        samples["settled"] = proc_stats(pid)
        seen = collections.Counter((r["endpoint"], r["method"]) for r in mock.call("GET", "/_mock/requests"))
        log = router.log()
    finally:
        if router is not None:
            router.stop()
        mock.stop()
        junk.stop()

    # What the upstreams saw must be what the answers say was tried: nothing lost, nothing extra.
    # (A GET the upstream resets is re-sent once by aiohttp itself and reported as one attempt:
    # a known bug, reported apart; see tests/test_drills.py.)
    attempted: collections.Counter[tuple[str, str]] = collections.Counter()
    failed_attempts = 0
    for kind, _, _, attempts in results:
        for a in filter(None, attempts.split(", ")):
            name, _, outcome = a.partition(":")
            attempted[(name, "GET" if kind == "models" else "POST")] += 1
            failed_attempts += not outcome.startswith(("2", "3"))
    unaccounted = {f"{n} {m}": seen[(n, m)] - attempted[(n, m)] for n in MOCK_ENDPOINTS for m in ("POST", "GET")
                   if seen[(n, m)] != attempted[(n, m)]}
    hidden_get_retries = sum(v for k, v in unaccounted.items() if k.endswith("GET"))
    unaccounted = {k: v for k, v in unaccounted.items() if k.endswith("POST")}
    classes = collections.Counter(cls for _, cls, _, _ in results)
    upstream_kinds = collections.Counter(d for _, cls, d, _ in results if cls == "upstream")
    router_errors = collections.Counter(d for _, cls, d, _ in results if cls == "router")
    problems = {p: log.count(p) for p in LOG_PROBLEMS if p in log}
    warm = samples.get("warm", samples["start"])
    figures = {
        "seed": seed,
        "requests": len(results),
        "by_kind": dict(collections.Counter(k for k, _, _, _ in results)),
        "seconds": round(took, 1),
        "requests_per_second": round(len(results) / took, 1),
        "fault_flips": flipper.flips,
        "faults_injected": flipper.injected,
        "failed_attempts": failed_attempts,
        "upstream_attempts": sum(attempted.values()),
        "ok": classes["ok"],
        "upstream_errors": classes["upstream"],
        "upstream_error_kinds": dict(upstream_kinds.most_common()),
        "router_errors": classes["router"],
        "router_error_kinds": dict(router_errors.most_common(10)),
        "unaccounted_attempts": unaccounted,
        "hidden_get_retries": hidden_get_retries,
        "log_problems": problems,
        "memory": samples,
        "rss_growth_mib": round(samples["end"]["rss_mib"] - warm["rss_mib"], 1),
    }
    figures["log"] = str(router.log_path)
    if not keep_log and figures["router_errors"] == 0 and not problems:
        shutil.rmtree(workdir, ignore_errors=True)
        figures["log"] = None
    figures["passed"] = (figures["router_errors"] == 0 and not problems and not unaccounted
                         and figures["rss_growth_mib"] <= max_growth
                         and samples["settled"]["close_wait"] == 0)
    return figures


def report(f: dict) -> str:
    m = f["memory"]
    warm = m.get("warm", m["start"])
    lines = [
        f"requests                {f['requests']}  {f['by_kind']}  in {f['seconds']} s "
        f"({f['requests_per_second']} req/s), seed {f['seed']}",
        f"faults injected         {f['faults_injected']} fault settings ({f['fault_flips']} flips); "
        f"{f['failed_attempts']} of {f['upstream_attempts']} upstream attempts failed",
        f"answered ok             {f['ok']}",
        f"upstream errors         {f['upstream_errors']} (answered in the Anthropic error shape) "
        f"{f['upstream_error_kinds']}",
        f"router errors           {f['router_errors']} (must be 0) {f['router_error_kinds']}",
        f"unaccounted attempts    {f['unaccounted_attempts'] or 'none'} (POSTs the upstreams saw that no "
        f"answer lists); GETs re-sent by aiohttp unseen: {f['hidden_get_retries']}",
        f"router log problems     {f['log_problems'] or 'none'}",
        f"router RSS              {m['start']['rss_mib']} MiB at start, {warm['rss_mib']} after warm-up, "
        f"{m['end']['rss_mib']} at the end (growth {f['rss_growth_mib']} MiB, high-water {m['end']['hwm_mib']})",
        f"router fds              {m['start']['fds']} at start, {warm['fds']} after warm-up, "
        f"{m['end']['fds']} at the end, {m['settled']['fds']} settled; sockets left in CLOSE_WAIT "
        f"(leaked) {m['settled']['close_wait']} (must be 0)",
        "PASS" if f["passed"] else "FAIL",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, help="replay the same fault sequence and request mix")
    p.add_argument("--max-growth", type=float, default=30.0, help="RSS growth allowed after warm-up (MiB)")
    p.add_argument("--settle", type=float, default=35.0,
                   help="seconds to wait at the end for idle upstream connections to close")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    figures = run(a.requests, a.concurrency, a.seed, a.quiet, a.max_growth, a.settle)
    print(report(figures))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
