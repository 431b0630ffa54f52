"""Who may use the router: its client keys, how a request presents one, and the refusal to put
upstream keys behind an open door. Plain functions over data; the addon turns a ``ValueError``
into mitmproxy's ``OptionsError``."""

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mitmproxy.proxy.mode_specs import ProxyMode

from . import clients, config
from .endpoints import Endpoint

KEY_REQUIRED = "a valid router client key is required (x-api-key or Authorization: Bearer)"


def client_keys(refs: Sequence[str], file_keys: Iterable[str] = (),
                environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """The keys clients may present: ``router_client_keys`` (a value or ``env:NAME``) plus
    the config file's. Refuses an empty key: it would let in every client that sends none."""
    keys = []
    for i, ref in enumerate(refs):
        if not ref.strip():
            raise ValueError(f"router_client_keys[{i}] is empty")
        if ref.startswith("env:"):
            value = environ.get(ref[4:], "")
            if not value:
                raise ValueError(f"router_client_keys[{i}]: environment variable {ref[4:]} is not set")
            ref = value
        if problem := config.value_problem(ref):
            raise ValueError(f"router_client_keys[{i}]: {problem}")
        keys.append(ref.encode())
    keys += [k.encode() for k in file_keys]
    return tuple(keys)


_last_presented: tuple[Any, bytes] = ((), b"")  # (mitmproxy headers' fields, the key they present)


def presented_key(headers: Mapping[str, str], basic: bool = False) -> bytes:
    """The key a request presents: ``x-api-key``, else an ``Authorization: Bearer`` token;
    with ``basic``, first the password of ``Authorization: Basic`` (any user name): a
    browser's, taken for the dashboard's paths only (``dashboard.uses_basic``), never for the
    API, where a browser's remembered password would let any site's form spend the keys.

    The router asks this of one request's headers several times (the key check at its head
    and at its body, who it is, its credential hash) and mitmproxy's ``headers.get`` walks
    every header: the answer for the last headers seen is kept, by the identity of their
    ``fields`` tuple, which mitmproxy replaces (never changes) when a header is set."""
    global _last_presented
    if basic and (password := basic_password(headers.get("authorization", ""))) is not None:
        return password
    fields = getattr(headers, "fields", None)
    last = _last_presented
    if fields is not None and fields is last[0]:
        return last[1]
    presented = headers.get("x-api-key", "")
    if not presented:  # (only when it is needed: each get walks every header)
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            presented = auth[7:].strip()
    key = presented.encode("utf-8", "surrogateescape")  # headers may hold any bytes
    if type(fields) is tuple:
        _last_presented = (fields, key)
    return key


def basic_password(auth: str) -> bytes | None:
    """The password of an ``Authorization: Basic`` value, None if it is not one."""
    if auth[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return password if colon else None


def credential_id(key: bytes, salt: bytes) -> str:
    """Whose request this is, without the key: a keyed hash (HMAC-SHA256 under the router's
    salt, 16 hex digits) of the presented key. Health scopes and conversations are keyed by
    it; it is safe to store in Redis and to show, and nobody can test a guessed key against it
    without the salt."""
    return hmac.new(salt, key, "sha256").hexdigest()[:16]


def authorized(headers: Mapping[str, str], keys: Sequence[bytes], basic: bool = False) -> bool:
    """Does the request present one of ``keys``? Looked up by keyed digest
    (``clients.key_digest``): the time tells nothing about which key, or how much of one, was
    right; a sequence that is not a tuple is searched comparing every key in constant time."""
    given = presented_key(headers, basic)
    if isinstance(keys, tuple):
        return clients.key_digest(given) in clients.key_index(keys, "key", _same)
    return any(hmac.compare_digest(given, key) for key in keys)


def _same(key: bytes) -> bytes:
    return key


def who(headers: Mapping[str, str], table: Sequence[clients.Client],
        basic: bool = False) -> clients.Client | None:
    """The client (named, or unnamed for a plain client key or an admin key) whose key the
    request presents, compared in constant time; None when it presents none of them."""
    return clients.identify(presented_key(headers, basic), table)


def is_admin(client: clients.Client | None, admin_keys: Sequence[bytes]) -> bool:
    """Does ``client`` hold one of the admin keys (``admin_keys`` in the config file)?"""
    found = False
    for key in admin_keys:
        found |= client is not None and hmac.compare_digest(client.key, key)
    return found


def open_door(endpoints: Sequence[Endpoint], keys: Sequence[bytes], listen_host: str,
              modes: Iterable[str]) -> str | None:
    """Upstream keys (also URL credentials and extra headers) behind a listener that other
    machines reach, with no client keys, would let anyone on the network spend them. Returns
    that listen address ("" for every interface), or None when the door is shut."""
    if not any(ep.holds_secrets for ep in endpoints) or keys:
        return None
    hosts = [listen_host]
    for spec in modes:  # e.g. reverse:https://x@0.0.0.0:8080
        try:
            hosts.append(ProxyMode.parse(spec).custom_listen_host or listen_host)
        except ValueError:
            pass
    return next((h for h in hosts if not is_loopback(h)), None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def answered_here(method: str, path: str, names: Iterable[str], keyed: bool) -> bool:
    """Is this request answered 200 by the router itself (an empty body, no upstream)? A HEAD
    of a base URL (see ``is_base_url``) is Claude Code's reachability check, key or not; and
    a HEAD without a valid client key (``keyed`` False: keys are required and none matched)
    gets the very same answer whatever its path, so that nobody without a key can tell the
    configured endpoint names from any other path."""
    return method == "HEAD" and (not keyed or is_base_url(path, names))


def is_base_url(path: str, names: Iterable[str]) -> bool:
    """``/``, a tier's base URL (``/droid``, ``/claude/droid``), or either with
    ``/api/hello``: Claude Code's reachability checks at start."""
    path = path.split("?")[0].rstrip("/")
    if path.endswith("/api/hello"):
        path = path[: -len("/api/hello")]
    if not path:
        return True
    head, _, name = path.rpartition("/")
    return name in set(names) and head in ("", "/claude")
