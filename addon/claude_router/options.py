"""The router's mitmproxy options: declarations with prose help, and start-up checks.

mitmproxy can only parse str, int, bool and Sequence[str] options from --set, so timeouts are
whole seconds.
"""

import difflib
from collections.abc import Sequence
from urllib.parse import urlsplit

from mitmproxy import exceptions

from . import compat, policy
from .health import Breaker, HealthStore, MemoryHealthStore
from .redis_store import RedisHealthStore, redacted
from .routing import Settings

INT_OPTIONS = {  # name: (default, minimum, help)
    "router_max_failures": (3, 1, "Consecutive failures that put an endpoint in cooldown."),
    "router_cooldown": (60, 1, "Seconds an endpoint stays in cooldown (the base ejection time)."),
    "router_connect_timeout": (10, 1, "Seconds allowed for connecting to an endpoint (TCP and TLS)."),
    "router_headers_timeout": (
        600, 1,
        """
        Seconds a non-streaming request may wait for the endpoint's response headers, and
        for each later read of the body. A non-streaming Claude answer only starts when it is
        complete, so keep this long.
        """,
    ),
    "router_stream_timeout": (
        120, 1,
        """
        Seconds a streaming request ("stream": true) may wait for the response headers, and
        the longest silence allowed between bytes of the stream, including the wait for its
        first content event (a stream is held until then, so a bad start can fail over).
        """,
    ),
    "router_max_attempts": (
        0, 0, "Most endpoints one request may try (0: every endpoint, in price order)."
    ),
    "router_deadline": (
        900, 1, "Seconds one request may spend on all its attempts together before it is answered."
    ),
    "router_max_sessions": (
        100_000, 1,
        """
        Cost strategy: the most conversations the router remembers (where each is, how large):
        per process in memory, and in all in Redis when router_redis_url is set, where those
        expiring soonest are dropped first. A dropped conversation is placed afresh on its
        next turn. About 350 bytes each.
        """,
    ),
    "router_session_horizon": (
        8, 1,
        """
        Cost strategy: the most turns still to come the router assumes for a conversation when
        it weighs moving it (a move re-writes the conversation's prompt cache at the new
        endpoint, paid back by cheaper turns after it). Larger: moves to cheaper endpoints
        sooner.
        """,
    ),
    "router_cache_ttl": (
        0, 0,
        """
        Cost strategy: seconds a conversation's prompt cache stays warm after its last turn
        (0: as its cache_control says, 300 s or 3600 s for "ttl": "1h"). For simulations
        against a relay with a compressed cache clock; 1-hour caches get 12 times this.
        """,
    ),
    "router_max_body_mb": (
        32, 1,
        """
        Largest request body in MB (10^6 bytes), as the Messages API's own limit. A request
        that announces more (content-length) is answered 413 request_too_large from its
        head, its body dropped unread; a chunked one once it is read.
        """,
    ),
    "router_drain_timeout": (
        30, 0,
        """
        Seconds a drain (kill -USR1, the router.drain command, a rolling restart or stop of
        --workers) waits for the requests in flight to finish before the process exits.
        """,
    ),
    "router_head_timeout": (
        30, 0,
        """
        Seconds a client connection may take to send a complete request head before the
        router closes it: counted from the connection (TLS handshake included), from a
        CONNECT, and from every answer after which the connection waits for its next
        request; a byte now and then does not reset it. 0 turns this off. mitmproxy's own
        tcp_timeout only closes connections that are entirely idle.
        """,
    ),
    "router_ledger_days": (
        30, 1,
        """
        Days the ledger keeps its request log (router_ledger); older rows are deleted once an
        hour. Spend counters are kept at least 40 days, which a monthly budget needs.
        """,
    ),
    "router_window_cap": (
        18000, 1,
        """
        Longest cooldown, in seconds, for an endpoint whose subscription window is used up (a
        429 with anthropic-ratelimit-unified-5h-status or -7d-status: rejected): it cools until
        the window's reset time, at most this long, instead of for the default cooldown.
        """,
    ),
    "router_body_timeout": (
        300, 0,
        """
        Seconds a client may take to send a request body, from its head; a routed request
        whose body is not complete by then has its connection closed (and what it sent
        dropped). 0 turns this off.
        """,
    ),
}

