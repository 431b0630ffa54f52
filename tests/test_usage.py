"""Token usage: read from JSON answers and from streams as they pass, and priced."""

import json
import random
import timeit

import pytest

from claude_router.usage import MAX_PARTIAL, Price, StreamUsage, Usage, cost, from_json
from claude_router_dev import mock_relay


class _Call:
    """Just enough of the mock's request for its SSE generator."""

    def __init__(self, input_tokens: int) -> None:
        self._n = input_tokens
        self.fault: dict = {}
        self.profile: dict = {}

    def input_tokens(self) -> int:
        return self._n


def mock_stream(text: str = "one two three", input_tokens: int = 25) -> bytes:
    """The exact bytes the mock relay streams for a reply of ``text``."""
    return b"".join(mock_relay.MockRelay().sse_events(_Call(input_tokens), "m", text))


def sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def start(**usage) -> bytes:
    return sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": usage}})


def delta(**usage) -> bytes:
    return sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                 "usage": usage})


def content(text: str) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": text}})


def read(*chunks: bytes) -> Usage | None:
    s = StreamUsage()
    for c in chunks:
        s.feed(c)
    return s.usage


def pieces(data: bytes, sizes) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        out.append(data[i:i + n])
        i += n
    return out + [data[i:]]


MOCK_USAGE = Usage(input_tokens=25, output_tokens=3)


# -- non-streaming answers ---------------------------------------------------------------------


