"""The router's boundary with mitmproxy's and aiohttp's internals: every reach past their
public API is here, behind a check, and nowhere else in the package.

Each reach is a small function. Its check looks at the installed mitmproxy or aiohttp for
exactly what the reach relies on; when the check fails (a release changed it, or raised
while being looked at), the function falls back to doing without, never raises, and the
router keeps working, only less well in that one respect:

==================  ==========================================  ===================================
reach               what it does                                without it
==================  ==========================================  ===================================
hook_index          replaces the addon manager's event walk     mitmproxy's own walk (more CPU)
                    with an index (``dispatch``); on only where
                    mitmproxy's dispatch code is the code it
                    was verified against (``VERIFIED_DISPATCH``)
in_memory_handoff   wraps the event loop's create_connection:   loopback TCP to the handoff
                    mitmproxy's connections to the handoff are
                    in-memory pairs (``pipes``)
client_close        closes a client connection through          deadlines log, but the connection
                    ``proxyserver.connections[id].on_timeout``  stays until tcp_timeout
quiet_dumper        wraps mitmdump's ``dumper.match`` so health  health checks show in the output
                    checks stay out of the flow output
legacy_log          finds mitmproxy's ``LegacyLogEvents`` log   matched by its class name
                    handler (the request log skips it)
deferred_options    parses a ``--set`` value given before the   a bad value is reported by
                    script declared the option                  mitmproxy's script loader instead
aiohttp_no_retry    ``ClientSession._retry_connection = False``  aiohttp may re-send an idempotent
                                                                request (GET/HEAD) once
aiohttp_read_timeout  hands a body's read timeout from aiohttp  aiohttp's sock_read bounds every
                    to the router's idle watch                  read (same bound, a timer per read)
==================  ==========================================  ===================================

``announce()`` logs one line at start-up naming the versions and which reaches are in use;
``status()`` gives the same as a dict (``python -m claude_router.compat`` prints it).
"""

import asyncio
import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("claude_router")

# sha256 of mitmproxy's event dispatch source (see _dispatch_fingerprint) that the hook index
# was verified against: the same in mitmproxy 12.0.0, 12.1.2, 12.2.3 and 12.3.1.
VERIFIED_DISPATCH = {
    "9d52dfc220c5fa73459309b6c6a100775714ec27c041317eb612ac9a5fb1fab9": "12.0.0 - 12.3.1",
}
TESTED_MAJOR = 12  # pyproject bounds mitmproxy to this major


# -- the checks ----------------------------------------------------------------------------
# Each returns True when the reach can be used. They are looked up by name at call time, so a
# test can replace one (monkeypatch) to drive the fallback.

def _check_hook_index() -> bool:
    from mitmproxy import version
    return (int(version.VERSION.split(".")[0]) == TESTED_MAJOR
            and _dispatch_fingerprint() in VERIFIED_DISPATCH)


def _check_in_memory_handoff() -> bool:
    # mitmproxy must open its server connections with asyncio.open_connection, which goes
    # through the loop's create_connection (otherwise the wrap would never be used).
    from mitmproxy.proxy import server
    return "asyncio.open_connection(" in inspect.getsource(server.ConnectionHandler.open_connection)


def _check_client_close() -> bool:
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.proxy.server import ConnectionHandler
    return ("connections" in inspect.get_annotations(Proxyserver)
            and inspect.iscoroutinefunction(ConnectionHandler.on_timeout))


def _check_quiet_dumper() -> bool:
    from mitmproxy.addons.dumper import Dumper
    return callable(getattr(Dumper, "match", None)) and "self.match(" in inspect.getsource(Dumper)


def _check_legacy_log() -> bool:
    from mitmproxy import log as mitmlog
    return isinstance(getattr(mitmlog, "LegacyLogEvents", None), type)


def _check_deferred_options() -> bool:
    from mitmproxy import optmanager
    from mitmproxy.utils import typecheck
    return (isinstance(getattr(optmanager, "_UnconvertedStrings", None), type)
            and callable(getattr(optmanager.OptManager, "_parse_setval", None))
            and callable(getattr(typecheck, "check_option_type", None)))


def _check_aiohttp_no_retry() -> bool:
    import aiohttp
    return "_retry_connection" in getattr(aiohttp.ClientSession, "ATTRS", ())


