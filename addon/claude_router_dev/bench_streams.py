"""Benchmark phase "streams": many long SSE streams held at once by one proxy process.

Run through ``scripts/bench``:

    ./scripts/bench --streams 1000,2000     only this phase, at these levels (default 1000,2000)
    ./scripts/bench                         the full benchmark; this phase is appended as its own
                                            table at levels 1000,2000 (about 2.5 minutes more;
                                            ``--no-streams`` leaves it out)
    ./scripts/bench --quick                 smoke run: level 100, events 100 ms apart
    ./scripts/bench --streams 1000 --stream-rounds 5    every level and target 5 times (the
                                            order rotated each round): a table of every round's
                                            p99s and their median besides the first round's table
    --stream-events 40 --stream-gap-ms 250 --stream-rate 200    the stream shape (defaults)

Each level runs every target once, each in a fresh process (a fresh mitmdump per target per
level), one target at a time, the order rotated from level to level:

    direct            the client straight to the mock relay: the floor
    mitmdump+stream   plain ``mitmdump --mode reverse:MOCK --set stream_large_bodies=1``
    mitmdump+stream+index   the same plus the router's hook index (``claude_router_dev/addons/hook_index.py``):
                      the base that shows what the router's own work costs
    router            ``mitmdump -s addon/router.py`` with one endpoint ``ok=MOCK/ok`` (memory store)

Both proxies also load ``claude_router_dev/addons/loopmon.py`` (event-loop stall and gc timing; SIGUSR1 resets
it after the warm-up); ``LOOPMON_CALLBACKS=1 ./scripts/bench --streams ...`` makes it also
time every loop callback, so the JSON says what each long stall was made of (diagnosis only: it
costs about a microsecond per callback). ``--stream-targets router`` measures only some
targets. nginx is not measured here.

A level of N streams: N POST /v1/messages with ``"stream": true``, opened at --stream-rate per
second in total, one HTTP/1.1 connection each, held until the mock's last event. The mock
(``--fault ok={"event_gap_ms": GAP, "words": EVENTS-6, "stamp_events": true}``) sends EVENTS
events GAP ms apart and stamps each with its CLOCK_MONOTONIC time just before writing it.

The client is two processes of this script (``--client``), each with raw asyncio protocols
(a request writer, a chunked decoder and an SSE splitter, garbage collector off), opening every
other stream on a shared CLOCK_MONOTONIC schedule, so every target gets the very same client.
Measured:

    errors                 non-200, connect/reset errors, fewer events than sent or no
                           message_stop, and streams over EVENTS x GAP + 30 s (timeout)
    event delay            arrival - mock stamp of every content event (all but message_start
                           and ping: the router holds message_start until the first content
                           event by design), all events of the whole run, ramp included
    first content event    from starting to connect to the first content event (one GAP of
                           mock pacing included: the direct row is the floor)
    CPU per stream         utime+stime (all threads) of the proxy from after the warm-up to
                           0.5 s after the last stream ended, / N; peak CPU = busiest 1 s
    max open               the most streams open at once, from the clients' own open and
                           close times (a stream delayed by the proxy stays open longer)
    fds, RSS per stream    (highest value of the /proc samples, every 0.2 s - value before the
                           streams) / max open; the JSON also has the values at the middle of
                           the plateau (when the most streams were open), and a time series
    peak RSS               VmHWM at the end (start-up and warm-up included)
    longest stall, gc      from loopmon: the loop timer's longest lateness (and the gc time
                           inside that stall), the longest collection of any generation and the
                           number of gen-2 collections
"""

from __future__ import annotations

import array
import asyncio
import collections
import gc
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the checkout: addon/claude_router_dev/bench_streams.py
LOOPMON = str(Path(__file__).resolve().parent / "addons" / "loopmon.py")  # mitmdump -s
PRELUDE = (b"message_start", b"ping")
STAMP = re.compile(rb'"mock_t":([0-9.]+)')
TARGETS = ["direct", "mitmdump+stream", "mitmdump+stream+index", "router"]
BASE = "mitmdump+stream"  # the column CPU is compared with
CLIENTS = 2
SAMPLE_S = 0.2
clock = time.monotonic  # CLOCK_MONOTONIC: the mock's stamps use the same clock


# ------------------------------------------------------------------------------------ client

