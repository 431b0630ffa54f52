"""End to end with the real Claude Code CLI: `claude -p` through a real mitmdump (reverse mode)
to the mock relay, with the base URL at the router's root and pinned to a tier (`/droid`).

The CLI is found through CLAUDE_CODE_BIN, or as `claude` on PATH; without it these tests are
skipped (`npm install @anthropic-ai/claude-code`, then CLAUDE_CODE_BIN=.../node_modules/.bin/claude).
Each run gets an empty HOME and working directory, and an environment built from scratch: no
proxy variables, no real ~/.claude, and no traffic beyond the router (telemetry, error reports,
auto-update and other non-essential calls are switched off). (The `HEAD <base URL>/api/hello`
pre-connect of Claude Code 2.1.332 is answered by the router itself: test_e2e_claims.py.)
"""

import json
import os
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

CLI_TIMEOUT = 45  # seconds for one `claude -p` run; a normal run takes 1-3 s
KEY = "sk-e2e-dummy-key"
QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_MAX_RETRIES": "1",  # a broken route should fail the test fast, not in minutes
}


@pytest.fixture(scope="module")
def claude(tmp_path_factory) -> str:
    """The CLI's path; skips when it is not installed."""
    explicit = os.environ.get("CLAUDE_CODE_BIN")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            pytest.fail(f"CLAUDE_CODE_BIN={explicit} is not an executable file")
        path = explicit
    else:
        path = shutil.which("claude")
        if path is None:
            pytest.skip("Claude Code CLI not installed: set CLAUDE_CODE_BIN or put `claude` on PATH "
                        "(npm install @anthropic-ai/claude-code)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                                 env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                      "HOME": str(tmp_path_factory.mktemp("claude-home"))})
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"{path} --version failed: {e}")
    assert version.returncode == 0 and "Claude Code" in version.stdout, (
        f"{path} is not a working Claude Code CLI: {version.stdout!r} {version.stderr!r}")
    return path


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def run_claude(claude: str, tmp: Path, prompt: str, env: dict | None = None,
               settings_env: dict | None = None) -> dict:
    """`claude -p PROMPT --output-format json` with a fresh HOME; returns the parsed result.
    `env` goes into the process environment, `settings_env` into ~/.claude/settings.json's
    `env` block (what the VS Code extension reads too)."""
    home = tmp / "home"
    work = tmp / "work"
    (home / ".claude").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    if settings_env is not None:
        (home / ".claude" / "settings.json").write_text(json.dumps({"env": settings_env}))
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
               "TMPDIR": str(tmp / "tmp"), "TERM": "dumb", "LANG": "C.UTF-8", **QUIET, **(env or {})}
    try:
        done = subprocess.run([claude, "-p", prompt, "--output-format", "json"], cwd=work,
                              env=environ, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"claude -p did not finish within {CLI_TIMEOUT} s; output: {e.stdout!r} {e.stderr!r}")
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert done.returncode == 0 and lines, f"claude exited {done.returncode}: {done.stdout!r} {done.stderr!r}"
    result = json.loads(lines[-1])
    assert result.get("is_error") is False, f"claude reported an error: {result}"
    return result


def served(router) -> dict[str, int]:
    with urllib.request.urlopen(f"{router.base}/_router/status", timeout=10) as r:
        doc = json.load(r)
    return {e["name"]: e["served"] for e in doc["endpoints"]}


def log_lines(router, tier_path: str) -> list[dict]:
    """The router's one-JSON-line-per-request records for Messages calls (waits for the first)."""
    router.wait_log(f'"path": "{tier_path}/v1/messages"')
    return [json.loads(line.split("router: ", 1)[1]) for line in router.log().splitlines()
            if "router: {" in line and f'"path": "{tier_path}/v1/messages"' in line]


def assert_messages_only(records: list[dict], credential: tuple[str, str] = ("x-api-key", KEY)) -> None:
    """What Claude Code sent upstream: Messages calls with the client's key, and nothing else.
    Its start-up `HEAD` of the base URL (sent by 2.1.197, not by 2.1.332 in `-p` mode) is
    answered by the router and never forwarded."""
    assert records
    for rec in records:
        assert (rec["method"], rec["path"], rec["query"]) == ("POST", "/v1/messages", "beta=true"), rec
        headers = {k.lower(): v for k, v in rec["headers"]}
        assert headers.get(credential[0]) == credential[1]
        assert headers.get("user-agent", "").startswith("claude-cli/")


@pytest.mark.parametrize("variable, header, value", [
    ("ANTHROPIC_API_KEY", "x-api-key", KEY),
    ("ANTHROPIC_AUTH_TOKEN", "authorization", f"Bearer {KEY}"),
], ids=["api-key", "auth-token"])
def test_root_base_url_is_served_by_the_cheapest_endpoint(claude, mock, start_router, tmp_path,
                                                          variable, header, value):
    router = start_router(tiers(mock, "aws", "droid", "ultra"))
    nonce = uuid.uuid4().hex[:12]
    result = run_claude(claude, tmp_path, f"say hi {nonce}",
                        env={"ANTHROPIC_BASE_URL": router.base, variable: KEY})
    assert result["result"].startswith("Hello from aws. You said: "), result["result"]
    assert nonce in result["result"]
    assert_messages_only(mock.requests("aws"), (header, value))
    assert mock.count("droid") == mock.count("ultra") == 0
    (line, *_) = log_lines(router, "")
    assert (line["endpoint"], line["attempts"], line["status"]) == ("aws", "aws:200", 200)
    counts = served(router)
    assert counts["aws"] >= 1 and counts["droid"] == counts["ultra"] == 0


@pytest.mark.parametrize("where", ["env", "settings.json"])
def test_droid_base_url_pins_the_droid_tier(claude, mock, start_router, tmp_path, where):
    router = start_router(tiers(mock, "aws", "droid", "ultra"))
    nonce = uuid.uuid4().hex[:12]
    config = {"ANTHROPIC_BASE_URL": f"{router.base}/droid", "ANTHROPIC_API_KEY": KEY}
    if where == "env":
        result = run_claude(claude, tmp_path, f"say hi {nonce}", env=config)
    else:
        result = run_claude(claude, tmp_path, f"say hi {nonce}", settings_env=config)
    assert result["result"].startswith("Hello from droid. You said: "), result["result"]
    assert nonce in result["result"]
    assert mock.count("aws") == 0  # the cheaper tier got nothing, not even the HEAD
    assert mock.count("ultra") == 0
    assert_messages_only(mock.requests("droid"))  # the /droid prefix was removed
    (line, *_) = log_lines(router, "/droid")
    assert (line["endpoint"], line["attempts"], line["status"]) == ("droid", "droid:200", 200)
    counts = served(router)
    assert counts["droid"] >= 1 and counts["aws"] == counts["ultra"] == 0


def test_pinned_tier_fails_over_to_the_pricier_one_first(claude, mock, start_router, tmp_path):
    mock.fault("droid", status=529)
    router = start_router(tiers(mock, "aws", "droid", "ultra"))
    result = run_claude(claude, tmp_path, "say hi",
                        env={"ANTHROPIC_BASE_URL": f"{router.base}/droid", "ANTHROPIC_API_KEY": KEY})
    assert result["result"].startswith("Hello from ultra. You said: "), result["result"]
    assert mock.count("aws") == 0
    assert mock.count("droid") >= 1
    assert_messages_only(mock.requests("ultra"))
    (line, *_) = log_lines(router, "/droid")
    assert (line["endpoint"], line["attempts"]) == ("ultra", "droid:529, ultra:200")
