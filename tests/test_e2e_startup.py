"""Starting the real mitmdump: the example config loads, bad option values are refused."""

import subprocess

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
