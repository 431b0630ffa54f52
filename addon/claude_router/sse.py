"""Server-sent events, as far as the router needs them: has a Claude stream started well?

A stream may open with 200 and then say `event: error`, or end, before any content. The router
holds such a stream until the first content event so the client never sees a bad start.
`StartScanner` looks at each complete event once, as the bytes arrive (many small `ping`
events cost linear time, not a re-scan of everything held on every chunk).
"""

import json
from dataclasses import dataclass

# Events that carry no answer yet. Everything else (content_block_*, message_delta, unknown
# event names) counts as content: once it is seen, the stream goes to the client.
PRELUDE = frozenset({"message_start", "ping"})
_COMPACT = 64 * 1024  # drop scanned bytes once this many have piled up


@dataclass(frozen=True)
class Start:
    """How a stream's opening bytes look so far."""

    content: bool = False  # a content event was seen: deliver
    error_type: str | None = None  # an `event: error` came first: fail over
    error_message: str = ""


UNDECIDED = Start()


class StartScanner:
    """Feed it a stream's (decoded) opening chunk by chunk; it says when the start is decided."""

    __slots__ = ("_buf", "_pos", "_search", "_cr")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # start of the first event not looked at yet
        self._search = 0  # where to look for the next blank line
        self._cr = False  # the last chunk ended in CR

    def feed(self, chunk: bytes) -> Start:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if 13 in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buf = self._buf
        buf += chunk
        while True:
            end = buf.find(b"\n\n", self._search)
            if end < 0:
                self._search = max(self._pos, len(buf) - 1)
                break
            block = bytes(buf[self._pos:end])
            self._pos = self._search = end + 2
            start = _judge(block)
            if start is not UNDECIDED:
                return start
        if self._pos > _COMPACT:
            del buf[:self._pos]
            self._search -= self._pos
            self._pos = 0
        return UNDECIDED


def scan_start(buf: bytes) -> Start:
    """Look at the complete events at the start of ``buf`` (pure; for tests and one-offs)."""
    return StartScanner().feed(buf)


def _judge(block: bytes) -> Start:
    name, data = _event(block)
    if name is None:
        return UNDECIDED  # comments / keep-alives
    if name == "error":
        return Start(error_type=_error_type(data) or "api_error", error_message=_message(data))
    if name not in PRELUDE:
        return Start(content=True)
    return UNDECIDED


def _event(block: bytes) -> tuple[str | None, bytes]:
    name, data = None, b""
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data += line[5:].strip()
    if name is None and data:
        name = "message"  # the SSE default event type
    return name, data


def _error(data: bytes) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else {}


def _error_type(data: bytes) -> str | None:
    etype = _error(data).get("type")
    return etype if isinstance(etype, str) else None


def _message(data: bytes) -> str:
    msg = _error(data).get("message")
    return msg[:200] if isinstance(msg, str) else ""
