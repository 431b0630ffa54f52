"""Show the router's endpoints as a table: from a running router's /_router/status, or straight
from the shared health in Redis (no router needed); and run the router's commands on every
router that shares that Redis.

    ./scripts/status                               http://127.0.0.1:8080/_router/status
    ./scripts/status --url http://host:8080 --key KEY     (or ROUTER_CLIENT_KEY in the env)
    ./scripts/status --url http://127.0.0.1:8081 --url http://127.0.0.1:8082
                                                   one view of several workers: counters summed
    ./scripts/status --redis redis://127.0.0.1:6379/0 [--prefix endpoint_health_]
    ./scripts/status --json | --no-legend          the document itself | the table alone

The table shows each endpoint's own state and, in "cooling for", the model families and the
number of client keys it is cooling for (an endpoint healthy but for those is "partly
cooling"); the last error in full, wrapped; and a legend of its columns.

Commands (need --redis; they act on the shared state, so every router using that Redis and
prefix applies them at once, as router.disable etc. do from one router's command bar):

    --disable NAME     take an endpoint out of rotation      (router.disable)
    --enable NAME      put it back                           (router.enable)
    --reset [NAME]     forget failures and cooldowns         (router.reset)
    --forget [NAME]    forget learned prompt-cache behaviour (router.forget)
"""

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request

from claude_router.cli import prog
from claude_router.health import Health, Phase, phase
from claude_router.redis_store import redacted
from claude_router.status import table


def from_router(url: str, key: str) -> dict:
    req = urllib.request.Request(url.rstrip("/") + "/_router/status")
    if key:
        req.add_header("x-api-key", key)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def no_router(urls: list[str], e: Exception) -> str:
    """What to say when no router answers: where it looked, and how to start one."""
    why = getattr(e, "reason", None) or e
    tried = ", ".join(u.rstrip("/") + "/_router/status" for u in urls)
    return (f"cannot read the status: no router answered at {tried} ({why}).\n"
            "Start one with ./scripts/run --demo (a demo on mock relays) or ./scripts/run "
            "(your router.yaml), or point at yours with --url http://HOST:PORT; "
            "read the shared health without a router with --redis redis://HOST:6379/0.")


SUMMED = ("served", "failures", "client_stalls", "cost_usd", "rewrite_cost_usd", "sessions_pinned",
          "in_flight")


def from_routers(urls: list[str], key: str) -> dict:
    """One view of several routers sharing a Redis (the workers behind one address): health is
    shared, so it is read from the first that answers; per-process counters are summed."""
    docs, down = [], []
    for url in urls:
        try:
            docs.append(from_router(url, key))
        except (OSError, urllib.error.URLError, ValueError) as e:
            down.append(f"{url} ({getattr(e, 'reason', e)})")
    if not docs:
        raise OSError("; ".join(down))
    merged = json.loads(json.dumps(docs[0]))
    by_name = {e["name"]: e for e in merged["endpoints"]}
    for doc in docs[1:]:
        for ep in doc.get("endpoints", []):
            m = by_name.get(ep.get("name"))
            if m is None:  # not in the first router's config: a reload in progress
                continue
            for k in SUMMED:
                if isinstance(ep.get(k), (int, float)) and isinstance(m.get(k), (int, float)):
                    m[k] = round(m[k] + ep[k], 6)
            for k, v in (ep.get("tokens") or {}).items():
                if isinstance(v, int) and isinstance(m.get("tokens", {}).get(k), int):
                    m["tokens"][k] += v
            if not m.get("last_error") and ep.get("last_error"):
                m["last_error"] = ep["last_error"]
        if "sessions" in doc and "sessions" in merged:
            merged["sessions"]["count"] += doc["sessions"].get("count", 0)
            merged["sessions"]["recent"] += doc["sessions"].get("recent", [])
    merged["store"] = (f"{merged.get('store', '?')}; counters summed over {len(docs)} of "
                       f"{len(urls)} routers" + (f"; not answering: {', '.join(down)}" if down else ""))
    merged["routers"] = {"asked": urls, "answered": len(docs), "not_answering": down}
    return merged


