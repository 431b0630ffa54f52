"""Reading compressed upstream bodies, for the router's eyes only.

The router asks upstreams for ``accept-encoding: identity``, but a relay may compress anyway.
The bytes still reach the client exactly as sent; these decoders only let the router read the
stream's opening, the error type and the token usage. gzip and deflate are read; other codings
(br, zstd) are not (the router then judges by the status alone). Output is bounded, so a
compression bomb costs at most ``limit`` bytes per call.
"""

import zlib

READABLE = frozenset({"gzip", "x-gzip", "deflate"})
LIMIT = 1 << 20


def encoding_of(headers) -> str:
    """The content-coding of a header list ((name, value) pairs): "" for identity/none."""
    for k, v in headers:
        if k.lower() == "content-encoding":
            value = v.strip().lower()
            return "" if value in ("", "identity") else value
    return ""


class Decoder:
    """Decode a content-coded body chunk by chunk; identity passes through. When the coding
    cannot be read (unknown, corrupt, or a chunk that expands beyond ``limit``), it yields
    nothing from then on and ``broken`` is True."""

    __slots__ = ("_z", "broken", "limit")

    def __init__(self, encoding: str, limit: int = LIMIT) -> None:
        self.limit = limit
        self.broken = bool(encoding) and encoding not in READABLE
        # wbits 47: a gzip or zlib header, detected; raw deflate is tried if that fails.
        self._z = zlib.decompressobj(47) if encoding in READABLE else None

    def feed(self, chunk: bytes) -> bytes:
        if self.broken:
            return b""
        if self._z is None:
            return chunk
        try:
            out = self._z.decompress(chunk, self.limit)
        except zlib.error:
            self.broken = True
            return b""
        if self._z.unconsumed_tail:
            self.broken = True  # a bomb, or far beyond anything the router reads
        return out


def decoded(body: bytes, encoding: str, limit: int = LIMIT) -> bytes | None:
    """A whole (or partial) body decoded, at most ``limit`` bytes; None if unreadable."""
    d = Decoder(encoding, limit)
    out = d.feed(body)
    if d.broken and encoding:
        return None
    return out
