"""Who may use the router: its client keys, how a request presents one, and the refusal to put
upstream keys behind an open door. Plain functions over data; the addon turns a ``ValueError``
into mitmproxy's ``OptionsError``."""

import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence

from mitmproxy.proxy.mode_specs import ProxyMode

from . import config
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


def presented_key(headers: Mapping[str, str]) -> bytes:
    """The key a request presents: ``x-api-key``, else an ``Authorization: Bearer`` token."""
    presented = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if not presented and auth[:7].lower() == "bearer ":
        presented = auth[7:].strip()
    return presented.encode("utf-8", "surrogateescape")  # headers may hold any bytes


def authorized(headers: Mapping[str, str], keys: Sequence[bytes]) -> bool:
    given = presented_key(headers)
    return any(hmac.compare_digest(given, key) for key in keys)


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
