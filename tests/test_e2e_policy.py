"""The failure policy through a real mitmdump, the mock relay and the anthropic SDK."""

import time

import anthropic
import httpx
import pytest

from streams import STREAM_MSG

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def tiers(mock, *names):
    return [f"{n}={mock.url(n)}" for n in names]


def sdk(router) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.base, api_key="k", max_retries=0)


def test_malformed_request_reaches_two_endpoints_and_poisons_none(mock, start_router):
    router = start_router(tiers(mock, "aws", "droid", "ultra"))
    for _ in range(5):
        with pytest.raises(anthropic.BadRequestError) as exc:
            sdk(router).messages.create(model="mock-model", max_tokens=16, messages=None)
        assert exc.value.response.headers["x-router-attempts"] == "aws:400, droid:400"
    assert mock.count("ultra") == 0
    raw = sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.headers["x-router-attempts"] == "aws:200"  # nobody was cooled


def test_a_4xx_only_one_endpoint_gives_keeps_failing_over(mock, start_router):
    mock.fault("aws", status=422, message="relay cannot do this")
    router = start_router(tiers(mock, "aws", "droid"))
    raw = sdk(router).messages.with_raw_response.create(**MSG)
    assert raw.headers["x-router-attempts"] == "aws:422, droid:200"


def test_529_with_retry_after_cools_the_endpoint_for_that_long(mock, start_router):
    mock.fault("aws", status=529, retry_after=5, times=1)
    router = start_router(tiers(mock, "aws", "droid"))
    client = sdk(router)
    sent = time.monotonic()  # the trip comes after this
    assert client.messages.with_raw_response.create(**MSG).headers["x-router-attempts"] == "aws:529, droid:200"
    while time.monotonic() - sent < 3.5:  # well inside the 5 s (margin for a busy machine)
        assert client.messages.with_raw_response.create(**MSG).headers["x-used-endpoint"] == "droid"
        time.sleep(0.25)
    assert mock.count("aws") == 1  # one failure was enough: it asked for 5 s
    while client.messages.with_raw_response.create(**MSG).headers["x-used-endpoint"] != "aws":
        assert time.monotonic() - sent < 30, "aws still cooling long after the 5 s it asked for"
        time.sleep(0.1)
    assert time.monotonic() - sent >= 5  # not before its 5 s were over
    assert mock.count("aws") == 2


def test_error_event_before_content_fails_over_and_client_sees_one_clean_stream(mock, start_router):
    mock.fault("aws", stream_error="overloaded_error", stream_error_after=1)  # after message_start
    router = start_router(tiers(mock, "aws", "droid"))
    types, text = [], ""
    with sdk(router).messages.with_streaming_response.create(**STREAM_MSG) as raw:
        assert raw.headers["x-router-attempts"] == "aws:overloaded_error, droid:200"
        for event in raw.parse():
            types.append(event.type)
            if event.type == "content_block_delta":
                text += event.delta.text
    assert types[:2] == ["message_start", "content_block_start"] and types[-1] == "message_stop"
    assert types.count("message_start") == 1
    assert text == "Hello from droid. You said: hi"


@pytest.mark.parametrize("fault", [{"end_after_events": 0}, {"end_after_events": 1},
                                   {"reset": "after_headers"}, {"reset": "mid_stream", "reset_after_events": 1}])
def test_bad_stream_starts_fail_over(mock, start_router, fault):
    mock.fault("aws", **fault)
    router = start_router(tiers(mock, "aws", "droid"))
    r = httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30)
    assert r.headers["x-used-endpoint"] == "droid"
    assert r.text.count("event: message_start") == 1 and "event: error" not in r.text


def test_reset_after_content_ends_the_stream_with_an_error_event_and_counts(mock, start_router):
    mock.fault("aws", reset="mid_stream", reset_after_events=4)  # two content events, then RST
    router = start_router(tiers(mock, "aws", "droid"), options={"router_max_failures": 1})
    with pytest.raises(anthropic.APIStatusError) as exc:
        for _ in sdk(router).messages.create(**STREAM_MSG):
            pass
    assert exc.value.body["error"]["type"] == "api_error"
    assert sdk(router).messages.with_raw_response.create(**MSG).headers["x-router-attempts"] == "droid:200"


def test_stall_before_headers_hits_the_stream_bound(mock, start_router):
    mock.fault("aws", delay_ms=10_000)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_stream_timeout": 1})
    started = time.monotonic()
    r = httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30)
    assert r.headers["x-router-attempts"] == "aws:timeout, droid:200"
    assert time.monotonic() - started < 5


def test_stall_mid_stream_ends_with_an_error_event(mock, start_router):
    mock.fault("aws", stall_ms=10_000, stall_after_events=4)
    router = start_router(tiers(mock, "aws"), options={"router_stream_timeout": 1})
    started = time.monotonic()
    r = httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30)
    assert r.text.count("event: content_block_delta") == 1
    assert r.text.strip().split("\n\n")[-1].startswith("event: error\ndata: ")
    assert time.monotonic() - started < 5


def test_all_cooling_answers_529_with_retry_after(mock, start_router):
    mock.fault("aws", status=503)
    mock.fault("droid", status=503)
    router = start_router(tiers(mock, "aws", "droid"),
                          options={"router_max_failures": 1, "router_cooldown": 30})
    r = httpx.post(f"{router.base}/v1/messages", json=MSG)
    assert (r.status_code, r.headers["x-router-attempts"]) == (503, "aws:503, droid:503")
    assert r.headers["retry-after"] == "30"
    with pytest.raises(anthropic.APIStatusError) as exc:
        sdk(router).messages.create(**MSG)
    assert exc.value.status_code == 529
    assert exc.value.body["error"]["type"] == "overloaded_error"
    assert 29 <= int(exc.value.response.headers["retry-after"]) <= 30
    assert mock.count("aws") == mock.count("droid") == 1


def test_retry_after_over_60_is_capped_for_clients(mock, start_router):
    mock.fault("aws", status=529, retry_after=3600)
    router = start_router(tiers(mock, "aws"))
    r = httpx.post(f"{router.base}/v1/messages", json=MSG)
    assert r.status_code == 529 and r.headers["retry-after"] == "60"


def test_attempt_cap_bounds_the_work_per_request(mock, start_router):
    for name in ("a", "b", "c"):
        mock.fault(name, status=500)
    router = start_router(tiers(mock, "a", "b", "c", "d"), options={"router_max_attempts": 2})
    r = httpx.post(f"{router.base}/v1/messages", json=MSG)
    assert r.headers["x-router-attempts"] == "a:500, b:500"
    assert mock.count("c") == mock.count("d") == 0


def test_policy_option_changes_a_verdict(mock, start_router):
    mock.fault("aws", status=404)
    router = start_router(tiers(mock, "aws", "droid"), options={"router_policy": "404=return"})
    r = httpx.post(f"{router.base}/v1/messages", json=MSG)
    assert (r.status_code, r.headers["x-router-attempts"]) == (404, "aws:404")
