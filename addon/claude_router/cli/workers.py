"""Run N router processes behind one address: HAProxy in front, state shared through Redis.

    ./scripts/run --workers 2                      (the usual way: picks the venv, installs
    ./scripts/run --workers 2 --demo               haproxy with apt-get when it is missing)
    claude-router-workers --workers 2 [--port 8080] [--host 127.0.0.1] [--regular]
        (or python -m claude_router.cli.workers)
        [--worker-base 8081] [--log-dir DIR] [--info-file FILE] [-- MITMDUMP ARGS...]

What runs (every process is a child of this supervisor):

    redis-server  only when no router_redis_url is configured (neither in the arguments after
                  --, nor in the confdir's config.yaml): on a unix socket in a private temp
                  directory (the run directory), with an append-only file there, so a restart
                  by this supervisor (after a crash or kill -9) finds the operator's disabled
                  endpoints, the cooldowns and the rest as they were (the run directory is
                  removed when the supervisor exits); --redis-maxmemory (256mb) with the
                  eviction policy noeviction: health, disabled endpoints, salt and epoch are
                  never evicted, and at the limit Redis refuses writes and each worker goes on
                  with its local view. Every worker gets --set router_redis_url for it
    worker i      mitmdump -s addon/router.py, with the arguments plain ./scripts/run uses and
                  everything after --, on 127.0.0.1:(worker base + i - 1); the worker base is
                  --port + 1 unless --worker-base says otherwise (0: free ports)
    haproxy       on --host:--port, mode tcp (HTTP/1.1, HTTP/2 and TLS pass through untouched),
                  leastconn, an HTTP health check of every worker every second (HEAD
                  /_router/health, answered by the worker's own event loop: a stopped or hung
                  worker, whose port still accepts connections, fails it and gets no new
                  connection within about 2 s), and a new connection that meets a dead worker
                  retried on a live one; plus a stats page and HAProxy's own Prometheus
                  metrics on a loopback port (--stats-port)

Signals to the supervisor (the same list is in docs/operations.md, "Signals"):

    SIGUSR2            rolling restart: the workers one at a time, without losing a request:
                       haproxy sends the worker no new connections, the worker drains (finishes
                       what it has; its keep-alive clients get Connection: close and reconnect
                       to another worker), exits, and its successor starts
    SIGTERM, SIGINT    stop: haproxy stops listening, every worker drains (--drain seconds at
    (Ctrl-C), SIGHUP   most), then everything exits; a second one stops at once. SIGHUP is what
                       a closing terminal sends. SIGUSR1 does the same (drain everything, exit)
    To a worker itself: SIGUSR1 drains that one worker (it exits and is started again)

A worker that exits is restarted (after 0.25 s, doubling up to 10 s while it keeps dying
within 30 s of its start); so are haproxy and the supervisor's own redis-server. The moment a
worker's process exits, haproxy is told (admin socket) to send it nothing (maintenance, so
not even its checks), and the worker is given back to haproxy only once the new process has
proved it is the one this supervisor started: every start gets a fresh random token in its
environment (CLAUDE_ROUTER_WORKER_TOKEN) and must answer a challenge on its health page with
an HMAC of it. Something else listening on the port (a process that grabbed it in between)
never gets into rotation. A worker that fails to start the first time stops the whole start-up
with its message.

The supervisor also asks every worker in rotation for its health page every second. A worker
that accepts the connection but does not answer (stopped, hung) for --hang-timeout seconds (20)
is killed (SIGKILL) and restarted; one that answers again before that is left alone (haproxy
has already taken it back). Its requests in flight meanwhile wait at most that long.

Several machines: run ``./scripts/run --workers N --host 0.0.0.0`` on each (with one shared
``--set router_redis_url=redis://...`` and, as the router requires behind a public address
when endpoints hold keys, client keys), and put a front haproxy over them:
``claude-router-workers --front-config HOST1:8080 HOST2:8080 > haproxy.cfg``.

Each worker keeps its own loopback port, so a Prometheus scrape of every worker's
/_router/metrics adds up to the whole, and ./scripts/status --url W1 --url W2 shows one view.
Commands reach every worker through Redis: ./scripts/status --redis URL --disable NAME (also
--enable, --reset [NAME], --forget [NAME]).

For benchmarks and tests, ``start_cluster(workers, endpoints, ...)`` starts this supervisor as
a subprocess and returns a ``Cluster`` with the listen URL, the worker URLs and ``stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hmac
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from claude_router.access import is_loopback
from claude_router.cli import prog
from claude_router.liveness import CHALLENGE_HEADER, HEALTH_HEADER, PATH as HEALTH_PATH, PROOF_HEADER, TOKEN_ENV, proof
from claude_router.runtime import raise_fd_limit  # children inherit it (haproxy, redis)

ROOT = Path(__file__).resolve().parents[3]  # the checkout: addon/claude_router/cli/workers.py
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
ROUTER_SCRIPT = str(ROOT / "addon" / "router.py")
MOCK_MODULE = "claude_router_dev.mock_relay"  # the demo's relays (python -m)
REVERSE = "reverse:https://api.anthropic.com"  # what plain ./scripts/run uses

RESTART_FIRST = 0.25  # seconds before the first restart of a child that exited
RESTART_MAX = 10.0
STABLE_AFTER = 30.0  # a child that ran this long starts its back-off afresh when it exits
START_TIMEOUT = 60.0  # first start of every worker (a loaded 2-core machine is slow)
STOP_GRACE = 5.0
SETTLE = 0.5  # a first start counts once the worker still runs this long after opening its port
SUCCESSOR_SETTLE = 2.0  # the same for a rolling restart's successor: a bad deploy must show here
HEALTH_EVERY = 1.0  # the supervisor asks each worker in rotation for its health page this often
PROBE_TIMEOUT = 2.0  # ... and waits this long for the answer
HANG_TIMEOUT = 20.0  # a worker that answers nothing for this long is killed and restarted
REDIS_MAXMEMORY = "256mb"

# The balancer. mode tcp: the bytes pass untouched (HTTP/1.1, HTTP/2, TLS in regular mode), so
# every router feature works as with one process. Timeouts are idle timeouts (a stream that
# sends events never idles): longer than any silence the router itself allows (a non-streaming
# answer may take router_headers_timeout = 600 s to start; router_deadline is 900 s).
HAPROXY_CFG = """\
# {header}
global
    maxconn {maxconn}
    nbthread 1
    log stdout format raw local0 info
    stats socket {socket} mode 600 level admin
    hard-stop-after {hard_stop}s

