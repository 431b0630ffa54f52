"""The addon's options and hooks in mitmproxy's own test harness (no sockets)."""

import pytest
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from claude_router.addon import Router


def configured(**opts):
    router = Router()
    tctx = taddons.context(router)
    tctx.configure(router, **opts)
    return router, tctx


def test_endpoints_parse_in_price_order():
    router, _ = configured(router_endpoints=["aws=https://r/claude/aws", "droid=https://r/claude/droid"])
    assert [(e.name, e.index) for e in router.endpoints] == [("aws", 0), ("droid", 1)]


def test_bad_endpoint_is_an_options_error_naming_option():
    router = Router()
    with taddons.context(router) as tctx:
        with pytest.raises(exceptions.OptionsError, match="router_endpoints.*NAME=URL"):
            tctx.configure(router, router_endpoints=["nonsense"])


@pytest.mark.parametrize("option", ["router_max_failures", "router_cooldown",
                                    "router_connect_timeout", "router_headers_timeout",
                                    "router_stream_timeout"])
def test_non_positive_ints_are_refused_with_name_and_value(option):
    router = Router()
    with taddons.context(router) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"{option}.*got 0"):
            tctx.configure(router, **{option: 0})


def test_breaker_follows_options():
    router, _ = configured(router_max_failures=5, router_cooldown=30)
    assert (router.store.breaker.max_failures, router.store.breaker.cooldown) == (5, 30.0)


def test_connection_strategy_is_made_lazy():
    router = Router()
    with taddons.context(Proxyserver(), router) as tctx:
        tctx.configure(router, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def flow_in(mode: str, host: str = "api.anthropic.com", method="POST", path="/v1/messages"):
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    f.request.host, f.request.method, f.request.path = host, method, path
    return f


def test_reverse_mode_routes_everything():
    router, _ = configured(router_endpoints=["a=http://h/a"])
    assert router.routes(flow_in("reverse:https://example.com", host="example.com"))


def test_regular_mode_routes_only_router_hosts():
    router, _ = configured(router_endpoints=["a=http://h/a"], router_hosts=["api.anthropic.com"])
    assert router.routes(flow_in("regular"))
    assert not router.routes(flow_in("regular", host="pypi.org"))


def test_nothing_is_routed_without_endpoints():
    router, _ = configured()
    assert not router.routes(flow_in("reverse:https://example.com"))


async def test_head_root_is_answered_locally():
    router, _ = configured(router_endpoints=["a=http://127.0.0.1:9/a"])
    f = flow_in("reverse:https://example.com", method="HEAD", path="/")
    await router.request(f)
    assert f.response.status_code == 200


async def test_already_answered_flow_is_left_alone():
    router, _ = configured(router_endpoints=["a=http://127.0.0.1:9/a"])
    f = flow_in("reverse:https://example.com")
    f.response = tflow.tresp()
    before = f.response.status_code
    await router.request(f)
    assert f.response.status_code == before


async def test_the_hook_index_is_on_by_default_and_follows_its_option():
    router = Router()
    with taddons.context(router) as tctx:
        manager = tctx.master.addons
        router.running()
        assert "trigger_event" in vars(manager)  # the index stands in for mitmproxy's walk
        tctx.configure(router, router_hook_index=False)
        assert "trigger_event" not in vars(manager)
        tctx.configure(router, router_hook_index=True)
        assert "trigger_event" in vars(manager)
        router.hook_index.uninstall()
        router.accept_errors.uninstall()


async def test_with_the_hook_index_off_none_is_installed():
    router = Router()
    with taddons.context(router) as tctx:
        tctx.configure(router, router_hook_index=False)
        router.running()
        assert "trigger_event" not in vars(tctx.master.addons)
        router.accept_errors.uninstall()
