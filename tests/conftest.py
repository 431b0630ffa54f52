"""Real parts for end-to-end tests: the mock relay and mitmdump run as subprocesses on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MITMDUMP = str(BIN / "mitmdump")
MITMWEB = str(BIN / "mitmweb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class MockRelay:
    """Control client for scripts/mock_relay.py running in a subprocess."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def url(self, endpoint: str) -> str:
        return f"{self.base}/{endpoint}"

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def fault(self, endpoint: str, **fault) -> None:
        self._call("PUT", f"/_mock/faults/{endpoint}", fault)

    def profile(self, endpoint: str, **fields) -> None:
        """Replace the endpoint's profile (no fields: back to a plain relay)."""
        self._call("PUT", f"/_mock/profiles/{endpoint}", fields)

    def profiles(self) -> dict:
        return self._call("GET", "/_mock/profiles")

    def cache(self, endpoint: str) -> list[dict]:
        """Live prompt-cache entries of an endpoint: key, tokens, ttl, expires_in."""
        return self._call("GET", f"/_mock/cache/{endpoint}")

    def clear_cache(self, endpoint: str | None = None) -> None:
        self._call("DELETE", "/_mock/cache" + (f"/{endpoint}" if endpoint else ""))

    def requests(self, endpoint: str | None = None) -> list[dict]:
        q = f"?endpoint={endpoint}" if endpoint else ""
        return self._call("GET", f"/_mock/requests{q}")

    def count(self, endpoint: str) -> int:
        return len(self.requests(endpoint))

    def stats(self) -> dict:
        return self._call("GET", "/_mock/stats")

    def reset(self) -> None:
        self._call("DELETE", "/_mock/state")


def start_mock(*args: str) -> MockRelay:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "mock_relay.py"), "--port", "0", "--quiet", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        stop(proc)
        raise RuntimeError(f"mock relay did not start: {line!r}")
    return MockRelay(proc, int(line.rsplit(":", 1)[1]))


@pytest.fixture(scope="session")
def mock_session():
    relay = start_mock()
    yield relay
    stop(relay.proc)


@pytest.fixture
def mock(mock_session):
    mock_session.reset()
    yield mock_session
    mock_session.reset()


def closed_port_url(name: str = "dead") -> str:
    """An http URL on a loopback port where nothing listens: connection refused."""
    return f"http://127.0.0.1:{free_port()}/{name}"


class RouterProc:
    def __init__(self, proc: subprocess.Popen, port: int, confdir: Path, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.confdir = confdir
        self.log_path = log

    @property
    def ca(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in router log:\n{log}")
            time.sleep(0.05)
        return log


def launch_router(workdir: Path, name: str, endpoints, mode: str = "reverse",
                  options: dict | None = None, tool: str = "mitmdump", config: Path | None = None,
                  env: dict | None = None, wait: bool = True, scripts: tuple = (),
                  preexec=None) -> RouterProc:
    """Start mitmdump (or mitmweb) with the addon (and any further ``scripts`` after it) on a
    free port; the caller stops it."""
    tool = MITMWEB if tool == "mitmweb" else MITMDUMP
    port = free_port()
    confdir = workdir / f"conf{name}"
    confdir.mkdir()
    if config is not None:
        (confdir / "config.yaml").write_text(config.read_text())
    args = [tool, *([] if tool == MITMDUMP else ["--no-web-open-browser"]),
            "-s", str(ROOT / "addon" / "router.py"), *(a for s in scripts for a in ("-s", str(s))),
            "--listen-host", (options or {}).get("listen_host", "127.0.0.1"), "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", "termlog_verbosity=info"]
    if mode == "reverse":
        args += ["--mode", "reverse:https://api.anthropic.com"]
    for ep in endpoints:
        args += ["--set", f"router_endpoints={ep}"]
    for k, v in (options or {}).items():
        for item in (v if isinstance(v, list) else [v]):
            args += ["--set", f"{k}={item}"]
    log = workdir / f"router{name}.log"
    environ = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | (env or {})
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ,
                            preexec_fn=preexec)
    router = RouterProc(proc, port, confdir, log)
    if wait:
        try:
            wait_port(port, proc)
        except Exception:
            stop(proc)
            raise RuntimeError(f"router did not start:\n{router.log()}")
    return router


@pytest.fixture
def start_router(tmp_path):
    """start_router(endpoints=[...], mode="reverse", options={...}) -> RouterProc."""
    procs: list[RouterProc] = []

    def start(endpoints, mode: str = "reverse", options: dict | None = None, tool: str = "mitmdump",
              config: Path | None = None, env: dict | None = None, wait: bool = True,
              scripts: tuple = (), preexec=None):
        r = launch_router(tmp_path, f"{len(procs)}", endpoints, mode, options, tool, config, env, wait,
                          scripts, preexec)
        procs.append(r)
        return r

    yield start
    for r in procs:
        stop(r.proc)


class RedisServer:
    """A real redis-server on a free loopback port, started (and restartable) by the tests."""

    def __init__(self, tmp: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.dir = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def cli(self, *args: str) -> str:
        cmd = ["redis-cli", "-p", str(self.port)] + (["-a", self.password, "--no-auth-warning"] if self.password else [])
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10).stdout.strip()


def _need_redis() -> None:
    import shutil
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (./scripts/test installs it as root)")


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory):
    _need_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_session):
    """The session's Redis, emptied for this test."""
    redis_session.cli("FLUSHALL")
    return redis_session


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, for tests that kill, restart or lock it."""
    _need_redis()
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path, password)
        servers.append(server)
        return server.start()

    yield make
    for s in servers:
        s.stop()