def from_redis(url: str, prefix: str) -> dict:
    import redis

    from claude_router.redis_store import SEP

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    now = time.time()
    try:
        disabled = {n.decode() if isinstance(n, bytes) else n for n in client.smembers(f"{prefix}{SEP}disabled")}
    except redis.ResponseError:  # a stray key of another type
        disabled = set()
    rows = []
    key_scopes: dict[str, int] = {}  # endpoint -> client keys it is cooling for
    key_left: dict[str, float] = {}  # endpoint -> the longest of those cooldowns
    families: dict[str, dict] = {}  # endpoint -> its cooling model families
    ep_prefix = f"{prefix}{SEP}ep{SEP}"
    for key in sorted(client.scan_iter(match=ep_prefix.replace("[", "\\[") + "*")):
        try:
            f, e, u, p = (int(v or 0) for v in client.hmget(key, "f", "e", "u", "p"))
        except (redis.ResponseError, ValueError):
            continue  # not a health hash: the router reads it as healthy too
        h = Health(f, e, u / 1000, p / 1000)
        name = key.decode()[len(ep_prefix):]
        if "@" in name:  # one client key at an endpoint (by its keyed hash): not an endpoint
            if phase(h, now) is Phase.COOLING:
                ep = name.partition("@")[0]
                key_scopes[ep] = key_scopes.get(ep, 0) + 1
                key_left[ep] = max(key_left.get(ep, 0.0), round(h.ejected_until - now, 1))
            continue
        if "~" in name:  # one model family at an endpoint ("aws~opus"): shown on its endpoint
            if phase(h, now) is Phase.COOLING:
                ep, _, fam = name.partition("~")
                families.setdefault(ep, {})[fam] = {
                    "state": "cooling", "cooldown_seconds_left": round(h.ejected_until - now, 1)}
            continue
        rows.append({"index": "-", "name": name, "state": "disabled" if name in disabled else phase(h, now).value,
                     "consecutive_failures": f, "cooldown_seconds_left":
                     round(h.ejected_until - now, 1) if phase(h, now) is Phase.COOLING else 0,
                     "served": "-", "failures": "-", "tokens": {"input_tokens": "-", "output_tokens": "-"},
                     "cost_usd": 0.0, "last_error": ""})
    listed = {r["name"] for r in rows}
    # Disabled, or cooling only for a family or a key: no health state of its own (healthy).
    for name in sorted((disabled | set(families) | set(key_scopes)) - listed):
        rows.append({"index": "-", "name": name, "state": "disabled" if name in disabled else "healthy",
                     "consecutive_failures": 0,
                     "cooldown_seconds_left": 0, "served": "-", "failures": "-",
                     "tokens": {"input_tokens": "-", "output_tokens": "-"}, "cost_usd": 0.0,
                     "last_error": ""})
    for row in rows:
        row["cooling_for_keys"] = key_scopes.get(row["name"], 0)
        row["keys_cooldown_seconds_left"] = key_left.get(row["name"], 0)
        if row["name"] in families:
            row["families"] = families[row["name"]]
    return {"store": "redis (endpoints not listed are healthy; Redis holds no price order, "
                     "so # is '-'; served, tokens and cost are per router: ask one with --url)",
            "endpoints": rows}