SEQUENCE_OPTIONS = {
    "router_endpoints": (
        [],
        """
        An endpoint as NAME=URL, cheapest first; repeat the option for each endpoint.
        The client's path and query are appended to the URL's path, e.g.
        aws=https://relay.example/claude/aws. A router_config file's endpoints take precedence.
        """,
    ),
    "router_hosts": (
        ["api.anthropic.com"],
        """
        In regular (HTTPS_PROXY) mode, the hosts whose requests are routed; connections
        to any other host pass through untouched. In reverse mode every request is routed.
        """,
    ),
    "router_policy": (
        [],
        """
        Override how an upstream answer is treated, as KEY=ACTION; repeat for each rule.
        KEY: a status (429), a class (4xx), STATUS:error_type, type:error_type, or a
        failure kind (refused, reset, timeout, tls, empty_stream, stream_error...).
        ACTION: count (fail over, count a failure), skip (fail over, no blame), client
        (the request is bad: no blame, returned once a second endpoint agrees), return
        (hand it to the client at once). docs/failure-policy.md lists the defaults.
        """,
    ),
    "router_client_keys": (
        [],
        """
        Keys clients must present (x-api-key or Authorization: Bearer) to use the router, its
        status and metrics; a value or an env:NAME reference, one per --set. Required when
        endpoints hold their own keys and the router listens beyond loopback.
        """,
    ),
}

STR_OPTIONS = {
    "router_config": (
        "",
        """
        A YAML file with endpoints (name, url, key, prices, headers), client keys and the
        health and policy settings; see router.example.yaml. Edits apply within a second.
        """,
        None,
    ),
    "router_redis_url": (
        "",
        """
        Share endpoint health between router instances through Redis, e.g.
        redis://host:6379/0 (also rediss:// and unix://; a password goes in the URL).
        Empty: health is kept in this process's memory.
        """,
        None,
    ),
    "router_ledger": (
        "",
        """
        The ledger: an SQLite file with one row per request (client, hashed session, model,
        endpoint, attempts, status, tokens, cost) and each client's spend per day, which
        budgets read at start-up. Written in batches off the request path (a kill -9 loses at
        most the last second). Empty: router-ledger.sqlite3 in mitmproxy's confdir; "off": no
        ledger (spend is then kept in memory only). See ./scripts/usage.
        """,
        None,
    ),
    "router_key_prefix": (
        "endpoint_health_",
        "Prefix of the Redis keys (and pub/sub channel) that hold endpoint health; may not contain '|'.",
        None,
    ),
    "router_strategy": (
        "cost",
        """
        "cost": with prices configured, each conversation goes where its turns cost least,
        counting its prompt cache (it stays on the endpoint that holds its warm cache until
        moving pays); "order": always the cheapest healthy endpoint first, as the original.
        Without prices the order holds either way.
        """,
        ("cost", "order"),
    ),
    "router_all_cooling": (
        "refuse",
        """
        When every endpoint is cooling down: "refuse" answers 529 overloaded_error at once
        with a retry-after until the first endpoint can be tried again; "try" tries them
        all anyway in price order, as the original router did.
        """,
        ("refuse", "try"),
    ),
}

BOOL_OPTIONS = {
    "router_hook_index": (
        True,
        """
        Deliver mitmproxy's events through an index of the addons that implement each hook
        instead of a walk over every addon (about a third of the CPU under load). Events reach
        every addon as before; turn it off for an addon that sets hook methods on itself at
        run time.
        """,
    ),
}

ALL = frozenset({*INT_OPTIONS, *SEQUENCE_OPTIONS, *STR_OPTIONS, *BOOL_OPTIONS})


