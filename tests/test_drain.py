"""Draining's bookkeeping: what counts as in flight, and which answers tell clients to leave."""

from mitmproxy.test import tflow

from claude_router.drain import Drain


def live_flow(**kw):
    f = tflow.tflow(**kw)
    f.live = True
    return f


def test_a_request_is_in_flight_until_its_response_or_error():
    d = Drain()
    ok, broken = live_flow(), live_flow()
    d.requestheaders(ok)
    d.requestheaders(broken)
    assert d.in_flight == 2
    d.response(ok)
    d.error(broken)
    assert d.in_flight == 0


def test_a_flow_mitmproxy_finished_without_this_addons_hooks_is_not_in_flight():
    """(a hook before it failed, so its response hook never ran)"""
    d = Drain()
    f = live_flow()
    d.requestheaders(f)
    f.live = False
    assert d.in_flight == 0


def test_a_gone_clients_flows_are_not_in_flight():
    d = Drain()
    f = live_flow()
    d.client_connected(f.client_conn)
    d.requestheaders(f)
    d.client_disconnected(f.client_conn)
    assert d.in_flight == 0 and not d.connections


def test_connection_close_only_while_draining():
    d = Drain()
    f = live_flow(resp=True)
    d.responseheaders(f)
    assert "connection" not in f.response.headers
    d.draining = True
    d.responseheaders(f)
    assert f.response.headers["connection"] == "close"


def test_an_upgrade_keeps_its_connection_header():
    d = Drain()
    d.draining = True
    f = live_flow(resp=True)
    f.response.status_code = 101
    f.response.headers["connection"] = "Upgrade"
    d.responseheaders(f)
    assert f.response.headers["connection"] == "Upgrade"


def test_http2_answers_get_no_connection_header():
    d = Drain()
    d.draining = True
    f = live_flow(resp=True)
    f.request.http_version = "HTTP/2.0"
    d.responseheaders(f)
    assert "connection" not in f.response.headers
