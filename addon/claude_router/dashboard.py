"""The live dashboard: ``GET /_router/`` in a browser (docs/dashboard.md).

One page and its files, all served by the router itself (``static/``: the page, its script
and style, and uPlot for the charts, vendored), and one JSON document the page polls,
``/_router/dashboard.json``: the endpoints in price order with their health (from the health
store: with Redis, every instance's), the last hour per minute and the latest requests (from
the ledger file, which every worker behind ``--workers`` writes: the whole router), the named
clients' spend against their budgets, and the pinned conversations (hashed ids).

Who may see it is the status page's rule (``admin.Admin.page``); a browser may present the
key with HTTP Basic (any user name, the key as password) on these paths only, and gets a
Basic challenge for the page. Admins' actions (``POST /_router/action``: disable, enable,
reset an endpoint, as the ``router.*`` commands do) need a custom header and a JSON body,
which a page of another site cannot send without a CORS preflight that the router never
grants, and an ``Origin``, when there is one, of the router's own. With no key configured at
all, a page that re-binds its own name to the router's address would be same-origin: actions
then need the router named by a loopback name (``named_locally``).
"""

import asyncio
import hashlib
import ipaddress
import json
import logging
import threading
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import RegularMode, UpstreamMode

from . import ledger_views, policy, status
from .errors import error_body

if TYPE_CHECKING:
    from .addon import Router

log = logging.getLogger("claude_router")

