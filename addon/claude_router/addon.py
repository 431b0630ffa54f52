"""The mitmproxy addon: its hooks and options, gluing the router's pieces together. Who may
use it is in `access`, its pages and commands in `admin` (a sub-addon), the cost strategy's
conversations in `conversations`, what the options make in `options`, draining in `drain`
(a sub-addon).

Request path (all async, every wait bounded): the `request` hook checks the client's key, runs
the attempt loop (`routing`), then either sets a complete `flow.response` or parks the
still-unread winning response with the handoff server and re-points the flow at it, so
mitmproxy streams it to the client event by event (see `handoff`).
"""

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode, UpstreamMode
from mitmproxy.tls import ClientHelloData

from . import access, admin, config, decoding, dispatch, options, policy, runtime, sessions, usage
from .admin import Admin, reply
from .affinity import MemoryAffinity, RedisAffinity
from .conversations import Conversations
from .drain import Drain
from .connections import Delivery, HeadDeadlines
from .endpoints import CREDENTIAL_HEADERS, REDACTED, Endpoint, parse_endpoints
from .errors import error_body
from .handoff import HandoffServer, Parked
from .health import HEALTHY, Breaker, HealthStore, MemoryHealthStore, Phase, phase
from .policy import Attempt
from .redis_store import RedisHealthStore
from .requests import Refused, split_tier, unsendable, upstream_target
from .routing import Answer, Request, Routing, Settings, Winner
from .status import Stats
from .upstream import Upstream, UpstreamError, request_headers

log = logging.getLogger("claude_router")
# One line per request goes here. It skips mitmproxy's legacy `add_log` hook (one more hook
# dispatch through every addon for each line, the largest per-request cost of logging) but
# keeps the terminal and mitmweb's event log; see `_quiet_request_log`.
request_log = logging.getLogger("claude_router.requests")

RELOAD_EVERY = 0.5  # seconds between checks of the config file
# A stream that breaks right after its client held it up this long is not blamed on the
# endpoint: relays give up on clients that stop reading.
CLIENT_STALL = 1.0


@dataclass
class RouteInfo:
    """What the router did with a flow, for the handoff, logs and stats. Kept by the router,
    not in flow.metadata, which mitmproxy must be able to save (and which is shown)."""

    path: str  # the client's path, without the query
    target: str  # the upstream path and query (after the endpoint's own path)
    content: bytes | None
    content_length: str | None
    endpoint: Endpoint | None
    attempts: list[Attempt]
    started: float
    ttfb: float | None = None
    handoff_path: str = ""
    tokens: usage.Usage | None = None
    logged: bool = field(default=False)
    session_id: str | None = None  # the conversation (cost strategy), and what it was before
    session: sessions.Session | None = None
    ttl: float = 0.0
    asked_at: float = 0.0  # wall clock when the request came
    reason: str = ""
    error: str = ""  # what broke a stream after it reached the client


