"""Starting the real mitmdump: the example configs load, bad option values and bad config files
are refused in one line naming the option or the file and field, no endpoints at all is refused,
the open files limit fits a thousand streams; ./scripts/run refuses with no config and --init
writes one."""

import os
import re
import resource
import subprocess
from pathlib import Path

import pytest

from conftest import MITMDUMP, ROOT

EXAMPLE_ENV = {"AWS_RELAY_KEY": "x", "DROID_RELAY_KEY": "y", "ROUTER_CLIENT_KEY": "z"}


def test_example_configs_start_together(start_router):
    """mitmproxy.conf.example (mitmproxy's options only) with router.example.yaml (the routing)."""
    router = start_router([], config=ROOT / "mitmproxy.conf.example", env=EXAMPLE_ENV,
                          options={"router_config": str(ROOT / "router.example.yaml")})
    router.wait_log("3 endpoints in price order (0:aws, 1:droid, 2:claude)")


def test_the_mitmproxy_example_holds_no_routing():
    text = (ROOT / "mitmproxy.conf.example").read_text()
    active = [ln.split(":")[0] for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert active and not [k for k in active if k.startswith("router_")], active
    assert "router.yaml" in text


def mitmdump(tmp_path, *settings: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The real entry point, as a user starts it: mitmdump -s addon/router.py --set ..."""
    args = [MITMDUMP, "-s", str(ROOT / "addon" / "router.py"), "--set", f"confdir={tmp_path}",
            "--listen-host", "127.0.0.1", "--listen-port", "0"]
    for s in settings:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def one_line_refusal(result: subprocess.CompletedProcess) -> str:
    """The refusal: mitmdump exits 1 and says why in one line, with no traceback."""
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and 'File "' not in out, out
    return out


def test_no_endpoints_refuses_to_start_and_says_what_to_do(tmp_path):
    out = one_line_refusal(mitmdump(tmp_path))
    line = next(ln for ln in out.splitlines() if "no endpoints configured" in ln)
    assert "./scripts/run --demo" in line and "./scripts/run --init" in line and "router_config" in line


@pytest.mark.parametrize(
    "setting, message",
    [
        ("router_endpoints=nonsense", "router_endpoints: expected NAME=URL"),
        ("router_endpoints=a=ftp://x", "URL must be http:// or https://"),
        ("router_cooldown=0", "router_cooldown must be at least 1, got 0"),
        ("router_max_failures=-2", "router_max_failures must be at least 1, got -2"),
        ("router_stream_timeout=1.5", "router_stream_timeout: not an integer: 1.5"),
        ("router_cooldown=abc", "router_cooldown: not an integer: abc"),
    ],
)
def test_bad_option_values_stop_startup_with_a_clear_message(tmp_path, setting, message):
    result = subprocess.run(
        [MITMDUMP, "-s", str(ROOT / "addon" / "router.py"), "--set", f"confdir={tmp_path}",
         "--listen-port", "0", "--set", setting],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if ln.startswith("Max open files"))
    soft, hard = re.findall(r"\d+|unlimited", line)[:2]
    return int(soft), int(hard) if hard != "unlimited" else resource.RLIM_INFINITY


def test_a_router_started_under_a_low_soft_limit_raises_it_to_the_hard_one(start_router):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    router = start_router(["a=http://127.0.0.1:9/a"],
                          preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    router.wait_log("endpoints in price order")  # running: the limit is raised by then
    raised = open_files_limit(router.proc.pid)[0]
    if hard == resource.RLIM_INFINITY:
        assert raised > 256  # up to the kernel's ceiling (fs.nr_open)
    else:
        assert raised == min(hard, 1 << 20)


ENDPOINT = "endpoints:\n  - name: a\n    url: http://127.0.0.1:9/a\n"


@pytest.mark.parametrize("text, field, problem", [
    (ENDPOINT + "health:\n  cooldown: -5\n", "health.cooldown", "must be at least 1, got -5"),
    (ENDPOINT + "health:\n  coldown: 5\n", "health.coldown", "unknown field (did you mean cooldown?)"),
    (ENDPOINT + "  - name: b\n    url: http://127.0.0.1:9/b\n    prise: {input: 1}\n",
     "endpoints[1].prise", "unknown field (did you mean price?)"),
    (ENDPOINT + "polcy:\n  deadline: 5\n", "polcy", "unknown section (did you mean policy?)"),
    (ENDPOINT + "timeouts:\n  stream: 1.5\n", "timeouts.stream", "must be a whole number, got 1.5"),
    ("endpoints: []\n", "endpoints", "a non-empty list of endpoints is required"),
    ("endpoints: [\n", "line 2", "not valid YAML"),
])
def test_a_bad_router_yaml_is_refused_in_one_line_naming_file_and_field(tmp_path, text, field, problem):
    (tmp_path / "router.yaml").write_text(text)
    out = one_line_refusal(mitmdump(tmp_path, "router_config=router.yaml"))
    assert f"router: router.yaml: {field}: {problem}\n" in out, out


def test_a_misspelt_option_gets_a_did_you_mean(tmp_path):
    out = one_line_refusal(mitmdump(tmp_path, "router_endpoints=a=http://127.0.0.1:9/a", "router_cooldwn=5"))
    assert "router: no such option router_cooldwn (did you mean router_cooldown?)" in out, out


# -- ./scripts/run, before any virtualenv is touched -----------------------------------------

def run_script(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """./scripts/run with a HOME of its own (no ~/.mitmproxy/config.yaml) from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()} | {"HOME": str(cwd)}
    return subprocess.run([str(ROOT / "scripts" / "run"), *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd, env=env)


def test_run_with_no_config_refuses_and_says_what_to_do(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no endpoints configured" in lines[0], result.stderr
    assert "--demo" in lines[0] and "--init" in lines[0]


def test_run_init_writes_a_starter_router_yaml_and_never_overwrites_it(tmp_path):
    result = run_script(tmp_path, "--init")
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "router.yaml").read_text()
    assert written.endswith((ROOT / "router.example.yaml").read_text())
    assert "router.yaml" in result.stdout and "scripts/run" in result.stdout
    (tmp_path / "router.yaml").write_text("mine\n")
    again = run_script(tmp_path, "--init")
    assert again.returncode == 1 and "exists" in again.stderr
    assert (tmp_path / "router.yaml").read_text() == "mine\n"


def test_run_help_says_router_yaml_is_picked_up(tmp_path):
    result = run_script(tmp_path, "--help")
    assert result.returncode == 0
    assert "./router.yaml" in result.stdout and "--init" in result.stdout
