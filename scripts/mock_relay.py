#!/usr/bin/env python3
"""Mock Claude API relay for end-to-end tests, the demo and the benchmark.

One process serves many "endpoints" (think: one relay host with price tiers).
The endpoint is the FIRST path segment: ``POST /aws/v1/messages?beta=true`` is
endpoint ``aws``, path ``/v1/messages``, query ``beta=true``. Any name works.

CLI::

    python scripts/mock_relay.py [--host 127.0.0.1] [--port 0]
        [--fault NAME=STATUS | --fault 'NAME={"reset":"mid_stream"}' ...]
        [--event-gap-ms N] [--max-log N] [--quiet]

Port 0 picks a free port. Once listening, exactly one line is printed to
stdout: ``mock-relay listening on http://127.0.0.1:PORT``. SIGTERM/SIGINT exit
cleanly (exit code 0).

Routes inside an endpoint (Anthropic wire format)::

    POST /v1/messages               JSON message, or SSE when "stream": true
    POST /v1/messages/count_tokens  {"input_tokens": len(body)//4}
    GET  /v1/models                 one model
    GET|HEAD /                      {"ok": true}
    *    /echo[/...]                what was received (headers, body sha256...)
    anything else                   404 not_found_error

Reply text is ``Hello from <endpoint>. You said: <last user text>``; streams
send one ``content_block_delta`` per word.

Fault injection (per endpoint; all keys optional)::

    status, error_type, message   -> Anthropic error response (status >= 300)
    retry_after, headers          -> extra response headers
    delay_ms                      -> sleep before sending headers
    event_gap_ms                  -> sleep between SSE events
    reset: before_headers | after_headers | mid_stream  -> TCP RST
    reset_after_events (2)        -> events written before a mid_stream reset
    stream_error, stream_error_after (0)  -> `event: error` then clean end
                                     (non-streaming request: HTTP error instead)
    stall_ms, stall_after_events (2)      -> one long pause mid-stream
    end_after_events              -> end the stream cleanly after N events (0: empty)
    words                         -> reply text is "w1 w2 ... wN"
    times                         -> only the next N requests, then cleared

Control API (same port)::

    PUT    /_mock/faults/<endpoint>   body: fault JSON (replaces)
    GET    /_mock/faults[/<endpoint>]
    DELETE /_mock/faults/<endpoint>   | DELETE /_mock/faults  (all)
    GET    /_mock/requests[?endpoint=NAME]   arrival-ordered request records
    DELETE /_mock/requests
    GET    /_mock/stats    {"<endpoint>": count, "open_streams", "closed_early"}
    DELETE /_mock/state    clears faults, request log and stats

Importable: ``relay, port = await start(); ...; await relay.stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import random
import re
import signal
import socket
import string
import struct
import sys
import time
from typing import Any

from aiohttp import web

log = logging.getLogger("mock_relay")

MAX_BODY = 64 * 1024 * 1024
DEFAULT_MODEL = "claude-sonnet-4-5"
MODELS_BODY = {
    "data": [
        {
            "type": "model",
            "id": "claude-sonnet-4-5",
            "display_name": "Claude Sonnet 4.5",
            "created_at": "2025-09-29T00:00:00Z",
        }
    ],
    "has_more": False,
    "first_id": "claude-sonnet-4-5",
    "last_id": "claude-sonnet-4-5",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Reverse map, used when a stream_error fault hits a non-streaming request.
ERROR_STATUS = {t: s for s, t in sorted(ERROR_TYPES.items())}  # timeout_error -> 504
ERROR_STATUS["api_error"] = 500
FAULT_KEYS = frozenset(
    "status error_type message retry_after headers delay_ms event_gap_ms reset "
    "reset_after_events stream_error stream_error_after stall_ms "
    "stall_after_events words times end_after_events".split()
)
INT_KEYS = FAULT_KEYS - {"error_type", "message", "retry_after", "headers", "reset", "stream_error"}
RESET_MODES = ("before_headers", "after_headers", "mid_stream")
JSON_CT = "application/json"
_ID_CHARS = string.ascii_letters + string.digits
_WORD_RE = re.compile(r"\S+\s*")
_LINGER_RST = struct.pack("ii", 1, 0)


def _rand_id(prefix: str) -> str:
    return prefix + "".join(random.choices(_ID_CHARS, k=24))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def validate_fault(fault: Any) -> dict[str, Any]:
    """Check a fault dict; raise ValueError with a readable reason."""
    if not isinstance(fault, dict):
        raise ValueError("fault must be a JSON object")
    unknown = set(fault) - FAULT_KEYS
    if unknown:
        raise ValueError(f"unknown fault keys: {sorted(unknown)}")
    for key in INT_KEYS & set(fault):
        if not isinstance(fault[key], int) or isinstance(fault[key], bool):
            raise ValueError(f"{key} must be an integer")
    if "reset" in fault and fault["reset"] not in RESET_MODES:
        raise ValueError(f"reset must be one of {RESET_MODES}")
    if "headers" in fault and not isinstance(fault["headers"], dict):
        raise ValueError("headers must be an object")
    return dict(fault)


def parse_fault_arg(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse a ``--fault`` value: ``NAME=STATUS`` or ``NAME=<fault JSON>``."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=STATUS or NAME=JSON, got {spec!r}")
    try:
        fault = {"status": int(value)} if value.strip().isdigit() else json.loads(value)
        return name, validate_fault(fault)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad fault {spec!r}: {exc}") from None


def user_text(payload: dict[str, Any]) -> str:
    """Text of the last user message (string content or joined text blocks)."""
    for msg in reversed(payload.get("messages") or []):
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
            )
        return ""
    return ""


class State:
    """Faults, request log and counters shared by all connections."""

    def __init__(self, event_gap_ms: int = 0, max_log: int = 100_000) -> None:
        self.event_gap_ms = event_gap_ms
        self.faults: dict[str, dict[str, Any]] = {}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_log or None)
        self.counts: collections.Counter[str] = collections.Counter()
        self.open_streams = 0
        self.closed_early = 0

    def clear(self) -> None:
        self.faults.clear()
        self.log.clear()
        self.counts.clear()
        self.closed_early = 0

    def take_fault(self, endpoint: str) -> dict[str, Any]:
        """Fault for this request ({} if none); consumes one of ``times``."""
        fault = self.faults.get(endpoint)
        if fault is None:
            return {}
        times = fault.get("times")
        if times is None:
            return fault
        if times <= 1:
            del self.faults[endpoint]
            return fault if times == 1 else {}
        self.faults[endpoint] = {**fault, "times": times - 1}
        return fault

    def stats(self) -> dict[str, int]:
        return {**self.counts, "open_streams": self.open_streams, "closed_early": self.closed_early}


class Call:
    """One endpoint request being served."""

    __slots__ = ("request", "endpoint", "path", "body", "record", "fault", "was_reset", "_payload")

    def __init__(self, request: web.Request, endpoint: str, path: str, body: bytes,
                 record: dict[str, Any], fault: dict[str, Any]) -> None:
        self.request = request
        self.endpoint = endpoint
        self.path = path
        self.body = body
        self.record = record
        self.fault = fault
        self.was_reset = False
        self._payload: Any = ...

    @property
    def payload(self) -> Any:
        """Body parsed as JSON (None when invalid); parsed at most once."""
        if self._payload is ...:
            try:
                self._payload = json.loads(self.body)
            except ValueError:
                self._payload = None
        return self._payload

    @property
    def wants_stream(self) -> bool:
        p = self.payload
        return self.path == "/v1/messages" and isinstance(p, dict) and p.get("stream") is True

    def input_tokens(self) -> int:
        return max(1, len(self.body) // 4)


class MockRelay:
    """The aiohttp application plus its state."""

    def __init__(self, event_gap_ms: int = 0, max_log: int = 100_000) -> None:
        self.state = State(event_gap_ms, max_log)
        self.runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.runner = web.AppRunner(
            self.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- dispatch ----------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        path, _, query = request.raw_path.partition("?")
        if path == "/_mock" or path.startswith("/_mock/"):
            return await self.control(request, path[len("/_mock"):])
        if path == "/":
            return web.Response(body=b'{"ok":true}', content_type=JSON_CT)
        endpoint, _, rest = path[1:].partition("/")
        return await self.endpoint(request, endpoint, "/" + rest, query)

    async def endpoint(self, request: web.Request, endpoint: str, path: str,
                       query: str) -> web.StreamResponse:
        record = {
            "endpoint": endpoint,
            "method": request.method,
            "path": path,
            "query": query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "t": time.time(),
        }
        body = await request.read()
        record.update(body_sha256=hashlib.sha256(body).hexdigest(), body_len=len(body),
                      outcome="pending")
        self.state.log.append(record)
        self.state.counts[endpoint] += 1
        call = Call(request, endpoint, path, body, record, self.state.take_fault(endpoint))
        try:
            resp = await self.serve(call)
        except asyncio.CancelledError:
            if record["outcome"] == "pending":
                record["outcome"] = "client_closed"
            raise
        if record["outcome"] == "pending":
            record["outcome"] = str(resp.status)
        return resp

    async def serve(self, call: Call) -> web.StreamResponse:
        fault = call.fault
        if fault.get("delay_ms"):
            await asyncio.sleep(fault["delay_ms"] / 1000)
        reset = fault.get("reset")
        if reset == "before_headers":
            self.reset(call)
            return web.Response()  # aiohttp's write fails quietly on the dead transport
        status = fault.get("status")
        if status and not 200 <= status < 300:
            return self.error(call, status, fault.get("error_type"), fault.get("message"))
        if reset == "after_headers" or (reset == "mid_stream" and not call.wants_stream):
            return await self.headers_then_reset(call)
        return await self.route(call)

    async def route(self, call: Call) -> web.StreamResponse:
        method, path = call.request.method, call.path
        if path == "/v1/messages" and method == "POST":
            return await self.messages(call)
        if path == "/v1/messages/count_tokens" and method == "POST":
            return self.json(call, {"input_tokens": call.input_tokens()})
        if path == "/v1/models" and method == "GET":
            return self.json(call, MODELS_BODY)
        if path == "/" and method in ("GET", "HEAD"):
            return self.json(call, {"ok": True})
        if path == "/echo" or path.startswith("/echo/"):
            return self.json(call, self.echo(call))
        return self.error(call, 404, None, f"Not found: {method} {path}")

    # -- responses ---------------------------------------------------------
    def headers(self, call: Call, content_type: str) -> dict[str, str]:
        headers = {"content-type": content_type, "request-id": _rand_id("req_")}
        if "retry_after" in call.fault:
            headers["retry-after"] = str(call.fault["retry_after"])
        headers.update({str(k): str(v) for k, v in call.fault.get("headers", {}).items()})
        return headers

    def json(self, call: Call, obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=_dumps(obj), headers=self.headers(call, JSON_CT))

    def error(self, call: Call, status: int, etype: str | None, message: str | None) -> web.Response:
        etype = etype or ERROR_TYPES.get(status, "api_error")
        headers = self.headers(call, JSON_CT)
        body = {
            "type": "error",
            "error": {"type": etype, "message": message or f"Mock {etype} ({status})"},
            "request_id": headers["request-id"],
        }
        reason = "Overloaded" if status == 529 else None  # aiohttp has no phrase for 529
        return web.Response(status=status, reason=reason, body=_dumps(body), headers=headers)

    def echo(self, call: Call) -> dict[str, Any]:
        rec = call.record
        keys = ("endpoint", "method", "path", "query", "headers", "body_sha256", "body_len")
        return {k: rec[k] for k in keys}

    def reply_text(self, call: Call, payload: dict[str, Any]) -> str:
        words = call.fault.get("words")
        if words:
            return " ".join(f"w{i}" for i in range(1, words + 1))
        return f"Hello from {call.endpoint}. You said: {user_text(payload)}"

    async def messages(self, call: Call) -> web.StreamResponse:
        payload = call.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            msg = "messages: Field required" if isinstance(payload, dict) else "Invalid JSON body"
            return self.error(call, 400, None, msg)
        stream_error = call.fault.get("stream_error")
        if stream_error and not payload.get("stream"):
            return self.error(call, ERROR_STATUS.get(stream_error, 500), stream_error,
                              call.fault.get("message"))
        model = payload.get("model") or DEFAULT_MODEL
        text = self.reply_text(call, payload)
        if payload.get("stream") is True:
            return await self.stream(call, model, text)
        return self.json(call, {
            "id": _rand_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": self.usage(call.input_tokens(), len(_WORD_RE.findall(text))),
        })

    @staticmethod
    def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
        return {"input_tokens": input_tokens, "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

    def sse_events(self, call: Call, model: str, text: str) -> list[bytes]:
        words = _WORD_RE.findall(text)
        message = {"id": _rand_id("msg_"), "type": "message", "role": "assistant",
                   "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": self.usage(call.input_tokens(), 1)}
        events = [
            _sse("message_start", {"type": "message_start", "message": message}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            _sse("ping", {"type": "ping"}),
        ]
        events += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": w}})
                   for w in words]
        events += [
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": len(words)}}),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        return events

    async def stream(self, call: Call, model: str, text: str) -> web.StreamResponse:
        events = self.sse_events(call, model, text)
        headers = self.headers(call, "text/event-stream")
        headers["cache-control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        resp.enable_chunked_encoding()
        state = self.state
        state.open_streams += 1
        try:
            await resp.prepare(call.request)
            call.record["outcome"] = await self.write_events(call, resp, events)
            if not call.was_reset:
                await resp.write_eof()
        except ConnectionError:  # client went away while we were writing
            self.client_closed(call)
        except asyncio.CancelledError:  # client went away while we were sleeping
            self.client_closed(call)
            raise
        finally:
            state.open_streams -= 1
        return resp

    def client_closed(self, call: Call) -> None:
        if not call.was_reset:
            self.state.closed_early += 1
            call.record["outcome"] = "client_closed"

    async def write_events(self, call: Call, resp: web.StreamResponse,
                           events: list[bytes]) -> str:
        """Write SSE events applying gap/stall/error/reset faults; return outcome."""
        fault, n = call.fault, len(events)
        gap = fault.get("event_gap_ms", self.state.event_gap_ms) / 1000
        stall_at = fault.get("stall_after_events", 2) if fault.get("stall_ms") else None
        reset_at = min(fault.get("reset_after_events", 2), n) if fault.get("reset") else None
        error_at = min(fault.get("stream_error_after", 0), n) if fault.get("stream_error") else None
        end_at = min(fault["end_after_events"], n) if "end_after_events" in fault else None
        for i in range(n + 1):
            if i == end_at:
                return "ended"
            if i == stall_at:
                await asyncio.sleep(fault["stall_ms"] / 1000)
            if i == reset_at:
                self.reset(call)
                return "reset"
            if i == error_at:
                if i and gap:
                    await asyncio.sleep(gap)
                await resp.write(self.stream_error_event(fault))
                return "stream_error"
            if i == n:
                break
            if i and gap:
                await asyncio.sleep(gap)
            await resp.write(events[i])
        return "200"

    @staticmethod
    def stream_error_event(fault: dict[str, Any]) -> bytes:
        etype = fault["stream_error"]
        message = fault.get("message") or f"Mock {etype}"
        return _sse("error", {"type": "error", "error": {"type": etype, "message": message}})

    async def headers_then_reset(self, call: Call) -> web.StreamResponse:
        ctype = "text/event-stream" if call.wants_stream else JSON_CT
        resp = web.StreamResponse(status=200, headers=self.headers(call, ctype))
        resp.enable_chunked_encoding()
        await resp.prepare(call.request)
        self.reset(call)
        return resp

    def reset(self, call: Call) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 1,0 then close)."""
        call.was_reset = True
        call.record["outcome"] = "reset"
        transport = call.request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            transport.abort()

    # -- control API -------------------------------------------------------
    async def control(self, request: web.Request, sub: str) -> web.StreamResponse:
        parts = [p for p in sub.split("/") if p]
        method = request.method
        kind, name = (parts + [None, None])[:2]
        if kind == "faults":
            return await self.control_faults(request, method, name)
        if kind == "requests" and method == "GET":
            ep = request.query.get("endpoint")
            return web.json_response([r for r in self.state.log if ep is None or r["endpoint"] == ep])
        if kind == "requests" and method == "DELETE":
            self.state.log.clear()
            return web.json_response({"ok": True})
        if kind == "stats" and method == "GET":
            return web.json_response(self.state.stats())
        if kind == "state" and method == "DELETE":
            self.state.clear()
            return web.json_response({"ok": True})
        return web.json_response({"error": f"unknown control route {method} {sub}"}, status=404)

    async def control_faults(self, request: web.Request, method: str,
                             name: str | None) -> web.Response:
        faults = self.state.faults
        if method == "GET":
            return web.json_response(faults if name is None else faults.get(name))
        if method == "DELETE":
            if name is None:
                faults.clear()
            else:
                faults.pop(name, None)
            return web.json_response({"ok": True})
        if method in ("PUT", "POST") and name is not None:
            try:
                fault = validate_fault(json.loads(await request.read()))
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            faults[name] = fault
            log.debug("fault %s = %s", name, fault)
            return web.json_response({"ok": True, "endpoint": name, "fault": fault})
        return web.json_response({"error": "use PUT/DELETE /_mock/faults/<endpoint>"}, status=405)


