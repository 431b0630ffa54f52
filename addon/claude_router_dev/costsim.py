"""Cost simulator: what the router's cost strategy spends on Claude Code traffic, against the
original's price order and against an oracle.

Run it through ``scripts/costsim`` (it picks the project's venv; mitmdump lives beside its
python). Everything runs on 127.0.0.1:

- one mock relay (claude_router_dev.mock_relay), every endpoint with a prompt-cache profile
  (``cache: true``, or ``"ignore"`` for a relay that bills every prompt token as input) and
  ``cache_ttl_scale`` compressing its clock: a 5-minute cache lives ``--ttl`` seconds;
- per scenario two real ``mitmdump -s addon/router.py`` in reverse mode, each with a router
  YAML config holding per-endpoint prices: one with ``router_strategy=cost``, one with
  ``router_strategy=order`` (the original: cheapest healthy endpoint first). Both get
  ``router_cache_ttl`` = the compressed TTL and a 1-second health cooldown. They run at the
  same time against endpoints of their own on the mock (``<n>c-a`` and ``<n>o-a`` ...), so
  each has its own caches but both see the same outages at the same moments.

Traces (deterministic from ``--seed``): several concurrent Claude Code-like sessions. Each
request carries the tools (~2.5k tokens), a long system prompt (~3k tokens, per project, with
``cache_control`` on its last block) and the whole conversation so far, with ``cache_control``
on the newest message's last block (Claude Code marks the system prompt and the newest
message). Each turn adds the previous assistant answer and a new user message; some turns
are tool turns (assistant text + tool_use, then a tool_result of a few hundred to 2k tokens,
sent almost at once). The assistant answers are the trace's own (a replay), not the mock's,
so every request body is the same whichever endpoint served the turn before. Think times are
in units of the TTL (user turns 0.10-0.30, tool turns 0.02-0.06, times the scenario's pace),
so a session never goes cold between two turns of its own, and an outage longer than the TTL
always does. Requests send ``X-Claude-Code-Session-Id`` and stream (``stream: true``) like
Claude Code; scenarios marked "mixed" send every other session without streaming.

Outages: per scenario, ``PUT /_mock/faults/<endpoint> {"status": 529}`` at scripted times
(TTL units from the scenario's start) and ``DELETE`` at their end, on both runs' endpoints.

Spend: the mock's request records (``GET /_mock/requests``): each Messages answer's billed
``usage`` times its endpoint's prices. 5-minute cache writes at ``cache_write`` (else 1.25 x
input), 1-hour writes at 2 x input, reads at ``cache_read`` (else 0.1 x input), output at the
output price. A 529 bills nothing.

The oracle, per session (sessions share no cache prefix, so they are independent): a dynamic
programme over the session's turns that may send each turn to any endpoint not under an
outage at the moment the turn was sent. Its state is what every endpoint holds of this
session in its prompt cache, entry by entry (prefix, expiry), and its transition is the mock's
own cache rule re-implemented over the same blocks (the block token counts come from
``mock_relay.prompt_blocks`` on the trace's request bodies): the longest live prefix among each
breakpoint and the 20 block boundaries before it is read (its expiry refreshed), every
breakpoint beyond it with >= cache_min_tokens is written, the rest is input; a non-caching
endpoint bills the whole prompt as input. So it counts a read of an older prefix on an
endpoint the session left a while ago, not only the endpoint of its last turn. Entries that
have expired by the next turn or that no later breakpoint can reach are dropped, so equal
caches merge into one state; a narrow beam first finds a good path, then the exact pass drops
every state whose cost so far plus a floor under the turns to come exceeds it. Simplifications:
turn times are those of the router run (the moment the client sent each turn; the order run's
times give the oracle reported as ``oracle_usd`` under ``runs.order`` in the JSON); a turn's
reads and writes happen at its send time; the outage windows are those the script applied
(from just before each fault PUT to just after its DELETE returned); an endpoint is usable
whenever it has no fault (the oracle knows nothing of cooldowns or probes, and everything of
the future); every session asks for 5-minute caches; output is the mock's fixed
``output_tokens`` per answer, priced at the serving endpoint's output price; the oracle knows
how many turns each session has left. As a check the model re-prices the paths the two
routers actually took and compares them with what the mock billed ("model check"): they
agree to the token when the model is the mock's.

To tell what no router could do from what the rule does, a second oracle is computed "in each
run's shoes" (``shoes_oracle``): it knows no outage before that outage starts. It replans at
each outage's start: until the first it follows the best path of a world without outages;
from the start T_i of an outage to the next start it follows the cheapest path the DP finds
with its earlier turns pinned to what it already chose, in a world of the outages that had
started by T_i (to their ends) and none later. It may not use an endpoint while that run's
health layer held it cooling or probing (polled from /_router/status every 0.1 s; a plan made
at T_i sees those windows only up to the next outage's start; the endpoint the run did use
for a turn is always allowed, as polls lag). It still knows when a started outage ends and
how many turns each session has left, which no router does. ``router / that`` near 1 means
the rule chose well given what it could know; the rest of the gap is foresight or cooldowns.
The same oracle without any held windows (``no_foresight_bound``: never an endpoint held
cooling, still no foresight), at the probes-off run's turn times, is the "no-foresight bound":
what is left of the gap to the clairvoyant oracle once cooldowns are out of the way, which
probes cannot close; ``closable_gap_closed`` is the share of the rest that they do close. It
bounds planning without foresight, not luck: a run whose cooldown happened to keep it on a
dearer relay, whose cache a later outage then reads, can land below it.

Your own relays: ``--config router.yaml`` takes the endpoints and prices of a router config
(parsed by the router's own loader; ``env:`` keys need not be set, keys are never used) and
runs three scenarios on them: calm, the cheapest failing for 0.2 TTL, and for 1.3 TTL; or,
with ``--outage NAME:FROM-TO`` (TTL units), one scenario of those outages. ``--no-cache NAME``
makes a relay ignore cache_control; ``--sessions``, ``--turns`` and ``--pace`` shape the trace.

Output: first the summary (the table, each scenario in dollars and per 1,000 turns, and what
a run of this size can and cannot show); then per scenario what was sent and what happened
(turns, upstream attempts, failures, moves, the X-Router-Reasons as sent, the cost router's
/_router/status ``sessions`` and ``caches`` per endpoint, and each session's path: one letter
per turn, upper case when the turn read its prefix from cache), where the gap to the oracle
comes from, and a JSON file with everything.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from claude_router_dev import (  # bench: the benchmark's process handling, shared
    bench,
    harness,
    mock_relay as MOCK,  # its token rule: prompt_blocks, CACHE_LOOKBACK, CACHE_MIN_TOKENS
)
from claude_router_dev.harness import ROOT, free_port

MODEL = "claude-sonnet-4-5-20250929"
OUTPUT_TOKENS = 400  # the mock's fixed output per answer (profile output_tokens)
REAL_TTL = 300.0  # seconds: a 5-minute cache
COOLDOWN = 1  # router_cooldown in the compressed clock (whole seconds: the option is an int)
RUNS = ("cost", "order", "probe")
# Each run's router_strategy; "probe" is the cost rule with out-of-band probes (probes.py).
STRATEGY = {"cost": "cost", "order": "order", "probe": "cost"}
LABEL = {"cost": "router", "order": "order ", "probe": "probes"}
PROBE_EVERY = 15.0  # seconds between probes on the real clock (compressed like the TTL)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ scenarios

@dataclass(frozen=True)
class Ep:
    name: str
    input: float  # USD per million tokens
    output: float
    cache: bool | str = True  # True, or "ignore": bills every prompt token as input
    cache_write: float | None = None
    cache_read: float | None = None
    label: str = ""  # the endpoint's name in the user's router.yaml (name is its path letter)

    @property
    def write5m(self) -> float:
        return self.input * 1.25 if self.cache_write is None else self.cache_write

    @property
    def write1h(self) -> float:
        return self.input * 2.0

    @property
    def read(self) -> float:
        return self.input * 0.1 if self.cache_read is None else self.cache_read

    def price(self, inp: int, w5: int, w1h: int, read: int, out: int) -> float:
        return (inp * self.input + w5 * self.write5m + w1h * self.write1h + read * self.read
                + out * self.output) / 1e6

    def bill(self, usage: dict) -> float:
        """What one answer's reported usage costs here."""
        created = int(usage.get("cache_creation_input_tokens") or 0)
        split = usage.get("cache_creation") or {}
        w1h = int(split.get("ephemeral_1h_input_tokens") or 0)
        w5 = created - w1h
        return self.price(int(usage.get("input_tokens") or 0), w5, w1h,
                          int(usage.get("cache_read_input_tokens") or 0),
                          int(usage.get("output_tokens") or 0))

    def describe(self) -> str:
        extra = " ignores caching" if self.cache == "ignore" else ""
        name = f"{self.name}={self.label}" if self.label else self.name
        return f"{name} {self.input:g}/{self.output:g}{extra}"


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    endpoints: tuple[Ep, ...]
    outages: tuple[tuple[str, float, float], ...] = ()  # endpoint, from, to (TTL units)
    turns: int = 12
    pace: float = 1.0  # think-time multiplier
    mixed: bool = False  # every other session without streaming

    def describe(self) -> str:
        eps = ", ".join(e.describe() for e in self.endpoints)
        out = "; ".join(f"{n} down {a:g}-{b:g} TTL" for n, a, b in self.outages)
        return f"{eps} (USD/M in/out){'; ' + out if out else ''}"


