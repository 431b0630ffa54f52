"""Server-sent events, as far as the router needs them: has a Claude stream started well?

A stream may open with 200 and then say `event: error`, or end, before any content. The router
holds such a stream until the first content event so the client never sees a bad start.
"""

import json
from dataclasses import dataclass

# Events that carry no answer yet. Everything else (content_block_*, message_delta, unknown
# event names) counts as content: once it is seen, the stream goes to the client.
PRELUDE = frozenset({"message_start", "ping"})


@dataclass(frozen=True)
class Start:
    """How a stream's opening bytes look so far."""

    content: bool = False  # a content event was seen: deliver
    error_type: str | None = None  # an `event: error` came first: fail over
    error_message: str = ""


def scan_start(buf: bytes) -> Start:
    """Look at the complete events at the start of ``buf``; pure and restartable."""
    for block in buf.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        name, data = _event(block)
        if name is None:
            continue  # comments / keep-alives
        if name == "error":
            return Start(error_type=_error_type(data) or "api_error", error_message=_message(data))
        if name not in PRELUDE:
            return Start(content=True)
    return Start()


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


def _error_type(data: bytes) -> str | None:
    try:
        etype = json.loads(data)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None
    return etype if isinstance(etype, str) else None


def _message(data: bytes) -> str:
    try:
        msg = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return msg[:200] if isinstance(msg, str) else ""
