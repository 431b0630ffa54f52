"""Benchmark: what the router costs on top of mitmproxy, and mitmproxy on top of the wire.

Run it through ``scripts/bench`` (it picks the project's venv; mitmdump lives beside its
python). Everything runs on 127.0.0.1, each server in its own process on a free port:

    direct        the mock relay (claude_router_dev.mock_relay) itself: the physical floor
    mitmdump      plain ``mitmdump --mode reverse:http://MOCK`` without the addon
    router        ``mitmdump -s addon/router.py`` with one endpoint, in-memory health store
    router+config   the router on a config file: one priced endpoint (``clients_yaml``)
    router+clients  the same file with 50 named clients, the bench's key one of them
                    (limits no run reaches); ``--pair-rounds`` paired rounds of these two
                    give "named clients added p50", the median of the rounds' differences
    router+redis  the same with ``router_redis_url`` (own redis-server; "unsupported" if the
                  option is missing or the router sends Redis nothing)
    nginx         only if an nginx binary is installed (never installed by this script)

plus helpers that feed derived rows: ``direct-529`` (a 529 round trip to the mock's failing
endpoint), ``router-failover`` (endpoints bad=529 then ok, every request fails over once),
``router-cooled`` (bad is cooled down after one request, so it is skipped), their nginx
equivalents, ``mitmdump+index`` (plain mitmdump with the router's hook index and nothing else,
``claude_router_dev/addons/hook_index.py``: the base that shows what the router's own work costs), and
``mitmdump+stream`` (plain mitmdump with ``stream_large_bodies=1``: plain
mitmdump buffers a whole SSE response, which makes it no baseline for SSE timing).

Measurements are interleaved: each round gives every target its slice of every measurement
(latency in blocks of 10 requests, rotating order), so machine noise hits all targets alike.
One asyncio/aiohttp client (keep-alive, one session per worker) is used for every target; it
shares the CPUs with the servers, so req/s is what the whole loopback system does.

    latency      sequential small POST /v1/messages, p50/p99; added = target - direct
    SSE          time to first event, and inter-event gap minus the mock's gap
    throughput   req/s and p99 at each concurrency, errors = non-200 or exception
    failover     p50(router-failover) - p50(router) - p50(direct-529)
    cooled       p50(router-cooled) - p50(router)
    RSS          VmRSS/VmHWM from /proc before and after --rss-requests requests
                 (concurrency 16, every 10th one streaming); growth = after - after warm-up

``--baseline REF`` adds ``router@SHORTSHA``: the addon of git REF (``git archive REF addon/``
into the run's temp directory) run exactly like ``router`` (same options, one endpoint), in the
same interleaved rounds (RSS, latency, SSE, throughput), as the column beside ``router``, plus a
line comparing the two (p50/p99, SSE first event, req/s per concurrency; ratio = working tree /
REF). Both processes then also load a tiny probe script that records where ``claude_router``
was imported from; the baseline fails unless every ``claude_router`` module came from its own
copy (mitmproxy puts the script's directory first on sys.path, before the editable install).

``--profile SECONDS`` instead runs py-spy (if installed in the venv) on the router under
concurrency-16 load and prints where its CPU time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import datetime
import io
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from claude_router_dev import bench_streams, harness
from claude_router_dev.harness import BIN, MITMDUMP, ROOT, ROUTER_SCRIPT, free_port  # noqa: F401 - also B.*

HOOK_INDEX_SCRIPT = str(Path(__file__).resolve().parent / "addons" / "hook_index.py")  # mitmdump -s
# The same logging flags for every mitmdump target: no per-flow output, warnings and errors only.
MITM_COMMON = ["--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
               "--set", "connection_strategy=lazy"]
HEADERS = {"content-type": "application/json", "x-api-key": "bench",
           "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "claude-sonnet-4-5", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hi"}]}
BODY = json.dumps(MESSAGE).encode()
STREAM_BODY = json.dumps({**MESSAGE, "stream": True}).encode()
REQUEST_TIMEOUT = 15.0
MAIN_COLUMNS = ["direct", "mitmdump", "mitmdump+index", "router", "router+config", "router+clients",
                "router+redis", "nginx"]
PAIR = ("router+config", "router+clients")  # the named-clients comparison: baseline, with clients
# The A/A control of that comparison: the baseline's very file again, in a process of its own.
# Two processes of one router differ by more than nothing (memory layout, hash seeds, where the
# scheduler puts them); the control's difference is that floor, measured in the same rounds.
CONTROL = "router+config2"
# ... and a process's own bias stays for its life: the comparison's rounds are spread over this
# many generations of the three processes, each started afresh.
PAIR_GENERATIONS = 3
PAIR_BLOCK = 10  # requests per target in a row in the paired phase

now = time.perf_counter


def note(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- statistics

def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """Summary in milliseconds."""
    s = sorted(x * 1000 for x in seconds)
    if not s:
        return {"n": 0}
    return {"n": len(s), "min": s[0], "p50": percentile(s, 0.5), "p90": percentile(s, 0.9),
            "p99": percentile(s, 0.99), "max": s[-1], "mean": sum(s) / len(s)}


# -------------------------------------------------------------------------------- processes

def _child_setup() -> None:
    """In the child: die with the benchmark even if it is SIGKILLed (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Procs:
    """Every subprocess we start, each in its own process group; stop_all() ends them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.items: list[tuple[str, subprocess.Popen]] = []
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    def spawn(self, name: str, argv: list[str], stdout_pipe: bool = False) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log if stdout_pipe else subprocess.STDOUT,
            start_new_session=True, preexec_fn=_child_setup,
        )
        log.close()
        self.items.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def log_excerpt(self, name: str) -> str:
        """One line for the report: the last error line of a log, else its last line."""
        lines = [ln.strip() for ln in self.log_tail(name, 40).splitlines() if ln.strip()]
        errs = [ln for ln in lines if re.search(r"error|exception|invalid|unknown", ln, re.I)]
        return ((errs or lines or ["(empty)"])[-1])[:240]

    def stop_all(self) -> None:
        live = [(n, p) for n, p in reversed(self.items) if p.poll() is None]
        for _, p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)  # our own group: pgid == pid (new session)
        deadline = time.monotonic() + 5
        for _, p in live:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(2)
        for _, p in self.items:
            if p.stdout:
                p.stdout.close()


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline and not buf.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def start_mock(procs: Procs, name: str, faults: list[str]) -> str:
    argv = harness.mock_argv("--port", "0", "--quiet", "--max-log", "1000")
    for f in faults:
        argv += ["--fault", f]
    proc = procs.spawn(name, argv, stdout_pipe=True)
    line = read_line(proc, 20)
    if "listening on" not in line:
        raise RuntimeError(f"{name} did not start: {line!r}\n{procs.log_tail(name)}")
    return line.strip().rsplit(" ", 1)[1]


async def wait_port(port: int, proc: subprocess.Popen | None, timeout: float) -> str | None:
    """None when the port accepts connections, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            w.close()
            return None
        except (TimeoutError, OSError):
            await asyncio.sleep(0.05)
    return f"port {port} did not open within {timeout:g}s"


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx: master and workers)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(d))
    out, todo = [], [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def mem_status(pid: int) -> dict[str, float]:
    """VmRSS/VmHWM in MiB, summed over the process tree."""
    total = {"rss_mib": 0.0, "hwm_mib": 0.0, "processes": 0}
    for p in proc_tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M))
        total["rss_mib"] += int(fields.get("VmRSS", 0)) / 1024
        total["hwm_mib"] += int(fields.get("VmHWM", 0)) / 1024
        total["processes"] += 1
    return total


async def redis_command_calls(port: int) -> int | None:
    """Commands Redis has served, not counting INFO (our own probes)."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
        try:
            w.write(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readline(), 2)
            data = await asyncio.wait_for(r.readexactly(int(head[1:]) + 2), 2)
        finally:
            w.close()
    except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
        return None
    calls = re.findall(r"^cmdstat_([^:]+):calls=(\d+)", data.decode(errors="replace"), re.M)
    return sum(int(n) for name, n in calls if name.lower() != "info")


# ----------------------------------------------------------------------------------- targets

@dataclass
class Target:
    name: str
    url: str  # the POST /v1/messages URL
    kind: str  # direct | mitmdump | router | nginx
    port: int
    proc: subprocess.Popen | None = None
    expect: int = 200
    check: Callable[[Any], str | None] | None = None  # response headers -> error or None
    status: str = "ok"  # ok | unsupported: ... | failed: ...
    consecutive_errors: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def fail(self, why: str) -> None:
        if self.ok:
            self.status = why
            note(f"{self.name}: {why}")


def attempts_check(must: str | None = None, must_not: str | None = None):
    def check(headers) -> str | None:
        trail = headers.get("X-Router-Attempts", "")
        if must is not None and must not in trail:
            return f"attempts {trail!r} lack {must!r}"
        if must_not is not None and must_not in trail:
            return f"attempts {trail!r} contain {must_not!r}"
        return None
    return check


def mitm_argv(port: int, confdir: Path, *extra: str) -> list[str]:
    return [MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}", *MITM_COMMON, *extra]


def router_argv(port: int, confdir: Path, endpoints: list[str], *extra: str,
                script: str = ROUTER_SCRIPT) -> list[str]:
    args = ["-s", script, "--mode", "reverse:https://api.anthropic.com"]
    for ep in endpoints:
        args += ["--set", f"router_endpoints={ep}"]
    return mitm_argv(port, confdir, *args, *extra)


# ---------------------------------------------------------------------- --baseline REF

def resolve_ref(ref: str, repo: Path = ROOT) -> tuple[str, str]:
    """(full sha, short sha) of the commit git REF names in ``repo``; ValueError with a
    one-line reason if it names no commit or the commit has no ``addon/router.py``."""
    def git(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True,
                              timeout=30)
    if not ref or ref.startswith("-"):
        raise ValueError(f"--baseline {ref!r}: not a git revision")
    try:
        full = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except (OSError, subprocess.SubprocessError) as e:
        raise ValueError(f"--baseline {ref}: git failed: {e}") from None
    if full.returncode or not full.stdout.strip():
        raise ValueError(f"--baseline {ref}: no such commit in {repo} (try HEAD~1, a sha, "
                         "origin/main)")
    sha = full.stdout.strip()
    if git("cat-file", "-e", f"{sha}:addon/router.py").returncode:
        raise ValueError(f"--baseline {ref}: commit {sha[:12]} has no addon/router.py")
    short = git("rev-parse", "--short", sha).stdout.strip() or sha[:7]
    return sha, short


def extract_addon(sha: str, dest: Path, repo: Path = ROOT) -> Path:
    """``git archive SHA addon/`` unpacked under ``dest``; the path of its ``addon/router.py``."""
    out = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha, "addon"],
                         capture_output=True, timeout=60)
    if out.returncode:
        raise ValueError(f"git archive {sha[:12]} addon: "
                         f"{out.stderr.decode(errors='replace').strip()[:200]}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    script = dest / "addon" / "router.py"
    if not script.is_file():
        raise ValueError(f"{sha[:12]} has no addon/router.py")
    return script


# An extra -s script for the router and its baseline: at `running` (every addon loaded) it
# writes where each claude_router module and each script module came from. It imports nothing
# of the router's, so it cannot decide which copy is loaded; the router's script comes first.
IMPORT_PROBE = """\
import json
import os
import sys