TIERS = (Ep("a", 1.0, 5.0), Ep("b", 2.0, 10.0), Ep("c", 3.0, 15.0))
LONG = (("a", 0.6, 1.9),)
SCENARIOS = [
    Scenario("all-cache", "every endpoint caches, no outage: the cheapest all along", TIERS,
             mixed=True),
    Scenario("cheap-nocache", "the cheapest relay ignores cache_control (bills full input)",
             (Ep("a", 1.5, 7.5, cache="ignore"), Ep("b", 2.0, 10.0), Ep("c", 3.0, 15.0))),
    Scenario("outage-short", "the cheapest fails (529) for 0.2 TTL, then recovers", TIERS,
             outages=(("a", 0.6, 0.8),)),
    Scenario("outage-long", "the cheapest fails for 1.3 TTL (its caches go cold), then "
             "recovers", TIERS, outages=LONG, turns=16, pace=1.3),
    Scenario("flap", "the cheapest flaps: down 0.2 TTL, up 0.3 TTL, four times", TIERS,
             outages=tuple(("a", 0.5 + 0.5 * i, 0.7 + 0.5 * i) for i in range(4)), turns=14),
    Scenario("close-prices", "long outage of the cheapest, prices 10 % apart: moving back "
             "does not pay", (Ep("a", 2.7, 13.5), Ep("b", 3.0, 15.0)), outages=LONG, turns=16,
             pace=1.3, mixed=True),
    Scenario("far-prices", "long outage of the cheapest, prices 6x apart: moving back pays",
             (Ep("a", 0.5, 2.5), Ep("b", 3.0, 15.0)), outages=LONG, turns=16, pace=1.3),
    Scenario("short-close", "the cheapest (20 % cheaper) fails for 0.2 TTL: its caches are "
             "still warm when it recovers, so moving back pays at once",
             (Ep("a", 2.4, 12.0), Ep("b", 3.0, 15.0)), outages=(("a", 0.6, 0.8),)),
    # Realistic timing (at the default TTL of 5 s, 1 TTL is 5 real minutes and the 1 s cooldown
    # a real minute): turns tens of seconds apart, the cheapest overloaded for minutes. Today a
    # failing half-open request doubles the cooldown, so the relay stays cooled well after it
    # recovered; the "probe" run finds it back within seconds (see "Probes off and on").
    Scenario("overload-2m", "the cheapest is overloaded (529) for 2 real minutes (0.4 TTL)",
             TIERS, outages=(("a", 0.6, 1.0),), turns=16),
    Scenario("overload-4m", "the cheapest is overloaded for 4 real minutes (0.8 TTL): its "
             "caches go cold", TIERS, outages=(("a", 0.6, 1.4),), turns=18),
    Scenario("overload-twice", "the cheapest is overloaded for 1.5 real minutes twice, 6 minutes "
             "apart", TIERS, outages=(("a", 0.5, 0.8), ("a", 2.0, 2.3)), turns=22),
]


class _AnyEnv(dict):
    """The environment costsim reads a router.yaml with: every ``env:NAME`` key resolves to a
    placeholder, so the user's secrets are neither needed nor read (only prices are used)."""

    def get(self, key, default=None):
        return "costsim-placeholder"


def config_endpoints(path: str, no_cache: list[str]) -> tuple[Ep, ...]:
    """The endpoints of the user's router.yaml, parsed by the router's own loader, with their
    prices; named a, b, c ... in price order (the letters of the session paths)."""
    from claude_router import config

    cfg = config.load(path, env=_AnyEnv())  # raises ConfigError naming the file and field
    if len(cfg.endpoints) > 26:
        raise config.ConfigError(path, "endpoints", "costsim simulates at most 26 endpoints")
    names = [ep.name for ep in cfg.endpoints]
    if bad := [n for n in no_cache if n not in names]:
        raise config.ConfigError(path, "endpoints", f"--no-cache {bad[0]}: no such endpoint "
                                 f"(endpoints: {', '.join(names)})")
    eps = []
    for i, ep in enumerate(cfg.endpoints):
        if ep.price is None:
            raise config.ConfigError(path, f"endpoints[{i}] ({ep.name}).price", "costsim needs a "
                                     "price for every endpoint, e.g. price: {input: 3.0, output: 15.0}")
        p = ep.price
        eps.append(Ep(chr(ord("a") + i), p.input, p.output, "ignore" if ep.name in no_cache else True,
                      p.cache_write, p.cache_read, label=ep.name))
    return tuple(eps)


def config_scenarios(eps: tuple[Ep, ...], outages: list[tuple[str, float, float]]) -> list[Scenario]:
    """The user's relays: with --outage, one scenario of those outages; else a calm day, and
    the cheapest endpoint failing for a short and for a long while (as the built-in ones)."""
    if outages:
        return [Scenario("your-outages", "your endpoints with the outages given", eps,
                         outages=tuple(outages))]
    out = [Scenario("calm", "your endpoints and prices, no outage", eps)]
    if len(eps) > 1:
        cheapest = eps[0].name
        out += [Scenario("short-outage", f"the cheapest ({eps[0].label}) fails (529) for 0.2 TTL",
                         eps, outages=((cheapest, 0.6, 0.8),)),
                Scenario("long-outage", f"the cheapest ({eps[0].label}) fails for 1.3 TTL (its "
                         "caches go cold)", eps, outages=((cheapest, 0.6, 1.9),), turns=16, pace=1.3)]
    return out


def parse_outage(spec: str) -> tuple[str, float, float]:
    """``NAME:FROM-TO`` in TTL units (0.6-0.8: down from 0.6 to 0.8 TTL after the start)."""
    name, sep, span = spec.rpartition(":")
    a, dash, b = span.partition("-")
    try:
        start, end = float(a), float(b)
    except ValueError:
        start = end = -1.0
    if not sep or not name or not dash or not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"bad outage {spec!r}: expected NAME:FROM-TO in TTL units, "
                                         "e.g. aws:0.6-0.8")
    return name, start, end


# ---------------------------------------------------------------------------------- traces

WORDS = ("the a to of and in is for that with on as be by this it from or are an at not we "
         "function return value file test error module import class def self config router "
         "endpoint session cache prompt token request response stream event handler option "
         "parse check result status header body client server proxy relay price order cost "
         "retry timeout health cooldown failure success build install update read write edit "
         "search replace line path directory branch commit diff patch review change fix bug "
         "feature refactor rename move delete create list count sum total average maximum "
         "minimum index key map set queue lock thread task loop await async yield raise "
         "assert expect should must may when then else while until each every some none").split()
TOOLS = [("Bash", "Executes a given bash command in a persistent shell session"),
         ("Read", "Reads a file from the local filesystem"),
         ("Edit", "Performs exact string replacements in files"),
         ("Write", "Writes a file to the local filesystem"),
         ("Glob", "Fast file pattern matching tool that works with any codebase size"),
         ("Grep", "A powerful search tool built on ripgrep"),
         ("TodoWrite", "Create and manage a structured task list for your current session"),
         ("WebFetch", "Fetches content from a specified URL and processes it"),
         ("Task", "Launch a new agent to handle complex, multi-step tasks autonomously"),
         ("NotebookEdit", "Completely replaces the contents of a specific cell")]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@dataclass
class Turn:
    think: float  # TTL units to wait after the previous answer (before the first: the start)
    body: dict
    tool: bool  # the newest user message is a tool result
    blocks: list  # (prefix key, tokens, breakpoint ttl) per block: the mock's own rule
    prompt: int  # tokens


@dataclass
class SessionTrace:
    index: int
    sid: str  # X-Claude-Code-Session-Id
    start: float  # TTL units
    stream: bool
    turns: list[Turn]


def make_tools(rng: random.Random) -> list[dict]:
    return [{"name": name, "description": f"{desc}. " + _words(rng, 150),
             "input_schema": {"type": "object", "properties": {
                 "arg": {"type": "string", "description": _words(rng, 12)}},
                 "required": ["arg"], "additionalProperties": False}}
            for name, desc in TOOLS]


