"""Endpoint profiles: which models an endpoint serves, under which ids, and which request
features it rejects; and the request and answer rewrites that follow from them.

Pure functions over bytes and parsed JSON. A request body is changed only where a profile
says so, and then as little as possible: a model id is replaced in place (every other byte
stays, so prompt caching still works); features an endpoint rejects are removed for that
endpoint only.
"""

import fnmatch
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import decoding

FAMILIES = ("opus", "sonnet", "haiku")


@dataclass(frozen=True)
class Profile:
    """What an endpoint serves and rejects (all optional; the default serves everything)."""

    models: tuple[str, ...] = ()  # glob patterns of client model ids; empty: every model
    model_map: tuple[tuple[str, str], ...] = ()  # client id -> the endpoint's id
    drop_betas: tuple[str, ...] = ()  # anthropic-beta values removed for this endpoint
    cache_ttl: bool = True  # False: cache_control.ttl (1-hour caches) is removed

    def serves(self, model: str | None) -> bool:
        if not self.models or model is None:
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def upstream_model(self, model: str) -> str:
        for client, upstream in self.model_map:
            if client == model:
                return upstream
        return model

    def client_model(self, upstream: str) -> str | None:
        """The client id an endpoint id stands for (None when it is not mapped)."""
        for client, up in self.model_map:
            if up == upstream:
                return client
        return None

    @property
    def rewrites(self) -> bool:
        return bool(self.model_map or self.drop_betas or not self.cache_ttl)


DEFAULT = Profile()


def family(model: str | None) -> str | None:
    """The model family whose rate limits a model shares (Anthropic limits per family)."""
    if not model:
        return None
    lowered = model.lower()
    for name in FAMILIES:
        if name in lowered:
            return name
    return None


# -- the request for one endpoint ------------------------------------------------------------


def request_body(body: bytes, doc: dict | None, profile: Profile) -> bytes:
    """The body this endpoint gets: the model id mapped (in place), and 1-hour cache TTLs
    removed if it does not support them. Unchanged when nothing applies."""
    if doc is None or not profile.rewrites:
        return body
    if not profile.cache_ttl and _has_ttl(doc):
        doc = _without_ttl(doc)
        model = doc.get("model")
        if isinstance(model, str):
            doc = {**doc, "model": profile.upstream_model(model)}
        return json.dumps(doc, separators=(",", ":")).encode()  # ASCII: lone surrogates stay escaped
    model = doc.get("model")
    if isinstance(model, str) and (mapped := profile.upstream_model(model)) != model:
        return replace_top_level_string(body, "model", mapped) or body
    return body


def request_headers(headers: list[tuple[str, str]], profile: Profile) -> list[tuple[str, str]]:
    """Drop the anthropic-beta values this endpoint rejects (the header goes if none remain)."""
    if not profile.drop_betas:
        return headers
    drop = {b.lower() for b in profile.drop_betas}
    out = []
    for k, v in headers:
        if k.lower() == "anthropic-beta":
            kept = [b.strip() for b in v.split(",") if b.strip() and b.strip().lower() not in drop]
            if not kept:
                continue
            v = ",".join(kept)
        out.append((k, v))
    return out


def _blocks(doc: dict):
    """The blocks that may carry ``cache_control``: tools, system blocks, message content
    blocks (never what is inside them, such as a tool's input)."""
    for key in ("tools", "system"):
        if isinstance(doc.get(key), list):
            yield from (b for b in doc[key] if isinstance(b, dict))
    for m in doc.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            yield from (b for b in m["content"] if isinstance(b, dict))


def _has_ttl(doc: dict) -> bool:
    return any(isinstance(cc := b.get("cache_control"), dict) and "ttl" in cc for b in _blocks(doc))


