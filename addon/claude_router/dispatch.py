"""Hook dispatch: an index of which addons implement which hook, so that an event costs what
its handlers cost and not a walk over every addon.

mitmproxy delivers each event (``request``, ``response``, and an ``update`` after every flow
event) by walking its whole addon chain, about forty addons, and for each one entering an
error-catching context, starting a coroutine and a generator over its sub-addons, and looking
the hook up by name. Only a handful of them implement any given hook. Measured under load
(``./scripts/bench --profile``), that walk was about a third of the router process's CPU, for
the router and plain mitmdump alike.

``HookIndex`` replaces ``trigger_event`` and ``trigger`` on one manager instance (never the
class) with a delivery that looks the hook up once per event name and keeps, per chain element,
the addons that implement it. What each handler sees is unchanged: the same order, the same
arguments, async handlers awaited, an exception logged by mitmproxy's own ``safecall`` (with
the same trimmed traceback) and the rest of that chain element skipped, ``AddonHalt`` ending the
event. Where addons can change, mitmproxy's own walk does the delivery:

- a chain element with sub-addons (the script loader, which holds every ``-s`` script, the
  router included) is indexed as a tree: its addons in mitmproxy's walk order, with the list of
  children of every node that has any. Before each event the tree is checked against those
  lists (a few identity comparisons, where mitmproxy's walk starts a generator per addon); a
  script loaded, reloaded or removed changes them, and that element is then walked live by
  mitmproxy's ``invoke_addon``, as mitmproxy would see it, until the index is rebuilt;
- the index is dropped on ``register``, ``remove`` and ``clear``, and around ``configure``,
  ``load``, ``running`` and ``done``, which go through mitmproxy's walk; if the addons change
  while an event is being delivered, the rest of that event goes through mitmproxy's walk;
- an event whose index cannot be built (a hook attribute that is not callable, a lookup that
  raises) goes through mitmproxy's walk, which reports the problem.

What the index cannot see: a hook method set on or deleted from an addon object after start,
or the chain reordered in place. An addon that does that calls ``invalidate()``.
"""

import enum
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any, Final

from mitmproxy import addonmanager, exceptions, hooks

log = logging.getLogger("claude_router")

_MARK = "_claude_router_hook_index"


class _Unindexable(enum.Enum):
    """The sentinel's type: an enum member, so that ``is _UNINDEXABLE`` narrows."""
    UNINDEXABLE = enum.auto()


_UNINDEXABLE: Final = _Unindexable.UNINDEXABLE
# Events during which addons are added, removed or reordered (the script loader does it while
# configuring): delivered by mitmproxy's own walk, the index dropped before and after.
_CHANGING = frozenset({"configure", "load", "running", "done"})
# mitmproxy's own dispatch, all of which must be unchanged for the index to stand in for it.
_DISPATCH = ("trigger_event", "trigger", "invoke_addon", "invoke_addon_sync", "_iter_hooks",
             "register", "remove", "clear")
_LIVE: Final = None  # an index entry delivered by mitmproxy's own walk of that chain element


class _Tree:
    """A chain element with sub-addons, as indexed: the addons of its tree that implement the
    hook (in mitmproxy's walk order), and each node's children when it was indexed."""
    __slots__ = ("owners", "shape")

    def __init__(self, owners: tuple[Any, ...],
                 shape: tuple[tuple[Any, tuple[Any, ...], tuple[int, ...]], ...]) -> None:
        self.owners = owners
        self.shape = shape

    def current(self) -> bool:
        """Is the tree still what was indexed (every node's children the same objects)?"""
        for node, _kids, ids in self.shape:
            now = getattr(node, "addons", None)
            # By identity (an addon's own __eq__ must not make another object the same one);
            # the ids stay unique while the shape holds the objects (``_kids``).
            if now is None or tuple(map(id, now)) != ids:
                return False
        return True