defaults
    mode tcp
    log global
    option tcplog
    option dontlognull
    option dontlog-normal          # log only connections that ended badly (a worker died...)
    # A worker whose accept queue overflows (a burst of new connections) drops SYNs: the
    # kernel re-sends them after 1 s and 3 s, so a connect must outlast that. A refused connect
    # is retried after min(this, 1 s) (haproxy 2.6 with leastconn), on another worker.
    timeout connect {connect}
    timeout client {idle}s
    timeout server {idle}s
    timeout tunnel {idle}s           # supersedes client/server once the connection is a tunnel
    timeout check {check}             # a health check's answer (its connect: min(connect, inter))
    retries 3
    option redispatch 1            # every retry of a failed connect goes to another worker

frontend router
    bind {bind}
    default_backend workers

backend workers
    balance leastconn
    # An HTTP check every second: HEAD /_router/health, answered by the router's own event
    # loop (addon/claude_router/liveness.py), never forwarded. A TCP connect would not do: a
    # stopped or hung process still accepts connections (the kernel queues them). No answer
    # within 1 s (or anything but a 200 with x-router-health: ok) marks the worker down at
    # once (fall 1), so a hung worker gets no new connection within about 2 s; one success
    # brings it back (checked every 250 ms while down). Connections it already has stay (mode
    # tcp: they end with the worker's answers, or when the supervisor replaces a worker that
    # stays hung). Three failed connects from real traffic also mark it down (observe layer4).
    # The supervisor puts a worker in maintenance (no traffic, no checks) the moment its
    # process exits, and gives it back only once the new process has proved who it is.
    option httpchk
    http-check send meth HEAD uri {health_path} ver HTTP/1.1 hdr host localhost
    http-check expect hdr name {health_header} value ok
    default-server check inter 1s downinter 250ms fall 1 rise 1 observe layer4 error-limit 3 on-error mark-down
{servers}
    # Fail open: when every worker is marked down at once (all overloaded, checks timing out),
    # connections still go to them, unchecked, instead of being refused.
    option allbackups
{backups}
{stats}"""

HAPROXY_STATS = """
frontend stats
    mode http
    bind 127.0.0.1:{port}
    timeout client 30s
    http-request use-service prometheus-exporter if {{ path /metrics }}
    stats enable
    stats uri /
    stats refresh 5s
