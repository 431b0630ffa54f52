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
        if children:
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
    """...and an element with sub-addons (the script loader) as a tree: the addons of it that
    implement the hook, in mitmproxy's walk order, checked against the tree at every event."""
    log: list = []
    with taddons.context(*chain(log)) as tctx:
        index = HookIndex.install(tctx.master.addons)

        def shown(event):
            return [(element.name, [a.name for a in getattr(owners, "owners", owners)])
                    for _, element, owners in index.handlers(event)]

        assert shown("request") == [("a", ["a"]), ("b", ["b", "b1", "b2"]), ("c", ["c"]),
                                    ("d", ["d", "d1"])]
        assert shown("websocket_message") == [("b", []), ("d", [])]


async def test_sub_addons_changed_in_place_are_seen_at_the_next_event():
    """No register, no configure: a list of sub-addons changed under the index. The tree no
    longer matches, so that element goes through mitmproxy's walk, which sees the change."""
    log: list = []
    parent = Seen("parent", log, children=[Seen("one", log)])
    with taddons.context(parent) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        parent.addons.append(Seen("two", log))
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        parent.addons[0] = Seen("other", log)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["parent", "one", "parent", "one", "two",
                                         "parent", "other", "two"]


async def test_a_script_reloaded_under_the_script_loader_gets_the_next_event():
    """The shape of mitmproxy's Script: its ``addons`` a property made anew at each read."""
    log: list = []

    class Script:
        def __init__(self, ns):
            self.ns = ns

        @property
        def addons(self):
            return [self.ns] if self.ns else []

    script = Script(Seen("v1", log))
    loader = Silent("loader")
    loader.addons = [script]
    with taddons.context(loader) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        script.ns = Seen("v2", log)  # reloaded (mitmproxy also calls register: not needed here)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["v1", "v2", "v2"]


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
    parent.addons = []
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
        assert not {"trigger_event", "trigger", "register", "remove", "clear"} & set(vars(manager))
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


class Gate:
    """An addon whose request handler waits until the test opens the gate."""

    def __init__(self, name, log):
        self.name = name
        self.log = log
        self.gate = asyncio.Event()

    async def request(self, flow):
        await self.gate.wait()
        self.log.append((self.name, flow.id))


async def while_waiting(indexed, change):
    """Deliver one request event; while its first handler waits, ``change`` the addons."""
    log: list = []
    gate = Gate("gate", log)
    parent = Seen("loader", log, children=[Seen("old", log)])
    with taddons.context(gate, parent, Seen("z", log)) as tctx:
        if indexed:
            HookIndex.install(tctx.master.addons)
        event = tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        task = asyncio.ensure_future(event)
        await asyncio.sleep(0)
        change(tctx.master.addons, parent, log)
        gate.gate.set()
        await task
    return [name for name, _ in log]


def reload_script(manager, parent, log):
    """What the script loader does on a reload: the old module out, the new one in."""
    manager.remove(parent.addons[0])
    parent.addons[:] = [Seen("new", log)]
    manager.register(parent.addons[0])


def add_addon(manager, parent, log):
    manager.add(Seen("added", log))


@pytest.mark.parametrize("change", [reload_script, add_addon])
async def test_addons_that_change_while_an_event_waits_are_seen_as_mitmproxy_sees_them(change):
    assert await while_waiting(True, change) == await while_waiting(False, change)


async def test_a_script_reloaded_while_an_event_waits_gets_it_new_not_old():
    names = await while_waiting(True, reload_script)
    assert "new" in names and "old" not in names


async def test_a_hook_lookup_that_raises_costs_only_that_addon_the_event(caplog):
    caplog.set_level(logging.ERROR)
    log: list = []

    class Flaky:
        armed = False

        @property
        def request(self):
            if self.armed:
                raise RuntimeError("not ready")

    flaky = Flaky()
    with taddons.context(flaky, Seen("after", log)) as tctx:
        flaky.armed = True
        HookIndex.install(tctx.master.addons)
        for _ in range(2):
            await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["after", "after"]
    assert "not ready" in caplog.text


async def test_a_hook_that_stops_being_callable_is_reported_as_mitmproxy_does(caplog):
    caplog.set_level(logging.ERROR)
    log: list = []
    odd = Seen("odd", log)
    with taddons.context(odd, Seen("b", log)) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        odd.request = 42
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert [name for name, _ in log] == ["odd", "b", "b"]
    assert "not callable" in caplog.text


async def test_a_failing_handlers_traceback_is_trimmed_as_mitmproxy_trims_it(caplog):
    caplog.set_level(logging.ERROR)
    with taddons.context(Seen("boom", [], fail=True)) as tctx:
        HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    record = next(r for r in caplog.records if "Addon error" in r.getMessage())
    assert "claude_router/dispatch.py" not in logging.Formatter().formatException(record.exc_info)


async def test_invalidate_makes_a_hook_set_at_run_time_seen():
    log: list = []
    late = Silent("late")
    with taddons.context(late) as tctx:
        index = HookIndex.install(tctx.master.addons)
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
        late.request = lambda flow: log.append("late")
        index.invalidate()
        await tctx.master.addons.trigger_event(http_layer.HttpRequestHook(tflow.tflow()))
    assert log == ["late"]


def test_a_manager_whose_class_changed_the_dispatch_is_left_alone():
    class Traced(addonmanager.AddonManager):
        def invoke_addon_sync(self, addon, event):
            return super().invoke_addon_sync(addon, event)

    with taddons.context() as tctx:
        manager = Traced(tctx.master)
        assert HookIndex.install(manager) is None
