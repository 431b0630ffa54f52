"""Operating the router: its own pages (``/_router/status``, ``/_router/metrics``), never
forwarded upstream, and its commands (``router.status``, ``router.reset``, ``router.forget``,
``router.disable``, ``router.enable``) for mitmproxy's console, mitmweb's command bar and
``mitmdump`` scripts. A sub-addon of the router: it reads and acts on the router's state."""

import json
import logging
from typing import TYPE_CHECKING

from mitmproxy import command, exceptions, http

from . import clients, dashboard, policy
from .errors import error_body
from .status import table

if TYPE_CHECKING:
    from .addon import Router

log = logging.getLogger("claude_router")

PREFIX = "/_router/"


def reply(flow: http.HTTPFlow, status: int, body: bytes, content_type: str = "application/json") -> None:
    flow.response = http.Response.make(status, body, {"content-type": content_type})


class Admin:
    name = "router_admin"  # mitmproxy's name for this addon (default: the class name)

    def __init__(self, router: "Router") -> None:
        self.router = router
        self.dashboard = dashboard.Dashboard(router)  # GET /_router/ (docs/dashboard.md)

    def done(self) -> None:
        self.dashboard.close()

    # -- pages -------------------------------------------------------------------------------

    async def page(self, flow: http.HTTPFlow, who: clients.Client | None = None,
                   may_admin: bool = True, sees_all: bool = False) -> None:
        """Answer a request under ``/_router/``. ``who`` presented the key; ``may_admin``: it may
        read the status and metrics (any key, unless admin_keys are set); ``sees_all``: it holds
        an admin key, and its usage page shows every client."""
        name = flow.request.path[len(PREFIX):].split("?")[0]
        if dashboard.owns(name):  # the page, its files, its document and admins' actions
            r = self.router
            await self.dashboard.serve(flow, name, may_read=may_admin,
                                       may_act=sees_all or not (r.admin_keys or r.client_keys))
        elif name == "usage":
            r = self.router
            doc = ({"clients": r.accounts.document(r.clients, r.clock())} if sees_all
                   else r.accounts.figures(who or clients.ANONYMOUS, r.clock()))
            reply(flow, 200, json.dumps(doc, indent=2).encode())
        elif name in ("status", "metrics") and not may_admin:
            reply(flow, 403, error_body(403, f"/_router/{name} needs an admin key (admin_keys); "
                                             "a client key reads its own /_router/usage"))
        elif name == "status":
            reply(flow, 200, json.dumps(await self.status_document(), indent=2).encode())
        elif name == "metrics":
            reply(flow, 200, self.router.stats.metrics(), "text/plain; version=0.0.4")
        else:
            reply(flow, 404, error_body(404, "unknown router page; try /_router/ (the dashboard), "
                                        "/_router/status, /_router/metrics or /_router/usage"))

    async def status_document(self) -> dict:
        await self.router.store.view()
        return self._document()

    def _document(self) -> dict:
        r = self.router
        doc = r.stats.document(r.endpoints, r.store.current(), r.clock(), set(r.store.disabled),
                               r.store.description, r.affinity)
        for e in doc["endpoints"]:  # balance_usd, balance_checked (unix time), balance_low ...
            e.update(r.balances.status(e["name"]))
        for e, ep in zip(doc["endpoints"], r.endpoints, strict=True):
            if (probe := r.prober.document(ep, r.clock())) is not None:
                e["probe"] = probe  # out-of-band probes (probes.py)
        for e in doc["endpoints"]:
            e["in_flight"] = r.slots.count(e["name"])  # this process's (max_concurrency is per process)
        if any(c.name for c in r.clients):  # named clients (issue 21): each one's figures
            doc["clients"] = r.accounts.document(r.clients, r.clock())
        if r.alerts.webhooks():  # webhooks (issue 23): where they go (host only) and the counts
            doc["alerts"] = r.alerts.document()
        return doc

    # -- commands ----------------------------------------------------------------------------

    @command.command("router.status")
    def status(self) -> str:
        """The endpoints in price order with their health, traffic, tokens and cost."""
        return table(self._document())

    @command.command("router.reset")
    def reset(self, endpoint: str = "") -> None:
        """Clear the health of one endpoint, or of all: failures and cooldowns are forgotten."""
        self._known(endpoint, allow_empty=True)
        store = self.router.store

        async def reset() -> None:
            if not endpoint:
                await store.reset(None)
            for name in policy.health_subjects([endpoint]) if endpoint else ():
                await store.reset(name)

        self.router.spawn(reset())
        log.info(f"router: health reset for {endpoint or 'every endpoint'}")

    @command.command("router.forget")
    def forget(self, endpoint: str = "") -> None:
        """Forget what was learned about one endpoint's prompt caching, or all (shared in Redis)."""
        self._known(endpoint, allow_empty=True)
        self.router.spawn(self.router.affinity.forget(endpoint or None))
        log.info(f"router: learned cache behaviour forgotten for {endpoint or 'every endpoint'}")

    @command.command("router.disable")
    def disable(self, endpoint: str) -> None:
        """Take an endpoint out of rotation until router.enable (on every instance in Redis mode)."""
        self._known(endpoint)
        self.router.spawn(self.router.store.set_disabled(endpoint, True))
        log.info(f"router: endpoint {endpoint} disabled")

    @command.command("router.enable")
    def enable(self, endpoint: str) -> None:
        """Put a disabled endpoint back into rotation."""
        self._known(endpoint)
        self.router.spawn(self.router.store.set_disabled(endpoint, False))
        log.info(f"router: endpoint {endpoint} enabled")

    def _known(self, name: str, allow_empty: bool = False) -> None:
        endpoints = self.router.endpoints
        if (allow_empty and not name) or any(ep.name == name for ep in endpoints):
            return
        raise exceptions.CommandError(
            f"no endpoint {name!r}; endpoints: {', '.join(ep.name for ep in endpoints)}")
