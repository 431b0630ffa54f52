"""The hook index delivers every event exactly as mitmproxy's own walk does, only cheaper."""

import asyncio
import logging

import pytest
from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons, tflow

from claude_router.dispatch import HookIndex


class Seen:
    """An addon that notes every request hook it gets, optionally with sub-addons."""

    def __init__(self, name, log, children=(), fail=False, halt=False, asynchronous=False):
        self.name = name
        self.log = log
        self.addons = list(children)
        self.fail = fail
        self.halt = halt
        self.asynchronous = asynchronous

    def request(self, flow):
        if self.asynchronous:
            return self._later(flow)
        self._note(flow)

    async def _later(self, flow):
        await asyncio.sleep(0)
        self._note(flow)

    def _note(self, flow):
        self.log.append((self.name, flow.id))
        if self.fail:
            raise ValueError("boom")
        if self.halt:
            raise exceptions.AddonHalt()


class Silent:
    """An addon with no request hook at all."""

    def __init__(self, name="silent"):
        self.name = name


def chain(log):
    return [
        Seen("a", log),
        Silent("s1"),
        Seen("b", log, children=[Seen("b1", log, fail=True), Seen("b2", log)]),
        Seen("c", log, asynchronous=True),
        Seen("d", log, children=[Silent("s2"), Seen("d1", log)]),
    ]


async def deliver(make_chain, indexed: bool):
    log: list = []
    with taddons.context(*make_chain(log)) as tctx:
        if indexed:
            assert HookIndex.install(tctx.master.addons) is not None
        f = tflow.tflow()
        await tctx.master.addons.handle_lifecycle(http_layer.HttpRequestHook(f))
    return [name for name, _ in log]


async def test_handlers_run_in_the_order_and_with_the_failures_of_mitmproxys_walk():
    assert await deliver(chain, indexed=True) == await deliver(chain, indexed=False)
    assert await deliver(chain, indexed=True) == ["a", "b", "b1", "c", "d", "d1"]


async def test_an_addon_halt_ends_the_event_as_in_mitmproxys_walk():
    def halting(log):
        return [Seen("a", log, halt=True), Seen("b", log)]

    assert await deliver(halting, indexed=True) == await deliver(halting, indexed=False) == ["a"]


async def test_a_failing_handler_is_logged_by_mitmproxy(caplog):
    caplog.set_level(logging.ERROR)
    await deliver(chain, indexed=True)
    assert "Addon error: boom" in caplog.text


async def test_the_index_holds_only_the_addons_that_implement_the_hook():
    log: list = []
    with taddons.context(*chain(log)) as tctx:
        index = HookIndex.install(tctx.master.addons)
        names = [[a.name for a in owners] for owners in index.handlers("request")]
        assert names == [["a"], ["b", "b1", "b2"], ["c"], ["d", "d1"]]
        assert index.handlers("websocket_message") == ()


async def test_an_addon_added_later_gets_the_next_event():
    log: list = []
    with taddons.context(Seen("a", log)) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        tctx.master.addons.add(Seen("late", log))
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["a", "a", "late"]


async def test_a_removed_addon_gets_no_more_events():
    log: list = []
    gone = Seen("gone", log)
    with taddons.context(Seen("a", log), gone) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        tctx.master.addons.remove(gone)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["a", "gone", "a"]


async def test_sub_addons_changed_by_a_configure_event_are_seen():
    """How the script loader adds a script: it changes its own sub-addons while configuring."""
    log: list = []
    parent = Seen("parent", log)
    with taddons.context(parent) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        parent.addons.append(Seen("script", log))
        tctx.master.addons.trigger(hooks.ConfigureHook(set()))
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["parent", "parent", "script"]


async def test_a_hook_attribute_that_is_not_callable_goes_through_mitmproxys_walk(caplog):
    caplog.set_level(logging.ERROR)
    log: list = []
    odd = Silent()
    odd.request = 42
    with taddons.context(Seen("a", log), odd, Seen("b", log)) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["a", "b"]
    assert "not callable" in caplog.text


async def test_a_module_with_a_hook_name_is_skipped_as_mitmproxy_does():
    log: list = []
    mod = Silent()
    mod.request = logging  # `from mitmproxy import log`-style imports in a script
    with taddons.context(mod, Seen("a", log)) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["a"]


def test_installing_twice_indexes_once():
    with taddons.context() as tctx:
        assert HookIndex.install(tctx.master.addons) is not None
        assert HookIndex.install(tctx.master.addons) is None


def test_uninstall_restores_mitmproxys_own_dispatch():
    with taddons.context() as tctx:
        manager = tctx.master.addons
        HookIndex.install(manager).uninstall()
        assert "trigger_event" not in vars(manager) and "register" not in vars(manager)
        assert manager.trigger_event.__func__ is addonmanager.AddonManager.trigger_event


def test_a_dispatch_replaced_by_someone_else_is_left_alone():
    with taddons.context() as tctx:
        manager = tctx.master.addons

        async def theirs(event):
            pass

        manager.trigger_event = theirs
        assert HookIndex.install(manager) is None
        assert manager.trigger_event is theirs


@pytest.mark.parametrize("indexed", [False, True])
async def test_every_flow_event_is_followed_by_an_update(indexed):
    seen = []

    class Updates:
        def update(self, flows):
            seen.extend(f.id for f in flows)

    with taddons.context(Updates()) as tctx:
        if indexed:
            HookIndex.install(tctx.master.addons)
        f = tflow.tflow()
        await tctx.master.addons.handle_lifecycle(http_layer.HttpRequestHook(f))
    assert seen == [f.id]


def test_the_synchronous_trigger_is_indexed_too():
    """mitmproxy sends an add_log event through it for every log record."""
    from mitmproxy.log import AddLogHook, LogEntry

    seen = []

    class Logs:
        def add_log(self, entry):
            seen.append(entry.msg)

    with taddons.context(Logs(), Silent()) as tctx:
        index = HookIndex.install(tctx.master.addons)
        tctx.master.addons.trigger(AddLogHook(LogEntry("one", "info")))
        assert index._index  # answered from the index, which the event left in place
        tctx.master.addons.trigger(AddLogHook(LogEntry("two", "info")))
    assert seen == ["one", "two"]


def test_an_async_handler_of_a_synchronous_event_is_reported_as_mitmproxy_does(caplog):
    from mitmproxy.log import AddLogHook, LogEntry

    caplog.set_level(logging.ERROR)

    class AsyncLogs:
        async def add_log(self, entry):
            pass

    with taddons.context(AsyncLogs()) as tctx:
        HookIndex.install(tctx.master.addons)
        tctx.master.addons.trigger(AddLogHook(LogEntry("one", "info")))
    assert "cannot be called from sync context" in caplog.text