async def start(host: str = "127.0.0.1", port: int = 0, *, event_gap_ms: int = 0,
                faults: dict[str, dict[str, Any]] | None = None,
                max_log: int = 100_000) -> tuple[MockRelay, int]:
    """Start a relay in the running loop; returns (relay, port). Stop with relay.stop()."""
    relay = MockRelay(event_gap_ms, max_log)
    for name, fault in (faults or {}).items():
        relay.state.faults[name] = validate_fault(fault)
    return relay, await relay.start(host, port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mock Claude API relay (see module docstring).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--fault", action="append", type=parse_fault_arg, default=[],
                   metavar="NAME=STATUS|NAME=JSON", help="initial fault for an endpoint")
    p.add_argument("--event-gap-ms", type=int, default=0, help="default gap between SSE events")
    p.add_argument("--max-log", type=int, default=100_000,
                   help="keep at most N request records (0 = unlimited)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    relay, port = await start(args.host, args.port, event_gap_ms=args.event_gap_ms,
                              faults=dict(args.fault), max_log=args.max_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # install before announcing the port
        loop.add_signal_handler(sig, stop.set)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mock-relay listening on http://{host}:{port}", flush=True)
    await stop.wait()
    await relay.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        stream=sys.stderr, format="mock-relay %(levelname)s %(message)s")
    # aiohttp logs aborted connections as errors; they are expected here.
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL if args.quiet else logging.WARNING)
    for name, fault in args.fault:
        log.info("initial fault %s = %s", name, fault)
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
