"""Draining: stop taking connections, let the requests in flight finish, then exit.

``kill -USR1 PID`` (or the ``router.drain`` command) closes the router's listening sockets
(mitmproxy's ``server`` option), keeps serving the connections it has, answers each of their
HTTP/1 requests with ``Connection: close`` so that keep-alive clients move on to another
process, and shuts mitmproxy down once no request is in flight and either no client
connection is left or none has sent a request for QUIET seconds (a client that just got the
end of a stream whose headers went out before the drain may send its next request on the same
connection: it is answered, with ``Connection: close``), or after ``router_drain_timeout``
seconds with whatever is still running. ``./scripts/run --workers N``
(claude_router/cli/workers.py) drains its workers this way for a rolling restart (SIGUSR2 to the
supervisor) and for its graceful stop (Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 to the supervisor):
a stream in flight ends as it would have. SIGUSR1 is the only signal this addon handles; the
"Signals" table in docs/operations.md lists them all. A sub-addon of the router.
"""

import asyncio
import contextlib
import logging
import signal
import time

from mitmproxy import command, ctx, http

from . import compat

log = logging.getLogger("claude_router")


QUIET = 1.0  # seconds without a request after which open client connections are closed


def done_waiting(in_flight: int, connections: int, now: float, last_request: float,
                 deadline: float) -> bool:
    """Shut down at the deadline; before it, once nothing is in flight and no client
    connection is left, or none has sent a request for QUIET seconds."""
    if now >= deadline:
        return True
    if in_flight:
        return False
    return connections == 0 or now - last_request >= QUIET


class Drain:
    name = "router_drain"  # mitmproxy's name for this addon (default: the class name)

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        # The flows whose answer is not complete yet, by client connection id and flow id.
        self.flows: dict[str, dict[str, http.HTTPFlow]] = {}
        self.connections: set[str] = set()  # ids of the open client connections
        self.last_request = 0.0  # when a client last connected, or a request came or ended
        self.draining = False
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        """Flows still being answered. (One that mitmproxy finished without this addon's
        response or error hook, because a hook before it failed, is no longer live.)"""
        for cid, flows in list(self.flows.items()):
            for fid in [fid for fid, f in flows.items() if not f.live]:
                del flows[fid]
            if not flows:
                del self.flows[cid]
        return sum(map(len, self.flows.values()))

    # -- hooks -------------------------------------------------------------------------------

    def load(self, loader) -> None:
        self._on_signal()  # early: SIGUSR1's default action would kill a process starting up

    def running(self) -> None:
        self._on_signal()

    def _on_signal(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            # (only in the main thread, with a running loop, and not on every platform)
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.start)

    def client_connected(self, client) -> None:
        self.connections.add(client.id)
        self.last_request = self.clock()  # its first request may be on its way

    def client_disconnected(self, client) -> None:
        self.connections.discard(client.id)
        self.flows.pop(client.id, None)
        self._changed_now()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.flows.setdefault(flow.client_conn.id, {})[flow.id] = flow
        self.last_request = self.clock()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._close_after(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        # (Not Connection: close here: a streamed response's headers went out without it, and
        # closing after it would race the client's next request on that connection.)
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def _close_after(self, flow: http.HTTPFlow) -> None:
        if (self.draining and flow.response is not None and flow.response.status_code >= 200
                and flow.request.http_version.startswith("HTTP/1")):  # (not a 101 upgrade)
            flow.response.headers["connection"] = "close"

    def _done(self, flow: http.HTTPFlow) -> None:
        flows = self.flows.get(flow.client_conn.id)
        if flows is not None:
            flows.pop(flow.id, None)
            if not flows:
                del self.flows[flow.client_conn.id]
        self.last_request = self.clock()
        self._changed_now()

    def _changed_now(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- draining ----------------------------------------------------------------------------

    @command.command("router.drain")
    def drain(self) -> None:
        """Stop taking connections, finish the requests in flight (router_drain_timeout at
        most), then shut down. Also: kill -USR1 PID."""
        self.start()

    def start(self) -> None:
        if self.draining:
            return
        timeout = ctx.options.router_drain_timeout
        changed = self._changed = asyncio.Event()
        try:
            ctx.options.update(server=False)  # closes the listening sockets, not the connections
            self._task = asyncio.get_running_loop().create_task(self._finish(changed, self.clock() + timeout))
        except Exception:  # noqa: BLE001 - a drain that could not start may be asked again
            log.exception("router: could not start draining")
            return
        self.draining = True
        log.warning(f"router: draining: no new connections; {self.in_flight} requests in flight "
                    f"get up to {timeout} s to finish")

    async def _finish(self, changed: asyncio.Event, deadline: float) -> None:
        while not done_waiting(self.in_flight, len(self.connections), self.clock(),
                               self.last_request, deadline):
            changed.clear()
            # In flight: looked at again every QUIET seconds (a flow can stop being live without
            # a hook). Else: connections are open and a request came less than QUIET ago.
            wake = min(deadline, (self.clock() if self.in_flight else self.last_request) + QUIET)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wake - self.clock())):
                    await changed.wait()
        if self.in_flight:
            log.warning(f"router: drain timeout: shutting down with {self.in_flight} requests in flight")
        else:
            log.warning("router: drained: no request in flight; shutting down")
        await self._close_connections(changed)
        ctx.master.shutdown()

    async def _close_connections(self, changed: asyncio.Event, wait: float = 1.0) -> None:
        """Close the client connections left (idle keep-alive ones) as mitmproxy closes an
        inactive one, rather than leave them to the shutdown."""
        if not self.connections or not compat.available("client_close"):
            return
        for cid in list(self.connections):
            await compat.close_client(ctx.master, cid)
        deadline = self.clock() + wait
        while self.connections and self.clock() < deadline:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, deadline - self.clock())):
                    await changed.wait()
