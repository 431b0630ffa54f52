"""Mock Claude API relay for end-to-end tests, the demo and the benchmark.

One process serves many "endpoints" (think: one relay host with price tiers).
The endpoint is the FIRST path segment: ``POST /aws/v1/messages?beta=true`` is
endpoint ``aws``, path ``/v1/messages``, query ``beta=true``. Any name works.

CLI::

    python -m claude_router_dev.mock_relay [--host 127.0.0.1] [--port 0]
        [--fault NAME=STATUS | --fault 'NAME={"reset":"mid_stream"}' ...]
        [--profile 'NAME={...profile JSON...}' ...]
        [--event-gap-ms N] [--max-log N] [--quiet]

Port 0 picks a free port. Once listening, exactly one line is printed to
stdout: ``mock-relay listening on http://127.0.0.1:PORT``. SIGTERM/SIGINT exit
cleanly (exit code 0).

Routes inside an endpoint (Anthropic wire format)::

    POST /v1/messages               JSON message, or SSE when "stream": true
    POST /v1/messages/count_tokens  {"input_tokens": len(body)//4}
    GET  /v1/models                 one model (a profile's ``models`` when set)
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
    event_bytes                   -> pad each streamed word (content_block_delta) to N bytes
                                     of text ("w1....."), for long streams of large events
    write_timeout_ms              -> give up on a client that stops reading: when one write
                                     of a stream blocks this long, close the connection
                                     (outcome "write_timeout")
    stamp_events: true            -> each SSE event's data gets a last key "mock_t": the mock's
                                     time.monotonic() (CLOCK_MONOTONIC, system-wide on Linux)
                                     just before the event is written, for event delays
    max_inflight                  -> a relay that serves at most N requests at once: one more
                                     arriving then gets 429 rate_limit_error at once (outcome
                                     "429"; retry_after and headers as given), and is not
                                     counted in /_mock/inflight
    times                         -> only the next N requests, then cleared
    key                           -> only requests presenting this key (x-api-key or
                                     Authorization: Bearer); others are served as usual

Profiles (per endpoint; what a relay *is*, persistently; all keys optional, none
set = today's behaviour). Checked for Messages and count_tokens after faults, in
this order: models, family_limits (Messages only), reject_betas, reject_cache_ttl,
thinking (Messages only)::

    models: [str]                 the only model ids this relay knows (its own ids, e.g.
                                  "anthropic.claude-sonnet-4-5-v1:0"); another model gets
                                  404 not_found_error "model: <id>" (no model: 400
                                  "model: Field required"); GET /v1/models lists exactly
                                  these, GET /v1/models/<id> answers one or that 404.
                                  Absent = any model (non-empty list when set)
    family_limits: {FAMILY: {status (429), retry_after, error_type, message}}
                                  a Messages request whose model id contains FAMILY
                                  (case-insensitive) gets that error: 429 rate_limit_error,
                                  529 overloaded_error, ... with retry-after when given
    reject_betas: [str]           a request whose anthropic-beta header(s) carry one of these
                                  gets 400 invalid_request_error
                                  "Unexpected value(s) 'B' for the 'anthropic-beta' header"
                                  (several: 'B1', 'B2')
    reject_cache_ttl: bool        any cache_control with a "ttl" (tools, system, message
                                  blocks) gets 400 invalid_request_error
                                  "<path>.cache_control.ttl: Extra inputs are not permitted"
                                  (path like system.0 or messages.2.content.1)
    sign_thinking: str            this relay's thinking secret. A request with
                                  "thinking": {"type": "enabled"|"adaptive"} is answered with
                                  a thinking block first (JSON content[0]; SSE index 0:
                                  content_block_start, thinking_delta per word,
                                  signature_delta, content_block_stop; text at index 1).
                                  Its text: "The user said: <last user text>. I will
                                  answer from <endpoint>."; its signature =
                                  base64(HMAC-SHA256(secret, thinking text)).
                                  Every request: each thinking block in an assistant turn
                                  must carry a signature valid for THIS secret, else 400
                                  "messages.I.content.J: Invalid `signature` in `thinking`
                                  block" (redacted_thinking blocks likewise, by their data).
                                  Thinking enabled and the last assistant message holding a
                                  tool_use but not starting with thinking/redacted_thinking:
                                  400 "messages.I.content.0.type: Expected `thinking` or
                                  `redacted_thinking`, but found `T`. When `thinking` is
                                  enabled, ..." (the real API's full text)
    redact_thinking: bool         with sign_thinking: answer a redacted_thinking block
                                  {"data": base64(16-byte nonce + HMAC(secret, nonce))}
    gzip: bool                    a relay that compresses whatever accept-encoding says:
                                  every JSON answer gzip-coded (content-encoding: gzip),
                                  streams too, each event flushed (Z_SYNC_FLUSH) so it can be
                                  decoded as it arrives
    escape_model: bool            the answer's model id (JSON top-level "model", SSE
                                  message_start's message.model) written JSON-escaped: every
                                  character as \\uXXXX, except "/" as "\\/"
    cache: false | true | "ignore"   prompt-cache model (below); false = today's usage
    cache_min_tokens: int (1024)  smallest prefix that is written
    cache_ttl_scale: float (1.0)  multiplies the TTLs (0.01: 5 min -> 3 s)
    output_tokens: int            fixed output_tokens, at most the request's max_tokens
                                  (default: words of the reply, plus words of the thinking
                                  text when thinking is answered)

Prompt-cache model (``cache`` true or "ignore"). The prompt is tools, then system
(a string counts as one text block), then each message's content blocks (string
content counts as one {"type":"text","text":...} block). A block's tokens are
``len(canonical JSON of the block without its cache_control) // 4``, canonical =
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``; the
prompt's tokens are their sum (count_tokens answers that sum too). Blocks with a
``cache_control`` object are breakpoints. A prefix's key is the sha256 of the
model id and the canonical JSON of each block up to it (with its section, message
index and role; cache_control excluded), kept per endpoint. On a request the
longest unexpired prefix among each breakpoint and the 20 block boundaries before
it is read (``cache_read_input_tokens``; the hit's TTL is refreshed). Each
breakpoint beyond it whose prefix has at least cache_min_tokens is written, TTL
5 min or 1 h (``"ttl": "1h"``); ``cache_creation_input_tokens`` = tokens from the
read point to the last written breakpoint, split in
``usage.cache_creation.ephemeral_{5m,1h}_input_tokens`` by the TTL of the
breakpoint ending each segment; ``input_tokens`` = the rest (the three add up to
the prompt's tokens). ``cache: "ignore"``: a relay that does not cache, every
prompt token is input_tokens. Usage goes in the JSON ``usage``, the SSE
message_start (input and cache counts, output_tokens 1) and message_delta
(output_tokens).

Control API (same port)::

    PUT    /_mock/faults/<endpoint>   body: fault JSON (replaces)
    GET    /_mock/faults[/<endpoint>]
    DELETE /_mock/faults/<endpoint>   | DELETE /_mock/faults  (all)
    PUT    /_mock/profiles/<endpoint> body: profile JSON (replaces; {} = none)
    GET    /_mock/profiles[/<endpoint>]
    DELETE /_mock/profiles/<endpoint> | DELETE /_mock/profiles  (all)
    GET    /_mock/cache[/<endpoint>]  live cache entries: [{"key": sha256 prefix (16 hex),
                                      "tokens", "ttl": "5m"|"1h", "expires_in": seconds}]
                                      ({"<endpoint>": [...]} without an endpoint)
    DELETE /_mock/cache[/<endpoint>]  empties one endpoint's cache or all
    GET    /_mock/requests[?endpoint=NAME]   arrival-ordered request records; Messages and
                                      count_tokens records carry "model" (as requested) and
                                      Messages answers "usage" (what was billed), else null
    DELETE /_mock/requests
    GET    /_mock/stats    {"<endpoint>": count, "open_streams", "closed_early"}
    GET    /_mock/inflight {"now": {"<endpoint>": requests being served}, "peak": {"<endpoint>":
                           the most at once since the last clear}} (a stream is served until
                           its last event is written; slow streams: the event_gap_ms fault)
    DELETE /_mock/state    clears faults, profiles, caches, request log, stats and peaks
    PUT    /_mock/balances/<endpoint>  a balance panel for the endpoint (below)
    GET    /_mock/balances/<endpoint>  {"quota", ..., "polls": panel requests so far}

Balance panel (per endpoint, once set with PUT /_mock/balances/<endpoint>; body keys all
optional: quota (int, new-api units, 500,000 per USD), remaining (sub2api USD, default
quota / 500,000), key (answer 401 unless "Authorization: Bearer <key>"), status (answer that
HTTP status), success (false: new-api's refusal {"success": false})). Panel requests are
counted there, never in the request log or /_mock/stats::

    GET /<endpoint>/api/user/self   new-api / one-api: {"success": true, "data": {"quota", ...}}
    GET /<endpoint>/v1/usage        sub2api: {"isValid": true, "remaining": USD, "unit": "USD"}

Importable: ``relay, port = await start(faults={...}, profiles={...}); ...;
await relay.stop()``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import signal
import socket
import string
import struct
import sys
import time
import zlib
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
    "stall_after_events words times end_after_events event_bytes write_timeout_ms "
    "stamp_events key max_inflight".split()
)
INT_KEYS = FAULT_KEYS - {"error_type", "message", "retry_after", "headers", "reset", "stream_error",
                         "stamp_events", "key"}
RESET_MODES = ("before_headers", "after_headers", "mid_stream")
JSON_CT = "application/json"
_ID_CHARS = string.ascii_letters + string.digits
_WORD_RE = re.compile(r"\S+\s*")
_LINGER_RST = struct.pack("ii", 1, 0)

PROFILE_KEYS = frozenset(
    "models family_limits reject_betas reject_cache_ttl sign_thinking redact_thinking "
    "cache cache_min_tokens cache_ttl_scale output_tokens".split()
)
PROFILE_KEYS = PROFILE_KEYS | {"gzip", "escape_model"}
FAMILY_KEYS = frozenset("status error_type message retry_after".split())
CACHE_MIN_TOKENS = 1024
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}
CACHE_LOOKBACK = 20  # earlier block boundaries tried before each breakpoint
CACHE_PRUNE_AT = 512  # entries per endpoint before expired ones are swept
THINKING_TYPES = ("enabled", "adaptive")
THINKING_BLOCKS = ("thinking", "redacted_thinking")
BAD_SIGNATURE = "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
THINKING_FIRST = (
    "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
    "`{found}`. When `thinking` is enabled, a final `assistant` message must start with a "
    "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We "
    "recommend you include thinking blocks from previous turns. To avoid this requirement, "
    "disable `thinking`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
)


def _rand_id(prefix: str) -> str:
    return prefix + "".join(random.choices(_ID_CHARS, k=24))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def _presented_key(request: web.Request) -> str:
    key = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    return key or (auth[7:].strip() if auth[:7].lower() == "bearer " else "")


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
    if "stamp_events" in fault and not isinstance(fault["stamp_events"], bool):
        raise ValueError("stamp_events must be true or false")
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def validate_profile(profile: Any) -> dict[str, Any]:
    """Check a profile dict; raise ValueError with a readable reason."""
    if not isinstance(profile, dict):
        raise ValueError("profile must be a JSON object")
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise ValueError(f"unknown profile keys: {sorted(unknown)}")
    p = dict(profile)
    if "models" in p and not (_str_list(p["models"]) and p["models"]):
        raise ValueError("models must be a non-empty list of model ids (omit it for any model)")
    if "reject_betas" in p and not _str_list(p["reject_betas"]):
        raise ValueError("reject_betas must be a list of strings")
    for key in ("reject_cache_ttl", "redact_thinking"):
        if key in p and not isinstance(p[key], bool):
            raise ValueError(f"{key} must be true or false")
    for key in ("gzip", "escape_model"):
        if key in p and not isinstance(p[key], bool):
            raise ValueError(f"{key} must be true or false")
    if "sign_thinking" in p and not (isinstance(p["sign_thinking"], str) and p["sign_thinking"]):
        raise ValueError("sign_thinking must be a non-empty string (the relay's secret)")
    if p.get("redact_thinking") and "sign_thinking" not in p:
        raise ValueError("redact_thinking needs sign_thinking")
    if "family_limits" in p:
        fams = p["family_limits"]
        if not isinstance(fams, dict):
            raise ValueError("family_limits must be an object {family: {status, retry_after...}}")
        for fam, lim in fams.items():
            if not fam or not isinstance(lim, dict) or set(lim) - FAMILY_KEYS:
                raise ValueError(f"family_limits.{fam} must be an object with keys "
                                 f"{sorted(FAMILY_KEYS)}")
            if "status" in lim and not (_is_int(lim["status"]) and 400 <= lim["status"] <= 599):
                raise ValueError(f"family_limits.{fam}.status must be an HTTP error status")
            for key in ("error_type", "message"):
                if key in lim and not isinstance(lim[key], str):
                    raise ValueError(f"family_limits.{fam}.{key} must be a string")
            if "retry_after" in lim and not isinstance(lim["retry_after"], (int, str)):
                raise ValueError(f"family_limits.{fam}.retry_after must be a number or string")
    if "cache" in p and p["cache"] not in (True, False, "ignore"):
        raise ValueError('cache must be true, false or "ignore"')
    for key in ("cache_min_tokens", "output_tokens"):
        if key in p and not (_is_int(p[key]) and p[key] >= 0):
            raise ValueError(f"{key} must be a non-negative integer")
    if "cache_ttl_scale" in p:
        scale = p["cache_ttl_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError("cache_ttl_scale must be a positive number")
    return p


def parse_profile_arg(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse a ``--profile`` value: ``NAME=<profile JSON>``."""
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {spec!r}")
    try:
        return name, validate_profile(json.loads(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad profile {spec!r}: {exc}") from None


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _blocks(content: Any) -> list[Any]:
    """Content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content if isinstance(content, list) else []


def prompt_blocks(payload: dict[str, Any]) -> list[tuple[str, int, str | None]]:
    """The prompt as (prefix key, tokens, breakpoint TTL "5m"/"1h" or None) per block.

    Order: tools, system, messages. A block's tokens are len(canonical JSON of the block
    without cache_control) // 4; a prefix's key is the sha256 of the model id and every
    block up to it (with its section, message index and role), cache_control excluded.
    """
    h = hashlib.sha256(_canonical(payload.get("model")).encode())
    out: list[tuple[str, int, str | None]] = []

    def add(where: list[Any], block: Any) -> None:
        cc = block.get("cache_control") if isinstance(block, dict) else None
        if isinstance(block, dict) and "cache_control" in block:
            block = {k: v for k, v in block.items() if k != "cache_control"}
        text = _canonical(block)
        h.update(b"\n" + _canonical(where).encode() + b"\n" + text.encode())
        ttl = None
        if isinstance(cc, dict):
            ttl = "1h" if cc.get("ttl") == "1h" else "5m"
        out.append((h.hexdigest(), len(text) // 4, ttl))

    tools = payload.get("tools")
    for block in tools if isinstance(tools, list) else []:
        add(["tools"], block)
    for block in _blocks(payload.get("system")):
        add(["system"], block)
    messages = payload.get("messages")
    for i, msg in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(msg, dict):
            for block in _blocks(msg.get("content")):
                add(["messages", i, msg.get("role")], block)
    return out


def prompt_tokens(payload: dict[str, Any]) -> int:
    return sum(tokens for _, tokens, _ in prompt_blocks(payload))


def ttl_path(payload: dict[str, Any]) -> str | None:
    """Path of the first block whose cache_control has a ttl (system.0, messages.2.content.1)."""
    def has_ttl(block: Any) -> bool:
        return (isinstance(block, dict) and isinstance(block.get("cache_control"), dict)
                and "ttl" in block["cache_control"])

    for section in ("tools", "system"):
        blocks = payload.get(section)
        for j, block in enumerate(blocks if isinstance(blocks, list) else []):
            if has_ttl(block):
                return f"{section}.{j}"
    messages = payload.get("messages")
    for i, msg in enumerate(messages if isinstance(messages, list) else []):
        content = msg.get("content") if isinstance(msg, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if has_ttl(block):
                return f"messages.{i}.content.{j}"
    return None


def sign_thinking(secret: str, thinking: str) -> str:
    """A thinking block's signature: base64 of HMAC-SHA256(secret, thinking text)."""
    mac = hmac.new(secret.encode(), thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def redacted_data(secret: str, nonce: bytes | None = None) -> str:
    """A redacted_thinking block's data: base64(16-byte nonce + HMAC-SHA256(secret, nonce))."""
    nonce = os.urandom(16) if nonce is None else nonce
    mac = hmac.new(secret.encode(), nonce, hashlib.sha256).digest()
    return base64.b64encode(nonce + mac).decode()


def thinking_block_ok(secret: str, block: dict[str, Any]) -> bool:
    """Whether a thinking / redacted_thinking block was produced with this secret."""
    if block.get("type") == "thinking":
        thinking, sig = block.get("thinking"), block.get("signature")
        return (isinstance(thinking, str) and isinstance(sig, str)
                and hmac.compare_digest(sig.encode(), sign_thinking(secret, thinking).encode()))
    data = block.get("data")
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
    except ValueError:
        return False
    expected = base64.b64decode(redacted_data(secret, raw[:16])) if len(raw) == 48 else b""
    return bool(expected) and hmac.compare_digest(raw, expected)


def thinking_error(payload: dict[str, Any], secret: str) -> str | None:
    """The real API's 400 message for this conversation's thinking blocks, or None."""
    messages = payload["messages"]
    last_assistant = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") != "assistant":
            continue
        last_assistant = i
        content = msg.get("content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            if (isinstance(block, dict) and block.get("type") in THINKING_BLOCKS
                    and not thinking_block_ok(secret, block)):
                return BAD_SIGNATURE.format(i=i, j=j)
    thinking = payload.get("thinking")
    if last_assistant is None or not (isinstance(thinking, dict)
                                      and thinking.get("type") in THINKING_TYPES):
        return None
    content = messages[last_assistant].get("content")
    blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    first = blocks[0].get("type") if blocks else None
    if any(b.get("type") == "tool_use" for b in blocks) and first not in THINKING_BLOCKS:
        return THINKING_FIRST.format(i=last_assistant, found=first)
    return None


def request_betas(request: web.Request) -> list[str]:
    return [v.strip() for h in request.headers.getall("anthropic-beta", [])
            for v in h.split(",") if v.strip()]


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
    """Faults, profiles, caches, request log and counters shared by all connections."""

    def __init__(self, event_gap_ms: int = 0, max_log: int = 100_000) -> None:
        self.event_gap_ms = event_gap_ms
        self.faults: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        # endpoint -> prefix key -> {"tokens", "ttl" ("5m"/"1h"), "seconds", "expires"}
        self.caches: dict[str, dict[str, dict[str, Any]]] = {}
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_log or None)
        self.counts: collections.Counter[str] = collections.Counter()
        self.open_streams = 0
        self.closed_early = 0
        self.balances: dict[str, dict[str, Any]] = {}  # endpoint -> its balance panel
        # endpoint -> requests being served now, and the most at once since the last clear
        self.inflight: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()

    def clear(self) -> None:
        self.balances.clear()
        self.faults.clear()
        self.profiles.clear()
        self.caches.clear()
        self.log.clear()
        self.counts.clear()
        self.closed_early = 0
        self.peak = collections.Counter(+self.inflight)

    def take_fault(self, endpoint: str, key: str = "") -> dict[str, Any]:
        """Fault for this request ({} if none); consumes one of ``times``."""
        fault = self.faults.get(endpoint)
        if fault is None or ("key" in fault and fault["key"] != key):
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

    def live_cache(self, endpoint: str) -> dict[str, dict[str, Any]]:
        """The endpoint's cache with expired entries removed."""
        cache = self.caches.get(endpoint, {})
        now = time.monotonic()
        for key in [k for k, e in cache.items() if e["expires"] <= now]:
            del cache[key]
        return cache

    def cache_entries(self, endpoint: str) -> list[dict[str, Any]]:
        now = time.monotonic()
        return sorted(({"key": k[:16], "tokens": e["tokens"], "ttl": e["ttl"],
                        "expires_in": round(e["expires"] - now, 3)}
                       for k, e in self.live_cache(endpoint).items()),
                      key=lambda e: (e["tokens"], e["key"]))

    def prompt_usage(self, endpoint: str, profile: dict[str, Any],
                     payload: dict[str, Any]) -> dict[str, int]:
        """Input-side usage of a Messages request under the cache model; updates the cache."""
        blocks = prompt_blocks(payload)
        cum = list(itertools.accumulate(tokens for _, tokens, _ in blocks))
        total = cum[-1] if cum else 0
        read = hit = -1
        split = {"5m": 0, "1h": 0}
        if profile.get("cache") is True:
            cache = self.caches.setdefault(endpoint, {})
            if len(cache) > CACHE_PRUNE_AT:
                self.live_cache(endpoint)
            now = time.monotonic()
            breakpoints = [i for i, (_, _, ttl) in enumerate(blocks) if ttl]
            for b in breakpoints:  # longest live prefix: a breakpoint or up to 20 blocks before
                for i in range(b, max(-1, b - CACHE_LOOKBACK - 1), -1):
                    if i <= hit:
                        break
                    entry = cache.get(blocks[i][0])
                    if entry is not None and entry["expires"] > now:
                        hit = i
                        break
            read = cum[hit] if hit >= 0 else 0
            if hit >= 0:
                entry = cache[blocks[hit][0]]
                entry["expires"] = now + entry["seconds"]
            scale = profile.get("cache_ttl_scale", 1.0)
            min_tokens = profile.get("cache_min_tokens", CACHE_MIN_TOKENS)
            done = read
            for b in breakpoints:
                if b > hit and cum[b] >= min_tokens:
                    ttl = blocks[b][2]
                    seconds = CACHE_TTLS[ttl] * scale
                    cache[blocks[b][0]] = {"tokens": cum[b], "ttl": ttl, "seconds": seconds,
                                           "expires": now + seconds}
                    split[ttl] += cum[b] - done
                    done = cum[b]
        read = max(read, 0)
        written = split["5m"] + split["1h"]
        return {"input_tokens": total - read - written, "cache_creation_input_tokens": written,
                "cache_read_input_tokens": read,
                "cache_creation": {"ephemeral_5m_input_tokens": split["5m"],
                                   "ephemeral_1h_input_tokens": split["1h"]}}


def escape_model(data: bytes, model: str) -> bytes:
    """``data`` with its first ``"model":"<model>"`` written JSON-escaped (profile
    ``escape_model``): every character as \\uXXXX, except "/" as "\\/"."""
    escaped = "".join("\\/" if c == "/" else f"\\u{ord(c):04x}" for c in model)
    return data.replace(b'"model":' + _dumps(model), b'"model":"' + escaped.encode() + b'"', 1)


def gzip_body(data: bytes) -> bytes:
    z = zlib.compressobj(wbits=31)
    return z.compress(data) + z.flush()


class GzipStream(web.StreamResponse):
    """A stream sent gzip-coded whatever the client asked for (profile ``gzip``); each write
    is flushed (Z_SYNC_FLUSH), so every event can be decoded as soon as it arrives."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.headers["content-encoding"] = "gzip"
        self._gz = zlib.compressobj(wbits=31)

    async def write(self, data: bytes) -> None:  # type: ignore[override]
        await super().write(self._gz.compress(bytes(data)) + self._gz.flush(zlib.Z_SYNC_FLUSH))

    async def write_eof(self, data: bytes = b"") -> None:  # type: ignore[override]
        if self._gz is not None:
            tail, self._gz = self._gz.compress(bytes(data)) + self._gz.flush(), None
            await super().write_eof(tail)
        else:
            await super().write_eof(data)


class Call:
    """One endpoint request being served."""

    __slots__ = ("request", "endpoint", "path", "body", "record", "fault", "profile",
                 "was_reset", "_payload")

    def __init__(self, request: web.Request, endpoint: str, path: str, body: bytes,
                 record: dict[str, Any], fault: dict[str, Any],
                 profile: dict[str, Any] | None = None) -> None:
        self.request = request
        self.endpoint = endpoint
        self.path = path
        self.body = body
        self.record = record
        self.fault = fault
        self.profile = profile or {}
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
        panel = self.state.balances.get(endpoint)
        if panel is not None and request.method == "GET" and rest in ("api/user/self", "v1/usage"):
            return self.balance_panel(request, panel, rest)
        return await self.endpoint(request, endpoint, "/" + rest, query)

    @staticmethod
    def balance_panel(request: web.Request, panel: dict[str, Any], page: str) -> web.Response:
        """A relay panel's balance page (new-api / one-api, or sub2api's usage), counted."""
        panel["polls"] = panel.get("polls", 0) + 1
        if "key" in panel and request.headers.get("authorization", "") != f"Bearer {panel['key']}":
            return web.json_response({"success": False, "message": "access token invalid"}, status=401)
        if "status" in panel:
            return web.json_response({"error": "mock panel status"}, status=panel["status"])
        quota = panel.get("quota", 0)
        if page == "v1/usage":
            remaining = panel.get("remaining", quota / 500_000)
            return web.json_response({"mode": "unrestricted", "isValid": True, "remaining": remaining,
                                      "unit": "USD", "balance": remaining})
        if panel.get("success") is False:
            return web.json_response({"success": False, "message": "access token invalid"})
        return web.json_response({"success": True, "message": "", "data": {
            "id": 1, "username": "mock", "quota": quota, "used_quota": panel.get("used_quota", 0)}})

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
                      outcome="pending", model=None, usage=None)
        self.state.log.append(record)
        self.state.counts[endpoint] += 1
        call = Call(request, endpoint, path, body, record, self.state.take_fault(endpoint, _presented_key(request)),
                    self.state.profiles.get(endpoint))
        state = self.state
        limit = call.fault.get("max_inflight")
        if limit is not None and state.inflight[endpoint] >= limit:  # a relay at its own limit
            refusal = self.error(call, 429, "rate_limit_error",
                                 f"Mock relay: at most {limit} requests at once")
            record.update(outcome="429", request_id=refusal.headers.get("request-id"))
            return refusal
        state.inflight[endpoint] += 1
        state.peak[endpoint] = max(state.peak[endpoint], state.inflight[endpoint])
        try:
            resp = await self.serve(call)
        except asyncio.CancelledError:
            if record["outcome"] == "pending":
                record["outcome"] = "client_closed"
            raise
        finally:
            state.inflight[endpoint] -= 1
        if record["outcome"] == "pending":
            record["outcome"] = str(resp.status)
        record["request_id"] = resp.headers.get("request-id")
        if type(resp) is web.Response and not resp.prepared and isinstance(resp.body, bytes) \
                and resp.body and not call.was_reset:
            if call.profile.get("escape_model") and isinstance(record["model"], str):
                resp.body = escape_model(resp.body, record["model"])
            if call.profile.get("gzip"):
                resp.body = gzip_body(resp.body)
                resp.headers["content-encoding"] = "gzip"
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
            return self.count_tokens(call)
        if path == "/v1/models" and method == "GET":
            return self.json(call, self.models_body(call))
        if path.startswith("/v1/models/") and method == "GET" and "models" in call.profile:
            model = path[len("/v1/models/"):]
            if model in call.profile["models"]:
                return self.json(call, self.model_info(model))
            return self.error(call, 404, None, f"model: {model}")
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

    def error(self, call: Call, status: int, etype: str | None, message: str | None,
              extra_headers: dict[str, str] | None = None) -> web.Response:
        etype = etype or ERROR_TYPES.get(status, "api_error")
        headers = self.headers(call, JSON_CT)
        if extra_headers:
            headers.update(extra_headers)
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

    # -- profiles ----------------------------------------------------------
    def models_body(self, call: Call) -> dict[str, Any]:
        models = call.profile.get("models")
        if models is None:
            return MODELS_BODY
        return {"data": [self.model_info(m) for m in models], "has_more": False,
                "first_id": models[0], "last_id": models[-1]}

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        return {"type": "model", "id": model, "display_name": model,
                "created_at": "2025-09-29T00:00:00Z"}

    def refusal(self, call: Call, payload: dict[str, Any]) -> web.Response | None:
        """The error this endpoint's profile gives this request (None: serve it)."""
        profile = call.profile
        messages = call.path == "/v1/messages"
        model = payload.get("model")
        if "models" in profile:
            if not isinstance(model, str) or not model:
                return self.error(call, 400, None, "model: Field required")
            if model not in profile["models"]:
                return self.error(call, 404, None, f"model: {model}")
        if messages and isinstance(model, str):
            for family, limit in profile.get("family_limits", {}).items():
                if family.lower() in model.lower():
                    status = limit.get("status", 429)
                    etype = limit.get("error_type") or ERROR_TYPES.get(status, "api_error")
                    message = limit.get("message") or (
                        "Overloaded" if status == 529 else
                        f"This request would exceed the rate limit for {family} models")
                    extra = ({"retry-after": str(limit["retry_after"])}
                             if "retry_after" in limit else None)
                    return self.error(call, status, etype, message, extra)
        if profile.get("reject_betas"):
            bad = [b for b in request_betas(call.request) if b in profile["reject_betas"]]
            if bad:
                values = ", ".join(f"'{b}'" for b in dict.fromkeys(bad))
                return self.error(call, 400, None,
                                  f"Unexpected value(s) {values} for the 'anthropic-beta' header")
        if profile.get("reject_cache_ttl"):
            where = ttl_path(payload)
            if where is not None:
                return self.error(call, 400, None,
                                  f"{where}.cache_control.ttl: Extra inputs are not permitted")
        if messages and "sign_thinking" in profile:
            message = thinking_error(payload, profile["sign_thinking"])
            if message is not None:
                return self.error(call, 400, None, message)
        return None

    def thinking(self, call: Call, payload: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
        """(content block, thinking text) when this relay answers with thinking."""
        secret = call.profile.get("sign_thinking")
        thinking = payload.get("thinking")
        if secret is None or not (isinstance(thinking, dict)
                                  and thinking.get("type") in THINKING_TYPES):
            return None
        text = f"The user said: {user_text(payload)}. I will answer from {call.endpoint}."
        if call.profile.get("redact_thinking"):
            return {"type": "redacted_thinking", "data": redacted_data(secret)}, text
        return {"type": "thinking", "thinking": text,
                "signature": sign_thinking(secret, text)}, text

    def count_tokens(self, call: Call) -> web.Response:
        payload = call.payload
        if isinstance(payload, dict):
            model = payload.get("model")
            call.record["model"] = model if isinstance(model, str) else None
            if call.profile:
                refused = self.refusal(call, payload)
                if refused is not None:
                    return refused
                if call.profile.get("cache"):
                    return self.json(call, {"input_tokens": prompt_tokens(payload)})
        return self.json(call, {"input_tokens": call.input_tokens()})

    # -- messages ----------------------------------------------------------
    async def messages(self, call: Call) -> web.StreamResponse:
        payload = call.payload
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            msg = "messages: Field required" if isinstance(payload, dict) else "Invalid JSON body"
            return self.error(call, 400, None, msg)
        call.record["model"] = payload["model"] if isinstance(payload.get("model"), str) else None
        stream_error = call.fault.get("stream_error")
        if stream_error and not payload.get("stream"):
            return self.error(call, ERROR_STATUS.get(stream_error, 500), stream_error,
                              call.fault.get("message"))
        thinking = None
        if call.profile:
            refused = self.refusal(call, payload)
            if refused is not None:
                return refused
            thinking = self.thinking(call, payload)
        model = payload.get("model") or DEFAULT_MODEL
        text = self.reply_text(call, payload)
        usage = self.message_usage(call, payload, text, thinking and thinking[1])
        call.record["usage"] = usage
        block = thinking and thinking[0]
        if payload.get("stream") is True:
            return await self.stream(call, model, text, usage, block)
        return self.json(call, {
            "id": _rand_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": ([block] if block else []) + [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        })

    def message_usage(self, call: Call, payload: dict[str, Any], text: str,
                      thinking_text: str | None) -> dict[str, Any]:
        profile = call.profile
        output = profile.get("output_tokens")
        if output is None:
            output = len(_WORD_RE.findall(text))
            if thinking_text:
                output += len(_WORD_RE.findall(thinking_text))
        elif isinstance(most := payload.get("max_tokens"), int) and most > 0:
            output = min(output, most)  # a fixed output never exceeds max_tokens (a 1-token probe)
        if not profile.get("cache"):
            return self.usage(call.input_tokens(), output)
        usage = self.state.prompt_usage(call.endpoint, profile, payload)
        return {"input_tokens": usage.pop("input_tokens"), "output_tokens": output, **usage}

    @staticmethod
    def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
        return {"input_tokens": input_tokens, "output_tokens": output_tokens,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

    def sse_events(self, call: Call, model: str, text: str, usage: dict[str, Any] | None = None,
                   thinking: dict[str, Any] | None = None) -> list[bytes]:
        words = _WORD_RE.findall(text)
        if usage is None:
            usage = self.usage(call.input_tokens(), len(words))
        message = {"id": _rand_id("msg_"), "type": "message", "role": "assistant",
                   "model": model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {**usage, "output_tokens": 1}}
        events = [_sse("message_start", {"type": "message_start", "message": message})]
        if call.profile.get("escape_model"):
            events[0] = escape_model(events[0], model)
        index = 0
        if thinking is not None:
            events += self.thinking_events(thinking)
            index = 1
        events += [
            _sse("content_block_start", {"type": "content_block_start", "index": index,
                                         "content_block": {"type": "text", "text": ""}}),
        ]
        events.insert(2, _sse("ping", {"type": "ping"}))  # after the first content_block_start
        pad = call.fault.get("event_bytes", 0)
        events += [_sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                "delta": {"type": "text_delta",
                                                          "text": w.ljust(pad, ".")}})
                   for w in words]
        events += [
            _sse("content_block_stop", {"type": "content_block_stop", "index": index}),
            _sse("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                   "usage": {"output_tokens": usage["output_tokens"]}}),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        return events

    @staticmethod
    def thinking_events(block: dict[str, Any]) -> list[bytes]:
        """Index 0 events of a thinking (deltas per word, then the signature) or redacted block."""
        if block["type"] == "redacted_thinking":
            events = [_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": block})]
        else:
            events = [_sse("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""}})]
            events += [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "thinking_delta",
                                                              "thinking": w}})
                       for w in _WORD_RE.findall(block["thinking"])]
            events.append(_sse("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "signature_delta", "signature": block["signature"]}}))
        return events + [_sse("content_block_stop", {"type": "content_block_stop", "index": 0})]

    async def stream(self, call: Call, model: str, text: str, usage: dict[str, Any] | None = None,
                     thinking: dict[str, Any] | None = None) -> web.StreamResponse:
        events = self.sse_events(call, model, text, usage, thinking)
        headers = self.headers(call, "text/event-stream")
        headers["cache-control"] = "no-cache"
        resp = web.StreamResponse(status=200, headers=headers)
        if call.profile.get("gzip"):
            resp = GzipStream(status=200, headers=headers)
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
        write_timeout = fault.get("write_timeout_ms", 0) / 1000 or None
        stamp = fault.get("stamp_events", False)
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
            event = events[i]
            if stamp:  # '...}\n\n' -> '...,"mock_t":123.456789}\n\n'
                event = b'%s,"mock_t":%.6f}\n\n' % (event[:-3], time.monotonic())
            try:
                async with asyncio.timeout(write_timeout):
                    await resp.write(event)
            except TimeoutError:  # the client stopped reading: give up on it, as relays do
                self.give_up(call)
                return "write_timeout"
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

    def give_up(self, call: Call) -> None:
        """Close the connection (a plain close, no RST) after a write that never drained."""
        call.was_reset = True  # nothing more is written, and it is not the client's close
        transport = call.request.transport
        if transport is not None:
            transport.abort()

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
        if kind == "profiles":
            return await self.control_profiles(request, method, name)
        if kind == "cache" and method == "GET":
            state = self.state
            if name is not None:
                return web.json_response(state.cache_entries(name))
            return web.json_response({ep: state.cache_entries(ep) for ep in list(state.caches)})
        if kind == "cache" and method == "DELETE":
            if name is None:
                self.state.caches.clear()
            else:
                self.state.caches.pop(name, None)
            return web.json_response({"ok": True})
        if kind == "requests" and method == "GET":
            ep = request.query.get("endpoint")
            return web.json_response([r for r in self.state.log if ep is None or r["endpoint"] == ep])
        if kind == "requests" and method == "DELETE":
            self.state.log.clear()
            return web.json_response({"ok": True})
        if kind == "balances" and name is not None and method in ("PUT", "POST"):
            try:
                panel = json.loads(await request.read())
            except ValueError:
                panel = None
            if not isinstance(panel, dict):
                return web.json_response({"error": "balance panel must be a JSON object"}, status=400)
            polls = self.state.balances.get(name, {}).get("polls", 0)
            self.state.balances[name] = {**panel, "polls": polls}
            return web.json_response({"ok": True, "endpoint": name, "balance": self.state.balances[name]})
        if kind == "balances" and method == "GET":
            return web.json_response(self.state.balances if name is None else self.state.balances.get(name))
        if kind == "stats" and method == "GET":
            return web.json_response(self.state.stats())
        if kind == "inflight" and method == "GET":
            return web.json_response({"now": dict(+self.state.inflight), "peak": dict(self.state.peak)})
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

    async def control_profiles(self, request: web.Request, method: str,
                               name: str | None) -> web.Response:
        profiles = self.state.profiles
        if method == "GET":
            return web.json_response(profiles if name is None else profiles.get(name))
        if method == "DELETE":
            if name is None:
                profiles.clear()
            else:
                profiles.pop(name, None)
            return web.json_response({"ok": True})
        if method in ("PUT", "POST") and name is not None:
            try:
                profile = validate_profile(json.loads(await request.read()))
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            if profile:
                profiles[name] = profile
            else:
                profiles.pop(name, None)
            log.debug("profile %s = %s", name, profile)
            return web.json_response({"ok": True, "endpoint": name, "profile": profile})
        return web.json_response({"error": "use PUT/DELETE /_mock/profiles/<endpoint>"},
                                 status=405)


async def start(host: str = "127.0.0.1", port: int = 0, *, event_gap_ms: int = 0,
                faults: dict[str, dict[str, Any]] | None = None,
                max_log: int = 100_000,
                profiles: dict[str, dict[str, Any]] | None = None) -> tuple[MockRelay, int]:
    """Start a relay in the running loop; returns (relay, port). Stop with relay.stop()."""
    relay = MockRelay(event_gap_ms, max_log)
    for name, fault in (faults or {}).items():
        relay.state.faults[name] = validate_fault(fault)
    for name, profile in (profiles or {}).items():
        if profile := validate_profile(profile):
            relay.state.profiles[name] = profile
    return relay, await relay.start(host, port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Mock Claude API relay (see module docstring).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--fault", action="append", type=parse_fault_arg, default=[],
                   metavar="NAME=STATUS|NAME=JSON", help="initial fault for an endpoint")
    p.add_argument("--profile", action="append", type=parse_profile_arg, default=[],
                   metavar="NAME=JSON", help="profile of an endpoint (see module docstring)")
    p.add_argument("--event-gap-ms", type=int, default=0, help="default gap between SSE events")
    p.add_argument("--max-log", type=int, default=100_000,
                   help="keep at most N request records (0 = unlimited)")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    relay, port = await start(args.host, args.port, event_gap_ms=args.event_gap_ms,
                              faults=dict(args.fault), max_log=args.max_log,
                              profiles=dict(args.profile))
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
    for name, profile in args.profile:
        log.info("profile %s = %s", name, profile)
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