PREFIX = "/_router/"
PAGE = ""  # /_router/ itself
DOCUMENT = "dashboard.json"
ACTION = "action"
STATIC = "static/"
FILES = {  # what static/ serves, and as what
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
ACTIONS = ("disable", "enable", "reset")
ACTION_HEADER = "x-router-action"
CHALLENGE = ("www-authenticate", 'Basic realm="router"')
POLL_SECONDS = 2.0  # how often the page asks for the document
CACHE_SECONDS = 1.0  # the ledger's figures are read at most this often, whoever asks
READ_TIMEOUT = 2.0  # a ledger read that takes longer is interrupted (the last figures stay)
ACT_TIMEOUT = 5.0
# The page runs only the router's own files, and no other site may frame it.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def owns(name: str) -> bool:
    """Is ``name`` (a path under /_router/, without its query) one of the dashboard's?"""
    return name in (PAGE, DOCUMENT, ACTION) or name.startswith(STATIC)


def uses_basic(path: str) -> bool:
    """May a request for ``path`` present its key with HTTP Basic? The dashboard's paths
    only: a browser sends a remembered password with any request to the router, forms of
    other sites' pages included, and those must never reach the API with it."""
    return path.startswith(PREFIX) and owns(path[len(PREFIX):].split("?", 1)[0])


def challenge(path: str) -> list[tuple[str, str]]:
    """The headers of a 401 for ``path``: a Basic challenge for the page (a browser then asks
    for the key), none for anything else (Claude Code's API: it must not prompt)."""
    return [CHALLENGE] if path.split("?", 1)[0] == PREFIX else []


def same_origin(headers, host: str) -> bool:
    """Could this action come from a page of another site? Refused when the browser says so
    (``Sec-Fetch-Site``, which no page can set), and when an ``Origin`` is sent that is not
    the router's: the browser's word for same-origin, else ``host``, the request's Host or
    ``:authority`` (which reverse mode rewrites: a script that sends an Origin there must send
    the API's)."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    if site == "same-origin":
        return True
    parts = urlsplit(origin)
    if origin == "null" or parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    default = {"http": 80, "https": 443}[parts.scheme]
    want = parts.hostname.lower() + ("" if parts.port in (None, default) else f":{parts.port}")
    host = host.lower()
    for port in (":80", ":443"):
        host = host.removesuffix(port)
    return host == want


def loopback(host: str) -> bool:
    """Is ``host`` (a Host header's ``name[:port]`` or ``[v6]:port``, or an origin's netloc)
    a loopback name: ``localhost``, 127.0.0.0/8 or ::1?"""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.removesuffix(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def named_locally(headers, host: str | None) -> bool:
    """With no key configured: did the client name the router by a loopback name? A page that
    re-binds its own name (``evil.example``) to 127.0.0.1 is same-origin to the browser, so the
    names are all that tell it apart: the ``Origin`` when one is sent (a browser sends one with
    every POST), and ``host``, the Host or ``:authority`` (None: reverse mode replaced it with
    its target, so it says nothing)."""
    origin = headers.get("origin")
    if origin is not None and not loopback(urlsplit(origin).netloc.rpartition("@")[2]):
        return False
    return host is None or loopback(host)


def _client_named_host(flow: http.HTTPFlow) -> str | None:
    """The Host the client sent, or None where mitmproxy replaced it (reverse mode without
    ``keep_host_header``)."""
    try:
        keeps = bool(ctx.options.keep_host_header)
    except AttributeError:  # (no master: unit tests)
        keeps = False
    return (flow.request.host_header or "") if keeps else None


def _reply(flow: http.HTTPFlow, status_code: int, body: bytes, content_type: str,
           extra: dict[str, str] | None = None) -> None:
    headers = {"content-type": content_type, "cache-control": "no-store", **PAGE_HEADERS, **(extra or {})}
    flow.response = http.Response.make(status_code, body, headers)


def _consume(future: asyncio.Future) -> None:
    """A read's outcome nobody awaited (it outran READ_TIMEOUT) is not an unretrieved error."""
    if not future.cancelled():
        future.exception()


def _error(flow: http.HTTPFlow, status_code: int, message: str) -> None:
    _reply(flow, status_code, error_body(status_code, message), "application/json")


class Dashboard:
    """The page, its files, its document and its actions, for one router."""

    def __init__(self, router: "Router") -> None:
        self.router = router
        self._files: dict[str, tuple[bytes, str]] = {}  # name -> (content, etag), read once
        self._window: ledger_views.Window | None = None
        self._window_at = float("-inf")
        self._window_key: tuple = ()
        self._reading = asyncio.Lock()
        self._pending: asyncio.Future | None = None  # the read in its thread (until it ends)
        self._closed = False
        self._db_lock = threading.Lock()  # one ledger query at a time on the connection
        self._db: ledger_views.sqlite3.Connection | None = None
        self._db_path: str | None = None
        self.read_failures = 0

    async def serve(self, flow: http.HTTPFlow, name: str, may_read: bool, may_act: bool) -> None:
        """Answer ``/_router/<name>``: ``may_read``, the status page's rule; ``may_act``, an
        admin (or nobody needs a key)."""
        method = flow.request.method
        if not may_read:
            _error(flow, 403, "the dashboard needs an admin key (admin_keys); "
                              "a client key reads its own /_router/usage")
        elif name == ACTION:
            await self._act(flow, may_act)
        elif method not in ("GET", "HEAD"):
            _error(flow, 405, f"{method} is not allowed here")
        elif name == PAGE:
            await self._file(flow, "dashboard.html")
        elif name == DOCUMENT:
            doc = await self.document(may_act)
            _reply(flow, 200, json.dumps(doc, separators=(",", ":")).encode(), "application/json")
        elif name[len(STATIC):] in FILES:
            await self._file(flow, name[len(STATIC):])
        else:
            _error(flow, 404, "unknown dashboard file")

    # -- files -------------------------------------------------------------------------------

    async def _file(self, flow: http.HTTPFlow, name: str) -> None:
        if name not in self._files:
            data = await asyncio.to_thread((resources.files(__package__) / "static" / name).read_bytes)
            self._files[name] = (data, '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
        data, etag = self._files[name]
        headers = {"etag": etag, "cache-control": "no-cache"}
        if flow.request.headers.get("if-none-match") == etag:
            _reply(flow, 304, b"", FILES[name], headers)
        else:
            _reply(flow, 200, data, FILES[name], headers)

    # -- the document ------------------------------------------------------------------------

    async def document(self, may_act: bool = False) -> dict[str, Any]:
        """What the page shows: health from the store, the hour and the latest requests from
        the ledger (the whole router), the clients and the conversations."""
        r = self.router
        doc = await r.admin.status_document()  # (with Redis: every instance's health)
        now = r.clock()
        names = [e["name"] for e in doc["endpoints"]]
        win = await self.window(now, names)
        ledger = r.ledger
        endpoints = []
        for e in doc["endpoints"]:
            w = win.endpoints.get(e["name"]) if win is not None else None
            entry = {
                "name": e["name"], "index": e["index"], "origin": e["origin"],
                "state": status.state_of(e), "cooling_for": status.cooling_for(e),
                "cooldown_seconds_left": e["cooldown_seconds_left"],
                "consecutive_failures": e["consecutive_failures"], "last_error": e["last_error"],
                # The hour, from the ledger (every worker's); without a ledger, this process's.
                "served": w.served if w else e["served"],
                "failed": w.failed if w else e["failures"],
                "spend_usd": w.spend_usd if w else e["cost_usd"],
                "cache_read_ratio": w.cache_read_ratio if w else e.get("cache_read_ratio"),
                "sessions_pinned": e.get("sessions_pinned", 0), "caches": e.get("caches"),
            }
            for key in ("balance_usd", "balance_checked"):  # where known (the balance checks)
                if key in e:
                    entry[key] = e[key]
            endpoints.append(entry)
        out: dict[str, Any] = {
            "now": now,
            "poll_seconds": POLL_SECONDS,
            "store": doc["store"],
            "can_act": may_act,
            "source": "ledger" if win is not None else ("off" if ledger is None else "unreadable"),
            "endpoints": endpoints,
            "clients": doc.get("clients", []),
            "sessions": doc.get("sessions", {"count": 0, "recent": []}),
        }
        if win is not None:
            out["chart"] = {
                "minutes": win.minutes,
                "requests": {n: win.endpoints[n].requests for n in names},
                "failed": {n: win.endpoints[n].failures for n in names},
                "spend": {n: win.endpoints[n].spend for n in names},
                "totals": {"requests": win.requests, "failovers": win.failovers, "spend_usd": win.spend_usd},
            }
            out["requests"] = win.recent
        return out

    async def window(self, now: float, names: list[str]) -> ledger_views.Window | None:
        """The ledger's last hour, read at most once a ``CACHE_SECONDS`` whoever asks, in a
        thread under ``READ_TIMEOUT``. None without a ledger, or when it cannot be read (and
        nothing read before)."""
        ledger = self.router.ledger
        if ledger is None:
            return None
        key = (ledger.path, tuple(names))
        if key == self._window_key and now - self._window_at < CACHE_SECONDS:
            return self._window
        async with self._reading:
            if key == self._window_key and now - self._window_at < CACHE_SECONDS:
                return self._window  # (read while this one waited)
            if self._pending is not None and not self._pending.done():
                # A read that outran READ_TIMEOUT is still in its thread: no second one (each
                # would wait for it, and fill the default executor the resolver shares).
                return self._window if key == self._window_key else None
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._read, ledger.path, now, names))
            self._pending.add_done_callback(_consume)
            try:
                win = await asyncio.wait_for(asyncio.shield(self._pending), READ_TIMEOUT)
            except (TimeoutError, ledger_views.sqlite3.Error, OSError) as e:
                if isinstance(e, TimeoutError) and self._db is not None:
                    self._db.interrupt()  # (the thread's query stops; its connection is kept)
                self.read_failures += 1
                if self.read_failures == 1 or self.read_failures % 100 == 0:
                    log.warning(f"router: the dashboard cannot read the ledger {ledger.path} "
                                f"({type(e).__name__}: {e}); showing the last figures read")
                return self._window if key == self._window_key else None
            self._window, self._window_at, self._window_key = win, now, key
            return win

    def _read(self, path: str, now: float, names: list[str]) -> ledger_views.Window:
        """(In a thread.) The window, on a read-only connection kept between reads."""
        with self._db_lock:
            if self._closed:
                raise ledger_views.sqlite3.ProgrammingError("the dashboard is closed")
            if self._db is None or self._db_path != path:
                if self._db is not None:
                    self._db.close()
                self._db, self._db_path = ledger_views.connect(path), path
            try:
                return ledger_views.read(self._db, now, names)
            except ledger_views.sqlite3.Error:
                if self._db is not None:
                    self._db.close()
                self._db = None  # opened afresh next time
                raise

    def close(self) -> None:
        """Close the ledger connection (at shutdown; again is a no-op). A read still in its
        thread is interrupted, and waited for at most READ_TIMEOUT: the event loop calls this."""
        self._closed = True
        if (db := self._db) is not None:
            try:
                db.interrupt()
            except ledger_views.sqlite3.Error:
                pass  # (closed by its read meanwhile)
        if not self._db_lock.acquire(timeout=READ_TIMEOUT):
            return  # (a read stuck past its interrupt: the process is exiting)
        try:
            if self._db is not None:
                self._db.close()
                self._db = None
        finally:
            self._db_lock.release()

    # -- actions -----------------------------------------------------------------------------

    async def _act(self, flow: http.HTTPFlow, may_act: bool) -> None:
        req = flow.request
        if req.method != "POST":
            _error(flow, 405, "actions are POSTs")
            return
        if not may_act:
            _error(flow, 403, "actions need an admin key (admin_keys)")
            return
        r = self.router
        if not (r.admin_keys or r.client_keys) \
                and not isinstance(flow.client_conn.proxy_mode, (RegularMode, UpstreamMode)) \
                and not named_locally(req.headers, _client_named_host(flow)):
            # (Through the proxy only routed hosts reach this page: no name can be re-bound.)
            _error(flow, 403, "with no keys set, actions need the router named by a loopback name "
                              "(localhost, 127.0.0.1, [::1]); set admin_keys to act from elsewhere")
            return
        if (ACTION_HEADER not in req.headers or not same_origin(req.headers, req.host_header or "")
                or req.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json"):
            _error(flow, 403, f"actions need the {ACTION_HEADER} header, a JSON body and the router's "
                              "own origin (the dashboard sends them; another site's page cannot)")
            return
        try:
            body = json.loads(req.get_content(strict=False) or b"{}")
            action, name = body["action"], body["endpoint"]
        except (ValueError, TypeError, KeyError):
            _error(flow, 400, 'an action is {"action": "disable"|"enable"|"reset", "endpoint": NAME}')
            return
        if action not in ACTIONS or not any(ep.name == name for ep in self.router.endpoints):
            _error(flow, 400, f"unknown action or endpoint; actions: {', '.join(ACTIONS)}; endpoints: "
                              f"{', '.join(ep.name for ep in self.router.endpoints)}")
            return
        try:
            await asyncio.wait_for(self._do(action, name), ACT_TIMEOUT)
        except TimeoutError:
            _error(flow, 503, f"the health store did not take the {action} in {ACT_TIMEOUT:g} s; try again")
            return
        log.info(f"router: endpoint {name} {action}{'d' if action.endswith('e') else ''} (dashboard)")
        _reply(flow, 200, json.dumps({"ok": True, "action": action, "endpoint": name}).encode(),
               "application/json")

    async def _do(self, action: str, name: str) -> None:
        """What ``router.disable``, ``router.enable`` and ``router.reset NAME`` do (admin.py),
        awaited: the answer means it is done (with Redis, on every instance)."""
        store = self.router.store
        if action == "reset":
            for subject in policy.health_subjects([name]):
                await store.reset(subject)
        else:
            await store.set_disabled(name, action == "disable")
