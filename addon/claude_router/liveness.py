"""The worker's health page: ``HEAD /_router/health`` (GET too), answered on the router's own
event loop, never forwarded, never routed, no upstream touched.

Because mitmproxy itself must read the request and run this hook, an answer proves more than
an open port: a process that is stopped (SIGSTOP), hung in a blocking call or stuck in a loop
still accepts TCP connections (the kernel queues them) but never answers here. HAProxy's check
(``option httpchk``, claude_router/cli/workers.py) and the workers' supervisor use it.

    HEAD /_router/health            200, x-router-health: ok (503 and "draining" while draining)
    + x-router-challenge: C         ... and x-router-proof: HMAC-SHA256(token, C) in hex, where
                                    token is the per-start secret the supervisor put in this
                                    process's environment (CLAUDE_ROUTER_WORKER_TOKEN)

The proof lets the supervisor tell the process it started from anything else that answers on
the worker's port (a process that grabbed it after the worker died): the token itself is never
sent, so no client can learn it through the page, and a new start gets a new one.

Keys: a HEAD is answered without a client key (the router answers every keyless HEAD itself);
a GET without a key, when client keys are required, gets the router's 401 like any request.
Hook order: mitmproxy runs a sub-addon's hooks after the Router's own, so this runs after
``Router.requestheaders`` (which lets a HEAD or a keyed request through untouched) and sets the
response there; the Router's ``request`` hook then leaves the flow alone (it has a response).
The flow is kept out of mitmdump's flow output, and a connection that carried only health
checks out of its "client connect"/"client disconnect" lines: each would otherwise print for
every check (HAProxy checks every worker every second). In regular mode only a request
addressed to a loopback host is answered here (HAProxy's check says ``Host: localhost``);
every other one is the client's, and proxied as usual.
"""

import hashlib
import hmac
import ipaddress
import logging
import os

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode

from . import compat

PATH = "/_router/health"
TOKEN_ENV = "CLAUDE_ROUTER_WORKER_TOKEN"
HEALTH_HEADER = "x-router-health"
CHALLENGE_HEADER = "x-router-challenge"
PROOF_HEADER = "x-router-proof"
MAX_CHALLENGE = 128
_CREDENTIALS = ("x-api-key", "authorization", "proxy-authorization")


def proof(token: str, challenge: str) -> str:
    """What a worker holding ``token`` answers to ``challenge``."""
    return hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Liveness:
    name = "router_liveness"  # mitmproxy's name for this addon (default: the class name)

    def __init__(self) -> None:
        self.token: str | None = None
        self.answered = 0
        self._dumper_wrapped = False
        self.quiet = QuietChecks()

    def load(self, loader) -> None:
        self.token = os.environ.get(TOKEN_ENV) or None
        if self.quiet not in SERVER_LOG.filters:
            SERVER_LOG.addFilter(self.quiet)
        self._quiet_dumper()  # (the proxy may listen, and be checked, before `running`)

    def running(self) -> None:
        self._quiet_dumper()

    def done(self) -> None:
        SERVER_LOG.removeFilter(self.quiet)
        self.quiet.release_all()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._answer(flow):
            self.quiet.release(flow.client_conn.peername)  # a client's: its connect line shows

    def _answer(self, flow: http.HTTPFlow) -> bool:
        if flow.response or flow.error or not flow.live or flow.is_replay:
            return False
        if flow.metadata.get("router_refused"):
            return False  # the router answered it from its head (a GET without a required key)
        req = flow.request
        if req.method not in ("HEAD", "GET") or req.path.split("?", 1)[0] != PATH or req.stream:
            return False
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode) and not _loopback(req.host):
            return False  # regular mode: a client's request to some other host's page of that name
        drain = ctx.master.addons.get("router_drain") if ctx.master else None
        draining = bool(getattr(drain, "draining", False))
        headers = {HEALTH_HEADER: "draining" if draining else "ok", "content-type": "text/plain",
                   "cache-control": "no-store"}
        challenge = req.headers.get(CHALLENGE_HEADER, "")
        if self.token and challenge and len(challenge) <= MAX_CHALLENGE:
            headers[PROOF_HEADER] = proof(self.token, challenge)
        body = b"" if req.method == "HEAD" else (b"draining\n" if draining else b"ok\n")
        for name in _CREDENTIALS:  # (shown in mitmweb; never needed here)
            if name in req.headers:
                req.headers[name] = "[redacted]"
        flow.response = http.Response.make(503 if draining else 200, body, headers)
        flow.metadata["router_health"] = True
        self.answered += 1
        self.quiet.health_check(flow.client_conn.peername)
        return True

    def _quiet_dumper(self) -> None:
        """Keep health checks out of mitmdump's flow output (one line a second per check)."""
        if not self._dumper_wrapped:
            self._dumper_wrapped = compat.quiet_dumper(ctx.master, _health_flow)


def _health_flow(f) -> bool:
    metadata = getattr(f, "metadata", None)
    return isinstance(metadata, dict) and bool(metadata.get("router_health"))


SERVER_LOG = logging.getLogger("mitmproxy.proxy.server")  # "client connect", "client disconnect"


class QuietChecks(logging.Filter):
    """Holds back each connection's "client connect" line until the connection carries a
    request that is not a health check or logs anything else, and drops both lines of a
    connection that carried only health checks. (A connection that closes having sent nothing
    gets both lines, as before.) Each line keeps its own time stamp."""

    MAX_HELD = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[object, logging.LogRecord] = {}  # peer -> its held "client connect"
        self.checks: set[object] = set()  # peers whose connection carried only health checks

    def filter(self, record: logging.LogRecord) -> bool:
        peer = getattr(record, "client", None)
        if peer is None or getattr(record, "router_released", False):
            return True
        msg = record.msg
        if msg == "client connect":
            if len(self.held) >= self.MAX_HELD:
                self.release_all()
            self.held[peer] = record
            return False
        if msg == "client disconnect" and peer in self.checks:
            self.checks.discard(peer)
            if self.held.pop(peer, None) is not None:
                return False  # only health checks: neither line
        self.release(peer)
        return True

    def health_check(self, peer: object) -> None:
        if peer in self.held:
            self.checks.add(peer)

    def release(self, peer: object) -> None:
        self.checks.discard(peer)
        record = self.held.pop(peer, None)
        if record is not None:
            record.router_released = True
            SERVER_LOG.handle(record)

    def release_all(self) -> None:
        for peer in list(self.held):
            self.release(peer)