class ImportProbe:
    def running(self):
        mods = {{n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
                if n == "claude_router" or n.startswith(("claude_router.", "__mitmproxy_script__."))}}
        with open({out!r} + ".part", "w") as f:  # renamed when whole: a reader sees all or nothing
            json.dump(mods, f)
        os.replace({out!r} + ".part", {out!r})


addons = [ImportProbe()]
"""


def write_probe(directory: Path) -> tuple[str, Path]:
    """An import probe in ``directory``: (its script path, the JSON file it will write)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "imports.json"
    script = directory / "import_probe.py"
    script.write_text(IMPORT_PROBE.format(out=str(out)))
    return str(script), out


def imports_outside(mods: dict[str, str | None], home: Path) -> list[str]:
    """The claude_router modules of a probe's record not loaded from under ``home``
    (``["no claude_router module"]`` if there is none)."""
    ours = {n: f for n, f in mods.items() if n.split(".")[0] == "claude_router"}
    if not ours:
        return ["no claude_router module"]
    home = home.resolve()
    return [f"{n} from {f}" for n, f in sorted(ours.items())
            if not f or not Path(f).resolve().is_relative_to(home)]


def main_columns(targets) -> list[str]:
    """MAIN_COLUMNS present in ``targets``, each ``router@REF`` baseline right after router."""
    cols = []
    for c in MAIN_COLUMNS:
        if c in targets:
            cols.append(c)
        if c == "router":
            cols += [n for n in targets if n.startswith("router@")]
    return cols


def baseline_comparison(results: dict[str, Any], base: str, concurrency: list[int],
                        now_name: str = "router") -> dict[str, Any]:
    """The working tree's router against its baseline ``base``: each figure as
    (router, baseline, router / baseline)."""
    L, S, T = (results.get(k, {}) for k in ("latency_ms", "sse_ms", "throughput"))

    def trio(get: Callable[[str], float | None]) -> dict[str, float | None]:
        a, b = get(now_name), get(base)
        return {"router": a, "baseline": b,
                "ratio": a / b if a is not None and b is not None and b > 0 else None}

    out: dict[str, Any] = {"router": now_name, "baseline": base}
    for q in ("p50", "p99"):
        out[f"latency_{q}_ms"] = trio(lambda n, q=q: L.get(n, {}).get(q))
    out["sse_first_event_p50_ms"] = trio(lambda n: S.get(n, {}).get("ttfe", {}).get("p50"))
    out["rps"] = {str(c): trio(lambda n, c=c: T.get(n, {}).get(str(c), {}).get("rps"))
                  for c in concurrency}
    return out


def render_baseline(c: dict[str, Any], status: str = "ok", ref: str = "") -> str:
    """One line: the working tree's router against router@REF."""
    name = c["baseline"] + (f" ({ref})" if ref else "")
    if status != "ok":
        return f"{c['router']} vs {name}: no comparison, {name} {status}"

    def r(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}×"

    def ms(t: dict) -> str:
        return f"{fmt_ms(t['router'])} ms vs {fmt_ms(t['baseline'])} ms ({r(t['ratio'])})"

    rps = c["rps"]
    n = lambda v: "–" if v is None else f"{v:.0f}"  # noqa: E731
    line = (f"{c['router']} vs {name}: p50 {ms(c['latency_p50_ms'])}, "
            f"p99 {ms(c['latency_p99_ms'])}")
    if c["sse_first_event_p50_ms"]["router"] is not None:
        line += f", SSE first event p50 {ms(c['sse_first_event_p50_ms'])}"
    if rps:
        line += (f"; req/s at c={'/'.join(rps)}: "
                 + "/".join(n(t["router"]) for t in rps.values()) + " vs "
                 + "/".join(n(t["baseline"]) for t in rps.values())
                 + " (" + "/".join(r(t["ratio"]) for t in rps.values()) + ")")
    return line + " (ratio = working tree / baseline: above 1 is slower for ms, faster for req/s)"


# One nginx of a benchmark: its files under {tmp}, quiet, and an http block the caller ends.
# (Also bench_workers.py's fixed-answer upstream; it runs without a master process so
# that the one pid it watches is the one that works.)
NGINX_HEAD = """\
worker_processes 1;
daemon off;
master_process {master};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
"""
NGINX_CONF = NGINX_HEAD + """\
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_next_upstream error timeout http_502 http_503 http_504 http_429 non_idempotent;
    upstream ok_up {{ server 127.0.0.1:{mock}; keepalive 128; }}
    # the failing server first (never marked down), the working one as its backup
    upstream failover_up {{
        server 127.0.0.1:{bad} max_fails=0;
        server 127.0.0.1:{mock} backup;
        keepalive 128;
    }}
    # one failure takes the failing server out for an hour
    upstream cooled_up {{
        server 127.0.0.1:{bad} max_fails=1 fail_timeout=3600s;
        server 127.0.0.1:{mock} backup;
        keepalive 128;
    }}
    server {{ listen 127.0.0.1:{p_ok}; location / {{ proxy_pass http://ok_up; }} }}
    server {{ listen 127.0.0.1:{p_failover}; location / {{ proxy_pass http://failover_up; }} }}
    server {{ listen 127.0.0.1:{p_cooled}; location / {{ proxy_pass http://cooled_up; }} }}
}}
"""


