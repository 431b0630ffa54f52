"""Token usage: read from JSON answers and from streams as they pass, and priced."""

import importlib.util
import json
import random
import timeit
from pathlib import Path

import pytest

from claude_router.usage import MAX_PARTIAL, Price, StreamUsage, Usage, cost, from_json

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mock_relay", ROOT / "scripts" / "mock_relay.py")
mock_relay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mock_relay)


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
