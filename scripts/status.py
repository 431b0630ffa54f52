"""Show the router's endpoints as a table: from a running router's /_router/status, or straight
from the shared health in Redis (no router needed).

    ./scripts/status                               http://127.0.0.1:8080/_router/status
    ./scripts/status --url http://host:8080 --key KEY     (or ROUTER_CLIENT_KEY in the env)
    ./scripts/status --redis redis://127.0.0.1:6379/0 [--prefix endpoint_health_]
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from claude_router.health import Health, Phase, phase
from claude_router.status import table


def from_router(url: str, key: str) -> dict:
    req = urllib.request.Request(url.rstrip("/") + "/_router/status")
    if key:
        req.add_header("x-api-key", key)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def from_redis(url: str, prefix: str) -> dict:
    import redis

    from claude_router.redis_store import SEP

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    now = time.time()
    try:
        disabled = {n.decode() for n in client.smembers(f"{prefix}{SEP}disabled")}
    except redis.ResponseError:  # a stray key of another type
        disabled = set()
    rows = []
    ep_prefix = f"{prefix}{SEP}ep{SEP}"
    for i, key in enumerate(sorted(client.scan_iter(match=ep_prefix.replace("[", "\\[") + "*"))):
        try:
            f, e, u, p = (int(v or 0) for v in client.hmget(key, "f", "e", "u", "p"))
        except (redis.ResponseError, ValueError):
            continue  # not a health hash: the router reads it as healthy too
        h = Health(f, e, u / 1000, p / 1000)
        name = key.decode()[len(ep_prefix):]
        rows.append({"index": i, "name": name, "state": "disabled" if name in disabled else phase(h, now).value,
                     "consecutive_failures": f, "cooldown_seconds_left":
                     round(h.ejected_until - now, 1) if phase(h, now) is Phase.COOLING else 0,
                     "served": "-", "failures": "-", "tokens": {"input_tokens": "-", "output_tokens": "-"},
                     "cost_usd": 0.0, "last_error": ""})
    return {"store": f"redis (endpoints not listed are healthy)", "endpoints": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key", default=os.environ.get("ROUTER_CLIENT_KEY", ""))
    ap.add_argument("--redis", help="read the shared health from this Redis instead")
    ap.add_argument("--prefix", default="endpoint_health_")
    ap.add_argument("--json", action="store_true", help="print the JSON document")
    args = ap.parse_args()
    try:
        doc = from_redis(args.redis, args.prefix) if args.redis else from_router(args.url, args.key)
    except (OSError, urllib.error.URLError) as e:
        print(f"cannot read the status: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - redis errors and the like: say what, not a traceback
        print(f"cannot read the status: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