def test_json_usage_of_a_message():
    body = json.dumps({"type": "message", "content": [], "usage": {
        "input_tokens": 12, "output_tokens": 7, "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 100, "service_tier": "standard"}}).encode()
    assert from_json(body) == Usage(12, 7, 3, 100)


def test_json_usage_without_cache_fields_counts_them_as_zero():
    assert from_json(b'{"type":"message","usage":{"input_tokens":5,"output_tokens":2}}') == Usage(5, 2)


@pytest.mark.parametrize("body", [
    b'{"type":"message","content":[]}',
    b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
    b'{"input_tokens": 42}',  # a count_tokens answer is not usage
    b'{"usage": null}', b'{"usage": {}}', b'{"usage": {"input_tokens": "12"}}', b'[]', b'',
])
def test_json_without_usage_is_none(body):
    assert from_json(body) is None


def test_json_ignores_malformed_counts_but_keeps_good_ones():
    body = b'{"usage":{"input_tokens":true,"output_tokens":-1,"cache_read_input_tokens":9}}'
    assert from_json(body) == Usage(cache_read_input_tokens=9)


# -- streams -----------------------------------------------------------------------------------


def test_stream_usage_of_the_mock_relay():
    assert read(mock_stream()) == MOCK_USAGE


def test_no_usage_before_any_usage_event():
    assert read(b"event: ping\ndata: {\"type\":\"ping\"}\n\n") is None


def test_output_is_provisional_from_message_start_until_message_delta():
    assert read(start(input_tokens=25, output_tokens=1)) == Usage(25, 1)


def test_every_split_in_two_gives_the_same_usage():
    data = mock_stream()
    for i in range(len(data) + 1):
        assert read(data[:i], data[i:]) == MOCK_USAGE, i


def test_one_byte_at_a_time():
    data = mock_stream("a b c d e f")
    assert read(*(data[i:i + 1] for i in range(len(data)))) == Usage(25, 6)


def test_random_chunkings():
    rnd = random.Random(1)
    data = mock_stream("the quick brown fox jumps over the lazy dog")
    for _ in range(300):
        chunks = pieces(data, [rnd.randint(0, 40) for _ in range(rnd.randint(1, 60))])
        assert read(*chunks) == Usage(25, 9)


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends_at_every_split(eol):
    data = mock_stream().replace(b"\n", eol)
    for i in range(len(data) + 1):
        assert read(data[:i], data[i:]) == MOCK_USAGE, i


def test_crlf_one_byte_at_a_time():
    data = mock_stream().replace(b"\n", b"\r\n")
    assert read(*(data[i:i + 1] for i in range(len(data)))) == MOCK_USAGE


def test_output_tokens_are_cumulative_the_last_delta_wins():
    assert read(start(input_tokens=10, output_tokens=1), delta(output_tokens=4),
                delta(output_tokens=9)) == Usage(10, 9)


def test_cache_tokens_come_from_message_start():
    got = read(start(input_tokens=3, output_tokens=1, cache_creation_input_tokens=2048,
                     cache_read_input_tokens=10_000), content("hi"), delta(output_tokens=5))
    assert got == Usage(3, 5, 2048, 10_000)


def test_nonzero_counts_in_message_delta_replace_the_start():
    got = read(start(input_tokens=3, output_tokens=1, cache_creation_input_tokens=0,
                     cache_read_input_tokens=7),
               delta(input_tokens=30, output_tokens=5, cache_creation_input_tokens=20,
                     cache_read_input_tokens=0))
    assert got == Usage(30, 5, 20, 7)


def test_null_counts_in_message_delta_change_nothing():
    got = read(start(input_tokens=3, output_tokens=1),
               delta(input_tokens=None, output_tokens=5, cache_read_input_tokens=None))
    assert got == Usage(3, 5)


def test_events_without_event_lines_are_read_by_their_type():
    data = b"".join(b"\n".join(l for l in ev.split(b"\n") if not l.startswith(b"event:"))
                    for ev in mock_relay.MockRelay().sse_events(_Call(25), "m", "x y z"))
    assert b"event:" not in data
    assert read(data) == MOCK_USAGE


def test_comments_and_extra_blank_lines_are_ignored():
    data = b": keep-alive\n\n\n\n" + start(input_tokens=2, output_tokens=1) + b"\n\n:x\n\n" \
        + delta(output_tokens=8)
    for i in range(len(data) + 1):
        assert read(data[:i], data[i:]) == Usage(2, 8), i


def test_a_partial_event_at_the_end_is_not_counted():
    assert read(start(input_tokens=2, output_tokens=1), delta(output_tokens=8)[:-1]) == Usage(2, 1)


def test_a_huge_content_delta_is_never_buffered():
    s = StreamUsage()
    s.feed(start(input_tokens=4, output_tokens=1))
    huge = content("x" * (5 * MAX_PARTIAL))
    for i in range(0, len(huge), 65536):
        s.feed(huge[i:i + 65536])
        assert len(s._buf) == 0
    s.feed(delta(output_tokens=99))
    assert s.usage == Usage(4, 99)


def test_a_huge_unnamed_event_is_dropped_at_the_bound():
    s = StreamUsage()
    s.feed(start(input_tokens=4, output_tokens=1))
    huge = b"data: " + b"x" * (3 * MAX_PARTIAL) + b"\n\n"
    for i in range(0, len(huge), 65536):
        s.feed(huge[i:i + 65536])
        assert len(s._buf) <= MAX_PARTIAL
    s.feed(delta(output_tokens=7))
    assert s.usage == Usage(4, 7)


def test_a_huge_single_chunk_is_not_copied_into_the_buffer():
    s = StreamUsage()
    s.feed(b"data: " + b"x" * (2 * MAX_PARTIAL))
    assert len(s._buf) == 0
    s.feed(b"\n\n" + delta(output_tokens=3))
    assert s.usage == Usage(output_tokens=3)


# -- prices ------------------------------------------------------------------------------------


def test_cost_with_default_cache_prices():
    u = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cache_creation_input_tokens=1_000_000,
              cache_read_input_tokens=1_000_000)
    assert cost(u, Price(input=3.0, output=15.0)) == pytest.approx(3 + 15 + 3.75 + 0.3)


def test_cost_with_explicit_cache_prices():
    u = Usage(input_tokens=2_000, output_tokens=500, cache_creation_input_tokens=10_000,
              cache_read_input_tokens=100_000)
    p = Price(input=3.0, output=15.0, cache_write=6.0, cache_read=0.0)
    assert cost(u, p) == pytest.approx((2_000 * 3 + 500 * 15 + 10_000 * 6) / 1e6)


def test_free_price_costs_nothing():
    assert cost(Usage(1, 2, 3, 4), Price()) == 0.0


def test_usage_adds_up():
    total = sum([Usage(1, 2, 3, 4), Usage(10, 20, 30, 40)], Usage())
    assert total == Usage(11, 22, 33, 44)
    assert total.total == 110


# -- garbage -----------------------------------------------------------------------------------


GARBAGE = [b"\xff\xfe\x00", b"{", b"[" * 100_000, b"null", b"1e999", b'"usage"',
           b'{"usage": [1, 2]}', b'{"usage": {"input_tokens": 1e400}}']


@pytest.mark.parametrize("body", GARBAGE)
def test_garbage_json_is_none(body):
    assert from_json(body) is None


@pytest.mark.parametrize("data", [
    b"event: message_start\ndata: " + b"[" * 100_000 + b"\n\n",
    b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":[]}\n\n",
    b"event: message_delta\ndata: {\"usage\":\"lots\"}\n\n",
    b"event: message_delta\ndata: \xff\xfe\n\n",
    b"event: \xff\ndata: {}\n\n",
    b"data: message_start\n\n",
    b"\n\n\n\r\r\r\n\n",
    b"event:\n\n",
    b"event: message_start\n\n",
    b": comment first\nevent: \xff\ndata: {}\n\n",  # an undecodable name, not on the first line
])
def test_garbage_events_are_ignored_and_the_stream_goes_on(data):
    assert read(data, delta(output_tokens=2)) == Usage(output_tokens=2)


def test_random_bytes_never_raise():
    rnd = random.Random(7)
    alphabet = b"event:message_startdelta{}\"\r\n :0123456789usage_tokens"
    for _ in range(500):
        s = StreamUsage()
        for _ in range(rnd.randint(1, 20)):
            s.feed(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80))))
            s.feed(rnd.randbytes(rnd.randint(0, 30)))
        assert s.usage is None or isinstance(s.usage, Usage)
        assert from_json(rnd.randbytes(40)) is None


