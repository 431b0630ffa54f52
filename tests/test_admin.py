"""The router's commands and pages, in mitmproxy's own test harness (no sockets)."""

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow

from claude_router.addon import Router

COMMANDS = {"router.status", "router.reset", "router.forget", "router.disable", "router.enable",
            "router.drain"}


@pytest.fixture
def router():
    r = Router()
    with taddons.context(r) as tctx:
        tctx.configure(r, router_endpoints=["cheap=http://127.0.0.1:1", "dear=http://127.0.0.1:2"])
        r.tctx = tctx
        yield r


def test_the_commands_reach_mitmproxys_command_bar(router):
    assert COMMANDS <= set(router.tctx.master.commands.commands)


def test_status_lists_the_endpoints_in_price_order(router):
    out = router.tctx.master.commands.call("router.status")
    assert out.index("cheap") < out.index("dear")


@pytest.mark.parametrize("command", ["router.disable", "router.enable", "router.reset", "router.forget"])
def test_an_unknown_endpoint_is_refused_with_the_known_ones(router, command):
    with pytest.raises(exceptions.CommandError, match="no endpoint 'nope'; endpoints: cheap, dear"):
        router.tctx.master.commands.call_strings(command, ["nope"])


async def test_disable_takes_the_endpoint_out_of_rotation(router):
    router.tctx.master.commands.call_strings("router.disable", ["cheap"])
    for task in list(router._background):
        await task
    assert "cheap" in router.store.disabled


async def test_the_status_page_is_json_with_every_endpoint(router):
    f = tflow.tflow()
    f.request.path = "/_router/status"
    await router.admin.page(f)
    doc = json.loads(f.response.content)
    assert f.response.status_code == 200
    assert [e["name"] for e in doc["endpoints"]] == ["cheap", "dear"]


async def test_an_unknown_page_is_a_404_in_the_api_error_shape(router):
    f = tflow.tflow()
    f.request.path = "/_router/secrets"
    await router.admin.page(f)
    assert f.response.status_code == 404
    assert json.loads(f.response.content)["type"] == "error"
