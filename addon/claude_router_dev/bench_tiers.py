"""Benchmark phase "tiers": load within a price tier (issue 22), the router beside today's.

Run through ``scripts/bench``::

    ./scripts/bench --tiers                       the whole comparison (about 30 s)
    ./scripts/bench --tiers --baseline HEAD~3     "today" is another commit's addon
    ./scripts/bench --tiers --sessions 20 --streams 8 --cap 2    a small run
    ./scripts/bench --tiers --help                every option

Two targets, measured in one run, each a real ``mitmdump -s addon/router.py`` in reverse mode
in front of one mock relay (``claude_router_dev.mock_relay``, the working tree's):

    router   the working tree's addon
    today    the addon of ``--baseline REF`` (default ``ee65710``, the last commit before
             tiers: ``git archive REF addon/`` into the run's temp directory), which is what
             users had before ``weight`` and ``max_concurrency`` existed. Its router.yaml has the
             very same endpoints and prices without those two fields (it refuses unknown fields).
             Both load the bench's import probe; "today" fails unless every ``claude_router``
             module it ran came from its own copy.

Four scenarios, each a router.yaml of its own (so eight router processes), the endpoints of each
target and scenario with names of their own at the mock, so what the mock counts is theirs:

    spread   a and b at one price (weight 1 each)
    cap      a and b at one price, max_concurrency 4 each, and a dearer c behind them
    wait     a and b at one price, max_concurrency 4 each, nothing behind them (requests wait
             for a free slot)
    limit    the same, and a and b are relays that take 4 requests at once: the mock answers
             one more 429 rate_limit_error (its ``max_inflight`` fault), as a relay with a
             concurrency limit does

Measured, target by target (never two at once), in this order for each scenario:

    sessions   (spread only) ``--sessions`` new conversations, each with a session id of its own
               (Claude Code's ``metadata.user_id``), ``--session-concurrency`` at a time; the
               share of each endpoint as the mock counts the requests it served
    streams    ``--streams`` SSE streams at once, each a new conversation; the mock sends each
               stream's events ``--gap-ms`` apart (``--words`` words, so about words + 5 events),
               so every stream holds its request open for a while. Per endpoint: the most
               requests in flight at once AT THE MOCK (``GET /_mock/inflight``, cleared before
               the phase), the requests it got and (limit) those it refused with a 429; the
               streams that failed as the client
               saw them (not 200, an exception, or no ``message_stop`` at the end); the phase's
               wall time and the p50 and max duration of the whole answers (from sending to
               the last byte); the attempts the router marked ``busy`` (X-Router-Attempts)

Prints a Markdown table (the two targets side by side, and whether each meets issue 22's
claims: 50 +/- 7 % each, the cap never exceeded, nothing fails) and writes the results as JSON
(``--json``, default ``bench-results-tiers.json``). No timing is a claim here: the wall times
say how long the cap makes streams wait, on whatever machine this runs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from claude_router_dev import bench, harness
from claude_router_dev.harness import ROOT, ROUTER_SCRIPT

DEFAULT_BASELINE = "ee65710"  # the last commit before tiers (df0ec7a brought them)
MODEL = "claude-sonnet-4-5"
USER = "user_" + "0" * 64 + "_account__session_"  # Claude Code's metadata.user_id, before the uuid
SHARE_TOLERANCE = 7.0  # percentage points either side of the fair share (issue 22)
CHEAP = "{input: 3, output: 15}"
DEAR = "{input: 3.3, output: 16.5}"
TARGETS = ("router", "today")


@dataclass(frozen=True)
class Scenario:
    """One router.yaml: the endpoints (name, price, the router's extra fields) and what is
    measured on it."""
    name: str
    title: str
    endpoints: tuple[tuple[str, str, str], ...]
    sessions: bool = False
    streams: bool = True
    relay_limit: int | None = None  # the mock's own limit of requests at once per endpoint

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.endpoints]

    @property
    def caps(self) -> dict[str, int]:
        """max_concurrency per endpoint, as the router's config says."""
        out = {}
        for name, _, extra in self.endpoints:
            for part in extra.split(","):
                key, _, value = part.partition(":")
                if key.strip() == "max_concurrency":
                    out[name] = int(value)
        return out


def scenarios(cap: int) -> list[Scenario]:
    fields = f"weight: 1, max_concurrency: {cap}"
    return [
        Scenario("spread", "a and b at one price, weights 1:1",
                 (("a", CHEAP, "weight: 1"), ("b", CHEAP, "weight: 1")), sessions=True),
        Scenario("cap", f"a and b capped at {cap} each, a dearer c behind",
                 (("a", CHEAP, fields), ("b", CHEAP, fields), ("c", DEAR, ""))),
        Scenario("wait", f"a and b capped at {cap} each, nothing behind",
                 (("a", CHEAP, fields), ("b", CHEAP, fields))),
        Scenario("limit", f"a and b are relays that take {cap} at once (429 beyond), capped at {cap}",
                 (("a", CHEAP, fields), ("b", CHEAP, fields)), relay_limit=cap),
    ]


def config_yaml(scenario: Scenario, urls: dict[str, str], tiers: bool) -> str:
    """The scenario's router.yaml; ``tiers`` False leaves out weight and max_concurrency (what
    a router without tiers refuses as unknown fields)."""
    lines = ["endpoints:"]
    for name, price, extra in scenario.endpoints:
        lines += [f"  - name: {name}", f"    url: {urls[name]}", f"    price: {price}"]
        if tiers:
            lines += [f"    {part.strip()}" for part in extra.split(",") if part.strip()]
    return "\n".join(lines) + "\n"


def mock_name(target: str, scenario: str, endpoint: str) -> str:
    """The endpoint's name at the mock: its own per target and scenario."""
    return f"{target}-{scenario}-{endpoint}"


# ----------------------------------------------------------------------------- pure figures

def shares(counts: dict[str, int], names: list[str]) -> dict[str, dict[str, float]]:
    """Each endpoint's count and percentage of the total (0 % each when nothing was counted)."""
    total = sum(counts.get(n, 0) for n in names)
    return {n: {"count": counts.get(n, 0),
                "percent": 100.0 * counts.get(n, 0) / total if total else 0.0} for n in names}


def fair(share: dict[str, dict[str, float]], tolerance: float = SHARE_TOLERANCE) -> bool:
    """Whether every endpoint got an equal share, give or take ``tolerance`` points."""
    if not share:
        return False
    even = 100.0 / len(share)
    return all(abs(s["percent"] - even) <= tolerance for s in share.values())


def within_caps(peak: dict[str, int], caps: dict[str, int]) -> bool:
    return all(peak.get(name, 0) <= cap for name, cap in caps.items())


def stream_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The streams phase from each stream's record (ok, seconds, error, endpoint, busy); the
    p50 and max are those of the whole answers (a refusal is quick, and counted as failed)."""
    secs = sorted(r["seconds"] for r in results if r["ok"])
    errors = collections.Counter(r["error"] for r in results if not r["ok"])
    return {"n": len(results), "failed": sum(errors.values()), "errors": dict(errors),
            "p50_s": bench.percentile(secs, 0.5) if secs else None,
            "max_s": secs[-1] if secs else None,
            "busy_skips": sum(r.get("busy", 0) for r in results)}


def _per_endpoint(values: dict[str, int], names: list[str]) -> str:
    return " / ".join(str(values.get(n, 0)) for n in names)


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def render(results: dict[str, Any]) -> str:
    """The Markdown table: one row per figure, the targets side by side, and issue 22's claim
    with whether each target meets it."""
    labels = results["labels"]
    head = ["| scenario | measured | " + " | ".join(labels[t] for t in TARGETS)
            + " | issue 22's claim |", "|---|---|" + "---:|" * len(TARGETS) + "---|"]
    rows: list[str] = []

    shown: set[str] = set()

    def row(scenario: str, what: str, cells: list[str], claim: str = "") -> None:
        first = scenario not in shown  # the scenario's name on its first row only
        shown.add(scenario)
        rows.append(f"| {scenario if first else ''} | {what} | " + " | ".join(cells) + f" | {claim} |")

    def met(checks: list[bool | None]) -> str:
        return ", ".join(f"{t} {'yes' if ok else 'no' if ok is not None else '–'}"
                         for t, ok in zip(TARGETS, checks))

    for sc in results["scenarios"]:
        name, names, caps = sc["name"], sc["endpoints"], sc["caps"]
        per = [sc["targets"].get(t, {}) for t in TARGETS]
        label = f"{name}: {sc['title']}"
        failed = [p.get("status", "ok") for p in per]
        if any(f != "ok" for f in failed):
            row(label, "status", failed)
        if sc.get("sessions"):
            n = results["settings"]["sessions"]
            cells = [" / ".join(f"{s['count']} ({s['percent']:.1f} %)" for s in p["sessions"]["share"].values())
                     if "sessions" in p else "–" for p in per]
            row(label, f"{n} new sessions, served by {' / '.join(names)}", cells,
                f"each 50 ± {SHARE_TOLERANCE:g} %: "
                + met([fair(p["sessions"]["share"]) if "sessions" in p else None for p in per]))
            row(label, "failed (sessions)", [str(p["sessions"]["failed"]) if "sessions" in p else "–" for p in per])
        if sc.get("streams"):
            n = results["settings"]["streams"]
            st = [p.get("streams") for p in per]
            capped = [e for e in names if e in caps]
            row(label, f"{n} streams at once: peak in flight at the mock, {' / '.join(names)}",
                [_per_endpoint(s["peak"], names) if s else "–" for s in st],
                f"at most {' / '.join(str(caps[e]) for e in capped)} at {' / '.join(capped)}: "
                + met([within_caps(s["peak"], caps) if s else None for s in st]) if caps else "")
            row(label, f"requests the mock got, {' / '.join(names)}",
                [_per_endpoint(s["served"], names) if s else "–" for s in st])
            if sc.get("relay_limit"):
                row(label, f"refused by the relay (429), {' / '.join(names)}",
                    [_per_endpoint(s["refused"], names) if s else "–" for s in st])
            row(label, "streams failed (client-visible)",
                [str(s["failed"]) + (f" ({s['errors']})" if s["errors"] else "") if s else "–" for s in st],
                "nothing fails: " + met([s["failed"] == 0 if s else None for s in st]))
            row(label, "wall time; p50 / max of the whole answers",
                [f"{_s(s['wall_s'])}; {_s(s['p50_s'])} / {_s(s['max_s'])}" if s else "–" for s in st])
            if caps:
                row(label, "attempts skipped as busy", [str(s["busy_skips"]) if s else "–" for s in st])
    return "\n".join(head + rows) + "\n"


# ------------------------------------------------------------------------------- the client

HEADERS = {"content-type": "application/json", "x-api-key": "bench", "anthropic-version": "2023-06-01"}


def message(stream: bool) -> bytes:
    """A first turn of a new conversation: a session id of its own."""
    return json.dumps({"model": MODEL, "max_tokens": 64, "stream": stream,
                       "metadata": {"user_id": USER + str(uuid.uuid4())},
                       "messages": [{"role": "user", "content": "hello"}]}).encode()


async def one_stream(session: aiohttp.ClientSession, url: str, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"ok": False, "error": None, "endpoint": None, "busy": 0}
    try:
        async with session.post(url, data=message(True), headers=HEADERS,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            raw = await r.read()
            rec["endpoint"] = r.headers.get("X-Used-Endpoint")
            rec["busy"] = r.headers.get("X-Router-Attempts", "").count(":busy")
            if r.status != 200:
                rec["error"] = f"HTTP {r.status}"
            else:
                events = harness.sse_events(raw, lenient=True)
                if not events or events[-1][0] != "message_stop":
                    rec["error"] = "no message_stop" if events else "no events"
                else:
                    rec["ok"] = True
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        rec["error"] = type(e).__name__
    rec["seconds"] = time.perf_counter() - t0
    return rec


async def one_message(session: aiohttp.ClientSession, url: str) -> str | None:
    """None when the answer is a 200, else why not."""
    try:
        async with session.post(url, data=message(False), headers=HEADERS) as r:
            await r.read()
            return None if r.status == 200 else f"HTTP {r.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return type(e).__name__


def client(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
        timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False, trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar())


# ------------------------------------------------------------------------------------ the run

@dataclass
class Router:
    target: str
    scenario: Scenario
    url: str = ""
    port: int = 0
    proc: subprocess.Popen | None = None
    status: str = "ok"
    mock_names: dict[str, str] = field(default_factory=dict)  # endpoint -> its name at the mock


class TiersBench:
    def __init__(self, args: argparse.Namespace, procs: bench.Procs, tmp: Path) -> None:
        self.args, self.procs, self.tmp = args, procs, tmp
        self.mock: harness.MockRelay | None = None
        self.routers: list[Router] = []
        self.probes: dict[str, tuple[Path, Path]] = {}

    async def start(self) -> None:
        a = self.args
        base = bench.start_mock(self.procs, "mock", [])
        self.mock = harness.MockRelay(self.procs.items[-1][1], int(base.rsplit(":", 1)[1]))
        bench.note(f"mock relay at {base}")
        home = self.tmp / f"today-{a.baseline_short}"
        today_script, why = "", ""
        try:
            today_script = str(bench.extract_addon(a.baseline_sha, home))
        except (OSError, ValueError, subprocess.SubprocessError, tarfile.TarError) as e:
            why = f"failed: extracting {a.baseline}: {e}"
        scripts = {"router": (ROUTER_SCRIPT, ROOT / "addon"), "today": (today_script, home / "addon")}
        for target, (script, addon) in scripts.items():
            probe, out = bench.write_probe(self.tmp / f"probe-{target}")
            self.probes[target] = (out, addon)
            for sc in scenarios(a.cap):
                r = Router(target, sc)
                r.mock_names = {e: mock_name(target, sc.name, e) for e in sc.names}
                self.routers.append(r)
                if not script:
                    r.status = why
                    continue
                cfg = self.tmp / f"{target}-{sc.name}.yaml"
                cfg.write_text(config_yaml(sc, {e: f"{base}/{m}" for e, m in r.mock_names.items()},
                                           tiers=target == "router"))
                r.port = harness.free_port()
                r.url = f"http://127.0.0.1:{r.port}/v1/messages"
                # the probe only once per target: it records that process's imports
                extra = ("-s", probe) if sc.name == "spread" else ()
                r.proc = self.procs.spawn(f"{target}-{sc.name}", bench.router_argv(
                    r.port, self.confdir(f"{target}-{sc.name}"), [], "--set", f"router_config={cfg}",
                    *extra, script=script))
        live = [r for r in self.routers if r.proc is not None]
        for r, down in zip(live, await asyncio.gather(*(bench.wait_port(r.port, r.proc, 60) for r in live))):
            if down:
                r.status = f"failed: {down}; log: {self.procs.log_excerpt(f'{r.target}-{r.scenario.name}')}"
                bench.note(f"{r.target}-{r.scenario.name}: {r.status}")
        await self.check_imports()

    def confdir(self, name: str) -> Path:
        d = self.tmp / f"conf-{name}"
        d.mkdir(exist_ok=True)
        return d

    async def check_imports(self) -> None:
        """Each target's claude_router came from its own copy (the probe wrote at `running`)."""
        for target, (out, home) in self.probes.items():
            routers = [r for r in self.routers if r.target == target and r.status == "ok"]
            if not routers:
                continue
            deadline = time.monotonic() + 30
            while True:  # the file exists a moment before the probe has written it
                try:
                    wrong = bench.imports_outside(json.loads(out.read_text()), home)
                    break
                except (OSError, ValueError) as e:
                    if time.monotonic() > deadline:
                        wrong = [f"the import probe wrote nothing ({type(e).__name__})"]
                        break
                await asyncio.sleep(0.1)
            if wrong:
                for r in routers:
                    r.status = f"failed: not its own code: {'; '.join(wrong)[:300]}"
                bench.note(f"{target}: {routers[0].status}")

    def reset_mock(self, r: Router, fault: dict[str, Any] | None) -> None:
        assert self.mock is not None
        self.mock.reset()  # faults, request counts and the in-flight peaks: this phase's alone
        for m in r.mock_names.values():
            if fault:
                self.mock.fault(m, **fault)

    def counted(self, r: Router, what: str) -> dict[str, int]:
        """The mock's count per endpoint (by the router's names): requests it got ("served"),
        the most in flight at once ("peak"), or those it refused at its own limit ("refused")."""
        assert self.mock is not None
        got: dict[str, int]
        if what == "refused":
            got = collections.Counter(q["endpoint"] for q in self.mock.requests() if q["outcome"] == "429")
        else:
            got = self.mock.stats() if what == "served" else self.mock.inflight()["peak"]
        return {e: int(got.get(m, 0)) for e, m in r.mock_names.items()}

    async def sessions(self, r: Router) -> dict[str, Any]:
        a = self.args
        self.reset_mock(r, None)
        todo = iter(range(a.sessions))
        errors: list[str] = []

        async def worker(s: aiohttp.ClientSession) -> None:
            for _ in todo:
                if (err := await one_message(s, r.url)) is not None:
                    errors.append(err)

        async with client(a.session_concurrency) as s:
            await asyncio.gather(*(worker(s) for _ in range(a.session_concurrency)))
        served = self.counted(r, "served")
        return {"served": served, "share": shares(served, r.scenario.names), "failed": len(errors),
                "errors": dict(collections.Counter(errors))}

    async def streams(self, r: Router) -> dict[str, Any]:
        a = self.args
        limit = {"max_inflight": r.scenario.relay_limit} if r.scenario.relay_limit else {}
        self.reset_mock(r, {"event_gap_ms": a.gap_ms, "words": a.words, **limit})
        async with client(a.streams) as s:
            t0 = time.perf_counter()
            recs = await asyncio.gather(*(one_stream(s, r.url, a.stream_timeout) for _ in range(a.streams)))
            wall = time.perf_counter() - t0
        assert self.mock is not None
        deadline = time.monotonic() + 10  # the mock's count of a stream ends after its last write
        while self.mock.inflight()["now"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {**stream_summary(recs), "wall_s": wall, "peak": self.counted(r, "peak"),
                "served": self.counted(r, "served"), "refused": self.counted(r, "refused")}

    async def run(self) -> dict[str, Any]:
        a = self.args
        out: list[dict[str, Any]] = []
        for i, sc in enumerate(scenarios(a.cap)):
            entry: dict[str, Any] = {"name": sc.name, "title": sc.title, "endpoints": sc.names,
                                     "caps": sc.caps, "sessions": sc.sessions, "streams": sc.streams,
                                     "relay_limit": sc.relay_limit,
                                     "targets": {}}
            pair = [r for r in self.routers if r.scenario.name == sc.name]
            for r in pair if i % 2 == 0 else pair[::-1]:  # who goes first alternates
                res: dict[str, Any] = entry["targets"].setdefault(r.target, {"status": r.status})
                if r.status != "ok":
                    continue
                if r.proc is not None and r.proc.poll() is not None:
                    res["status"] = r.status = f"failed: exited with {r.proc.returncode}"
                    continue
                if sc.sessions:
                    bench.note(f"{sc.name}/{r.target}: {a.sessions} new sessions")
                    res["sessions"] = await self.sessions(r)
                if sc.streams:
                    bench.note(f"{sc.name}/{r.target}: {a.streams} streams at once")
                    res["streams"] = await self.streams(r)
            out.append(entry)
        return {"scenarios": out}


# ----------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./scripts/bench --tiers",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", metavar="REF", default=DEFAULT_BASELINE,
                   help=f"the commit whose addon is 'today' ({DEFAULT_BASELINE}: before tiers)")
    p.add_argument("--sessions", type=int, default=200, help="new sessions in the spread scenario (200)")
    p.add_argument("--session-concurrency", type=int, default=4, help="sessions sent at once (4)")
    p.add_argument("--streams", type=int, default=32, help="SSE streams at once (32)")
    p.add_argument("--cap", type=int, default=4, help="max_concurrency of a and b (4)")
    p.add_argument("--gap-ms", type=int, default=50, help="the mock's gap between events (50)")
    p.add_argument("--words", type=int, default=20, help="words per stream, one event each (20)")
    p.add_argument("--stream-timeout", type=float, default=90, help="seconds a stream may take (90)")
    p.add_argument("--json", default=str(ROOT / "bench-results-tiers.json"), help="results file")
    p.add_argument("--max-seconds", type=float, default=600, help="abort after this long (600)")
    a = p.parse_args(argv)
    if min(a.sessions, a.session_concurrency, a.streams, a.cap, a.words) < 1 or a.gap_ms < 0 \
            or a.stream_timeout <= 0 or not a.baseline.strip():
        p.error("counts must be positive, --gap-ms not negative, --baseline a REF")
    a.baseline_sha = a.baseline_short = None
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.baseline_sha, args.baseline_short = bench.resolve_ref(args.baseline)
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt
    tmp = Path(tempfile.mkdtemp(prefix="claude-router-bench-tiers-"))
    procs = bench.Procs(tmp)
    started = time.monotonic()

    async def amain() -> dict[str, Any]:
        async with asyncio.timeout(args.max_seconds):
            b = TiersBench(args, procs, tmp)
            await b.start()
            return await b.run()

    try:
        results = asyncio.run(amain())
    except KeyboardInterrupt:
        bench.note("interrupted")
        return 130
    except TimeoutError:
        bench.note(f"aborted after --max-seconds {args.max_seconds:g}")
        return 1
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = bench.machine()
    results.update(
        labels={"router": f"router ({machine['git'].replace(' (', ', ').rstrip(')')})",
                "today": f"today ({args.baseline_short})"},
        settings={k: getattr(args, k) for k in ("baseline", "baseline_sha", "sessions",
                                                "session_concurrency", "streams", "cap", "gap_ms",
                                                "words")},
        machine=machine, wall_seconds=time.monotonic() - started,
        command=" ".join(["./scripts/bench", "--tiers", *(argv if argv is not None else sys.argv[1:])]))
    table = render(results)
    results["table_markdown"] = table
    with contextlib.suppress(OSError):
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    bench.note(f"done in {results['wall_seconds']:.0f}s; full results in {args.json}")
    return 0