def clients_yaml(ok_url: str, named: bool = True, members: int = 49) -> str:
    """The router_config of the named-clients comparison: one priced endpoint and, with
    ``named``, 50 named clients, the bench's key (``bench``) the last of them, with a budget,
    an rpm and a concurrency limit no run reaches. Without ``named`` it is the same router
    without named clients (the baseline, ``router+config``)."""
    text = ("endpoints:\n"
            f"  - {{name: ok, url: '{ok_url}', price: {{input: 3, output: 15}}}}\n")
    if named:
        text += ("clients:\n"
                 + "".join(f"  - {{name: member{i}, key: member-key-{i:04d}-0123456789}}\n"
                           for i in range(members))
                 + "  - {name: bench, key: bench, budget: {usd: 1000000, per: day}, rpm: 100000000,"
                   " max_concurrency: 100000}\n")
    return text


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.targets: dict[str, Target] = {}
        self.mock = ""
        self.redis_port: int | None = None
        self.notes: list[str] = []
        self.restarts = 0  # processes started anew (the paired comparison's generations)
        self.results: dict[str, Any] = {}
        # raw samples (seconds)
        self.lat: dict[str, list[float]] = collections.defaultdict(list)
        self.lat_err: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.ttfe: dict[str, list[float]] = collections.defaultdict(list)
        self.ttfc: dict[str, list[float]] = collections.defaultdict(list)
        self.gaps: dict[str, list[float]] = collections.defaultdict(list)
        self.sse_err: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tp: dict[tuple[str, int], dict[str, Any]] = {}
        # --baseline: the baseline target's name, and per probed target (probe file, home)
        self.baseline: str | None = None
        self.probes: dict[str, tuple[Path, Path]] = {}

    # -- set-up -------------------------------------------------------------------------------

    def add(self, t: Target) -> Target:
        self.targets[t.name] = t
        return t

    def confdir(self, name: str) -> Path:
        d = self.tmp / f"conf-{name}"
        d.mkdir(exist_ok=True)
        return d

    def spawn_proxy(self, name: str, kind: str, argv_for: Callable[[int], list[str]],
                    path: str = "/v1/messages", **kw) -> Target:
        port = free_port()
        proc = self.procs.spawn(name, argv_for(port))
        return self.add(Target(name, f"http://127.0.0.1:{port}{path}", kind, port, proc, **kw))

    async def start(self) -> None:
        a = self.args
        self.mock = start_mock(self.procs, "mock", ["bad=529"])
        mport = int(self.mock.rsplit(":", 1)[1])
        note(f"mock relay at {self.mock}")
        ok_ep, bad_ep = f"ok={self.mock}/ok", f"bad={self.mock}/bad"
        self.add(Target("direct", f"{self.mock}/ok/v1/messages", "direct", mport))
        self.add(Target("direct-529", f"{self.mock}/bad/v1/messages", "direct", mport, expect=529))

        self.spawn_proxy("mitmdump", "mitmdump", lambda p: mitm_argv(
            p, self.confdir("mitmdump"), "--mode", f"reverse:{self.mock}"), path="/ok/v1/messages")
        self.spawn_proxy("mitmdump+stream", "mitmdump", lambda p: mitm_argv(
            p, self.confdir("mitmdump+stream"), "--mode", f"reverse:{self.mock}",
            "--set", "stream_large_bodies=1"), path="/ok/v1/messages")
        self.spawn_proxy("mitmdump+index", "mitmdump", lambda p: mitm_argv(
            p, self.confdir("mitmdump+index"), "--mode", f"reverse:{self.mock}",
            "-s", HOOK_INDEX_SCRIPT), path="/ok/v1/messages")
        probe: tuple[str, ...] = ()
        if a.baseline:  # both routers load the import probe, so they stay alike
            script, out = write_probe(self.tmp / "probe-router")
            self.probes["router"] = (out, ROOT / "addon")
            probe = ("-s", script)
        self.spawn_proxy("router", "router", lambda p: router_argv(
            p, self.confdir("router"), [ok_ep], *probe),
            check=attempts_check(must="ok:200", must_not="bad"))
        if a.baseline:
            self.start_baseline(ok_ep)
        # The same router with named clients (issue 21): the bench's key is a client with a
        # budget, an rpm and a concurrency limit none of the runs reaches, among 50 clients,
        # on a priced endpoint, so every request is identified, admitted, priced and recorded.
        # Its baseline, router+config, is the very same file without `clients:`.
        for name, named in (("router+config", False), ("router+clients", True), (CONTROL, False)):
            cfg = self.tmp / f"{name.replace('+', '-')}.yaml"
            cfg.write_text(clients_yaml(f"{self.mock}/ok", named))
            self.spawn_proxy(name, "router", lambda p, name=name, cfg=cfg: mitm_argv(
                p, self.confdir(name), "-s", ROUTER_SCRIPT,
                "--mode", "reverse:https://api.anthropic.com", "--set", f"router_config={cfg}"),
                check=attempts_check(must="ok:200"))
        self.spawn_proxy("router-failover", "router", lambda p: router_argv(
            p, self.confdir("router-failover"), [bad_ep, ok_ep],
            "--set", "router_max_failures=1000000"),
            check=attempts_check(must="bad:529, ok:200"))
        self.spawn_proxy("router-cooled", "router", lambda p: router_argv(
            p, self.confdir("router-cooled"), [bad_ep, ok_ep],
            "--set", "router_max_failures=1", "--set", "router_cooldown=3600"),
            check=attempts_check(must="ok:200", must_not="bad"))

        redis = shutil.which("redis-server")
        if redis:
            self.redis_port = free_port()
            rproc = self.procs.spawn("redis", [
                redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", str(self.tmp)])
            why = await wait_port(self.redis_port, rproc, 10)
            if why:
                self.add(Target("router+redis", "", "router", 0, status=f"failed: redis-server {why}"))
            else:
                self.spawn_proxy("router+redis", "router", lambda p: router_argv(
                    p, self.confdir("router+redis"), [ok_ep],
                    "--set", f"router_redis_url=redis://127.0.0.1:{self.redis_port}/0"),
                    check=attempts_check(must="ok:200"))
        else:
            self.add(Target("router+redis", "", "router", 0,
                            status="unsupported: no redis-server on this machine"))

        nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
        if nginx:
            await self.start_nginx(nginx)
        else:
            self.notes.append("nginx: not installed, skipped.")

        waits = [t for t in self.targets.values() if t.ok and t.proc is not None]
        for t, why in zip(waits, await asyncio.gather(
                *(wait_port(t.port, t.proc, 60) for t in waits))):
            if why:
                t.fail(f"failed: {why}; log: {self.procs.log_excerpt(t.name)}")
        await self.preflight()
        if self.probes:
            await self.check_imports()
        if self.baseline and not (t := self.targets[self.baseline]).ok:
            # mitmproxy's last words ("Error logged during startup") hide the cause: add the
            # exception the baseline's addon raised, if its log has one
            cause = [ln.strip() for ln in self.procs.log_tail(self.baseline, 200).splitlines()
                     if re.match(r"\s*[\w.]*(Error|Exception)\b.*:", ln)]
            if cause and cause[-1] not in t.status:
                t.status += f" (cause: {cause[-1][:240]})"

    def start_baseline(self, ok_ep: str) -> None:
        """``router@SHORT``: the addon of --baseline REF, extracted into the temp directory and
        run with router's options (and the import probe)."""
        a = self.args
        name = self.baseline = f"router@{a.baseline_short}"
        home = self.tmp / f"baseline-{a.baseline_short}"
        try:
            script = extract_addon(a.baseline_sha, home)
        except (OSError, ValueError, subprocess.SubprocessError, tarfile.TarError) as e:
            self.add(Target(name, "", "router", 0, status=f"failed: extracting {a.baseline}: {e}"))
            return
        note(f"{name}: the addon of {a.baseline} ({a.baseline_sha[:12]}) from {home / 'addon'}")
        probe, out = write_probe(self.tmp / "probe-baseline")
        self.probes[name] = (out, home / "addon")
        self.spawn_proxy(name, "router", lambda p: router_argv(
            p, self.confdir(name), [ok_ep], "-s", probe, script=str(script)),
            check=attempts_check(must="ok:200", must_not="bad"))

    async def check_imports(self) -> None:
        """Where each probed router imported claude_router from (--baseline): the baseline
        fails unless all of it came from its own copy."""
        res = self.results.setdefault("baseline", {})
        for name, (out, home) in self.probes.items():
            t = self.targets[name]
            deadline = time.monotonic() + 10
            while t.ok and not out.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            try:
                mods = json.loads(out.read_text())
            except (OSError, ValueError) as e:
                if t.ok:
                    t.fail(f"failed: the import probe wrote nothing ({type(e).__name__}); "
                           f"log: {self.procs.log_excerpt(name)}")
                continue
            res.setdefault("imports", {})[name] = mods
            wrong = imports_outside(mods, home)
            pkg = mods.get("claude_router")
            note(f"{name}: claude_router from {pkg}")
            if wrong and name == self.baseline:
                t.fail(f"failed: not the baseline's own code: {'; '.join(wrong)[:300]}")
            elif wrong:
                self.notes.append(f"{name}: claude_router not from {home}: {'; '.join(wrong)[:300]}")

    async def start_nginx(self, nginx: str) -> None:
        bad = start_mock(self.procs, "mock-503", ["ok=503"])  # nginx cannot fail over on 529
        ports = {k: free_port() for k in ("p_ok", "p_failover", "p_cooled")}
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(master="on", tmp=self.tmp, mock=self.mock.rsplit(":", 1)[1],
                                          bad=bad.rsplit(":", 1)[1], **ports))
        proc = self.procs.spawn("nginx", [nginx, "-p", str(self.tmp), "-e",
                                          str(self.tmp / "nginx-error.log"), "-c", str(conf)])
        path = "/ok/v1/messages"
        self.add(Target("direct-503", f"{bad}{path}", "direct", int(bad.rsplit(":", 1)[1]), expect=503))
        self.add(Target("nginx", f"http://127.0.0.1:{ports['p_ok']}{path}", "nginx", ports["p_ok"], proc))
        for name in ("failover", "cooled"):
            p = ports[f"p_{name}"]
            # proc=None: the three listeners share one nginx; only "nginx" owns the process
            self.add(Target(f"nginx-{name}", f"http://127.0.0.1:{p}{path}", "nginx", p))
        why = await wait_port(ports["p_ok"], proc, 20)
        if why:
            tail = self.procs.log_excerpt("nginx")
            for n in ("nginx", "nginx-failover", "nginx-cooled"):
                self.targets[n].fail(f"failed: nginx {why}: {tail}")

    async def preflight(self) -> None:
        """Each target must answer as expected; prepare the cooled ones; check Redis use."""
        async def one(s: aiohttp.ClientSession, t: Target) -> None:
            if t.name in ("router-cooled", "nginx-cooled"):
                await timed_post(s, Target(t.name, t.url, t.kind, t.port), BODY)  # cools `bad`
            deadline, wrong, last = time.monotonic() + 15, 0, ""
            while time.monotonic() < deadline and wrong < 3:
                ok, _, last = await timed_post(s, t, BODY)
                if ok:
                    return
                wrong += not last.startswith("Client")  # an answer, but the wrong one
                await asyncio.sleep(0.3)
            t.fail(f"failed: no good answer ({last}); log: {self.procs.log_excerpt(t.name)}")

        async with new_session(32) as s:
            await asyncio.gather(*(one(s, t) for t in self.targets.values() if t.ok))
        t = self.targets.get("router+redis")
        if t and t.ok:
            calls = await redis_command_calls(self.redis_port)
            if not calls:
                t.fail("unsupported: router_redis_url had no effect (the router sent Redis "
                       "no commands; option missing in this version?)")
            else:
                self.results["redis_commands_after_preflight"] = calls
        for t in self.targets.values():
            if t.ok and t.proc is not None and t.proc.poll() is not None:
                t.fail(f"failed: exited; log: {self.procs.log_excerpt(t.name)}")

    def live(self, names: list[str]) -> list[Target]:
        return [self.targets[n] for n in names if n in self.targets and self.targets[n].ok]

    async def mock_fault(self, endpoint: str, fault: dict | None) -> None:
        async with new_session(1) as s:
            url = f"{self.mock}/_mock/faults/{endpoint}"
            if fault is None:
                async with s.delete(url) as r:
                    await r.read()
            else:
                async with s.put(url, json=fault) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"mock fault rejected: {await r.text()}")

    # -- measurements -------------------------------------------------------------------------

    async def rss(self, t: Target) -> dict[str, Any]:
        pid = t.proc.pid
        out: dict[str, Any] = {"start": mem_status(pid)}
        calls0 = await redis_command_calls(self.redis_port) if t.name == "router+redis" else None
        warm = await load(t, 200, 16, stream_every=10, limit_s=120)
        out["warm"] = mem_status(pid)
        t0 = now()
        res = await load(t, self.args.rss_requests, 16, stream_every=10, limit_s=900)
        out["after"] = mem_status(pid)
        out["requests"] = res["done"] + res["errors"]
        out["errors"] = res["errors"] + warm["errors"]
        out["error_kinds"] = dict(collections.Counter(res["error_kinds"]) + collections.Counter(warm["error_kinds"]))
        out["seconds"] = now() - t0
        out["growth_mib"] = out["after"]["rss_mib"] - out["warm"]["rss_mib"]
        if calls0 is not None:
            calls1 = await redis_command_calls(self.redis_port)
            if calls1 is not None and out["requests"]:
                out["redis_commands_per_request"] = (calls1 - calls0) / out["requests"]
        return out

    async def latency_slice(self, targets: list[Target], sessions, per_target: int) -> None:
        left = {t.name: per_target for t in targets}
        while any(left.values()):
            for t in targets:
                if not t.ok:
                    left[t.name] = 0
                for _ in range(min(10, left[t.name])):
                    ok, dt, err = await timed_post(sessions[t.name], t, BODY)
                    left[t.name] -= 1
                    self.record(t, ok, err, self.lat[t.name], self.lat_err[t.name], dt)

    async def paired(self, sessions) -> None:
        """The named-clients comparison, measured paired: ``--pair-rounds`` rounds, each of
        ``--pair-requests`` sequential requests per target of ``PAIR`` and the A/A ``CONTROL``,
        alternating in blocks of ``PAIR_BLOCK`` (the order reversed every other block, so a
        drift hits all alike). The rounds are spread over ``PAIR_GENERATIONS`` generations of
        the three processes, each started afresh, so no one process's luck decides. Each round
        gives one difference of p50s and of CPU seconds per request (the process's, all
        threads); their medians are the figures (``paired_difference``)."""
        a = self.args
        names = [*PAIR, CONTROL]
        if [t.name for t in self.live(names)][:2] != list(PAIR):
            self.notes.append(f"paired named-clients comparison skipped: {' and '.join(PAIR)} "
                              "are not both up.")
            return
        gens = min(PAIR_GENERATIONS, a.pair_rounds)
        note(f"paired named-clients comparison: {a.pair_rounds} rounds of {a.pair_requests} "
             f"requests per target, in blocks of {PAIR_BLOCK}, with an A/A control, over {gens} "
             "generations of processes")
        rounds: list[dict[str, list[float]]] = []
        cpu: list[dict[str, float]] = []
        errors: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
        for g in range(gens):
            if g:
                await self.restart_pair(names)
            pair = self.live(names)
            if [t.name for t in pair][:2] != list(PAIR):
                break
            own = {t.name: new_session(1) for t in pair if g or t.name not in sessions}
            mine = {**sessions, **own}
            try:
                for t in pair:  # a new process (and the control) has had no warm-up yet
                    if t.name in own:
                        for _ in range(20):
                            await timed_post(own[t.name], t, BODY)
                todo = a.pair_rounds * (g + 1) // gens - a.pair_rounds * g // gens
                if not await self._paired(pair, mine, todo, rounds, cpu, errors):
                    break
            finally:
                for s in own.values():
                    await s.close()
        res = paired_difference(rounds, PAIR[0], PAIR[1], cpu)
        if any(CONTROL in got for got in rounds):
            res["control"] = paired_difference(rounds, PAIR[0], CONTROL, cpu)
        self.results["clients_paired"] = res | {
            "requests_per_round": a.pair_requests, "block": PAIR_BLOCK, "generations": gens,
            "errors": {n: sum(c.values()) for n, c in errors.items()},
            "error_kinds": {n: dict(c) for n, c in errors.items()}}

    async def restart_pair(self, names: list[str]) -> None:
        """New processes for the comparison's targets (new ports and confdirs, same configs)."""
        for name in names:
            old = self.targets.get(name)
            if old is None or old.proc is None:
                continue
            with contextlib.suppress(OSError):
                os.killpg(old.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.proc.wait(10)
            cfg = self.tmp / f"{name.replace('+', '-')}.yaml"  # as start() wrote it
            self.restarts += 1
            home = self.confdir(f"{name}-{self.restarts}")
            del self.targets[name]
            self.spawn_proxy(name, "router", lambda p, home=home, cfg=cfg: mitm_argv(
                p, home, "-s", ROUTER_SCRIPT, "--mode", "reverse:https://api.anthropic.com",
                "--set", f"router_config={cfg}"), check=attempts_check(must="ok:200"))
        for name in names:
            t = self.targets.get(name)
            if t is not None and t.proc is not None and (why := await wait_port(t.port, t.proc, 60)):
                t.fail(f"failed: {why}; log: {self.procs.log_excerpt(t.name)}")

    async def _paired(self, pair: list[Target], sessions, todo: int, rounds: list, cpu: list,
                      errors: dict[str, collections.Counter]) -> bool:
        """``todo`` rounds over ``pair``, added to ``rounds`` and ``cpu``; False if one failed."""
        a = self.args
        for r in range(todo):
            got: dict[str, list[float]] = {t.name: [] for t in pair}
            # CPU per round, not per block: what a process spends idle while the others' blocks
            # run (its timers, the ledger's writer) is part of its cost and alike for all
            c0 = {t.name: process_cpu(t.proc) for t in pair}
            blocks = -(-a.pair_requests // PAIR_BLOCK)
            for b in range(blocks):
                for t in (pair if (b + r) % 2 == 0 else pair[::-1]):
                    for _ in range(min(PAIR_BLOCK, a.pair_requests - b * PAIR_BLOCK)):
                        ok, dt, err = await timed_post(sessions[t.name], t, BODY)
                        self.record(t, ok, err, got[t.name], errors[t.name], dt)
            used = {t.name: process_cpu(t.proc) - c0[t.name] for t in pair}
            if not all(t.ok for t in pair):
                return False
            rounds.append(got)
            cpu.append({n: used[n] / max(1, len(got[n])) for n in used})
        return True

    def record(self, t: Target, ok: bool, err: str | None, samples: list, errors, dt=None) -> None:
        if ok:
            t.consecutive_errors = 0
            if dt is not None:
                samples.append(dt)
        else:
            errors[err] += 1
            t.consecutive_errors += 1
            if t.consecutive_errors >= 25:
                t.fail(f"failed: 25 errors in a row (last: {err})")

    async def sse_slice(self, targets: list[Target], sessions, streams: int, record=True) -> None:
        gap = self.args.sse_gap_ms / 1000
        stagger = gap / max(1, len(targets))  # so the targets' events do not coincide
        expected = self.args.sse_words + 6

        async def one(i: int, t: Target) -> None:
            await asyncio.sleep(i * stagger)
            ok, first, gaps, err = await sse_stream(sessions[t.name], t, expected)
            if record:
                self.record(t, ok, err, self.ttfe[t.name], self.sse_err[t.name],
                            first[0] if ok else None)
                if ok:
                    self.ttfc[t.name].append(first[1])
                    self.gaps[t.name] += [g - gap for g in gaps]

        for _ in range(streams):
            live = [t for t in targets if t.ok]
            await asyncio.gather(*(one(i, t) for i, t in enumerate(live)))

    async def tp_slice(self, t: Target, conc: int, seconds: float) -> None:
        res = await throughput(t, conc, seconds)
        agg = self.tp.setdefault((t.name, conc), {"done": 0, "errors": 0, "seconds": 0.0, "lat": [],
                                                   "error_kinds": collections.Counter()})
        agg["done"] += res["done"]
        agg["errors"] += res["errors"]
        agg["seconds"] += res["seconds"]
        agg["lat"] += res["lat"]
        agg["error_kinds"].update(res["error_kinds"])
        if res["done"] == 0:
            t.fail(f"failed: no request succeeded at concurrency {conc} "
                   f"({dict(res['error_kinds'])})")

    async def run(self) -> None:
        a = self.args
        lat_names = ["direct", "direct-529", "mitmdump", "mitmdump+index", "router", "router+config",
                     "router+clients", "router+redis",
                     "router-failover", "router-cooled", "nginx", "direct-503", "nginx-failover",
                     "nginx-cooled"]
        sse_names = ["direct", "mitmdump", "mitmdump+stream", "router", "router+redis",
                     "router-failover", "nginx"]
        tp_names = ["direct", "mitmdump", "mitmdump+index", "router", "router+config", "router+clients",
                    "router+redis", "nginx"]
        rss_names = ["mitmdump", "router", "router+redis", "nginx"]
        if self.baseline:  # measured like router, right after it
            lat_names, sse_names, tp_names, rss_names = (
                [m for n in names for m in ((n, self.baseline) if n == "router" else (n,))]
                for names in (lat_names, sse_names, tp_names, rss_names))

        note(f"RSS: {a.rss_requests} requests per proxy at concurrency 16")
        self.results["rss"] = {}
        # streamed answers with events 1 ms apart, like a real stream (not all in one read)
        await self.mock_fault("ok", {"event_gap_ms": 1})
        for t in self.live(rss_names):
            self.results["rss"][t.name] = await self.rss(t)
            r = self.results["rss"][t.name]
            note(f"  {t.name}: {r['warm']['rss_mib']:.1f} -> {r['after']['rss_mib']:.1f} MiB "
                 f"({r['requests']} requests in {r['seconds']:.1f}s, {r['errors']} errors "
                 f"{r['error_kinds'] or ''})")
            if "redis_commands_per_request" in r:
                self.notes.append(f"{t.name}: {r['redis_commands_per_request']:.2f} Redis "
                                  "commands per request in the RSS phase.")
            if r["errors"]:
                self.notes.append(f"{t.name}: {r['errors']} errors in the RSS phase "
                                  f"{r['error_kinds']} (streams leave its mix after 10 failures).")
        await self.mock_fault("ok", None)

        lat_sessions = {t.name: new_session(1) for t in self.live(lat_names)}
        sse_sessions = {t.name: new_session(1) for t in self.live(sse_names)}
        try:
            note("warm-up")
            await self.latency_slice(self.live(lat_names), lat_sessions, 20)
            self.lat.clear()
            self.lat_err.clear()
            await self.mock_fault("ok", {"event_gap_ms": a.sse_gap_ms, "words": a.sse_words})
            await self.sse_slice(self.live(sse_names), sse_sessions, 1, record=False)
            await self.mock_fault("ok", None)

            rounds = a.rounds
            per_lat = -(-a.requests // rounds)
            per_sse = -(-a.sse_streams // rounds)
            slice_s = a.duration / rounds
            for r in range(rounds):
                def rot(ts: list[Target], r: int = r) -> list[Target]:
                    k = r % max(1, len(ts))
                    return ts[k:] + ts[:k]
                note(f"round {r + 1}/{rounds}: latency ({per_lat} per target)")
                await self.latency_slice(rot(self.live(lat_names)), lat_sessions, per_lat)
                note(f"round {r + 1}/{rounds}: SSE ({per_sse} streams per target)")
                await self.mock_fault("ok", {"event_gap_ms": a.sse_gap_ms, "words": a.sse_words})
                try:
                    await self.sse_slice(rot(self.live(sse_names)), sse_sessions, per_sse)
                finally:
                    await self.mock_fault("ok", None)
                for conc in a.concurrency:
                    note(f"round {r + 1}/{rounds}: throughput at concurrency {conc} "
                         f"({slice_s:.2f}s per target)")
                    for t in rot(self.live(tp_names)):
                        await self.tp_slice(t, conc, slice_s)
            await self.paired(lat_sessions)
        finally:
            for s in [*lat_sessions.values(), *sse_sessions.values()]:
                await s.close()

        self.results["rss_end_of_run"] = {
            t.name: mem_status(t.proc.pid) for t in self.targets.values()
            if t.proc is not None and t.proc.poll() is None and t.kind != "direct"}
        self.summarize(lat_names, sse_names, tp_names)

    # -- results ------------------------------------------------------------------------------

    def summarize(self, lat_names, sse_names, tp_names) -> None:
        res = self.results
        res["targets"] = {n: {"status": t.status, "url": t.url, "kind": t.kind}
                          for n, t in self.targets.items()}
        res["latency_ms"] = {n: {**summarize(self.lat[n]), "errors": sum(self.lat_err[n].values()),
                                 "error_kinds": dict(self.lat_err[n])}
                             for n in lat_names if n in self.targets and self.lat[n]}
        direct = res["latency_ms"].get("direct", {})
        for s in res["latency_ms"].values():
            if direct and s.get("n"):
                s["added_p50"] = s["p50"] - direct["p50"]
                s["added_p99"] = s["p99"] - direct["p99"]
        res["sse_ms"] = {}
        for n in sse_names:
            if n in self.targets and self.ttfe[n]:
                ttfe, gaps = summarize(self.ttfe[n]), summarize(self.gaps[n])
                res["sse_ms"][n] = {"ttfe": ttfe, "first_content_event": summarize(self.ttfc[n]),
                                    "gap_minus_mock_gap": gaps,
                                    "errors": sum(self.sse_err[n].values()),
                                    "error_kinds": dict(self.sse_err[n])}
        d = res["sse_ms"].get("direct")
        for s in res["sse_ms"].values():
            if d:
                s["ttfe_added_p50"] = s["ttfe"]["p50"] - d["ttfe"]["p50"]
                s["ttfe_added_p99"] = s["ttfe"]["p99"] - d["ttfe"]["p99"]
        res["throughput"] = {}
        for (n, c), agg in self.tp.items():
            lat = summarize(agg["lat"])
            res["throughput"].setdefault(n, {})[str(c)] = {
                "rps": agg["done"] / agg["seconds"] if agg["seconds"] else 0.0,
                "done": agg["done"], "seconds": agg["seconds"], "errors": agg["errors"],
                "error_kinds": dict(agg["error_kinds"]), "latency_ms": lat}
        L = res["latency_ms"]

        def p(name, q):
            return L.get(name, {}).get(q)

        fo = {}
        for proxy, failover, cooled, bad in (("router", "router-failover", "router-cooled", "direct-529"),
                                             ("nginx", "nginx-failover", "nginx-cooled", "direct-503")):
            if p(proxy, "p50") is None:
                continue
            entry = {"bad_round_trip": bad}
            for q in ("p50", "p99"):
                if None not in (p(failover, q), p(bad, q)):
                    entry[f"failover_{q}"] = p(failover, q)
                    entry[f"extra_cost_{q}"] = p(failover, q) - p(proxy, q) - p(bad, q)
                if p(cooled, q) is not None:
                    entry[f"cooled_minus_plain_{q}"] = p(cooled, q) - p(proxy, q)
            fo[proxy] = entry
        res["failover_ms"] = fo
        if self.baseline:
            a = self.args
            res.setdefault("baseline", {}).update(
                {"ref": a.baseline, "sha": a.baseline_sha, "name": self.baseline,
                 "status": self.targets[self.baseline].status,
                 "comparison": baseline_comparison(res, self.baseline, a.concurrency)})


def paired_difference(rounds: list[dict[str, list[float]]], base: str, other: str,
                      cpu: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Per round, p50(other) − p50(base) in ms; the median over rounds, the quartiles of the
    rounds' differences, and how many rounds. Rounds without samples of both are left out.
    With ``cpu`` (per round, CPU seconds per request of each target), the median per round
    difference of those too, in µs."""
    diffs, cpu_diffs = [], []
    for i, got in enumerate(rounds):
        a, b = sorted(got.get(base, [])), sorted(got.get(other, []))
        if a and b:
            diffs.append(1000 * (percentile(b, 0.5) - percentile(a, 0.5)))
            if cpu and i < len(cpu) and base in cpu[i] and other in cpu[i]:
                cpu_diffs.append(1e6 * (cpu[i][other] - cpu[i][base]))
    s = sorted(diffs)
    out = {"base": base, "other": other, "rounds": len(s), "round_diffs_ms": diffs,
           "median_ms": percentile(s, 0.5) if s else None,
           "q1_ms": percentile(s, 0.25) if s else None,
           "q3_ms": percentile(s, 0.75) if s else None}
    if cpu_diffs:
        c = sorted(cpu_diffs)
        out |= {"cpu_median_us": percentile(c, 0.5), "cpu_q1_us": percentile(c, 0.25),
                "cpu_q3_us": percentile(c, 0.75)}
    return out


def render_paired(c: dict[str, Any] | None) -> str:
    if not c or c.get("median_ms") is None:
        return ""
    gens = f", {c['generations']} generations of processes" if c.get("generations", 1) > 1 else ""
    line = (f"named clients added p50: {c['median_ms']:.3f} ms (median of {c['rounds']} paired "
            f"rounds of {c['requests_per_round']} requests per target{gens}, {c['other']} − {c['base']}; "
            f"middle half of the rounds {c['q1_ms']:.3f} to {c['q3_ms']:.3f} ms; "
            f"target <= 0.1 ms)")
    if "cpu_median_us" in c:
        line += (f"; router CPU per request added: {c['cpu_median_us']:.0f} µs (middle half "
                 f"{c['cpu_q1_us']:.0f} to {c['cpu_q3_us']:.0f})")
    if (k := c.get("control")) and k.get("median_ms") is not None:
        line += (f". A/A control, the same router+config in a second process: {k['median_ms']:+.3f} ms "
                 f"p50 (middle half {k['q1_ms']:.3f} to {k['q3_ms']:.3f})")
        if "cpu_median_us" in k:
            line += f", CPU per request {k['cpu_median_us']:+.0f} µs"
    return line


def process_cpu(proc: subprocess.Popen | None) -> float:
    """CPU seconds a process has run so far, every thread, in nanoseconds' precision (the
    scheduler's own count, /proc/PID/task/*/schedstat; clock ticks would be too coarse for a
    few hundred requests); 0 if unknown."""
    if proc is None:
        return 0.0
    total = 0
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
    except OSError:
        return 0.0
    return total / 1e9


# ------------------------------------------------------------------------------------ client

def new_session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar())


async def timed_post(session: aiohttp.ClientSession, t: Target, body: bytes):
    """(ok, seconds, error) for one POST; the body is read completely."""
    t0 = now()
    try:
        async with session.post(t.url, data=body, headers=HEADERS) as r:
            await r.read()
            dt = now() - t0
            if r.status != t.expect:
                return False, dt, f"HTTP {r.status}"
            if t.check is not None:
                err = t.check(r.headers)
                if err:
                    return False, dt, err
            return True, dt, None
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return False, now() - t0, type(e).__name__


PRELUDE_EVENTS = (b"event: message_start", b"event: ping")


async def sse_stream(session: aiohttp.ClientSession, t: Target, expected: int):
    """(ok, (first event, first content event), inter-event gaps, error) for one stream."""
    t0 = now()
    times: list[float] = []
    first_content: float | None = None
    last = b""
    try:
        async with session.post(t.url, data=STREAM_BODY, headers=HEADERS,
                                timeout=aiohttp.ClientTimeout(total=60)) as r:
            if r.status != 200:
                await r.read()
                return False, 0.0, [], f"HTTP {r.status}"
            buf = b""
            while True:
                chunk = await r.content.readany()
                if not chunk:
                    break
                at = now()
                buf += chunk
                while (i := buf.find(b"\n\n")) >= 0:
                    last, buf = buf[:i], buf[i + 2:]
                    times.append(at)
                    if first_content is None and not last.startswith(PRELUDE_EVENTS):
                        first_content = at
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return False, 0.0, [], type(e).__name__
    if len(times) != expected or b"message_stop" not in last:
        return False, 0.0, [], f"{len(times)} events, expected {expected}"
    return True, (times[0] - t0, first_content - t0), [b - a for a, b in zip(times, times[1:])], None


async def throughput(t: Target, conc: int, seconds: float) -> dict[str, Any]:
    """Keep-alive workers, one session each, warmed up before the clock starts."""
    sessions = [new_session(1) for _ in range(conc)]
    lat: list[float] = []
    kinds: collections.Counter = collections.Counter()
    done = 0
    try:
        await asyncio.gather(*(timed_post(s, t, BODY) for s in sessions))  # connect + warm
        start = now()
        deadline = start + seconds

        async def worker(s: aiohttp.ClientSession) -> None:
            nonlocal done
            while now() < deadline:
                ok, dt, err = await timed_post(s, t, BODY)
                if now() > deadline:
                    break  # finished after the window closed: not counted
                if ok:
                    done += 1
                    lat.append(dt)
                else:
                    kinds[err] += 1
                    await asyncio.sleep(0.01)

        await asyncio.wait_for(asyncio.gather(*(worker(s) for s in sessions)),
                               seconds + REQUEST_TIMEOUT + 5)
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    await asyncio.sleep(0.05)  # let the servers settle the closed connections
    return {"done": done, "errors": sum(kinds.values()), "seconds": seconds, "lat": lat,
            "error_kinds": kinds}


async def load(t: Target, total: int, conc: int, stream_every: int = 0,
               limit_s: float = 600, max_stream_errors: int = 10) -> dict[str, Any]:
    """`total` requests over `conc` keep-alive workers (bounded by limit_s); every
    `stream_every`-th one streamed, until `max_stream_errors` streams have failed."""
    sessions = [new_session(1) for _ in range(conc)]
    issued = done = 0
    kinds: collections.Counter = collections.Counter()
    deadline = now() + limit_s

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal issued, done
        while issued < total and now() < deadline:
            issued += 1
            stream_errors = sum(n for k, n in kinds.items() if k.startswith("stream"))
            if stream_every and issued % stream_every == 0 and stream_errors < max_stream_errors:
                ok, _, err = await _stream_any(s, t)
            else:
                ok, _, err = await timed_post(s, t, BODY)
            if ok:
                done += 1
            else:
                kinds[err] += 1
                await asyncio.sleep(0.01)

    try:
        await asyncio.gather(*(worker(s) for s in sessions))
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return {"done": done, "errors": sum(kinds.values()), "error_kinds": dict(kinds)}


async def _stream_any(s: aiohttp.ClientSession, t: Target):
    """A streamed message read to the end, any number of events: (ok, seconds, error)."""
    t0 = now()
    try:
        async with s.post(t.url, data=STREAM_BODY, headers=HEADERS,
                          timeout=aiohttp.ClientTimeout(total=3)) as r:
            body = await r.read()
            if r.status != 200:
                return False, now() - t0, f"stream HTTP {r.status}"
            if b"message_stop" not in body:
                return False, now() - t0, "stream without message_stop"
            return True, now() - t0, None
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return False, now() - t0, f"stream {type(e).__name__}"


# ------------------------------------------------------------------------------------ report

def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base <= 0 or v < 0:
        return ""
    return f" ({v / base:.2f}×)"


def machine() -> dict[str, Any]:
    import mitmproxy.version
    cpu = ""
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else ""

    def version(argv: list[str]) -> str:
        if not shutil.which(argv[0]):
            return "not installed"
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"

    git = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    with contextlib.suppress(Exception):
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        git += " (uncommitted changes)" if dirty else ""
    return {
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
        "kernel": platform.release(), "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION, "aiohttp": aiohttp.__version__,
        "redis_server": re.sub(r"^Redis server v=(\S+).*", r"redis-server \1",
                               version(["redis-server", "--version"])),
        "nginx": version(["nginx", "-v"]).replace("nginx version: ", ""),
        "git": git, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    targets = results["targets"]
    cols = main_columns(targets)
    L, S, T, F = results["latency_ms"], results["sse_ms"], results["throughput"], results["failover_ms"]
    R = results.get("rss", {})
    status = {c: targets[c]["status"] for c in cols}

    def cell(c: str, v: float | None, base: float | None = None, fmt=fmt_ms, use_ratio=True) -> str:
        if status[c] != "ok":
            return status[c].split(":")[0]
        if v is None:
            return "n/a"
        return fmt(v) + (ratio(v, base) if use_ratio and c != "mitmdump" else "")

    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Callable[[str], float | None], fmt=fmt_ms, use_ratio=True,
            base_col: str = "mitmdump") -> None:
        base = get(base_col) if status.get(base_col) == "ok" else None
        rows.append((label, [cell(c, get(c), base, fmt, use_ratio) for c in cols]))

    row("POST p50 (ms)", lambda c: L.get(c, {}).get("p50"))
    row("POST p99 (ms)", lambda c: L.get(c, {}).get("p99"))
    row("added p50 vs direct (ms)", lambda c: L.get(c, {}).get("added_p50") if c != "direct" else None)
    row("added p99 vs direct (ms)", lambda c: L.get(c, {}).get("added_p99") if c != "direct" else None)

    def sse(c: str) -> str:  # plain mitmdump buffers SSE: its streaming twin is the SSE baseline
        return "mitmdump+stream" if c == "mitmdump" else c

    gap = args.sse_gap_ms
    row("SSE first event p50 (ms) ¹", lambda c: S.get(sse(c), {}).get("ttfe", {}).get("p50"))
    row("SSE first event p99 (ms) ¹", lambda c: S.get(sse(c), {}).get("ttfe", {}).get("p99"))
    row("SSE first content event p50 (ms) ¹",
        lambda c: S.get(sse(c), {}).get("first_content_event", {}).get("p50"))
    row("SSE first content event p99 (ms) ¹",
        lambda c: S.get(sse(c), {}).get("first_content_event", {}).get("p99"))
    row(f"SSE gap − {gap} ms, p50 (ms) ¹",
        lambda c: S.get(sse(c), {}).get("gap_minus_mock_gap", {}).get("p50"), use_ratio=False)
    row(f"SSE gap − {gap} ms, p99 (ms) ¹",
        lambda c: S.get(sse(c), {}).get("gap_minus_mock_gap", {}).get("p99"), use_ratio=False)
    for conc in args.concurrency:
        k = str(conc)
        row(f"req/s @ concurrency {conc}", lambda c, k=k: T.get(c, {}).get(k, {}).get("rps"),
            fmt=lambda v: f"{v:.0f}")
        row(f"p99 @ concurrency {conc} (ms)",
            lambda c, k=k: T.get(c, {}).get(k, {}).get("latency_ms", {}).get("p99"))
    rows.append((f"errors @ concurrency {'/'.join(map(str, args.concurrency))}", [
        cell(c, 0) if status[c] != "ok" else "/".join(
            str(T.get(c, {}).get(str(k), {}).get("errors", "–")) for k in args.concurrency)
        for c in cols]))

    def fo(c: str, key: str) -> float | None:
        if c == "direct":
            return L.get("direct-529", {}).get("p50") if key == "failover_p50" else None
        return F.get(c, {}).get(key)

    row("failover: p50 (ms) ²", lambda c: fo(c, "failover_p50"), use_ratio=False)
    row("extra cost of one failover, p50 (ms) ²", lambda c: fo(c, "extra_cost_p50"), use_ratio=False)
    row("cooled 1st endpoint − plain, p50 (ms) ³", lambda c: fo(c, "cooled_minus_plain_p50"),
        use_ratio=False)
    mib = lambda v: f"{v:.1f}"  # noqa: E731
    row("RSS after warm-up (MiB)", lambda c: R.get(c, {}).get("warm", {}).get("rss_mib"), fmt=mib)
    row(f"RSS after {args.rss_requests} req (MiB)",
        lambda c: R.get(c, {}).get("after", {}).get("rss_mib"), fmt=mib)
    row("RSS growth (MiB) ⁴", lambda c: R.get(c, {}).get("growth_mib"), fmt=mib, use_ratio=False)
    row("peak RSS, VmHWM (MiB)", lambda c: R.get(c, {}).get("after", {}).get("hwm_mib"), fmt=mib)

    out = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    m = results["machine"]
    buffered = S.get("mitmdump", {}).get("ttfe", {}).get("p50")
    out += ["",
            "(×) = ratio to plain mitmdump. "
            f"¹ SSE: {args.sse_words}-word stream, mock gap {gap} ms; plain mitmdump buffers SSE "
            f"(first event after {fmt_ms(buffered)} ms), so its column shows mitmdump with "
            "`stream_large_bodies=1`. The mock sends message_start, then each further event "
            f"{gap} ms later; the first content event is content_block_start. "
            "² endpoint `bad` answers 529 forever, `router_max_failures=1000000`: every request "
            "fails over once; extra cost = p50(failover) − p50(plain) − p50(direct 529 round trip) "
            "(direct column: that round trip; nginx: 503, it cannot retry on 529). "
            "³ first endpoint cooled (max_failures=1, cooldown=3600) vs a single endpoint. "
            f"⁴ RSS after {args.rss_requests} requests (every 10th streamed, concurrency 16) − "
            "RSS after 200 warm-up requests.",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
            f"mitmproxy {m['mitmproxy']}, aiohttp {m['aiohttp']}, {m['redis_server']}, "
            f"nginx: {m['nginx']}; git {m['git']}; {m['date']}. "
            f"Client, mock and proxies share these CPUs. Settings: {results['settings_text']}."]
    if paired := render_paired(results.get("clients_paired")):
        out += ["", paired]
    if (b := results.get("baseline", {})).get("comparison"):
        out += ["", render_baseline(b["comparison"], b["status"], b["ref"])]
        if b.get("imports"):
            out += ["claude_router imported from: " + "; ".join(
                f"{n} {mods.get('claude_router')}" for n, mods in b["imports"].items())]
    notes = [f"{n}: {t['status']}" for n, t in targets.items() if t["status"] != "ok"]
    notes += results.get("notes", [])
    if notes:
        out += ["", "Notes: " + " ".join(f"{n}" for n in notes)]
    return "\n".join(out)


# ----------------------------------------------------------------------------------- profile

def analyse_collapsed(path: Path, top: int = 15) -> str:
    """Top frames by self and total samples, and a module breakdown, from py-spy --format raw."""
    self_c: collections.Counter = collections.Counter()
    total_c: collections.Counter = collections.Counter()
    cat_self: collections.Counter = collections.Counter()
    cat_attr: collections.Counter = collections.Counter()
    cat_total: collections.Counter = collections.Counter()
    n = 0
    frame_re = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
    groups = (("claude_router/handoff", "addon: handoff.py"), ("claude_router/", "addon (other)"),
              ("addon/router.py", "addon (other)"), ("mitmproxy/", "mitmproxy"),
              ("h11/", "h11/h2 (mitmproxy deps)"), ("h2/", "h11/h2 (mitmproxy deps)"),
              ("hpack/", "h11/h2 (mitmproxy deps)"), ("aiohttp/", "aiohttp/yarl/multidict"),
              ("yarl/", "aiohttp/yarl/multidict"), ("multidict/", "aiohttp/yarl/multidict"),
              ("redis/", "redis-py"), ("asyncio/", "asyncio (stdlib)"))
    libs = {g for _, g in groups} - {"asyncio (stdlib)"}

    def category(file: str) -> str:
        f = file.replace("\\", "/")
        return next((g for key, g in groups if key in f), "other stdlib")

    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for fr in stack.split(";"):
            m = frame_re.match(fr)
            frames.append((m.group("fn"), m.group("file")) if m else (fr, ""))
        frames = [f for f in frames if not f[0].startswith(("process ", "thread "))]
        if not frames:
            continue
        c = int(count)
        n += c
        self_c[frames[-1]] += c
        # Only frames below the event loop's callback dispatch say who is working; the ones
        # above it (mitmdump's main, asyncio.run) are on every stack.
        cut = max((i + 1 for i, f in enumerate(frames)
                   if f[0] in ("Handle._run", "BaseEventLoop._run_once")), default=0)
        cats = [category(f[1]) for f in frames[cut:]] or ["event loop (asyncio)"]
        cat_self[category(frames[-1][1]) if frames[cut:] else cats[-1]] += c
        # stdlib time is charged to the nearest caller that is a library or the addon
        cat_attr[next((g for g in reversed(cats) if g in libs), "event loop (asyncio)")] += c
        for f in set(frames[cut:]):
            total_c[f] += c
        for g in set(cats):
            cat_total[g] += c
    if not n:
        return "no samples"

    def name(f: tuple[str, str]) -> str:
        file = f[1]
        for cut in ("site-packages/", "/lib/python3"):
            if cut in file:
                file = file.split(cut, 1)[1]
                if cut == "/lib/python3":
                    file = file.split("/", 1)[-1]
        return f"{f[0]} ({file})"

    lines = [f"{n} on-CPU samples", "", "| self % | function (file) |", "|---:|---|"]
    lines += [f"| {c / n * 100:.1f} | {name(f)} |" for f, c in self_c.most_common(top)]
    lines += ["", "| total % (below the event loop) | function (file) |", "|---:|---|"]
    lines += [f"| {c / n * 100:.1f} | {name(f)} |" for f, c in total_c.most_common(top)]
    lines += ["", "| module group | self % | self % with stdlib charged to its caller | "
                  "inclusive % |", "|---|---:|---:|---:|"]
    lines += [f"| {g} | {cat_self[g] / n * 100:.1f} | {cat_attr[g] / n * 100:.1f} | "
              f"{cat_total[g] / n * 100:.1f} |"
              for g in sorted(set(cat_self) | set(cat_attr), key=lambda g: -cat_attr[g])]
    return "\n".join(lines)


async def profile(args: argparse.Namespace, procs: Procs, tmp: Path) -> None:
    pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not os.access(pyspy, os.X_OK):
        raise SystemExit("py-spy not found: pip install py-spy into the venv")
    b = Bench(args, procs, tmp)
    b.mock = start_mock(procs, "mock", [])
    t = b.spawn_proxy("router", "router", lambda p: router_argv(
        p, b.confdir("router"), [f"ok={b.mock}/ok"]))
    why = await wait_port(t.port, t.proc, 60)
    if why:
        raise SystemExit(f"router did not start: {why}\n{procs.log_tail('router')}")
    conc = 16
    gap = 10
    for label, stream_every in (("non-streaming POST /v1/messages", 0),
                                (f"streaming POST /v1/messages, {args.sse_words} words, events "
                                 f"{gap} ms apart (through the handoff)", 1)):
        await b.mock_fault("ok", {"event_gap_ms": gap, "words": args.sse_words}
                           if stream_every else None)
        await load(t, 300, conc, stream_every=stream_every, limit_s=60)  # warm
        svg = Path(args.profile_svg.replace(".svg", f"-{'sse' if stream_every else 'json'}.svg"))
        raw = svg.with_suffix(".txt")
        results, errors = [], {}
        for fmt, out in (("raw", raw), ("flamegraph", svg)):
            spy = subprocess.Popen([pyspy, "record", "--pid", str(t.proc.pid), "--duration",
                                    str(args.profile), "--rate", "250", "--format", fmt,
                                    "-o", str(out)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True,
                                   preexec_fn=_child_setup)
            procs.items.append(("py-spy", spy))
            t0 = now()
            res = await load(t, 10 ** 9, conc, stream_every=stream_every,
                             limit_s=args.profile + 1, max_stream_errors=10 ** 9)
            results.append(res["done"] / (now() - t0))
            errors.update(res["error_kinds"])
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGTERM)
                spy.wait(5)
            if spy.returncode:
                note(f"py-spy {fmt}: {spy.stderr.read().decode(errors='replace')[-500:]}")
        print(f"## Router profile: {label}, concurrency {conc}, {args.profile}s, "
              f"{results[0]:.0f} req/s while sampling at 250 Hz, errors {errors or 0} "
              f"(flame graph: {svg}, collapsed stacks: {raw})\n")
        print(analyse_collapsed(raw) if raw.exists() else "no profile written")
        print()


# -------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, help="seconds per throughput cell (default 3)")
    p.add_argument("--requests", type=int, help="sequential latency samples per target (500)")
    p.add_argument("--concurrency", default="1,16,64", help="throughput levels (1,16,64)")
    p.add_argument("--rss-requests", type=int, help="requests per proxy for RSS (10000)")
    p.add_argument("--sse-streams", type=int, help="SSE streams per target (30)")
    p.add_argument("--sse-gap-ms", type=int, default=50, help="mock gap between SSE events (50)")
    p.add_argument("--sse-words", type=int, default=10, help="words (delta events) per stream (10)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (3)")
    p.add_argument("--pair-rounds", type=int,
                   help="paired rounds of router+clients vs router+config (30; quick: 6)")
    p.add_argument("--pair-requests", type=int,
                   help="sequential requests per target in each paired round (200; quick: 40)")
    p.add_argument("--json", default=str(ROOT / "bench-results.json"), help="results file")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--affinity", action="store_true",
                   help="only the in-process session placement and memory measurement")
    p.add_argument("--clients-in-process", action="store_true",
                   help="only the in-process cost of the named-clients path per request")
    p.add_argument("--max-seconds", type=float, default=1800, help="abort after this long (1800)")
    p.add_argument("--profile", type=int, metavar="SECONDS",
                   help="instead: py-spy the router under concurrency-16 load for SECONDS")
    p.add_argument("--profile-svg", default="/tmp/router-profile.svg",
                   help="flame graph path for --profile (-json/-sse suffixes are added)")
    p.add_argument("--streams", metavar="N,N", help="only the streams phase (claude_router_dev/"
                   "bench_streams.py), at these levels (default, also in the full run: 1000,2000)")
    p.add_argument("--no-streams", action="store_true", help="leave the streams phase out")
    p.add_argument("--stream-events", type=int, default=40, help="events per stream (40)")
    p.add_argument("--stream-gap-ms", type=int, help="mock gap between events (250; quick: 100)")
    p.add_argument("--stream-rate", type=float, default=200, help="streams opened per second (200)")
    p.add_argument("--stream-targets", default="direct,mitmdump+stream,router",
                   help="streams phase targets (direct,mitmdump+stream,router)")
    p.add_argument("--stream-rounds", type=int, default=1,
                   help="run every level and target this many times, order rotated (1)")
    p.add_argument("--tiers", action="store_true",
                   help="only the tiers comparison, the router beside ee65710 (claude_router_dev/"
                        "bench_tiers.py; --tiers --help for its options)")
    p.add_argument("--baseline", metavar="REF",
                   help="also run the addon of git REF (HEAD~1, origin/main, a sha) as "
                        "router@SHORTSHA beside router, and compare the two")
    a = p.parse_args(argv)
    quick = {"duration": 0.6, "requests": 60, "rss_requests": 500, "sse_streams": 4, "rounds": 2,
             "pair_rounds": 6, "pair_requests": 40}
    full = {"duration": 3.0, "requests": 500, "rss_requests": 10000, "sse_streams": 30, "rounds": 3,
            "pair_rounds": 30, "pair_requests": 200}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    a.baseline_sha = a.baseline_short = None  # main() resolves --baseline (git) before the run
    if a.baseline is not None and (not a.baseline.strip() or a.profile or a.streams is not None
                                   or a.affinity or a.clients_in_process):
        p.error("--baseline REF needs a REF and works with the main run only (not --profile, "
                "--streams, --affinity, --clients-in-process)")
    a.streams_only = a.streams is not None
    a.stream_levels = [] if a.no_streams and not a.streams_only else [
        int(n) for n in (a.streams or ("100" if a.quick else "1000,2000")).split(",") if n.strip()]
    a.stream_targets = [t.strip() for t in a.stream_targets.split(",") if t.strip()]
    a.stream_gap_ms = a.stream_gap_ms if a.stream_gap_ms is not None else 100 if a.quick else 250
    if (a.streams_only and not a.stream_levels) or min(a.stream_levels, default=1) < 1 \
            or a.stream_events < 7 or a.stream_gap_ms < 0 or a.stream_rate <= 0 \
            or a.stream_rounds < 1 \
            or not set(a.stream_targets) <= set(bench_streams.TARGETS):
        p.error(f"streams: levels must be positive, at least 7 events, a positive rate, "
                f"targets among {','.join(bench_streams.TARGETS)}")
    if (not a.concurrency or min(a.concurrency) < 1 or max(a.concurrency) > 1024 or a.rounds < 1
            or a.requests < 1 or a.duration <= 0 or a.rss_requests < 1 or a.sse_streams < 1
            or a.pair_rounds < 1 or a.pair_requests < 1):
        p.error("counts must be positive (concurrency 1..1024)")
    return a


def affinity_bench(sessions_n: int = 100_000, samples: int = 20_000) -> dict[str, Any]:
    """In-process cost of placing a request whose conversation is already placed (identity,
    local lookup, the cost rule), and the memory of ``sessions_n`` sessions in the local LRU."""
    import gc
    import tracemalloc

    from claude_router import cost, sessions
    from claude_router.affinity import MemoryAffinity
    from claude_router.usage import Price

    now = time.time()
    gc.collect()
    tracemalloc.start()
    store = MemoryAffinity(clock=lambda: now, max_sessions=sessions_n)
    for i in range(sessions_n):
        store.put(f"cc:{i:08d}-0000-0000-0000-000000000000",
                  sessions.Session("aws", 80_000 + i % 1000, 400.0, 300.0, now - 10, 5, "", "warm cache"))
    mem, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    candidates = [("aws", Price(input=3.0, output=15.0)), ("droid", Price(input=2.5, output=12.5))]
    headers = [("x-claude-code-session-id", "00001234-0000-0000-0000-000000000000"),
               ("anthropic-version", "2023-06-01"), ("content-type", "application/json")]
    doc = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
    times = []
    clock = time.perf_counter
    for _ in range(samples):
        t0 = clock()
        sid = sessions.session_id(headers, doc)
        prev = store.local(sid)
        cost.choose(candidates, store.learned, prev, prev.prompt_tokens, prev.output_tokens, 300.0,
                    now, 8)
        times.append(clock() - t0)
    times.sort()
    return {"sessions": sessions_n, "memory_mib": mem / 2**20, "bytes_per_session": mem / sessions_n,
            "placement_p50_ms": 1000 * times[len(times) // 2],
            "placement_p99_ms": 1000 * times[int(len(times) * 0.99)]}


def clients_bench(samples: int = 5_000, repeats: int = 9) -> dict[str, Any]:
    """In-process cost of the named-clients path per request, with the router's real objects
    on the bench's own config (``clients_yaml``: 50 named clients, the key the last one):
    the key check (``access.authorized``, twice: at the request's head and at its body),
    identifying the client (``access.who``), admitting it (``accounts.admit``: budget, rpm,
    concurrency), releasing it, recording its tokens and spend (``accounts.record``, which
    hands the spend to the ledger) and the ledger's row (``ledger.add``). The same steps without
    named clients (no key to check, the anonymous client, as ``router+config`` runs them) give
    the baseline; µs per request, the fastest of ``repeats`` runs of ``samples`` requests each
    (noise only ever adds)."""
    from mitmproxy.http import Headers

    from claude_router import access, clients, config, ledger as ledgers, usage
    from claude_router.accounts import Accounts

    with tempfile.TemporaryDirectory(prefix="claude-router-clients-bench-") as tmp:
        path = Path(tmp) / "router.yaml"
        path.write_text(clients_yaml("http://127.0.0.1:9/ok", named=True))
        file = config.load(str(path), env={})
        named = file.clients
        keys = access.client_keys((), file.client_keys, environ={})
        keys = tuple(c.key for c in named) + keys
        table = clients.table(named, keys[len(named):])
        # the headers aiohttp sends with the bench's own, as mitmproxy hands them over
        headers = Headers(host="127.0.0.1:8080", **{k.replace("-", "_"): v for k, v in HEADERS.items()},
                          accept="*/*", accept_encoding="gzip, deflate",
                          user_agent=f"Python/3.12 aiohttp/{aiohttp.__version__}",
                          content_length=str(len(BODY)))
        price = file.endpoints[0].price
        u = usage.Usage(input_tokens=12, output_tokens=24)
        usd = usage.cost(u, price)
        model = MESSAGE["model"]
        ledger = ledgers.Ledger(str(Path(tmp) / "ledger.sqlite3"))  # never started: no thread
        accounts = Accounts(time.time)
        accounts.on_spend = ledger.spend  # what the addon's _spent does without Redis
        clock = time.time

        # Every request brings its own headers: two equal ones, alternated, so nothing is
        # answered from the last request's (access.presented_key keeps the last answer).
        fresh = [tuple(list(headers.fields)) for _ in range(2)]
        turn = [0]

        def named_request() -> None:
            turn[0] ^= 1
            headers.fields = fresh[turn[0]]
            for _ in range(2):  # the router checks the key at requestheaders and at request
                if not access.authorized(headers, keys):
                    raise AssertionError("the bench key is not accepted")
            who = access.who(headers, table)
            if accounts.admit(who) is not None:
                raise AssertionError("the bench client was refused")
            accounts.release(who.label)
            now = clock()
            accounts.record(who.label, now, "ok", model, u, usd)
            ledger.add(ledgers.Row(now, who.label, None, model, "ok", "ok:200", 200,
                                   u.input_tokens, u.output_tokens, 0, 0, usd, None))

        def anonymous_request() -> None:
            who = clients.ANONYMOUS
            accounts.admit(who)
            accounts.release(who.label)
            now = clock()
            accounts.record(who.label, now, "ok", model, u, usd)
            ledger.add(ledgers.Row(now, who.label, None, model, "ok", "ok:200", 200,
                                   u.input_tokens, u.output_tokens, 0, 0, usd, None))

        bench_client = access.who(headers, table)

        def key_steps() -> None:
            turn[0] ^= 1
            headers.fields = fresh[turn[0]]
            access.authorized(headers, keys)
            access.authorized(headers, keys)
            access.who(headers, table)

        steps = {
            "key: authorized ×2 + who": key_steps,
            "admit+release": lambda: (accounts.admit(bench_client), accounts.release("bench")),
            "record": lambda: accounts.record("bench", clock(), "ok", model, u, usd),
            "ledger.add": lambda: ledger.add(ledgers.Row(
                clock(), "bench", None, model, "ok", "ok:200", 200, 12, 24, 0, 0, usd, None)),
        }

        def run_us(fn: Callable[[], Any]) -> float:
            t0 = time.perf_counter()
            for _ in range(samples):
                fn()
            dt = (time.perf_counter() - t0) / samples * 1e6
            ledger._rows.clear()  # the writer thread's job: keep the queue short
            ledger._spend.clear()
            return dt

        fns = {"named": named_request, "anonymous": anonymous_request, **steps}
        for fn in fns.values():
            run_us(fn)  # warm: accounts, metric children, caches
        runs: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved, so a busy moment hits every figure alike
            for k, fn in fns.items():
                runs[k].append(run_us(fn))
        best = {k: min(v) for k, v in runs.items()}  # other work on the machine only adds time
        out = {"clients": len(named), "samples": samples, "repeats": repeats,
               "named_us": best.pop("named"), "anonymous_us": best.pop("anonymous"),
               "steps_us": best}
        out["added_us"] = out["named_us"] - out["anonymous_us"]
        return out


def render_clients(c: dict[str, Any]) -> str:
    steps = ", ".join(f"{k} {v:.1f}" for k, v in c["steps_us"].items())
    return (f"\nnamed clients' own work in-process: {c['named_us']:.1f} µs per request "
            f"({c['clients']} named clients; without them {c['anonymous_us']:.1f} µs, so "
            f"{c['added_us']:.1f} µs added; by step, µs: {steps})\n")


def render_affinity(a: dict[str, Any]) -> str:
    return ("\n| affinity (in process) | value |\n|---|---|\n"
            f"| placement of a placed session, p50 | {a['placement_p50_ms']:.4f} ms |\n"
            f"| placement, p99 | {a['placement_p99_ms']:.4f} ms |\n"
            f"| {a['sessions']:,} sessions in the local LRU | {a['memory_mib']:.1f} MiB "
            f"({a['bytes_per_session']:.0f} B each) |\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--tiers" in argv:  # its own phase and options: claude_router_dev/bench_tiers.py
        from claude_router_dev import bench_tiers  # (it imports this module)
        return bench_tiers.main([a for a in argv if a != "--tiers"])
    args = parse_args(argv)
    if args.affinity:
        a = affinity_bench()
        print(render_affinity(a))
        return 0
    if args.clients_in_process:
        print(render_clients(clients_bench()))
        return 0
    if args.baseline:
        try:
            args.baseline_sha, args.baseline_short = resolve_ref(args.baseline)
        except ValueError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt
    tmp = Path(tempfile.mkdtemp(prefix="claude-router-bench-"))
    procs = Procs(tmp)
    started = time.monotonic()

    async def amain() -> dict[str, Any] | None:
        async with asyncio.timeout(args.max_seconds):
            if args.profile:
                await profile(args, procs, tmp)
                return None
            if args.streams_only:
                return {"streams": await bench_streams.run(args, procs, tmp)}
            b = Bench(args, procs, tmp)
            try:
                await b.start()
                await b.run()
            finally:
                for t in b.targets.values():
                    if t.proc is not None and t.proc.poll() is not None and t.ok:
                        t.fail(f"failed: exited with {t.proc.returncode}")
            b.results["notes"] = b.notes
            if args.stream_levels:
                procs.stop_all()  # the main phase's servers: the streams phase runs alone
                b.results["streams"] = await bench_streams.run(args, procs, tmp)
            return b.results

    try:
        results = asyncio.run(amain())
    except KeyboardInterrupt:
        note("interrupted")
        return 130
    except TimeoutError:
        note(f"aborted after --max-seconds {args.max_seconds:g}")
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if results is None:
        return 0
    results["machine"] = machine()
    results["command"] = " ".join(["./scripts/bench", *(argv if argv is not None else sys.argv[1:])])
    if args.streams_only:
        results["wall_seconds"] = time.monotonic() - started
        table = bench_streams.render(results["streams"], results["machine"])
        results["table_markdown"] = table
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(table)
        note(f"done in {results['wall_seconds']:.0f}s; full results in {args.json}")
        return 0
    settings = {k: getattr(args, k) for k in ("duration", "requests", "concurrency", "rss_requests",
                                              "sse_streams", "sse_gap_ms", "sse_words", "rounds",
                                              "pair_rounds", "pair_requests", "quick",
                                              "baseline", "baseline_sha")}
    results["settings"] = settings
    results["settings_text"] = (
        f"{args.requests} sequential requests per target, {args.sse_streams} SSE streams, "
        f"{args.duration:g}s per throughput cell, {args.rounds} interleaved rounds"
        + (f", baseline {args.baseline} = {args.baseline_sha[:12]}" if args.baseline else ""))
    results["wall_seconds"] = time.monotonic() - started
    results["affinity"] = affinity_bench()
    results["clients_in_process"] = clients_bench(samples=1_000 if args.quick else 5_000)
    table = (render(results, args) + render_clients(results["clients_in_process"])
             + render_affinity(results["affinity"]))
    if "streams" in results:
        table += "\n" + bench_streams.render(results["streams"])
    results["table_markdown"] = table
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    note(f"done in {results['wall_seconds']:.0f}s; full results in {args.json}")
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: bench_streams and bench_workers use that one.
    from claude_router_dev import bench as _bench

    sys.exit(_bench.main())
