"""The boundary with mitmproxy's and aiohttp's internals (``claude_router.compat``): every
reach's check recognises the installed versions, every reach falls back without raising when
its check fails, and the start-up line says which are in use."""

import asyncio
import logging
import types

import aiohttp
import pytest
from mitmproxy import optmanager
from mitmproxy.test import taddons

from claude_router import compat, handoff, pipes
from claude_router.upstream import IdleWatch, UpstreamResponse


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(compat, "_verdicts", {})


def refuse(monkeypatch, name: str) -> None:
    """Make reach ``name``'s check fail, as on a mitmproxy or aiohttp it does not recognise."""
    monkeypatch.setattr(compat, f"_check_{name}", lambda: False)


# -- the checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", compat.REACHES)
def test_each_check_recognises_the_installed_versions(name):
    assert compat.available(name), compat.versions()


def test_a_check_that_raises_means_off_never_an_error(monkeypatch):
    def broken():
        raise AttributeError("moved in a new release")

    monkeypatch.setattr(compat, "_check_client_close", broken)
    assert compat.available("client_close") is False
    assert compat.available("no_such_reach") is False


def test_the_hook_index_is_on_only_for_the_verified_dispatch(monkeypatch):
    assert compat._dispatch_fingerprint() in compat.VERIFIED_DISPATCH
    monkeypatch.setattr(compat, "_dispatch_fingerprint", lambda: "changed")
    assert compat.available("hook_index") is False


def test_the_hook_index_is_off_on_another_major(monkeypatch):
    from mitmproxy import version
    monkeypatch.setattr(version, "VERSION", f"{compat.TESTED_MAJOR + 1}.0.0")
    assert compat.available("hook_index") is False


# -- hook_index ----------------------------------------------------------------------------

async def test_hook_index_installs_where_verified():
    with taddons.context() as tctx:
        manager = tctx.master.addons
        index = compat.install_hook_index(manager)
        assert index is not None and "trigger_event" in vars(manager)
        index.uninstall()


async def test_hook_index_fallback_leaves_mitmproxys_dispatch(monkeypatch):
    refuse(monkeypatch, "hook_index")
    with taddons.context() as tctx:
        manager = tctx.master.addons
        assert compat.install_hook_index(manager) is None
        assert "trigger_event" not in vars(manager) and "trigger" not in vars(manager)


# -- in_memory_handoff ---------------------------------------------------------------------

async def test_divert_connections_takes_only_the_listed_ports():
    loop = asyncio.get_running_loop()
    taken = []

    def connect(factory, port):
        taken.append(port)
        raise ConnectionAbortedError("diverted")

    undo = compat.divert_connections(loop, "127.0.0.1", [1], connect)
    assert undo is not None and "create_connection" in vars(loop)
    try:
        with pytest.raises(ConnectionAbortedError):
            await asyncio.open_connection("127.0.0.1", 1)
        with pytest.raises(OSError):  # another port: the loop's own connect (nothing listens)
            await asyncio.open_connection("127.0.0.1", 9)
    finally:
        undo()
    assert taken == [1] and "create_connection" not in vars(loop)


async def test_handoff_falls_back_to_tcp_when_the_wrap_is_not_recognised(monkeypatch):
    refuse(monkeypatch, "in_memory_handoff")
    loop = asyncio.get_running_loop()
    made = []

    class Recording(handoff._Connection):
        def __init__(self, srv):
            super().__init__(srv)
            made.append(self)

    monkeypatch.setattr(handoff, "_Connection", Recording)
    server = handoff.HandoffServer()

    async def body():
        yield b"{}"

    parked = handoff.Parked(status=200, reason="OK", headers=[], body=body(), close=lambda: None,
                            length=2)
    try:
        port, path = await server.park(parked, multiplexed=False)
        assert "create_connection" not in vars(loop)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert not isinstance(made[0].transport, pipes.End)  # loopback TCP
        writer.close()
    finally:
        await server.close()


# -- client_close --------------------------------------------------------------------------

class Handler:
    def __init__(self) -> None:
        self.closed = 0

    async def on_timeout(self) -> None:
        self.closed += 1


def master_with(**addons):
    return types.SimpleNamespace(addons=types.SimpleNamespace(get=addons.get))


async def test_close_client_uses_mitmproxys_connection_handler():
    handler = Handler()
    master = master_with(proxyserver=types.SimpleNamespace(connections={"c1": handler}))
    assert await compat.close_client(master, "c1") is True
    assert await compat.close_client(master, "gone") is False
    assert await compat.close_client(master_with(), "c1") is False
    assert handler.closed == 1


async def test_close_client_fallback_leaves_the_connection(monkeypatch):
    refuse(monkeypatch, "client_close")
    handler = Handler()
    master = master_with(proxyserver=types.SimpleNamespace(connections={"c1": handler}))
    assert await compat.close_client(master, "c1") is False
    assert handler.closed == 0


