"""Endpoint health as Prometheus gauges, read from the health store's view at scrape time:
whether each endpoint is cooling down, and for how long still (the Grafana dashboard's
cooldown panels). Names only, never a URL or key."""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .health import HEALTHY, Phase, phase

if TYPE_CHECKING:
    from .addon import Router


class HealthGauges(Collector):
    def __init__(self, router: "Router") -> None:
        self.router = router

    def collect(self) -> Iterator[Metric]:
        r = self.router
        cooling = GaugeMetricFamily("claude_router_endpoint_cooling", "1 while the endpoint is "
                                    "cooling down (not used until its cooldown ends), else 0",
                                    labels=["endpoint"])
        left = GaugeMetricFamily("claude_router_endpoint_cooldown_seconds", "Seconds left of the "
                                 "endpoint's cooldown (0 when it is not cooling)", labels=["endpoint"])
        now = r.clock()
        view = r.store.current()
        for ep in r.endpoints:
            h = view.get(ep.name, HEALTHY)
            is_cooling = phase(h, now) is Phase.COOLING
            cooling.add_metric([ep.name], 1.0 if is_cooling else 0.0)
            left.add_metric([ep.name], round(max(0.0, h.ejected_until - now), 1) if is_cooling else 0.0)
        yield cooling
        yield left

    def describe(self) -> Iterator[Metric]:
        """The families without reading the store (the registry calls this on register)."""
        yield GaugeMetricFamily("claude_router_endpoint_cooling", "", labels=["endpoint"])
        yield GaugeMetricFamily("claude_router_endpoint_cooldown_seconds", "", labels=["endpoint"])
