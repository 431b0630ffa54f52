"""Reading compressed upstream bodies.

The router asks upstreams for ``accept-encoding: identity``, but a relay may compress anyway.
The bytes still reach the client exactly as sent; `Decoder` and `decoded` only let the router
read the stream's opening, the error type and the token usage. The one exception: an answer
whose model id must be rewritten (an endpoint's ``model_map``) is decoded whole (`whole`,
`Inflater`) and reaches the client decoded. gzip and deflate are read; other codings
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


def whole(body: bytes, encoding: str, limit: int = 8 * LIMIT) -> bytes | None:
    """A complete body decoded; None when its coding cannot be read, it is corrupt or cut
    short, or it decodes to more than ``limit`` bytes."""
    inflater = Inflater(encoding)
    pieces, size = [], 0
    for piece in inflater.feed(body):
        size += len(piece)
        if size > limit:
            return None
        pieces.append(piece)
    return b"".join(pieces) if inflater.ended and not inflater.broken else None


class Inflater:
    """Decode a whole gzip or deflate body chunk by chunk, for the client. ``feed`` yields the
    decoded bytes in pieces of at most ``piece`` bytes (a small chunk that expands a lot
    never becomes one large buffer) and never yields an empty piece. Concatenated gzip members
    are read in turn; "deflate" may be zlib-wrapped or raw. A coding it cannot read, or
    corrupt input, sets ``broken``: nothing more is yielded."""

    __slots__ = ("_z", "piece", "broken", "_raw")

    def __init__(self, encoding: str, piece: int = LIMIT) -> None:
        self.broken = encoding not in READABLE
        self._z = zlib.decompressobj(47)
        self.piece = piece
        self._raw = encoding == "deflate"  # until the first bytes are read: raw deflate may do

    @property
    def ended(self) -> bool:
        """The last member read so far is complete (the body was not cut short)."""
        return self._z.eof

    def feed(self, chunk: bytes):
        data = chunk
        while not self.broken:
            if self._z.eof:  # a member ended: anything after it is the next member
                if not data:
                    return
                self._z = zlib.decompressobj(47)
            try:
                out = self._z.decompress(data, self.piece)
            except zlib.error:
                if self._raw:  # no zlib header: a raw deflate stream (as some servers send)
                    self._raw, self._z = False, zlib.decompressobj(-15)
                    continue
                self.broken = True
                return
            self._raw = False
            if out:
                yield out
            if self._z.eof:
                data = self._z.unused_data
            else:
                data = self._z.unconsumed_tail
                if not data and len(out) < self.piece:
                    return  # (a full piece may leave output inside zlib: ask again)