def declare(loader) -> None:
    for name, (sequence, help_text) in SEQUENCE_OPTIONS.items():
        loader.add_option(name, Sequence[str], sequence, help_text)
    for name, (number, _, help_text) in INT_OPTIONS.items():
        loader.add_option(name, int, number, help_text)
    for name, (text, help_text, choices) in STR_OPTIONS.items():
        loader.add_option(name, str, text, help_text, choices=choices)
    for name, (flag, help_text) in BOOL_OPTIONS.items():
        loader.add_option(name, bool, flag, help_text)


def check_ints(opts, updated: set[str]) -> None:
    for name, (_, minimum, _) in INT_OPTIONS.items():
        if name in updated and getattr(opts, name) < minimum:
            raise exceptions.OptionsError(f"{name} must be at least {minimum}, got {getattr(opts, name)}")


def unparsable(options) -> list[str]:
    """Messages for router options given a value of the wrong type; those values are dropped.

    mitmproxy parses `--set` and config.yaml values for a script's options only after the
    script loaded; a value that does not parse (``router_cooldown=1.5``) raises inside the
    script loader, which then silently runs without the addon. The router logs these as
    errors instead, which makes mitmdump/mitmweb exit at start-up and say why.
    """
    problems = []
    for name in [n for n in options.deferred if n in ALL]:
        if (problem := compat.deferred_problem(options, name)) is not None:
            del options.deferred[name]
            problems.append(f"router: cannot use {name}: {problem}")
    return problems


def unknown(options) -> list[str]:
    """Messages for `router_*` settings no router option has: a misspelling would otherwise be
    ignored without a word (``router_cooldwn=5``)."""
    def hint(name: str) -> str:
        close = difflib.get_close_matches(name, sorted(ALL), n=1, cutoff=0.6)
        return f"did you mean {close[0]}?" if close else f"router options: {', '.join(sorted(ALL))}"

    return [f"router: no such option {name} ({hint(name)})"
            for name in options.deferred if name.startswith("router_") and name not in ALL]


# -- what the options make --------------------------------------------------------------

def settings(opts) -> Settings:
    """The routing loop's settings from the options."""
    if opts.router_all_cooling not in ("refuse", "try"):  # mitmproxy does not enforce choices
        raise exceptions.OptionsError(
            f"router_all_cooling must be refuse or try, got {opts.router_all_cooling!r}")
    try:
        rules = policy.parse_rules(opts.router_policy)
    except ValueError as e:
        raise exceptions.OptionsError(f"Cannot use router_policy: {e}") from None
    return Settings(
        connect_timeout=float(opts.router_connect_timeout),
        headers_timeout=float(opts.router_headers_timeout),
        stream_timeout=float(opts.router_stream_timeout),
        max_attempts=opts.router_max_attempts,
        deadline=float(opts.router_deadline),
        try_all_when_cooling=opts.router_all_cooling == "try",
        rules=rules,
        max_hint=breaker(opts).max_cooldown,
        window_cap=float(opts.router_window_cap),
    )


def breaker(opts) -> Breaker:
    return Breaker(
        max_failures=opts.router_max_failures,
        cooldown=float(opts.router_cooldown),
        max_cooldown=float(max(opts.router_cooldown * 10, 600)),
    )


def store(opts, clock) -> HealthStore:
    """The health store the options ask for: in memory, or shared in Redis."""
    url = opts.router_redis_url.strip()
    if not url:
        return MemoryHealthStore(breaker(opts), clock=clock)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise exceptions.OptionsError(
            f"router_redis_url must start with redis://, rediss:// or unix://, got {redacted(url)!r}"
        )
    db = urlsplit(url).path.strip("/")
    if url.startswith("redis") and db and not db.isdigit():
        # redis-py would quietly use database 0.
        raise exceptions.OptionsError(
            f"router_redis_url: the database must be a number, got {db!r} in {redacted(url)!r}")
    prefix = opts.router_key_prefix
    if "|" in prefix:
        raise exceptions.OptionsError(
            f"router_key_prefix must not contain '|', which ends the prefix in every Redis key "
            f"(got {prefix!r})")
    try:
        return RedisHealthStore(url, breaker(opts), prefix=prefix, clock=clock)
    except ValueError as e:
        raise exceptions.OptionsError(f"Cannot use router_redis_url {redacted(url)!r}: {e}") from None