def make_session(rng: random.Random, index: int, tools: list[dict], turns: int, pace: float,
                 stream: bool) -> SessionTrace:
    sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    project = f"/home/dev/project-{index}-{rng.randrange(10**6)}"
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.90.a1b; "
                                 "cc_entrypoint=cli"},
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
        {"type": "text", "text": f"Working directory: {project}\nIs directory a git repo: Yes\n"
                                 f"Platform: linux\n" + _words(rng, 1900),
         "cache_control": {"type": "ephemeral"}},
    ]
    meta = {"user_id": json.dumps({"device_id": "d" * 64, "account_uuid": "costsim",
                                   "session_id": sid})}
    history: list[dict] = []
    out: list[Turn] = []
    pending_tool: str | None = None
    for k in range(turns):
        if k == 0:
            user = [{"type": "text", "text": "<system-reminder>" + _words(rng, 90)
                     + "</system-reminder>"},
                    {"type": "text", "text": _words(rng, rng.randint(15, 50))}]
            think, tool = rng.uniform(0.0, 0.3), False
        elif pending_tool is not None:
            user = [{"type": "tool_result", "tool_use_id": pending_tool,
                     "content": _words(rng, rng.randint(250, 1300))}]
            think, tool = rng.uniform(0.02, 0.06) * pace, True
        else:
            user = [{"type": "text", "text": _words(rng, rng.randint(10, 50))}]
            think, tool = rng.uniform(0.10, 0.30) * pace, False
        history.append({"role": "user", "content": user})
        messages = [dict(m) for m in history]
        last = dict(messages[-1]["content"][-1], cache_control={"type": "ephemeral"})
        messages[-1]["content"] = messages[-1]["content"][:-1] + [last]
        body = {"model": MODEL, "max_tokens": 32000, "system": system, "tools": tools,
                "messages": messages, "metadata": meta}
        blocks = MOCK.prompt_blocks(body)
        out.append(Turn(think, body, tool, blocks, sum(t for _, t, _ in blocks)))
        # The answer this turn gets in the trace (the replay's, whoever serves it).
        if k + 1 < turns and rng.random() < 0.4:
            pending_tool = f"toolu_{rng.getrandbits(64):016x}"
            answer = [{"type": "text", "text": _words(rng, rng.randint(10, 40))},
                      {"type": "tool_use", "id": pending_tool, "name": rng.choice(TOOLS)[0],
                       "input": {"arg": f"{project}/src/{_words(rng, 1).strip()}.py"}}]
        else:
            pending_tool = None
            answer = [{"type": "text", "text": _words(rng, rng.randint(60, 260))}]
        history.append({"role": "assistant", "content": answer})
    start = out[0].think
    out[0].think = 0.0
    return SessionTrace(index, sid, start, stream, out)


def make_trace(scn: Scenario, seed: int, sessions: int) -> list[SessionTrace]:
    rng = random.Random(f"{seed}:{scn.name}")
    tools = make_tools(rng)
    return [make_session(rng, i, tools, scn.turns, scn.pace, not (scn.mixed and i % 2))
            for i in range(sessions)]


def check_append_only(trace: SessionTrace) -> None:
    """The oracle keys cache entries by block index: each turn's blocks must extend the last's."""
    for prev, cur in itertools.pairwise(trace.turns):
        keys = [k for k, _, _ in prev.blocks]
        assert [k for k, _, _ in cur.blocks[:len(keys)]] == keys, "trace is not append-only"


# ------------------------------------------------------------------------------ processes

class Procs(bench.Procs):
    """The benchmark's subprocess bookkeeping (own process groups, die with the parent), plus
    reading a whole log and stopping one process early."""

    def log(self, name: str) -> str:
        try:
            return (self.tmp / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)  # our own group: pgid == pid
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout:
            proc.stdout.close()



def start_mock(procs: Procs) -> str:
    proc = procs.spawn("mock", harness.mock_argv("--port", "0", "--quiet"), stdout_pipe=True)
    line = proc.stdout.readline().decode(errors="replace")
    if "listening on" not in line:
        raise RuntimeError(f"mock relay did not start: {line!r}\n{procs.log('mock')}")
    return line.strip().rsplit(" ", 1)[1]


def mock_name(n: int, run: str, ep: str) -> str:
    return f"{n}{run[0]}-{ep}"


def start_router(procs: Procs, workdir: Path, mock: str, n: int, scn: Scenario, run: str,
                 ttl: int, horizon: int | None) -> tuple[subprocess.Popen, str, str]:
    name = f"{n}-{scn.name}-{run}"
    lines = ["endpoints:"]
    for ep in scn.endpoints:
        price = f"input: {ep.input}, output: {ep.output}"
        if ep.cache_write is not None:
            price += f", cache_write: {ep.cache_write}"
        if ep.cache_read is not None:
            price += f", cache_read: {ep.cache_read}"
        lines += [f"  - name: {ep.name}", f"    url: {mock}/{mock_name(n, run, ep.name)}",
                  f"    price: {{{price}}}"]
        if run == "probe":  # a one-token Messages probe of the trace's model: it tests the
            # model family a 529 cools, and what it costs is billed with the run's turns
            every = max(0.1, round(PROBE_EVERY * ttl / REAL_TTL, 2))
            lines.append(f"    probe: {{path: /v1/messages, model: {MODEL}, every: {every}, "
                         f"usd_per_hour: 10, key: {HEADERS['x-api-key']}}}")
    lines += ["health:", "  max_failures: 3", f"  cooldown: {COOLDOWN}"]
    cfg = workdir / f"router-{name}.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    confdir = workdir / f"conf-{name}"
    confdir.mkdir()
    port = free_port()
    options = {"flow_detail": 0, "router_config": cfg, "router_strategy": STRATEGY[run],
               "router_cache_ttl": ttl}
    if horizon is not None:
        options["router_session_horizon"] = horizon
    argv = harness.router_argv(port, confdir=confdir, options=options)
    proc = procs.spawn(f"router-{name}", argv)
    return proc, f"http://127.0.0.1:{port}", f"router-{name}"


async def wait_router(procs: Procs, proc: subprocess.Popen, base: str, log: str,
                      names: list[str]) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(trust_env=False, timeout=2) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log} exited with {proc.returncode}:\n{procs.log(log)[-3000:]}")
            try:
                doc = (await c.get(f"{base}/_router/status")).json()
                got = [e["name"] for e in doc.get("endpoints", [])]
                if got == names:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{log} did not come up:\n{procs.log(log)[-3000:]}")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------- a run

HEADERS = {"x-api-key": "sk-ant-costsim", "anthropic-version": "2023-06-01",
           "anthropic-beta": "claude-code-20250219", "content-type": "application/json",
           "user-agent": "claude-cli/2.1.90 (external, cli)", "x-app": "cli"}


@dataclass
class Sent:
    """One request of a turn, as the client saw it."""
    run: str
    session: int
    turn: int
    try_no: int
    t: float  # seconds since the scenario's start, when sent
    took: float = 0.0
    status: int = 0
    endpoint: str = ""
    attempts: str = ""
    reason: str = ""
    usage: dict | None = None
    error: str = ""


async def send(client: httpx.AsyncClient, body: dict, sid: str, stream: bool, rec: Sent) -> None:
    headers = dict(HEADERS, **{"x-claude-code-session-id": sid})
    payload = json.dumps(dict(body, stream=True) if stream else body).encode()
    t0 = time.monotonic()
    try:
        async with client.stream("POST", "/v1/messages", content=payload, headers=headers) as r:
            rec.status = r.status_code
            rec.endpoint = r.headers.get("x-used-endpoint", "")
            rec.attempts = r.headers.get("x-router-attempts", "")
            rec.reason = r.headers.get("x-router-reason", "")
            if not stream or r.status_code != 200:
                raw = await r.aread()
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = {}
                if r.status_code == 200:
                    rec.usage = doc.get("usage")
                else:
                    rec.error = json.dumps(doc.get("error", raw[:200].decode(errors="replace")))
            else:
                usage: dict = {}
                stopped = False
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    try:
                        ev = json.loads(line[5:])
                    except ValueError:
                        continue
                    kind = ev.get("type")
                    if kind == "message_start":
                        usage = dict(ev.get("message", {}).get("usage") or {})
                    elif kind == "message_delta" and ev.get("usage"):
                        usage["output_tokens"] = ev["usage"].get("output_tokens", 0)
                    elif kind == "message_stop":
                        stopped = True
                    elif kind == "error":
                        rec.error = json.dumps(ev.get("error"))
                rec.usage = usage or None
                if not stopped and not rec.error:
                    rec.error = "stream ended before message_stop"
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.took = time.monotonic() - t0


