"""./scripts/status (claude_router.cli.status): a table that tells the truth. Family and
client-key cooldowns show on their endpoint (never as plain "healthy"), the last error is whole,
the columns are explained, no secret appears, and with no router it says where it looked and
how to start one. Real mitmdump, the mock relay and redis-server where the router is involved."""

import json
import os
import subprocess
import sys

import httpx

from claude_router.status import LEGEND, table
from conftest import free_port
from streams import STREAM_MSG

STATUS = [sys.executable, "-m", "claude_router.cli.status"]
OPUS = "claude-opus-4-1-20250805"
HI = [{"role": "user", "content": "hi"}]
AWS_KEY = "sk-aws-upstream-9c8b7a"


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*STATUS, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "160", "ROUTER_CLIENT_KEY": ""})


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.split()[1:2] == [name])


def words(text: str) -> str:
    return " ".join(text.split())


def configured(start_router, mock, tmp_path, redis_url: str):
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"""
endpoints:
  - name: aws
    url: {mock.url('aws')}
    key: {AWS_KEY}
    price: {{input: 1.0, output: 5.0}}
  - name: droid
    url: {mock.url('droid')}
    key: sk-droid-upstream-1d2e3f
""")
    router = start_router([], options={"router_config": str(cfg), "router_redis_url": redis_url})
    router.wait_log("(connected)")
    return router


def test_a_cooling_family_shows_on_its_endpoint_not_healthy(mock, start_router, tmp_path, redis_server):
    mock.profile("aws", family_limits={"opus": {"status": 429, "retry_after": 30}})
    router = configured(start_router, mock, tmp_path, redis_server.url)
    r = httpx.post(f"{router.base}/v1/messages", json={"model": OPUS, "max_tokens": 16, "messages": HI},
                   headers={"x-api-key": "client"}, timeout=30)
    assert r.headers["x-router-attempts"] == "aws:429, droid:200"

    out = status("--url", router.base)
    assert out.returncode == 0, out.stderr
    aws = row(out.stdout, "aws")
    assert "partly cooling" in aws and "healthy" not in aws
    assert "opus 2" in aws or "opus 3" in aws  # "opus 29.8s": the family and its time left
    assert "healthy" in row(out.stdout, "droid")
    assert "Columns of the endpoint table:" in out.stdout and "cooling for" in out.stdout

    shared = status("--redis", redis_server.url)  # the same truth from the shared health
    assert shared.returncode == 0, shared.stderr
    aws = row(shared.stdout, "aws")
    assert "partly cooling" in aws and "opus" in aws
    assert "~" not in shared.stdout  # the family's own health entry is no row of its own
    for text in (out.stdout, shared.stdout, status("--json", "--url", router.base).stdout):
        assert AWS_KEY not in text and "sk-droid-upstream" not in text


def test_client_key_cooldowns_are_counted_never_shown(mock, start_router, redis_server):
    mock.fault("aws", status=401, key="bad-key-4f5e6d")
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"],
                          options={"router_redis_url": redis_server.url})
    router.wait_log("(connected)")
    r = httpx.post(f"{router.base}/v1/messages", json={"model": OPUS, "max_tokens": 16, "messages": HI},
                   headers={"x-api-key": "bad-key-4f5e6d"}, timeout=30)
    assert r.headers["x-router-attempts"].startswith("aws:401")
    for args in (("--url", router.base), ("--redis", redis_server.url)):
        out = status(*args)
        assert out.returncode == 0, out.stderr
        aws = row(out.stdout, "aws")
        assert "partly cooling" in aws and "1 client key" in aws, out.stdout
        assert "bad-key" not in out.stdout and "@" not in out.stdout


def test_the_last_error_is_whole(mock, start_router):
    mock.fault("aws", reset="mid_stream", reset_after_events=4)
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"])
    httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30)
    doc = json.loads(status("--json", "--url", router.base).stdout)
    error = next(e["last_error"] for e in doc["endpoints"] if e["name"] == "aws")
    assert len(error) > 40, error  # longer than the table used to show
    out = status("--url", router.base)
    assert words(error) in words(out.stdout), out.stdout


def test_a_long_error_wraps_in_a_narrow_table_and_loses_nothing():
    error = ("mid-stream: " + " ".join(f"word{i}" for i in range(60))
             + " " + "x" * 90)  # a word longer than a line is split, not dropped
    doc = {"store": "memory", "endpoints": [{
        "index": 0, "name": "aws", "state": "failing", "consecutive_failures": 1,
        "cooldown_seconds_left": 0, "served": 1, "failures": 1,
        "tokens": {"input_tokens": 1, "output_tokens": 2}, "cost_usd": 0.0, "last_error": error}]}
    text = table(doc, width=80, legend=False)
    lines = text.splitlines()
    assert len(lines) > 4 and "Columns" not in text
    assert "".join(text.split()).count("".join(error.split())) == 1
    assert "".join(words(text).split()).endswith("x" * 90)


def test_the_legend_explains_every_column():
    text = table({"store": "memory", "endpoints": [{
        "index": 0, "name": "aws", "state": "healthy", "consecutive_failures": 0,
        "cooldown_seconds_left": 0, "served": 0, "failures": 0, "tokens": {}, "cost_usd": 0.0}]})
    header = text.splitlines()[1]
    for name, _ in LEGEND:
        assert name in header and f"  {name} " in text.split("Columns of the endpoint table:")[1]


def test_no_router_names_the_url_it_tried_and_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}"
    out = status("--url", url)
    assert out.returncode == 1 and out.stdout == ""
    assert f"{url}/_router/status" in out.stderr
    assert "./scripts/run --demo" in out.stderr and "./scripts/run " in out.stderr
    assert "Traceback" not in out.stderr