def _check_aiohttp_read_timeout() -> bool:
    from aiohttp.client_proto import ResponseHandler
    prop = getattr(ResponseHandler, "read_timeout", None)
    return (isinstance(prop, property) and prop.fset is not None
            and callable(getattr(ResponseHandler, "start_timeout", None)))


REACHES = ("hook_index", "in_memory_handoff", "client_close", "quiet_dumper", "legacy_log",
           "deferred_options", "aiohttp_no_retry", "aiohttp_read_timeout")


@functools.cache
def _dispatch_fingerprint() -> str:
    """The source of everything the hook index stands in for or calls: the addon manager,
    safecall (and the traceback cut it relies on), the chain walk and a hook's arguments."""
    from mitmproxy import addonmanager, hooks
    parts = [inspect.getsource(obj) for obj in (
        addonmanager.AddonManager, addonmanager.safecall, addonmanager.cut_traceback,
        addonmanager.traverse, hooks.Hook.args)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


_verdicts: dict[Callable[[], bool], bool] = {}  # per check function: asked once per process


def available(name: str) -> bool:
    """Whether reach ``name`` can be used here; a check that raises says no."""
    check = globals().get(f"_check_{name}")
    if check is None:  # no such reach
        return False
    verdict = _verdicts.get(check)
    if verdict is None:
        try:
            verdict = bool(check())
        except Exception:  # noqa: BLE001 - a check never raises: the reach is off
            verdict = False
        _verdicts[check] = verdict
    return verdict


def status() -> dict[str, bool]:
    return {name: available(name) for name in REACHES}


def versions() -> str:
    try:
        from mitmproxy.version import VERSION
    except Exception:  # noqa: BLE001
        VERSION = "?"
    try:
        import aiohttp
        ahttp = aiohttp.__version__
    except Exception:  # noqa: BLE001
        ahttp = "?"
    return f"mitmproxy {VERSION}, aiohttp {ahttp}"


def summary(hook_index: bool = True) -> str:
    """The start-up line: versions, the reaches in use, the ones not in use (and why)."""
    found = status()
    if not hook_index and found["hook_index"]:
        found["hook_index"] = False
        off_reason = {"hook_index": "router_hook_index=false"}
    else:
        off_reason = {}
    on = [n for n, ok in found.items() if ok]
    off = [f"{n} ({off_reason.get(n, 'not recognised')})" for n, ok in found.items() if not ok]
    line = f"router: {versions()}; internals in use: {', '.join(on) or 'none'}"
    if off:
        line += f"; not in use: {', '.join(off)}"
    return line


_announced = False


def announce(hook_index: bool = True) -> None:
    """Log ``summary()`` once per process (a reloaded script does not repeat it)."""
    global _announced
    if not _announced:
        _announced = True
        log.info(summary(hook_index))


# -- hook_index ----------------------------------------------------------------------------

def install_hook_index(manager: Any) -> Any:
    """Put the hook index (``dispatch.HookIndex``) in front of ``manager``'s event walk, if
    this mitmproxy's dispatch is the verified one; return the index, or None (not installed:
    mitmproxy's own walk delivers every event, as without the router)."""
    if not available("hook_index"):
        log.debug("router: hook index off: this mitmproxy's event dispatch is not the verified one")
        return None
    try:
        from .dispatch import HookIndex
        return HookIndex.install(manager)
    except Exception:  # noqa: BLE001
        log.warning("router: the hook index could not be installed; mitmproxy's own dispatch is used",
                    exc_info=True)
        return None


# -- in_memory_handoff ---------------------------------------------------------------------

def divert_connections(loop: asyncio.AbstractEventLoop, host: str, ports: Any,
                       connect: Callable[[Callable[[], asyncio.BaseProtocol], int], Any]
                       ) -> Callable[[], None] | None:
    """Wrap ``loop.create_connection`` (on the instance, never the class) so that a plain TCP
    connection to ``host`` on one of ``ports`` (a live container) is made by ``connect(
    protocol_factory, port)`` instead; everything else goes to the loop's own method untouched.
    Return the undo, or None when the loop cannot be wrapped here (connections go over TCP)."""
    if not available("in_memory_handoff"):
        return None
    try:
        original = loop.create_connection
    except Exception:  # noqa: BLE001
        return None

    async def create_connection(protocol_factory, host_=None, port=None, *args, **kwargs):
        if (host_ == host and port in ports and not args
                and not kwargs.get("ssl") and not kwargs.get("sock")):
            # Suspend once, as a real connect does: mitmproxy starts its connection tasks
            # eagerly and registers the connection only after that first suspension.
            await asyncio.sleep(0)
            return connect(protocol_factory, port)
        return await original(protocol_factory, host_, port, *args, **kwargs)

    try:
        # (on the instance, on purpose: the wrapper takes the overloads' arguments as they come)
        loop.create_connection = create_connection  # type: ignore[method-assign, assignment]
    except (AttributeError, TypeError):  # a loop whose methods cannot be replaced (uvloop)
        return None

    def undo() -> None:
        if vars(loop).get("create_connection") is create_connection:
            del loop.create_connection  # the class's method again (unless wrapped since)

    return undo


# -- client_close --------------------------------------------------------------------------

async def close_client(master: Any, client_id: str) -> bool:
    """Close a client connection as mitmproxy's own inactivity timeout does; False when it
    is not open any more or this mitmproxy offers no way to (it then stays open)."""
    if not available("client_close"):
        return False
    try:
        proxyserver = master.addons.get("proxyserver") if master is not None else None
        handler = proxyserver.connections.get(client_id) if proxyserver is not None else None
        if handler is None:
            return False
        await handler.on_timeout()
        return True
    except Exception:  # noqa: BLE001 - a connection that is going anyway
        log.debug("router: closing a client connection failed", exc_info=True)
        return False


# -- quiet_dumper --------------------------------------------------------------------------

def quiet_dumper(master: Any, hide: Callable[[Any], bool]) -> bool:
    """Keep the flows ``hide`` picks out of mitmdump's flow output; True once wrapped (False:
    no dumper, as in mitmweb, or one this check does not recognise)."""
    if master is None or not available("quiet_dumper"):
        return False
    try:
        dumper = master.addons.get("dumper")
        match = getattr(dumper, "match", None)
        if dumper is None or not callable(match):
            return False

        def match_unless_hidden(f, _match=match):
            return not hide(f) and _match(f)

        dumper.match = match_unless_hidden
        return True
    except Exception:  # noqa: BLE001
        return False


# -- legacy_log ----------------------------------------------------------------------------

def is_legacy_log_handler(handler: logging.Handler) -> bool:
    """Is this mitmproxy's handler that re-emits every record as an ``add_log`` event?"""
    if available("legacy_log"):
        from mitmproxy import log as mitmlog
        return isinstance(handler, mitmlog.LegacyLogEvents)
    return type(handler).__name__ == "LegacyLogEvents"


# -- deferred_options ----------------------------------------------------------------------

def deferred_problem(options: Any, name: str) -> str | None:
    """Why the value given for option ``name`` before it was declared (``options.deferred``)
    cannot be used, or None: it can, or this mitmproxy does not let the router tell (then
    mitmproxy's script loader judges it)."""
    if not available("deferred_options"):
        return None
    from mitmproxy import exceptions, optmanager
    from mitmproxy.utils import typecheck
    try:
        value = options.deferred[name]
        spec = options._options[name]
        if isinstance(value, optmanager._UnconvertedStrings):
            value = options._parse_setval(spec, value.val)
        typecheck.check_option_type(name, value, spec.typespec)
    except (exceptions.OptionsError, TypeError, ValueError) as e:
        return str(e)
    except Exception:  # noqa: BLE001 - not ours to judge
        return None
    return None


# -- aiohttp_no_retry, aiohttp_read_timeout ------------------------------------------------

def no_connection_retry(session: Any) -> bool:
    """Stop aiohttp from quietly re-sending an idempotent request once when its pooled
    connection fails (the router decides about, and counts, every attempt itself)."""
    if not available("aiohttp_no_retry"):
        return False
    try:
        session._retry_connection = False
        return True
    except Exception:  # noqa: BLE001
        return False


def disarm_read_timeout(resp: Any) -> bool:
    """Take aiohttp's per-read timeout off ``resp``'s body (the router's idle watch bounds
    its reads instead); False when this aiohttp cannot, and its sock_read timeout stays."""
    if not available("aiohttp_read_timeout"):
        return False
    try:
        protocol = resp.connection.protocol if resp.connection else None
        if protocol is not None:
            protocol.read_timeout = None
            protocol.start_timeout()  # re-arms with no timeout: cancels the one armed already
        return True
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    print(summary())
    for reach, ok in status().items():
        print(f"  {reach:22} {'in use' if ok else 'off'}")