async def run_session(client: httpx.AsyncClient, run: str, trace: SessionTrace, t0: float,
                      ttl: float, out: list[Sent]) -> None:
    await asyncio.sleep(max(0.0, t0 + trace.start * ttl - time.monotonic()))
    for k, turn in enumerate(trace.turns):
        if k:
            await asyncio.sleep(turn.think * ttl)
        for try_no in range(5):  # Claude Code retries 529s and the like
            rec = Sent(run, trace.index, k, try_no, time.monotonic() - t0)
            out.append(rec)
            await send(client, turn.body, trace.sid, trace.stream, rec)
            if rec.status == 200 and not rec.error:
                break
            await asyncio.sleep(0.05 * ttl)


async def outage_script(mock: str, n: int, scn: Scenario, t0: float, ttl: float,
                        applied: list[dict]) -> None:
    """Switch each outage on and off at its time, on both runs' endpoints."""
    events = sorted([(a, "on", ep) for ep, a, _ in scn.outages]
                    + [(b, "off", ep) for ep, _, b in scn.outages])
    async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
        for at, what, ep in events:
            await asyncio.sleep(max(0.0, t0 + at * ttl - time.monotonic()))
            before = time.monotonic() - t0
            for run in RUNS:
                url = f"{mock}/_mock/faults/{mock_name(n, run, ep)}"
                if what == "on":
                    r = await c.put(url, json={"status": 529, "error_type": "overloaded_error"})
                else:
                    r = await c.delete(url)
                r.raise_for_status()
            applied.append({"endpoint": ep, "what": what, "at_ttl": at,
                            "t_before": round(before, 4), "t": round(time.monotonic() - t0, 4)})


async def health_poller(base: str, t0: float, stop: asyncio.Event, out: list) -> None:
    """The router's view of its endpoints over time (from /_router/status, every 0.1 s):
    (t, endpoint, usable) whenever it changes. Unusable: cooling or being probed, or its
    model family (sonnet) cooling, as a 529 cools the family."""
    last: dict[str, bool] = {}
    async with httpx.AsyncClient(trust_env=False, timeout=2) as c:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                doc = (await c.get(f"{base}/_router/status")).json()
                t = time.monotonic() - t0
                for e in doc["endpoints"]:
                    fam = (e.get("families") or {}).get("sonnet", {}).get("state")
                    usable = e["state"] not in ("cooling", "probing", "disabled") and fam != "cooling"
                    if last.get(e["name"]) != usable:
                        last[e["name"]] = usable
                        out.append((round(t, 3), e["name"], usable))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


def health_windows(changes: list, end: float) -> dict[str, list[tuple[float, float]]]:
    """Where the router held an endpoint unusable, as windows like outage_windows'."""
    windows: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    down_since: dict[str, float] = {}
    for t, name, usable in changes:
        if not usable and name not in down_since:
            down_since[name] = t
        elif usable and name in down_since:
            windows[name].append((down_since.pop(name), t))
    for name, a in down_since.items():
        windows[name].append((a, end))
    return dict(windows)


def outage_windows(applied: list[dict], end: float) -> dict[str, list[tuple[float, float]]]:
    windows: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    open_at: dict[str, float] = {}
    for ev in sorted(applied, key=lambda e: e["t"]):
        if ev["what"] == "on":
            open_at[ev["endpoint"]] = ev["t_before"]  # from when it may have been on
        elif ev["endpoint"] in open_at:
            windows[ev["endpoint"]].append((open_at.pop(ev["endpoint"]), ev["t"]))
    for ep, a in open_at.items():
        windows[ep].append((a, end))
    return dict(windows)


# --------------------------------------------------------------------------------- oracle

@dataclass
class TurnCost:
    usd: float
    read: int
    written: int
    inp: int


class Model:
    """The mock's prompt-cache rule, over one session's blocks (entries keyed by block index,
    as the trace only ever appends), with entries as (index, expiry)."""

    def __init__(self, trace: SessionTrace, eps: tuple[Ep, ...], ttl_seconds: float,
                 min_tokens: int = MOCK.CACHE_MIN_TOKENS, lookback: int = MOCK.CACHE_LOOKBACK):
        self.eps = eps
        self.ttl = ttl_seconds
        self.min_tokens = min_tokens
        self.lookback = lookback
        self.turns = []
        for turn in trace.turns:
            ttls = {t for _, _, t in turn.blocks if t}
            assert ttls <= {"5m"}, "the oracle models 5-minute caches only"
            cum = list(itertools.accumulate(t for _, t, _ in turn.blocks))
            bps = [i for i, (_, _, t) in enumerate(turn.blocks) if t]
            self.turns.append((cum, bps))
        # For each turn k: the block indices any later turn can still read (its windows).
        self.reach: list[list[tuple[int, int]]] = []
        for k in range(len(self.turns)):
            wins = sorted({(max(0, b - lookback), b) for _, bps in self.turns[k + 1:] for b in bps})
            self.reach.append(wins)

    def step(self, k: int, j: int, entries: tuple, t: float) -> tuple[TurnCost, tuple]:
        """Turn k served by endpoint j at time t, whose cache holds ``entries`` of this
        session: its cost and the entries afterwards."""
        ep = self.eps[j]
        cum, bps = self.turns[k]
        total = cum[-1] if cum else 0
        if ep.cache != True:  # noqa: E712 - "ignore" bills everything as input, keeps nothing
            return TurnCost(ep.price(total, 0, 0, 0, OUTPUT_TOKENS), 0, 0, total), entries
        live = {i: e for i, e in entries if e > t}
        hit = -1
        for b in bps:
            for i in range(b, max(-1, b - self.lookback - 1), -1):
                if i <= hit:
                    break
                if i in live:
                    hit = i
                    break
        read = cum[hit] if hit >= 0 else 0
        if hit >= 0:
            live[hit] = t + self.ttl
        done = read
        for b in bps:
            if b > hit and cum[b] >= self.min_tokens:
                live[b] = t + self.ttl
                done = cum[b]
        written = done - read
        inp = total - read - written
        return (TurnCost(ep.price(inp, written, 0, read, OUTPUT_TOKENS), read, written, inp),
                tuple(sorted(live.items())))

    def prune(self, k: int, entries: tuple, t_next: float | None) -> tuple:
        """Drop what turn k+1 and later can never read: expired by then, or out of reach."""
        if t_next is None:
            return ()
        wins = self.reach[k]
        return tuple((i, e) for i, e in entries
                     if e > t_next and any(lo <= i <= hi for lo, hi in wins))

    def reprice(self, path: list[int], times: list[float]) -> tuple[float, list[TurnCost]]:
        """What a given path (endpoint index per turn) costs under the model."""
        state = tuple(() for _ in self.eps)
        costs = []
        for k, j in enumerate(path):
            c, ent = self.step(k, j, state[j], times[k])
            state = tuple(ent if i == j else s for i, s in enumerate(state))
            costs.append(c)
        return sum(c.usd for c in costs), costs

    def lower_bounds(self, usable: list[list[int]]) -> list[float]:
        """For each turn k, a floor under what turns k.. can cost anywhere: at best a turn reads
        the whole previous prompt and writes (or sends) only what it adds."""
        floors = []
        prev = 0
        for k, (cum, _) in enumerate(self.turns):
            total = cum[-1] if cum else 0
            best = float("inf")
            for j in usable[k]:
                ep = self.eps[j]
                if ep.cache != True:  # noqa: E712
                    c = total * ep.input
                else:
                    c = (prev * min(ep.read, ep.write5m, ep.input)
                         + (total - prev) * min(ep.write5m, ep.input))
                best = min(best, (c + OUTPUT_TOKENS * ep.output) / 1e6)
            floors.append(best)
            prev = total
        return list(itertools.accumulate(reversed(floors)))[::-1] + [0.0]

    def _dp(self, times: list[float], usable: list[list[int]], width: int | None,
            bound: float, rest: list[float], max_states: int) -> dict:
        states: dict[tuple, float] = {tuple(() for _ in self.eps): 0.0}
        back: list[dict[tuple, tuple]] = []
        peak, beamed = 1, False
        for k in range(len(self.turns)):
            t = times[k]
            t_next = times[k + 1] if k + 1 < len(times) else None
            new: dict[tuple, float] = {}
            links: dict[tuple, tuple] = {}
            for state, usd in states.items():
                for j in usable[k]:
                    c, ent = self.step(k, j, state[j], t)
                    total = usd + c.usd
                    if total + rest[k + 1] > bound * (1 + 1e-9):
                        continue  # cannot beat a path already known
                    nxt = tuple(self.prune(k, ent if i == j else s, t_next)
                                for i, s in enumerate(state))
                    if total < new.get(nxt, float("inf")):
                        new[nxt] = total
                        links[nxt] = (state, j)
            limit = width or max_states
            if len(new) > limit:
                beamed = beamed or width is None
                new = dict(sorted(new.items(), key=lambda kv: kv[1])[:limit])
            peak = max(peak, len(new))
            states = new
            back.append(links)
        end = min(states, key=states.get)
        best = states[end]
        path = []
        for links in reversed(back):
            end, j = links[end]
            path.append(j)
        path.reverse()
        return {"usd": best, "path": path, "peak_states": peak, "beamed": beamed}

    def oracle(self, times: list[float], usable: list[list[int]],
               max_states: int = 20_000) -> dict:
        """The cheapest path: a DP over (each endpoint's cache of this session), exact. A
        narrow beam first finds a good path; the exact pass then drops every state whose cost
        so far plus a floor under the turns to come exceeds it (branch and bound)."""
        rest = self.lower_bounds(usable)
        guess = self._dp(times, usable, 32, float("inf"), rest, max_states)
        best = self._dp(times, usable, None, guess["usd"], rest, max_states)
        if best["usd"] > guess["usd"]:  # cannot happen unless beamed: keep the better path
            best = dict(guess, beamed=True)
        _, best["costs"] = self.reprice(best["path"], times)
        return best


