"""The attempt loop: send one client request to endpoints in turn until one answers well.

Independent of mitmproxy: it takes the request's parts and returns either a response to
stream on (headers in, body partly read) or a complete answer for the client, plus the record
of attempts. Decisions come from `policy` and `sse`; I/O from `upstream` and the health store.
"""

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from . import decoding, policy, profiles, slots, sse, windows
from .balances import LOW_BALANCE
from .endpoints import Endpoint
from .errors import KNOWN_ERROR_TYPES, error_body, error_type_for
from .health import HEALTHY, Health, HealthStore, Phase, phase
from .policy import Attempt, Verdict
from .redaction import scrub, scrub_headers
from .requests import json_body
from .upstream import Timeouts, Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("claude_router")

BUFFER_LIMIT = 8 * 1024 * 1024  # a larger non-streaming body is streamed on, not held
ERROR_BODY_LIMIT = 256 * 1024
LOCAL_WARN_EVERY = 10.0  # seconds between warnings that the router itself is out of resources
KEY_ANSWERS = 4096  # keys whose last refusal is kept, to answer their next requests at once
HOLD_LIMIT = 256 * 1024  # bytes of a stream's opening held back while waiting for content
_BACKOFF_STATUSES = frozenset({429, 503, 529})
# Upstreams are asked not to compress, so the router can read errors, stream starts and usage.
_IDENTITY = ("accept-encoding", "identity")


@dataclass(frozen=True)
class Settings:
    connect_timeout: float = 10.0
    headers_timeout: float = 600.0  # non-streaming: to headers, and body silence
    stream_timeout: float = 120.0  # streaming: to headers, to first content, and silence
    max_attempts: int = 0  # 0: every endpoint
    deadline: float = 900.0  # for all attempts of one request together
    try_all_when_cooling: bool = False
    rules: Mapping[str, Verdict] = field(default_factory=lambda: dict(policy.DEFAULT_RULES))
    max_hint: float = 600.0  # cap on a cooldown asked for by Retry-After and the like
    window_cap: float = 18000.0  # cap on a cooldown until a subscription window reopens


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query, safe to append to an endpoint's URL (requests.upstream_target)
    headers: list[tuple[str, str]]  # end-to-end headers to forward
    body: bytes

    @cached_property
    def json(self) -> dict | None:
        """The body as a JSON object (a Messages request), parsed once; None otherwise."""
        return json_body(self.body)

    @property
    def streaming(self) -> bool:
        """Decided by the top-level ``"stream"`` field, never by bytes deeper in the body."""
        doc = self.json
        return doc is not None and doc.get("stream") is True

    @property
    def model(self) -> str | None:
        doc = self.json
        model = doc.get("model") if doc is not None else None
        return model if isinstance(model, str) else None

    def without_thinking(self) -> "Request | None":
        """This request with earlier turns' thinking blocks removed (see profiles)."""
        doc = self.json
        stripped = profiles.without_thinking(doc) if doc is not None else None
        if stripped is None:
            return None
        body = json.dumps(stripped, separators=(",", ":")).encode()  # ASCII: lone surrogates stay escaped
        return Request(self.method, self.path, self.headers, body)


