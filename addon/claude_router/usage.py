"""Token usage of Claude answers, read as they pass, and what it costs.

A non-streaming answer carries its ``usage`` in the JSON body. A stream reports it in two
events: ``message_start`` (input and cache tokens) and ``message_delta`` (output tokens so far,
cumulative). ``StreamUsage`` watches the raw chunks on their way to the client: it only looks,
never holds a byte back, and passes over the many content events without decoding them.
"""

import json
from dataclasses import dataclass, replace
from typing import Any

FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Anthropic's published multipliers of the base input price: 5-minute cache writes, cache hits.
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1
# A held partial event larger than this is dropped: a usage event is well under 1 KiB, so only
# content (or garbage) gets that big, and it must not grow the proxy's memory.
MAX_PARTIAL = 1 << 20
# A tuple: held names are bytearrays (unhashable). message_stop and error are read too (once
# per stream at most), so the router can tell a complete stream from a cut one.
_WANTED = (b"message_start", b"message_delta", b"message_stop", b"error")
_CONTENT = b"event: content_block_delta\n"  # nearly every event of a stream: skipped first


@dataclass(frozen=True)
class Usage:
    """Token counts as the API reports them. ``input_tokens`` excludes cached tokens: the three
    input counts add up to the prompt, and each is billed at its own price."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(self.input_tokens + other.input_tokens,
                     self.output_tokens + other.output_tokens,
                     self.cache_creation_input_tokens + other.cache_creation_input_tokens,
                     self.cache_read_input_tokens + other.cache_read_input_tokens)

    @property
    def total(self) -> int:
        """Every token the request moved: prompt (fresh, cache write, cache read) plus output."""
        return (self.input_tokens + self.output_tokens + self.cache_creation_input_tokens
                + self.cache_read_input_tokens)


def from_json(body: bytes) -> Usage | None:
    """The ``usage`` of a non-streaming Messages answer; None when it has none (an error body,
    another API, a truncated or garbled body)."""
    doc = _loads(body)
    counts = _counts(doc.get("usage")) if isinstance(doc, dict) else {}
    return Usage(**counts) if counts else None


class StreamUsage:
    """The usage of one SSE stream, fed its raw chunks as they pass.

    Any chunking works, and LF, CRLF or CR line ends. Content events are skipped by their
    ``event:`` line, never decoded. At most one partial event is held, and only one that may
    carry usage (bounded by MAX_PARTIAL); everything else is dropped as soon as it is seen.
    """

    __slots__ = ("_usage", "_buf", "_open", "_skip", "_nl", "_cr", "stopped", "errored")

    def __init__(self) -> None:
        self.stopped = False  # a message_stop event was seen
        self.errored = False  # an error event was seen
        self._usage: Usage | None = None
        self._buf = bytearray()  # the start of an event that may carry usage; never starts with LF
        self._open = False  # the held event's first line is complete and says it is worth holding
        self._skip = False  # inside an event we do not need: drop bytes up to its blank line
        self._nl = False  # while skipping: the last byte dropped was a line end
        self._cr = False  # the last chunk ended in CR: an LF opening the next one is the same end

    @property
    def usage(self) -> Usage | None:
        """Input and cache tokens from ``message_start``; output tokens from the last
        ``message_delta`` (from ``message_start`` until one arrives); None until either is seen.
        Non-zero input or cache counts in a ``message_delta`` replace the start's."""
        return self._usage

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of the stream. Never raises: a bug here may cost a count, never
        the client's stream. One method, not two, as it runs for every chunk of every stream."""
        if not chunk:
            return
        try:
            if self._cr:
                self._cr = False
                if chunk[:1] == b"\n":
                    chunk = chunk[1:]
                    if not chunk:
                        return
            if 13 in chunk:  # an int: memchr, far cheaper than ``b"\r" in chunk``
                # A trailing CR is taken as a line end now; a LF opening the next chunk is dropped.
                self._cr = chunk.endswith(b"\r")
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if self._skip:
                pos = self._skip_event(chunk)
                if pos < 0:
                    return
            elif self._buf:
                pos = self._finish_held(chunk)
                if pos < 0:
                    return
            else:
                pos = 0
            # The complete events, inline: this loop runs for every event of every stream.
            find, n = chunk.find, len(chunk)
            while pos < n:
                end = find(b"\n\n", pos)
                if end < 0:
                    self._hold(chunk, pos)
                    return
                if not chunk.startswith(_CONTENT, pos):
                    if not chunk.startswith(b"event:", pos):
                        self._event(chunk[pos:end])  # comments, blank lines, or no event line: look
                    elif chunk[pos + 6:find(b"\n", pos)].strip() in _WANTED:
                        self._event(chunk[pos:end])
                pos = end + 2
        except Exception:
            self._drop(False)

    # -- the scanner's slow paths: partial events ------------------------------------------------

    def _skip_event(self, chunk: bytes) -> int:
        """Drop the rest of an unwanted event; return where the next one starts, or -1."""
        if self._nl and chunk[:1] == b"\n":
            after = 1
        else:
            end = chunk.find(b"\n\n")
            if end < 0:
                self._nl = chunk.endswith(b"\n")
                return -1
            after = end + 2
        self._skip = False
        return after

    def _finish_held(self, chunk: bytes) -> int:
        """Extend the held event with ``chunk``; return where the next event starts, or -1."""
        buf = self._buf
        if buf.endswith(b"\n") and chunk[:1] == b"\n":
            end, after = 0, 1
        else:
            end = chunk.find(b"\n\n")
            after = end + 2
        if end < 0:
            if len(buf) + len(chunk) > MAX_PARTIAL:
                self._drop(chunk.endswith(b"\n"))
                return -1
            start = len(buf)
            buf += chunk
            if not self._open:
                self._judge_held(start)
            return -1
        if len(buf) + end <= MAX_PARTIAL:
            self._event(bytes(buf) + chunk[:end])
        buf.clear()
        self._open = False
        return after

    def _hold(self, chunk: bytes, pos: int) -> None:
        """Keep ``chunk[pos:]``, the start of an event, if it may carry usage."""
        n = len(chunk)
        while pos < n and chunk[pos] == 10:  # blank lines between events carry nothing
            pos += 1
        if pos == n:
            return
        if n - pos > MAX_PARTIAL:
            self._drop(chunk.endswith(b"\n"))
            return
        self._buf += memoryview(chunk)[pos:]
        self._judge_held(0)

    def _judge_held(self, start: int) -> None:
        """Once the held event's first line is complete: drop it if it names an unwanted event."""
        buf = self._buf
        nl = buf.find(b"\n", start)  # the first line has no LF before ``start``
        if nl < 0:
            return
        if buf.startswith(b"event:") and buf[6:nl].strip() not in _WANTED:
            self._drop(buf.endswith(b"\n"))
        else:
            self._open = True

    def _drop(self, nl: bool) -> None:
        self._buf.clear()
        self._open = False
        self._skip = True
        self._nl = nl

    # -- one complete event ----------------------------------------------------------------------

    def _event(self, block: bytes) -> None:
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:])
            elif line.startswith(b"event:"):
                name = line[6:].strip()
        if not data or (name is not None and name not in _WANTED):
            return
        if name is None and b"message_" not in block:
            return  # no event line (some relays omit it): judge by the data, cheaply first
        doc = _loads(b"\n".join(data))
        if not isinstance(doc, dict):
            return
        kind = doc.get("type") if name is None else name.decode()
        if kind == "message_stop":
            self.stopped = True
            return
        if kind == "error":
            self.errored = True
            return
        if kind == "message_start":
            message = doc.get("message")
            counts = _counts(message.get("usage")) if isinstance(message, dict) else {}
        elif kind == "message_delta":
            # Output is cumulative, so the last one wins; newer API versions repeat the input
            # and cache counts here, where a zero means "not reported" rather than "none".
            counts = {k: v for k, v in _counts(doc.get("usage")).items()
                      if v or k == "output_tokens"}
        else:
            return
        if counts:
            self._usage = replace(self._usage or Usage(), **counts)