def usable_at(windows: dict[str, list[tuple[float, float]]], eps: tuple[Ep, ...],
              t: float) -> list[int]:
    ok = [j for j, ep in enumerate(eps)
          if not any(a <= t < b for a, b in windows.get(ep.name, []))]
    return ok or list(range(len(eps)))


def shoes_oracle(model: Model, times: list[float],
                 outages: dict[str, list[tuple[float, float]]],
                 held: dict[str, list[tuple[float, float]]], used: list[int]) -> dict:
    """The oracle in a run's shoes: the cheapest path it can find with no knowledge of any
    outage before that outage starts, replanning at each outage's start (like model-predictive
    control).

    Let T_1 < T_2 < ... be the outages' start times (T_0 = -inf, and after the last +inf).
    The turns sent in [T_i, T_i+1) follow the plan made at T_i: the exact DP's cheapest path
    when every turn before T_i is pinned to what the plans before chose (so the caches carry
    over) and the endpoints usable from T_i on are those of a world that holds

    - every outage that had started by T_i, until its end (it knows when a started outage
      ends), and no later one: the plan at T_0 is the best path of a world without outages;
    - the run's held windows (cooling or probing, as polled) that started before T_i+1, cut at
      T_i+1, so a window that outlasts the next outage's start tells nothing about that outage;
    - the endpoint the run used for each turn, always (the polls lag by up to 0.1 s).

    No outage starts inside [T_i, T_i+1), so within its own turns each plan's world is the
    real one: the path is one the run could have taken. It still knows how many turns each
    session has left, which no router does. Returns what ``Model.oracle`` does, with the
    largest ``peak_states`` of the plans and ``beamed`` if any plan was."""
    n = len(times)
    starts = sorted({a for w in outages.values() for a, _ in w})
    bounds = [float("-inf"), *starts, float("inf")]
    eps = model.eps
    chosen: list[int | None] = [None] * n
    peak, beamed = 1, False
    for lo, hi in itertools.pairwise(bounds):
        mine = [k for k, t in enumerate(times) if lo <= t < hi]
        if not mine:
            continue
        known = {name: [(a, b) for a, b in w if a <= lo] for name, w in outages.items()}
        seen = {name: [(a, min(b, hi)) for a, b in w if a < hi] for name, w in held.items()}
        usable = [[chosen[k]] if t < lo else
                  sorted(set(usable_at(known, eps, t)) & set(usable_at(seen, eps, t)) | {used[k]})
                  for k, t in enumerate(times)]
        plan = model.oracle(times, usable)
        peak, beamed = max(peak, plan["peak_states"]), beamed or plan["beamed"]
        for k in mine:
            chosen[k] = plan["path"][k]
    path = [j for j in chosen if j is not None]
    assert len(path) == n, "every turn falls in one plan's span"
    usd, costs = model.reprice(path, times)
    return {"usd": usd, "path": path, "costs": costs, "peak_states": peak, "beamed": beamed}


def no_foresight_bound(model: Model, times: list[float],
                       outages: dict[str, list[tuple[float, float]]],
                       clairvoyant_path: list[int]) -> dict:
    """The no-foresight bound: the oracle in a run's shoes (``shoes_oracle``) with no held
    windows, as for a router that never held an endpoint cooling or probing; it still learns
    of each outage only when it starts. The endpoints always allowed are those of the
    clairvoyant oracle's path at the same times (usable then, so they add nothing): its path
    is one the clairvoyant oracle could take, and it never costs less. What it costs above
    the clairvoyant oracle is foresight, which no probe gives. (A run held cooling may land
    below it by luck: kept on a dearer relay, it may warm a cache a later outage reads.)"""
    return shoes_oracle(model, times, outages, {}, clairvoyant_path)


def path_string(eps: tuple[Ep, ...], path: list[int], costs: list[TurnCost]) -> str:
    return "".join(eps[j].name.upper() if c.read else eps[j].name.lower()
                   for j, c in zip(path, costs))


# ------------------------------------------------------------------------------- scenario

async def run_scenario(n: int, scn: Scenario, args, procs: Procs, workdir: Path,
                       mock: str) -> dict:
    ttl = float(args.ttl)
    traces = make_trace(scn, args.seed, args.sessions)
    for tr in traces:
        check_append_only(tr)
    names = [ep.name for ep in scn.endpoints]
    async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
        for run in RUNS:
            for ep in scn.endpoints:
                profile = {"cache": ep.cache, "cache_ttl_scale": ttl / REAL_TTL,
                           "output_tokens": OUTPUT_TOKENS}
                r = await c.put(f"{mock}/_mock/profiles/{mock_name(n, run, ep.name)}", json=profile)
                r.raise_for_status()
    routers = {run: start_router(procs, workdir, mock, n, scn, run, args.ttl, args.horizon)
               for run in RUNS}
    try:
        await asyncio.gather(*(wait_router(procs, p, base, log, names)
                               for p, base, log in routers.values()))
        sent: list[Sent] = []
        applied: list[dict] = []
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        clients = {run: httpx.AsyncClient(base_url=routers[run][1], trust_env=False,
                                          timeout=httpx.Timeout(60.0), limits=limits)
                   for run in RUNS}
        started = time.monotonic()
        t0 = started + 0.2
        stop = asyncio.Event()
        health: dict[str, list] = {run: [] for run in RUNS}
        pollers = [asyncio.create_task(health_poller(routers[run][1], t0, stop, health[run]))
                   for run in RUNS]

        async def sessions() -> None:
            await asyncio.gather(*(run_session(clients[run], run, tr, t0, ttl, sent)
                                   for run in RUNS for tr in traces))
            stop.set()

        try:
            await asyncio.gather(outage_script(mock, n, scn, t0, ttl, applied), sessions())
        finally:
            stop.set()
            await asyncio.gather(*pollers)
            for cl in clients.values():
                await cl.aclose()
        elapsed = time.monotonic() - t0
        statuses = {}
        async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
            for run in RUNS:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    statuses[run] = (await c.get(f"{routers[run][1]}/_router/status")).json()
            records = (await c.get(f"{mock}/_mock/requests")).json()
    finally:
        for p, _, _ in routers.values():
            procs.stop(p)
    logs = {run: procs.log(routers[run][2]) for run in RUNS}
    return analyse(n, scn, args, traces, sent, applied, health, records, statuses, logs,
                   elapsed)


