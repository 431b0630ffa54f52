"""Client-side helpers that time SSE events as a user's client receives them."""

import time

import anthropic

STREAM_MSG = {"model": "mock-model", "max_tokens": 64, "stream": True,
              "messages": [{"role": "user", "content": "hi"}]}
# What the mock sends for a 3-word answer; the SDK does not surface `ping`.
WIRE_EVENTS = ["message_start", "content_block_start", "ping", "content_block_delta",
               "content_block_delta", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]
EVENTS = [e for e in WIRE_EVENTS if e != "ping"]
GAP = 0.3  # the mock's pause between events in these tests


def expected_gaps(types: list[str]) -> list[float]:
    """Upstream pause before each event after the first (a hidden ping doubles one)."""
    wire = iter(WIRE_EVENTS[1:])
    out = []
    for t in types[1:]:
        pause = GAP
        while next(wire) != t:
            pause += GAP
        out.append(pause)
    return out


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def timed_stream(client: anthropic.Anthropic) -> tuple[list[str], list[float], dict]:
    """Stream one message with the SDK; return event types, arrival times, response headers."""
    types, times = [], []
    with client.messages.with_streaming_response.create(**STREAM_MSG) as raw:
        for event in raw.parse():
            times.append(time.monotonic())
            types.append(event.type)
        return types, times, dict(raw.headers)


async def atimed_stream(client: anthropic.AsyncAnthropic) -> tuple[list[str], list[float], dict]:
    types, times = [], []
    async with client.messages.with_streaming_response.create(**STREAM_MSG) as raw:
        async for event in await raw.parse():
            times.append(time.monotonic())
            types.append(event.type)
        return types, times, dict(raw.headers)


def assert_streamed(pairs: list[tuple[float, float]]) -> None:
    """Each event arrived on its own, about when the upstream sent it (buffering gives ~0).

    ``pairs`` are (measured, expected) gaps. The bound is loose on purpose: it tells streaming
    from buffering; the printed deviation is the measurement.
    """
    devs = sorted(abs(m - e) * 1000 for m, e in pairs)
    print(f"\n{len(devs)} gaps: deviation from the upstream's pauses median {devs[len(devs) // 2]:.1f} ms, "
          f"max {devs[-1]:.1f} ms")
    assert all(abs(m - e) < 0.4 * e for m, e in pairs), pairs


def timing(types: list[str], times: list[float]) -> list[tuple[float, float]]:
    """(measured, expected) gaps from the first content event on. The router holds a
    stream's prelude (message_start, ping) until content arrives, so a bad start can fail over;
    those events reach the client together with the first content event."""
    first = next(i for i, t in enumerate(types) if t not in ("message_start", "ping"))
    return list(zip(gaps(times), expected_gaps(types)))[first:]
