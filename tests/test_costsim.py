"""Smoke test of the cost simulator: one quick scenario end to end (mock relay, two real
mitmdump routers, the oracle). It checks the run completes and prints its table; it asserts
nothing about the costs themselves (scripts/costsim reports those)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from claude_router_dev.costsim import (
    Ep,
    Model,
    SessionTrace,
    Turn,
    closable_gap_closed,
    gap_closed,
    no_foresight_bound,
    probes_table,
    shoes_oracle,
    targets,
    usable_at,
)
from claude_router_dev.harness import ROOT


def test_costsim_quick_scenario_prints_the_table(tmp_path):
    out_json = tmp_path / "costsim.json"
    proc = subprocess.run(
        [sys.executable, "-m", "claude_router_dev.costsim", "--quick", "--scenario",
         "cheap-nocache", "--json", str(out_json)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| scenario | router $ | original order $ | oracle $ | router/oracle | router/original |" in out
    rows = [line for line in out.splitlines() if line.startswith("| cheap-nocache |")]
    assert rows, out
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    router, order, oracle = (float(c) for c in cells[1:4])
    assert router > 0 and order > 0 and oracle > 0
    assert out.index("## Cost simulation") < out.index("## Details") < out.index("### cheap-nocache")
    assert "$x" not in out and "over N turns" not in out  # real amounts, no placeholder
    doc = json.loads(out_json.read_text())
    (result,) = doc["results"]
    for run in ("cost", "order"):
        r = result["runs"][run]
        assert r["client_errors"] == 0 and r["turns_answered"] > 0


def costsim(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CHEAP_KEY", "DEAR_KEY")}
    return subprocess.run([sys.executable, "-m", "claude_router_dev.costsim", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def user_config(tmp_path: Path, dear_price: str = "{input: 3.0, output: 15.0}") -> Path:
    cfg = tmp_path / "router.yaml"
    cfg.write_text("""
endpoints:
  - name: cheap
    url: https://relay.example/cheap
    key: env:CHEAP_KEY       # not set: costsim needs prices, never keys
    price: {input: 1.5, output: 7.5, cache_read: 0.2}
  - name: dear
    url: https://api.anthropic.com
    key: env:DEAR_KEY
