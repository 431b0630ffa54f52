"""``./scripts/usage``: spend by client, day, endpoint and model, read from the ledger
(``router_ledger``; by default router-ledger.sqlite3 in mitmproxy's confdir). A table for the
terminal, ``--csv`` for a spreadsheet. Reads only: the file is opened read-only and the router
may keep writing it.

    ./scripts/usage                        # the last 30 days, every client
    ./scripts/usage --days 7 --client alice
    ./scripts/usage --csv > spend.csv
"""

import argparse
import csv
import io
import os
import sqlite3
import sys
import time
from collections.abc import Sequence

from .ledger import FILENAME, day_of

HEADER = ("client", "day", "endpoint", "model", "requests", "refused", "input_tokens", "output_tokens",
          "cache_write_tokens", "cache_read_tokens", "cost_usd")

_QUERY = """
SELECT client, date(t, 'unixepoch') AS day, COALESCE(endpoint, '-'), COALESCE(model, '-'),
       COUNT(*), SUM(status = 429 AND endpoint IS NULL),
       SUM(input_tokens), SUM(output_tokens), SUM(cache_write_tokens), SUM(cache_read_tokens),
       SUM(cost_usd)
FROM requests
WHERE t >= ? {client}
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""


def rows(db: sqlite3.Connection, since: float, client: str | None = None) -> list[tuple]:
    """Spend grouped by client, UTC day, endpoint and model since ``since`` (unix seconds)."""
    q = _QUERY.format(client="AND client = ?" if client else "")
    args = (since, client) if client else (since,)
    return [tuple(r) for r in db.execute(q, args)]


def csv_text(data: Sequence[tuple]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(HEADER)
    for r in data:
        w.writerow([*r[:-1], f"{r[-1]:.6f}"])
    return out.getvalue()


def table(data: Sequence[tuple]) -> str:
    """A terminal table, with a total per client and a grand total."""
    shown: list[tuple[str, ...]] = [HEADER]
    totals: dict[str, list] = {}
    for r in data:
        shown.append((*map(str, r[:-1]), f"{r[-1]:.4f}"))
        t = totals.setdefault(r[0], [0] * 7)
        for i, v in enumerate(r[4:]):
            t[i] += v or 0
    for name, t in totals.items():
        shown.append((name, "total", "", "", *map(str, t[:-1]), f"{t[-1]:.4f}"))
    if totals:
        grand = [sum(t[i] for t in totals.values()) for i in range(7)]
        shown.append(("all", "total", "", "", *map(str, grand[:-1]), f"{grand[-1]:.4f}"))
    widths = [max(len(r[i]) for r in shown) for i in range(len(HEADER))]
    right = set(range(4, len(HEADER)))
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in shown)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="usage", description="Spend by client, day, endpoint and model, "
                                                          "from the router's ledger.")
    p.add_argument("--ledger", help=f"the ledger file (default: {FILENAME} in --confdir)")
    p.add_argument("--confdir", default="~/.mitmproxy", help="mitmproxy's confdir (default: ~/.mitmproxy)")
    p.add_argument("--days", type=int, default=30, help="how many days back (default: 30)")
    p.add_argument("--client", help="one client's spend only")
    p.add_argument("--csv", action="store_true", help="CSV for a spreadsheet instead of a table")
    a = p.parse_args(argv)
    path = os.path.expanduser(a.ledger or os.path.join(a.confdir, FILENAME))
    if not os.path.exists(path):
        print(f"usage: no ledger at {path} (see --ledger, --confdir)", file=sys.stderr)
        return 2
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        since = time.time() - a.days * 86400
        since = since - since % 86400  # whole UTC days
        data = rows(db, since, a.client)
    except sqlite3.Error as e:
        print(f"usage: cannot read {path}: {e}", file=sys.stderr)
        return 2
    if a.csv:
        sys.stdout.write(csv_text(data))
    else:
        print(f"ledger: {path}; since {day_of(since)} (UTC)")
        print(table(data) if data else "no requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
