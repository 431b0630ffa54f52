"""The mitmproxy addon: its options, its lifecycle and its hooks, gluing the router's pieces
together. The hooks stay thin: each request's work is `exchange`'s (a request's walk from its
head to the last byte of its answer). Who may use the router is in `access`, its pages and
commands in `admin` (a sub-addon), the cost strategy's conversations in `conversations`, what
the options make in `options`, draining in `drain` (a sub-addon).

Request path (all async, every wait bounded): ``requestheaders`` and ``request`` hand a routed
flow to `exchange.Exchange`, which checks the client's key, runs the attempt loop (`routing`),
then either sets a complete `flow.response` or parks the still-unread winning response with
the handoff server and re-points the flow at it, so mitmproxy streams it to the client event
by event (see `handoff`); ``responseheaders`` and ``error`` let it finish or drop its part.
"""

import asyncio
import logging
import os
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode, UpstreamMode
from mitmproxy.tls import ClientHelloData

from . import access, alerts, clients, compat, config, dispatch, ledger as ledgers, options, policy, runtime
from .accounts import Accounts
from .admin import Admin
from .affinity import MemoryAffinity, RedisAffinity
from .balances import Balances
from .budgets import SharedBudgets
from .connections import HeadDeadlines
from .conversations import Conversations
from .drain import Drain
from .endpoints import Endpoint, parse_endpoints
from .exchange import Exchange, quiet_request_log
from .handoff import HandoffServer
from .health import Breaker, HealthStore, MemoryHealthStore
from .health_metrics import HealthGauges
from .liveness import Liveness
from .probes import Prober
from .redis_store import RedisHealthStore
from .routing import Routing, Settings
from .slots import Slots
from .status import Stats
from .upstream import Upstream

log = logging.getLogger("claude_router")

RELOAD_EVERY = 0.5  # seconds between checks of the config file
# With no endpoints every request would go unrouted to the reverse target or CONNECT host, at
# full price with the client's own key: the router refuses to start instead, and says why.
NO_ENDPOINTS = ("no endpoints configured (router_config or router_endpoints): nothing to route to. "
                "Try ./scripts/run --demo, or write a router.yaml (./scripts/run --init writes a "
                "commented starter) and start with --set router_config=router.yaml")