# -- quiet_dumper --------------------------------------------------------------------------

class Dumper:
    def match(self, f) -> bool:
        return True


def test_quiet_dumper_hides_the_flows_picked():
    dumper = Dumper()
    assert compat.quiet_dumper(master_with(dumper=dumper), lambda f: f == "health") is True
    assert dumper.match("health") is False and dumper.match("client") is True
    assert compat.quiet_dumper(master_with(), lambda f: True) is False  # mitmweb: no dumper
    assert compat.quiet_dumper(None, lambda f: True) is False


def test_quiet_dumper_fallback_leaves_the_output_alone(monkeypatch):
    refuse(monkeypatch, "quiet_dumper")
    dumper = Dumper()
    assert compat.quiet_dumper(master_with(dumper=dumper), lambda f: True) is False
    assert "match" not in vars(dumper) and dumper.match("health") is True


# -- legacy_log ----------------------------------------------------------------------------

def test_legacy_log_handler_is_recognised(monkeypatch):
    from mitmproxy.log import LegacyLogEvents
    assert compat.is_legacy_log_handler(LegacyLogEvents(master=None))
    assert not compat.is_legacy_log_handler(logging.StreamHandler())
    refuse(monkeypatch, "legacy_log")

    class LegacyLogEvents(logging.Handler):  # noqa: F811 - the fallback goes by the name
        pass

    assert compat.is_legacy_log_handler(LegacyLogEvents())
    assert not compat.is_legacy_log_handler(logging.StreamHandler())


# -- deferred_options ----------------------------------------------------------------------

def deferred(value: str):
    opts = optmanager.OptManager()
    opts.add_option("router_x", int, 0, "an int")
    opts.deferred["router_x"] = optmanager._UnconvertedStrings([value])
    return opts


def test_deferred_problem_names_a_value_that_does_not_parse():
    assert compat.deferred_problem(deferred("1.5"), "router_x")
    assert compat.deferred_problem(deferred("7"), "router_x") is None


def test_deferred_problem_fallback_leaves_the_judgement_to_mitmproxy(monkeypatch):
    refuse(monkeypatch, "deferred_options")
    assert compat.deferred_problem(deferred("1.5"), "router_x") is None


# -- aiohttp_no_retry ----------------------------------------------------------------------

async def test_no_connection_retry_and_its_fallback(monkeypatch):
    async with aiohttp.ClientSession() as session:
        assert compat.no_connection_retry(session) is True
        assert session._retry_connection is False
    refuse(monkeypatch, "aiohttp_no_retry")
    async with aiohttp.ClientSession() as session:
        assert compat.no_connection_retry(session) is False
        assert session._retry_connection is True


# -- aiohttp_read_timeout ------------------------------------------------------------------

class Protocol:
    def __init__(self) -> None:
        self.read_timeout = 5.0
        self.armed = 0

    def start_timeout(self) -> None:
        self.armed += 1


def fake_response() -> types.SimpleNamespace:
    return types.SimpleNamespace(connection=types.SimpleNamespace(protocol=Protocol()),
                                 status=200, reason="OK", raw_headers=())


def test_disarm_read_timeout_hands_the_body_to_the_idle_watch():
    resp = fake_response()
    up = UpstreamResponse(resp, 5.0, IdleWatch())
    assert up._watch is not None
    assert resp.connection.protocol.read_timeout is None and resp.connection.protocol.armed == 1


def test_read_timeout_fallback_keeps_aiohttps_own(monkeypatch):
    refuse(monkeypatch, "aiohttp_read_timeout")
    resp = fake_response()
    up = UpstreamResponse(resp, 5.0, IdleWatch())
    assert up._watch is None  # aiohttp's sock_read bounds every read instead
    assert resp.connection.protocol.read_timeout == 5.0 and resp.connection.protocol.armed == 0


# -- the start-up line ---------------------------------------------------------------------

def test_the_start_up_line_lists_every_reach_in_use():
    line = compat.summary()
    assert compat.versions() in line
    in_use = line.split("internals in use: ")[1]
    for name in compat.REACHES:
        assert name in in_use
    assert "not in use" not in line


def test_the_start_up_line_says_what_is_off_and_why(monkeypatch):
    refuse(monkeypatch, "quiet_dumper")
    line = compat.summary(hook_index=False)
    in_use, off = line.split("internals in use: ")[1].split("; not in use: ")
    assert "quiet_dumper" not in in_use and "hook_index" not in in_use
    assert "quiet_dumper (not recognised)" in off and "hook_index (router_hook_index=false)" in off


def test_announce_logs_the_line_once(monkeypatch, caplog):
    monkeypatch.setattr(compat, "_announced", False)
    with caplog.at_level(logging.INFO, logger="claude_router"):
        compat.announce()
        compat.announce()
    lines = [r.getMessage() for r in caplog.records if "internals in use" in r.getMessage()]
    assert lines == [compat.summary()]
