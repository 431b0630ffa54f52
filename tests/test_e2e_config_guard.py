"""A key that would split the header it travels in stops the real mitmdump at start-up, with a
message naming the field and never the key."""

import pytest

KEY = "sk-guard-upstream-4d5e6f"


def test_key_with_crlf_stops_startup_naming_field_not_key(mock, start_router, tmp_path):
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"endpoints:\n  - name: aws\n    url: {mock.url('aws')}\n"
                   f"  - name: droid\n    url: {mock.url('droid')}\n    key: env:DROID_KEY\n")
    router = start_router([], options={"router_config": str(cfg)}, wait=False,
                          env={"DROID_KEY": f"{KEY}\r\nX-Injected: yes"})
    assert router.proc.wait(20) != 0
    log = router.log()
    assert f"{cfg}: endpoints[1] (droid).key: contains a control character" in log
    assert KEY not in log and "X-Injected" not in log
    assert "endpoints in price order" not in log
    assert mock.requests() == []


@pytest.mark.parametrize("endpoint", ["url_credentials", "headers"])
def test_open_door_guard_covers_url_credentials_and_extra_headers(mock, start_router, endpoint):
    """No `key`, but a secret all the same: user:password in the URL, or a token header."""
    port = mock.url("aws").split(":")[-1].split("/")[0]
    spec = (f"aws=http://relay:s3cret-pw@127.0.0.1:{port}/aws" if endpoint == "url_credentials"
            else f"aws={mock.url('aws')}")
    options = {"listen_host": "0.0.0.0"}
    if endpoint == "headers":
        import tempfile
        cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        cfg.write(f"endpoints:\n  - name: aws\n    url: {mock.url('aws')}\n"
                  f"    headers: {{X-Relay-Token: t0ken-0123456789}}\n")
        cfg.close()
        options["router_config"] = cfg.name
        router = start_router([], options=options, wait=False)
    else:
        router = start_router([spec], options=options, wait=False)
    assert router.proc.wait(20) != 0
    log = router.log()
    assert "no router_client_keys are set" in log
    assert "s3cret-pw" not in log and "t0ken-0123456789" not in log