class Router:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.option_endpoints: tuple[Endpoint, ...] = ()
        self.file: config.FileConfig | None = None
        self.hosts: frozenset[str] = frozenset()
        self.client_keys: tuple[bytes, ...] = ()
        self.store: HealthStore = MemoryHealthStore(Breaker(), clock=clock)
        self.upstream = Upstream()
        self.routing = Routing(self.upstream, clock)
        self.settings = Settings()
        self.handoff = HandoffServer()
        self.stats = Stats()
        self._background: set[asyncio.Task] = set()
        self._routing: dict[str, set[asyncio.Task]] = {}  # client connection id -> routing tasks
        self._handed_off: dict[str, RouteInfo] = {}  # flow id -> route, until its headers pass
        self._config_stamp: tuple | None = None
        self._watcher: asyncio.Task | None = None
        self.heads = HeadDeadlines()
        self.body_limit: int = 32_000_000
        self._backstop: str | None = None  # the body_size_limit the router set
        self.hook_index: dispatch.HookIndex | None = None  # router_hook_index
        self.accept_errors = runtime.AcceptErrors()  # out of descriptors: one line, not tracebacks
        self._running = False
        self.conversations = Conversations(clock)
        self.admin = Admin(self)
        self.drain = Drain()
        self.addons = [self.admin, self.drain]

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.file.endpoints if self.file else self.option_endpoints

    @property
    def affinity(self) -> MemoryAffinity:
        return self.conversations.affinity

    # -- options -------------------------------------------------------------------------

    def load(self, loader) -> None:
        options.declare(loader)
        for problem in options.unparsable(loader.master.options) + options.unknown(loader.master.options):
            log.error(problem)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        options.check_ints(opts, updated)
        if "router_config" in updated:
            self._load_config_or_refuse()
        if "router_endpoints" in updated:
            try:
                self.option_endpoints = parse_endpoints(opts.router_endpoints)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot use router_endpoints: {e}") from None
        if "router_hosts" in updated:
            self.hosts = frozenset(h.strip().lower() for h in opts.router_hosts if h.strip())
        if updated & {"router_client_keys", "router_config"}:
            self.client_keys = self._client_keys(self.file)
        if updated & {"router_max_failures", "router_cooldown"}:
            self.store.breaker = options.breaker(ctx.options)
        if updated & {"router_redis_url", "router_key_prefix"}:
            self._replace_store(options.store(ctx.options, self.clock))
            c = self.conversations
            old, c.affinity = c.affinity, (
                RedisAffinity(self.store.client, self.store.prefix, self.clock)
                if isinstance(self.store, RedisHealthStore) else MemoryAffinity(self.clock))
            try:
                self.spawn(old.close())
            except RuntimeError:  # no loop yet (start-up): nothing was started
                pass
        if "router_strategy" in updated:
            if opts.router_strategy not in ("cost", "order"):
                raise exceptions.OptionsError(
                    f"router_strategy must be cost or order, got {opts.router_strategy!r}")
            self.conversations.strategy = opts.router_strategy
        if "router_session_horizon" in updated:
            self.conversations.horizon = opts.router_session_horizon
        if "router_cache_ttl" in updated:
            self.conversations.cache_ttl = float(opts.router_cache_ttl)
        if updated & {"router_endpoints", "router_config", "router_redis_url", "router_key_prefix"}:
            self.store.track(policy.health_subjects(ep.name for ep in self.endpoints))
        if updated & (options.ALL - {"router_endpoints", "router_hosts", "router_redis_url", "router_hook_index",
                                     "router_key_prefix", "router_config", "router_client_keys"}):
            self.settings = options.settings(ctx.options)
        if updated & {"router_config", "router_client_keys", "router_endpoints", "listen_host", "mode"}:
            self._refuse_open_keys(self.endpoints, self.client_keys)
        if "router_head_timeout" in updated:
            self.heads.timeout = float(opts.router_head_timeout)
        if "router_max_body_mb" in updated:
            self.body_limit = opts.router_max_body_mb * 1_000_000
            # A backstop for chunked bodies (their size is known only as they arrive):
            # mitmproxy's own limit at 4 x, unless the operator set one.
            backstop = f"{4 * opts.router_max_body_mb}m"
            if opts.body_size_limit in (None, self._backstop):
                self._backstop = backstop
                opts.update(body_size_limit=backstop)
        if "router_hook_index" in updated and self._running:
            self._index_hooks(opts.router_hook_index)
        if "connection_strategy" in updated and opts.connection_strategy != "lazy":
            # Eager mode dials the reverse target or CONNECT host before any hook runs,
            # which fails for hosts the router never contacts.
            log.info("router: setting connection_strategy=lazy (required for routing)")
            opts.update(connection_strategy="lazy")

    def _load_config_or_refuse(self) -> None:
        path = ctx.options.router_config
        if not path:
            self.file = None
            return
        try:
            self.file = config.load(path)
        except config.ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        self._config_stamp = _stamp(path)
        self._apply_file_options(self.file)

    def _apply_file_options(self, file: config.FileConfig) -> None:
        """The file's settings win over --set; options that differ are updated."""
        changed = {k: v for k, v in file.options.items() if getattr(ctx.options, k) != v}
        if changed:
            ctx.options.update(**changed)

    def _client_keys(self, file: config.FileConfig | None) -> tuple[bytes, ...]:
        try:
            return access.client_keys(ctx.options.router_client_keys,
                                      file.client_keys if file else ())
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None

    def _refuse_open_keys(self, endpoints: tuple[Endpoint, ...], client_keys: tuple[bytes, ...]) -> None:
        host = access.open_door(endpoints, client_keys, getattr(ctx.options, "listen_host", "127.0.0.1"),
                                getattr(ctx.options, "mode", ()))
        if host is not None:
            raise exceptions.OptionsError(
                f"endpoints hold their own keys but no router_client_keys are set, and the router "
                f"listens on {host or 'every interface'}: set router_client_keys (or client_keys "
                f"in the config file), or listen on 127.0.0.1")

    def _replace_store(self, store: HealthStore) -> None:
        old, self.store = self.store, store
        try:
            self.spawn(old.close())
        except RuntimeError:  # no loop yet (start-up): nothing was opened
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def running(self) -> None:
        # Sync on purpose: mitmproxy may invoke `running` synchronously for a late-loaded script.
        _quiet_request_log()
        runtime.tune_gc()
        runtime.raise_fd_limit()
        self.accept_errors.install(asyncio.get_running_loop())
        self._running = True
        self._index_hooks(ctx.options.router_hook_index)
        self.spawn(self._announce())
        if ctx.options.router_config and self._watcher is None:
            self._watcher = self.spawn(self._watch_config())

    def _index_hooks(self, on: bool) -> None:
        if on and self.hook_index is None:
            self.hook_index = dispatch.HookIndex.install(ctx.master.addons)
        elif not on and self.hook_index is not None:
            self.hook_index.uninstall()
            self.hook_index = None

    async def _announce(self) -> None:
        if not self.endpoints:
            log.warning("router: no endpoints configured; requests pass through unrouted")
            return
        if isinstance(self.store, RedisHealthStore):
            await self.store.wait_synced(timeout=2.0)  # so the first log line tells the truth
        names = ", ".join(f"{ep.index}:{ep.name}" for ep in self.endpoints)
        log.info(f"router: {len(self.endpoints)} endpoints in price order ({names}), "
                 f"health store: {self.store.description}")
        if any(ep.holds_secrets for ep in self.endpoints) and not self.client_keys:
            log.warning("router: endpoints hold keys and no client keys are set: any local "
                        "process that reaches the router can use them")

    async def done(self) -> None:
        self.accept_errors.uninstall()
        if self._watcher:
            self._watcher.cancel()
        await self.affinity.close()
        await self.handoff.close()
        await self.upstream.close()
        await self.store.close()

    async def _watch_config(self) -> None:
        """Apply edits to the config file within a second; a broken edit keeps the last good."""
        while True:
            await asyncio.sleep(RELOAD_EVERY)
            path = ctx.options.router_config
            stamp = _stamp(path) if path else None
            if stamp is None or stamp == self._config_stamp:
                continue
            self._config_stamp = stamp
            try:
                file = config.load(path)
            except config.ConfigError as e:
                log.warning(f"router: keeping the last good config: {e}")
                continue
            try:
                keys = self._client_keys(file)
                self._refuse_open_keys(file.endpoints, keys)  # checked before anything changes
                self._apply_file_options(file)
                self.file, self.client_keys = file, keys
            except exceptions.OptionsError as e:
                log.warning(f"router: keeping the last good config: {e}")
                continue
            self.store.track(policy.health_subjects(ep.name for ep in self.endpoints))
            log.info(f"router: config reloaded from {path}: "
                     f"{', '.join(ep.name for ep in self.endpoints)}")

    def spawn(self, coro) -> asyncio.Task:
        """Run in the background; kept until done (a task nobody holds may be collected)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- hooks -----------------------------------------------------------------------------

    def tls_clienthello(self, data: ClientHelloData) -> None:
        """Regular mode: leave TLS to hosts we do not route untouched (no interception)."""
        if not isinstance(data.context.client.proxy_mode, RegularMode):
            return
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if self.endpoints and host and host.lower() not in self.hosts:
            data.ignore_connection = True

    def client_connected(self, client) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")

        def close() -> None:
            handler = proxyserver.connections.get(client.id) if proxyserver else None
            if handler is not None:
                self.spawn(handler.on_timeout())  # mitmproxy's own way to drop a connection

        self.heads.connected(client.id, close)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.heads.head_seen(flow.client_conn.id)
        if flow.response or flow.error or not flow.live or flow.is_replay:
            return
        req = flow.request
        if req.method == "HEAD" and access.is_base_url(req.path, (ep.name for ep in self.endpoints)) or not self.routes(flow):
            return  # (a reachability check is answered in `request`, key or not)
        if self.client_keys and not access.authorized(req.headers, self.client_keys):
            await self._refuse_early(flow, 401, error_body(401, access.KEY_REQUIRED))
            return
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.body_limit:
            await self._refuse_early(flow, 413, error_body(
                413, f"the request body ({int(length):,} bytes) is over the router's limit of "
                     f"{self.body_limit:,} bytes (router_max_body_mb)", "request_too_large"))

    async def _refuse_early(self, flow: http.HTTPFlow, status: int, body: bytes) -> None:
        """Answer from the request head, before the body is taken in: mitmproxy streams the
        body into a sink that drops it as it arrives (so a 256 MiB upload costs no memory) and
        fetches this answer from the handoff server. A client that sends its whole body before
        it reads gets the answer once it has; none is left hanging."""
        _redact_credentials(flow.request)

        async def once() -> AsyncIterator[bytes]:
            yield body

        parked = Parked(status=status, reason="", headers=[("content-type", "application/json")],
                        body=once(), close=lambda: None, length=len(body), client=flow.client_conn.id,
                        keep_open=True)
        port, path = await self.handoff.park(parked, multiplexed=flow.client_conn.alpn == b"h2")
        flow.metadata["router_refused"] = status  # the request hook leaves it to mitmproxy
        req = flow.request
        req.scheme, req.host, req.port, req.path = "http", self.handoff.host, port, path
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"
        req.stream = _drop
        flow.comment = f"answered {status} by the router from the request head; body dropped"

    def routes(self, flow: http.HTTPFlow) -> bool:
        if not self.endpoints:
            return False
        if flow.is_replay and "router" in flow.metadata:
            return True  # a routed flow replayed from mitmweb or -C: route it again
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, ReverseMode):
            return True
        if isinstance(mode, (RegularMode, UpstreamMode)):
            return flow.request.pretty_host.lower() in self.hosts
        return False

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("router_refused"):
            return  # answered from its head; mitmproxy fetches the answer from the handoff
        if flow.response or flow.error or not flow.live or not self.routes(flow):
            return
        try:
            if flow.is_replay:
                _as_sent_by_client(flow)
            await self._handle(flow)
        except Exception:
            # Never let a routed request fall through to mitmproxy's own upstream connection.
            log.exception("router: internal error")
            reply(flow, 500, error_body(500, "the router failed internally"))

    async def _handle(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.method == "HEAD" and access.is_base_url(req.path, (ep.name for ep in self.endpoints)):
            # Claude Code's reachability check: answer it here, no upstream needed.
            flow.response = http.Response.make(200, b"", {"content-type": "text/plain"})
            return
        if self.client_keys and not flow.is_replay and not access.authorized(req.headers, self.client_keys):
            # (replays are the operator's, from mitmweb or -C; their keys were redacted)
            reply(flow, 401, error_body(401, access.KEY_REQUIRED))
            return
        if req.path.startswith(admin.PREFIX):
            _redact_credentials(req)
            await self.admin.page(flow)
            return
        problem = unsendable(req.data.method, req.headers.fields)
        pinned, raw_target = split_tier(req.data.path, {ep.name for ep in self.endpoints})
        try:
            target = upstream_target(raw_target)
        except Refused as e:
            problem = problem or str(e)
        if problem:
            # The client's request, not any endpoint's doing: answered here, nobody tried.
            _redact_credentials(req)
            reply(flow, 400, error_body(400, f"the request cannot be forwarded: {problem}"))
            return
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode) and not target.startswith("/v1/"):
            # Regular mode: Claude Code also sends its own calls (settings, telemetry) to
            # api.anthropic.com; they are not the API, and relays only 404 them.
            _redact_credentials(req)
            reply(flow, 404, error_body(404, f"the router routes only the API (/v1/...), "
                                              f"not {target.split('?')[0][:100]}"))
            return
        if len(req.raw_content or b"") > self.body_limit:  # a chunked body, now read
            _redact_credentials(req)
            reply(flow, 413, error_body(413, f"the request body is over the router's limit of "
                                              f"{self.body_limit:,} bytes (router_max_body_mb)",
                                              "request_too_large"))
            return
        flow.metadata["router"] = {"client_url": req.url}  # what a replay must route again
        # Route in a task of its own, so that a client that leaves stops its upstream attempts
        # at once (client_disconnected cancels it) instead of when they end.
        routing = asyncio.get_running_loop().create_task(self._route(flow, target, pinned))
        client = flow.client_conn.id
        self._routing.setdefault(client, set()).add(routing)
        try:
            await asyncio.wait({routing})
        finally:
            mine = self._routing.get(client)
            if mine is not None:
                mine.discard(routing)
                if not mine:
                    del self._routing[client]
        if routing.cancelled():
            return  # the client is gone; mitmproxy closes the flow
        if routing.exception() is not None:
            log.error("router: internal error while routing", exc_info=routing.exception())
            reply(flow, 500, error_body(500, "the router failed internally"))

    def client_disconnected(self, client) -> None:
        self.heads.disconnected(client.id)
        for task in self._routing.pop(client.id, ()):
            task.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        info = self._handed_off.pop(flow.id, None)
        if info is None:
            return
        # Show the real upstream request in mitmweb instead of the loopback hop.
        req = flow.request
        _show_upstream(req, info)
        req.raw_content = info.content
        if info.content_length is not None:
            req.headers["content-length"] = info.content_length
        flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        info = self._handed_off.pop(flow.id, None)
        if info is not None:
            self.handoff.discard(info.handoff_path)

    # -- routing ---------------------------------------------------------------------------

    async def _route(self, flow: http.HTTPFlow, target: str, pinned: str | None = None) -> None:
        req = flow.request
        started = time.monotonic()
        asked_at = self.clock()
        request = Request(req.method, target, request_headers(req.headers.items(multi=True)),
                          req.raw_content or b"")
        # The flow kept for mitmweb, -w files and replays never holds the client's key.
        _redact_credentials(req)
        sid, prev, ttl, choose = await self.conversations.place(request, target, self.endpoints)
        path = target.split("?")[0]
        if req.method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")) and any(
                ep.profile.models or ep.profile.model_map for ep in self.endpoints):
            # Answered from every endpoint's list, in client ids (one id too: it may be mapped).
            listing = Request("GET", "/v1/models", request.headers, b"")
            result = await self.routing.models(self.endpoints, self.store, self.settings, listing,
                                               one=path[len("/v1/models/"):] or None)
        else:
            result = await self.routing.route(self.endpoints, self.store, self.settings, request,
                                              pinned, choose)
        self.stats.attempts(result.attempts, result.counted)
        for name in result.trips:
            self._tripped(name)
        w = result.winner
        ep = w.endpoint if w else result.answer.endpoint
        info = RouteInfo(
            path=req.path.split("?")[0],
            target=target,
            content=req.raw_content,
            content_length=req.headers.get("content-length"),
            endpoint=ep,
            attempts=result.attempts,
            started=started,
            ttfb=time.monotonic() - started,
            session_id=sid,
            session=prev,
            ttl=ttl,
            asked_at=asked_at,
            reason=result.reason,
        )
        flow.metadata["router"].update(endpoint=ep.name if ep else None,
                                       attempts=policy.attempts_header(result.attempts))
        where = f"routed to {ep.name} (index {ep.index})" if ep else "answered by the router"
        flow.comment = f"{where}; attempts: {policy.attempts_header(result.attempts) or 'none'}"
        if w is None:
            self._answer(flow, result.answer, info)
        elif w.complete:
            self._answer(flow, Answer(w.resp.status, w.resp.reason, w.resp.headers, w.prefix,
                                      w.endpoint), info, head_length=w.resp.length)
        else:
            await self._stream(flow, w, info)

    def _answer(self, flow: http.HTTPFlow, answer: Answer, info: RouteInfo,
                head_length: int | None = None) -> None:
        """Set a complete response on the flow (mitmproxy sends it; no upstream connection)."""
        if info.endpoint is not None:
            _show_upstream(flow.request, info)
            if answer.status < 300 and len(answer.body) < 1 << 20:
                info.tokens = _usage_of(answer)
        fields = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers + self._route_headers(info)
            if k.lower() != "content-length"
        ]
        response = http.Response.make(answer.status, b"", fields)
        if answer.reason and answer.reason.isascii() and answer.reason.isprintable():
            response.reason = answer.reason
        response.raw_content = answer.body  # raw: any content-encoding passes through untouched
        length = head_length if flow.request.method == "HEAD" and head_length is not None else len(answer.body)
        response.headers["content-length"] = str(length)
        flow.response = response
        self._finish(flow, info, answer.status)

    async def _stream(self, flow: http.HTTPFlow, w: Winner, info: RouteInfo) -> None:
        """Park the winning response with the handoff server and point the flow at it."""
        delivery = Delivery(CLIENT_STALL)
        length = None if w.rewritten else w.resp.length
        if length is not None and length > 4 * self.body_limit:
            length = None  # sent chunked: mitmproxy's body_size_limit backstop is for requests
        parked = Parked(
            status=w.resp.status,
            reason=w.resp.reason,
            headers=w.resp.headers + self._route_headers(info),
            body=self._body(flow, w, info, delivery),
            close=w.resp.close,
            length=length,
            event_stream=w.resp.is_event_stream,
            client=flow.client_conn.id,
            delivery=delivery,
        )
        port, path = await self.handoff.park(parked, multiplexed=flow.client_conn.alpn == b"h2")
        info.handoff_path = path
        self._handed_off[flow.id] = info
        req = flow.request
        req.scheme, req.host, req.port, req.path = "http", self.handoff.host, port, path
        # The upstream already has the body; the loopback hop needs none.
        req.raw_content = b""
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"

    async def _body(self, flow: http.HTTPFlow, w: Winner, info: RouteInfo,
                    delivery: Delivery) -> AsyncIterator[bytes]:
        """The rest of a streamed body, reading token usage on the way. A failure after content
        reached the client counts against the endpoint (the handoff then ends the client's
        stream with an error event), unless the client had stopped reading just before."""
        meter = usage.StreamUsage() if w.resp.is_event_stream else None
        coding = decoding.encoding_of(w.resp.headers)
        decoder = decoding.Decoder(coding) if meter else None  # the meter reads decoded bytes
        # A Messages stream must end with message_stop; one that just stops lost its tail.
        must_stop = meter is not None and b"message_start" in (decoding.decoded(w.prefix, coding) or b"")
        counted = False
        name = w.endpoint.name

        def seen(chunk: bytes) -> None:
            nonlocal counted
            if meter is not None:
                meter.feed(decoder.feed(chunk))  # parses event names: text in a message cannot fool it
                if meter.errored and not counted:
                    counted = True
                    self._midstream_failure(name, "stream_error", "error event mid-stream")

        try:
            if w.prefix:
                seen(w.prefix)
                yield w.prefix
            async for chunk in w.resp.chunks():
                seen(chunk)
                yield chunk
            if must_stop and not meter.stopped and not meter.errored and not (decoder and decoder.broken):
                raise UpstreamError("reset", "stream ended before message_stop")
        except UpstreamError as e:
            info.error = f"mid-stream: {e.detail}"
            if not counted and e.kind != "local":  # (the router's own trouble blames nobody)
                if delivery.stalled_recently(time.monotonic()):
                    self.stats.client_stalled(name)
                    log.info(f"router: {name}'s stream broke after its client stopped reading; "
                             "not counted against it")
                else:
                    self._midstream_failure(name, e.kind, f"mid-stream: {e.detail}")
            raise
        finally:
            info.tokens = meter.usage if meter else None
            self._finish(flow, info, w.resp.status)

    def _midstream_failure(self, name: str, kind: str, detail: str) -> None:
        """A failure after the stream reached the client: counted, shown, maybe a trip."""
        self.stats.midstream(name, kind, detail)

        async def record() -> None:
            before = phase(self.store.current().get(name, HEALTHY), self.clock())
            after = await self.store.record_failure(name)
            if before is not Phase.COOLING and phase(after, self.clock()) is Phase.COOLING:
                self._tripped(name)

        self.spawn(record())

    def _tripped(self, name: str) -> None:
        endpoint, _, family = name.partition("~")
        self.stats.trip(endpoint)
        if family:
            log.warning(f"router: endpoint {endpoint} put in cooldown for the {family} model family")
        else:
            log.warning(f"router: endpoint {name} put in cooldown")

    def _route_headers(self, info: RouteInfo) -> list[tuple[str, str]]:
        ep = info.endpoint
        headers = [("X-Router-Attempts", policy.attempts_header(info.attempts))] if info.attempts else []
        if info.reason:
            headers.append(("X-Router-Reason", info.reason))
        if ep is not None:
            headers[:0] = [("X-Used-Endpoint", ep.name), ("X-Endpoint-Index", str(ep.index))]
        return headers

    def _finish(self, flow: http.HTTPFlow, info: RouteInfo, status: int) -> None:
        """Once per request, when its answer is complete: stats, cost and one log line."""
        if info.logged:
            return
        info.logged = True
        ep = info.endpoint
        self.stats.answered(ep.name if ep else None, status, info.ttfb)
        spent = 0.0
        u = info.tokens or usage.Usage()
        if ep is not None and info.tokens is not None:
            spent = usage.cost(u, ep.price) if ep.price else 0.0
            self.stats.used(ep.name, u, spent)
            if info.session_id and status < 300:
                try:
                    self.conversations.record_turn(info, ep, u, self.stats)
                except Exception:  # noqa: BLE001 - what a turn teaches must never fail its answer
                    log.exception("router: could not record a conversation's turn")
        if not any(h.level <= logging.INFO for h in request_log.handlers or logging.getLogger().handlers):
            return  # nobody shows info lines: do not build one
        request_log.info(
            "router: " + json.dumps({
                "method": flow.request.method,
                "path": info.path,
                "endpoint": ep.name if ep else None,
                "attempts": policy.attempts_header(info.attempts),
                "status": status,
                "ttfb_ms": round(1000 * info.ttfb, 1) if info.ttfb is not None else None,
                "duration_ms": round(1000 * (time.monotonic() - info.started), 1),
                "input_tokens": u.input_tokens,
                "output_tokens": u.output_tokens,
                "cache_read_tokens": u.cache_read_input_tokens,
                "cache_write_tokens": u.cache_creation_input_tokens,
                "cost_usd": round(spent, 6),
                **({"error": info.error} if info.error else {}),
                **({"reason": info.reason} if info.reason else {}),
            })
        )


def _drop(chunk: bytes) -> list[bytes]:
    """A request body stream that keeps nothing (an empty list: no chunk is sent on)."""
    return []


def _usage_of(answer: Answer) -> usage.Usage | None:
    """Token usage of a complete Messages answer (compressed or not); nothing else is parsed."""
    body = answer.body
    if coding := decoding.encoding_of(answer.headers):
        body = decoding.decoded(body, coding) or b""
    return usage.from_json(body) if b'"usage"' in body else None


def _redact_credentials(req: http.Request) -> None:
    """Replace the client's credentials in a flow's request (shown, saved and replayable)."""
    for name in CREDENTIAL_HEADERS:
        if name in req.headers:
            req.headers[name] = REDACTED


def _show_upstream(req: http.Request, info: RouteInfo) -> None:
    """Point the flow at the upstream request as sent (without URL credentials), for mitmweb,
    saved flows and logs."""
    if info.endpoint is None:
        return
    scheme, host, port, prefix = info.endpoint.shown_parts
    req.scheme, req.host, req.port = scheme, host, port
    req.path = prefix + (info.target if info.target.startswith("/") else "/" + info.target)


def _as_sent_by_client(flow: http.HTTPFlow) -> None:
    """A replayed routed flow: back to the URL the client asked for, without redacted keys
    (an endpoint with keys of its own serves it; one that needs the client's answers 401)."""
    url = (flow.metadata.get("router") or {}).get("client_url")
    if url:
        flow.request.url = url
    for name in CREDENTIAL_HEADERS:
        if flow.request.headers.get(name) == REDACTED:
            del flow.request.headers[name]


def _quiet_request_log() -> None:
    """Give the request log the root logger's handlers except mitmproxy's legacy add_log one."""
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ != "LegacyLogEvents"]
    if handlers:
        request_log.handlers = handlers
        request_log.propagate = False


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