"""


def _out(data: bytes) -> None:
    """Write to our stdout; a closed or broken stdout (| head) loses the output, nothing else."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def say(msg: str) -> None:
    _out(f"workers | {msg}\n".encode())


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports on loopback. Every socket stays bound until all are picked:
    picked one at a time, the kernel may hand out a port it has just released again (haproxy's
    stats port once came out the same as a worker's)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


async def probe(host: str, port: int, token: str | None, timeout: float = PROBE_TIMEOUT) -> tuple[str, str]:
    """Ask a worker's health page whether it is the process holding ``token``: (verdict,
    detail), the verdict one of ok (it answered with the proof), draining (the same, but it
    is draining), refused (nothing listens), silent (it accepts but does not answer: stopped
    or hung), wrong (something answers, but not with the proof: not the process started)."""
    challenge = secrets.token_hex(16)
    request = (f"HEAD {HEALTH_PATH} HTTP/1.1\r\nhost: localhost\r\n{CHALLENGE_HEADER}: {challenge}\r\n"
               "connection: close\r\n\r\n").encode()
    connected = False
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(host, port)
            connected = True
            try:
                w.write(request)
                await w.drain()
                head = await r.readuntil(b"\r\n\r\n")
            finally:
                w.close()
    except ConnectionRefusedError:
        return "refused", "connection refused"
    except TimeoutError:
        return "silent", (f"no answer within {timeout:g} s" if connected
                          else f"the connection was not accepted within {timeout:g} s")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        return ("wrong", f"closed without an answer ({type(e).__name__})") if connected else (
            "refused", f"cannot connect ({e})")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "?"
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if token and hmac.compare_digest(headers.get(PROOF_HEADER, ""), proof(token, challenge)):
        return ("ok", "") if status == "200" else ("draining", f"HTTP {status}")
    return "wrong", (f"HTTP {status} without the proof of this start's token"
                     + (f" (server: {headers['server'][:60]})" if "server" in headers else ""))


async def haproxy_command(sock: Path | str, command: str, timeout: float = 2.0) -> str:
    """One command on haproxy's admin socket (show stat, show sess, set server ...)."""
    async with asyncio.timeout(timeout):
        r, w = await asyncio.open_unix_connection(str(sock))
        try:
            w.write(command.encode() + b"\n")
            await w.drain()
            return (await r.read()).decode(errors="replace")
        finally:
            w.close()


def _child_setup() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def configured(extra: list[str], name: str) -> str | None:
    """The value of mitmproxy option ``name`` as the workers will see it: the last
    ``--set name=VALUE`` among the arguments, else the confdir's config.yaml, else None."""
    value = None
    for i, arg in enumerate(extra):
        item = extra[i + 1] if arg == "--set" and i + 1 < len(extra) else (
            arg[len("--set="):] if arg.startswith("--set=") else "")
        if item.startswith(name + "="):
            value = item.split("=", 1)[1]
    if value is not None:
        return value
    if name == "confdir":
        return None
    confdir = Path(configured(extra, "confdir") or "~/.mitmproxy").expanduser()
    try:
        from ruamel.yaml import YAML  # mitmproxy's own YAML reader

        path = next(p for p in (confdir / "config.yaml", confdir / "config.yml") if p.exists())
        doc = YAML(typ="safe", pure=True).load(path.read_text())
    except Exception:  # noqa: BLE001 - no file, or one mitmproxy itself will complain about
        return None
    found = doc.get(name) if isinstance(doc, dict) else None
    return None if found is None else str(found)


def ensure_installed(tool: str, package: str) -> None:
    """Install a Debian package with apt-get when its binary is missing, or explain and exit."""
    if shutil.which(tool):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        say(f"{tool} is not installed; installing the {package} package with apt-get ...")
        ok = subprocess.run(["sh", "-c", f"apt-get update -qq && apt-get install -y -qq {package}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if ok.returncode == 0 and shutil.which(tool):
            return
        say(f"apt-get could not install {package}: {ok.stderr.strip()[-400:]}")
    elif shutil.which("apt-get"):
        say(f"{tool} is not installed, and installing it needs root: sudo apt-get install {package}")
    sys.exit(f"workers: {tool} is needed for --workers. Install it (Debian/Ubuntu: apt-get install "
             f"{package}; Fedora: dnf install {package}; macOS: brew install {package}) and run "
             f"this again.")


# ------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    workers: int
    host: str
    port: int
    worker_ports: list[int]
    mode: str  # the mitmproxy mode of plain ./scripts/run: reverse:https://... or regular
    extra: list[str]
    run_dir: Path
    log_dir: Path | None
    stats_port: int | None
    idle: int
    redis_url: str | None  # given by the operator; None: we start one
    demo: bool = False
    mock_port: int | None = None
    prefix: str = "endpoint_health_"
    drain: int = 30  # seconds a draining worker may take to finish its requests
    hang_timeout: float = HANG_TIMEOUT  # a worker silent this long is killed and replaced
    redis_maxmemory: str = REDIS_MAXMEMORY

    @property
    def redis_socket(self) -> Path:
        return self.run_dir / "redis.sock"

    @property
    def shared_redis(self) -> str:
        return self.redis_url or f"unix://{self.redis_socket}"

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '', '[::]') else host}:{self.port}"

    def worker_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.worker_ports[i]}"

    def worker_argv(self, i: int) -> list[str]:
        wport = self.worker_ports[i]
        if is_loopback(self.host):
            listen = ["--mode", self.mode, "--listen-host", "127.0.0.1", "--listen-port", str(wport)]
        else:
            # The worker listens on loopback (the mode's @host:port wins over --listen-host), but
            # its listen_host is the public one clients reach through haproxy: so the router's
            # own open-door guard (endpoint keys without client keys behind a public address)
            # refuses to start exactly as a single public router would.
            listen = ["--mode", f"{self.mode}@127.0.0.1:{wport}", "--listen-host", self.host,
                      "--listen-port", str(self.port)]
        argv = [MITMDUMP, "-s", ROUTER_SCRIPT, *listen]
        if self.redis_url is None:
            argv += ["--set", f"router_redis_url={self.shared_redis}"]
        if self.demo:
            for tier in ("aws", "droid", "ultra", "claude"):
                argv += ["--set", f"router_endpoints={tier}=http://127.0.0.1:{self.mock_port}/{tier}"]
        argv += ["--set", f"router_drain_timeout={self.drain}"]
        return argv + self.extra

    def redis_argv(self) -> list[str]:
        # An append-only file in the run directory: a restart after a crash or kill -9 finds
        # the state as it was (Redis writes each change before it answers, so nothing an
        # instance was told is lost to a crash of redis-server alone). noeviction: health,
        # the disabled set, salt and epoch must never be evicted; at maxmemory Redis refuses
        # writes instead and the routers go on with their local view.
        return ["redis-server", "--port", "0", "--unixsocket", str(self.redis_socket),
                "--unixsocketperm", "700", "--save", "", "--appendonly", "yes",
                "--appendfsync", "everysec", "--dir", str(self.run_dir),
                "--maxmemory", self.redis_maxmemory, "--maxmemory-policy", "noeviction",
                "--loglevel", "warning"]

    def mock_argv(self) -> list[str]:
        # The demo of plain ./scripts/run: aws answers 529, droid resets, ultra and claude work.
        return [sys.executable, "-m", MOCK_MODULE, "--port", str(self.mock_port), "--quiet",
                "--fault", "aws=529", "--fault", 'droid={"reset":"before_headers"}',
                "--fault", 'ultra={"event_gap_ms":200}']

    @property
    def haproxy_cfg(self) -> Path:
        return self.run_dir / "haproxy.cfg"

    @property
    def haproxy_socket(self) -> Path:
        return self.run_dir / "haproxy.sock"

    def haproxy_config(self) -> str:
        return haproxy_config(f"Written by claude-router-workers for this run; haproxy -db -f {self.haproxy_cfg}",
                              self.host, self.port,
                              [(f"w{i + 1}", f"127.0.0.1:{p}") for i, p in enumerate(self.worker_ports)],
                              self.haproxy_socket, self.idle, self.stats_port,
                              hard_stop=self.drain + 10)

    def haproxy_argv(self) -> list[str]:
        # -db: foreground, no daemon. (Not -q: it silences the log on stdout too.)
        return ["haproxy", "-db", "-f", str(self.haproxy_cfg)]


