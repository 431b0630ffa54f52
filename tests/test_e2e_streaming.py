"""SSE through the router after failover: events reach the client as the upstream sends them."""

import asyncio
import json
import os
import time

import anthropic
import httpx

from conftest import closed_port_url
from streams import EVENTS, STREAM_MSG, WIRE_EVENTS, atimed_stream, h2_streams, timed_stream, timing


def assert_streamed(pairs: list[tuple[float, float]]) -> None:
    """Events arrived spread out as the upstream sent them, not bunched (buffering gives gaps of
    ~0 and one long wait). ``pairs`` are (measured, expected) gaps. Margins hold on a busy
    machine: a late event makes one gap long and the next short, so most gaps, the median and
    the total are checked, not every gap; the benchmarks measure the timing precisely."""
    ratios = sorted(m / e for m, e in pairs)
    devs = sorted(abs(m - e) * 1000 for m, e in pairs)
    print(f"\n{len(devs)} gaps: deviation from the upstream's pauses median {devs[len(devs) // 2]:.1f} ms, "
          f"max {devs[-1]:.1f} ms")
    assert 0.7 < ratios[len(ratios) // 2] < 1.5, ratios
    assert sum(r >= 0.5 for r in ratios) >= 0.8 * len(ratios), ratios  # each on its own
    assert sum(m for m, _ in pairs) >= 0.8 * sum(e for _, e in pairs), pairs


def failover_tiers(mock):
    mock.fault("aws", status=529)
    mock.fault("droid", event_gap_ms=300, words=3)
    return [f"aws={mock.url('aws')}", f"dead={closed_port_url()}", f"droid={mock.url('droid')}"]


def test_stream_after_failover_arrives_event_by_event(mock, start_router):
    router = start_router(failover_tiers(mock))
    client = anthropic.Anthropic(base_url=router.base, api_key="k", max_retries=0)
    types, times, headers = timed_stream(client)
    assert types == EVENTS
    assert headers["x-router-attempts"] == "aws:529, dead:refused, droid:200"
    assert_streamed(timing(types, times))


def test_twenty_concurrent_streams_keep_their_timing(mock, start_router):
    router = start_router(failover_tiers(mock))

    async def run():
        client = anthropic.AsyncAnthropic(base_url=router.base, api_key="k", max_retries=0)
        return await asyncio.gather(*(atimed_stream(client) for _ in range(20)))

    results = asyncio.run(run())
    assert all(types == EVENTS for types, _, _ in results)
    assert_streamed([p for types, times, _ in results for p in timing(types, times)])


def test_http2_client_multiplexing_eight_streams(mock, start_router):
    router = start_router(failover_tiers(mock))
    t0 = time.monotonic()
    alpn, results = h2_streams(router.port, 8)
    assert alpn == "h2"
    firsts = [times[0] - t0 for _, _, times in results]
    print(f"\ntime to first event per stream: {[round(f * 1000) for f in firsts]} ms")
    for headers, types, _ in results:
        assert headers["x-used-endpoint"] == "droid" and types == WIRE_EVENTS
    # None waits for another stream to finish (mitmproxy's 5-connection limit would make
    # streams 6-8 wait a whole stream, ~2.4 s): the first events are spread over well under
    # half a stream's length.
    length = min(times[-1] - times[0] for _, _, times in results)
    assert max(firsts) - min(firsts) < 0.4 * length, (firsts, length)
    assert_streamed([p for _, types, times in results for p in timing(types, times)])


def test_client_disconnect_mid_stream_closes_upstream_at_once(mock, start_router):
    mock.fault("aws", event_gap_ms=100, words=100)
    router = start_router([f"aws={mock.url('aws')}"])
    with httpx.stream("POST", f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30) as r:
        lines = r.iter_lines()
        while "content_block_delta" not in next(lines):
            pass
        assert mock.stats()["open_streams"] == 1
    closed_at = time.monotonic()
    while mock.stats()["closed_early"] == 0:
        # (the stream would run 10 s more: a bound of 5 s tells "at once" on a busy machine)
        assert time.monotonic() - closed_at < 5.0, "upstream stream still open 5 s after the client left"
        time.sleep(0.01)
    print(f"\nupstream closed {1000 * (time.monotonic() - closed_at):.0f} ms after the client left")
    assert mock.requests("aws")[0]["outcome"] == "client_closed"


def test_mid_stream_upstream_failure_ends_with_error_event(mock, start_router):
    mock.fault("aws", reset="mid_stream", reset_after_events=4)
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"])
    r = httpx.post(f"{router.base}/v1/messages", json=STREAM_MSG, timeout=30)
    assert r.status_code == 200
    assert r.text.rstrip().endswith("}")
    last_event = r.text.strip().split("\n\n")[-1]
    assert last_event.startswith("event: error\ndata: ")
    assert '"type": "api_error"' in last_event


def test_a_held_stream_costs_the_router_two_file_descriptors(mock, start_router):
    """The handoff to mitmproxy is in memory: a stream holds its client's connection and its
    upstream connection, and no loopback pair."""
    mock.fault("aws", event_gap_ms=200, words=15)
    router = start_router([f"aws={mock.url('aws')}"])
    fds = lambda: len(os.listdir(f"/proc/{router.proc.pid}/fd"))  # noqa: E731
    body = json.dumps({**STREAM_MSG, "model": "claude-sonnet-4-5"}).encode()
    head = (f"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()

    async def run():
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(head + body)  # a first stream sets up what every stream shares
        while b"message_stop" not in await asyncio.wait_for(reader.readline(), 10):
            pass
        writer.close()
        await asyncio.sleep(0.2)
        before = fds()
        conns = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
            writer.write(head + body)
            conns.append((reader, writer))
        for reader, _ in conns:  # every stream is past its opening and held
            while b"content_block_delta" not in await asyncio.wait_for(reader.readline(), 10):
                pass
        held = fds() - before
        for reader, writer in conns:  # and every one ends complete
            while b"message_stop" not in await asyncio.wait_for(reader.readline(), 10):
                pass
            writer.close()
        return held

    held = asyncio.run(run())
    print(f"\n20 held streams: {held} more file descriptors in the router")
    assert held <= 2 * 20 + 4