# -- speed: measured and printed, never asserted -----------------------------------------------


def test_feed_cost_per_content_chunk():
    chunk = content("Hello, wor")  # one typical streamed event per network chunk
    s = StreamUsage()
    s.feed(start(input_tokens=25, output_tokens=1))
    n = 200_000
    best = min(timeit.repeat(lambda: s.feed(chunk), number=n, repeat=5)) / n
    split = [chunk[:40], chunk[40:]]  # the same event arriving in two pieces
    best_split = min(timeit.repeat(lambda: [s.feed(c) for c in split], number=n, repeat=5)) / n
    print(f"\nStreamUsage.feed: {best * 1e9:.0f} ns per {len(chunk)}-byte content_block_delta chunk; "
          f"{best_split * 1e9:.0f} ns per event split across two chunks")
    assert s.usage == Usage(25, 1)


# -- a complete stream, a cut one, an error (edges found by mutation testing, docs/mutation.md)
# The router tells a stream that ended with message_stop from one cut short by these flags.

STOP = sse("message_stop", {"type": "message_stop"})
ERR = sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})


def meter(*chunks: bytes) -> StreamUsage:
    s = StreamUsage()
    for c in chunks:
        s.feed(c)
    return s


def ended(s: StreamUsage) -> tuple[bool, bool]:
    return s.stopped, s.errored


def test_a_fresh_meter_has_seen_no_end():
    assert ended(StreamUsage()) == (False, False) and StreamUsage().usage is None


def test_a_stream_cut_before_message_stop_has_not_stopped():
    data = mock_stream()
    assert data.endswith(STOP.replace(b" ", b"")) or b"message_stop" in data
    cut = data[:data.rindex(b"event: message_stop")]
    assert ended(meter(cut)) == (False, False)
    assert ended(meter(data[:-1])) == (False, False)  # its blank line never came


def test_message_stop_is_seen_at_every_split():
    data = mock_stream()
    for i in range(len(data) + 1):
        assert ended(meter(data[:i], data[i:])) == (True, False), i


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_message_stop_is_seen_at_every_split_of_crlf_and_cr_streams(eol):
    data = mock_stream().replace(b"\n", eol)
    for i in range(len(data) + 1):
        assert ended(meter(data[:i], data[i:])) == (True, False), i
    assert ended(meter(*(data[i:i + 1] for i in range(len(data))))) == (True, False)


def test_an_error_event_is_seen_at_every_split():
    data = start(input_tokens=3, output_tokens=1) + content("x") + ERR
    for i in range(len(data) + 1):
        assert ended(meter(data[:i], data[i:])) == (False, True), i
    assert ended(meter(b'data: {"type": "message_stop"}\n\n')) == (True, False)