class SSEClient(asyncio.Protocol):
    """One stream: writes the request, decodes the response (chunked or until close), splits
    SSE events and records the delay of each content event as it arrives."""

    def __init__(self, request: bytes, delays: array.array, done: asyncio.Future) -> None:
        self.request = request
        self.delays = delays
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.body = bytearray()
        self.state = "head"  # head | size | data | crlf | identity | end
        self.left = 0
        self.status = 0
        self.events = 0
        self.last = b""
        self.first_content: float | None = None
        self.unstamped = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        at = clock()
        raw = self.raw
        raw += data
        if self.state == "head":
            i = raw.find(b"\r\n\r\n")
            if i < 0:
                return
            head = bytes(raw[:i]).decode("latin-1").lower()
            del raw[:i + 4]
            try:
                self.status = int(head.split(None, 2)[1])
            except (IndexError, ValueError):
                self.status = -1
            if self.status != 200:
                self.finish(f"HTTP {self.status}")
                return
            self.state = "size" if re.search(r"^transfer-encoding:.*chunked", head, re.M) \
                else "identity"
        while raw:
            if self.state == "identity":
                self.body += raw
                raw.clear()
            elif self.state == "size":
                j = raw.find(b"\r\n")
                if j < 0:
                    break
                size = int(bytes(raw[:j]).split(b";")[0], 16)
                del raw[:j + 2]
                if size == 0:
                    self.state = "end"
                    break
                self.left, self.state = size, "data"
            elif self.state == "data":
                take = raw[:self.left]
                self.body += take
                del raw[:len(take)]
                self.left -= len(take)
                if not self.left:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(raw) < 2:
                    break
                del raw[:2]
                self.state = "size"
            else:
                break
        body = self.body
        while (k := body.find(b"\n\n")) >= 0:
            self.event(bytes(body[:k]), at)
            del body[:k + 2]
        if self.state == "end":
            self.finish(None)

    def event(self, block: bytes, at: float) -> None:
        self.events += 1
        name = block[7:block.find(b"\n")].strip() if block.startswith(b"event:") else b""
        self.last = name
        if name in PRELUDE:
            return
        if self.first_content is None:
            self.first_content = at
        m = STAMP.search(block)
        if m:
            self.delays.append(at - float(m.group(1)))
        else:
            self.unstamped += 1

    def finish(self, err: str | None) -> None:
        if not self.done.done():
            self.done.set_result(err)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.state == "identity":
            self.state = "end"
            self.finish(None)
        elif not self.done.done():
            self.done.set_result(type(exc).__name__ if exc else "closed early")


async def run_streams(cfg: dict[str, Any], t0: float) -> dict[str, Any]:
    """Open the streams cfg["indices"] (stream i at t0 + i/rate); everything measured."""
    loop = asyncio.get_running_loop()
    host, port, rate = cfg["host"], cfg["port"], cfg["rate"]
    body = cfg["body"].encode()
    request = (f"POST {cfg['path']} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "content-type: application/json\r\nx-api-key: bench\r\n"
               f"anthropic-version: 2023-06-01\r\ncontent-length: {len(body)}\r\n\r\n"
               ).encode() + body
    expected, timeout = cfg["expected"], cfg["timeout"]
    delays = array.array("d")
    rows: list[list] = []
    lag = {"max": 0.0, "over_20ms": 0}
    stop = asyncio.Event()

    async def lag_monitor() -> None:
        while not stop.is_set():
            due = loop.time() + 0.005
            await asyncio.sleep(0.005)
            late = loop.time() - due
            lag["max"] = max(lag["max"], late)
            lag["over_20ms"] += late > 0.020

    async def one(i: int) -> None:
        sched = t0 + i / rate
        await asyncio.sleep(max(0.0, sched - loop.time()))
        t_open = clock()
        done = loop.create_future()
        proto = SSEClient(request, delays, done)
        t_conn = err = None
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: proto, host, port)
                t_conn = clock()
                err = await done
        except TimeoutError:
            err = "timeout"
        except OSError as e:
            err = type(e).__name__
        finally:
            if proto.transport is not None:
                proto.transport.close()
        t_end = clock()
        if err is None and (proto.events != expected or proto.last != b"message_stop"):
            err = f"{proto.events} events, expected {expected}"
        rows.append([sched, t_open, t_conn, proto.first_content, t_end, proto.events, err,
                     proto.unstamped])

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    mon = loop.create_task(lag_monitor())
    await asyncio.gather(*(one(i) for i in cfg["indices"]))
    stop.set()
    await mon
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"streams": rows, "delays": delays.tolist(),
            "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "max_lag_ms": lag["max"] * 1000, "lags_over_20ms": lag["over_20ms"]}