def analyse(n: int, scn: Scenario, args, traces: list[SessionTrace], sent: list[Sent],
            applied: list[dict], health: dict[str, list], records: list[dict], statuses: dict,
            logs: dict, elapsed: float) -> dict:
    ttl_s = REAL_TTL * (args.ttl / REAL_TTL)  # the mock's own arithmetic: 300 x scale
    eps = scn.endpoints
    index = {ep.name: j for j, ep in enumerate(eps)}
    windows = outage_windows(applied, elapsed + 60)
    held = {run: health_windows(health[run], elapsed + 60) for run in RUNS}
    res: dict[str, Any] = {"scenario": scn.name, "what": scn.what, "setup": scn.describe(),
                           "seconds": round(elapsed, 1), "outages_applied": applied,
                           "outage_windows": windows, "unusable_windows": held, "runs": {}}
    final: dict[str, dict[tuple[int, int], Sent]] = {run: {} for run in RUNS}
    for s in sent:
        if s.status == 200 and not s.error:
            final[s.run][(s.session, s.turn)] = s
    # -- what the mock billed, and what each run did
    paths: dict[str, dict[int, list]] = {}
    for run in RUNS:
        mine = {mock_name(n, run, ep.name): ep for ep in eps}
        recs = [r for r in records if r["endpoint"] in mine and r["path"] == "/v1/messages"]
        by_ep: collections.Counter = collections.Counter()
        tokens: collections.Counter = collections.Counter()
        for r in recs:
            if r.get("usage"):
                by_ep[mine[r["endpoint"]].name] += mine[r["endpoint"]].bill(r["usage"])
                for k in ("input_tokens", "cache_creation_input_tokens",
                          "cache_read_input_tokens", "output_tokens"):
                    tokens[k] += r["usage"].get(k) or 0
        outcomes = collections.Counter(f"{mine[r['endpoint']].name}:{r['outcome']}" for r in recs)
        mine_sent = [s for s in sent if s.run == run]
        client_errors = [s for s in mine_sent if s.status != 200 or s.error]
        seen = sum(eps[index[s.endpoint]].bill(s.usage) for s in final[run].values()
                   if s.usage and s.endpoint in index)
        reasons = collections.Counter(s.reason for s in final[run].values() if s.reason)
        failovers = sum(1 for s in final[run].values() if "," in s.attempts)
        paths[run], moves = {}, 0
        for tr in traces:
            seq = [final[run].get((tr.index, k)) for k in range(len(tr.turns))]
            paths[run][tr.index] = seq
            names = [s.endpoint if s else "?" for s in seq]
            moves += sum(1 for x, y in itertools.pairwise(names) if x != y)
        st = statuses.get(run) or {}
        res["runs"][run] = {
            "billed_usd": sum(by_ep.values()), "billed_by_endpoint": dict(by_ep),
            "tokens": dict(tokens), "client_seen_usd": seen, "requests_sent": len(mine_sent),
            "turns_answered": len(final[run]), "client_errors": len(client_errors),
            "client_error_samples": [asdict(s) for s in client_errors[:5]],
            "upstream_attempts": len(recs), "upstream_outcomes": dict(outcomes),
            "failovers": failovers, "moves": moves, "reasons": dict(reasons),
            "status_endpoints": [{k: e.get(k) for k in (
                "name", "state", "served", "failures", "ejections", "caches", "sessions_pinned",
                "cache_read_ratio", "rewrite_cost_usd", "cost_usd", "tokens")}
                for e in st.get("endpoints", [])],
            "status_sessions": st.get("sessions"),
            "log_lines": [ln for ln in logs[run].splitlines()
                          if "does not seem to cache" in ln or "cooldown" in ln
                          or "Error" in ln or "Traceback" in ln][:20],
        }
    # -- the oracles, and the model check on the paths actually taken
    totals: collections.Counter = collections.Counter()
    sessions_out = []
    peak, beamed = 0, False
    for tr in traces:
        model = Model(tr, eps, ttl_s)
        row: dict[str, Any] = {"session": tr.index, "sid": tr.sid, "stream": tr.stream,
                               "prompt_tokens": [t.prompt for t in tr.turns],
                               "tool_turns": [k for k, t in enumerate(tr.turns) if t.tool]}
        for run in RUNS:
            seq = paths[run][tr.index]
            if any(s is None or s.endpoint not in index for s in seq):
                row[f"{run}_path"] = None
                totals[f"{run}_incomplete"] += 1
                continue
            times = [s.t for s in seq]
            path = [index[s.endpoint] for s in seq]
            usd, costs = model.reprice(path, times)
            totals[f"{run}_model"] += usd
            row[f"{run}_path"] = "".join(
                eps[j].name.upper() if (s.usage or {}).get("cache_read_input_tokens")
                else eps[j].name.lower() for j, s in zip(path, seq))
            row[f"{run}_model_path"] = path_string(eps, path, costs)
            row[f"{run}_times"] = [round(x, 3) for x in times]
            row[f"{run}_reasons"] = [s.reason for s in seq]
            row[f"{run}_attempts"] = [s.attempts for s in seq]
            usable = [usable_at(windows, eps, x) for x in times]
            o = model.oracle(times, usable)
            totals[f"{run}_oracle"] += o["usd"]
            row[f"oracle_{run}_times_path"] = path_string(eps, o["path"], o["costs"])
            row[f"oracle_{run}_times_usd"] = o["usd"]
            # In this run's shoes: no foresight of any outage before it starts (it replans at
            # each outage's start), and never an endpoint this run's health layer held cooling
            # (unless the run used it: polls lag by up to 0.1 s).
            sh = shoes_oracle(model, times, windows, held[run], path)
            totals[f"{run}_shoes"] += sh["usd"]
            row[f"oracle_{run}_shoes_path"] = path_string(eps, sh["path"], sh["costs"])
            peak = max(peak, o["peak_states"], sh["peak_states"])
            beamed = beamed or o["beamed"] or sh["beamed"]
            if run == "cost":  # at the probes-off run's times, as the gap's denominator
                nf = no_foresight_bound(model, times, windows, o["path"])
                totals["no_foresight"] += nf["usd"]
                row["no_foresight_path"] = path_string(eps, nf["path"], nf["costs"])
                row["no_foresight_usd"] = nf["usd"]
                peak, beamed = max(peak, nf["peak_states"]), beamed or nf["beamed"]
        sessions_out.append(row)
    res["sessions"] = sessions_out
    for run in RUNS:
        r = res["runs"][run]
        r["model_usd"] = totals[f"{run}_model"]
        r["oracle_usd"] = totals[f"{run}_oracle"]  # with this run's turn times
        r["oracle_in_its_shoes_usd"] = totals[f"{run}_shoes"]
        r["incomplete_sessions"] = totals[f"{run}_incomplete"]
    router, order = res["runs"]["cost"]["billed_usd"], res["runs"]["order"]["billed_usd"]
    res.update(router_usd=router, order_usd=order, oracle_usd=res["runs"]["cost"]["oracle_usd"],
               oracle_peak_states=peak, oracle_beamed=beamed)
    res["router_vs_oracle"] = _div(router, res["oracle_usd"])
    res["router_vs_order"] = _div(router, order)
    res["order_vs_oracle"] = _div(order, res["runs"]["order"]["oracle_usd"])
    p = res["runs"]["probe"]
    res["probe_usd"] = p["billed_usd"]
    # Against the same clairvoyant oracle as the probes-off run (its turn times), so that the
    # two runs' ratios and the gap closed share one denominator.
    res["probe_vs_oracle"] = _div(p["billed_usd"], res["oracle_usd"])
    res["probe_vs_shoes"] = _div(p["billed_usd"], p["oracle_in_its_shoes_usd"])
    res["probe_gap_closed"] = gap_closed(res["router_vs_oracle"], res["probe_vs_oracle"])
    # The no-foresight bound (summed over the sessions the oracle covers): what no probe can
    # close, and the share of the rest of the off run's gap (the closable gap) the probes close.
    res["no_foresight_usd"] = totals["no_foresight"]
    res["no_foresight_vs_oracle"] = _div(totals["no_foresight"], res["oracle_usd"])
    res["closable_gap_closed"] = closable_gap_closed(
        res["router_vs_oracle"], res["probe_vs_oracle"], res["no_foresight_vs_oracle"])
    return res


def gap_closed(off: float | None, on: float | None) -> float | None:
    """The share of the probes-off run's gap to its clairvoyant oracle that probes close (1:
    all of it, 0: none, negative: wider); None when there was no gap to close."""
    if off is None or on is None or off - 1 < 0.005:
        return None
    return 1 - (on - 1) / (off - 1)


def closable_gap_closed(off: float | None, on: float | None,
                        bound: float | None) -> float | None:
    """The share of the closable gap the probes close, all three ratios to the clairvoyant
    oracle: (off - on) / (off - bound), where the closable gap off - bound is what is left of
    the probes-off run's gap once the no-foresight bound's part (foresight) is taken out.
    None when there is nothing closable (off at or below the bound)."""
    if off is None or on is None or bound is None or off - bound <= 0:
        return None
    return (off - on) / (off - bound)


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


# --------------------------------------------------------------------------------- report