def test_the_end_is_seen_after_huge_content_and_huge_unnamed_events():
    big = content("x" * (2 * MAX_PARTIAL))
    for tail in (STOP, ERR):
        chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]
        s = meter(*chunks, tail)
        assert ended(s) == (tail is STOP, tail is ERR)
    huge = b"data: " + b"x" * (MAX_PARTIAL + 10) + b"\n\n"
    for split in (MAX_PARTIAL - 5, MAX_PARTIAL + 5, len(huge) - 1, len(huge) - 2):
        assert ended(meter(huge[:split], huge[split:], STOP)) == (True, False), split
    assert ended(meter(b"data: " + b"x" * (MAX_PARTIAL + 10) + b"\n", b"\n" + STOP)) == (True, False)


def test_blank_lines_and_unwanted_events_before_the_end_are_passed_over():
    ping = sse("ping", {"type": "ping"})
    for lead in (b"\n\n\n", b"\n", ping, b": comment\n\n", b"event:ping\n\n"):
        assert ended(meter(lead, STOP)) == (True, False), lead
        joined = lead + STOP
        for i in range(len(joined) + 1):
            assert ended(meter(joined[:i], joined[i:])) == (True, False), (lead, i)


def test_an_event_held_across_chunks_is_judged_by_its_name():
    data = sse("message_stop", {"type": "message_stop"})
    assert ended(meter(data[:8], data[8:20], data[20:])) == (True, False)
    assert ended(meter(b"event:message_stop\ndata:{\"type\":\"message_stop\"}\n\n")) == (True, False)
    assert ended(meter(b"event: ping\ndata: {\"type\": \"message_stop\"}\n\n")) == (False, False)


@pytest.mark.parametrize("value, kept", [(0, True), ((1 << 40) - 1, True), (1 << 40, False), (-1, False)])
def test_counts_at_the_edge_of_their_range(value, kept):
    got = from_json(json.dumps({"usage": {"input_tokens": value, "output_tokens": 1}}).encode())
    assert (got.input_tokens == value) is kept


def test_a_million_tokens_at_a_price_cost_that_price():
    assert cost(Usage(cache_read_input_tokens=1_000_000), Price(input=3.0, cache_read=0.5)) == 0.5


def test_a_zero_output_count_in_message_delta_is_the_count():
    assert read(start(input_tokens=2, output_tokens=1), delta(output_tokens=0)) == Usage(2, 0)


# -- the scanner's slow paths (found by mutation testing, docs/mutation.md) ---------------------
# Events held or skipped across chunks, CRs at the end of a chunk, events of exactly MAX_PARTIAL.

MULTILINE_DELTA = (b'event: message_delta\ndata: {"type": "message_delta",\n'
                   b'data: "usage": {"output_tokens": 7}}\n\n')


def padded(name: bytes, data: bytes, size: int) -> bytes:
    """An event of exactly ``size`` bytes before its blank line, padded with a comment line."""
    head, tail = b"event: " + name + b"\n:", b"\ndata: " + data
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_data_on_several_lines_is_read_as_one_document():
    assert read(start(input_tokens=2, output_tokens=1), MULTILINE_DELTA) == Usage(2, 7)


def test_crlf_data_on_several_lines_at_every_split():
    data = (start(input_tokens=2, output_tokens=1) + MULTILINE_DELTA).replace(b"\n", b"\r\n")
    for i in range(len(data) + 1):
        assert read(data[:i], data[i:]) == Usage(2, 7), i


def test_a_cr_ending_a_chunk_joins_only_the_lf_that_opens_the_next():
    # A comment ended by lone CRs, then LF line ends: the last LF still ends the event.
    assert read(b": ping\r\r", start(input_tokens=2, output_tokens=1)[:-1], b"\n") == Usage(2, 1)


@pytest.mark.parametrize("sep", [b"\n\n", b"\n\n\n"], ids=["blank line", "extra blank line"])
def test_a_stream_without_event_lines_is_read_at_every_split(sep):
    events = [b'data: {"type": "message_start", "message": {"usage": {"input_tokens": 2, '
              b'"output_tokens": 1}}}', b'data: {"type": "message_delta", "usage": {"output_tokens": 8}}',
              b'data: {"type": "message_stop"}']
    data = sep.join(events) + sep
    for i in range(len(data) + 1):
        s = meter(data[:i], data[i:])
        assert (s.usage, ended(s)) == (Usage(2, 8), (True, False)), i