class Router:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self.option_endpoints: tuple[Endpoint, ...] = ()
        self.file: config.FileConfig | None = None
        self.hosts: frozenset[str] = frozenset()
        self.client_keys: tuple[bytes, ...] = ()  # every key accepted: clients' and admins'
        self.clients: tuple[clients.Client, ...] = ()  # who each accepted key is (clients.table)
        self.admin_keys: tuple[bytes, ...] = ()
        self.store: HealthStore = MemoryHealthStore(Breaker(), clock=clock)
        self.upstream = Upstream()
        self.routing = Routing(self.upstream, clock)
        self.slots = Slots()  # requests in flight per endpoint (max_concurrency), tiers' round-robin
        self.settings = Settings()
        # Tests cooling endpoints out of band (probe: in router.yaml); told by the routing loop
        # which endpoints asked to be left alone until a time.
        self.prober = Prober(lambda: self.endpoints, lambda: self.store, self.upstream,
                             lambda: self.settings.connect_timeout, lambda: self.settings.window_cap, clock)
        self.routing.on_hold = self.prober.hold
        # What cooled an endpoint (its last counted failure): a free probe ends capacity cooldowns only.
        self.prober.cause = lambda name: getattr(self.stats.endpoints.get(name), "last_error", "")
        self._probing: asyncio.Task | None = None
        self.handoff = HandoffServer()
        self.stats = Stats()
        self.accounts = Accounts(clock, self.stats.registry)  # per client: spend, limits' state
        self.ledger: ledgers.Ledger | None = None  # router_ledger: opened once running
        self.budgets: SharedBudgets | None = None  # spend shared through Redis
        self.accounts.on_spend = self._spent
        self.stats.registry.register(HealthGauges(self))  # cooling / cooldown seconds, at scrape time
        self.alerts = alerts.Alerts(self.stats.registry, clock, lambda: self.file.alerts if self.file else (),
                                    lambda: alerts.secrets_of(self))  # webhooks (issue 23)
        self.balances = Balances(clock, self.stats.registry)  # relay balances, polled when running
        self.routing.is_low = self.balances.is_low  # below min_usd: skipped without blame
        self.balances.on_low = self._balance_low  # an alert (alerts.balance_low)
        self._background: set[asyncio.Task] = set()
        self._config_stamp: tuple | None = None
        self._watcher: asyncio.Task | None = None
        self.heads = HeadDeadlines()
        self.body_limit: int = 32_000_000
        self._backstop: str | None = None  # the body_size_limit the router set
        self.hook_index: dispatch.HookIndex | None = None  # router_hook_index
        self.accept_errors = runtime.AcceptErrors()  # out of descriptors: one line, not tracebacks
        self._running = False
        self.conversations = Conversations(clock)
        self.admin = Admin(self)
        self.exchange = Exchange(self)  # the per-request work the hooks hand on
        self.drain = Drain()
        self.addons = [self.admin, self.drain, Liveness()]  # Liveness: the health page

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.file.endpoints if self.file else self.option_endpoints

    @property
    def affinity(self) -> MemoryAffinity:
        return self.conversations.affinity

    # -- options -------------------------------------------------------------------------

    def load(self, loader) -> None:
        options.declare(loader)
        for problem in options.unparsable(loader.master.options) + options.unknown(loader.master.options):
            log.error(problem)

    def configure(self, updated: set[str]) -> None:
        if self._running or not options.ALL <= set(updated):
            self._configure(updated)  # a change: mitmproxy rolls it back and reports the error
            return
        # Start-up: the script's first configure, with every option. mitmproxy would log a
        # refusal raised here with its traceback; one line naming the file or option instead,
        # and mitmdump/mitmweb exit ("Error logged during startup").
        try:
            self._configure(updated)
        except exceptions.OptionsError as e:
            log.error(f"router: {e}")

    def _configure(self, updated: set[str]) -> None:
        opts = ctx.options
        options.check_ints(opts, updated)
        if "router_config" in updated:
            self._load_config_or_refuse()
        if "router_endpoints" in updated:
            try:
                self.option_endpoints = parse_endpoints(opts.router_endpoints)
            except ValueError as e:
                raise exceptions.OptionsError(f"Cannot use router_endpoints: {e}") from None
        if "router_hosts" in updated:
            self.hosts = frozenset(h.strip().lower() for h in opts.router_hosts if h.strip())
        if updated & {"router_client_keys", "router_config"}:
            self.client_keys = self._client_keys(self.file)
            self.clients, self.admin_keys = self._identities(self.file)
        if updated & {"router_max_failures", "router_cooldown"}:
            self.store.breaker = options.breaker(ctx.options)
        if updated & {"router_redis_url", "router_key_prefix"}:
            self._replace_store(options.store(ctx.options, self.clock))
            c = self.conversations
            most = opts.router_max_sessions
            old, c.affinity = c.affinity, (
                RedisAffinity(self.store.client, self.store.prefix, self.clock, max_sessions=most)
                if isinstance(self.store, RedisHealthStore) else MemoryAffinity(self.clock, most))
            try:
                self.spawn(old.close())
            except RuntimeError:  # no loop yet (start-up): nothing was started
                pass
            self._share_budgets()
            self.balances.shared = ((self.store.client, self.store.prefix)
                                    if isinstance(self.store, RedisHealthStore) else None)
        if updated & {"router_ledger", "confdir"}:
            self._open_ledger()
        if "router_ledger_days" in updated and self.ledger is not None:
            self.ledger.days = opts.router_ledger_days
        if "router_strategy" in updated:
            if opts.router_strategy not in ("cost", "order"):
                raise exceptions.OptionsError(
                    f"router_strategy must be cost or order, got {opts.router_strategy!r}")
            self.conversations.strategy = opts.router_strategy
        if "router_max_sessions" in updated:
            self.affinity.max_sessions = opts.router_max_sessions
        if "router_session_horizon" in updated:
            self.conversations.horizon = opts.router_session_horizon
        if "router_cache_ttl" in updated:
            self.conversations.cache_ttl = float(opts.router_cache_ttl)
        if updated & {"router_endpoints", "router_config", "router_redis_url", "router_key_prefix"}:
            self.store.track(policy.health_subjects(ep.name for ep in self.endpoints))
        if updated & {"router_endpoints", "router_config"}:
            self.balances.configure(self.endpoints)
        if updated & (options.ALL - {"router_endpoints", "router_hosts", "router_redis_url", "router_hook_index",
                                     "router_key_prefix", "router_config", "router_client_keys"}):
            self.settings = options.settings(ctx.options)
        if (updated & {"router_endpoints", "router_config"} and not self.endpoints
                and (self._running or options.ALL <= set(updated))):  # start-up, or a change
            raise exceptions.OptionsError(NO_ENDPOINTS)
        if updated & {"router_config", "router_client_keys", "router_endpoints", "listen_host", "mode"}:
            self._refuse_open_keys(self.endpoints, self.client_keys)
        if "router_head_timeout" in updated:
            self.heads.timeout = float(opts.router_head_timeout)
        if "router_body_timeout" in updated:
            self.heads.body_timeout = float(opts.router_body_timeout)
        if "router_max_body_mb" in updated:
            self.body_limit = opts.router_max_body_mb * 1_000_000
            # A backstop for chunked bodies (their size is known only as they arrive):
            # mitmproxy's own limit at 4 x, unless the operator set one.
            backstop = f"{4 * opts.router_max_body_mb}m"
            if opts.body_size_limit in (None, self._backstop):
                self._backstop = backstop
                opts.update(body_size_limit=backstop)
        if "router_hook_index" in updated and self._running:
            self._index_hooks(opts.router_hook_index)
        if "connection_strategy" in updated and opts.connection_strategy != "lazy":
            # Eager mode dials the reverse target or CONNECT host before any hook runs,
            # which fails for hosts the router never contacts.
            log.info("router: setting connection_strategy=lazy (required for routing)")
            opts.update(connection_strategy="lazy")

    def _load_config_or_refuse(self) -> None:
        path = ctx.options.router_config
        if not path:
            self.file = None
            return
        try:
            self.file = config.load(path)
        except config.ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        self._config_stamp = _stamp(path)
        self._apply_file_options(self.file)

    def _apply_file_options(self, file: config.FileConfig) -> None:
        """The file's settings win over --set; options that differ are updated."""
        changed = {k: v for k, v in file.options.items() if getattr(ctx.options, k) != v}
        if changed:
            ctx.options.update(**changed)

    def _client_keys(self, file: config.FileConfig | None) -> tuple[bytes, ...]:
        try:
            keys = access.client_keys(ctx.options.router_client_keys,
                                      file.client_keys if file else ())
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if file is None:
            return keys
        return tuple(c.key for c in file.clients) + keys + tuple(k.encode() for k in file.admin_keys)

    def _identities(self, file: config.FileConfig | None
                    ) -> tuple[tuple[clients.Client, ...], tuple[bytes, ...]]:
        """Who each accepted key is (named clients, then every other key unnamed), and the
        admin keys. Counters are kept by name, so a reload keeps them all."""
        keys = self._client_keys(file)
        named = file.clients if file else ()
        return clients.table(named, keys[len(named):]), tuple(k.encode() for k in (file.admin_keys if file else ()))

    def _refuse_open_keys(self, endpoints: tuple[Endpoint, ...], client_keys: tuple[bytes, ...]) -> None:
        host = access.open_door(endpoints, client_keys, getattr(ctx.options, "listen_host", "127.0.0.1"),
                                getattr(ctx.options, "mode", ()))
        if host is not None:
            raise exceptions.OptionsError(
                f"endpoints hold their own keys but no router_client_keys are set, and the router "
                f"listens on {host or 'every interface'}: set router_client_keys (or client_keys "
                f"in the config file), or listen on 127.0.0.1")

    def _share_budgets(self) -> None:
        """With Redis, every worker adds its clients' spend there and budgets read the totals."""
        old, self.budgets = self.budgets, None
        if old is not None:
            try:
                self.spawn(old.close())
            except RuntimeError:
                pass
        self.alerts.share(None, "")  # alerts claim their events in Redis (sent once by all workers)
        if isinstance(self.store, RedisHealthStore):
            self.alerts.share(self.store.client, self.store.prefix)
            self.budgets = SharedBudgets(self.store.client, self.store.prefix, self.accounts,
                                         lambda: self.clients, self.clock)
            if self._running:
                self.budgets.start()

    def _open_ledger(self) -> None:
        """The ledger (router_ledger, else the confdir's): the spend it holds is read now, at
        start-up (before any request: budgets survive a restart); its writer thread starts
        when the router runs. A file that cannot be read stops start-up, naming the option."""
        where = ctx.options.router_ledger.strip()
        path = os.path.expanduser(where or os.path.join(ctx.options.confdir, ledgers.FILENAME))
        if self.ledger is not None and (where != "off" and self.ledger.path == path):
            return
        old, self.ledger = self.ledger, None
        if old is not None:
            old.close()
        if where == "off":
            return
        ledger = ledgers.Ledger(path, ctx.options.router_ledger_days, self.clock)
        try:
            spent = ledger.load_spend()
        except (ledgers.sqlite3.Error, OSError) as e:
            ledger.close()
            raise exceptions.OptionsError(f"Cannot use router_ledger {path!r}: {e}") from None
        for label, days in spent.items():
            acct = self.accounts.get(label)
            for day, usd in days.items():
                acct.spend[day] = max(acct.spend.get(day, 0.0), usd)
        self.ledger = ledger
        if self._running:
            ledger.start()

    def _balance_low(self, endpoint: str, usd: float, min_usd: float) -> None:
        """A relay's balance went below its min_usd (balances): one alert, however many workers
        see it (the id is the endpoint and the UTC day)."""
        self.alerts.emit("balance_low", endpoint, usd=round(usd, 2), min_usd=min_usd)

    def _spent(self, label: str, day: str, usd: float) -> None:
        """A client's spend (accounts counted it): to the ledger and to Redis, in the background."""
        if self.ledger is not None:
            self.ledger.spend(label, day, usd)
        if self.budgets is not None:
            self.budgets.add(label, day, usd)

    def _replace_store(self, store: HealthStore) -> None:
        old, self.store = self.store, store
        try:
            self.spawn(old.close())
        except RuntimeError:  # no loop yet (start-up): nothing was opened
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def running(self) -> None:
        # Sync on purpose: mitmproxy may invoke `running` synchronously for a late-loaded script.
        quiet_request_log()
        runtime.tune_gc()
        runtime.raise_fd_limit()
        self.accept_errors.install(asyncio.get_running_loop())
        self._running = True
        if self.ledger is not None:
            self.ledger.start()
        if self.budgets is not None:
            self.budgets.start()
        self.alerts.start(lambda: alerts.observe(self))
        self.balances.start()
        compat.announce(ctx.options.router_hook_index)  # one line: the mitmproxy internals in use
        self._index_hooks(ctx.options.router_hook_index)
        self.spawn(self._announce())
        if ctx.options.router_config and self._watcher is None:
            self._watcher = self.spawn(self._watch_config())
        if self._probing is None:
            self._probing = self.spawn(self.prober.run())

    def _index_hooks(self, on: bool) -> None:
        if on and self.hook_index is None:
            self.hook_index = compat.install_hook_index(ctx.master.addons)  # None: not verified here
        elif not on and self.hook_index is not None:
            self.hook_index.uninstall()
            self.hook_index = None

    async def _announce(self) -> None:
        if not self.endpoints:  # refused at start-up (configure); a refused start is exiting
            return
        if isinstance(self.store, RedisHealthStore):
            await self.store.wait_synced(timeout=2.0)  # so the first log line tells the truth
        names = ", ".join(f"{ep.index}:{ep.name}" for ep in self.endpoints)
        log.info(f"router: {len(self.endpoints)} endpoints in price order ({names}), "
                 f"health store: {self.store.description}")
        if any(ep.holds_secrets for ep in self.endpoints) and not self.client_keys:
            log.warning("router: endpoints hold keys and no client keys are set: any local "
                        "process that reaches the router can use them")

    async def done(self) -> None:
        self.accept_errors.uninstall()
        if self._watcher:
            self._watcher.cancel()
        await self.alerts.close()
        self.admin.done()  # the dashboard's ledger connection (idempotent: mitmproxy may call it too)
        await self.prober.close(self._probing)  # cancelled and ended before the upstream closes
        await self.affinity.close()
        await self.handoff.close()
        await self.upstream.close()
        await self.balances.close()
        if self.budgets is not None:
            await self.budgets.round()  # the last spend, if Redis takes it now
            await self.budgets.close()
        await self.store.close()
        if self.ledger is not None:
            ledger, self.ledger = self.ledger, None
            await asyncio.to_thread(ledger.close)

    async def _watch_config(self) -> None:
        """Apply edits to the config file within a second; a broken edit keeps the last good."""
        while True:
            await asyncio.sleep(RELOAD_EVERY)
            path = ctx.options.router_config
            stamp = _stamp(path) if path else None
            if stamp is None or stamp == self._config_stamp:
                continue
            self._config_stamp = stamp
            try:
                file = config.load(path)
            except config.ConfigError as e:
                log.warning(f"router: keeping the last good config: {e}")
                continue
            try:
                keys = self._client_keys(file)
                self._refuse_open_keys(file.endpoints, keys)  # checked before anything changes
                self._apply_file_options(file)
                self.file, self.client_keys = file, keys
                self.clients, self.admin_keys = self._identities(file)
            except exceptions.OptionsError as e:
                log.warning(f"router: keeping the last good config: {e}")
                continue
            self.store.track(policy.health_subjects(ep.name for ep in self.endpoints))
            self.balances.configure(self.endpoints)
            log.info(f"router: config reloaded from {path}: "
                     f"{', '.join(ep.name for ep in self.endpoints)}")

    def spawn(self, coro) -> asyncio.Task:
        """Run in the background; kept until done (a task nobody holds may be collected)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- hooks -----------------------------------------------------------------------------

    def tls_clienthello(self, data: ClientHelloData) -> None:
        """Regular mode: leave TLS to hosts we do not route untouched (no interception)."""
        if not isinstance(data.context.client.proxy_mode, RegularMode):
            return
        host = data.client_hello.sni or (data.context.server.address or ("",))[0]
        if self.endpoints and host and host.lower() not in self.hosts:
            data.ignore_connection = True
            self.heads.tunnel(data.context.client.id)  # passed through: no request heads to wait for

    def client_connected(self, client) -> None:
        master = ctx.master

        def close() -> None:
            # mitmproxy's own way to drop a connection (compat: none where not recognised)
            self.spawn(compat.close_client(master, client.id))

        self.heads.connected(client.id, close)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self.heads.connect_seen(flow.client_conn.id)  # the TLS handshake and next head: bounded

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.heads.head_seen(flow.client_conn.id, flow.id)
        if flow.response or flow.error or not flow.live or flow.is_replay:
            return
        if self.routes(flow):
            await self.exchange.head(flow)

    def routes(self, flow: http.HTTPFlow) -> bool:
        if not self.endpoints:
            return False
        if flow.is_replay and "router" in flow.metadata:
            return True  # a routed flow replayed from mitmweb or -C: route it again
        mode = flow.client_conn.proxy_mode
        if isinstance(mode, ReverseMode):
            return True
        if isinstance(mode, (RegularMode, UpstreamMode)):
            return flow.request.pretty_host.lower() in self.hosts
        return False

    async def request(self, flow: http.HTTPFlow) -> None:
        self.heads.request_done(flow.client_conn.id, flow.id)
        await self.exchange.request(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.heads.response_done(flow.client_conn.id, flow.id)

    def client_disconnected(self, client) -> None:
        self.heads.disconnected(client.id)
        self.exchange.client_left(client.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.exchange.response_headers(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.heads.failed(flow.client_conn.id, flow.id)
        self.exchange.failed(flow)


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
