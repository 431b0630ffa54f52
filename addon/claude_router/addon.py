"""The mitmproxy addon: options, hooks and commands, gluing the router's pieces together.

Request path (all async, every wait bounded): the `request` hook checks the client's key, runs
the attempt loop (`routing`), then either sets a complete `flow.response` or parks the
still-unread winning response with the handoff server and re-points the flow at it, so
mitmproxy streams it to the client event by event (see `handoff`).
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit
from dataclasses import dataclass, field

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ProxyMode, RegularMode, ReverseMode, UpstreamMode
from mitmproxy.tls import ClientHelloData

from . import config, options, policy, usage
from .endpoints import Endpoint, parse_endpoints
from .errors import error_body
from .handoff import HandoffServer, Parked
from .health import Breaker, HealthStore, MemoryHealthStore
from .policy import Attempt
from .redis_store import RedisHealthStore, redacted
from .routing import Answer, Request, Routing, Settings, Winner
from .status import Stats, table
from .upstream import Upstream, UpstreamError, request_headers

log = logging.getLogger("claude_router")
# One line per request goes here. It skips mitmproxy's legacy `add_log` hook (one more hook
# dispatch through every addon for each line, the largest per-request cost of logging) but
# keeps the terminal and mitmweb's event log; see `_quiet_request_log`.
request_log = logging.getLogger("claude_router.requests")

ADMIN_PREFIX = "/_router/"
RELOAD_EVERY = 0.5  # seconds between checks of the config file


@dataclass
class RouteInfo:
    """What the router did with a flow, for the handoff, logs and stats. Kept by the router,
    not in flow.metadata, which mitmproxy must be able to save (and which is shown)."""

    path: str  # the client's path, without the query
    url: str
    content: bytes | None
    content_length: str | None
    endpoint: Endpoint | None
    attempts: list[Attempt]
    started: float
    ttfb: float | None = None
    handoff_path: str = ""
    tokens: usage.Usage | None = None
    logged: bool = field(default=False)


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

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.file.endpoints if self.file else self.option_endpoints

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
            self.store.breaker = self._breaker()
        if updated & {"router_redis_url", "router_key_prefix"}:
            self._replace_store(self._make_store())
        if updated & {"router_endpoints", "router_config", "router_redis_url", "router_key_prefix"}:
            self.store.track(ep.name for ep in self.endpoints)
        if updated & (options.ALL - {"router_endpoints", "router_hosts", "router_redis_url",
                                     "router_key_prefix", "router_config", "router_client_keys"}):
            self.settings = self._settings()
        if updated & {"router_config", "router_client_keys", "router_endpoints", "listen_host", "mode"}:
            self._refuse_open_keys(self.endpoints, self.client_keys)
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
        keys = []
        for i, ref in enumerate(ctx.options.router_client_keys):
            if not ref.strip():
                # An empty key would let in every client that sends none (an unset variable).
                raise exceptions.OptionsError(f"router_client_keys[{i}] is empty")
            if ref.startswith("env:"):
                value = os.environ.get(ref[4:], "")
                if not value:
                    raise exceptions.OptionsError(
                        f"router_client_keys[{i}]: environment variable {ref[4:]} is not set")
                ref = value
            keys.append(ref.encode())
        if file:
            keys += [k.encode() for k in file.client_keys]
        return tuple(keys)

    def _refuse_open_keys(self, endpoints: tuple[Endpoint, ...], client_keys: tuple[bytes, ...]) -> None:
        """Upstream keys behind an open door would let anyone on the network spend them."""
        if not any(ep.key for ep in endpoints) or client_keys:
            return
        hosts = [getattr(ctx.options, "listen_host", "127.0.0.1")]
        for spec in getattr(ctx.options, "mode", ()):  # e.g. reverse:https://x@0.0.0.0:8080
            try:
                hosts.append(ProxyMode.parse(spec).custom_listen_host or hosts[0])
            except ValueError:
                pass
        host = next((h for h in hosts if not _is_loopback(h)), None)
        if host is not None:
            raise exceptions.OptionsError(
                f"endpoints hold their own keys but no router_client_keys are set, and the router "
                f"listens on {host or 'every interface'}: set router_client_keys (or client_keys "
                f"in the config file), or listen on 127.0.0.1")

    def _settings(self) -> Settings:
        opts = ctx.options
        if opts.router_all_cooling not in ("refuse", "try"):  # mitmproxy does not enforce choices
            raise exceptions.OptionsError(
                f"router_all_cooling must be refuse or try, got {opts.router_all_cooling!r}")
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
        db = urlsplit(url).path.strip("/")
        if url.startswith("redis") and db and not db.isdigit():
            # redis-py would quietly use database 0.
            raise exceptions.OptionsError(
                f"router_redis_url: the database must be a number, got {db!r} in {redacted(url)!r}")
        try:
            return RedisHealthStore(url, self._breaker(), prefix=ctx.options.router_key_prefix,
                                    clock=self.clock)
        except ValueError as e:
            raise exceptions.OptionsError(f"Cannot use router_redis_url {redacted(url)!r}: {e}") from None

    def _replace_store(self, store: HealthStore) -> None:
        old, self.store = self.store, store
        try:
            self._spawn(old.close())
        except RuntimeError:  # no loop yet (start-up): nothing was opened
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def running(self) -> None:
        # Sync on purpose: mitmproxy may invoke `running` synchronously for a late-loaded script.
        _quiet_request_log()
        self._spawn(self._announce())
        if ctx.options.router_config and self._watcher is None:
            self._watcher = self._spawn(self._watch_config())

    async def _announce(self) -> None:
        if not self.endpoints:
            log.warning("router: no endpoints configured; requests pass through unrouted")
            return
        if isinstance(self.store, RedisHealthStore):
            await self.store.wait_synced(timeout=2.0)  # so the first log line tells the truth
        names = ", ".join(f"{ep.index}:{ep.name}" for ep in self.endpoints)
        log.info(f"router: {len(self.endpoints)} endpoints in price order ({names}), "
                 f"health store: {self.store.description}")
        if any(ep.key for ep in self.endpoints) and not self.client_keys:
            log.warning("router: endpoints hold keys and no client keys are set: any local "
                        "process that reaches the router can use them")

    async def done(self) -> None:
        if self._watcher:
            self._watcher.cancel()
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
            self.store.track(ep.name for ep in self.endpoints)
            log.info(f"router: config reloaded from {path}: "
                     f"{', '.join(ep.name for ep in self.endpoints)}")

    def _spawn(self, coro) -> asyncio.Task:
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
        try:
            await self._handle(flow)
        except Exception:
            # Never let a routed request fall through to mitmproxy's own upstream connection.
            log.exception("router: internal error")
            self._reply(flow, 500, error_body(500, "the router failed internally"))

    async def _handle(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.method == "HEAD" and req.path == "/":
            # Claude Code's reachability check: answer it here, no upstream needed.
            flow.response = http.Response.make(200, b"", {"content-type": "text/plain"})
            return
        if self.client_keys and not self._authorized(req):
            self._reply(flow, 401, error_body(401, "a valid router client key is required "
                                              "(x-api-key or Authorization: Bearer)"))
            return
        if req.path.startswith(ADMIN_PREFIX):
            await self._admin(flow)
            return
        # Route in a task of its own, so that a client that leaves stops its upstream attempts
        # at once (client_disconnected cancels it) instead of when they end.
        routing = asyncio.get_running_loop().create_task(self._route(flow))
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
            self._reply(flow, 500, error_body(500, "the router failed internally"))

    def client_disconnected(self, client) -> None:
        for task in self._routing.pop(client.id, ()):
            task.cancel()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        info = self._handed_off.pop(flow.id, None)
        if info is None:
            return
        # Show the real upstream request in mitmweb instead of the loopback hop.
        req = flow.request
        req.url = info.url
        req.raw_content = info.content
        if info.content_length is not None:
            req.headers["content-length"] = info.content_length
        flow.response.stream = True

    def error(self, flow: http.HTTPFlow) -> None:
        info = self._handed_off.pop(flow.id, None)
        if info is not None:
            self.handoff.discard(info.handoff_path)

    # -- access ----------------------------------------------------------------------------

    def _authorized(self, req: http.Request) -> bool:
        presented = req.headers.get("x-api-key", "")
        auth = req.headers.get("authorization", "")
        if not presented and auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
        given = presented.encode("utf-8", "surrogateescape")  # headers may hold any bytes
        return any(hmac.compare_digest(given, key) for key in self.client_keys)

    async def _admin(self, flow: http.HTTPFlow) -> None:
        """The router's own pages, never forwarded upstream."""
        page = flow.request.path[len(ADMIN_PREFIX):].split("?")[0]
        if page == "status":
            body = json.dumps(await self.status_document(), indent=2).encode()
            self._reply(flow, 200, body)
        elif page == "metrics":
            self._reply(flow, 200, self.stats.metrics(), "text/plain; version=0.0.4")
        else:
            self._reply(flow, 404, error_body(404, "unknown router page; try /_router/status "
                                              "or /_router/metrics"))

    async def status_document(self) -> dict:
        await self.store.view()
        return self.stats.document(self.endpoints, self.store.current(), self.clock(),
                                   set(self.store.disabled), self.store.description)

    def _reply(self, flow: http.HTTPFlow, status: int, body: bytes,
               content_type: str = "application/json") -> None:
        flow.response = http.Response.make(status, body, {"content-type": content_type})

    # -- routing ---------------------------------------------------------------------------

    async def _route(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        started = time.monotonic()
        request = Request(req.method, req.path, request_headers(req.headers.items(multi=True)),
                          req.raw_content or b"")
        result = await self.routing.route(self.endpoints, self.store, self.settings, request)
        self.stats.attempts(result.attempts, result.counted)
        for name in result.trips:
            self.stats.trip(name)
            log.warning(f"router: endpoint {name} put in cooldown")
        w = result.winner
        ep = w.endpoint if w else result.answer.endpoint
        info = RouteInfo(
            path=req.path.split("?")[0],
            url=ep.shown_url_for(req.path) if ep else req.url,
            content=req.raw_content,
            content_length=req.headers.get("content-length"),
            endpoint=ep,
            attempts=result.attempts,
            started=started,
            ttfb=time.monotonic() - started,
        )
        flow.metadata["router"] = {"endpoint": ep.name if ep else None,
                                   "attempts": policy.attempts_header(result.attempts)}
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
            flow.request.url = info.url
            if answer.status < 300 and len(answer.body) < 1 << 20 and b'"usage"' in answer.body:
                info.tokens = usage.from_json(answer.body)  # Messages answers; nothing else is parsed
        fields = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers + self._route_headers(info)
            if k.lower() != "content-length"
        ]
        response = http.Response.make(answer.status, b"", fields)
        if answer.reason:
            response.reason = answer.reason
        response.raw_content = answer.body  # raw: any content-encoding passes through untouched
        length = head_length if flow.request.method == "HEAD" and head_length is not None else len(answer.body)
        response.headers["content-length"] = str(length)
        flow.response = response
        self._finish(flow, info, answer.status)

    async def _stream(self, flow: http.HTTPFlow, w: Winner, info: RouteInfo) -> None:
        """Park the winning response with the handoff server and point the flow at it."""
        parked = Parked(
            status=w.resp.status,
            reason=w.resp.reason,
            headers=w.resp.headers + self._route_headers(info),
            body=self._body(flow, w, info),
            close=w.resp.close,
            length=w.resp.length,
            event_stream=w.resp.is_event_stream,
            client=flow.client_conn.id,
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

    async def _body(self, flow: http.HTTPFlow, w: Winner, info: RouteInfo) -> AsyncIterator[bytes]:
        """The rest of a streamed body, reading token usage on the way. A failure after content
        reached the client counts against the endpoint (the handoff then ends the client's
        stream with an error event)."""
        meter = usage.StreamUsage() if w.resp.is_event_stream else None
        # A Messages stream must end with message_stop; one that just stops lost its tail.
        must_stop = meter is not None and b"message_start" in w.prefix
        counted = False

        def seen(chunk: bytes) -> None:
            nonlocal counted
            if meter is not None:
                meter.feed(chunk)  # parses event names: text inside a message cannot fool it
                if meter.errored and not counted:
                    counted = True
                    self._spawn(self.store.record_failure(w.endpoint.name))

        try:
            if w.prefix:
                seen(w.prefix)
                yield w.prefix
            async for chunk in w.resp.chunks():
                seen(chunk)
                yield chunk
            if must_stop and not meter.stopped and not meter.errored:
                raise UpstreamError("reset", "stream ended before message_stop")
        except UpstreamError:
            if not counted:
                self._spawn(self.store.record_failure(w.endpoint.name))
            raise
        finally:
            info.tokens = meter.usage if meter else None
            self._finish(flow, info, w.resp.status)

    def _route_headers(self, info: RouteInfo) -> list[tuple[str, str]]:
        ep = info.endpoint
        headers = [("X-Router-Attempts", policy.attempts_header(info.attempts))] if info.attempts else []
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
            })
        )

    # -- commands (mitmproxy console and mitmweb's command bar) ---------------------------

    @command.command("router.status")
    def cmd_status(self) -> str:
        """The endpoints in price order with their health, traffic, tokens and cost."""
        doc = self.stats.document(self.endpoints, self.store.current(), self.clock(),
                                  set(self.store.disabled), self.store.description)
        return table(doc)

    @command.command("router.reset")
    def cmd_reset(self, endpoint: str = "") -> None:
        """Clear the health of one endpoint, or of all: failures and cooldowns are forgotten."""
        self._known(endpoint, allow_empty=True)
        self._spawn(self.store.reset(endpoint or None))
        log.info(f"router: health reset for {endpoint or 'every endpoint'}")

    @command.command("router.disable")
    def cmd_disable(self, endpoint: str) -> None:
        """Take an endpoint out of rotation until router.enable (on every instance in Redis mode)."""
        self._known(endpoint)
        self._spawn(self.store.set_disabled(endpoint, True))
        log.info(f"router: endpoint {endpoint} disabled")

    @command.command("router.enable")
    def cmd_enable(self, endpoint: str) -> None:
        """Put a disabled endpoint back into rotation."""
        self._known(endpoint)
        self._spawn(self.store.set_disabled(endpoint, False))
        log.info(f"router: endpoint {endpoint} enabled")

    def _known(self, name: str, allow_empty: bool = False) -> None:
        if (allow_empty and not name) or any(ep.name == name for ep in self.endpoints):
            return
        raise exceptions.CommandError(
            f"no endpoint {name!r}; endpoints: {', '.join(ep.name for ep in self.endpoints)}")


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


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
