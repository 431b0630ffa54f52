"""Real parts for end-to-end tests: the mock relay and mitmdump run as subprocesses on loopback.
The parts themselves (ports, processes, the mock's control client, redis-server, SSE parsing) are
in ``claude_router_dev.harness``; the fixtures are here."""

import os
import subprocess
import time
from pathlib import Path

import pytest

from claude_router_dev.harness import (  # noqa: F401 - re-exported: tests import them from conftest
    BIN,
    MITMDUMP,
    MITMWEB,
    ROOT,
    ROUTER_SCRIPT,
    MockRelay,
    RedisServer,
    free_port,
    have_redis,
    router_argv,
    sse_events,
    start_mock,
    stop,
    wait_port,
)

pytest_plugins = ["scripted"]  # the `scripted` fixture (tests/scripted.py), for test_e2e_bad_relays


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
    args = router_argv(port, endpoints, mode=mode, confdir=confdir, options=options, scripts=scripts,
                       tool=tool, listen_host=(options or {}).get("listen_host", "127.0.0.1"))
    log = workdir / f"router{name}.log"
    environ = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | (env or {})
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ,
                            preexec_fn=preexec)
    router = RouterProc(proc, port, confdir, log)
    if wait:
        try:
            wait_port(port, proc)
        except Exception as e:
            stop(proc)
            raise RuntimeError(f"router did not start:\n{router.log()}") from e
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


def _need_redis() -> None:
    if not have_redis():
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
