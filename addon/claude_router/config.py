"""The router's YAML config file (`router_config`): endpoints with their own keys, prices and
headers, client keys, and the health and policy settings.

Parsing is pure (`parse`); `load` reads the file. Errors name the file, the field and the
problem. Secrets are given as references (``env:NAME``) and resolved here; they never appear in
an error message.
"""

import difflib
import hmac
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ruamel.yaml import YAML, YAMLError

from . import alerts as alert_specs, balances, clients as client_specs, probes
from .endpoints import Endpoint, parse_endpoint
from .profiles import DEFAULT, Profile
from .upstream import HOP_BY_HOP
from .usage import Price

# Config sections and fields -> the router_* option each one sets.
OPTION_FIELDS = {
    ("health", "max_failures"): "router_max_failures",
    ("health", "cooldown"): "router_cooldown",
    ("health", "window_cap"): "router_window_cap",
    ("timeouts", "connect"): "router_connect_timeout",
    ("timeouts", "headers"): "router_headers_timeout",
    ("timeouts", "stream"): "router_stream_timeout",
    ("timeouts", "head"): "router_head_timeout",
    ("policy", "max_attempts"): "router_max_attempts",
    ("policy", "deadline"): "router_deadline",
    ("policy", "all_cooling"): "router_all_cooling",
    ("policy", "rules"): "router_policy",
    ("policy", "strategy"): "router_strategy",
    ("policy", "session_horizon"): "router_session_horizon",
    ("policy", "max_body_mb"): "router_max_body_mb",
}
_ENDPOINT_FIELDS = {"name", "url", "key", "auth", "price", "headers",
                    "models", "model_map", "drop_betas", "cache_ttl", "balance", "probe",
                    "weight", "max_concurrency"}
_PRICE_FIELDS = {"input", "output", "cache_write", "cache_read"}
# RFC 9110 5.1: a field name is a token of tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Any C0 control but horizontal tab, and DEL: CR/LF would split a header, NUL ends it early.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers that frame the message or belong to one connection: the HTTP client sets them itself,
# and one set by hand would desynchronise the request.
_NOT_SETTABLE = HOP_BY_HOP | {"host", "content-length"}


class ConfigError(ValueError):
    def __init__(self, source: str, where: str, problem: str) -> None:
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")