def _without_ttl(doc: dict) -> dict:
    def strip(b: dict) -> dict:
        cc = b.get("cache_control")
        if isinstance(cc, dict) and "ttl" in cc:
            return {**b, "cache_control": {k: v for k, v in cc.items() if k != "ttl"}}
        return b

    out = dict(doc)
    for key in ("tools", "system"):
        if isinstance(out.get(key), list):
            out[key] = [strip(b) if isinstance(b, dict) else b for b in out[key]]
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {**m, "content": [strip(b) if isinstance(b, dict) else b for b in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m
            for m in out["messages"]]
    return out


# -- thinking signatures ---------------------------------------------------------------------

_SIGNATURE = re.compile(r"signature", re.I)
_THINKING = re.compile(r"thinking", re.I)


def is_signature_rejection(status: int, error_type: str | None, message: str) -> bool:
    """A 400 saying a thinking block's signature is not valid here (another relay signed it)."""
    return (status == 400 and error_type in (None, "invalid_request_error")
            and bool(_SIGNATURE.search(message)) and bool(_THINKING.search(message)))


def without_thinking(doc: dict) -> dict | None:
    """The request with ``thinking``/``redacted_thinking`` blocks removed from its assistant
    turns; None if there is nothing to strip.

    With thinking on, the API requires the last assistant turn, when it holds a ``tool_use``
    (a tool-use loop), to open with a thinking block. Stripping removes that block (Claude
    Code's usual ``[thinking, text, tool_use]`` becomes ``[text, tool_use]``), so thinking is
    then turned off for this request, with what only works with it on (see `thinking_off`)."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        return None
    stripped, changed = [], False
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant" and isinstance(msg.get("content"), list):
            kept = [b for b in msg["content"]
                    if not (isinstance(b, dict) and b.get("type") in THINKING_BLOCKS)]
            if len(kept) != len(msg["content"]):
                changed = True
                msg = {**msg, "content": kept}
        stripped.append(msg)
    if not changed:
        return None
    out = {**doc, "messages": stripped}
    if thinking_on(out) and needs_thinking_first(stripped):
        out = thinking_off(out)
    return out


THINKING_BLOCKS = ("thinking", "redacted_thinking")


def thinking_on(doc: dict) -> bool:
    thinking = doc.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") != "disabled"


def last_assistant_turn(messages: list) -> list:
    """The content blocks of the last assistant turn (consecutive assistant messages count as
    one turn, as the API merges them); string content is one text block."""
    end = next((i for i in range(len(messages) - 1, -1, -1)
                if isinstance(messages[i], dict) and messages[i].get("role") == "assistant"), None)
    if end is None:
        return []
    start = end
    while start > 0 and isinstance(messages[start - 1], dict) and messages[start - 1].get("role") == "assistant":
        start -= 1
    blocks: list = []
    for msg in messages[start:end + 1]:
        content = msg.get("content")
        if isinstance(content, str):
            blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            blocks.extend(content)
    return blocks


def needs_thinking_first(messages: list) -> bool:
    """Whether, with thinking on, the API would refuse these messages: the last assistant turn
    holds a ``tool_use`` but does not open with a thinking or redacted_thinking block."""
    blocks = last_assistant_turn(messages)
    if not any(isinstance(b, dict) and b.get("type") == "tool_use" for b in blocks):
        return False
    first = blocks[0] if blocks else None
    return not (isinstance(first, dict) and first.get("type") in THINKING_BLOCKS)


def thinking_off(doc: dict) -> dict:
    """The request with thinking turned off: no ``thinking`` parameter, and no context
    management edit that only works with thinking on (``clear_thinking_*``)."""
    out = {k: v for k, v in doc.items() if k != "thinking"}
    cm = out.get("context_management")
    if isinstance(cm, dict) and isinstance(cm.get("edits"), list):
        edits = [e for e in cm["edits"]
                 if not (isinstance(e, dict) and isinstance(e.get("type"), str)
                         and e["type"].startswith("clear_thinking"))]
        if len(edits) != len(cm["edits"]):
            if edits or set(cm) - {"edits"}:
                out["context_management"] = {**cm, "edits": edits}
            else:
                out.pop("context_management")
    return out


# -- answers: the client's model id back -----------------------------------------------------


def answer_json(body: bytes, upstream: str, client: str) -> bytes:
    """A JSON answer with the endpoint's model id replaced by the one the client asked for.
    The id is compared decoded (``"claude\\/x"`` and ``"\\u0063laude/x"`` are ``claude/x``);
    every other byte stays."""
    if upstream == client or (b'"model"' not in body and b"\\u" not in body):
        return body
    return replace_top_level_string(body, "model", client, only_if=upstream) or body


def answer_stream_opening(held: bytes, upstream: str, client: str) -> bytes:
    """The held (decoded) opening of a stream with ``message_start``'s ``message.model``
    replaced when it is the endpoint's id (compared decoded, however it is escaped). The event
    is found by parsing the stream's lines (LF, CRLF or CR); only that value's bytes change,
    unless the event's data spans several lines (then it is written again as one line)."""
    if upstream == client:
        return held
    for name, data in _opening_events(held):
        if not data:
            continue
        try:
            doc = json.loads(b"\n".join(held[a:b] for a, b in data))
        except (ValueError, RecursionError):
            return held
        if not isinstance(doc, dict) or (name != b"message_start" and doc.get("type") != "message_start"):
            continue
        message = doc.get("message")
        if not isinstance(message, dict) or message.get("model") != upstream:
            return held
        if len(data) == 1:
            a, b = data[0]
            value = held[a:b]
            span = top_level_span(value, "message")
            if span is not None:
                s, e = span
                inner = replace_top_level_string(value[s:e], "model", client, only_if=upstream)
                if inner is not None:
                    return held[:a] + value[:s] + inner + value[e:] + held[b:]
        # Several data lines (or an odd shape): the event's data again, as one line.
        line = b"data: " + json.dumps({**doc, "message": {**message, "model": client}},
                                      ensure_ascii=False, separators=(",", ":")).encode()
        first, last = data[0][0] - _data_prefix(held, data[0][0]), data[-1][1]
        return held[:first] + line + held[last:]
    return held


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _opening_events(held: bytes):
    """Per complete event at the start of a stream: its name (``event:``, None if absent) and
    the byte spans of its data lines' values (after ``data:`` and one optional space). Events
    not yet ended by a blank line are left out: their last line may be cut."""
    name: bytes | None = None
    data: list[tuple[int, int]] = []
    pos = 0
    for m in _LINE_END.finditer(held):
        line_start, line_end = pos, m.start()
        pos = m.end()
        if line_start == line_end:  # a blank line ends the event
            yield name, data
            name, data = None, []
            continue
        if held.startswith(b"event:", line_start):
            name = held[line_start + 6:line_end].strip()
        elif held.startswith(b"data", line_start):
            colon = line_start + 4
            if colon == line_end:
                data.append((line_end, line_end))
            elif held[colon] == 0x3A:  # :
                value = colon + 1
                if value < line_end and held[value] == 0x20:
                    value += 1
                data.append((value, line_end))


def _data_prefix(held: bytes, value: int) -> int:
    """How many bytes of ``data:`` (and its space) precede a data value at ``value``."""
    i = value
    while i > 0 and held[i - 1] not in b"\r\n":
        i -= 1
    return value - i


def answer_body(body: bytes, coding: str, upstream: str, client: str) -> bytes | None:
    """A complete JSON answer, perhaps content-coded, with the client's model id: decoded
    when it had to be decoded to be rewritten (the client then gets it without
    ``content-encoding``); None when nothing changes or its coding cannot be read (the bytes
    then go to the client as sent)."""
    if upstream == client:
        return None
    if coding:
        plain = decoding.whole(body, coding)
        if plain is None:
            return None
    else:
        plain = body
    out = answer_json(plain, upstream, client)
    return None if out is plain else out


def answer_opening(held: bytes, coding: str, upstream: str, client: str
                   ) -> tuple[bytes, decoding.Inflater | None] | None:
    """A stream's held opening, perhaps content-coded, with the client's model id in
    ``message_start``: (the new opening, decoded; the decoder for the rest of the stream when
    it was content-coded, which then reaches the client decoded). None when nothing changes
    or the coding cannot be read (every byte then goes to the client as sent)."""
    if upstream == client:
        return None
    inflater = None
    if coding:
        inflater = decoding.Inflater(coding)
        pieces, size = [], 0
        for piece in inflater.feed(held):
            size += len(piece)
            if size > decoding.LIMIT * 4:
                return None
            pieces.append(piece)
        if inflater.broken:
            return None
        plain = b"".join(pieces)
    else:
        plain = held
    out = answer_stream_opening(plain, upstream, client)
    return None if out is plain else (out, inflater)


# -- byte-exact edits of a top-level JSON string value ---------------------------------------


def replace_top_level_string(body: bytes, key: str, value: str, only_if: str | None = None) -> bytes | None:
    """``body`` with the string value of top-level ``key`` replaced, every other byte as it
    was; None when the body is not an object with such a string value."""
    span = top_level_span(body, key)
    if span is None:
        return None
    start, end = span
    if body[start:start + 1] != b'"':
        return None
    if only_if is not None:
        try:
            if json.loads(body[start:end]) != only_if:
                return None
        except ValueError:
            return None
    return body[:start] + json.dumps(value, ensure_ascii=False).encode() + body[end:]


_WS = b" \t\r\n"


def top_level_span(body: bytes, key: str) -> tuple[int, int] | None:
    """Byte span of the value of ``key`` in a top-level JSON object, without parsing values
    (a small scanner: strings with escapes, nesting by brackets)."""
    n, i = len(body), 0
    while i < n and body[i] in _WS:
        i += 1
    if i >= n or body[i] != 0x7B:  # {
        return None
    i += 1
    want = key.encode()
    found = None
    while i < n:
        while i < n and body[i] in _WS or (i < n and body[i] == 0x2C):  # whitespace and commas
            i += 1
        if i >= n or body[i] == 0x7D:  # }
            return found
        if body[i] != 0x22:
            return None
        kend = _string_end(body, i)
        if kend < 0:
            return None
        name = body[i + 1:kend - 1]
        i = kend
        while i < n and body[i] in _WS:
            i += 1
        if i >= n or body[i] != 0x3A:  # :
            return None
        i += 1
        while i < n and body[i] in _WS:
            i += 1
        vstart = i
        vend = _value_end(body, i)
        if vend < 0:
            return None
        if name == want or (b"\\" in name and _unescape(name) == key):
            found = (vstart, vend)  # keep looking: with duplicate keys the last one counts
        i = vend
    return found


def _string_end(body: bytes, i: int) -> int:
    """Index just past the string starting at ``body[i] == '"'``; -1 if unterminated."""
    j = i + 1
    while True:
        q = body.find(b'"', j)
        if q < 0:
            return -1
        k, slashes = q - 1, 0
        while k > i and body[k] == 0x5C:
            slashes += 1
            k -= 1
        if slashes % 2 == 0:
            return q + 1
        j = q + 1


def _value_end(body: bytes, i: int) -> int:
    n = len(body)
    if i >= n:
        return -1
    c = body[i]
    if c == 0x22:
        return _string_end(body, i)
    if c in (0x7B, 0x5B):  # { [
        depth, j = 0, i
        while j < n:
            c = body[j]
            if c == 0x22:
                j = _string_end(body, j)
                if j < 0:
                    return -1
                continue
            if c in (0x7B, 0x5B):
                depth += 1
            elif c in (0x7D, 0x5D):
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return -1
    j = i
    while j < n and body[j] not in b",}" and body[j] not in _WS:
        j += 1
    return j


def _unescape(raw: bytes) -> str | None:
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None


def union_models(lists: Iterable[Sequence[dict]], profiles: Sequence[Profile]) -> list[dict]:
    """The models list a client gets: what each endpoint reports, in client ids, limited to
    what its profile serves, without duplicates, in endpoint order."""
    seen, out = set(), []
    for models, profile in zip(lists, profiles):
        for m in models:
            if not isinstance(m, dict) or not isinstance(m.get("id"), str):
                continue
            cid = profile.client_model(m["id"]) or m["id"]
            if not profile.serves(cid) or cid in seen:
                continue
            seen.add(cid)
            out.append({**m, "id": cid})
    return out
