"""The bench's --tiers phase (claude_router_dev.bench_tiers): the shares, the claims, the two
router.yaml files, the table, the arguments and the dispatch from ./scripts/bench, and one tiny
run through real mitmdumps and the mock relay, the router beside ee65710 (the commit before
tiers). No timing is asserted."""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from claude_router_dev import bench, bench_tiers, harness


def test_shares_are_each_endpoints_count_and_percentage():
    assert bench_tiers.shares({"a": 103, "b": 97, "other": 5}, ["a", "b"]) == {
        "a": {"count": 103, "percent": 51.5}, "b": {"count": 97, "percent": 48.5}}
    assert bench_tiers.shares({"a": 200}, ["a", "b"])["b"] == {"count": 0, "percent": 0.0}
    assert bench_tiers.shares({}, ["a", "b"])["a"]["percent"] == 0.0  # nothing counted


def test_fair_is_50_plus_or_minus_7_percent_each():
    def share(a: int, b: int) -> dict:
        return bench_tiers.shares({"a": a, "b": b}, ["a", "b"])
    assert bench_tiers.fair(share(100, 100)) and bench_tiers.fair(share(114, 86))
    assert not bench_tiers.fair(share(115, 85)) and not bench_tiers.fair(share(200, 0))
    assert not bench_tiers.fair({})


def test_within_caps_looks_only_at_capped_endpoints():
    assert bench_tiers.within_caps({"a": 4, "b": 3, "c": 24}, {"a": 4, "b": 4})
    assert not bench_tiers.within_caps({"a": 5, "b": 0}, {"a": 4, "b": 4})
    assert bench_tiers.within_caps({}, {"a": 4})


def test_the_router_gets_weight_and_max_concurrency_and_today_the_same_endpoints_without():
    cap = next(s for s in bench_tiers.scenarios(4) if s.name == "cap")
    assert cap.names == ["a", "b", "c"] and cap.caps == {"a": 4, "b": 4}
    urls = {"a": "http://m/a", "b": "http://m/b", "c": "http://m/c"}
    router = bench_tiers.config_yaml(cap, urls, tiers=True)
    today = bench_tiers.config_yaml(cap, urls, tiers=False)
    assert "    weight: 1\n    max_concurrency: 4\n" in router
    assert "weight" not in today and "max_concurrency" not in today
    strip = [ln for ln in router.splitlines() if "weight" not in ln and "max_concurrency" not in ln]
    assert strip == today.splitlines()  # otherwise the very same endpoints and prices
    assert "price: {input: 3.3, output: 16.5}" in today  # c is dearer
    assert bench_tiers.mock_name("today", "cap", "a") == "today-cap-a"


def test_a_stream_summary_counts_failures_by_kind_and_busy_skips():
    recs = [{"ok": True, "seconds": 1.0, "error": None, "busy": 2},
            {"ok": True, "seconds": 3.0, "error": None, "busy": 0},
            {"ok": False, "seconds": 0.1, "error": "HTTP 429", "busy": 0}]
    s = bench_tiers.stream_summary(recs)
    assert (s["n"], s["failed"], s["errors"], s["busy_skips"]) == (3, 1, {"HTTP 429": 1}, 2)
    assert (s["p50_s"], s["max_s"]) == (2.0, 3.0)  # of the whole answers only
    assert bench_tiers.stream_summary([recs[2]])["p50_s"] is None


def results() -> dict:
    def streams(peak, served, failed=0):
        return {"peak": peak, "served": served, "failed": failed, "errors": {"HTTP 429": failed} if failed else {},
                "wall_s": 1.5, "p50_s": 1.25, "max_s": 1.5, "busy_skips": 3}
    return {
        "labels": {"router": "router (abc1234)", "today": "today (ee65710)"},
        "settings": {"sessions": 200, "streams": 32},
        "scenarios": [
            {"name": "spread", "title": "weights 1:1", "endpoints": ["a", "b"], "caps": {},
             "sessions": True, "streams": True, "targets": {
                 "router": {"status": "ok", "sessions": {
                     "share": bench_tiers.shares({"a": 100, "b": 100}, ["a", "b"]), "failed": 0},
                     "streams": streams({"a": 16, "b": 16}, {"a": 16, "b": 16})},
                 "today": {"status": "ok", "sessions": {
                     "share": bench_tiers.shares({"a": 200}, ["a", "b"]), "failed": 0},
                     "streams": streams({"a": 32}, {"a": 32})}}},
            {"name": "wait", "title": "capped", "endpoints": ["a", "b"], "caps": {"a": 4, "b": 4},
             "sessions": False, "streams": True, "targets": {
                 "router": {"status": "ok", "streams": streams({"a": 4, "b": 4}, {"a": 16, "b": 16})},
                 "today": {"status": "failed: exited with 1"}}}]}


