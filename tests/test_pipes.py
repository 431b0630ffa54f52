"""In-memory connections behave like a socket's two ends: order, flow control, half-close,
close and reset."""

import asyncio

from claude_router import pipes


class Recorder(asyncio.Protocol):
    def __init__(self, keep_open_on_eof: bool = False) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: list[BaseException | None] = []
        self.paused = 0
        self.resumed = 0
        self.keep_open_on_eof = keep_open_on_eof
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.eof = True
        return self.keep_open_on_eof

    def connection_lost(self, exc):
        self.lost.append(exc)

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1


def _pair(a_keep=False, b_keep=False):
    loop = asyncio.get_running_loop()
    a, b = Recorder(a_keep), Recorder(b_keep)
    ta, tb = pipes.pair(loop, a, b, {"peername": ("127.0.0.1", 1)}, {"peername": ("127.0.0.1", 2)})
    return a, b, ta, tb


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_bytes_arrive_in_order_on_a_later_turn():
    a, b, ta, tb = _pair()
    ta.write(b"one ")
    ta.write(b"two")
    assert b.data == b""  # never inside the writer's call
    await turns()
    assert b.data == b"one two"
    assert ta.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_a_paused_reader_pauses_its_writer_and_releases_it_when_drained():
    a, b, ta, tb = _pair()
    tb.pause_reading()
    ta.write(b"x" * (pipes.HIGH_WATER + 1))
    assert a.paused == 1
    await turns()
    assert b.data == b""
    tb.resume_reading()
    await turns()
    assert len(b.data) == pipes.HIGH_WATER + 1
    assert a.resumed == 1


async def test_reads_are_bounded_like_a_socket_read():
    a, b, ta, tb = _pair()
    sizes = []
    b.data_received = lambda d: sizes.append(len(d))
    ta.write(b"y" * (3 * pipes.READ_SIZE))
    await turns(10)
    assert sizes == [pipes.READ_SIZE] * 3


async def test_write_eof_is_a_half_close():
    a, b, ta, tb = _pair(b_keep=True)
    ta.write(b"last")
    ta.write_eof()
    await turns()
    assert b.data == b"last" and b.eof and b.lost == []
    tb.write(b"reply")  # the other direction still works
    await turns()
    assert a.data == b"reply"


async def test_close_delivers_what_was_written_then_eof_and_closes_both():
    a, b, ta, tb = _pair()
    ta.write(b"bye")
    ta.close()
    await turns()
    assert b.data == b"bye" and b.eof
    assert a.lost == [None] and b.lost == [None]  # b's protocol did not keep it open
    assert ta.is_closing() and tb.is_closing()


async def test_abort_is_a_reset_for_the_peer():
    a, b, ta, tb = _pair()
    tb.pause_reading()
    ta.write(b"never read")
    ta.abort()
    tb.resume_reading()
    await turns()
    assert b.data == b""
    assert isinstance(b.lost[0], ConnectionResetError)
    assert a.lost == [None]


async def test_writing_to_a_closed_peer_breaks_the_writer():
    a, b, ta, tb = _pair(a_keep=True)
    tb.close()
    await turns()
    assert a.eof
    ta.write(b"anyone there?")
    await turns()
    assert isinstance(a.lost[0], BrokenPipeError)


async def test_a_paused_writer_is_released_when_its_peer_goes_away():
    a, b, ta, tb = _pair(a_keep=True)
    tb.pause_reading()
    ta.write(b"z" * (pipes.HIGH_WATER + 1))
    assert a.paused == 1
    tb.close()
    await turns()
    assert a.resumed == 1  # its next write finds the peer gone


async def test_asyncio_streams_work_over_a_pair():
    loop = asyncio.get_running_loop()
    server_side = Recorder(keep_open_on_eof=True)
    reader = asyncio.StreamReader()
    proto = asyncio.StreamReaderProtocol(reader)
    tc, ts = pipes.pair(loop, proto, server_side, {"peername": ("h", 1)}, {})
    writer = asyncio.StreamWriter(tc, proto, reader, loop)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await writer.drain()
    await turns()
    assert server_side.data == b"GET / HTTP/1.1\r\n\r\n"
    ts.write(b"HTTP/1.1 200 OK\r\n\r\n")
    ts.close()
    assert await asyncio.wait_for(reader.read(), 1) == b"HTTP/1.1 200 OK\r\n\r\n"
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), 1)


async def test_eof_reaches_the_peer_once_after_a_half_close_and_a_close():
    a, b, ta, tb = _pair(b_keep=True)
    eofs = []
    b.eof_received = lambda: eofs.append(1) or True
    ta.write_eof()
    await turns()
    ta.close()
    await turns()
    assert eofs == [1]


async def test_a_failing_protocol_is_reported_and_its_connection_reset():
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context["exception"]))
    try:
        a, b, ta, tb = _pair()

        def broken(data):
            raise ValueError("bug")

        b.data_received = broken
        ta.write(b"x")
        await turns()
        assert isinstance(reported[0], ValueError)
        assert isinstance(a.lost[0], ConnectionResetError)
    finally:
        loop.set_exception_handler(None)


async def test_nothing_is_delivered_after_close():
    a, b, ta, tb = _pair()
    ta.write(b"late")
    tb.close()  # before the flush: a socket would not read any more either
    await turns()
    assert b.data == b""