def money(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_scenario(res: dict) -> None:
    print(f"### {res['scenario']}: {res['what']}")
    print(f"    {res['setup']}; {res['seconds']} s")
    if res["outages_applied"]:
        print("    outages applied (s from start): " + ", ".join(
            f"{e['endpoint']} {e['what']} at {e['t']:.2f}" for e in res["outages_applied"]))
    for run in RUNS:
        r = res["runs"][run]
        label = LABEL[run]
        fails = {k: v for k, v in r["upstream_outcomes"].items() if not k.endswith(":200")}
        check = r["model_usd"] - r["billed_usd"]
        billed = ", ".join(f"{k} ${v:.4f}" for k, v in sorted(r["billed_by_endpoint"].items()))
        print(f"    {label}: ${r['billed_usd']:.4f} billed ({billed}); "
              f"client saw ${r['client_seen_usd']:.4f}; model re-priced its paths "
              f"${r['model_usd']:.4f} (diff {check:+.6f})")
        print(f"      {r['turns_answered']} turns answered, {r['requests_sent']} requests sent, "
              f"{r['client_errors']} client-visible errors, {r['upstream_attempts']} upstream "
              f"attempts, failed attempts: {fails or 'none'}, {r['failovers']} turns failed "
              f"over, {r['moves']} endpoint changes within sessions")
        held = res["unusable_windows"].get(run) or {}
        if held:
            print("      held cooling (s): " + "; ".join(
                f"{k} " + ", ".join(f"{a:.2f}-{b:.2f}" for a, b in v) for k, v in held.items()))
        reasons = sorted(r["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
        for k, v in reasons[:6]:  # as the router sent them, amounts and all
            print(f"      X-Router-Reason {v}x: {k}")
        if len(reasons) > 6:
            print(f"      ... and {len(reasons) - 6} other X-Router-Reasons (all in the JSON)")
        if run != "order" and r["status_endpoints"]:
            print("      /_router/status: " + "; ".join(
                f"{e['name']} {e['state']} caches={e['caches']} pinned={e['sessions_pinned']} "
                f"read_ratio={e['cache_read_ratio']} rewrite=${e['rewrite_cost_usd']}"
                for e in r["status_endpoints"]))
            ss = r["status_sessions"] or {}
            why = collections.Counter(f"{x['endpoint']} ({x['why']})" for x in ss.get("recent", []))
            print(f"      /_router/status sessions: {ss.get('count')}, now on: "
                  + ", ".join(f"{v}x {k}" for k, v in why.items()))
        for w in r["log_lines"][:6]:
            print(f"      log: {w.strip()[:150]}")
    o, c = res["runs"]["order"], res["runs"]["cost"]
    print(f"    oracle: ${res['oracle_usd']:.4f} (router's turn times; ${o['oracle_usd']:.4f} with "
          f"order's); in the router's shoes ${c['oracle_in_its_shoes_usd']:.4f}, in order's "
          f"${o['oracle_in_its_shoes_usd']:.4f}; no-foresight bound "
          f"${res['no_foresight_usd']:.4f}; peak DP states {res['oracle_peak_states']}"
          f"{' (BEAMED: not exact)' if res['oracle_beamed'] else ''}")
    print("    paths, one letter per turn (upper case: the turn read its prefix from cache):")
    for row in res["sessions"]:
        print(f"      s{row['session']}{'' if row['stream'] else ' (json)'}: "
              f"router {row.get('cost_path')}  probes {row.get('probe_path')}  order {row.get('order_path')}  "
              f"oracle {row.get('oracle_cost_times_path')}  "
              f"in router's shoes {row.get('oracle_cost_shoes_path')}")
    print()


def table(results: list[dict]) -> str:
    lines = ["| scenario | router $ | original order $ | oracle $ | router/oracle | router/original |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {money(r['router_usd'])} | {money(r['order_usd'])} | "
                     f"{money(r['oracle_usd'])} | {ratio(r['router_vs_oracle'])} | "
                     f"{ratio(r['router_vs_order'])} |")
    return "\n".join(lines)


def attribution(results: list[dict]) -> str:
    """The gap to the oracle, less what no router could know: an oracle "in a run's shoes"
    knows no outage before it starts (it replans at each outage's start; before the first it
    follows the best path of a world without outages) and may not use an endpoint that run's
    health layer held cooling (cooldowns, probes). The last column divides the two runs'
    ratios: the rule against the original's order with cooldown timing (jitter, which
    differs between the two routers) taken out."""
    lines = ["| scenario | oracle $ | oracle in router's shoes $ | router / that | "
             "oracle in order's shoes $ | order / that | rule vs order (ratio of the two) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        c, o = r["runs"]["cost"], r["runs"]["order"]
        rc = _div(c["billed_usd"], c["oracle_in_its_shoes_usd"])
        ro = _div(o["billed_usd"], o["oracle_in_its_shoes_usd"])
        lines.append(f"| {r['scenario']} | {money(r['oracle_usd'])} | "
                     f"{money(c['oracle_in_its_shoes_usd'])} | {ratio(rc)} | "
                     f"{money(o['oracle_in_its_shoes_usd'])} | {ratio(ro)} | "
                     f"{ratio(_div(rc, ro) if rc and ro else None)} |")
    return "\n".join(lines)


def probes_table(results: list[dict]) -> str:
    """Probes off and on side by side: the cost rule without and with out-of-band probes, both
    against the clairvoyant oracle (at the probes-off run's turn times), the probes run against
    the oracle in its shoes (what a router can know), and the share of the off run's gap to the
    clairvoyant oracle that the probes close; then the no-foresight bound against the
    clairvoyant oracle (no held windows, no foresight: what probes cannot close) and the share
    of the closable gap (off / oracle down to the bound) the probes close."""
    lines = ["| scenario | oracle $ | probes off $ | off / oracle | probes on $ | on / oracle | "
             "on / oracle in its shoes | gap closed | no-foresight bound / oracle | "
             "closable gap closed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        closed = r.get("probe_gap_closed")
        closable = r.get("closable_gap_closed")
        bound = r.get("no_foresight_vs_oracle")
        lines.append(f"| {r['scenario']} | {money(r['oracle_usd'])} | {money(r['router_usd'])} | "
                     f"{ratio(r['router_vs_oracle'])} | "
                     f"{money(r.get('probe_usd'))} | {ratio(r.get('probe_vs_oracle'))} | "
                     f"{ratio(r.get('probe_vs_shoes'))} | {share(closed)} | {ratio(bound)} | "
                     f"{closable_cell(closable, bound)} |")
    return "\n".join(lines)


def share(x: float | None) -> str:
    return "-" if x is None else f"{round(x, 2) + 0.0:.0%}"


def closable_cell(closable: float | None, bound: float | None) -> str:
    """The closable share, or why there is none: no bound (no complete session), or none."""
    if closable is None:
        return "-" if bound is None else "n/a (nothing closable)"
    return share(closable)


def summary(results: list[dict]) -> list[str]:
    """Each scenario in words and real dollars: per run, and per 1,000 turns."""
    out = []
    for r in results:
        turns = r["runs"]["cost"]["turns_answered"]
        router, order, oracle = r["router_usd"], r["order_usd"], r["oracle_usd"]
        per = (lambda usd, turns=turns: f"${1000 * usd / turns:.2f} per 1,000 turns") if turns else (lambda usd: "-")
        line = (f"- {r['scenario']} ({r['setup']}): the router spent ${router:.4f} on {turns} "
                f"turns ({per(router)}); the original price order ${order:.4f} ({per(order)})")
        if order and turns:
            diff = order - router
            word = "less" if diff >= 0 else "more"
            line += (": the same" if abs(diff) < 0.0005 * order else
                     f": the router spends {abs(diff) / order:.1%} {word}, "
                     f"${1000 * abs(diff) / turns:.2f} {word} per 1,000 turns")
        if oracle:
            line += f". An oracle that foresees every outage: ${oracle:.4f} (router/oracle {router / oracle:.3f})"
        out.append(line + ".")
    return out


def scope(args) -> str:
    """What a run of this size can and cannot show."""
    size = (f"{args.sessions} synthetic Claude Code sessions per scenario, one seed ({args.seed}), "
            f"a 5-minute cache compressed to {args.ttl} s")
    text = [f"What this run shows ({size}): how the router's cost rule compares with the "
            "original cheapest-healthy-first order on "
            + ("your endpoints' prices (and cache prices)" if args.config else "the built-in prices")
            + ", on a mock relay that caches prompts as Anthropic does"
            + (" (but for --no-cache relays)" if args.no_cache else "")
            + ", through the outages listed; and that everything runs end to end.",
            "What it cannot show: your real traffic (volume, prompt sizes, how often sessions "
            "pause), your relays' real caching, latency, errors and rate limits, 1-hour caches, "
            "or the models, model maps and profiles in your config (every turn is one Sonnet "
            "model). The dollars are for the turns simulated: scale the per-1,000-turn figures "
            "by your own volume."]
    if args.quick or args.sessions < 6:
        text.append("This is a quick run: it checks the set-up and gives a first idea; "
                    "differences of a few per cent are noise. Before deciding, run without --quick "
                    "(and with more --sessions or another --seed).")
    return "\n".join(text)


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, reported (never asserted)."""
    out = []
    for r in results:
        ro, rr = r["router_vs_oracle"], r["router_vs_order"]
        verdicts = []
        if ro is not None:
            verdicts.append(("ok" if ro <= 1.05 else "MISSED") + f" within 5 % of oracle ({ro:.3f})")
        if rr is not None:
            verdicts.append(("ok" if rr <= 1.0 + 1e-9 else "MISSED") + f" never above order ({rr:.3f})")
            if r["scenario"] == "cheap-nocache":
                verdicts.append(("ok" if rr <= 0.6 else "MISSED") + " >= 40 % below order")
        ps, closed = r.get("probe_vs_shoes"), r.get("probe_gap_closed")
        if ps is not None and r["outages_applied"]:
            verdicts.append(("ok" if ps <= 1.05 else "MISSED") + f" probes within 5 % of the oracle "
                            f"in their shoes ({ps:.3f})")
            if closed is not None:
                line = (("ok" if closed >= 0.5 else "MISSED") + f" probes close >= half the gap "
                        f"to the oracle ({closed:.0%})")
                bound = r.get("no_foresight_vs_oracle")
                if closed < 0.5 and bound is not None:  # how much of it a router could close
                    closable = r.get("closable_gap_closed")
                    part = ("nothing closable" if closable is None
                            else f"{share(closable)} of the closable gap")
                    line += f", {part} (the rest needs foresight: bound {bound:.3f})"
                verdicts.append(line)
        out.append(f"- {r['scenario']}: " + "; ".join(verdicts))
    return out


# ------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="ROUTER_YAML",
                   help="simulate your own endpoints: the prices of this router.yaml (read with "
                        "the router's own loader; keys are not needed). Scenarios: calm, "
                        "short-outage, long-outage of the cheapest (or --outage)")
    p.add_argument("--outage", action="append", default=[], type=parse_outage,
                   metavar="NAME:FROM-TO", help="with --config: NAME fails (529) from FROM to TO, "
                        "in TTL units from the start (e.g. aws:0.6-0.8; repeat for more)")
    p.add_argument("--no-cache", action="append", default=[], metavar="NAME",
                   help="with --config: this relay ignores cache_control (bills every prompt "
                        "token as input); repeat for more")
    p.add_argument("--turns", type=int, help="turns per session (default: the scenario's, 12-16)")
    p.add_argument("--pace", type=float, help="think-time multiplier, 1 = about 0.1-0.3 TTL "
                        "between user turns (default: the scenario's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 sessions, a 2-second TTL (a full run: 6 sessions, 5 s)")
    p.add_argument("--scenario", action="append", default=[],
                   help="run only this scenario (repeat or comma-separate; see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--sessions", type=int, help="concurrent sessions per scenario (6; quick 3)")
    p.add_argument("--ttl", type=int,
                   help="seconds a 5-minute cache lives on the compressed clock (5; quick 2)")
    p.add_argument("--horizon", type=int, help="router_session_horizon (default: the router's)")
    p.add_argument("--seed", type=int, default=1, help="trace seed (1)")
    p.add_argument("--json", default=str(ROOT / "costsim-results.json"), help="results file")
    p.add_argument("--keep", action="store_true", help="keep the work dir (router logs, configs)")
    a = p.parse_args(argv)
    a.sessions = a.sessions or (3 if a.quick else 6)
    a.ttl = a.ttl or (2 if a.quick else 5)
    if (a.outage or a.no_cache) and not a.config:
        p.error("--outage and --no-cache describe your endpoints: give them with --config router.yaml")
    scenarios = SCENARIOS
    if a.config:
        try:
            eps = config_endpoints(a.config, a.no_cache)
        except ValueError as e:  # config.ConfigError: the file, the field, the problem
            p.error(str(e))
        letters = {ep.label: ep.name for ep in eps}
        if bad := [n for n, _, _ in a.outage if n not in letters]:
            p.error(f"--outage {bad[0]}: no such endpoint in {a.config} ({', '.join(letters)})")
        scenarios = config_scenarios(eps, [(letters[n], x, y) for n, x, y in a.outage])
    if a.turns is not None or a.pace is not None:
        scenarios = [dataclasses.replace(scn, turns=a.turns or scn.turns, pace=a.pace or scn.pace)
                     for scn in scenarios]
    wanted = [s.strip() for item in a.scenario for s in item.split(",") if s.strip()]
    known = {s.name for s in scenarios}
    if bad := [s for s in wanted if s not in known]:
        p.error(f"unknown scenario {', '.join(bad)}; known: {', '.join(sorted(known))}")
    a.scenarios = [s for s in scenarios if not wanted or s.name in wanted]
    if a.sessions < 1 or a.ttl < 1:
        p.error("--sessions and --ttl must be at least 1")
    if (a.turns is not None and a.turns < 2) or (a.pace is not None and a.pace <= 0):
        p.error("--turns must be at least 2 and --pace above 0")
    return a


async def amain(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="costsim-"))
    procs = Procs(workdir)
    results = []
    started = time.monotonic()
    ok = False
    try:
        mock = start_mock(procs)
        note(f"costsim: mock relay at {mock}; work dir {workdir}; TTL {args.ttl} s "
             f"(5 min), cooldown {COOLDOWN} s, {args.sessions} sessions per scenario, seed {args.seed}")
        for n, scn in enumerate(args.scenarios, 1):
            note(f"costsim: scenario {n}/{len(args.scenarios)} {scn.name} ...")
            res = await run_scenario(n, scn, args, procs, workdir, mock)
            results.append(res)
            note(f"costsim: {scn.name} done in {res['seconds']} s: router ${res['router_usd']:.4f}, "
                 f"original order ${res['order_usd']:.4f}")
            async with httpx.AsyncClient(trust_env=False, timeout=10) as c:
                await c.delete(f"{mock}/_mock/state")  # a fresh log for the next scenario
        ok = True
    finally:
        procs.stop_all()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            note(f"costsim: logs kept in {workdir}")
    total = time.monotonic() - started
    # The summary first: the table, what it means in dollars, and what a run like this can show.
    print(f"## Cost simulation: {len(results)} scenarios, {args.sessions} sessions each, "
          f"TTL {args.ttl} s, seed {args.seed}, {total:.0f} s"
          + (f", prices from {args.config}" if args.config else "") + "\n")
    print(table(results))
    print()
    print("\n".join(summary(results)))
    print()
    print(scope(args))
    print()
    print("## Details\n")
    for res in results:
        print_scenario(res)
    runs = [r["runs"][run] for r in results for run in RUNS]
    failed = collections.Counter()
    for r in runs:
        for k, v in r["upstream_outcomes"].items():
            if not k.endswith(":200"):
                failed[k.split(":", 1)[1]] += v
    worst = max((abs(r["model_usd"] - r["billed_usd"]) for r in runs), default=0.0)
    print(f"What ran: {sum(r['turns_answered'] for r in runs)} turns answered of "
          f"{sum(len(x['sessions']) * len(x['sessions'][0]['prompt_tokens']) for x in results) * len(RUNS)}"
          f" in the traces, {sum(r['requests_sent'] for r in runs)} requests sent, "
          f"{sum(r['client_errors'] for r in runs)} client-visible errors, "
          f"{sum(r['upstream_attempts'] for r in runs)} upstream attempts of which failed: "
          f"{dict(failed) or 'none'} (the injected outages); model check: largest |re-priced - "
          f"billed| per run ${worst:.6f}; oracle DP exact: "
          f"{'no (beamed)' if any(x['oracle_beamed'] for x in results) else 'yes'}.")
    print()
    print("Where the gap comes from: an oracle in a run's shoes knows no outage before it starts "
          "and may not use what that run's health layer held cooling:\n")
    print(attribution(results))
    print()
    print("Probes off and on (the cost rule; probes: a one-token message every "
          f"{PROBE_EVERY:g} s of the real clock while an endpoint or its model family cools):\n")
    print(probes_table(results))
    print()
    if not args.config:  # the built-in scenarios' targets (the design's), not the user's
        print("Targets (reported, not asserted):")
        print("\n".join(targets(results)))
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(total, 1),
           "args": {k: v for k, v in vars(args).items() if k != "scenarios"},
           "scenarios": [s.name for s in args.scenarios], "output_tokens": OUTPUT_TOKENS,
           "cooldown": COOLDOWN, "results": results}
    Path(args.json).write_text(json.dumps(doc, indent=1, default=lambda o: asdict(o)
                                          if hasattr(o, "__dataclass_fields__") else str(o)))
    print(f"\nJSON: {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in args.scenarios:
            print(f"{s.name:14} {s.what}\n{'':14} {s.describe()}; {s.turns} turns"
                  f"{', mixed streaming/JSON' if s.mixed else ''}")
        return 0
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