# -- prices ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Price:
    """USD per million tokens. Cache prices default to Anthropic's multipliers of ``input``
    (1.25 x for 5-minute cache writes, 0.1 x for cache reads); relays may charge otherwise."""

    input: float = 0.0
    output: float = 0.0
    cache_write: float | None = None
    cache_read: float | None = None


def cost(usage: Usage, price: Price) -> float:
    """What ``usage`` costs at ``price``, in USD."""
    write = price.input * CACHE_WRITE_FACTOR if price.cache_write is None else price.cache_write
    read = price.input * CACHE_READ_FACTOR if price.cache_read is None else price.cache_read
    return (usage.input_tokens * price.input + usage.output_tokens * price.output
            + usage.cache_creation_input_tokens * write
            + usage.cache_read_input_tokens * read) / 1_000_000


# -- helpers ---------------------------------------------------------------------------------


def _loads(body: Any) -> Any:
    try:
        return json.loads(body)
    except (ValueError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _counts(usage: Any) -> dict[str, int]:
    """The well-formed counts of a ``usage`` object: non-negative integers (not bools), below
    2^40 (a relay's absurd count must not overflow a price computation)."""
    if not isinstance(usage, dict):
        return {}
    return {k: v for k in FIELDS if type(v := usage.get(k)) is int and 0 <= v < 1 << 40}
