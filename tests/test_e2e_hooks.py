"""Other mitmproxy scripts run beside the router and get their events as without it (the
router delivers mitmproxy's events through its hook index), through a real mitmdump."""

import os
import time

import httpx
import pytest

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}

USER_SCRIPT = """
VERSION = {version}


def requestheaders(flow):
    flow.metadata["user_script"] = VERSION


def responseheaders(flow):
    flow.response.headers["x-user-script"] = f"{{VERSION}}:{{flow.metadata.get('user_script')}}"
"""


def write_script(path, version: int) -> None:
    """Atomically (mitmproxy's watcher must never read a half-written file), with a new mtime
    even within the file system's resolution."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(USER_SCRIPT.format(version=version))
    later = time.time() + version
    os.utime(tmp, (later, later))
    os.replace(tmp, path)


@pytest.mark.parametrize("index", ["true", "false"])
def test_another_script_sees_every_routed_flow_streamed_or_not(mock, start_router, tmp_path, index):
    user = tmp_path / "user_script.py"
    write_script(user, 1)
    router = start_router([f"aws={mock.url('aws')}"], scripts=(user,),
                          options={"router_hook_index": index})
    r = httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)
    assert r.status_code == 200 and r.headers["x-user-script"] == "1:1"
    with httpx.stream("POST", f"{router.base}/v1/messages", json={**MSG, "stream": True},
                      timeout=30) as s:
        assert s.headers["x-user-script"] == "1:1" and s.headers["x-used-endpoint"] == "aws"
        assert "message_stop" in s.read().decode()


def test_an_edited_script_is_reloaded_and_gets_the_next_requests(mock, start_router, tmp_path):
    user = tmp_path / "user_script.py"
    write_script(user, 1)
    router = start_router([f"aws={mock.url('aws')}"], scripts=(user,))
    assert httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30).headers["x-user-script"] == "1:1"
    write_script(user, 2)
    deadline = time.monotonic() + 15
    seen = []
    while time.monotonic() < deadline:
        r = httpx.post(f"{router.base}/v1/messages", json=MSG, timeout=30)
        assert r.status_code == 200
        seen.append(r.headers["x-user-script"])
        if seen[-1] == "2:2":
            break
        time.sleep(0.2)
    # the old version until the reload, then the new one for both hooks; a request on its way
    # during the reload gets its later hook from the new version, as mitmproxy delivers it
    assert seen[-1] == "2:2" and set(seen) <= {"1:1", "2:1", "2:2"}
