"""Starting the real mitmdump: the example config loads, bad option values are refused, the
open files limit fits a thousand streams."""

import re
import resource
import subprocess
from pathlib import Path

import pytest

from conftest import MITMDUMP, ROOT


def test_example_config_is_a_valid_mitmproxy_config(start_router):
    router = start_router([], config=ROOT / "mitmproxy.conf.example")
    router.wait_log("4 endpoints in price order (0:aws, 1:droid, 2:ultra, 3:claude)")


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


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if ln.startswith("Max open files"))
    soft, hard = re.findall(r"\d+|unlimited", line)[:2]
    return int(soft), int(hard) if hard != "unlimited" else resource.RLIM_INFINITY


def test_a_router_started_under_a_low_soft_limit_raises_it_to_the_hard_one(start_router):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    router = start_router([], preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    router.wait_log("no endpoints configured")  # running: the limit is raised by then
    raised = open_files_limit(router.proc.pid)[0]
    if hard == resource.RLIM_INFINITY:
        assert raised > 256  # up to the kernel's ceiling (fs.nr_open)
    else:
        assert raised == min(hard, 1 << 20)