def did_you_mean(name: object, known) -> str:
    """`` (did you mean X?)`` for a misspelt field or option name, else ""."""
    close = difflib.get_close_matches(str(name), sorted(map(str, known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown(source: str, where: str, fields: set, known) -> ConfigError:
    """The first unknown field (or section) of ``fields``, with the closest known name."""
    name = sorted(map(str, fields))[0]
    what = "unknown section" if not where else "unknown field"
    at = f"{where}.{name}" if where else name
    hint = did_you_mean(name, known) or f" (expected one of {', '.join(sorted(map(str, known)))})"
    return ConfigError(source, at, what + hint)


@dataclass(frozen=True)
class FileConfig:
    endpoints: tuple[Endpoint, ...]
    client_keys: tuple[str, ...]  # resolved secrets
    options: dict[str, Any]  # router_* option values the file sets
    clients: tuple[client_specs.Client, ...] = ()  # named clients (issue 21), keys resolved
    admin_keys: tuple[str, ...] = ()  # resolved secrets: status, metrics, every client's usage
    alerts: tuple[alert_specs.Webhook, ...] = ()  # webhooks (issue 23), URLs resolved


def load(path: str, env: Mapping[str, str] = os.environ) -> FileConfig:
    try:
        with open(path, encoding="utf-8") as f:
            # The pure-Python parser (YAML 1.2) on every install: ruamel.yaml up to 0.18 picks
            # its C loader for "safe", which follows YAML 1.1 and refuses `[env:KEY]`.
            doc = YAML(typ="safe", pure=True).load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the file ({e.strerror})") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}" if mark else ""
        raise ConfigError(path, at, "not valid YAML") from None
    return parse(doc, path, env)


def parse(doc: Any, source: str, env: Mapping[str, str]) -> FileConfig:
    if not isinstance(doc, dict):
        raise ConfigError(source, "", "expected a mapping at the top level")
    sections = {"endpoints", "client_keys", "clients", "admin_keys", "alerts"} | {s for s, _ in OPTION_FIELDS}
    if unknown := set(doc) - sections:
        raise _unknown(source, "", unknown, sections)
    raw_eps = doc.get("endpoints")
    if not isinstance(raw_eps, list) or not raw_eps:
        raise ConfigError(source, "endpoints", "a non-empty list of endpoints is required")
    endpoints = tuple(_endpoint(item, i, source, env) for i, item in enumerate(raw_eps))
    names = [ep.name for ep in endpoints]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(source, f"endpoints[{i}].name", f"{name!r} is used twice")
    keys = doc.get("client_keys") or []
    if not isinstance(keys, list):
        raise ConfigError(source, "client_keys", "expected a list of keys or env: references")
    client_keys = tuple(_secret(k, f"client_keys[{i}]", source, env) for i, k in enumerate(keys))
    try:
        named = client_specs.parse(doc.get("clients"), lambda ref, where: _secret(ref, where, source, env),
                                   names)
    except client_specs.SpecError as e:
        problem = e.problem
        if problem == "unknown field":
            problem += did_you_mean(e.where.rsplit(".", 1)[-1], client_specs.FIELDS)
        raise ConfigError(source, e.where, problem) from None
    admins = doc.get("admin_keys") or []
    if not isinstance(admins, list):
        raise ConfigError(source, "admin_keys", "expected a list of keys or env: references")
    admin_keys = tuple(_secret(k, f"admin_keys[{i}]", source, env) for i, k in enumerate(admins))
    _distinct_keys(source, client_keys, named, admin_keys)
    try:
        hooks = alert_specs.parse(doc.get("alerts"), lambda ref, where: _secret(ref, where, source, env))
    except alert_specs.SpecError as e:
        raise ConfigError(source, e.where, e.problem) from None
    return FileConfig(endpoints, client_keys, _options(doc, source), named, admin_keys, hooks)


def _distinct_keys(source: str, client_keys: tuple[str, ...], named: tuple, admin_keys: tuple[str, ...]) -> None:
    """A named client's key must be its own: the same key in client_keys or admin_keys would
    leave who it is (and its limits) to the order of a lookup."""
    others = [(f"client_keys[{i}]", k.encode()) for i, k in enumerate(client_keys)]
    others += [(f"admin_keys[{i}]", k.encode()) for i, k in enumerate(admin_keys)]
    for i, c in enumerate(named):
        for where, key in others:
            if hmac.compare_digest(c.key, key):
                raise ConfigError(source, f"clients[{i}] ({c.name}).key", f"the same key as {where}")


def _endpoint(item: Any, i: int, source: str, env: Mapping[str, str]) -> Endpoint:
    where = f"endpoints[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(source, where, "expected a mapping with name and url")
    if unknown := set(item) - _ENDPOINT_FIELDS:
        raise _unknown(source, where, unknown, _ENDPOINT_FIELDS)
    try:
        ep = parse_endpoint(f"{item.get('name', '')}={item.get('url', '')}", i)
    except ValueError as e:
        raise ConfigError(source, where, str(e)) from None
    where = f"endpoints[{i}] ({ep.name})"
    key = _secret(item["key"], f"{where}.key", source, env) if item.get("key") is not None else None
    auth = str(item.get("auth", "x-api-key")).lower()
    if auth not in ("x-api-key", "bearer"):
        raise ConfigError(source, f"{where}.auth", "must be x-api-key or bearer")
    out = Endpoint(ep.name, ep.url, i, key=key, auth=auth,
                   headers=_headers(item.get("headers"), f"{where}.headers", source),
                   price=_price(item.get("price"), f"{where}.price", source),
                   profile=_profile(item, where, source),
                   weight=_weight(item.get("weight", 1), f"{where}.weight", source),
                   max_concurrency=_cap(item.get("max_concurrency"), f"{where}.max_concurrency", source))
    probe = _probe(item.get("probe"), out, f"{where}.probe", source, env)
    if probe is not None:
        out = replace(out, probe=probe)
    if item.get("balance") is None:
        return out
    try:
        spec = balances.parse(item["balance"], out, lambda ref, at: _secret(ref, at, source, env),
                              f"{where}.balance")
    except balances.SpecError as e:
        hint = did_you_mean(e.where.rsplit(".", 1)[-1], balances.FIELDS) if e.problem == "unknown field" else ""
        raise ConfigError(source, e.where, e.problem + hint) from None
    return replace(out, balance=spec)


def _probe(raw: Any, ep: Endpoint, where: str, source: str, env: Mapping[str, str]) -> "probes.ProbeSpec | None":
    """The endpoint's out-of-band probe (see probes): sent with the endpoint's own credentials,
    or with ``probe.key`` for an endpoint that takes its clients' keys."""
    try:
        spec = probes.parse(raw, where, lambda ref, at: _secret(ref, at, source, env))
    except probes.SpecError as e:
        problem = e.problem
        if problem == "unknown field":
            problem += did_you_mean(e.where.rsplit(".", 1)[-1], probes.FIELDS)
        raise ConfigError(source, e.where, problem) from None
    if spec is None:
        return None
    if spec.key is None and not ep.own_credentials:
        raise ConfigError(source, where, "this endpoint takes its clients' keys, which the router "
                                         "never keeps: give probe.key to probe it with")
    if spec.paid and ep.price is None:
        raise ConfigError(source, where, "a /v1/messages probe needs the endpoint's price "
                                         "(its cost is capped per hour in USD)")
    return spec


def _weight(raw: Any, where: str, source: str) -> float:
    """An endpoint's share of new conversations within its price tier (see tiers)."""
    try:
        ok = not isinstance(raw, bool) and isinstance(raw, (int, float)) and 0 < float(raw) < math.inf
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise ConfigError(source, where, f"must be a positive number (default 1), got {str(raw)[:40]}")
    return float(raw)


def _cap(raw: Any, where: str, source: str) -> int | None:
    """Requests in flight at the endpoint at once, per router process (see slots)."""
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(source, where, f"must be a whole number >= 1 (leave it out for no cap), got {str(raw)[:40]}")
    return raw


def _profile(item: dict, where: str, source: str) -> Profile:
    """What the endpoint serves (``models`` globs, ``model_map``) and rejects (``drop_betas``,
    ``cache_ttl: false``)."""
    models = _strings(item.get("models"), f"{where}.models", source)
    betas = _strings(item.get("drop_betas"), f"{where}.drop_betas", source)
    raw_map = item.get("model_map") or {}
    if not isinstance(raw_map, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in raw_map.items()):
        raise ConfigError(source, f"{where}.model_map", "expected a mapping of client model ids "
                                                        "to this endpoint's model ids")
    for k, v in raw_map.items():
        _check_value(k, f"{where}.model_map", source)
        _check_value(v, f"{where}.model_map.{k}", source)
    ups = list(raw_map.values())
    if len(set(ups)) != len(ups):
        raise ConfigError(source, f"{where}.model_map", "two client ids map to the same model id")
    cache_ttl = item.get("cache_ttl", True)
    if not isinstance(cache_ttl, bool):
        raise ConfigError(source, f"{where}.cache_ttl", "must be true or false")
    profile = Profile(models=models, model_map=tuple(raw_map.items()), drop_betas=betas,
                      cache_ttl=cache_ttl)
    return DEFAULT if profile == DEFAULT else profile


def _strings(raw: Any, where: str, source: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) and v.strip() for v in raw):
        raise ConfigError(source, where, "expected a list of non-empty strings")
    for v in raw:
        _check_value(v, where, source)
    return tuple(raw)


def _headers(raw: Any, where: str, source: str) -> tuple[tuple[str, str], ...]:
    """Extra request headers: valid field names the router may set, and values that are one
    line of ASCII. Values may be tokens, so a message names the header, never the value."""
    headers = raw or {}
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
            for k, v in headers.items()):
        raise ConfigError(source, where, "expected a mapping of header names to values")
    out = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise ConfigError(source, where, f"{name!r} is not a valid header name")
        if name.lower() in _NOT_SETTABLE:
            raise ConfigError(source, f"{where}.{name}",
                              "is set by the router itself (framing or hop-by-hop header)")
        value = str(value)
        _check_value(value, f"{where}.{name}", source)
        out.append((name, value))
    return tuple(out)


def value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as one HTTP header value (a key, a client key, an extra
    header), or None. The answer never quotes the value: it may be a secret."""
    if _CONTROL.search(value):
        return "contains a control character (CR, LF, NUL, ...)"
    if value != value.strip():
        return "has leading or trailing whitespace"
    if not value.isascii():
        return "contains a non-ASCII character"
    return None


def _check_value(value: str, where: str, source: str, origin: str = "") -> None:
    if problem := value_problem(value):
        raise ConfigError(source, where, problem + origin)


def _price(raw: Any, where: str, source: str) -> Price | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"expected a mapping with {', '.join(sorted(_PRICE_FIELDS))}")
    if unknown := set(raw) - _PRICE_FIELDS:
        raise _unknown(source, where, unknown, _PRICE_FIELDS)
    values = {}
    for k, v in raw.items():
        problem = "must be a number >= 0 (USD per million tokens)"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(source, f"{where}.{k}", problem)
        try:
            v = float(v)
        except OverflowError:  # an integer too large for a float
            v = math.inf
        if math.isnan(v):
            raise ConfigError(source, f"{where}.{k}", f"{problem}, got NaN")
        if math.isinf(v):
            raise ConfigError(source, f"{where}.{k}", f"{problem}, got {'-' if v < 0 else ''}infinity")
        if v < 0:
            raise ConfigError(source, f"{where}.{k}", problem)
        values[k] = v
    return Price(**values)


def _secret(ref: Any, where: str, source: str, env: Mapping[str, str]) -> str:
    """``env:NAME`` reads the environment; any other string is the secret itself. Either way
    the key must be one line of ASCII with no surrounding whitespace (a pasted newline would
    split the header it is sent in). Messages name the field, never the key."""
    if not isinstance(ref, str) or not ref:
        raise ConfigError(source, where, "expected a key or an env:NAME reference")
    if ref.startswith("env:"):
        name = ref[4:]
        value = env.get(name)
        if not value:
            raise ConfigError(source, where, f"environment variable {name} is not set")
        _check_value(value, where, source, f" (in environment variable {name})")
        return value
    _check_value(ref, where, source)
    return ref


def _options(doc: dict, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (section, fld), option in OPTION_FIELDS.items():
        block = doc.get(section)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(source, section, "expected a mapping")
        if unknown := set(block) - {f for s, f in OPTION_FIELDS if s == section}:
            raise _unknown(source, section, unknown, {f for s, f in OPTION_FIELDS if s == section})
        if fld in block:
            out[option] = _option_value(block[fld], f"{section}.{fld}", option, source)
    return out


def _option_value(value: Any, where: str, option: str, source: str) -> Any:
    if option == "router_policy":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, where, "expected a list of KEY=ACTION rules")
        return value
    if option == "router_all_cooling":
        if value not in ("refuse", "try"):
            raise ConfigError(source, where, "must be refuse or try")
        return value
    if option == "router_strategy":
        if value not in ("cost", "order"):
            raise ConfigError(source, where, "must be cost or order")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(source, where, f"must be a whole number, got {value!r}")
    from .options import INT_OPTIONS  # the same bounds as --set (options imports mitmproxy)
    minimum = INT_OPTIONS[option][1]
    if value < minimum:
        raise ConfigError(source, where, f"must be at least {minimum}, got {value}")
    return value
