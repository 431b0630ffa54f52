"""A key that would split the header it travels in stops the real mitmdump at start-up, with a
message naming the field and never the key."""

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
