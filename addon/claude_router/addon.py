"""The mitmproxy addon: options, hooks, and the attempt loop that ties the pieces together.

Request path (all async, every wait bounded): the `request` hook plans the endpoints from the
health store, sends the request to each in turn with the pooled upstream client until one
answers well, then either sets a buffered `flow.response` (small non-streaming bodies) or parks
the still-unread response with the handoff server and re-points the flow at it, so mitmproxy
streams it to the client event by event (see `handoff`).
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy import ctx, exceptions, http, optmanager
from mitmproxy.utils import typecheck
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode, UpstreamMode
from mitmproxy.tls import ClientHelloData

from . import policy
from .endpoints import Endpoint, parse_endpoints
from .errors import error_body
from .handoff import HandoffServer, Parked
from .health import Breaker, HealthStore, MemoryHealthStore
from .policy import Attempt
from .redis_store import RedisHealthStore, redacted
from .routing import Answer, Request, Routing, Settings, Winner
from .upstream import Upstream, UpstreamError, request_headers

log = logging.getLogger("claude_router")


INT_OPTIONS = {  # name: (default, minimum, help)
    "router_max_failures": (3, 1, "Consecutive failures that put an endpoint in cooldown."),
    "router_cooldown": (60, 1, "Seconds an endpoint stays in cooldown (the base ejection time)."),
    "router_connect_timeout": (10, 1, "Seconds allowed for connecting to an endpoint (TCP and TLS)."),
    "router_headers_timeout": (
        600,
        1,
        """
        Seconds a non-streaming request may wait for the endpoint's response headers, and
        for each later read of the body. A non-streaming Claude answer only starts when it is
        complete, so keep this long.
        """,
    ),
    "router_stream_timeout": (
        120,
        1,
        """
        Seconds a streaming request ("stream": true) may wait for the response headers, and
        the longest silence allowed between bytes of the stream, including the wait for its
        first content event (a stream is held until then, so a bad start can fail over).
        """,
    ),
    "router_max_attempts": (
        0, 0, "Most endpoints one request may try (0: every endpoint, in price order)."
    ),
    "router_deadline": (
        900, 1, "Seconds one request may spend on all its attempts together before it is answered."
    ),
}


ROUTER_OPTIONS = frozenset(
    {"router_endpoints", "router_hosts", "router_redis_url", "router_key_prefix",
     "router_policy", "router_all_cooling", *INT_OPTIONS}
)


def _refuse_unparsable(options, names: frozenset[str]) -> None:
    """Log an error for a router option given a value of the wrong type.

    mitmproxy parses `--set` and config.yaml values for a script's options only after the
    script loaded; a value that does not parse (``router_cooldown=1.5``) raises inside the
    script loader, which then silently runs without the addon. An error logged during
    start-up instead makes mitmdump/mitmweb exit and say why.
    """
    for name in [n for n in options.deferred if n in names]:
        value = options.deferred[name]
        try:
            if isinstance(value, optmanager._UnconvertedStrings):
                value = options._parse_setval(options._options[name], value.val)
            typecheck.check_option_type(name, value, options._options[name].typespec)
        except (exceptions.OptionsError, TypeError, ValueError) as e:
            del options.deferred[name]
            log.error(f"router: cannot use {name}: {e}")


@dataclass(frozen=True)
class RouteInfo:
    """What the router did with a flow, kept in flow.metadata for display and status."""

    url: str
    content: bytes | None
    content_length: str | None
    endpoint: str
    attempts: str
    handoff_path: str = ""


class Router:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.endpoints: tuple[Endpoint, ...] = ()
        self.hosts: frozenset[str] = frozenset()
        self.store: HealthStore = MemoryHealthStore(Breaker(), clock=clock)
        self.upstream = Upstream()
        self.routing = Routing(self.upstream, clock)
        self.settings = Settings()
        self.handoff = HandoffServer()
        self._background: set[asyncio.Task] = set()

    # -- options -------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "router_endpoints",
            Sequence[str],
            [],
            """
            An endpoint as NAME=URL, cheapest first; repeat the option for each endpoint.
            The client's path and query are appended to the URL's path, e.g.
            aws=https://relay.example/claude/aws.
            """,
        )
        loader.add_option(
            "router_hosts",
            Sequence[str],
            ["api.anthropic.com"],
            """
            In regular (HTTPS_PROXY) mode, the hosts whose requests are routed; connections
            to any other host pass through untouched. In reverse mode every request is routed.
            """,
        )
        for name, (default, _, help_text) in INT_OPTIONS.items():
            loader.add_option(name, int, default, help_text)
        loader.add_option(
            "router_redis_url",
            str,
            "",
            """
            Share endpoint health between router instances through Redis, e.g.
            redis://host:6379/0 (also rediss:// and unix://; a password goes in the URL).
            Empty: health is kept in this process's memory.
            """,
        )
        loader.add_option(
            "router_key_prefix",
            str,
            "endpoint_health_",
            "Prefix of the Redis keys (and pub/sub channel) that hold endpoint health.",
        )
        loader.add_option(
            "router_policy",
            Sequence[str],
            [],
            """
            Override how an upstream answer is treated, as KEY=ACTION; repeat for each rule.
            KEY: a status (429), a class (4xx), STATUS:error_type, type:error_type, or a
            failure kind (refused, reset, timeout, tls, empty_stream, stream_error...).
            ACTION: count (fail over, count a failure), skip (fail over, no blame), client
            (the request is bad: no blame, returned once a second endpoint agrees), return
            (hand it to the client at once). The README lists the defaults.
            """,
        )
        loader.add_option(
            "router_all_cooling",
            str,
            "refuse",
            """
            When every endpoint is cooling down: "refuse" answers 529 overloaded_error at once
            with a retry-after until the first endpoint can be tried again; "try" tries them
            all anyway in price order, as the original router did.
            """,
            choices=("refuse", "try"),
        )
        _refuse_unparsable(loader.master.options, ROUTER_OPTIONS)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        for name, (_, minimum, _) in INT_OPTIONS.items():
            if name in updated and getattr(opts, name) < minimum:
                raise exceptions.OptionsError(
                    f"{name} must be at least {minimum}, got {getattr(opts, name)}"
                )
        if "router_endpoints" in updated:
            try:
                self.endpoints = parse_endpoints(opts.router_endpoints)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot use router_endpoints: {e}") from None
        if "router_hosts" in updated:
            self.hosts = frozenset(h.strip().lower() for h in opts.router_hosts if h.strip())
        if updated & {"router_max_failures", "router_cooldown"}:
            self.store.breaker = self._breaker()
        if updated & {"router_redis_url", "router_key_prefix"}:
            self._replace_store(self._make_store())
        if updated & {"router_endpoints", "router_redis_url", "router_key_prefix"}:
            self.store.track(ep.name for ep in self.endpoints)
        if updated & (ROUTER_OPTIONS - {"router_endpoints", "router_hosts", "router_redis_url",
                                        "router_key_prefix"}):
            self.settings = self._settings()
        if "connection_strategy" in updated and opts.connection_strategy != "lazy":
            # Eager mode dials the reverse target or CONNECT host before any hook runs,
            # which fails for hosts the router never contacts.
            log.info("router: setting connection_strategy=lazy (required for routing)")
            opts.update(connection_strategy="lazy")

    def _settings(self) -> Settings:
        opts = ctx.options
        try:
            rules = policy.parse_rules(opts.router_policy)
        except ValueError as e:
            raise exceptions.OptionsError(f"Cannot use router_policy: {e}") from None
        return Settings(
            connect_timeout=float(opts.router_connect_timeout),
            headers_timeout=float(opts.router_headers_timeout),
            stream_timeout=float(opts.router_stream_timeout),
            max_attempts=opts.router_max_attempts,
            deadline=float(opts.router_deadline),
            try_all_when_cooling=opts.router_all_cooling == "try",
            rules=rules,
            max_hint=self._breaker().max_cooldown,
        )

    def _breaker(self) -> Breaker:
        opts = ctx.options
        return Breaker(
            max_failures=opts.router_max_failures,
            cooldown=float(opts.router_cooldown),
            max_cooldown=float(max(opts.router_cooldown * 10, 600)),
        )

    def _make_store(self) -> HealthStore:
        url = ctx.options.router_redis_url.strip()
        if not url:
            return MemoryHealthStore(self._breaker(), clock=self.clock)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise exceptions.OptionsError(
                f"router_redis_url must start with redis://, rediss:// or unix://, got {redacted(url)!r}"
            )
        try:
            return RedisHealthStore(url, self._breaker(), prefix=ctx.options.router_key_prefix,
                                    clock=self.clock)
        except ValueError as e:
            raise exceptions.OptionsError(f"Cannot use router_redis_url {redacted(url)!r}: {e}") from None

    def _replace_store(self, store: HealthStore) -> None:
        old, self.store = self.store, store
        try:
            asyncio.get_running_loop().create_task(old.close())
        except RuntimeError:  # no loop yet (start-up): nothing was opened
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def running(self) -> None:
        # Sync on purpose: mitmproxy may invoke `running` synchronously for a late-loaded script.
        if not self.endpoints:
            log.warning("router: no router_endpoints configured; requests pass through unrouted")
            return
        self._announcing = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        if isinstance(self.store, RedisHealthStore):
            await self.store.wait_synced(timeout=2.0)  # so the first log line tells the truth
        names = ", ".join(f"{ep.index}:{ep.name}" for ep in self.endpoints)
        log.info(f"router: {len(self.endpoints)} endpoints in price order ({names}), "
                 f"health store: {self.store_description}")

    @property
    def store_description(self) -> str:
        return getattr(self.store, "description", type(self.store).__name__)

    async def done(self) -> None:
        await self.handoff.close()
        await self.upstream.close()
        await self.store.close()

    # -- hooks -----------------------------------------------------------------------------

    def tls_clienthello(self, data: ClientHelloData) -> None:
        """Regular mode: leave TLS to hosts we do not route untouched (no interception)."""
        if not isinstance(data.context.client.proxy_mode, RegularMode):
            return
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if self.endpoints and host and host.lower() not in self.hosts:
            data.ignore_connection = True

    def routes(self, flow: http.HTTPFlow) -> bool:
        if not self.endpoints:
            return False
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, ReverseMode):
            return True
        if isinstance(mode, (RegularMode, UpstreamMode)):
            return flow.request.pretty_host.lower() in self.hosts
        return False

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not self.routes(flow):
            return
        if flow.request.method == "HEAD" and flow.request.path == "/":
            # Claude Code's reachability check: answer it here, no upstream needed.
            flow.response = http.Response.make(200, b"", {"content-type": "text/plain"})
            return
        try:
            await self._route(flow)
        except Exception:
            log.exception("router: internal error while routing")
            self._answer_internal_error(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        info: RouteInfo | None = flow.metadata.get("router")
        if info is None or not info.handoff_path:
            return
        # Show the real upstream request in mitmweb instead of the loopback hop.
        req = flow.request
        req.url = info.url
        req.raw_content = info.content
        if info.content_length is not None:
            req.headers["content-length"] = info.content_length
        flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        info: RouteInfo | None = flow.metadata.get("router")
        if info is not None and info.handoff_path:
            self.handoff.discard(info.handoff_path)

    # -- routing ---------------------------------------------------------------------------

    async def _route(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        request = Request(req.method, req.path, request_headers(req.headers.items(multi=True)),
                          req.raw_content or b"")
        result = await self.routing.route(self.endpoints, self.store, self.settings, request)
        if result.winner is None:
            self._answer(flow, result.answer, result.attempts)
        elif result.winner.complete:
            w = result.winner
            self._answer(flow, Answer(w.resp.status, w.resp.reason, w.resp.headers, w.prefix,
                                      w.endpoint), result.attempts, head_length=w.resp.length)
        else:
            await self._stream(flow, result.winner, result.attempts)

    def _answer(self, flow: http.HTTPFlow, answer: Answer, attempts: list[Attempt],
                head_length: int | None = None) -> None:
        """Set a complete response on the flow (mitmproxy sends it; no upstream connection)."""
        ep = answer.endpoint
        self._remember(flow, ep, attempts)
        if ep is not None:
            flow.request.url = ep.url_for(flow.request.path)
        fields = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers + self._route_headers(ep, attempts)
            if k.lower() != "content-length"
        ]
        response = http.Response.make(answer.status, b"", fields)
        if answer.reason:
            response.reason = answer.reason
        response.raw_content = answer.body  # raw: any content-encoding passes through untouched
        length = head_length if flow.request.method == "HEAD" and head_length is not None else len(answer.body)
        response.headers["content-length"] = str(length)
        flow.response = response

    async def _stream(self, flow: http.HTTPFlow, w: Winner, attempts: list[Attempt]) -> None:
        """Park the winning response with the handoff server and point the flow at it."""
        parked = Parked(
            status=w.resp.status,
            reason=w.resp.reason,
            headers=w.resp.headers + self._route_headers(w.endpoint, attempts),
            body=self._body(w),
            close=w.resp.close,
            length=w.resp.length,
            event_stream=w.resp.is_event_stream,
            client=flow.client_conn.id,
        )
        port, path = await self.handoff.park(parked, multiplexed=flow.client_conn.alpn == b"h2")
        self._remember(flow, w.endpoint, attempts, handoff_path=path)
        req = flow.request
        req.scheme, req.host, req.port, req.path = "http", self.handoff.host, port, path
        # The upstream already has the body; the loopback hop needs none.
        req.raw_content = b""
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"

    async def _body(self, w: Winner):
        """The rest of a streamed body; a failure after content reached the client counts
        against the endpoint (the handoff ends the client's stream with an error event)."""
        if w.prefix:
            yield w.prefix
        counted = False
        try:
            async for chunk in w.resp.chunks():
                if not counted and w.resp.is_event_stream and b"event: error" in chunk:
                    counted = True
                    self._count_failure(w.endpoint.name)
                yield chunk
        except UpstreamError:
            if not counted:
                self._count_failure(w.endpoint.name)
            raise

    def _count_failure(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self.store.record_failure(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _route_headers(self, ep: Endpoint | None, attempts: list[Attempt]) -> list[tuple[str, str]]:
        headers = [("X-Router-Attempts", policy.attempts_header(attempts))] if attempts else []
        if ep is not None:
            headers[:0] = [("X-Used-Endpoint", ep.name), ("X-Endpoint-Index", str(ep.index))]
        return headers

    def _remember(self, flow: http.HTTPFlow, ep: Endpoint | None, attempts: list[Attempt],
                  handoff_path: str = "") -> None:
        trail = policy.attempts_header(attempts) or "none"
        flow.metadata["router"] = RouteInfo(
            url=ep.url_for(flow.request.path) if ep else flow.request.url,
            content=flow.request.raw_content,
            content_length=flow.request.headers.get("content-length"),
            endpoint=ep.name if ep else "",
            attempts=trail,
            handoff_path=handoff_path,
        )
        where = f"routed to {ep.name} (index {ep.index})" if ep else "answered by the router"
        flow.comment = f"{where}; attempts: {trail}"
        log.info(f"router: {flow.request.method} {flow.request.path.split('?')[0]} -> "
                 f"{ep.name if ep else 'router'} [{trail}]")

    def _answer_internal_error(self, flow: http.HTTPFlow) -> None:
        body = error_body(500, "the router failed internally")
        self._answer(flow, Answer(500, "", [("content-type", "application/json")], body), [])
