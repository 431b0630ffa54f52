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


def h2_streams(port: int, n: int, path: str = "/v1/messages", timeout: float = 30.0):
    """Open one TLS connection offering only h2 and multiplex ``n`` streaming requests on it.

    A single reader loop stamps every event the moment its bytes arrive. (httpx's HTTP/2 client
    lets concurrent streams wait on each other's reads, which shows up as events a gap late,
    through any proxy, so it cannot measure this.) Returns, per stream, its event types and
    arrival times, plus the negotiated protocol.
    """
    import json
    import socket
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout),
                           server_hostname="localhost")
    alpn = sock.selected_alpn_protocol()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = json.dumps(STREAM_MSG).encode()
    streams: dict[int, tuple[list[str], list[float]]] = {}
    headers: dict[int, dict] = {}
    for _ in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":path", path), (":scheme", "https"),
                                (":authority", "localhost"), ("content-type", "application/json"),
                                ("x-api-key", "k"), ("content-length", str(len(body)))])
        conn.send_data(sid, body, end_stream=True)
        streams[sid] = ([], [])
    sock.sendall(conn.data_to_send())
    ended = 0
    try:
        while ended < n:
            data = sock.recv(65535)
            if not data:
                break
            now = time.monotonic()
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    headers[ev.stream_id] = {k.decode(): v.decode() for k, v in ev.headers}
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    types, times = streams[ev.stream_id]
                    for line in ev.data.split(b"\n"):
                        if line.startswith(b"event:"):
                            types.append(line[6:].strip().decode())
                            times.append(now)
                elif isinstance(ev, h2.events.StreamEnded):
                    ended += 1
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return alpn, [(headers.get(sid, {}), *streams[sid]) for sid in sorted(streams)]