def client_main(cfg_path: str) -> int:
    """Client process: print "ready", read t0 from stdin, run, write the results file."""
    gc.disable()  # the client makes no cycles worth collecting; a collection would be its stall
    cfg = json.loads(Path(cfg_path).read_text())
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    res = asyncio.run(run_streams(cfg, t0))
    tmp = Path(cfg["out"] + ".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, cfg["out"])
    return 0


# ------------------------------------------------------------------------------- server side

TICK = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> dict[str, float] | None:
    """CPU seconds (all threads), open fds and RSS (KiB) of one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError):
        return None
    mem = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return {"t": clock(), "cpu": (int(stat[11]) + int(stat[12])) / TICK, "fds": fds,
            "rss_kib": int(mem.get("VmRSS", 0)), "hwm_kib": int(mem.get("VmHWM", 0))}


def raise_nofile(need: int) -> str | None:
    """Raise this process's soft fd limit (the servers and clients inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(need, 1 << 16)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    if soft < need:
        return (f"fd limit {soft} (hard {hard}) is below the {need} this level may need; "
                "raise it (ulimit -Hn) for a clean run")
    return None


def max_open(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at once."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    n = best = 0
    for _, d in edges:
        n += d
        best = max(best, n)
    return best


# ------------------------------------------------------------------------------- coordinator

class StreamsPhase:
    def __init__(self, args, procs, tmp: Path) -> None:
        from claude_router_dev import bench as B  # here: bench imports this module
        self.B = B
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.mock = ""
        self.notes: list[str] = []
        self.words = args.stream_events - 6  # message_start, block start, ping, stop x3
        self.runs: dict[str, dict[str, dict[str, Any]]] = {}

    async def mock_fault(self, fault: dict[str, Any]) -> None:
        host, port = self.mock.split("//")[1].split(":")
        body = json.dumps(fault).encode()
        r, w = await asyncio.open_connection(host, int(port))
        try:
            w.write(b"PUT /_mock/faults/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body))
            status = (await asyncio.wait_for(r.readline(), 10)).split()[1]
            await r.read()
        finally:
            w.close()
        if status != b"200":
            raise RuntimeError(f"mock refused fault {fault}: {status!r}")

    def start_target(self, name: str, level: int) -> tuple[int, str, subprocess.Popen | None, Path]:
        B = self.B
        mport = int(self.mock.rsplit(":", 1)[1])
        loopmon = self.tmp / f"loopmon-{name}-{level}.json"
        if name == "direct":
            return mport, "/ok/v1/messages", None, loopmon
        port = B.free_port()
        conf = self.tmp / f"conf-streams-{name}"
        conf.mkdir(exist_ok=True)
        mon = ["-s", LOOPMON, "--set", f"loopmon_file={loopmon}"]
        if name == "router":
            argv = B.router_argv(port, conf, [f"ok={self.mock}/ok"], *mon)
            path = "/v1/messages"
        else:
            index = ["-s", B.HOOK_INDEX_SCRIPT] if name.endswith("+index") else []
            argv = B.mitm_argv(port, conf, "--mode", f"reverse:{self.mock}",
                               "--set", "stream_large_bodies=1", *index, *mon)
            path = "/ok/v1/messages"
        proc = self.procs.spawn(f"streams-{name}-{level}", argv)
        return port, path, proc, loopmon

    def stop(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass

    def client_cfg(self, port: int, path: str, indices: list[int], rate: float,
                   out: str = "") -> dict[str, Any]:
        a = self.args
        return {"host": "127.0.0.1", "port": port, "path": path, "indices": indices, "rate": rate,
                "expected": a.stream_events, "out": out,
                "timeout": a.stream_events * a.stream_gap_ms / 1000 + 30,
                "body": self.B.STREAM_BODY.decode()}

    async def run_level_target(self, name: str, level: int) -> dict[str, Any]:
        B, a = self.B, self.args
        port, path, proc, loopmon_file = self.start_target(name, level)
        label = f"{level} streams, {name}"
        try:
            if proc is not None:
                why = await B.wait_port(port, proc, 60)
                if why:
                    return {"status": f"failed: {why}; log: "
                                      f"{self.procs.log_excerpt(f'streams-{name}-{level}')}"}
            # warm-up: 20 unpaced streams, so lazy imports and first connections are not measured
            await self.mock_fault({"words": self.words, "stamp_events": True})
            cfg = {**self.client_cfg(port, path, list(range(20)), 100.0), "timeout": 15}
            warm = await run_streams(cfg, clock())
            bad = [r[6] for r in warm["streams"] if r[6]]
            if bad:
                log = self.procs.log_excerpt(f"streams-{name}-{level}") if proc else ""
                return {"status": f"failed: warm-up errors {dict(collections.Counter(bad))}"
                                  + (f"; log: {log}" if log else "")}
            await self.mock_fault({"event_gap_ms": a.stream_gap_ms, "words": self.words,
                                   "stamp_events": True})
            if proc is not None and loopmon_file.exists():  # its SIGUSR1 handler is installed
                os.kill(proc.pid, signal.SIGUSR1)  # loopmon: forget start-up and warm-up
            await asyncio.sleep(0.5)
            watched = proc.pid if proc is not None else self.mock_proc.pid
            base = proc_sample(watched)
            mock0 = proc_sample(self.mock_proc.pid)

            clients, outs = [], []
            for k in range(CLIENTS):
                out = str(self.tmp / f"client-{name}-{level}-{k}.json")
                cfg = self.tmp / f"client-{name}-{level}-{k}.cfg.json"
                cfg.write_text(json.dumps(self.client_cfg(
                    port, path, list(range(k, level, CLIENTS)), a.stream_rate, out)))
                c = subprocess.Popen([sys.executable, "-m", "claude_router_dev.bench_streams", "--client", str(cfg)],
                                     cwd=ROOT, env=self.procs.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=B._child_setup)
                self.procs.items.append((f"client-{k}", c))
                clients.append(c)
                outs.append(Path(out))
            for c in clients:
                line = B.read_line(c, 20)
                if "ready" not in line:
                    raise RuntimeError(f"stream client did not start: {line!r}")
            t0 = clock() + 0.3
            for c in clients:
                c.stdin.write(f"{t0!r}\n".encode())
                c.stdin.close()
            B.note(f"streams: {label}: opening at {a.stream_rate:g}/s")

            samples = []
            limit = t0 + level / a.stream_rate + a.stream_events * a.stream_gap_ms / 1000 + 60
            while any(c.poll() is None for c in clients) and clock() < limit:
                await asyncio.sleep(SAMPLE_S)
                if (s := proc_sample(watched)) is not None:
                    samples.append(s)
            for c in clients:
                if c.poll() is None:
                    c.kill()
                    c.wait(5)
            await asyncio.sleep(0.5)  # closes settle; counted in the CPU
            end = proc_sample(watched)
            mock1 = proc_sample(self.mock_proc.pid)
            if proc is not None and proc.poll() is not None:
                return {"status": f"failed: exited with {proc.returncode}"}
            results = [json.loads(o.read_text()) for o in outs if o.exists()]
            if len(results) != CLIENTS:
                return {"status": "failed: a stream client wrote no results"}
        finally:
            if proc is not None:
                self.stop(proc)
        loopmon = None
        if proc is not None:
            try:
                loopmon = json.loads(loopmon_file.read_text())
            except (OSError, ValueError):
                self.notes.append(f"{label}: no loopmon results")
        return self.summarize(name, level, base, samples, end, mock0, mock1, results, loopmon)

    def summarize(self, name, level, base, samples, end, mock0, mock1, results, loopmon):
        B = self.B
        rows = [r for res in results for r in res["streams"]]
        delays = sorted(d * 1000 for res in results for d in res["delays"])
        errs = collections.Counter(r[6] for r in rows if r[6])
        ttfc = sorted((r[3] - r[1]) * 1000 for r in rows if r[3] is not None)
        connect = sorted((r[2] - r[1]) * 1000 for r in rows if r[2] is not None)
        open_late = sorted((r[1] - r[0]) * 1000 for r in rows)
        intervals = [(r[1], r[4]) for r in rows]
        t_first = min((r[1] for r in rows), default=0.0)

        def open_at(t: float) -> int:
            return sum(1 for s, e in intervals if s <= t < e)

        def pct(vals, q):
            return B.percentile(vals, q) if vals else None

        out: dict[str, Any] = {
            "status": "ok", "streams": level, "errors": sum(errs.values()),
            "error_kinds": dict(errs), "events": len(delays),
            "unstamped_events": sum(r[7] for r in rows),
            "event_delay_ms": {"p50": pct(delays, .5), "p99": pct(delays, .99),
                               "p999": pct(delays, .999), "max": delays[-1] if delays else None},
            "first_content_ms": {"p50": pct(ttfc, .5), "p99": pct(ttfc, .99),
                                 "max": ttfc[-1] if ttfc else None},
            "connect_ms": {"p50": pct(connect, .5), "p99": pct(connect, .99),
                           "max": connect[-1] if connect else None},
            "client": {"processes": CLIENTS, "cpu_s": sum(r["cpu_s"] for r in results),
                       "max_lag_ms": max(r["max_lag_ms"] for r in results),
                       "lags_over_20ms": sum(r["lags_over_20ms"] for r in results),
                       "open_late_p99_ms": pct(open_late, .99)},
            "wall_s": (max(r[4] for r in rows) - min(r[1] for r in rows)) if rows else 0.0,
        }
        if mock0 and mock1:
            out["mock_cpu_s"] = mock1["cpu"] - mock0["cpu"]
        if name == "direct" or not (base and end and samples):
            return out
        opens = [open_at(x["t"]) for x in samples]
        top = [x for x, n in zip(samples, opens) if n == max(opens)]
        plateau = top[len(top) // 2]  # the middle of the plateau: every stream set up
        n_open = open_at(plateau["t"])
        busiest = 0.0
        window = int(round(1 / SAMPLE_S))
        for x, y in zip(samples, samples[window:]):
            busiest = max(busiest, (y["cpu"] - x["cpu"]) / (y["t"] - x["t"]))
        cpu = end["cpu"] - base["cpu"]
        peak_open = max_open(intervals)
        fds_max = max(x["fds"] for x in samples)
        rss_max = max(x["rss_kib"] for x in samples)
        out.update({
            "cpu_s": cpu, "cpu_per_stream_ms": cpu / level * 1000,
            "cpu_busiest_1s_pct": busiest * 100,
            "max_open": peak_open, "open_at_plateau": n_open,
            "fds": {"before": base["fds"], "plateau": plateau["fds"], "max": fds_max,
                    "after": end["fds"]},
            "fds_per_stream": (fds_max - base["fds"]) / peak_open if peak_open else None,
            "fds_per_stream_at_plateau": ((plateau["fds"] - base["fds"]) / n_open
                                          if n_open else None),
            "rss_kib": {"before": base["rss_kib"], "plateau": plateau["rss_kib"],
                        "max": rss_max, "after": end["rss_kib"]},
            "rss_per_open_stream_kib": (rss_max - base["rss_kib"]) / peak_open if peak_open else None,
            "rss_per_open_stream_at_plateau_kib": ((plateau["rss_kib"] - base["rss_kib"]) / n_open
                                                   if n_open else None),
            "peak_rss_mib": end["hwm_kib"] / 1024,
            # [seconds since the first stream opened, CPU s, fds, RSS KiB, streams open]
            "samples": [[round(x["t"] - t_first, 3), round(x["cpu"] - base["cpu"], 2), x["fds"],
                         x["rss_kib"], n] for x, n in zip(samples, opens)],
        })
        left = end["fds"] - base["fds"]
        if left > max(10, level // 20):
            self.notes.append(f"{level}/{name}: {left} fds still open 0.5 s after the last "
                              "stream ended (idle upstream keep-alive connections?).")
        if loopmon:
            gcs = loopmon["gc"]
            out["loopmon"] = loopmon
            out["max_stall_ms"] = loopmon["max_stall_ms"]
            longest = loopmon["longest_stalls"][0] if loopmon["longest_stalls"] else None
            out["max_stall_gc_ms"] = longest["gc_ms"] if longest else 0.0
            out["max_gc_ms"] = max(g["max_ms"] for g in gcs.values())
            out["gen2_collections"] = gcs["2"]["count"]
            out["gen2_max_ms"] = gcs["2"]["max_ms"]
        return out

    async def run(self) -> dict[str, Any]:
        B, a = self.B, self.args
        levels = a.stream_levels
        need = max(levels) * 5 + 200
        if why := raise_nofile(need):
            self.notes.append(why)
            B.note(why)
        self.mock = B.start_mock(self.procs, "streams-mock", [])
        self.mock_proc = self.procs.items[-1][1]
        B.note(f"streams: mock relay at {self.mock}; levels {levels}, {a.stream_events} events "
               f"{a.stream_gap_ms} ms apart, opened at {a.stream_rate:g}/s")
        # Rounds: every level again, the order rotated on, so that a run that happened to hit
        # a busy moment shows as one round of several. The main table is the first round.
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for rnd in range(a.stream_rounds):
            for li, level in enumerate(levels):
                k = (li + rnd) % len(TARGETS)
                for name in TARGETS[k:] + TARGETS[:k]:
                    if name not in a.stream_targets:
                        continue
                    t = clock()
                    try:
                        r = await self.run_level_target(name, level)
                    except (OSError, RuntimeError, ValueError) as e:
                        r = {"status": f"failed: {type(e).__name__}: {e}"}
                    rounds.setdefault(str(level), {}).setdefault(name, []).append(r)
                    B.note(f"streams: {level} streams, {name}"
                           + (f" (round {rnd + 1})" if a.stream_rounds > 1 else "")
                           + f": {r['status']}, {r.get('errors', '–')} errors, event delay p99 "
                           f"{fmt(r.get('event_delay_ms', {}).get('p99'))} ms, "
                           f"{clock() - t:.0f}s")
            for per_level in rounds.values():
                base = per_level.get(BASE, [])
                for runs in per_level.values():
                    for i, r in enumerate(runs):
                        b = base[i].get("cpu_per_stream_ms") if i < len(base) else None
                        if b and r.get("cpu_per_stream_ms") is not None:
                            r["cpu_vs_mitmdump"] = r["cpu_per_stream_ms"] / b
        self.runs = {level: {name: runs[0] for name, runs in per_target.items()}
                     for level, per_target in rounds.items()}  # the main table: the first round
        return {"settings": {"levels": levels, "events": a.stream_events,
                             "gap_ms": a.stream_gap_ms, "rate": a.stream_rate,
                             "client_processes": CLIENTS, "rounds": a.stream_rounds},
                "runs": self.runs, "rounds": rounds if a.stream_rounds > 1 else {},
                "notes": self.notes}


async def run(args, procs, tmp: Path) -> dict[str, Any]:
    return await StreamsPhase(args, procs, tmp).run()


# ------------------------------------------------------------------------------------ report

def fmt(v: float | None, digits: int | None = None) -> str:
    if v is None:
        return "–"
    if digits is not None:
        return f"{v:.{digits}f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


def render(res: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    s = res["settings"]
    cols = ["streams", "target", "errors", "max open",
            "event delay p50 / p99 / max (ms)", "first content event p50 / p99 (ms)",
            "CPU per stream (ms)", "CPU vs mitmdump", "busiest 1 s (% core)",
            "fds per stream", "RSS per open stream (KiB)", "peak RSS (MiB)",
            "longest loop stall (ms) ¹", "longest gc (ms), gen-2 count"]
    out = [f"### Streams: {s['events']} events {s['gap_ms']} ms apart, opened at "
           f"{s['rate']:g}/s, one process per target", "",
           "| " + " | ".join(cols) + " |", "|---:|---|" + "---:|" * (len(cols) - 2)]
    client_notes = []
    for level, runs in res["runs"].items():
        for name in TARGETS:
            r = runs.get(name)
            if r is None:
                continue
            if r["status"] != "ok":
                out.append(f"| {level} | {name} | {r['status'][:120]} |" + " |" * (len(cols) - 3))
                continue
            d, f = r["event_delay_ms"], r["first_content_ms"]
            errs = str(r["errors"])
            if r["errors"]:
                errs += " (" + ", ".join(f"{k}: {v}" for k, v in
                                         sorted(r["error_kinds"].items())[:3]) + ")"
            server = name != "direct"
            stall = (f"{fmt(r.get('max_stall_ms'))} (gc {fmt(r.get('max_stall_gc_ms'))})"
                     if "max_stall_ms" in r else "–")
            gcs = (f"{fmt(r.get('max_gc_ms'))}, {r.get('gen2_collections')}"
                   if "max_gc_ms" in r else "–")
            ratio = r.get("cpu_vs_mitmdump")
            out.append("| " + " | ".join([
                level, name, errs, str(r.get("max_open", "–")) if server else "–",
                f"{fmt(d['p50'])} / {fmt(d['p99'])} / {fmt(d['max'])}",
                f"{fmt(f['p50'])} / {fmt(f['p99'])}",
                fmt(r.get("cpu_per_stream_ms")) if server else "–",
                f"{ratio:.2f}×" if ratio is not None else "–",
                fmt(r.get("cpu_busiest_1s_pct"), 0) if server else "–",
                fmt(r.get("fds_per_stream"), 2) if server else "–",
                fmt(r.get("rss_per_open_stream_kib"), 1) if server else "–",
                fmt(r.get("peak_rss_mib"), 1) if server else "–",
                stall if server else "–", gcs if server else "–"]) + " |")
            c = r["client"]
            client_notes.append(
                f"{level}/{name} {c['cpu_s']:.1f} s (max lag {c['max_lag_ms']:.0f} ms"
                + (f", mock {r['mock_cpu_s']:.1f} s" if "mock_cpu_s" in r else "") + ")")
    out += ["",
            f"Event delay: arrival − the mock's CLOCK_MONOTONIC stamp of every content event "
            f"(all but message_start and ping), ramp included. First content event: from "
            f"connecting to the first content event, one {s['gap_ms']} ms mock pause included "
            f"(the router holds message_start until then by design; `direct` is the floor). "
            f"CPU: utime+stime of the proxy from after its warm-up until all streams ended, per "
            f"stream; busiest 1 s = its highest CPU use over any 1 s. Max open: most streams "
            f"open at once (client side). fds and RSS per stream: (highest /proc sample − "
            f"before the streams) / max open; peak RSS = VmHWM. ¹ claude_router_dev/addons/loopmon.py in both proxies: "
            f"lateness of a 5 ms timer (in "
            f"brackets the gc time inside that stall); longest gc of any generation and the "
            f"number of gen-2 collections. Client: {s['client_processes']} processes of raw "
            f"asyncio, CPU seconds and max loop lag per run: " + "; ".join(client_notes) + "."]
    if res.get("rounds"):
        out += ["", f"Rounds ({s['rounds']}, each a fresh process per target, the order rotated):"
                " every round's value, then the median", "",
                "| streams | target | event delay p99 (ms) | first content event p99 (ms) "
                "| CPU vs mitmdump | errors |", "|---:|---|---|---|---|---:|"]
        for level, per_target in res["rounds"].items():
            for name in TARGETS:
                runs = [r for r in per_target.get(name, []) if r.get("status") == "ok"]
                if not runs:
                    continue

                def series(get, digits=None, runs=runs):  # called at once; binds this loop's runs
                    vals = [get(r) for r in runs]
                    vals = [v for v in vals if v is not None]
                    if not vals:
                        return "–"
                    med = sorted(vals)[len(vals) // 2] if len(vals) % 2 else \
                        sum(sorted(vals)[len(vals) // 2 - 1:len(vals) // 2 + 1]) / 2
                    return (", ".join(fmt(v, digits) for v in vals)
                            + f" (median {fmt(med, digits)})")

                out.append("| " + " | ".join([
                    level, name, series(lambda r: r["event_delay_ms"]["p99"]),
                    series(lambda r: r["first_content_ms"]["p99"]),
                    "–" if name in ("direct", BASE) else series(lambda r: r.get("cpu_vs_mitmdump"), 2),
                    str(sum(r["errors"] for r in runs))]) + " |")
    if machine:
        m = machine
        out += ["", f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python "
                    f"{m['python']}, mitmproxy {m['mitmproxy']}; git {m['git']}; {m['date']}. "
                    "Clients, mock and proxy share these CPUs."]
    if res.get("notes"):
        out += ["", "Notes: " + " ".join(res["notes"])]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        sys.exit(client_main(sys.argv[2]))
    sys.exit("run it through ./scripts/bench --streams LEVELS (or --client CONFIG, internal)")