""" + (f"    price: {dear_price}\n" if dear_price else ""))
    return cfg


def test_config_gives_scenarios_of_the_users_endpoints_and_prices(tmp_path):
    cfg = user_config(tmp_path)
    out = costsim("--config", str(cfg), "--list")
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert names == ["calm", "short-outage", "long-outage"]
    assert "a=cheap 1.5/7.5, b=dear 3/15" in out.stdout and "a down 0.6-0.8 TTL" in out.stdout
    out = costsim("--config", str(cfg), "--list", "--outage", "dear:0.5-1", "--no-cache", "cheap",
                  "--turns", "5")
    assert out.returncode == 0, out.stderr
    assert "a=cheap 1.5/7.5 ignores caching" in out.stdout and "b down 0.5-1 TTL; 5 turns" in out.stdout


def test_config_errors_name_the_file_and_field(tmp_path):
    out = costsim("--config", str(user_config(tmp_path, dear_price="")), "--list")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'router.yaml'}: endpoints[1] (dear).price: costsim needs a price" in out.stderr
    out = costsim("--config", str(user_config(tmp_path)), "--list", "--outage", "nope:1-2")
    assert out.returncode == 2 and "--outage nope: no such endpoint" in out.stderr
    out = costsim("--config", str(user_config(tmp_path)), "--list", "--outage", "cheap:2-1")
    assert out.returncode == 2 and "NAME:FROM-TO" in out.stderr


def test_config_run_prints_the_summary_first_with_real_numbers(tmp_path):
    out_json = tmp_path / "costsim.json"
    proc = costsim("--config", str(user_config(tmp_path)), "--quick", "--sessions", "1",
                   "--turns", "3", "--scenario", "calm", "--json", str(out_json), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("## Cost simulation: 1 scenarios") and "prices from" in out.splitlines()[0]
    summary, details = out.split("## Details", 1)
    assert "| calm |" in summary and "per 1,000 turns" in summary
    assert "What this run shows" in summary and "What it cannot show" in summary
    assert "This is a quick run" in summary
    assert "### calm" in details and "### calm" not in summary
    assert "$x" not in out and "over N turns" not in out
    (result,) = json.loads(out_json.read_text())["results"]
    assert result["scenario"] == "calm" and "a=cheap 1.5/7.5" in result["setup"]
    assert result["runs"]["cost"]["turns_answered"] == 3 and result["router_usd"] > 0


# -- the oracle in a run's shoes, on a hand-made trace (no mitmdump): a dear relay B and a
# cheap one A that fails twice. Each turn sends a 5,000-token system prompt and the whole
# conversation (300 tokens a message), breakpoints on the system prompt and the newest message.

EPS = (Ep("a", 1.0, 5.0), Ep("b", 2.0, 10.0))
TIMES = [0, 1, 2.5, 3.5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14.5, 15.5, 17, 18]  # seconds
TWICE = {"a": [(2.0, 4.0), (14.0, 16.0)]}  # A down twice; a cache lives 10 s


def two_outage_model() -> Model:
    turns = []
    for k in range(len(TIMES)):
        blocks = [("sys", 5000, "5m")] + [(f"m{i}", 300, "5m" if i == k else None)
                                          for i in range(k + 1)]
        turns.append(Turn(0.0, {}, False, blocks, sum(t for _, t, _ in blocks)))
    return Model(SessionTrace(0, "s", 0.0, True, turns), EPS, ttl_seconds=10.0)


def letters(path: list[int], times=TIMES, lo=float("-inf"), hi=float("inf")) -> str:
    return "".join(EPS[j].name for j, t in zip(path, times) if lo <= t < hi)


def used_as_an_order_router() -> list[int]:
    return [1 if usable_at(TWICE, EPS, t) == [1] else 0 for t in TIMES]


def test_shoes_oracle_does_not_prewarm_the_dear_relay_before_an_outage_it_cannot_know():
    model = two_outage_model()
    clairvoyant = model.oracle(TIMES, [usable_at(TWICE, EPS, t) for t in TIMES])
    shoes = shoes_oracle(model, TIMES, TWICE, {}, used_as_an_order_router())
    # Knowing the second outage, the clairvoyant oracle warms B's cache between the two.
    assert "b" in letters(clairvoyant["path"], lo=4.0, hi=14.0)
    # In the run's shoes nothing tells it the second outage is coming: A all along between.
    assert letters(shoes["path"], lo=4.0, hi=14.0) == "a" * 9
    assert letters(shoes["path"], lo=14.0, hi=16.0) == "bb"  # it does move when A fails
    assert shoes["usd"] > clairvoyant["usd"]
    assert not clairvoyant["beamed"] and not shoes["beamed"]
    # Its path is one a router could take: never A while A is down.
    assert all(j in usable_at(TWICE, EPS, t) for j, t in zip(shoes["path"], TIMES))
    assert shoes["usd"] == pytest.approx(model.reprice(shoes["path"], TIMES)[0])


def test_shoes_oracle_chooses_the_same_before_each_outage_whatever_comes_after():
    model = two_outage_model()
    used = used_as_an_order_router()
    both = shoes_oracle(model, TIMES, TWICE, {}, used)
    first_only = shoes_oracle(model, TIMES, {"a": TWICE["a"][:1]}, {}, used)
    calm = model.oracle(TIMES, [[0, 1]] * len(TIMES))
    assert letters(both["path"], hi=14.0) == letters(first_only["path"], hi=14.0)
    assert letters(both["path"], hi=2.0) == letters(calm["path"], hi=2.0)


def test_shoes_oracle_keeps_off_held_endpoints_but_never_off_the_one_the_run_used():
    model = two_outage_model()
    cooling = {"a": [(2.0, 6.5)]}  # the run held A cooling past the first outage's end ...
    used = used_as_an_order_router()
    used[4] = used[5] = 1  # ... and sent the turns at 5 and 6 s to B
    held = shoes_oracle(model, TIMES, TWICE, cooling, used)
    assert letters(held["path"], lo=4.0, hi=6.5) == "bb"
    used[4] = 0  # the run sent the turn at 5 s to A after all (the polls lag)
    lagged = shoes_oracle(model, TIMES, TWICE, cooling, used)
    assert letters(lagged["path"], lo=4.0, hi=6.5) == "ab"



def test_shoes_oracle_learns_nothing_of_an_outage_from_a_held_window_that_runs_into_it():
    # A held window that starts before the second outage and runs on into it: the plan made
    # at the first outage sees it only up to the second's start, so it does not pre-warm B.
    model = two_outage_model()
    used = used_as_an_order_router()
    runs_on = shoes_oracle(model, TIMES, TWICE, {"a": [(13.5, 17.5)]}, used)
    unheld = shoes_oracle(model, TIMES, TWICE, {}, used)
    assert letters(runs_on["path"], lo=4.0, hi=14.0) == "a" * 9
    assert runs_on["path"] == unheld["path"]


# -- the no-foresight bound (the in-shoes oracle with no held windows) and the closable gap

def test_closable_gap_closed_is_the_share_of_the_gap_above_the_no_foresight_bound():
    # off / oracle 1.2, bound 1.1: the closable gap is 0.1
    assert closable_gap_closed(1.2, 1.1, 1.1) == pytest.approx(1.0)  # down to the bound
    assert closable_gap_closed(1.2, 1.15, 1.1) == pytest.approx(0.5)
    assert closable_gap_closed(1.2, 1.2, 1.1) == pytest.approx(0.0)
    assert closable_gap_closed(1.2, 1.25, 1.1) == pytest.approx(-0.5)  # wider than off
    assert closable_gap_closed(1.2, 1.05, 1.1) == pytest.approx(1.5)  # below the bound
    assert closable_gap_closed(1.1, 1.05, 1.1) is None  # nothing closable
    assert closable_gap_closed(1.05, 1.0, 1.1) is None
    assert closable_gap_closed(None, 1.0, 1.1) is None
    assert closable_gap_closed(1.2, None, 1.1) is None
    assert closable_gap_closed(1.2, 1.1, None) is None


def test_no_foresight_bound_is_the_unheld_in_shoes_oracle_and_never_below_the_clairvoyant():
    model = two_outage_model()
    clairvoyant = model.oracle(TIMES, [usable_at(TWICE, EPS, t) for t in TIMES])
    bound = no_foresight_bound(model, TIMES, TWICE, clairvoyant["path"])
    # The clairvoyant oracle keeps B's cache warm between the outages (one turn on B at 5 s,
    # read again when A fails at 14 s); without foresight, A all along between the two.
    assert letters(clairvoyant["path"]) == "aabbbaaaaaaaabbaa"
    assert letters(bound["path"]) == "aabbaaaaaaaaabbaa"
    assert bound["usd"] > clairvoyant["usd"]
    assert bound["usd"] == pytest.approx(model.reprice(bound["path"], TIMES)[0])
    assert all(j in usable_at(TWICE, EPS, t) for j, t in zip(bound["path"], TIMES))
    # It is the oracle in the shoes of a run that never held anything cooling.
    unheld = shoes_oracle(model, TIMES, TWICE, {}, used_as_an_order_router())
    assert bound["path"] == unheld["path"] and bound["usd"] == pytest.approx(unheld["usd"])
    # It bounds planning without foresight, not luck: a run held cooling on A until 6.5 s
    # stays on B at 5 and 6 s, which keeps B's cache warm for the second outage.
    used = used_as_an_order_router()
    used[4] = used[5] = 1
    lucky = shoes_oracle(model, TIMES, TWICE, {"a": [(2.0, 6.5)]}, used)
    assert clairvoyant["usd"] < lucky["usd"] < bound["usd"]


def probes_result(scenario: str, off: float, on: float, bound: float) -> dict:
    """A scenario's result as analyse() reports it, with an oracle of $1 (ratios = dollars)."""
    off_on = gap_closed(off, on)
    return {"scenario": scenario, "oracle_usd": 1.0, "router_usd": off, "router_vs_oracle": off,
            "router_vs_order": 0.9, "probe_usd": on, "probe_vs_oracle": on, "probe_vs_shoes": 1.0,
            "probe_gap_closed": off_on, "no_foresight_usd": bound,
            "no_foresight_vs_oracle": bound,
            "closable_gap_closed": closable_gap_closed(off, on, bound),
            "outages_applied": [{"endpoint": "a", "what": "on"}]}


def test_probes_table_and_targets_show_the_no_foresight_bound():
    results = [probes_result("overload-2m", 1.12, 1.027, 1.0),
               probes_result("overload-twice", 1.2, 1.123, 1.119),
               probes_result("lucky", 1.1, 1.08, 1.15)]
    lines = probes_table(results).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[-3:] == ["gap closed", "no-foresight bound / oracle", "closable gap closed"]
    assert lines[1].count("|") == lines[0].count("|")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[2:]}
    assert rows["overload-2m"][-3:] == ["78%", "1.000", "78%"]
    assert rows["overload-twice"][-3:] == ["38%", "1.119", "95%"]
    assert rows["lucky"][-3:] == ["20%", "1.150", "n/a (nothing closable)"]
    got = targets(results)
    assert "ok probes close >= half the gap to the oracle (78%)" in got[0]
    assert "foresight" not in got[0]
    assert ("MISSED probes close >= half the gap to the oracle (38%), 95% of the closable gap "
            "(the rest needs foresight: bound 1.119)") in got[1]
    assert ("MISSED probes close >= half the gap to the oracle (20%), nothing closable "
            "(the rest needs foresight: bound 1.150)") in got[2]