@dataclass
class Answer:
    """A complete answer for the client (an upstream's error, or one the router made)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    endpoint: Endpoint | None = None

    def headers_lower(self) -> list[tuple[str, str]]:
        return [(k.lower(), v) for k, v in self.headers]


@dataclass
class Winner:
    """A good upstream response: headers in, ``prefix`` of the body read (all of it if
    ``complete``), the rest still on the wire."""

    endpoint: Endpoint
    resp: UpstreamResponse
    prefix: bytes
    complete: bool
    rewritten: bool = False  # the prefix was changed (the client's model id): its length differs
    # Set when a content-coded stream was decoded to be rewritten: it decodes the rest of the
    # body, which then reaches the client decoded (``resp.headers`` no longer name a coding).
    inflater: decoding.Inflater | None = None


@dataclass
class Result:
    attempts: list[Attempt]
    winner: Winner | None = None
    answer: Answer | None = None
    counted: list[bool] = field(default_factory=list)  # per attempt: did it count as a failure
    trips: list[str] = field(default_factory=list)  # endpoints this request put in cooldown
    reason: str = ""  # why the first endpoint tried was not the cheapest healthy one


@dataclass
class _Tried:
    verdict: Verdict | None  # None: success
    attempt: Attempt
    answer: Answer | None = None
    winner: Winner | None = None
    hint: float = 0.0  # seconds the endpoint asked us to stay away
    kind: tuple = ()  # what a client error looked like, to spot the same answer twice
    family_wide: bool = False  # a rate limit or overload of the model family, not the endpoint
    message: str = ""  # the upstream's error message (for signature rejections)
    window: float = 0.0  # seconds until a rejected subscription window reopens (windows)


class Routing:
    def __init__(self, upstream: Upstream, clock: Callable[[], float]) -> None:
        self.upstream = upstream
        self.clock = clock
        self._background: set[asyncio.Task] = set()
        self._local_warned = float("-inf")
        # The last answer that refused or limited each key (by its keyed hash), bounded.
        self._key_answers: OrderedDict[str, Answer] = OrderedDict()
        # Is an endpoint too low on balance to try (balances.Balances.is_low); none by default.
        self.is_low: Callable[[str], bool] = lambda name: False
        # Told when an endpoint asked to be left alone until a time (Retry-After, a rejected
        # window): the prober does not test it before then (probes.Prober.hold).
        self.on_hold: Callable[[str, float], None] | None = None

    def _warn_local(self, detail: str) -> None:
        """At most one warning per LOCAL_WARN_EVERY seconds: an exhausted router fails every
        request the same way, and its log must not add to the load."""
        now = self.clock()
        if now - self._local_warned >= LOCAL_WARN_EVERY:
            self._local_warned = now
            log.warning(f"router: {detail}: answering 529 without trying the endpoints, "
                        "none is blamed")

    def _release_probe(self, store: HealthStore, name: str) -> None:
        """Free a half-open probe whose request ended without an outcome for the endpoint
        (the client left, or the answer blamed nobody), so the next request may probe."""
        task = asyncio.get_running_loop().create_task(store.release_probe(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def route(self, endpoints: Sequence[Endpoint], store: HealthStore, settings: Settings,
                    req: Request, pinned: str | None = None,
                    choose: Callable[[list[Endpoint]], tuple[str, str] | None] | None = None,
                    credential: str | None = None, lease: slots.Lease | None = None,
                    side: bool = False) -> Result:
        """Try endpoints in price order (from ``pinned`` on, wrapping round, when the client
        chose a tier by path) until one answers well. ``choose`` may pick, among the usable
        endpoints, the one to try first (the cost strategy), saying why. ``credential`` (the
        keyed hash of the client's key) scopes what endpoints said about that key. ``lease``
        orders equal-priced endpoints by weight and holds the request's slot at each endpoint
        it tries (max_concurrency; see tiers and slots). ``side``: a request beside the
        conversation (count_tokens): what it meets changes no endpoint's health nor any key's
        cooldown, it takes no half-open probe and waits for no slot."""
        states = view = await store.view()
        secrets = tuple(s for ep in endpoints for s in ep.secrets)
        if disabled := store.disabled:
            endpoints = [ep for ep in endpoints if ep.name not in disabled]
        if pinned is not None:
            endpoints = policy.pinned_order(endpoints, pinned)
        model = req.model
        serving = [ep for ep in endpoints if ep.profile.serves(model)]
        skipped = [Attempt(ep.name, "skipped:model") for ep in endpoints if ep not in serving]
        if endpoints and not serving:
            return Result(skipped, answer=_no_model(model), counted=[False] * len(skipped))
        endpoints = serving
        fam = profiles.family(model)
        if fam is not None:
            view = policy.with_family(view, [ep.name for ep in endpoints], fam, self.clock())
        steps = policy.plan(endpoints, view, self.clock())
        if credential is not None and steps:
            for_key = policy.with_credential(view, [ep.name for ep in endpoints], credential,
                                             self.clock())
            if for_key is not view:
                steps = policy.plan(endpoints, for_key, self.clock())
                if not steps:
                    # Every usable endpoint refused or limited this very key lately: its
                    # answer again, at once, until the first of those cooldowns ends.
                    return Result(skipped, answer=self._key_refused(credential, endpoints, for_key),
                                  counted=[False] * len(skipped))
        if (low := [s for s in steps if self.is_low(s.endpoint.name)]) and len(low) < len(steps):
            # Skipped without blame; when every usable endpoint is low, all are tried: a low or
            # stale balance alone never makes the router refuse.
            # They stay last resorts, after every other, so a request is not lost to a balance.
            skipped += [Attempt(s.endpoint.name, LOW_BALANCE, "balance below min_usd") for s in low]
            steps = [s for s in steps if s not in low]
        else:
            low = []
        if side:
            steps = [s for s in steps if not s.probe]  # a free call proves nothing about capacity
        if not steps:
            if not endpoints:
                return Result(skipped, answer=_no_endpoint(), counted=[False] * len(skipped))
            if not settings.try_all_when_cooling:
                return Result(skipped, answer=await self._all_cooling(endpoints, store, view),
                              counted=[False] * len(skipped))
            steps = policy.fallback(endpoints)
        reason = ""
        if choose is not None and pinned is None and len(steps) > 1:
            picked = choose([s.endpoint for s in steps])
            if picked is not None and picked[0] != steps[0].endpoint.name:
                first = next(s for s in steps if s.endpoint.name == picked[0])
                steps = [first] + [s for s in steps if s is not first]
                reason = picked[1]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.deadline  # the slot's wait included
        if lease is not None and steps:
            wait = 0.0 if side else min(slots.QUEUE_WAIT, settings.deadline)
            arranged = await lease.arrange(steps, steps[0].endpoint.name if reason else None,
                                           pinned is not None, wait)
            if not arranged:  # every endpoint at its max_concurrency for the whole wait
                busy = skipped + [slots.busy(s.endpoint) for s in steps]
                return Result(busy, answer=_all_busy(), counted=[False] * len(busy))
            steps = arranged
        steps = steps + low
        cap = settings.max_attempts or len(endpoints)
        result = Result(list(skipped), counted=[False] * len(skipped), reason=reason)
        attempts = result.attempts
        tries = 0
        last: _Tried | None = None
        client_kinds: list[tuple] = []
        for step in steps:
            left = deadline - loop.time()
            if tries >= cap or left <= 0:
                break
            ep = step.endpoint
            if lease is not None and not lease.take(ep):
                attempts.append(slots.busy(ep))  # at its max_concurrency: skipped, blaming nobody
                result.counted.append(False)
                continue
            if step.probe and not await store.try_probe(ep.name):
                continue  # another request is probing it
            tries += 1
            try:
                tried = await self._try(ep, req, settings, left, secrets)
                if _signature_rejected(tried) and (stripped := req.without_thinking()) is not None:
                    # Another endpoint signed this conversation's thinking: once more here
                    # without those blocks, blaming nobody.
                    attempts.append(Attempt(ep.name, "thinking_signature", "rejected another "
                                            "endpoint's thinking signatures; retried without them"))
                    result.counted.append(False)
                    tried = await self._try(ep, stripped, settings, deadline - loop.time(), secrets)
            except BaseException:  # cancelled: the client left
                if step.probe:
                    self._release_probe(store, ep.name)
                raise
            if tried.attempt.outcome == "unsendable":
                if step.probe:
                    self._release_probe(store, ep.name)
                result.answer = _unsendable(tried.attempt.detail)
                return result
            if tried.attempt.outcome == "local":
                # The router itself could not open a connection: the next endpoint would most
                # likely need a new one too, and none is to blame. The client may retry shortly.
                if step.probe:
                    self._release_probe(store, ep.name)
                attempts.append(tried.attempt)
                result.counted.append(False)
                self._warn_local(tried.attempt.detail)
                result.answer = _local_failure(tried.attempt.detail)
                return result
            attempts.append(tried.attempt)
            result.counted.append(tried.verdict is Verdict.COUNT)
            subject = policy.family_subject(ep.name, fam) if fam and tried.family_wide else None
            if tried.verdict is None and not side:
                await store.record_success(ep.name)
                if fam and (fs := policy.family_subject(ep.name, fam)) in view:
                    await store.record_success(fs)
                if credential and (cs := policy.credential_subject(ep.name, credential)) in states:
                    await store.record_success(cs)
            if tried.verdict is None:
                result.winner = tried.winner
                if attempts and attempts[0].endpoint != ep.name:
                    result.reason = ""  # the chosen endpoint failed over: price order took over
                return result
            if not side and tried.verdict is Verdict.COUNT and subject is not None:
                await store.record_success(ep.name)  # the endpoint answered: only the family is out
            if side:
                pass  # (count_tokens: nothing it meets is evidence about the endpoint or the key)
            elif tried.verdict is Verdict.COUNT:
                name = subject or ep.name  # a family's rate limit cools that family only
                before = phase(view.get(name, HEALTHY), self.clock())
                wait = _asked_wait(tried, settings)
                after = await store.record_failure(name, at_least=wait)
                if wait > 0 and self.on_hold is not None:
                    self.on_hold(name, self.clock() + wait)
                if tried.window > 0 and before is not Phase.COOLING:
                    log.info(f"router: endpoint {name}'s subscription window is used up (429 "
                             f"rejected); cooling it for {round(wait)} s, until it reopens"
                             + (" or router_window_cap" if wait < tried.window else ""))
                if before is not Phase.COOLING and phase(after, self.clock()) is Phase.COOLING:
                    result.trips.append(name)
            elif tried.verdict in (Verdict.CLIENT, Verdict.RETURN):
                await store.record_success(ep.name)  # it answered sensibly: it is up
            elif tried.verdict is Verdict.KEY:
                # A relay that refuses a key at its gate says nothing about its backend: no
                # success for the endpoint (a bad key must not heal a failing channel for
                # everyone), no failure either; only (endpoint, key) cools.
                if step.probe:
                    self._release_probe(store, ep.name)
                if credential is not None:
                    await self._cool_key(store, settings, ep.name, credential, tried, states)
            elif step.probe:
                self._release_probe(store, ep.name)  # skipped without blame: no verdict on it
            if tried.answer is not None:
                last = tried
            if tried.verdict is Verdict.RETURN:
                break
            if tried.verdict is Verdict.CLIENT:
                if tried.kind in client_kinds:
                    break  # a second endpoint agrees the request is bad: the client gets it
                client_kinds.append(tried.kind)
        if tries == 0 and last is None and any(a.outcome == "busy" for a in attempts):
            result.answer = _all_busy()  # nothing was sent: every free endpoint was busy
            return result
        result.answer = await self._final(endpoints, store, attempts, last)
        return result

    async def _cool_key(self, store: HealthStore, settings: Settings, name: str, credential: str,
                        tried: _Tried, states: Mapping[str, Health]) -> None:
        """The endpoint refused or limited this key: cool (endpoint, key) for as long as it
        asked (Retry-After, a rate-limit reset), else for the base cooldown, and keep the
        answer for the key's next requests. Never longer than asked: a key's cooldown does not
        grow with repetition the way an endpoint's does."""
        subject = policy.credential_subject(name, credential)
        cooling = subject in states and phase(states[subject], self.clock()) is Phase.COOLING
        if subject in states and not cooling:
            await store.record_success(subject)  # an old, ended cooldown: start afresh
        wait = _asked_wait(tried, settings) or store.breaker.cooldown
        await store.record_failure(subject, at_least=wait)
        assert tried.answer is not None  # a KEY verdict is only ever given to an answer (_error_answer)
        self._key_answers[credential] = tried.answer
        self._key_answers.move_to_end(credential)
        while len(self._key_answers) > KEY_ANSWERS:
            self._key_answers.popitem(last=False)
        if not cooling:
            log.info(f"router: endpoint {name} answered {tried.attempt.outcome} to one client key "
                     f"(id {credential}); cooling it for that key for {round(wait)} s")

    def _key_refused(self, credential: str, endpoints: Sequence[Endpoint],
                     view: Mapping[str, Health]) -> Answer:
        """What a key every usable endpoint refused lately gets: the last such answer as the
        endpoint sent it (kept per key in this process), else a 429 saying when to retry."""
        wait = policy.seconds_until_usable(endpoints, view, self.clock())
        retry = policy.retry_after_value(wait)
        kept = self._key_answers.get(credential)
        if kept is not None:
            headers = [(k, v) for k, v in kept.headers if k.lower() not in ("retry-after", "retry-after-ms")]
            return Answer(kept.status, kept.reason, headers + [("retry-after", retry)], kept.body)
        message = (f"every endpoint refused or rate-limited this key in the last minutes; "
                   f"retry in {retry} s")
        return Answer(429, "", [("content-type", "application/json"), ("retry-after", retry)],
                      error_body(429, message, "rate_limit_error"))

    async def models(self, endpoints: Sequence[Endpoint], store: HealthStore, settings: Settings,
                     req: Request, one: str | None = None) -> Result:
        """``GET /v1/models`` when endpoints have profiles: what every usable endpoint lists,
        in the ids clients use, limited to what each serves, merged (in price order)."""
        view = await store.view()
        disabled = store.disabled
        usable = [s.endpoint for s in policy.plan([ep for ep in endpoints if ep.name not in disabled],
                                                   view, self.clock()) if not s.probe]
        wait = min(settings.deadline, settings.headers_timeout, 30.0)
        secrets = tuple(s for ep in endpoints for s in ep.secrets)
        tried = await asyncio.gather(*(self._try(ep, req, settings, wait, secrets) for ep in usable))
        lists, used, attempts = [], [], []
        for ep, t in zip(usable, tried):
            attempts.append(t.attempt)
            w = t.winner
            if w is None:
                continue
            if not w.complete:
                w.resp.close()
                continue
            try:
                data = json.loads(w.prefix).get("data")
            except (ValueError, AttributeError, RecursionError):
                data = None
            if isinstance(data, list):
                lists.append(data)
                used.append(ep.profile)
        if not lists:
            # The client's own answer (its key refused, ...) as sent; else what went wrong.
            own = next((t.answer for t in tried if t.answer is not None
                        and t.verdict in (Verdict.CLIENT, Verdict.RETURN, Verdict.KEY)), None)
            local = next((a for a in attempts if a.outcome == "local"), None)
            answer = own or (_local_failure(local.detail) if local else Answer(
                502, "", [("content-type", "application/json")],
                error_body(502, policy.all_failed_message(attempts), error_type_for(502))))
            return Result(attempts, answer=answer, counted=[False] * len(attempts))
        data = profiles.union_models(lists, used)
        if one is not None:
            found = next((m for m in data if m["id"] == one), None)
            answer = (Answer(200, "OK", [("content-type", "application/json")], json.dumps(found).encode())
                      if found else _no_model(one))
            return Result(attempts, answer=answer, counted=[False] * len(attempts))
        body = json.dumps({"data": data, "has_more": False,
                           "first_id": data[0]["id"] if data else None,
                           "last_id": data[-1]["id"] if data else None}).encode()
        return Result(attempts, answer=Answer(200, "OK", [("content-type", "application/json")], body),
                      counted=[False] * len(attempts))

    # -- one attempt ---------------------------------------------------------------------

    async def _try(self, ep: Endpoint, req: Request, settings: Settings, left: float,
                   secrets: Sequence[str] = ()) -> _Tried:
        wait = settings.stream_timeout if req.streaming else settings.headers_timeout
        timeouts = Timeouts(connect=min(settings.connect_timeout, left), headers=min(wait, left))
        profile = ep.profile
        headers = [h for h in ep.request_headers(req.headers) if h[0].lower() != "accept-encoding"]
        headers.append(_IDENTITY)
        body = req.body
        if profile.rewrites:
            headers = profiles.request_headers(headers, profile)
            body = profiles.request_body(body, req.json, profile)
        try:
            resp = await self.upstream.send(ep, req.method, req.path, headers, body, timeouts)
        except UpstreamError as e:
            if e.kind in ("unsendable", "local"):  # nothing reached the endpoint: no verdict on it
                return _Tried(None, Attempt(ep.name, e.kind, e.detail))
            return self._transport_failure(ep, e.kind, e.detail, settings)
        try:
            resp.headers = scrub_headers(resp.headers, secrets) if secrets else resp.headers
            if 300 <= resp.status < 400:
                resp.close()  # a client would follow it and re-send the key and prompt there
                return self._transport_failure(ep, "redirect", f"answered HTTP {resp.status} (a redirect)",
                                               settings)
            async with asyncio.timeout(left):
                if resp.status >= 400:
                    return await self._error_answer(ep, resp, settings, secrets, req.model)
                if resp.is_event_stream:
                    tried = await self._stream_start(ep, resp, settings, secrets)
                    if tried.winner is not None and (m := req.model) and (up := profile.upstream_model(m)) != m:
                        w = tried.winner
                        coding = decoding.encoding_of(resp.headers)
                        if (opened := profiles.answer_opening(w.prefix, coding, up, m)) is not None:
                            w.prefix, w.inflater = opened
                            w.rewritten = True
                            if coding:  # the rest is decoded on its way to the client
                                resp.headers = _without_coding(resp.headers)
                    return tried
                prefix, complete = await resp.read(BUFFER_LIMIT)
                if complete and (m := req.model) and (up := profile.upstream_model(m)) != m:
                    coding = decoding.encoding_of(resp.headers)
                    if (answer := profiles.answer_body(prefix, coding, up, m)) is not None:
                        prefix = answer
                        if coding:  # rewritten decoded: the client gets it decoded
                            resp.headers = _without_coding(resp.headers)
        except UpstreamError as e:
            resp.close()
            return self._transport_failure(ep, e.kind, e.detail, settings)
        except TimeoutError:
            resp.close()
            return self._transport_failure(ep, "timeout", "request deadline reached", settings)
        except Exception as e:  # anything in the answer the router cannot judge is the endpoint's
            resp.close()
            log.warning(f"router: could not judge {ep.name}'s answer ({type(e).__name__}); counted as a failure")
            return _Tried(Verdict.COUNT, Attempt(ep.name, "bad_response",
                                                 f"answer could not be read ({type(e).__name__})"))
        except BaseException:  # cancelled (the client left): never leave the upstream open
            resp.close()
            raise
        return _Tried(None, Attempt(ep.name, str(resp.status)), winner=Winner(ep, resp, prefix, complete))

    def _transport_failure(self, ep: Endpoint, kind: str, detail: str, settings: Settings) -> _Tried:
        if kind == "local":  # the router's own trouble: route() answers it, nobody is judged
            return _Tried(None, Attempt(ep.name, kind, detail))
        if kind not in settings.rules:  # never silently counted, never silently ignored
            log.warning(f"router: {ep.name}: an outcome no rule names ({kind}: {detail}); "
                        "failing over without blame")
        return _Tried(policy.classify(settings.rules, transport=kind), Attempt(ep.name, kind, detail))

    async def _error_answer(self, ep: Endpoint, resp: UpstreamResponse, settings: Settings,
                            secrets: Sequence[str], model: str | None = None) -> _Tried:
        try:
            body, complete = await resp.read(ERROR_BODY_LIMIT)
        except UpstreamError:
            body, complete = b"", False
        if not complete:
            resp.close()
        headers = resp.headers
        if coding := decoding.encoding_of(headers):
            # Read (and relay) it decoded: the error type and any echoed key must be visible.
            plain = decoding.decoded(body, coding, ERROR_BODY_LIMIT * 4)
            if plain is None:  # unreadable: never relay bytes the router could not check
                body = error_body(resp.status, f"HTTP {resp.status} from {ep.name} (its error body "
                                  f"was {coding}-encoded and is not relayed)")
            else:
                body = plain
            headers = [(k, v) for k, v in headers if k.lower() != "content-encoding"]
        if secrets:
            body = scrub(body, secrets)
        etype, message = policy.error_of(body)
        answer = Answer(resp.status, resp.reason, headers, body, ep)
        verdict = policy.classify(settings.rules, status=resp.status, error_type=etype,
                                  own_credentials=ep.own_credentials)
        outcome = str(resp.status)
        if (verdict is Verdict.CLIENT and not ep.profile.models
                and policy.names_unknown_model(resp.status, etype, message, model)):
            # An endpoint without a models list that does not have this model: its limitation,
            # not the client's fault and not a failure; the next endpoint may have it.
            verdict, outcome = Verdict.SKIP, "model_not_found"
        hint = window = 0.0
        if resp.status in _BACKOFF_STATUSES and verdict in (Verdict.COUNT, Verdict.KEY):
            lowered = dict(answer.headers_lower())
            hint = policy.cooldown_hint(lowered, self.clock())
            if resp.status == 429:
                window = windows.rejected_wait(lowered, self.clock())
        return _Tried(
            verdict,
            Attempt(ep.name, outcome, f"HTTP {resp.status}" + (f" {etype}" if etype else "")),
            answer=answer,
            hint=hint,
            kind=(resp.status, etype),
            # A used-up subscription window closes the whole endpoint, not one model family.
            family_wide=resp.status in (429, 529) and model is not None and not window,
            message=message,
            window=window,
        )

    async def _stream_start(self, ep: Endpoint, resp: UpstreamResponse, settings: Settings,
                            secrets: Sequence[str] = ()) -> _Tried:
        """Hold a 200 stream until its first content event; a bad start is a failure."""
        held: list[bytes] = []
        size = 0
        scanner = sse.StartScanner()
        decoder = decoding.Decoder(decoding.encoding_of(resp.headers))
        async for chunk in resp.chunks():
            held.append(chunk)
            size += len(chunk)
            start = scanner.feed(decoder.feed(chunk))
            if start.error_type:
                resp.close()
                status = 529 if start.error_type == "overloaded_error" else 502
                message = scrub(start.error_message.encode(), secrets).decode("utf-8", "replace") \
                    if start.error_message else f"the stream opened with {start.error_type}"
                # Known types name the outcome; anything else stays one label (bounded metrics).
                outcome = start.error_type if start.error_type in KNOWN_ERROR_TYPES else "stream_error"
                return _Tried(
                    policy.classify(settings.rules, transport="stream_error"),
                    Attempt(ep.name, outcome, f"stream opened with {outcome}"),
                    answer=Answer(status, "", [("content-type", "application/json")],
                                  error_body(status, message, start.error_type), ep),
                )
            if start.content or size > HOLD_LIMIT or decoder.broken:
                return _Tried(None, Attempt(ep.name, str(resp.status)),
                              winner=Winner(ep, resp, b"".join(held), complete=False))
        return self._transport_failure(ep, "empty_stream", "stream ended before any content", settings)

    # -- answers when nothing worked ---------------------------------------------------------

    async def _all_cooling(self, endpoints: Sequence[Endpoint], store: HealthStore,
                           view: Mapping[str, Health]) -> Answer:
        wait = policy.seconds_until_usable(endpoints, view, self.clock())
        retry = policy.retry_after_value(wait)
        message = f"every endpoint is cooling down after failures; retry in {retry} s"
        return Answer(529, "", [("content-type", "application/json"), ("retry-after", retry)],
                      error_body(529, message, "overloaded_error"))

    async def _final(self, endpoints: Sequence[Endpoint], store: HealthStore,
                     attempts: list[Attempt], last: _Tried | None) -> Answer:
        answer: Answer
        if last is not None:
            assert last.answer is not None  # route() keeps as ``last`` only a try with an answer
            answer = last.answer
            if last.verdict in (Verdict.CLIENT, Verdict.RETURN, Verdict.KEY):
                return answer  # the request's own answer: as the upstream sent it
            if last.attempt.outcome == "model_not_found" and all(
                    a.outcome in ("model_not_found", "skipped:model") for a in attempts):
                return answer  # nobody has the model: the client is told so, as sent
        else:
            answer = Answer(502, "", [("content-type", "application/json")],
                            error_body(502, policy.all_failed_message(attempts), error_type_for(502)))
        wait = policy.seconds_until_usable(endpoints, await store.view(), self.clock())
        upstream_says = policy.cooldown_hint(dict(answer.headers_lower()), self.clock())
        if wait >= 0.5 or upstream_says > 60:
            # Say when an endpoint can be tried again, within what clients honour.
            answer.headers = [(k, v) for k, v in answer.headers
                              if k.lower() not in ("retry-after", "retry-after-ms")]
            answer.headers.append(("retry-after", policy.retry_after_value(max(wait, min(upstream_says, 60)))))
        return answer


def _without_coding(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() != "content-encoding"]


def _signature_rejected(tried: _Tried) -> bool:
    a = tried.answer
    return (a is not None and tried.verdict is not None
            and profiles.is_signature_rejection(a.status, tried.kind[1] if len(tried.kind) > 1 else None,
                                                tried.message))


def _no_model(model: str | None) -> Answer:
    message = f"model: {model} is not served by any endpoint of this router"
    return Answer(404, "", [("content-type", "application/json")],
                  error_body(404, message, "not_found_error"))


def _local_failure(detail: str) -> Answer:
    message = f"{detail}; no endpoint was tried: try again shortly"
    return Answer(529, "", [("content-type", "application/json"), ("retry-after", "1")],
                  error_body(529, message, "overloaded_error"))


def _unsendable(detail: str) -> Answer:
    return Answer(400, "", [("content-type", "application/json")],
                  error_body(400, f"the request cannot be forwarded: {detail}"))


def _all_busy() -> Answer:
    message = (f"every endpoint is at its max_concurrency and none freed a slot in time; "
               f"retry in {slots.BUSY_RETRY_AFTER} s")
    return Answer(429, "", [("content-type", "application/json"), ("retry-after", str(slots.BUSY_RETRY_AFTER))],
                  error_body(429, message, "rate_limit_error"))


def _no_endpoint() -> Answer:
    message = "every endpoint is disabled by the operator"
    return Answer(503, "", [("content-type", "application/json")], error_body(503, message))


def _asked_wait(tried: _Tried, settings: Settings) -> float:
    """How long the endpoint asked to be left alone: until its subscription window reopens
    (at most ``window_cap``), else its Retry-After or rate-limit reset (at most ``max_hint``)."""
    if tried.window > 0:
        return windows.window_cooldown(tried.window, settings.window_cap)
    return min(tried.hint, settings.max_hint) if tried.hint > 0 else 0.0
