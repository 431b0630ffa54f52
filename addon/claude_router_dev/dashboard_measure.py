"""What the dashboard costs: how long the page takes to load on loopback (the page, its files
and its first document drawn), and the CPU the router spends while one page stays open,
polling every 2 s, against the same router idle. Not a test: numbers to read.

    .venv/py3.12/bin/python -m claude_router_dev.dashboard_measure [--loads 10] [--seconds 60]
        [--rows 3600]

One mitmdump with the router (two endpoints on the mock relay, an admin key, a ledger seeded
with ``--rows`` requests spread over the last hour: one a second), Debian's chromium driven by
Playwright. Load time: in the page, from the navigation's start to the first document drawn
(``performance.mark("dashboard-drawn")``), for a first visit in a fresh browser context (the
401 challenge, nothing cached) and for a reload (files revalidated), median and worst of
``--loads``. CPU: the router process's user+system time (/proc/PID/stat) over ``--seconds``
with no page open, then over ``--seconds`` with one page open, no traffic. Targets (issue 23):
< 200 ms and < 1 % of a core. The machine's load average is printed with them: on a busy
machine every time is longer.
"""

import argparse
import base64
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from claude_router import ledger
from claude_router_dev.harness import clean_env, free_port, router_argv, start_mock, stop, wait_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ADMIN = "sk-admin-measure-1a2b3c"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seed(path: Path, rows: int, now: float) -> None:
    db = ledger.connect(str(path))
    values = []
    for i in range(rows):
        failover = i % 17 == 0
        endpoint, attempts = ("droid", "aws:529, droid:200") if failover else ("aws", "aws:200")
        values.append(ledger.Row(now - 3600 + i * 3600 / rows, ("alice", "-", "bob")[i % 3], f"{i % 50:012x}",
                                 "claude-sonnet-4-5", endpoint, attempts, 200, 1200, 300, 0, 4000,
                                 0.004).values())
    db.executemany(f"INSERT INTO requests ({', '.join(ledger.COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(ledger.COLUMNS))})", values)
    db.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", type=int, default=10, help="page loads to time (default 10)")
    ap.add_argument("--seconds", type=float, default=60.0, help="each CPU window (default 60)")
    ap.add_argument("--rows", type=int, default=3600, help="ledger rows in the last hour (default 3600)")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="dashboard-measure-"))
    mock = start_mock()
    cfg = work / "router.yaml"
    cfg.write_text(f"""
endpoints:
  - {{name: aws, url: "{mock.url('aws')}", price: {{input: 3, output: 15}}}}
  - {{name: droid, url: "{mock.url('droid')}", price: {{input: 6, output: 30}}}}
admin_keys: [{ADMIN}]
""")
    ledger_path = work / "ledger.sqlite3"
    seed(ledger_path, args.rows, time.time())
    port = free_port()
    confdir = work / "conf"
    confdir.mkdir()
    proc = subprocess.Popen(
        router_argv(port, confdir=confdir, verbosity="warn",
                    options={"router_config": str(cfg), "router_ledger": str(ledger_path)}),
        stdout=(work / "router.log").open("w"), stderr=subprocess.STDOUT, env=clean_env())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port, proc)
        auth = {"authorization": "Basic " + base64.b64encode(f"admin:{ADMIN}".encode()).decode()}
        for _ in range(100):  # the router has loaded its config
            if httpx.get(f"{base}/_router/dashboard.json", headers=auth, timeout=10).status_code == 200:
                break
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            cold, warm = [], []
            for i in range(args.loads + 1):
                context = browser.new_context(http_credentials={"username": "admin", "password": ADMIN})
                page = context.new_page()
                for times in (cold, warm):  # a first visit (401 challenge, nothing cached), a reload
                    if times is cold:
                        page.goto(f"{base}/_router/")
                    else:
                        page.reload()
                    page.locator("#updated", has_text="updated ").wait_for()  # (the page's CSP: no eval)
                    drawn = page.evaluate("() => performance.getEntriesByName('dashboard-drawn')[0].startTime")
                    if i:  # (the first warms the router's file cache)
                        times.append(drawn)
                context.close()
            for what, times in (("first visit", cold), ("reload", warm)):
                print(f"page load, {what} (navigation start to the first document drawn; {args.rows} "
                      f"ledger rows): median {statistics.median(times):.0f} ms, worst {max(times):.0f} ms "
                      f"over {len(times)} loads")

            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            idle = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
            context = browser.new_context(http_credentials={"username": "admin", "password": ADMIN})
            page = context.new_page()
            polls = []
            page.on("request", lambda r: polls.append(1) if r.url.endswith("dashboard.json") else None)
            page.goto(f"{base}/_router/")
            page.locator("#updated", has_text="updated ").wait_for()
            c0, t0, n0 = cpu_seconds(proc.pid), time.monotonic(), len(polls)
            page.wait_for_timeout(args.seconds * 1000)
            busy = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
            print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())} ({os.cpu_count()} cores)")
            print(f"router CPU: idle {idle * 100:.2f} % of a core; one page open {busy * 100:.2f} % "
                  f"({len(polls) - n0} polls in {args.seconds:g} s); the page's share "
                  f"{(busy - idle) * 100:.2f} %")
            browser.close()
    finally:
        stop(proc)
        stop(mock.proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
