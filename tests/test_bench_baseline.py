"""The bench's --baseline REF pieces (claude_router_dev.bench): resolving REF, extracting the addon of
a commit, the import probe and its check, the argument, and the comparison line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from claude_router_dev import bench

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t",
                           "-c", "commit.gpgsign=false", *argv],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository of two commits: one without the addon, then one with it."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    (r / "README").write_text("no addon yet\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "first")
    (r / "addon" / "claude_router").mkdir(parents=True)
    (r / "addon" / "router.py").write_text("from claude_router.addon import Router\n")
    (r / "addon" / "claude_router" / "__init__.py").write_text("VERSION = 'committed'\n")
    (r / "tests").mkdir()
    (r / "tests" / "test_x.py").write_text("")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "second")
    return r


def test_resolve_ref_gives_the_commit_and_its_short_sha(repo):
    sha, short = bench.resolve_ref("HEAD", repo)
    assert sha == git(repo, "rev-parse", "HEAD") and len(sha) == 40
    assert sha.startswith(short) and 4 <= len(short) < 40


@pytest.mark.parametrize("ref, why", [("no-such-ref", "no such commit"),
                                      ("HEAD~5", "no such commit"),
                                      ("--help", "not a git revision"),
                                      ("HEAD~1", "has no addon/router.py")])
def test_resolve_ref_refuses_in_one_line(repo, ref, why):
    with pytest.raises(ValueError) as e:
        bench.resolve_ref(ref, repo)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_extract_addon_takes_the_committed_addon_not_the_working_tree(repo, tmp_path):
    (repo / "addon" / "claude_router" / "__init__.py").write_text("VERSION = 'uncommitted'\n")
    (repo / "addon" / "claude_router" / "new.py").write_text("")  # untracked
    sha, _ = bench.resolve_ref("HEAD", repo)
    script = bench.extract_addon(sha, tmp_path / "out", repo)
    assert script == tmp_path / "out" / "addon" / "router.py" and script.is_file()
    pkg = tmp_path / "out" / "addon" / "claude_router"
    assert (pkg / "__init__.py").read_text() == "VERSION = 'committed'\n"
    assert not (pkg / "new.py").exists()
    assert not (tmp_path / "out" / "tests").exists()  # only addon/


def test_extract_addon_of_a_commit_without_it_fails_cleanly(repo, tmp_path):
    with pytest.raises(ValueError):
        bench.extract_addon(git(repo, "rev-parse", "HEAD~1"), tmp_path / "out", repo)


def test_the_import_probe_records_where_claude_router_came_from(tmp_path, monkeypatch):
    script, out = bench.write_probe(tmp_path / "probe")
    home = tmp_path / "copy" / "addon"
    fake = type(sys)("claude_router")
    fake.__file__ = str(home / "claude_router" / "__init__.py")
    for name in [m for m in sys.modules if m.startswith("claude_router.")]:
        monkeypatch.delitem(sys.modules, name)  # (other tests imported the real ones)
    monkeypatch.setitem(sys.modules, "claude_router", fake)
    ns: dict = {}
    exec(compile(Path(script).read_text(), script, "exec"), ns)
    ns["addons"][0].running()
    mods = json.loads(out.read_text())
    assert mods["claude_router"] == fake.__file__
    assert bench.imports_outside(mods, home) == []
    assert bench.imports_outside(mods, tmp_path / "elsewhere") == [
        f"claude_router from {fake.__file__}"]
    assert bench.imports_outside({"__mitmproxy_script__.router": "x"}, home) == [
        "no claude_router module"]


def test_the_baseline_argument():
    assert bench.parse_args([]).baseline is None
    a = bench.parse_args(["--quick", "--baseline", "HEAD~1"])
    assert a.baseline == "HEAD~1" and a.baseline_sha is None  # resolved by main()
    for other in (["--profile", "5"], ["--streams", "100"], ["--affinity"], ["--baseline", " "]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--baseline", "HEAD", *other] if other[0] != "--baseline" else other)


def test_an_unknown_ref_stops_the_bench_before_anything_starts(capsys, monkeypatch):
    monkeypatch.setattr(bench, "Procs", None)  # nothing may be started
    assert bench.main(["--baseline", "no-such-ref-for-the-bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench: --baseline no-such-ref-for-the-bench: no such commit")
    assert "\n" not in err


def test_the_baseline_column_sits_beside_router_and_the_comparison_line():
    targets = {n: {} for n in ("direct", "router", "mitmdump", "router@abc1234", "nginx")}
    assert bench.main_columns(targets) == ["direct", "mitmdump", "router", "router@abc1234", "nginx"]
    results = {
        "latency_ms": {"router": {"p50": 1.1, "p99": 2.0}, "router@abc1234": {"p50": 1.0, "p99": 2.5}},
        "sse_ms": {"router": {"ttfe": {"p50": 3.0}}, "router@abc1234": {"ttfe": {"p50": 3.0}}},
        "throughput": {"router": {"1": {"rps": 500.0}, "16": {"rps": 900.0}},
                       "router@abc1234": {"1": {"rps": 400.0}, "16": {"rps": 1000.0}}}}
    c = bench.baseline_comparison(results, "router@abc1234", [1, 16, 64])
    assert c["latency_p50_ms"]["ratio"] == pytest.approx(1.1)
    assert c["rps"]["64"] == {"router": None, "baseline": None, "ratio": None}
    line = bench.render_baseline(c, "ok", "HEAD~1")
    assert line.startswith("router vs router@abc1234 (HEAD~1): p50 1.10 ms vs 1.00 ms (1.10×), "
                           "p99 2.00 ms vs 2.50 ms (0.80×), SSE first event p50 3.00 ms vs 3.00 ms "
                           "(1.00×); req/s at c=1/16/64: 500/900/– vs 400/1000/– (1.25×/0.90×/–)")
    failed = bench.render_baseline(c, "failed: exited with code 1; log: boom", "HEAD~1")
    assert failed == ("router vs router@abc1234 (HEAD~1): no comparison, router@abc1234 (HEAD~1) "
                      "failed: exited with code 1; log: boom")
