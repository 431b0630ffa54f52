"""connections: the head, idle and body deadlines of client connections, and the collector that
reads a streamed request body up to the limit. Plain objects on a real event loop; the
end-to-end behaviour is in test_e2e_hostile_edges.py."""

import asyncio

import pytest

from claude_router.connections import Collector, HeadDeadlines


def deadlines(timeout: float = 0.05, body_timeout: float = 0.05) -> tuple[HeadDeadlines, list[str]]:
    heads = HeadDeadlines()
    heads.timeout, heads.body_timeout = timeout, body_timeout
    return heads, []


async def settle(seconds: float = 0.15) -> None:
    await asyncio.sleep(seconds)


async def test_a_connection_without_a_head_is_closed():
    heads, closed = deadlines()
    heads.connected("c", lambda: closed.append("c"))
    await settle()
    assert closed == ["c"]


async def test_a_complete_head_stops_the_deadline_until_the_exchange_ends():
    heads, closed = deadlines()
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    await settle()
    assert closed == [] and heads.busy("c") == 1
    heads.request_done("c", "f1")
    await settle()
    assert closed == []  # the response is still on its way (or streaming)
    heads.response_done("c", "f1")
    assert heads.busy("c") == 0
    await settle()
    assert closed == ["c"]  # idle again: the next head has a deadline


async def test_the_response_may_end_before_the_request():
    """An answer given from the head (401, 413) while the client still uploads."""
    heads, closed = deadlines()
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.response_done("c", "f1")
    await settle()
    assert closed == []
    heads.request_done("c", "f1")
    await settle()
    assert closed == ["c"]


async def test_a_connection_is_idle_only_when_every_exchange_ended():
    heads, closed = deadlines()
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.head_seen("c", "f2")
    heads.failed("c", "f1")
    await settle()
    assert closed == [] and heads.busy("c") == 1
    heads.failed("c", "f2")
    await settle()
    assert closed == ["c"]


async def test_a_connect_restarts_the_deadline_and_a_tunnel_has_none():
    heads, closed = deadlines(timeout=0.1)
    heads.connected("c", lambda: closed.append("c"))
    await asyncio.sleep(0.06)
    heads.connect_seen("c")
    await asyncio.sleep(0.06)
    assert closed == []  # 0.12 s since the connection, 0.06 s since the CONNECT
    heads.tunnel("c")
    await settle(0.2)
    assert closed == []


async def test_a_body_not_complete_in_time_closes_its_connection():
    heads, closed = deadlines(timeout=10)
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.body_started("c", "f1")
    await settle()
    assert closed == ["c"]


async def test_a_complete_body_stops_its_deadline():
    heads, closed = deadlines(timeout=10)
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.body_started("c", "f1")
    heads.request_done("c", "f1")
    await settle()
    assert closed == []


async def test_zero_turns_the_deadlines_off():
    heads, closed = deadlines(timeout=0, body_timeout=0)
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.body_started("c", "f1")
    await settle()
    assert closed == []


async def test_a_disconnected_client_leaves_nothing_behind():
    heads, closed = deadlines()
    heads.connected("c", lambda: closed.append("c"))
    heads.head_seen("c", "f1")
    heads.body_started("c", "f1")
    heads.disconnected("c")
    await settle()
    assert closed == [] and heads.busy("c") == 0
    assert not heads._timers and not heads._bodies and not heads._close


async def test_replayed_flows_of_unknown_clients_are_not_tracked():
    heads, _ = deadlines()
    heads.head_seen("replay", "f1")
    heads.body_started("replay", "f1")
    assert heads.busy("replay") == 0 and not heads._bodies


def test_the_collector_keeps_the_body_and_sends_nothing_on():
    over = []
    c = Collector(10, over.append)
    assert c(b"abc") == [] and c(b"defg") == [] and c(b"") == []
    assert c.streamed and c.body() == b"abcdefg" and over == []


def test_the_collector_refuses_once_as_the_body_crosses_the_limit_and_drops_the_rest():
    over = []
    c = Collector(10, over.append)
    c(b"x" * 8)
    c(b"x" * 5)
    c(b"x" * 100)
    assert over == [13]  # once, with the size that crossed
    assert c.refused and c.body() == b""


def test_a_body_of_exactly_the_limit_is_kept():
    c = Collector(10, lambda size: pytest.fail("refused at the limit"))
    c(b"x" * 10)
    assert c.body() == b"x" * 10