def _tree(element: Any, name: str) -> "_Tree | _Unindexable":
    """``element``'s tree for hook ``name``, walked as mitmproxy's ``_iter_hooks`` walks it."""
    owners: list[Any] = []
    shape: list[tuple[Any, tuple[Any, ...], tuple[int, ...]]] = []

    def walk(a: Any) -> None:
        func = getattr(a, name, None)
        if func and not isinstance(func, types.ModuleType):
            if not callable(func):
                raise TypeError(name)
            owners.append(a)
        if hasattr(a, "addons"):
            kids = tuple(a.addons)
            shape.append((a, kids, tuple(map(id, kids))))
            for k in kids:
                walk(k)

    try:
        walk(element)
    except (TypeError, RecursionError):
        return _UNINDEXABLE
    return _Tree(tuple(owners), tuple(shape))
# Per chain element with something to deliver: (position, element, the addons that implement
# the hook, or _LIVE).
_Entry = tuple[int, Any, "tuple[Any, ...] | _Tree | None"]
_Entries = tuple[_Entry, ...] | _Unindexable


class HookIndex:
    """The index for one ``AddonManager``; ``install`` puts it in front of mitmproxy's walk."""

    def __init__(self, manager: addonmanager.AddonManager) -> None:
        self.manager = manager
        self._index: dict[str, _Entries] = {}
        self._generation = 0  # counts changes of the addons
        self._walk = manager.trigger_event  # mitmproxy's own, bound
        self._walk_sync = manager.trigger
        self._wrapped: list[str] = []

    # -- installation ----------------------------------------------------------------------

    @classmethod
    def install(cls, manager: addonmanager.AddonManager) -> "HookIndex | None":
        """Index ``manager``'s hooks, unless it is indexed already or its dispatch is not
        mitmproxy's own (a subclass or another tool changed it: then it is left alone)."""
        if getattr(manager, _MARK, None) is not None:
            return None
        own = vars(addonmanager.AddonManager)
        if any(getattr(type(manager), n, None) is not own[n] or n in vars(manager) for n in _DISPATCH):
            log.debug("router: the addon manager's dispatch is not mitmproxy's own; left as is")
            return None
        index = cls(manager)
        for name in ("register", "remove", "clear"):
            setattr(manager, name, index._invalidating(getattr(manager, name)))
        # On this one instance, never the class (see the module docstring); uninstall pops them.
        manager.trigger = index.trigger  # type: ignore[method-assign]
        manager.trigger_event = index.trigger_event  # type: ignore[method-assign]
        index._wrapped = ["register", "remove", "clear", "trigger", "trigger_event"]
        setattr(manager, _MARK, index)
        return index

    def uninstall(self) -> None:
        manager = self.manager
        if getattr(manager, _MARK, None) is not self:
            return
        for name in self._wrapped:
            vars(manager).pop(name, None)
        delattr(manager, _MARK)

    def invalidate(self) -> None:
        """The addons changed: look every hook up again at its next event."""
        self._index.clear()
        self._generation += 1

    def _invalidating(self, method: Callable) -> Callable:
        def call(*args, **kwargs):
            self.invalidate()
            try:
                return method(*args, **kwargs)
            finally:
                self.invalidate()
        return call

    # -- the index ---------------------------------------------------------------------------

    def handlers(self, name: str) -> _Entries:
        """Per chain element with something to deliver, in chain order: (position, element,
        the addons that implement the hook, or _LIVE for mitmproxy's own walk of it)."""
        found = self._index.get(name)
        if found is None:
            try:
                found = self._build(name)
            except Exception:  # noqa: BLE001 - a lookup that raises: mitmproxy's walk reports it
                found = _UNINDEXABLE
            self._index[name] = found
        return found

    def _build(self, name: str) -> _Entries:
        entries: list[_Entry] = []
        for pos, element in enumerate(self.manager.chain):
            if hasattr(element, "addons"):
                tree = _tree(element, name)
                if tree is _UNINDEXABLE:
                    return _UNINDEXABLE
                entries.append((pos, element, tree))  # (no owners: checked, nothing to call)
                continue
            func = getattr(element, name, None)
            if not func or isinstance(func, types.ModuleType):
                continue
            if not callable(func):
                return _UNINDEXABLE
            entries.append((pos, element, (element,)))
        return tuple(entries)

    # -- delivery ----------------------------------------------------------------------------

    async def trigger_event(self, event: hooks.Hook) -> None:
        name = event.name
        if name in _CHANGING:
            self.invalidate()
            try:
                await self._walk(event)
            finally:
                self.invalidate()
            return
        entries = self.handlers(name)
        if entries is _UNINDEXABLE:
            await self._walk(event)
            return
        manager = self.manager
        chain = manager.chain  # the list mitmproxy's walk would go over
        generation = self._generation
        args = event.args()
        rest = 0
        for pos, element, owners in entries:
            if self._generation != generation:
                break
            try:
                with addonmanager.safecall():
                    if owners is _LIVE:
                        await manager.invoke_addon(element, event)
                    elif isinstance(owners, _Tree):
                        if owners.current():
                            await invoke_addon(owners.owners, name, args)
                        else:  # a script came or went: as mitmproxy walks it, then re-index
                            self._index.pop(name, None)
                            await manager.invoke_addon(element, event)
                    else:
                        await invoke_addon(owners, name, args)
            except exceptions.AddonHalt:
                return
            rest = pos + 1
        if self._generation == generation:
            return
        # The addons changed while this event was on its way: the rest as mitmproxy walks it.
        for element in chain[rest:]:
            try:
                with addonmanager.safecall():
                    await manager.invoke_addon(element, event)
            except exceptions.AddonHalt:
                return

    def trigger(self, event: hooks.Hook) -> None:
        """The synchronous delivery (``configure``, and ``add_log`` for every log record)."""
        name = event.name
        if name in _CHANGING:
            self.invalidate()
            try:
                self._walk_sync(event)
            finally:
                self.invalidate()
            return
        entries = self.handlers(name)
        if entries is _UNINDEXABLE:
            self._walk_sync(event)
            return
        manager = self.manager
        chain = manager.chain
        generation = self._generation
        args = event.args()
        rest = 0
        for pos, element, owners in entries:
            if self._generation != generation:
                break
            try:
                with addonmanager.safecall():
                    if owners is _LIVE:
                        manager.invoke_addon_sync(element, event)
                    elif isinstance(owners, _Tree):
                        if owners.current():
                            invoke_addon_sync(owners.owners, name, args)
                        else:
                            self._index.pop(name, None)
                            manager.invoke_addon_sync(element, event)
                    else:
                        invoke_addon_sync(owners, name, args)
            except exceptions.AddonHalt:
                return
            rest = pos + 1
        if self._generation == generation:
            return
        for element in chain[rest:]:
            try:
                with addonmanager.safecall():
                    manager.invoke_addon_sync(element, event)
            except exceptions.AddonHalt:
                return


# Named as mitmproxy's own: its error log cuts tracebacks at frames with these names.

async def invoke_addon(owners: tuple, name: str, args: list) -> None:
    for a in owners:
        func = _hook(a, name)
        if func is not None:
            res = func(*args)
            if res is not None and inspect.isawaitable(res):
                await res


def invoke_addon_sync(owners: tuple, name: str, args: list) -> None:
    for a in owners:
        func = _hook(a, name)
        if func is not None:
            if inspect.iscoroutinefunction(func):
                raise exceptions.AddonManagerError(
                    f"Async handler {name} ({a}) cannot be called from sync context")
            func(*args)


def _hook(addon, name: str):
    """The handler as mitmproxy would find it now (None: nothing to call)."""
    func = getattr(addon, name, None)
    if not func or isinstance(func, types.ModuleType):
        return None
    if not callable(func):
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")
    return func
