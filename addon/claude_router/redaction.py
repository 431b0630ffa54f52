"""Keeping the operator's secrets out of what the router relays: some relays echo the
credential they received in an error message or a header."""

from collections.abc import Iterable, Sequence

from .endpoints import REDACTED

_MARK = REDACTED.encode()


def scrub(data: bytes, secrets: Sequence[str]) -> bytes:
    """``data`` with every occurrence of a secret replaced by ``[redacted]``."""
    for s in secrets:
        b = s.encode("latin-1", "replace")
        if b in data:
            data = data.replace(b, _MARK)
    return data


def scrub_headers(fields: Iterable[tuple[str, str]], secrets: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for k, v in fields:
        for s in secrets:
            if s in v:
                v = v.replace(s, REDACTED)
        out.append((k, v))
    return out