def haproxy_config(header: str, host: str, port: int, servers: list[tuple[str, str]],
                   sock: Path | str, idle: int, stats_port: int | None, connect: str = "5s",
                   hard_stop: int = 10, check: str = "1s") -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    maxconn = max(256, min(50_000, (hard - 200) // 2))  # two descriptors per connection
    bind = f"[{host}]:{port}" if ":" in host else f"{host or '0.0.0.0'}:{port}"
    lines = "\n".join(f"    server {name} {addr}" for name, addr in servers)
    backups = "\n".join(f"    server {name}-open {addr} backup no-check" for name, addr in servers)
    stats = HAPROXY_STATS.format(port=stats_port) if stats_port else ""
    return HAPROXY_CFG.format(header=header, maxconn=maxconn, socket=sock, idle=idle, bind=bind,
                              servers=lines, backups=backups, stats=stats, connect=connect,
                              hard_stop=hard_stop, check=check, health_path=HEALTH_PATH,
                              health_header=HEALTH_HEADER)


def front_config(servers: list[str], host: str, port: int, idle: int) -> str:
    """For several machines: a front haproxy over machines that each run
    ./scripts/run --workers N --host 0.0.0.0 with one shared router_redis_url."""
    named = [(f"m{i + 1}", addr) for i, addr in enumerate(servers)]
    return haproxy_config("A front haproxy over machines running ./scripts/run --workers N "
                          "(claude-router-workers --front-config); haproxy -db -f THIS_FILE",
                          host, port, named, "/run/haproxy-router.sock", idle, None)


# ---------------------------------------------------------------------------------- children

class Child:
    """One supervised process: its output goes to a log file or, prefixed, to our stdout."""

    def __init__(self, name: str, argv: list[str], log_dir: Path | None, port: int | None = None,
                 unix: Path | None = None, host: str = "127.0.0.1", verify: bool = False) -> None:
        self.name = name
        # A worker: every start gets a new token in its environment, and it is ready only
        # once its health page proves it holds it (not on a bare connect: see probe).
        self.verify = verify
        self.token: str | None = None
        self.argv = argv
        self.log_path = log_dir / f"{name.replace(' ', '-')}.log" if log_dir else None
        self.host = host
        self.port = port  # ready when this port accepts
        self.unix = unix  # ... or this unix socket
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.starts = 0
        self.relay: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def process(self) -> asyncio.subprocess.Process:
        """The process of the latest start (for a child that has been started)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self.proc

    async def start(self) -> None:
        # Own sessions: a Ctrl-C in the terminal reaches the supervisor only, which stops the
        # children in order (and a child that exits is never mistaken for one to restart).
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        if self.verify:
            self.token = secrets.token_hex(16)
            env[TOKEN_ENV] = self.token
        if self.log_path is not None:
            with open(self.log_path, "ab") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=ROOT, start_new_session=True, preexec_fn=_child_setup, env=env)
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True, preexec_fn=_child_setup, env=env)
            assert self.proc.stdout is not None  # stdout=PIPE
            self.relay = asyncio.get_running_loop().create_task(self._relay(self.proc.stdout))
        self.started_at = time.monotonic()
        self.starts += 1

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """Copy the child's output to ours, each line prefixed with its name. The pipe is read
        to its end whatever happens to our stdout, so a child never blocks on a full pipe."""
        prefix = f"{self.name} | ".encode()
        pending = b""
        while chunk := await stream.read(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            if len(pending) > 65536:  # a very long line: pass it on in pieces
                lines.append(pending)
                pending = b""
            _out(b"".join(prefix + ln + b"\n" for ln in lines))
        if pending:
            _out(prefix + pending + b"\n")

    async def ready(self, timeout: float) -> str | None:
        """None once the child accepts connections (a worker: once its health page proves it
        is the process started, see probe), else why not."""
        deadline = time.monotonic() + timeout
        proc = self.proc
        last = ""
        while time.monotonic() < deadline:
            if proc is None or proc.returncode is not None:
                return f"exited with code {proc.returncode if proc else '?'}" + (
                    f" (meanwhile on its port: {last})" if last else "")
            if self.verify:
                assert self.port is not None  # a worker: it listens on a port
                verdict, detail = await probe(self.host, self.port, self.token,
                                              min(PROBE_TIMEOUT, max(0.1, deadline - time.monotonic())))
                if verdict == "ok":
                    return None
                if verdict == "wrong":
                    last = f"something else answers: {detail}"
                await asyncio.sleep(0.05)
                continue
            try:
                if self.unix is not None:
                    _, w = await asyncio.wait_for(asyncio.open_unix_connection(str(self.unix)), 1)
                else:
                    _, w = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 1)
                w.close()
                return None
            except (TimeoutError, OSError):
                await asyncio.sleep(0.05)
        if self.verify:
            return (f"did not prove within {timeout:g} s that it is the process started"
                    + (f" ({last})" if last else ""))
        return f"did not accept connections within {timeout:g} s"

    async def stop(self, grace: float = STOP_GRACE) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self.relay is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await asyncio.wait_for(self.relay, 1)

    def kill_now(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class StartError(RuntimeError):
    pass


class Supervisor:
    def __init__(self, plan: Plan, info_file: Path | None) -> None:
        self.plan = plan
        self.info_file = info_file
        p = plan
        self.redis = None if p.redis_url else Child("redis", p.redis_argv(), p.log_dir, unix=p.redis_socket)
        self.mock = Child("mock", p.mock_argv(), p.log_dir, port=p.mock_port) if p.demo else None
        self.workers = [Child(f"w{i + 1}", p.worker_argv(i), p.log_dir, port=port, verify=True)
                        for i, port in enumerate(p.worker_ports)]
        self.haproxy = Child("haproxy", p.haproxy_argv(), p.log_dir, port=p.port,
                             host="127.0.0.1" if p.host in ("", "0.0.0.0", "::") else p.host)
        self.stopping = asyncio.Event()
        self.hurry = False  # a second Ctrl-C: stop without draining
        self.running = False
        self.watchers: list[asyncio.Task] = []
        self.restarts = {c.name: 0 for c in self.children}
        self.replacing: set[str] = set()  # workers draining for a rolling restart
        self.in_rotation: dict[str, int] = {}  # worker -> the pid haproxy was last given back
        self.silent_since: dict[str, float] = {}  # worker -> since when it has not answered
        self.rolling: asyncio.Task | None = None

    @property
    def children(self) -> list[Child]:
        return [c for c in (self.redis, self.mock, *self.workers, self.haproxy) if c is not None]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:  # a second Ctrl-C: no more waiting
                self.hurry = True
                for c in self.children:
                    c.kill_now()
            self.stopping.set()

        def on_restart() -> None:
            if not self.running or self.stopping.is_set():
                return
            if self.rolling is not None and not self.rolling.done():
                say("a rolling restart is already under way")
                return
            self.rolling = loop.create_task(self.rolling_restart())

        # Stop, draining every worker first: Ctrl-C, SIGTERM, SIGHUP (the terminal closed), and
        # SIGUSR1 (what drains one worker drains them all here).
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGUSR2, on_restart)
        try:
            try:
                await self.start_all()
            except StartError as e:
                say(f"start-up failed: {e}")
                return 1
            if self.stopping.is_set():
                return 0
            self.running = True
            self.banner()
            self.write_info()
            self.watchers = [loop.create_task(self.watch(c)) for c in self.children]
            self.watchers += [loop.create_task(self.watch_health(w)) for w in self.workers]
            await self.stopping.wait()
            say(f"stopping: haproxy takes no new connections; the workers finish what they have "
                f"({self.plan.drain} s at most; Ctrl-C again: at once)"
                + (", then redis stops" if self.redis else ""))
            return 0
        finally:
            self.running = False
            for t in [*self.watchers, *([self.rolling] if self.rolling else [])]:
                t.cancel()
            await asyncio.gather(*self.watchers, *([self.rolling] if self.rolling else []),
                                 return_exceptions=True)
            if self.stopping.is_set() and not self.hurry:
                await self.drain_all()
            await self.haproxy.stop()
            await asyncio.gather(*(w.stop() for w in self.workers))
            for c in (self.mock, self.redis):
                if c is not None:
                    await c.stop()
            if self.info_file is not None:
                with contextlib.suppress(OSError):
                    self.info_file.unlink()

    async def start_all(self) -> None:
        p = self.plan
        for c in (self.redis, self.mock):
            if c is not None:
                await c.start()
                if why := await c.ready(15):
                    raise StartError(f"{c.name} {why}" + self.tail(c))
        # Workers share the confdir; the first one creates the mitmproxy CA when there is none
        # yet, so the others must not race it (every worker must present the same CA).
        confdir = Path(configured(p.extra, "confdir") or "~/.mitmproxy").expanduser()
        first = [] if (confdir / "mitmproxy-ca.pem").exists() else self.workers[:1]
        for group in (first, [w for w in self.workers if w not in first]):
            for w in group:
                await w.start()
            whys = await asyncio.gather(*(w.ready(START_TIMEOUT) for w in group))
            if group and not any(whys):
                # mitmdump opens its port before it exits for an error logged during start-up
                # (a bad option, say): give it the moment it takes to do so.
                await asyncio.sleep(SETTLE)
                whys = [f"exited with code {w.process.returncode}" if w.process.returncode is not None
                        else None for w in group]
            for w, why in zip(group, whys):
                if why:
                    raise StartError(f"worker {w.name} (port {w.port}) {why}" + self.tail(w))
            if self.stopping.is_set():
                return
        p.haproxy_cfg.write_text(p.haproxy_config())
        check = await asyncio.create_subprocess_exec(
            "haproxy", "-c", "-q", "-f", str(p.haproxy_cfg), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        out, _ = await check.communicate()
        if check.returncode != 0:
            raise StartError(f"haproxy refused its configuration:\n{out.decode(errors='replace')}")
        await self.haproxy.start()
        if why := await self.haproxy.ready(15):
            raise StartError(f"haproxy on {p.host}:{p.port} {why}" + self.tail(self.haproxy))
        for w in self.workers:  # (each proved who it is in ready())
            self.in_rotation[w.name] = w.process.pid

    async def drain_all(self) -> None:
        """A graceful stop: haproxy stops listening (its connections go on), every worker
        finishes the requests it has (router.drain: Connection: close to keep-alive clients,
        exit when nothing is in flight, or after --drain seconds), then everything stops."""
        haproxy = self.haproxy.proc
        if haproxy is not None and haproxy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                haproxy.send_signal(signal.SIGUSR1)  # haproxy's soft stop
            # Connections haproxy is handing over now must reach a listening worker (closing
            # a listener resets what waits in its accept queue).
            await asyncio.sleep(0.5)
        live = [w for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for w in live:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGUSR1)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(w.process.wait() for w in live)),
                                   self.plan.drain + STOP_GRACE)
        if haproxy is not None and haproxy.returncode is None:
            # its last bytes to slow clients: haproxy exits by itself once its connections end
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(haproxy.wait(), 3)

    async def rolling_restart(self) -> None:
        """SIGUSR2: replace the workers one at a time. haproxy sends the draining worker no new
        connections; it finishes its requests (router.drain), exits and is started again at
        once; haproxy takes it back when it accepts connections. Then the next one."""
        n = len(self.workers)
        say(f"rolling restart of {n} workers, one at a time" + (
            "" if n > 1 else " (with one worker, new connections fail while it restarts)"))
        sock = self.plan.haproxy_socket
        for w in self.workers:
            old = w.pid
            if old is None or w.process.returncode is not None:
                continue  # dead: its watcher is restarting it already
            self.replacing.add(w.name)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await haproxy_command(sock, f"set server workers/{w.name} state drain")
            starts = w.starts
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGUSR1)
            serving = await self.successor_serving(w, starts)
            self.replacing.discard(w.name)  # (its successor was put back in rotation by restart())
            if self.stopping.is_set():
                return
            if not serving:
                say(f"rolling restart: {w.name}'s successor is not serving; stopping here, the "
                    f"other workers keep running as they are ({w.name} stays out of rotation "
                    "until a successor runs)" + self.tail(w))
                return
        say("rolling restart done")

    async def successor_serving(self, w: Child, starts: int) -> bool:
        """Wait for a draining worker to exit and its successor (start number starts + 1) to
        serve; False as soon as the successor exits, or when that takes too long."""
        deadline = time.monotonic() + self.plan.drain + STOP_GRACE + START_TIMEOUT
        while time.monotonic() < deadline and not self.stopping.is_set():
            if w.starts == starts:  # the old process is still finishing its requests
                await asyncio.sleep(0.1)
                continue
            if w.starts > starts + 1 or w.process.returncode is not None:
                return False  # the successor exited (a bad deploy): it is being restarted
            if self.in_rotation.get(w.name) == w.pid:
                return True  # restart() saw it serve for a while and gave it back to haproxy
            await asyncio.sleep(0.1)
        return False

    def tail(self, c: Child) -> str:
        if c.log_path is None:
            return ""  # its output was shown as it came
        with contextlib.suppress(OSError):
            lines = c.log_path.read_text(errors="replace").strip().splitlines()[-15:]
            return "; its log ends:\n" + "\n".join(lines)
        return ""

    async def watch(self, c: Child) -> None:
        """Restart the child whenever it exits, with a back-off while it keeps dying."""
        quick = 0
        while True:
            proc = c.process
            code = await proc.wait()
            if self.stopping.is_set() or not self.running:
                return
            ran = time.monotonic() - c.started_at
            if c.name in self.replacing:  # drained for a rolling restart: its successor now
                self.replacing.discard(c.name)
                say(f"{c.name} (pid {proc.pid}) drained and exited after {ran:.1f} s; starting its successor")
                await self.restart(c)
                continue
            quick = 0 if ran >= STABLE_AFTER else quick + 1
            delay = min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, quick - 1))
            if c in self.workers:
                # Tell haproxy now rather than at its next check or at the next refused
                # connection (which haproxy 2.6 retries only after `timeout connect`), and put
                # the worker in maintenance (no traffic, no checks): whatever listens on its
                # port next gets clients only once restart() has seen it prove who it is.
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await haproxy_command(self.plan.haproxy_socket, f"set server workers/{c.name} state maint")
                self.in_rotation.pop(c.name, None)
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            say(f"{c.name} (pid {proc.pid}) {how} after {ran:.1f} s; restarting in {delay:g} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            await self.restart(c)

    async def restart(self, c: Child) -> None:
        """Start the child again. A worker is kept out of haproxy's rotation (maintenance: no
        traffic, no checks) until its health page has proved it is the process just started
        (Child.ready) and it has stayed up for a moment: a worker that fails at start-up opens
        its port before it exits, and another process may hold the port (one that grabbed it
        after the worker died): haproxy's own checks would send either clients."""
        worker = c in self.workers
        sock = self.plan.haproxy_socket
        if c is self.haproxy:
            self.plan.haproxy_cfg.write_text(self.plan.haproxy_config())
        if worker:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await haproxy_command(sock, f"set server workers/{c.name} state maint")
        t0 = time.monotonic()
        self.silent_since.pop(c.name, None)
        await c.start()
        self.restarts[c.name] += 1
        self.write_info()
        why = await c.ready(START_TIMEOUT)
        if why is not None and worker and c.process.returncode is None:
            # Running, but not proving who it is (something else holds its port?): it never
            # gets clients; killed, and its watcher starts another (with the back-off).
            say(f"{c.name} (pid {c.pid}) {why}; killing it" + self.tail(c))
            c.kill_now()
            return
        if why is None and worker:
            await asyncio.sleep(SUCCESSOR_SETTLE)
            if c.process.returncode is not None:
                return  # it failed after all: its watcher restarts it, still out of rotation
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await haproxy_command(sock, f"set server workers/{c.name} state ready")
                await haproxy_command(sock, f"set server workers/{c.name} health up")
            self.in_rotation[c.name] = c.process.pid
        if why is None:
            say(f"{c.name} is back (pid {c.pid}), {time.monotonic() - t0:.1f} s after its restart")

    async def watch_health(self, w: Child) -> None:
        """Ask a worker in rotation for its health page every HEALTH_EVERY seconds. One that
        accepts but does not answer (stopped, hung; haproxy's own check has taken it out of
        rotation within about 2 s) is killed after --hang-timeout seconds and restarted by its
        watcher. Something that answers without the proof of the worker's token is taken out
        of rotation at once. A refused connection is a worker draining or exiting: its watcher
        sees to it."""
        sock = self.plan.haproxy_socket
        while True:
            await asyncio.sleep(HEALTH_EVERY)
            pid = w.pid
            if (self.stopping.is_set() or w.name in self.replacing or pid is None
                    or w.process.returncode is not None or self.in_rotation.get(w.name) != pid):
                self.silent_since.pop(w.name, None)
                continue
            asked = time.monotonic()
            assert w.port is not None  # a worker: it listens on a port
            verdict, detail = await probe(w.host, w.port, w.token)
            if w.pid != pid or w.process.returncode is not None or self.stopping.is_set():
                continue
            now = time.monotonic()
            if verdict == "silent":
                since = self.silent_since.setdefault(w.name, asked)
                if since == asked:
                    say(f"{w.name} (pid {pid}) does not answer its health page ({detail}): haproxy "
                        f"sends it nothing new; it is replaced if it stays silent for "
                        f"{self.plan.hang_timeout:g} s")
                elif now - since >= self.plan.hang_timeout:
                    say(f"{w.name} (pid {pid}) has not answered its health page for {now - since:.1f} s: "
                        "killing it (SIGKILL) to start another")
                    self.silent_since.pop(w.name, None)
                    w.kill_now()  # its watcher puts it in maintenance and restarts it
                continue
            if (back := self.silent_since.pop(w.name, None)) is not None:
                say(f"{w.name} (pid {pid}) answers its health page again, after {now - back:.1f} s")
            if verdict == "wrong":
                say(f"{w.name}: something that is not the worker started (pid {pid}) answers on its "
                    f"port {w.port} ({detail}): out of rotation")
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await haproxy_command(sock, f"set server workers/{w.name} state maint")
                self.in_rotation.pop(w.name, None)

    def info(self) -> dict:
        p = self.plan
        return {
            "url": p.url,
            "host": p.host,
            "port": p.port,
            "mode": p.mode,
            "supervisor_pid": os.getpid(),
            "workers": [{"name": w.name, "port": w.port, "url": p.worker_url(i), "pid": w.pid,
                         "restarts": self.restarts[w.name],
                         "metrics": f"{p.worker_url(i)}/_router/metrics"}
                        for i, w in enumerate(self.workers)],
            "redis_url": _redacted(p.shared_redis),  # a password stays out of the file
            "redis_started": self.redis is not None,
            "redis_pid": self.redis.pid if self.redis else None,
            "hang_timeout": p.hang_timeout,
            "key_prefix": p.prefix,
            "haproxy": {"pid": self.haproxy.pid, "config": str(p.haproxy_cfg),
                        "socket": str(p.haproxy_socket),
                        "stats": f"http://127.0.0.1:{p.stats_port}/" if p.stats_port else None},
            "mock": f"http://127.0.0.1:{p.mock_port}" if p.demo else None,
            "run_dir": str(p.run_dir),
            "log_dir": str(p.log_dir) if p.log_dir else None,
        }

    def write_info(self) -> None:
        if self.info_file is None:
            return
        tmp = self.info_file.with_name(self.info_file.name + ".tmp")
        tmp.write_text(json.dumps(self.info(), indent=2))
        tmp.replace(self.info_file)

    def banner(self) -> None:
        p = self.plan
        status = " ".join(f"--url {p.worker_url(i)}" for i in range(p.workers))
        prefix = "" if p.prefix == "endpoint_health_" else f" --prefix {p.prefix}"
        redis = (f"{p.shared_redis} (redis-server pid {self.redis.pid}, started for this run; "
                 f"append-only file in {p.run_dir}, maxmemory {p.redis_maxmemory}, noeviction)"
                 if self.redis else f"{_redacted(p.shared_redis)} (router_redis_url)")
        lines = [
            f"{p.workers} router workers behind haproxy on {p.url}"
            f" ({'regular' if p.mode == 'regular' else 'reverse'} mode; haproxy pid {self.haproxy.pid})",
            *(f"  {w.name}: {p.worker_url(i)} (pid {w.pid}); metrics {p.worker_url(i)}/_router/metrics"
              for i, w in enumerate(self.workers)),
            f"  shared state: {redis}",
        ]
        if p.stats_port:
            lines.append(f"  haproxy stats: http://127.0.0.1:{p.stats_port}/ (its Prometheus metrics: /metrics)")
        if p.log_dir:
            lines.append(f"  logs: {p.log_dir}/")
        lines += [
            "Health, cooldowns, disabled endpoints, conversations and learned caching are shared",
            "through Redis. Commands that reach every worker:",
            f"  ./scripts/status --redis {_redacted(p.shared_redis)}{prefix} --disable NAME   "
            "(or --enable NAME, --reset [NAME], --forget [NAME])",
            "One status view, counters summed over the workers:",
            f"  ./scripts/status {status}",
            "Prometheus: scrape every worker's /_router/metrics and sum over the instances.",
            "A worker that exits, or does not answer its health page for "
            f"{p.hang_timeout:g} s, is restarted. Rolling restart (each worker drained, then replaced):",
            f"  kill -USR2 {os.getpid()}",
            f"Ctrl-C (or kill -TERM/-HUP/-USR1 {os.getpid()}) stops everything, letting requests in "
            f"flight finish ({p.drain} s at most).",
        ]
        if p.demo:
            lines += ["", *demo_message(p)]
        for line in lines:
            say(line)


def demo_message(p: Plan) -> list[str]:
    return [
        f"Demo: mock relay at http://127.0.0.1:{p.mock_port} with four tiers in price order: "
        "aws (529), droid (reset), ultra, claude.",
        "Try, in another terminal:",
        f"  curl -si {p.url}/v1/messages -H 'x-api-key: demo' -H 'content-type: application/json' \\",
        "    -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":64,\"messages\":[{\"role\":\"user\","
        "\"content\":\"hi\"}]}'",
        f"  curl -sN {p.url}/v1/messages -H 'x-api-key: demo' -H 'content-type: application/json' \\",
        "    -d '{\"model\":\"claude-sonnet-4-5\",\"max_tokens\":64,\"stream\":true,\"messages\":"
        "[{\"role\":\"user\",\"content\":\"hi\"}]}'",
        "Look at X-Used-Endpoint and X-Router-Attempts; after 3 failures aws and droid cool down for "
        "60 s on every worker.",
        f"Or point Claude Code at it: ANTHROPIC_BASE_URL={p.url} ANTHROPIC_API_KEY=demo claude",
    ]


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


# --------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog=prog("claude-router-workers"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="router processes (default 2)")
    ap.add_argument("--port", type=int, default=8080, help="the one listen port (default 8080)")
    ap.add_argument("--host", default="127.0.0.1", help="the listen address (default 127.0.0.1)")
    ap.add_argument("--worker-base", type=int, default=None,
                    help="first worker port on 127.0.0.1 (default: --port + 1; 0: free ports)")
    ap.add_argument("--regular", action="store_true", help="regular proxy mode (HTTPS_PROXY)")
    ap.add_argument("--demo", action="store_true", help="in front of the bundled mock relay")
    ap.add_argument("--web", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--log-dir", type=Path, help="write each process's output to DIR/NAME.log "
                    "instead of showing it prefixed with the process's name")
    ap.add_argument("--info-file", type=Path, help="keep a JSON description of the running "
                    "processes here (ports, pids, Redis URL), for scripts and tests")
    ap.add_argument("--stats-port", type=int, default=0,
                    help="haproxy's stats page and Prometheus metrics on this loopback port "
                         "(default: a free port; -1: none)")
    ap.add_argument("--drain", type=int, default=30, metavar="SECONDS",
                    help="how long a worker may take to finish the requests it has when it is "
                         "stopped (Ctrl-C) or replaced (SIGUSR2: rolling restart); default 30 "
                         "(a --set router_drain_timeout after -- wins)")
    ap.add_argument("--hang-timeout", type=float, default=HANG_TIMEOUT, metavar="SECONDS",
                    help="a worker that accepts connections but does not answer its health page "
                         f"for this long (stopped, hung) is killed and restarted (default {HANG_TIMEOUT:g}; "
                         "haproxy sends it no new connection after about 2 s already)")
    ap.add_argument("--redis-maxmemory", default=REDIS_MAXMEMORY, metavar="SIZE",
                    help="maxmemory of the redis-server started for the workers (default "
                         f"{REDIS_MAXMEMORY}; policy noeviction: at the limit writes are refused)")
    ap.add_argument("--idle-timeout", type=int, default=3600,
                    help="seconds haproxy keeps a silent connection (default 3600)")
    ap.add_argument("--no-install", action="store_true", help="never apt-get a missing haproxy or redis-server")
    ap.add_argument("--front-config", metavar="HOST:PORT", nargs="+",
                    help="several machines: print a config for a front haproxy over these "
                         "machines (each running --workers N --host 0.0.0.0 with one shared "
                         "router_redis_url) listening on --host:--port, and exit")
    args = ap.parse_args(argv)
    if args.web:
        ap.error("--web shows one process's flows; run mitmweb without --workers")
    if not 1 <= args.workers <= 64:
        ap.error("--workers must be between 1 and 64")
    if args.hang_timeout < 2:
        ap.error("--hang-timeout must be at least 2 seconds")
    return args, extra


def drain_seconds(extra: list[str], default: int) -> int:
    """What the workers will wait: a router_drain_timeout given to them wins over --drain."""
    try:
        return max(0, int(configured(extra, "router_drain_timeout") or default))
    except ValueError:
        return max(0, default)  # mitmproxy refuses the value itself


def make_plan(args: argparse.Namespace, extra: list[str]) -> Plan:
    # Every port picked here is picked at once, so no two are the same.
    picks = iter(free_ports((0 if args.port else 1) + (args.workers if args.worker_base == 0 else 0)
                            + (1 if args.stats_port == 0 else 0) + (1 if args.demo else 0)))
    port = args.port or next(picks)
    base = port + 1 if args.worker_base is None else args.worker_base
    ports = ([next(picks) for _ in range(args.workers)] if base == 0
             else list(range(base, base + args.workers)))
    if len(set(ports + [port])) != len(ports) + 1:
        sys.exit(f"workers: the listen port {port} is among the worker ports {ports}")
    if not port_free(args.host, port):
        sys.exit(f"workers: {args.host}:{port} is in use: choose another --port")
    for i, p in enumerate(ports):
        if not port_free("127.0.0.1", p):
            sys.exit(f"workers: worker w{i + 1}'s port 127.0.0.1:{p} is in use: choose --worker-base "
                     "(0 picks free ports)")
    stats = None if args.stats_port < 0 else (args.stats_port or next(picks))
    redis_url = (configured(extra, "router_redis_url") or "").strip() or None
    run_dir = Path(tempfile.mkdtemp(prefix="claude-router-"))
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    return Plan(workers=args.workers, host=args.host, port=port, worker_ports=ports,
                mode="regular" if args.regular else REVERSE, extra=extra, run_dir=run_dir,
                log_dir=args.log_dir.resolve() if args.log_dir else None, stats_port=stats,
                idle=args.idle_timeout, redis_url=redis_url, demo=args.demo,
                mock_port=next(picks) if args.demo else None,
                prefix=configured(extra, "router_key_prefix") or "endpoint_health_",
                drain=drain_seconds(extra, args.drain), hang_timeout=args.hang_timeout,
                redis_maxmemory=args.redis_maxmemory)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.front_config:
        print(front_config(args.front_config, args.host, args.port, args.idle_timeout), end="")
        return 0
    if not Path(MITMDUMP).exists():
        sys.exit(f"workers: no mitmdump beside {sys.executable}; run this through ./scripts/run --workers N")
    plan = make_plan(args, extra)
    try:
        for tool, package, needed in (("haproxy", "haproxy", True),
                                      ("redis-server", "redis-server", plan.redis_url is None)):
            if needed and not shutil.which(tool):
                if args.no_install:
                    sys.exit(f"workers: {tool} is not installed (apt-get install {package})")
                ensure_installed(tool, package)
        raise_fd_limit()
        return asyncio.run(Supervisor(plan, args.info_file).run())
    finally:
        shutil.rmtree(plan.run_dir, ignore_errors=True)


# ------------------------------------------------------------------- for benchmarks and tests

@dataclass
class Cluster:
    """A running supervisor (see start_cluster)."""
    proc: subprocess.Popen
    info: dict
    info_file: Path
    log_dir: Path | None
    _own_tmp: Path | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def worker_urls(self) -> list[str]:
        return [w["url"] for w in self.info["workers"]]

    @property
    def redis_url(self) -> str:
        return self.info["redis_url"]

    def refresh(self) -> dict:
        """Re-read the info file (pids change when a worker is restarted)."""
        with contextlib.suppress(OSError, ValueError):
            self.info = json.loads(self.info_file.read_text())
        return self.info

    def stop(self, timeout: float = 45.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def cluster_argv(workers: int, endpoints: list[str], info_file: Path, *, port: int = 0,
                 log_dir: Path | None = None, extra: list[str] | tuple[str, ...] = (),
                 python: str = sys.executable, options: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The supervisor's command line: N workers (free ports) in reverse mode in front of
    ``endpoints`` (NAME=URL), every mitmdump also getting ``extra``."""
    argv = [python, "-m", "claude_router.cli.workers", "--workers", str(workers),
            "--port", str(port or free_port()), "--worker-base", "0", "--no-install",
            "--info-file", str(info_file)]
    if log_dir is not None:
        argv += ["--log-dir", str(log_dir)]
    argv += list(options)  # the supervisor's own (--hang-timeout 5, ...)
    argv.append("--")
    for ep in endpoints:
        argv += ["--set", f"router_endpoints={ep}"]
    return argv + list(extra)


def wait_ready(proc: subprocess.Popen, info_file: Path, timeout: float = 90.0) -> dict:
    """The info document once the supervisor is serving; RuntimeError if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the workers' supervisor exited with code {proc.returncode}")
        with contextlib.suppress(OSError, ValueError):
            return json.loads(info_file.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"the workers were not ready within {timeout:g} s")


def start_cluster(workers: int, endpoints: list[str], *, port: int = 0,
                  extra: list[str] | tuple[str, ...] = (), tmp: Path | None = None,
                  log_dir: Path | None = None, timeout: float = 90.0,
                  options: list[str] | tuple[str, ...] = (), **popen) -> Cluster:
    """Start N router workers + haproxy + their own redis-server in front of ``endpoints``
    (e.g. ``["ok=http://127.0.0.1:PORT/ok"]``) and return once the listen address serves.

        with start_cluster(2, [f"ok={mock}/ok"], extra=["--set", "flow_detail=0"]) as c:
            load(c.url + "/v1/messages")

    Every process's output goes to a file in ``log_dir`` (default: ``tmp``; without ``tmp``,
    a temp dir of its own that ``stop()`` removes). The supervisor gets SIGTERM if its caller
    dies, and then stops everything it started."""
    own = None
    if tmp is None:
        tmp = own = Path(tempfile.mkdtemp(prefix="claude-router-cluster-"))
    log_dir = log_dir or tmp
    info_file = tmp / "workers.json"
    argv = cluster_argv(workers, endpoints, info_file, port=port, log_dir=log_dir, extra=extra,
                        options=options)
    popen = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
             "cwd": ROOT, "preexec_fn": _child_setup, **popen}  # dies with its caller
    proc = subprocess.Popen(argv, **popen)
    try:
        info = wait_ready(proc, info_file, timeout)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
        raise
    return Cluster(proc, info, info_file, log_dir, own)


if __name__ == "__main__":
    sys.exit(main())
