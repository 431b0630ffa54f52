"""What the router accepts from a client before anything is sent upstream.

Pure checks over the request's raw parts. A request that fails one of them is the client's:
it is answered 400 ``invalid_request_error`` at once, no endpoint is tried and none is blamed.

- The path stays under the endpoint: dot segments (``..``, ``.``, raw or percent-encoded) and
  encoded slashes or backslashes are refused, so a path-normalising relay can never resolve
  the client's path outside the endpoint's prefix (``/claude/aws`` + ``/../droid/...``).
- What the upstream HTTP client would refuse to send (a control byte in a header value, an
  obs-folded header, a method that is not a token) is refused here, before any attempt, so
  that such a request is never counted as an endpoint's failure.
"""

import json
import re
from urllib.parse import unquote_to_bytes

# RFC 9110 token characters (methods and header names).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Header values: visible ASCII, space, tab and obs-text (0x80-0xff); no CR, LF, NUL or other controls.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Bytes left as they are in a forwarded path or query; everything else is percent-encoded.
_PATH_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                       b"-._~!$&'()*+,;=:@/%")
_QUERY_SAFE = _PATH_SAFE | frozenset(b"?")


class Refused(ValueError):
    """The request cannot be forwarded; the message is safe to show the client."""


def upstream_target(raw: bytes) -> str:
    """The client's request target (path and query, as received) made safe to append to an
    endpoint's URL: ASCII only, no way out of the endpoint's prefix. Raises Refused."""
    path, sep, query = raw.partition(b"?")
    if not path.startswith(b"/"):
        raise Refused("the request path must start with /")
    if b"\\" in path:
        raise Refused("the request path must not contain a backslash")
    for segment in path.split(b"/")[1:]:
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b".."):
            raise Refused("the request path must not contain . or .. segments")
        if b"/" in decoded or b"\\" in decoded:
            raise Refused("the request path must not contain an encoded slash or backslash")
        if _BAD_VALUE.search(decoded):
            raise Refused("the request path must not contain control characters")
    return _encode(path, _PATH_SAFE) + (("?" + _encode(query, _QUERY_SAFE)) if sep else "")


def _encode(data: bytes, safe: frozenset[int]) -> str:
    if all(b in safe for b in data):
        return data.decode("ascii")
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in data)


def unsendable(method: bytes, fields) -> str | None:
    """Why this method and these header fields (raw (name, value) byte pairs) cannot be sent
    upstream, or None when they can."""
    if not _TOKEN.match(method):
        return "the request method is not a valid HTTP token"
    for name, value in fields:
        if not _TOKEN.match(name):
            return "a request header name is not a valid HTTP token"
        if _BAD_VALUE.search(value):
            return f"the request header {name.decode('ascii')} holds a control character or a line break"
    return None


def json_body(body: bytes) -> dict | None:
    """The request body as a JSON object, or None (not JSON, not an object, too deep)."""
    if not body or body[:1] not in b"{ \t\r\n":
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def split_tier(raw: bytes, names) -> tuple[str | None, bytes]:
    """A tier chosen by path: ``/<endpoint name>/v1/...`` or ``/claude/<endpoint name>/v1/...``
    -> (name, ``/v1/...``). Anything else (an unknown name, no API path after it) is not a
    tier and is forwarded as it is."""
    parts = raw.split(b"/", 3)  # b"", first, second, rest
    for skip in (1, 2):
        if skip == 2 and (len(parts) < 3 or parts[1] != b"claude"):
            break
        name = parts[skip] if len(parts) > skip else b""
        rest = b"/" + b"/".join(parts[skip + 1:]) if len(parts) > skip + 1 else b""
        if rest.startswith(b"/v1/") or rest == b"/v1" or rest.startswith(b"/v1?"):
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                return None, raw
            if text in names:
                return text, rest
    return None, raw
