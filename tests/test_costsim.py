"""Smoke test of the cost simulator: one quick scenario end to end (mock relay, two real
mitmdump routers, the oracle). It checks the run completes and prints its table; it asserts
nothing about the costs themselves (scripts/costsim reports those)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_costsim_quick_scenario_prints_the_table(tmp_path):
    out_json = tmp_path / "costsim.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "costsim.py"), "--quick", "--scenario",
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
    doc = json.loads(out_json.read_text())
    (result,) = doc["results"]
    for run in ("cost", "order"):
        r = result["runs"][run]
        assert r["client_errors"] == 0 and r["turns_answered"] > 0
