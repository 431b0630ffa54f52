"""Endpoints: the upstreams a request may go to, cheapest first."""

import base64
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .profiles import DEFAULT, Profile
from .usage import Price

if TYPE_CHECKING:
    from .balances import BalanceSpec
    from .probes import ProbeSpec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What health is kept for: an endpoint, one model family at an endpoint ("aws~opus"), or
# one client key at an endpoint, by the key's keyed hash ("aws@0123456789abcdef").
SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(~[a-z]{1,16}|@[0-9a-f]{16})?$")


CREDENTIAL_HEADERS = frozenset({"x-api-key", "authorization"})
# Extra endpoint headers whose names say they carry a credential (x-relay-token, api-key ...).
_CREDENTIAL_WORDS = ("key", "token", "auth", "secret", "password")
REDACTED = "[redacted]"


@dataclass(frozen=True)
class Endpoint:
    name: str
    # scheme://host[:port][/path-prefix], no trailing slash; may hold user:password@, so it is
    # kept out of repr (shown_url_for and origin are safe to show)
    url: str = field(repr=False)
    index: int = 0  # 0-based position in price order
    # The upstream's own credential; replaces the client's. Never shown anywhere.
    key: str | None = field(default=None, repr=False, compare=False)
    auth: str = "x-api-key"  # how the key is sent: "x-api-key" or "bearer"
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may carry tokens
    price: Price | None = None  # USD per million tokens
    profile: Profile = DEFAULT  # models served, ids, rejected features (see profiles)
    balance: "BalanceSpec | None" = field(default=None, repr=False)  # where its balance is read
    probe: "ProbeSpec | None" = None  # tested out of band while cooling (see probes)
    weight: float = 1.0  # its share of new conversations among equal-priced endpoints (tiers)
    max_concurrency: int | None = None  # requests in flight at once (per process), None: no cap

    # Derived once per endpoint (the spec is frozen), not on every request.
    @cached_property
    def own_credentials(self) -> bool:
        """True when the endpoint authenticates with credentials of its own (a key, a
        user:password in its URL, or a credential-named extra header); False when it receives
        the client's, so that its 401/403/429 speak of the client, not of the endpoint."""
        return self.key is not None or self._url_credentials or any(
            k.lower() in CREDENTIAL_HEADERS or any(w in k.lower() for w in _CREDENTIAL_WORDS)
            for k, _ in self.headers)

    @cached_property
    def holds_secrets(self) -> bool:
        """Anything of the operator's that a stranger could spend: a key, URL credentials or
        extra headers (which may carry tokens)."""
        return self.key is not None or self._url_credentials or bool(self.headers)

    @cached_property
    def secrets(self) -> tuple[str, ...]:
        """The strings that must never reach a client (a relay may echo what it received)."""
        found = [self.key] if self.key else []
        parts = urlsplit(self.url)
        if parts.password:
            # as written in the URL, as sent, and as Basic auth carries it
            plain = unquote(parts.password)
            basic = base64.b64encode(f"{unquote(parts.username or '')}:{plain}".encode()).decode()
            found += [parts.password, plain, basic]
        found += [v for _, v in self.headers if len(v) >= 8]
        if self.balance is not None:  # the panel's token too, should anything echo it
            found += self.balance.secrets
        return tuple(found)

    @cached_property
    def _url_credentials(self) -> bool:
        return "@" in urlsplit(self.url).netloc

    def request_headers(self, client: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The headers this endpoint gets: the client's, with this endpoint's own key (if it
        has one) instead of the client's credentials, and its extra headers on top. An
        endpoint with user:password in its URL gets neither of the client's credentials."""
        replace = {k.lower() for k, _ in self.headers}
        if self.key is not None or self._url_credentials:
            replace |= CREDENTIAL_HEADERS
        if not replace:
            return client
        out = [(k, v) for k, v in client if k.lower() not in replace]
        if self.key is not None:
            out.append(("authorization", f"Bearer {self.key}") if self.auth == "bearer"
                       else ("x-api-key", self.key))
        return out + list(self.headers)

    def url_for(self, path: str) -> str:
        """The upstream URL for a client's path and query (``/v1/messages?beta=true``), as
        made safe by ``requests.upstream_target``."""
        if not path.startswith("/"):
            path = "/" + path
        return self.url + path

    def shown_url_for(self, path: str) -> str:
        """The upstream URL as shown in mitmweb and logs: without any user:password@."""
        parts = urlsplit(self.url)
        if "@" not in parts.netloc:
            return self.url_for(path)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() + (
            path if path.startswith("/") else "/" + path)

    @cached_property
    def shown_parts(self) -> tuple[str, str, int, str]:
        """(scheme, host, port, path prefix) of ``shown_url_for``, parsed once: setting a
        flow's fields from these costs far less than parsing a URL for every request."""
        parts = urlsplit(self.url)
        return (parts.scheme, parts.hostname or "", parts.port or _default_port(parts.scheme),
                parts.path.rstrip("/"))

    @property
    def origin(self) -> str:
        """scheme://host:port, without the path prefix (safe to show: no path, no query)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or _default_port(parts.scheme)}"


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def parse_endpoint(spec: str, index: int) -> Endpoint:
    """Parse ``NAME=URL`` into an Endpoint; raise ValueError saying what is wrong."""
    name, sep, url = spec.partition("=")
    name, url = name.strip(), url.strip()
    if not sep or not name or not url:
        raise ValueError("expected NAME=URL, for example aws=https://relay.example/claude/aws")
    if not _NAME.match(name):
        raise ValueError(f"endpoint name {name!r} must be letters, digits, '_', '.' or '-'")
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in url):
        raise ValueError(f"endpoint {name}: URL must not contain spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {name}: URL must be http:// or https:// with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"endpoint {name}: URL must not have a query or fragment")
    try:
        _ = parts.port  # only to validate: urlsplit raises ValueError on a bad port when it is read
    except ValueError as e:
        raise ValueError(f"endpoint {name}: bad port ({e})") from None
    return Endpoint(name=name, url=url.rstrip("/"), index=index)


def parse_endpoints(specs: list[str] | tuple[str, ...]) -> tuple[Endpoint, ...]:
    """Parse the ``router_endpoints`` option, in price order; names must be unique."""
    endpoints = tuple(parse_endpoint(spec, i) for i, spec in enumerate(specs))
    seen: set[str] = set()
    for ep in endpoints:
        if ep.name in seen:
            raise ValueError(f"endpoint name {ep.name!r} is used twice")
        seen.add(ep.name)
    return endpoints