async def run_command(url: str, prefix: str, action: str, name: str) -> str:
    """Apply one command to the shared state in Redis with the router's own store code, so
    every router using this Redis and prefix sees it (through its pub/sub subscription, or the
    learned-behaviour refresh every 2 s for --forget). Returns what was done."""
    from claude_router.affinity import RedisAffinity
    from claude_router.health import Breaker
    from claude_router.policy import health_subjects
    from claude_router.redis_store import SEP, RedisHealthStore

    # The store's own outage message speaks of serving requests; here the error below says it.
    logging.getLogger("claude_router").setLevel(logging.CRITICAL)
    store = RedisHealthStore(url, Breaker(), prefix=prefix, op_timeout=2.0)
    try:
        if not await store.wait_synced(timeout=5.0):
            raise ConnectionError(f"Redis {store.url} did not answer")
        target = name or "every endpoint"
        if action in ("disable", "enable"):
            await store.set_disabled(name, action == "disable")
            done = f"{name} {action}d on every router using {store.url}"
        elif action == "reset":
            if name:  # the endpoint, its families, and the client keys it cools
                ep = f"{prefix}{SEP}ep{SEP}"
                subjects = health_subjects([name]) + [
                    k.decode()[len(ep):] async for k in
                    store.client.scan_iter(match=f"{ep}{name}@*".replace("[", "\\["))]
            else:  # every endpoint with a state (an endpoint without one is healthy already)
                ep = f"{prefix}{SEP}ep{SEP}"
                subjects = [k.decode()[len(ep):] async for k in
                            store.client.scan_iter(match=ep.replace("[", "\\[") + "*")]
            store.track(subjects)
            await store.reset(None)
            done = f"health reset for {target} on every router using {store.url}"
        elif action == "forget":
            await RedisAffinity(store.client, prefix, op_timeout=2.0).forget(name or None)
            await asyncio.wait_for(store.client.ping(), 2.0)
            done = (f"learned cache behaviour forgotten for {target} on every router using "
                    f"{store.url} (they re-read it within 2 s)")
        else:
            raise ValueError(action)
        if not store.connected:
            raise ConnectionError(f"Redis {store.url} failed during the command")
        return done
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog("claude-router-status"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", action="append", help="a router's address (default "
                    "http://127.0.0.1:8080); several: one view with their counters summed")
    ap.add_argument("--key", default=os.environ.get("ROUTER_CLIENT_KEY", ""))
    ap.add_argument("--redis", help="read the shared health from this Redis instead")
    ap.add_argument("--prefix", default="endpoint_health_")
    ap.add_argument("--json", action="store_true", help="print the JSON document")
    ap.add_argument("--no-legend", action="store_true", help="leave out the columns' legend")
    cmds = ap.add_mutually_exclusive_group()
    cmds.add_argument("--disable", metavar="NAME", help="take NAME out of rotation on every router")
    cmds.add_argument("--enable", metavar="NAME", help="put NAME back into rotation on every router")
    cmds.add_argument("--reset", metavar="NAME", nargs="?", const="",
                      help="forget failures and cooldowns of NAME (default: of every endpoint)")
    cmds.add_argument("--forget", metavar="NAME", nargs="?", const="",
                      help="forget learned prompt-cache behaviour of NAME (default: of all)")
    args = ap.parse_args(argv)
    urls = args.url or ["http://127.0.0.1:8080"]
    command = next(((a, getattr(args, a)) for a in ("disable", "enable", "reset", "forget")
                    if getattr(args, a) is not None), None)
    if command is not None:
        from claude_router.endpoints import _NAME

        action, name = command
        if not args.redis:
            ap.error(f"--{action} acts on the shared state: give the routers' Redis with --redis URL")
        if name and not _NAME.match(name):
            ap.error(f"{name!r} is not an endpoint name")
        try:
            print(asyncio.run(run_command(args.redis, args.prefix, action, name)))
        except Exception as e:  # noqa: BLE001 - say what, not a traceback
            print(f"cannot {action}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    try:
        if args.redis:
            doc = from_redis(args.redis, args.prefix)
        elif len(urls) > 1:
            doc = from_routers(urls, args.key)
        else:
            doc = from_router(urls[0], args.key)
    except urllib.error.HTTPError as e:
        print(f"cannot read the status: {e.url} answered {e.code} {e.reason}"
              + (": give a client key with --key KEY or ROUTER_CLIENT_KEY" if e.code in (401, 403) else ""),
              file=sys.stderr)
        return 1
    except (OSError, urllib.error.URLError) as e:
        if args.redis:
            print(f"cannot read the status from Redis {redacted(args.redis)}: {e}", file=sys.stderr)
        else:
            print(no_router(urls, e), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - redis errors and the like: say what, not a traceback
        print(f"cannot read the status: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    width = shutil.get_terminal_size((120, 24)).columns
    print(json.dumps(doc, indent=2) if args.json else table(doc, width=width, legend=not args.no_legend))
    return 0


if __name__ == "__main__":
    sys.exit(main())
