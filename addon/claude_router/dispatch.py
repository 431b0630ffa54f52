"""Hook dispatch: an index of which addons implement which hook, so that an event costs what
its handlers cost and not a walk over every addon.

mitmproxy delivers each event (``request``, ``response``, and an ``update`` after every flow
event) by walking its whole addon chain, about forty addons, and for each one entering an
error-catching context, starting a coroutine and a generator over its sub-addons, and looking
the hook up by name. Only a handful of them implement any given hook. Measured under load
(``./scripts/bench --profile``), that walk was about a third of the router process's CPU, for
the router and plain mitmdump alike.

``HookIndex`` replaces ``trigger_event`` on one manager instance (never the class) with one
that looks the hook up once per event name and keeps, per chain element, the addons that
implement it. What each handler sees is unchanged: the same order, the same arguments, async
handlers awaited, an exception logged by mitmproxy's own ``safecall`` and the rest of that
chain element skipped, ``AddonHalt`` ending the event. The index is dropped whenever the
addons can have changed: on ``register``, ``remove``, ``clear``, and around every
``configure``, ``load``, ``running`` and ``done`` event, which go through mitmproxy's own walk
(the script loader adds, removes and reorders scripts while configuring). The synchronous
``trigger`` is indexed the same way: mitmproxy delivers an ``add_log`` event through it for every
log record. An addon whose hook attribute is neither callable nor a module sends that
event through mitmproxy's own walk, which reports it.
"""

import inspect
import logging
import types
from collections.abc import Callable

from mitmproxy import addonmanager, exceptions, hooks

log = logging.getLogger("claude_router")

_MARK = "_claude_router_hook_index"
_UNINDEXABLE = object()
# Events during which addons are added, removed or reordered (the script loader does it while
# configuring): delivered by mitmproxy's own walk, the index dropped before and after.
_CHANGING = frozenset({"configure", "load", "running", "done"})


class HookIndex:
    """The index for one ``AddonManager``; ``install`` puts it in front of mitmproxy's walk."""

    def __init__(self, manager: addonmanager.AddonManager) -> None:
        self.manager = manager
        self._index: dict[str, object] = {}
        self._walk = manager.trigger_event  # mitmproxy's own, bound
        self._walk_sync = manager.trigger
        self._wrapped: dict[str, Callable] = {}

    # -- installation ----------------------------------------------------------------------

    @classmethod
    def install(cls, manager: addonmanager.AddonManager) -> "HookIndex | None":
        """Index ``manager``'s hooks, unless it is indexed already or its dispatch is not
        mitmproxy's own (then it is left alone)."""
        if getattr(manager, _MARK, None) is not None:
            return None
        if getattr(type(manager), "trigger_event", None) is not addonmanager.AddonManager.trigger_event \
                or "trigger_event" in vars(manager) or "trigger" in vars(manager):
            log.debug("router: the addon manager's dispatch is not mitmproxy's own; left as is")
            return None
        index = cls(manager)
        for name in ("register", "remove", "clear"):
            original = getattr(manager, name)
            index._wrapped[name] = original
            setattr(manager, name, index._invalidating(original))
        index._wrapped["trigger"] = manager.trigger
        manager.trigger = index.trigger
        manager.trigger_event = index.trigger_event
        setattr(manager, _MARK, index)
        return index

    def uninstall(self) -> None:
        manager = self.manager
        if getattr(manager, _MARK, None) is not self:
            return
        for name in self._wrapped:
            vars(manager).pop(name, None)
        vars(manager).pop("trigger_event", None)
        delattr(manager, _MARK)

    def _invalidating(self, method: Callable) -> Callable:
        def call(*args, **kwargs):
            self._index.clear()
            try:
                return method(*args, **kwargs)
            finally:
                self._index.clear()
        return call

    # -- the index ---------------------------------------------------------------------------

    def handlers(self, name: str) -> object:
        """Per chain element with at least one handler: (addon, name) pairs, in walk order."""
        found = self._index.get(name)
        if found is None:
            found = self._index[name] = self._build(name)
        return found

    def _build(self, name: str) -> object:
        chain = []
        for element in self.manager.chain:
            owners = []
            for a in addonmanager.traverse([element]):
                func = getattr(a, name, None)
                if not func or isinstance(func, types.ModuleType):
                    continue
                if not callable(func):
                    return _UNINDEXABLE
                owners.append(a)
            if owners:
                chain.append(tuple(owners))
        return tuple(chain)

    # -- dispatch ----------------------------------------------------------------------------

    async def trigger_event(self, event: hooks.Hook) -> None:
        name = event.name
        if name in _CHANGING:
            self._index.clear()
            try:
                await self._walk(event)
            finally:
                self._index.clear()
            return
        chain = self.handlers(name)
        if chain is _UNINDEXABLE:
            await self._walk(event)
            return
        if not chain:
            return
        args = event.args()
        for owners in chain:
            try:
                with addonmanager.safecall():
                    for a in owners:
                        func = getattr(a, name, None)
                        if not func or not callable(func):
                            continue
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return

    def trigger(self, event: hooks.Hook) -> None:
        """The synchronous delivery (``configure``, and ``add_log`` for every log record)."""
        name = event.name
        if name in _CHANGING:  # addons may come and go while it is delivered
            self._index.clear()
            try:
                self._walk_sync(event)
            finally:
                self._index.clear()
            return
        chain = self.handlers(name)
        if chain is _UNINDEXABLE:
            self._walk_sync(event)
            return
        if not chain:
            return
        args = event.args()
        for owners in chain:
            try:
                with addonmanager.safecall():
                    for a in owners:
                        func = getattr(a, name, None)
                        if not func or not callable(func):
                            continue
                        if inspect.iscoroutinefunction(func):
                            raise exceptions.AddonManagerError(
                                f"Async handler {name} ({a}) cannot be called from sync context")
                        func(*args)
            except exceptions.AddonHalt:
                return
