"""Smoke test of the cost simulator: one quick scenario end to end (mock relay, two real
mitmdump routers, the oracle). It checks the run completes and prints its table; it asserts
nothing about the costs themselves (scripts/costsim reports those)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