def test_the_table_puts_the_router_beside_today_with_issue_22s_claims():
    table = bench_tiers.render(results())
    lines = table.splitlines()
    assert lines[0] == "| scenario | measured | router (abc1234) | today (ee65710) | issue 22's claim |"
    assert ("| spread: weights 1:1 | 200 new sessions, served by a / b | 100 (50.0 %) / 100 (50.0 %) "
            "| 200 (100.0 %) / 0 (0.0 %) | each 50 ± 7 %: router yes, today no |") in lines
    assert ("|  | 32 streams at once: peak in flight at the mock, a / b | 4 / 4 | – "
            "| at most 4 / 4 at a / b: router yes, today – |") in lines
    assert "|  | streams failed (client-visible) | 0 | 0 | nothing fails: router yes, today yes |" in lines
    assert "| wait: capped | status | ok | failed: exited with 1 |  |" in lines
    assert ("|  | wall time; p50 / max of the whole answers | 1.50 s; 1.25 s / 1.50 s "
            "| 1.50 s; 1.25 s / 1.50 s |  |") in lines
    assert all(ln.count("|") == 6 for ln in lines)  # every row has every column


def test_the_arguments():
    a = bench_tiers.parse_args([])
    assert (a.baseline, a.sessions, a.streams, a.cap) == ("ee65710", 200, 32, 4)
    for bad in (["--sessions", "0"], ["--streams", "-1"], ["--cap", "0"], ["--baseline", " "]):
        with pytest.raises(SystemExit):
            bench_tiers.parse_args(bad)


def test_scripts_bench_tiers_goes_to_the_tiers_phase_with_its_own_options(monkeypatch):
    seen = []
    monkeypatch.setattr(bench_tiers, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["--tiers", "--streams", "8"]) == 0
    assert seen == [["--streams", "8"]]


def test_an_unknown_ref_stops_the_tiers_bench_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setattr(bench, "Procs", None)  # nothing may be started
    assert bench.main(["--tiers", "--baseline", "no-such-ref-for-the-bench"]) == 2
    assert capsys.readouterr().err.startswith("bench: --baseline no-such-ref-for-the-bench: no such commit")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_tiny_run_shows_the_router_spreading_and_capping_and_today_not(tmp_path, capsys):
    try:
        bench.resolve_ref(bench_tiers.DEFAULT_BASELINE)
    except ValueError:
        pytest.skip(f"{bench_tiers.DEFAULT_BASELINE} is not in this checkout's history")
    out = tmp_path / "tiers.json"
    assert bench_tiers.main(["--sessions", "10", "--streams", "6", "--cap", "1", "--words", "3",
                             "--gap-ms", "30", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "each 50 ± 7 %: router yes, today no" in table
    assert table.count("at most 1 / 1 at a / b: router yes") == 3  # c behind, nothing, relays' limit
    assert table.count("nothing fails: router yes") == 4
    res = json.loads(out.read_text())
    assert res["table_markdown"] == table.rstrip("\n") + "\n"
    spread, cap, wait, limit = res["scenarios"]
    assert spread["targets"]["router"]["sessions"]["served"] == {"a": 5, "b": 5}
    assert spread["targets"]["today"]["sessions"]["served"] == {"a": 10, "b": 0}
    assert limit["targets"]["router"]["streams"]["refused"] == {"a": 0, "b": 0}
    for sc in (cap, wait, limit):  # each stream sent once: waiting is not retrying
        assert sum(sc["targets"]["router"]["streams"]["served"].values()) == 6
        assert sc["targets"]["today"]["streams"]["served"]["a"] == 6  # today: all tried on a first


def test_the_mocks_max_inflight_refuses_one_more_with_a_429_and_does_not_count_it():
    mock = harness.start_mock()
    try:
        mock.fault("r", max_inflight=1, event_gap_ms=400, words=10)  # held about 6 s (busy machines)
        body = {"model": "m", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(httpx.post, mock.url("r") + "/v1/messages", json=body, timeout=60)
            deadline = time.monotonic() + 20
            while mock.inflight()["now"].get("r") != 1:  # the first is being served
                assert time.monotonic() < deadline and not held.done()
                time.sleep(0.02)
            r = httpx.post(mock.url("r") + "/v1/messages", json=body, timeout=10)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            assert r.json()["error"]["message"] == "Mock relay: at most 1 requests at once"
            assert [q["outcome"] for q in mock.requests("r")] == ["pending", "429"]
            assert mock.inflight()["peak"]["r"] == 1
            assert held.result().status_code == 200
    finally:
        mock.stop()
