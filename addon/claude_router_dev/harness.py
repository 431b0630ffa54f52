"""The real parts the end-to-end tests, the benches, costsim and the soak start, in one place:
free loopback ports, mitmdump with the router, the mock relay (``claude_router_dev.mock_relay``)
in a subprocess with its control client, a real redis-server, and SSE bodies parsed into events.

``tests/conftest.py`` builds its fixtures on these; the benches add their own process groups and
logs (``bench.Procs``) around the same command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: addon/claude_router_dev/harness.py
BIN = Path(sys.executable).parent  # mitmdump lives beside the venv's python, not on PATH
MITMDUMP = str(BIN / "mitmdump")
MITMWEB = str(BIN / "mitmweb")
ROUTER_SCRIPT = str(ROOT / "addon" / "router.py")  # mitmdump -s: the router's shim
MOCK_MODULE = "claude_router_dev.mock_relay"
REVERSE = "reverse:https://api.anthropic.com"


# -- ports and processes ---------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; RuntimeError if ``proc`` exits
    first, TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def wait_for[T](check: Callable[[], T], timeout: float = 20.0, what: str = "", every: float = 0.05) -> T:
    """Call ``check`` every ``every`` seconds until it returns something true, and return that.
    After ``timeout`` seconds, AssertionError naming what was awaited (``what``, else the
    callable) and the last value ``check`` returned. The end-to-end tests wait on a state this
    way (a status field, a count at the mock), never with a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = repr(value)
            seen = seen if len(seen) <= 500 else seen[:500] + "..."
            raise AssertionError(f"not within {timeout:g} s: {what or check!r} (last seen: {seen})")
        time.sleep(every)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any *_proxy variable (everything here talks to loopback)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | dict(extra or {})


# -- mitmdump with the router ----------------------------------------------------------------------


def router_argv(port: int, endpoints: Iterable[str] = (), *, mode: str = "reverse",
                confdir: Path | str | None = None, options: Mapping[str, object] | None = None,
                scripts: Iterable[str | Path] = (), tool: str = MITMDUMP,
                router_script: str = ROUTER_SCRIPT, listen_host: str = "127.0.0.1",
                verbosity: str | None = "info") -> list[str]:
    """mitmdump (or mitmweb) with the router (and any further ``scripts`` after it) on
    ``listen_host``:``port``; ``mode`` "reverse" is the router's usual reverse proxy to the API,
    anything else leaves mitmproxy's own mode (regular, or what ``options`` set). ``options``
    become --set NAME=VALUE (a list value: one --set per item)."""
    args = [tool, *(["--no-web-open-browser"] if tool == MITMWEB else []),
            "-s", router_script, *(a for s in scripts for a in ("-s", str(s))),
            "--listen-host", listen_host, "--listen-port", str(port)]
    if confdir is not None:
        args += ["--set", f"confdir={confdir}"]
    if verbosity:
        args += ["--set", f"termlog_verbosity={verbosity}"]
    if mode == "reverse":
        args += ["--mode", REVERSE]
    for ep in endpoints:
        args += ["--set", f"router_endpoints={ep}"]
    for k, v in (options or {}).items():
        for item in (v if isinstance(v, list) else [v]):
            args += ["--set", f"{k}={item}"]
    return args


# -- the mock relay --------------------------------------------------------------------------------


def mock_argv(*args: str, python: str = sys.executable) -> list[str]:
    """The mock relay's command line (``--port 0`` picks a port; it prints one line once it
    listens: ``mock-relay listening on http://127.0.0.1:PORT``)."""
    return [python, "-m", MOCK_MODULE, *args]


def mock_url(line: str) -> str | None:
    """The base URL from the mock relay's first line, or None if it is not that line."""
    return line.strip().rsplit(" ", 1)[-1] if "listening on" in line else None


class MockRelay:
    """Control client for the mock relay running in a subprocess (``start_mock``)."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def url(self, endpoint: str) -> str:
        return f"{self.base}/{endpoint}"

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    _call = call

    def fault(self, endpoint: str, **fault) -> None:
        self.call("PUT", f"/_mock/faults/{endpoint}", fault)

    def profile(self, endpoint: str, **fields) -> None:
        """Replace the endpoint's profile (no fields: back to a plain relay)."""
        self.call("PUT", f"/_mock/profiles/{endpoint}", fields)

    def profiles(self) -> dict:
        return self.call("GET", "/_mock/profiles")

    def cache(self, endpoint: str) -> list[dict]:
        """Live prompt-cache entries of an endpoint: key, tokens, ttl, expires_in."""
        return self.call("GET", f"/_mock/cache/{endpoint}")

    def clear_cache(self, endpoint: str | None = None) -> None:
        self.call("DELETE", "/_mock/cache" + (f"/{endpoint}" if endpoint else ""))

    def requests(self, endpoint: str | None = None) -> list[dict]:
        q = f"?endpoint={endpoint}" if endpoint else ""
        return self.call("GET", f"/_mock/requests{q}")

    def count(self, endpoint: str) -> int:
        return len(self.requests(endpoint))

    def stats(self) -> dict:
        return self.call("GET", "/_mock/stats")

    def balance(self, endpoint: str, **panel) -> None:
        """Give the endpoint a balance panel (quota in new-api units; see mock_relay); the count
        of its polls is kept across changes."""
        self.call("PUT", f"/_mock/balances/{endpoint}", panel)

    def balance_polls(self, endpoint: str) -> int:
        return (self.call("GET", f"/_mock/balances/{endpoint}") or {}).get("polls", 0)

    def inflight(self) -> dict:
        """{"now": {endpoint: requests in flight}, "peak": {endpoint: most at once}}."""
        return self.call("GET", "/_mock/inflight")

    def reset(self) -> None:
        self.call("DELETE", "/_mock/state")

    def stop(self) -> None:
        stop(self.proc, grace=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def start_mock(*args: str) -> MockRelay:
    """The mock relay on a free port (``args``: more of its options, e.g. ``--fault``)."""
    proc = subprocess.Popen(mock_argv("--port", "0", "--quiet", *args), stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if mock_url(line) is None:
        stop(proc)
        raise RuntimeError(f"mock relay did not start: {line!r}")
    return MockRelay(proc, int(line.rsplit(":", 1)[1]))


# -- redis-server ----------------------------------------------------------------------------------


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    """A real redis-server on a free loopback port, started (and restartable) by the caller."""

    def __init__(self, tmp: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.dir = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cli(self, *args: str) -> str:
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        cmd = ["redis-cli", "-p", str(self.port)] + auth
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10).stdout.strip()


# -- SSE -------------------------------------------------------------------------------------------


def sse_events(raw: str | bytes, *, lenient: bool = False) -> list[tuple[str, object]]:
    """(event name, data) of every named SSE event in a complete body; data is the JSON of its
    ``data:`` lines ({} when there are none). ``lenient``: data that is not JSON gives None
    instead of raising ValueError (the soak classifies such answers)."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    out: list[tuple[str, object]] = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
        if name:
            try:
                out.append((name, json.loads(data) if data else {}))
            except ValueError:
                if not lenient:
                    raise
                out.append((name, None))
    return out


# -- a process's memory ---------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    """A process's resident memory (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRss:
    """Samples a process's VmRSS every 20 ms in a thread while in use; ``peak`` is the highest
    seen (a last sample is taken at the end)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, AssertionError):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, rss_mib(self.pid))
        except (OSError, AssertionError):
            pass