def test_an_unnamed_event_after_a_named_one_in_the_same_chunk_is_read():
    assert ended(meter(sse("ping", {"type": "ping"}) + b'data: {"type": "message_stop"}\n\n')) == (True, False)


def test_the_event_line_names_the_event_whatever_its_data_says():
    untyped = b'event: message_delta\ndata: {"usage": {"output_tokens": 6}}\n\n'
    assert read(start(input_tokens=2, output_tokens=1), untyped) == Usage(2, 6)


def test_an_event_is_judged_by_its_first_event_line():
    # SSE lets a later event: line rename the event; no API sends two, and the scanner reads the
    # first, whole or held (a cut inside the first line is the exception, docs/mutation.md).
    data = b'event: ping\nevent: message_stop\ndata: {"type": "message_stop"}\n\n'
    for i in [len(data)] + list(range(data.index(b"\n") + 1, len(data))):
        assert ended(meter(data[:i], data[i:])) == (False, False), i


def test_an_unwanted_event_split_at_a_line_end_is_skipped_whole():
    ping = b'event: ping\ndata: {"a": 1}\ndata: {"type": "message_stop"}\n\n'
    for i in range(len(ping) + 1):
        assert ended(meter(ping[:i], ping[i:])) == (False, False), i


def test_a_chunk_feed_cannot_read_drops_the_event_it_interrupts():
    s = meter(b"event: ping\n")
    s.feed("data: {}")  # not bytes: feed does not raise, and takes these bytes as lost
    s.feed(b'\ndata: {"type": "message_stop"}\n\n')  # so this LF ends a line, not the ping event
    assert ended(s) == (False, False)
    s.feed(STOP)
    assert ended(s) == (True, False)


def test_an_event_that_outgrows_the_bound_while_held_is_dropped_and_the_next_read():
    half = MAX_PARTIAL // 2
    begin, more = delta(output_tokens=8)[:10], delta(output_tokens=8)[10:]
    s = meter(b"data: " + b"x" * half, b"x" * half + b"\ndata: 1\n", b"\n" + start(input_tokens=2,
              output_tokens=1), begin, more)
    assert s.usage == Usage(2, 8)


def test_a_usage_event_whose_end_crosses_the_bound_is_not_counted():
    big = padded(b"message_delta", json.dumps({"type": "message_delta", "usage": {"output_tokens": 99}}
                                              ).encode(), MAX_PARTIAL + 1)
    s = meter(start(input_tokens=2, output_tokens=1), big[:-20], big[-20:] + b"\n\n" + STOP)
    assert (s.usage, ended(s)) == (Usage(2, 1), (True, False))


def _bound_chunks(how: str) -> list[bytes]:
    stop = padded(b"message_stop", b'{"type": "message_stop"}', MAX_PARTIAL)
    shorter = padded(b"message_stop", b'{"type": "message_stop"}', MAX_PARTIAL - 1)
    return {"one chunk": [stop, b"\n\n"],
            "grown to the bound": [stop[:1000], stop[1000:], b"\n\n"],
            "up to its last line end": [shorter[:1000], shorter[1000:] + b"\n", b"\n"],
            "after a blank line": [b"\n" + stop, b"\n\n"]}[how]


@pytest.mark.parametrize("how", ["one chunk", "grown to the bound", "up to its last line end",
                                 "after a blank line"])
def test_an_event_held_at_exactly_the_bound_is_read(how):
    chunks = _bound_chunks(how)
    assert sum(map(len, chunks[:-1])) - chunks[0].startswith(b"\n") == MAX_PARTIAL
    assert ended(meter(*chunks)) == (True, False)


def test_event_lines_without_a_space_are_read_at_every_split():
    data = (start(input_tokens=2, output_tokens=1) + STOP).replace(b"event: ", b"event:")
    for i in range(len(data) + 1):
        s = meter(data[:i], data[i:])
        assert (s.usage, ended(s)) == (Usage(2, 1), (True, False)), i
