"""Draining one router process (kill -USR1): the stream in flight ends as it would have, new
connections are refused, keep-alive clients are told to leave, and the process exits."""

import signal
import time

import httpx
import pytest

MSG = {"model": "mock-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def refused_within(url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.post(url, json=MSG, timeout=2)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False


def test_a_drained_router_finishes_its_stream_refuses_new_connections_and_exits(mock, start_router):
    mock.fault("aws", event_gap_ms=100, words=20)  # a stream of about 2.5 s
    router = start_router([f"aws={mock.url('aws')}"])
    url = f"{router.base}/v1/messages"
    with httpx.stream("POST", url, json={**MSG, "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        router.proc.send_signal(signal.SIGUSR1)
        router.wait_log("draining")
        assert refused_within(url, 5)
        body = s.read().decode()
    assert body.rstrip().endswith("}") and "message_stop" in body  # whole, not cut
    assert router.proc.wait(15) == 0
    assert "drained: no request in flight" in router.log()


def test_a_keep_alive_client_is_told_to_leave_while_draining(mock, start_router):
    mock.fault("aws", event_gap_ms=100, words=20)
    router = start_router([f"aws={mock.url('aws')}"])
    url = f"{router.base}/v1/messages"
    with httpx.Client(timeout=30) as keep_alive:
        assert keep_alive.post(url, json=MSG).headers.get("connection") != "close"
        with httpx.stream("POST", url, json={**MSG, "stream": True}, timeout=30) as s:
            router.proc.send_signal(signal.SIGUSR1)
            router.wait_log("draining")
            r = keep_alive.post(url, json=MSG)  # on its open connection: still served...
            assert r.status_code == 200 and r.headers["connection"] == "close"  # ...then closed
            s.read()
    assert router.proc.wait(15) == 0


def test_a_drain_that_times_out_exits_anyway(mock, start_router):
    mock.fault("aws", event_gap_ms=500, words=60)  # 30 s: longer than the drain allows
    router = start_router([f"aws={mock.url('aws')}"], options={"router_drain_timeout": 1})
    with httpx.stream("POST", f"{router.base}/v1/messages", json={**MSG, "stream": True},
                      timeout=30) as s:
        assert s.status_code == 200
        router.proc.send_signal(signal.SIGUSR1)
        assert router.proc.wait(15) == 0
    assert "drain timeout: shutting down with 1 requests in flight" in router.log()


@pytest.mark.parametrize("in_flight, connections, now, last_request, done", [
    (0, 0, 5.0, 4.9, True),  # nothing in flight, nobody connected
    (0, 2, 5.0, 4.9, False),  # connected, and a request just ended: one may follow
    (0, 2, 5.0, 3.9, True),  # quiet for a second: close them
    (1, 0, 5.0, 0.0, False),  # in flight
    (1, 2, 10.0, 9.9, True),  # the deadline
])
def test_draining_ends_when_nothing_is_in_flight_and_clients_are_gone_or_quiet(
        in_flight, connections, now, last_request, done):
    from claude_router.drain import done_waiting

    assert done_waiting(in_flight, connections, now, last_request, deadline=10.0) is done


def test_a_request_waiting_for_its_answer_when_the_drain_starts_gets_it(mock, start_router):
    mock.fault("aws", delay_ms=3000)
    router = start_router([f"aws={mock.url('aws')}"])
    with httpx.Client(timeout=30) as client:
        import threading
        result = {}
        t = threading.Thread(target=lambda: result.update(r=client.post(f"{router.base}/v1/messages", json=MSG)))
        t.start()
        deadline = time.monotonic() + 20
        while mock.count("aws") == 0:  # the request reached the relay: it waits for its answer
            assert time.monotonic() < deadline
            time.sleep(0.02)
        router.proc.send_signal(signal.SIGUSR1)
        t.join(20)
    assert result["r"].status_code == 200 and result["r"].headers["connection"] == "close"
    assert router.proc.wait(15) == 0


def test_an_idle_keep_alive_connection_is_closed_cleanly_after_a_quiet_second(mock, start_router):
    router = start_router([f"aws={mock.url('aws')}"])
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{router.base}/v1/messages", json=MSG).status_code == 200
        router.proc.send_signal(signal.SIGUSR1)
        assert router.proc.wait(15) == 0
    log = router.log()
    assert "Closing connection due to inactivity" in log and "Traceback" not in log


def test_a_keep_alive_client_that_just_finished_a_stream_is_answered_once_more_then_closed(
        mock, start_router):
    """A stream's headers went out before the drain (no Connection: close): its client may
    send its next request on the same connection at once. It is answered, with close."""
    mock.fault("aws", event_gap_ms=100, words=10)
    router = start_router([f"aws={mock.url('aws')}"])
    url = f"{router.base}/v1/messages"
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json={**MSG, "stream": True}) as s:
            router.proc.send_signal(signal.SIGUSR1)
            router.wait_log("draining")
            s.read()
        r = client.post(url, json=MSG)
        assert r.status_code == 200 and r.headers["connection"] == "close"
    assert router.proc.wait(15) == 0
