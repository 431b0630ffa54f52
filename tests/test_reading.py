"""Reading what relays send: stream starts chunk by chunk, compressed bodies, echoed secrets."""

import gzip
import json

import pytest

from claude_router import decoding
from claude_router.connections import Delivery
from claude_router.redaction import scrub, scrub_headers
from claude_router.sse import StartScanner, scan_start

PING = b'event: ping\ndata: {"type": "ping"}\n\n'
START = b'event: message_start\ndata: {"type": "message_start"}\n\n'
CONTENT = b'event: content_block_start\ndata: {}\n\n'


def test_scanner_decides_on_the_first_content_event():
    s = StartScanner()
    assert not s.feed(START).content
    assert not s.feed(PING).content
    assert s.feed(CONTENT).content


def test_scanner_reads_each_event_once_however_many_pings():
    s = StartScanner()
    s.feed(START)
    for _ in range(7000):
        assert not s.feed(PING).content
    assert s._pos < 70_000  # scanned bytes are dropped, not kept and re-read
    assert s.feed(CONTENT).content


def test_scanner_handles_crlf_split_across_chunks():
    s = StartScanner()
    assert not s.feed(b"event: ping\r\ndata: {}\r").content
    assert s.feed(b"\n\r\nevent: content_block_delta\r\ndata: {}\r\n\r\n").content


def test_an_error_event_names_its_type():
    data = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
    start = scan_start(START + f"event: error\ndata: {data}\n\n".encode())
    assert (start.error_type, start.error_message) == ("overloaded_error", "busy")


def test_a_deeply_nested_error_event_is_an_api_error_not_a_crash():
    assert scan_start(b"event: error\ndata: " + b"[" * 100_000 + b"\n\n").error_type == "api_error"


def test_gzip_is_decoded_for_reading_in_any_chunking():
    raw = gzip.compress(START + CONTENT)
    d, out = decoding.Decoder("gzip"), b""
    for i in range(len(raw)):
        out += d.feed(raw[i:i + 1])
    assert out == START + CONTENT


def test_identity_passes_and_unknown_codings_are_not_read():
    assert decoding.Decoder("").feed(b"x") == b"x"
    d = decoding.Decoder("br")
    assert d.feed(b"x") == b"" and d.broken


def test_a_compression_bomb_costs_at_most_the_limit():
    bomb = gzip.compress(b"\0" * (64 << 20))
    d = decoding.Decoder("gzip", limit=1 << 20)
    assert len(d.feed(bomb)) <= 1 << 20 and d.broken
    assert decoding.decoded(bomb, "gzip") is None


def test_encoding_of_reads_the_header():
    assert decoding.encoding_of([("Content-Encoding", "GZIP")]) == "gzip"
    assert decoding.encoding_of([("content-encoding", "identity")]) == ""
    assert decoding.encoding_of([]) == ""


def test_secrets_are_scrubbed_from_bodies_and_headers():
    body = b'{"error": {"message": "bad key sk-abc-123456 for you"}}'
    assert scrub(body, ["sk-abc-123456"]) == b'{"error": {"message": "bad key [redacted] for you"}}'
    assert scrub_headers([("x-echo", "sk-abc-123456")], ["sk-abc-123456"]) == [("x-echo", "[redacted]")]


def test_a_client_that_stopped_reading_is_noticed():
    d = Delivery(threshold=1.0)
    assert not d.stalled_recently(10.0)
    d.pause(10.0)
    assert not d.stalled_recently(10.5)
    assert d.stalled_recently(12.0)  # still not reading
    d.resume(12.0)
    assert d.stalled_recently(12.1)  # the break came right after a long pause
    d.pause(12.2)
    d.resume(12.21)  # the held bytes drain in short pauses: the long one is still remembered
    assert d.stalled_recently(12.3)
    assert not d.stalled_recently(30.0)


def test_short_pauses_are_normal_back_pressure():
    d = Delivery(threshold=1.0)
    d.pause(1.0)
    d.resume(1.2)
    assert not d.stalled_recently(1.3)


# -- stream starts at the edges (found by mutation testing, docs/mutation.md) ------------------

ERROR = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}\n\n'


def test_an_error_first_is_decided_as_an_error():
    start = scan_start(ERROR)
    assert (start.content, start.error_type, start.error_message) == (False, "overloaded_error", "busy")


def test_a_crlf_split_between_chunks_is_one_line_end_once():
    s = StartScanner()
    assert not s.feed(b"event: ping\r").content
    assert not s.feed(b"\n\r\n").content
    crlf = ERROR.replace(b"\n", b"\r\n")
    assert s.feed(crlf[:11]).error_type is None  # "event: erro" so far
    assert s.feed(crlf[11:]).error_type == "overloaded_error"


def test_an_error_split_at_its_cr_is_still_an_error():
    crlf = ERROR.replace(b"\n", b"\r\n")
    s = StartScanner()
    assert s.feed(crlf[:13]).error_type is None  # "event: error\r"
    assert s.feed(crlf[13:]).error_type == "overloaded_error"


def test_leading_blank_lines_and_a_split_blank_line_are_read():
    assert scan_start(b"\n\n" + ERROR).error_type == "overloaded_error"
    s = StartScanner()
    assert s.feed(ERROR[:-1]).error_type is None
    assert s.feed(b"\n").error_type == "overloaded_error"


def test_an_error_right_after_the_scanner_compacts_is_seen_at_once():
    s = StartScanner()
    s.feed(PING)
    while s._pos:  # until the scanned bytes are dropped
        s.feed(PING)
    assert s.feed(ERROR).error_type == "overloaded_error"


def test_unspaced_fields_multiline_data_and_bad_utf8_names():
    assert scan_start(b'event:error\ndata:{"error": {"type": "x"}}\n\n').error_type == "x"
    assert scan_start(b'event: error\ndata: {"error":\ndata: {"type": "x"}}\n\n').error_type == "x"
    assert scan_start(b"event: \xff\xfe\ndata: {}\n\n").content
    assert scan_start(b"data: {}\n\n").content  # an unnamed event is a "message": content


@pytest.mark.parametrize("data, etype, message", [
    (b"[1]", "api_error", ""), (b'{"error": "text"}', "api_error", ""),
    (b'{"error": {"type": 5, "message": "' + b"m" * 300 + b'"}}', "api_error", "m" * 200),
    (b"not json", "api_error", ""),
])
def test_an_error_event_with_an_odd_body_is_an_api_error(data, etype, message):
    start = scan_start(b"event: error\ndata: " + data + b"\n\n")
    assert (start.error_type, start.error_message) == (etype, message)


def test_a_crlf_blank_line_split_between_its_cr_and_lf_ends_the_event():
    crlf = ERROR.replace(b"\n", b"\r\n")
    s = StartScanner()
    assert s.feed(crlf[:-1]).error_type is None
    assert s.feed(crlf[-1:]).error_type == "overloaded_error"


def test_a_split_event_right_after_the_scanner_compacts_is_read():
    s = StartScanner()
    s.feed(PING)
    while s._pos:
        s.feed(PING)
    assert s.feed(ERROR[:10]).error_type is None
    assert s.feed(ERROR[10:]).error_type == "overloaded_error"
