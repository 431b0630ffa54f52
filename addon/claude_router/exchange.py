"""One routed exchange: a client's request and the router's answer to it, from the request's
head to the last byte of the answer. The addon's hooks (`addon.Router`) call in here; the
router's configuration (endpoints, keys, store, settings, limits) is read from it as each
request comes, so a reload or an option change applies to the next request.

The walk: `head` (from ``requestheaders``) checks the client's key and the body's announced
size, answering a refusal from the head (`_refuse_early`), and takes over a body mitmproxy
would stream (`_collect`); `request` routes the whole request (`_handle`: who it is, what may
be sent, the client's limits; `_route`: the attempt loop of `routing`), then either sets a
complete `flow.response` (`_answer`) or parks the still-unread winning response with the
handoff server and re-points the flow at it (`_stream`), so mitmproxy streams it to the
client event by event (see `handoff`); `response_headers` shows the real upstream request in
place of that loopback hop. `_finish`, once per request, counts it: stats, the client's
spend, what the turn teaches the conversation, the ledger's row and one log line.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from . import (
    access,
    admin,
    clients,
    compat,
    count_tokens,
    dashboard,
    decoding,
    ledger as ledgers,
    policy,
    sessions,
    tiers,
    usage,
)
from .admin import reply
from .connections import Collector, Delivery
from .conversations import Turn
from .endpoints import CREDENTIAL_HEADERS, REDACTED, Endpoint
from .errors import error_body
from .handoff import Parked
from .health import HEALTHY, Phase, phase
from .policy import Attempt
from .redis_store import RedisHealthStore
from .requests import Refused, split_tier, unsendable, upstream_target
from .routing import Answer, Request, Winner
from .slots import Lease
from .upstream import UpstreamError, request_headers

if TYPE_CHECKING:
    from .addon import Router

log = logging.getLogger("claude_router")
# One line per request goes here. It skips mitmproxy's legacy `add_log` hook (one more hook
# dispatch through every addon for each line, the largest per-request cost of logging) but
# keeps the terminal and mitmweb's event log; see `quiet_request_log`.
request_log = logging.getLogger("claude_router.requests")

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
    session_id: Turn | None = None  # the conversation (conversations.Turn), and what it was before
    session: sessions.Session | None = None
    ttl: float = 0.0
    asked_at: float = 0.0  # wall clock when the request came
    reason: str = ""
    error: str = ""  # what broke a stream after it reached the client
    client: str = clients.UNNAMED  # whose request (the client's name, never its key)
    model: str | None = None  # the model the client asked for
    session_hash: str | None = None  # for the ledger: a hash of the conversation's id


class Exchange:
    """The router's per-request work, and the requests it has in hand."""

    def __init__(self, router: "Router") -> None:
        self.router = router
        self._admitted: dict[str, str] = {}  # flow id -> client name, until its answer is complete
        self._routing: dict[str, set[asyncio.Task]] = {}  # client connection id -> routing tasks
        self._handed_off: dict[str, RouteInfo] = {}  # flow id -> route, until its headers pass
        self._leases: dict[str, Lease] = {}  # flow id -> its endpoint slot, until its answer ends

    # -- the request's head and body -----------------------------------------------------------

    async def head(self, flow: http.HTTPFlow) -> None:
        """A routed request's head (``requestheaders``): refusals that need no body, and a
        body to be read as it streams."""
        r = self.router
        req = flow.request
        basic = dashboard.uses_basic(req.path)  # a browser's Basic auth: the dashboard's paths only
        keyed = not r.client_keys or access.authorized(req.headers, r.client_keys, basic)
        if access.answered_here(req.method, req.path, (ep.name for ep in r.endpoints), keyed):
            pass  # a HEAD answered in `request`: the same for every path without a key
        elif not keyed:
            await self._refuse_early(flow, 401, error_body(401, access.KEY_REQUIRED),
                                     dashboard.challenge(req.path))
            r.heads.body_started(flow.client_conn.id, flow.id)
            return
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > r.body_limit:
            await self._refuse_early(flow, 413, error_body(
                413, f"the request body ({int(length):,} bytes) is over the router's limit of "
                     f"{r.body_limit:,} bytes (router_max_body_mb)", "request_too_large"))
            r.heads.body_started(flow.client_conn.id, flow.id)
            return
        # A routed request is routed whole. A body mitmproxy would stream (stream_large_bodies
        # set req.stream already, or sets it once the buffered part passes that size) would
        # go to the flow's own host before the request hook, with the client's key; and a body
        # of unknown size (chunked, HTTP/2 without content-length) is only measured as it
        # arrives. Both are read here as they stream, counted against the limit.
        if req.stream or _unannounced_body(req):
            await self._collect(flow)
        if req.stream or (length.isdigit() and int(length) > 0):
            r.heads.body_started(flow.client_conn.id, flow.id)

    async def _collect(self, flow: http.HTTPFlow) -> None:
        """Read the body as mitmproxy streams it: keep it (for `request`, which routes it) up
        to the limit, and answer 413 as soon as it crosses it, dropping the rest. mitmproxy
        sends a streamed request's head at once, to the flow's host: the head is re-pointed at
        a pending answer of the handoff server, which `request` (or the 413) makes."""
        handoff = self.router.handoff
        req = flow.request
        port, path, answer = await handoff.pending(flow.client_conn.id,
                                                   multiplexed=flow.client_conn.alpn == b"h2")
        collector = Collector(self.router.body_limit, lambda size: self._over_limit(flow, collector))
        d = req.data
        collector.origin = (d.scheme, d.host, d.port, d.path, d.authority, req.headers.copy())
        collector.path, collector.answer = path, answer
        req.scheme, req.host, req.port, req.path = "http", handoff.host, port, path
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"
        req.stream = collector

    def _over_limit(self, flow: http.HTTPFlow, collector: Collector) -> None:
        """A streaming body crossed the limit (sync, from mitmproxy's stream callable)."""
        body = error_body(413, f"the request body is over the router's limit of {self.router.body_limit:,} "
                               f"bytes (router_max_body_mb)", "request_too_large")
        collector.origin = ()  # (it holds the client's key)
        _redact_credentials(flow.request)
        flow.metadata["router_refused"] = 413  # the request hook leaves it to mitmproxy
        flow.comment = "answered 413 by the router as the body crossed the limit; body dropped"
        if collector.answer is not None and not collector.answer.done():
            collector.answer.set_result(Parked(
                status=413, reason="", headers=[("content-type", "application/json")],
                body=_once(body), close=lambda: None, length=len(body), client=flow.client_conn.id,
                keep_open=True))

    def _restore(self, flow: http.HTTPFlow, collector: Collector) -> None:
        """The client's request again, with the body the collector read (if it streamed)."""
        req = flow.request
        d = req.data
        d.scheme, d.host, d.port, d.path, d.authority, headers = collector.origin
        headers.pop("expect", None)  # (mitmproxy answered a 100-continue itself)
        req.headers = headers
        req.stream = False
        if collector.streamed:
            req.raw_content = collector.body()
            collector.chunks.clear()
        else:  # the body came with the head (HTTP/2 end of stream): mitmproxy buffered it
            self.router.handoff.discard(collector.path)

    def _deliver(self, flow: http.HTTPFlow, collector: Collector) -> None:
        """Give the handoff listener, which holds the streamed request's head, its answer:
        the response the router parked for the flow, or the one it set on it."""
        answer = collector.answer
        if answer is None or answer.done():
            return
        info = self._handed_off.get(flow.id)
        parked = self.router.handoff.take(info.handoff_path) if info is not None else None
        r = flow.response
        if parked is None and r is not None:
            raw = r.raw_content or b""
            length = r.headers.get("content-length", "")
            parked = Parked(
                status=r.status_code, reason=r.reason,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.headers.fields],
                body=_once(raw), close=lambda: None, client=flow.client_conn.id,
                length=int(length) if flow.request.method == "HEAD" and length.isdigit() else len(raw))
            flow.response = None  # (mitmproxy reads it from the handoff listener)
        if parked is None:
            body = error_body(500, "the router failed internally")
            parked = Parked(status=500, reason="", headers=[("content-type", "application/json")],
                            body=_once(body), close=lambda: None, length=len(body),
                            client=flow.client_conn.id)
        answer.set_result(parked)

    async def _refuse_early(self, flow: http.HTTPFlow, status: int, body: bytes,
                            headers: Sequence[tuple[str, str]] = ()) -> None:
        """Answer from the request head, before the body is taken in: mitmproxy streams the
        body into a sink that drops it as it arrives (so a 256 MiB upload costs no memory) and
        fetches this answer from the handoff server. A client that sends its whole body before
        it reads gets the answer once it has; none is left hanging."""
        _redact_credentials(flow.request)

        async def once() -> AsyncGenerator[bytes, None]:
            yield body

        handoff = self.router.handoff
        parked = Parked(status=status, reason="", headers=[("content-type", "application/json"), *headers],
                        body=once(), close=lambda: None, length=len(body), client=flow.client_conn.id,
                        keep_open=True)
        port, path = await handoff.park(parked, multiplexed=flow.client_conn.alpn == b"h2")
        flow.metadata["router_refused"] = status  # the request hook leaves it to mitmproxy
        req = flow.request
        req.scheme, req.host, req.port, req.path = "http", handoff.host, port, path
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"
        req.stream = _drop
        flow.comment = f"answered {status} by the router from the request head; body dropped"

    # -- the whole request ---------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        """The whole request (``request``): routed, answered or parked, never let through."""
        if flow.metadata.get("router_refused"):
            return  # answered from its head; mitmproxy fetches the answer from the handoff
        collector = flow.request.stream if isinstance(flow.request.stream, Collector) else None
        if collector is not None:
            self._restore(flow, collector)  # the body it read, streamed through (`_collect`)
        try:
            if flow.response or flow.error or not flow.live or not self.router.routes(flow):
                return
            try:
                if flow.is_replay:
                    _as_sent_by_client(flow)
                await self._handle(flow)
            except Exception:
                # Never let a routed request fall through to mitmproxy's own upstream connection.
                log.exception("router: internal error")
                reply(flow, 500, error_body(500, "the router failed internally"))
        finally:
            if collector is not None and collector.streamed:
                self._deliver(flow, collector)

    async def _handle(self, flow: http.HTTPFlow) -> None:
        r = self.router
        req = flow.request
        basic = dashboard.uses_basic(req.path)  # a browser's Basic auth: the dashboard's paths only
        keyed = not r.client_keys or bool(flow.is_replay) or access.authorized(req.headers, r.client_keys, basic)
        if access.answered_here(req.method, req.path, (ep.name for ep in r.endpoints), keyed):
            # Claude Code's reachability check (and every HEAD without a key, whatever its
            # path, so that none tells which endpoint names exist): answered here.
            _redact_credentials(req)
            flow.response = http.Response.make(200, b"", {"content-type": "text/plain"})
            return
        # (replays are the operator's, from mitmweb or -C; their keys were redacted)
        who = access.who(req.headers, r.clients, basic) if r.client_keys and not flow.is_replay \
            else clients.ANONYMOUS
        if who is None:
            reply(flow, 401, error_body(401, access.KEY_REQUIRED))
            assert flow.response is not None  # (reply set it)
            flow.response.headers.update(dashboard.challenge(req.path))
            return
        if req.path.startswith(admin.PREFIX):
            _redact_credentials(req)
            is_admin = access.is_admin(who, r.admin_keys)
            await r.admin.page(flow, who, may_admin=is_admin or not r.admin_keys, sees_all=is_admin)
            return
        problem = unsendable(req.data.method, req.headers.fields)
        pinned, raw_target = split_tier(req.data.path, {ep.name for ep in r.endpoints})
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
        if len(req.raw_content or b"") > r.body_limit:  # a chunked body, now read
            _redact_credentials(req)
            reply(flow, 413, error_body(413, f"the request body is over the router's limit of "
                                              f"{r.body_limit:,} bytes (router_max_body_mb)",
                                              "request_too_large"))
            return
        if pinned is not None and not who.allows(pinned):
            # Not a limit (nothing to wait for) and not the key (401/403 send Claude Code's
            # user to /login): the request, as made, cannot be served.
            _redact_credentials(req)
            reply(flow, 400, error_body(400, f"{who.label} may not use endpoint {pinned} "
                                             f"(allowed: {', '.join(who.endpoints or ())})"))
            return
        if refusal := r.accounts.admit(who):
            # Refused before routing: no endpoint is tried, none is blamed.
            _redact_credentials(req)
            reply(flow, 429, error_body(429, refusal.message, "rate_limit_error"))
            assert flow.response is not None  # (reply set it)
            flow.response.headers["retry-after"] = str(refusal.retry_after)
            if refusal.final:
                flow.response.headers["x-should-retry"] = "false"
            flow.comment = f"refused 429 by {who.label}'s {refusal.reason} limit"
            if r.ledger is not None:
                r.ledger.add(ledgers.Row(r.clock(), who.label, None, None, None, "", 429,
                                         reason=refusal.reason))
            return
        self._admitted[flow.id] = who.label
        flow.metadata["router"] = {"client_url": req.url}  # what a replay must route again
        # Route in a task of its own, so that a client that leaves stops its upstream attempts
        # at once (client_disconnected cancels it) instead of when they end.
        routing = asyncio.get_running_loop().create_task(self._route(flow, target, pinned, who))
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
            if flow.id not in self._handed_off:  # no stream to come: in flight no more
                self._release(flow)
        if routing.cancelled():
            return  # the client is gone; mitmproxy closes the flow
        if routing.exception() is not None:
            log.error("router: internal error while routing", exc_info=routing.exception())
            reply(flow, 500, error_body(500, "the router failed internally"))

    # -- after routing ---------------------------------------------------------------------------

    def response_headers(self, flow: http.HTTPFlow) -> None:
        """A parked answer's head reached mitmproxy (``responseheaders``)."""
        info = self._handed_off.pop(flow.id, None)
        if info is None:
            return
        # Show the real upstream request in mitmweb instead of the loopback hop.
        req = flow.request
        _show_upstream(req, info)
        req.raw_content = info.content
        if info.content_length is not None:
            req.headers["content-length"] = info.content_length
        assert flow.response is not None  # (its headers just came)
        flow.response.stream = True

    def failed(self, flow: http.HTTPFlow) -> None:
        """The flow ended in an error (``error``): no longer in flight, its parked answer dropped."""
        self._release(flow)
        info = self._handed_off.pop(flow.id, None)
        if info is not None:
            self.router.handoff.discard(info.handoff_path)

    def client_left(self, client_id: str) -> None:
        """The client's connection closed (``client_disconnected``): its routing stops."""
        for task in self._routing.pop(client_id, ()):
            task.cancel()

    # -- routing ---------------------------------------------------------------------------------

    def _release(self, flow: http.HTTPFlow) -> None:
        """The client's request is no longer in flight (once, whichever way it ended)."""
        label = self._admitted.pop(flow.id, None)
        if label is not None:
            self.router.accounts.release(label)
        if (lease := self._leases.pop(flow.id, None)) is not None:
            lease.release()

    async def _route(self, flow: http.HTTPFlow, target: str, pinned: str | None = None,
                     who: clients.Client = clients.ANONYMOUS) -> None:
        r = self.router
        req = flow.request
        # A client with an allow-list sees only its endpoints, everywhere (tiers, /v1/models).
        endpoints = r.endpoints if who.endpoints is None else tuple(
            ep for ep in r.endpoints if who.allows(ep.name))
        started = time.monotonic()
        asked_at = r.clock()
        request = Request(req.method, target, request_headers(req.headers.items(multi=True)),
                          req.raw_content or b"")
        # Whose request it is (a keyed hash): health and conversations are scoped by it.
        store = r.store
        salt = await store.shared_salt() if isinstance(store, RedisHealthStore) else store.salt
        owner = access.credential_id(access.presented_key(req.headers), salt)
        # The flow kept for mitmweb, -w files and replays never holds the client's key.
        _redact_credentials(req)
        sid, prev, ttl, choose = await r.conversations.place(request, target, endpoints,
                                                             owner=owner, pinned=pinned is not None)
        # Its slot at the endpoint it is sent to (max_concurrency), and its place in a tier:
        # back to its conversation's endpoint, else spread by weight (see tiers, slots).
        lease = self._leases[flow.id] = r.slots.lease(prev.endpoint if prev else None, tiers.spreads(
            r.conversations.strategy, endpoints))
        path = target.split("?")[0]
        if req.method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")) and any(
                ep.profile.models or ep.profile.model_map for ep in endpoints):
            # Answered from every endpoint's list, in client ids (one id too: it may be mapped).
            listing = Request("GET", "/v1/models", request.headers, b"")
            result = await r.routing.models(endpoints, r.store, r.settings, listing,
                                            one=path[len("/v1/models/"):] or None)
        elif count_tokens.applies(req.method, target):  # one attempt, else a fast 404
            result = await r.routing.route(endpoints, r.store, count_tokens.settings(r.settings), request,
                                           pinned, choose, credential=owner, lease=lease, side=True)
            if result.answer is not None and result.winner is None and result.answer.status >= 300:
                result.answer = count_tokens.answer(result.answer)
        else:
            result = await r.routing.route(endpoints, r.store, r.settings, request,
                                           pinned, choose, credential=owner, lease=lease)
        r.stats.attempts(result.attempts, result.counted)
        r.balances.noticed(result.attempts)  # a 402 or billing_error: poll that balance now
        for name in result.trips:
            self._tripped(name)
        w, answer = result.winner, result.answer
        if w is None and answer is None:  # never: a result holds a winner or an answer
            raise RuntimeError("routing gave neither a winner nor an answer")
        ep = w.endpoint if w is not None else answer.endpoint if answer is not None else None
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
            client=who.label,
            # (bounded: the client's own text goes to the ledger)
            model=request.model[:64] if request.body and request.model else None,
            session_hash=_hashed_session(request) if r.ledger is not None else None,
        )
        flow.metadata["router"].update(endpoint=ep.name if ep else None,
                                       attempts=policy.attempts_header(result.attempts))
        where = f"routed to {ep.name} (index {ep.index})" if ep else "answered by the router"
        flow.comment = f"{where}; attempts: {policy.attempts_header(result.attempts) or 'none'}"
        if w is None:
            assert answer is not None  # (checked above)
            self._answer(flow, answer, info)
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
        handoff = self.router.handoff
        delivery = Delivery(CLIENT_STALL)
        lease = self._leases.get(flow.id)

        def close() -> None:  # served, cut or dropped: the endpoint's slot is free again
            w.resp.close()
            if lease is not None:
                lease.release()

        length = None if w.rewritten else w.resp.length
        if length is not None and length > 4 * self.router.body_limit:
            length = None  # sent chunked: mitmproxy's body_size_limit backstop is for requests
        parked = Parked(
            status=w.resp.status,
            reason=w.resp.reason,
            headers=w.resp.headers + self._route_headers(info),
            body=self._body(flow, w, info, delivery),
            close=close,
            length=length,
            event_stream=w.resp.is_event_stream,
            client=flow.client_conn.id,
            delivery=delivery,
        )
        port, path = await handoff.park(parked, multiplexed=flow.client_conn.alpn == b"h2")
        info.handoff_path = path
        self._handed_off[flow.id] = info
        req = flow.request
        req.scheme, req.host, req.port, req.path = "http", handoff.host, port, path
        # The upstream already has the body; the loopback hop needs none.
        req.raw_content = b""
        req.headers.pop("transfer-encoding", None)
        req.headers["content-length"] = "0"

    async def _body(self, flow: http.HTTPFlow, w: Winner, info: RouteInfo,
                    delivery: Delivery) -> AsyncGenerator[bytes, None]:
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
            if meter is not None and decoder is not None:  # (one is set with the other)
                meter.feed(decoder.feed(chunk))  # parses event names: text in a message cannot fool it
                if meter.errored and not counted:
                    counted = True
                    self._midstream_failure(name, "stream_error", "error event mid-stream")

        try:
            if w.prefix:
                seen(w.prefix)
                yield w.prefix
            inflater = w.inflater  # a coded stream rewritten decoded: the rest goes decoded too
            async for chunk in w.resp.chunks():
                if inflater is None:
                    seen(chunk)
                    yield chunk
                    continue
                for piece in inflater.feed(chunk):
                    seen(piece)
                    yield piece
                if inflater.broken:
                    raise UpstreamError("bad_response", "its compressed stream could not be decoded")
            if (must_stop and meter is not None and not meter.stopped and not meter.errored
                    and not (decoder and decoder.broken)):
                raise UpstreamError("reset", "stream ended before message_stop")
        except UpstreamError as e:
            info.error = f"mid-stream: {e.detail}"
            if not counted and e.kind != "local":  # (the router's own trouble blames nobody)
                if delivery.stalled_recently(time.monotonic()):
                    self.router.stats.client_stalled(name)
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
        r = self.router
        r.stats.midstream(name, kind, detail)

        async def record() -> None:
            before = phase(r.store.current().get(name, HEALTHY), r.clock())
            after = await r.store.record_failure(name)
            if before is not Phase.COOLING and phase(after, r.clock()) is Phase.COOLING:
                self._tripped(name)

        r.spawn(record())

    def _tripped(self, name: str) -> None:
        endpoint, _, family = name.partition("~")
        self.router.stats.trip(endpoint)
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
        self._release(flow)
        r = self.router
        ep = info.endpoint
        r.stats.answered(ep.name if ep else None, status, info.ttfb)
        spent = 0.0
        u = info.tokens or usage.Usage()
        if ep is not None and info.tokens is not None:
            spent = usage.cost(u, ep.price) if ep.price else 0.0
            r.stats.used(ep.name, u, spent)
            r.accounts.record(info.client, r.clock(), ep.name, info.model, u, spent)
            if info.session_id and status < 300:
                try:
                    r.conversations.record_turn(info, ep, u, r.stats)
                except Exception:  # noqa: BLE001 - what a turn teaches must never fail its answer
                    log.exception("router: could not record a conversation's turn")
        if r.ledger is not None:
            r.ledger.add(ledgers.Row(
                info.asked_at, info.client, info.session_hash, info.model, ep.name if ep else None,
                policy.attempts_header(info.attempts), status, u.input_tokens, u.output_tokens,
                u.cache_creation_input_tokens, u.cache_read_input_tokens, spent,
                info.reason or info.error or None))
        if not any(h.level <= logging.INFO for h in request_log.handlers or logging.getLogger().handlers):
            return  # nobody shows info lines: do not build one
        request_log.info(
            "router: " + json.dumps({
                "method": flow.request.method,
                "path": info.path,
                "client": info.client,
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


def quiet_request_log() -> None:
    """Give the request log the root logger's handlers except mitmproxy's legacy add_log one."""
    handlers = [h for h in logging.getLogger().handlers if not compat.is_legacy_log_handler(h)]
    if handlers:
        request_log.handlers = handlers
        request_log.propagate = False


def _hashed_session(request: Request) -> str | None:
    """The request's conversation for the ledger: a hash of its id (never the id itself), from
    Claude Code's session header or ``metadata.user_id``; not from a hash of the prompt, which
    would cost a pass over a large body for every request.

    Not `sessions.record_key`, which is scoped by credential and model family for the router's
    own records: the ledger keeps one plain hash per conversation, whatever model family each
    turn used, in the format of the rows already stored (16 hex digits)."""
    if request.method != "POST" or not request.body:
        return None
    doc = request.json
    sid = sessions.session_id(request.headers, {"metadata": doc.get("metadata")} if doc else None)
    return sessions.digest(sid, 16) if sid else None


def _drop(chunk: bytes) -> list[bytes]:
    """A request body stream that keeps nothing (an empty list: no chunk is sent on)."""
    return []


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


def _unannounced_body(req: http.Request) -> bool:
    """Does a body of unknown size follow this head: chunked (HTTP/1), or (HTTP/2 and 3) a
    request that may carry one without content-length?"""
    if "content-length" in req.headers:
        return False
    if req.http_version.startswith("HTTP/1"):
        return "transfer-encoding" in req.headers
    return req.method not in ("GET", "HEAD", "OPTIONS")


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
