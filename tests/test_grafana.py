"""The Grafana dashboard that ships in docs/ (issue 23): every query names only metrics a real
router exports (read from a running mitmdump's /_router/metrics), and only PromQL's own words."""

import json
import re

import httpx

from conftest import ROOT

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
             "topk", "bottomk", "clamp_min", "delta", "deriv", "time", "vector", "label_replace"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset"}


def exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert found
    return found


def exported(text: str) -> set[str]:
    """Every series name the exposition can hold: each family's samples, including those of
    families with no samples yet (a counter's _total and _created, a histogram's _bucket ...)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total")
            names |= {"counter": {base + "_total", base + "_created"},
                      "histogram": {name + s for s in ("_bucket", "_count", "_sum", "_created")},
                      "summary": {name, name + "_count", name + "_sum", name + "_created"},
                      }.get(kind, {name})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(series names, functions) an expression uses: label matchers, ranges, strings, grouping
    labels and Grafana's $variables taken out first."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\w+", "", e)
    functions = set(re.findall(r"([A-Za-z_:][\w:]*)\s*\(", e))
    words = set(re.findall(r"[A-Za-z_:][\w:]*", e)) - functions - KEYWORDS
    return words, functions


def test_every_panel_query_names_only_metrics_the_router_exports(start_router, mock):
    router = start_router([f"aws={mock.url('aws')}", f"droid={mock.url('droid')}"])
    text = httpx.get(f"{router.base}/_router/metrics", timeout=10).text
    metrics = exported(text)
    assert "claude_router_requests_total" in metrics and "claude_router_alerts_total" in metrics
    for expr in exprs():
        words, functions = names_in(expr)
        assert words, f"no metric in {expr!r}"
        assert words <= metrics, f"{expr!r} names {sorted(words - metrics)}, not exported"
        assert functions <= FUNCTIONS, f"{expr!r} calls {sorted(functions - FUNCTIONS)}"


def test_the_dashboard_shows_endpoints_health_spend_tokens_and_clients():
    used = set().union(*(names_in(e)[0] for e in exprs()))
    for metric in ("claude_router_requests_total", "claude_router_attempts_total",
                   "claude_router_endpoint_cooling", "claude_router_cost_usd_total",
                   "claude_router_tokens_total", "claude_router_client_cost_usd_total"):
        assert metric in used


def test_a_misspelt_metric_would_be_caught():
    words, _ = names_in('sum by (endpoint) (rate(claude_router_request_total{status="200"}[$__rate_interval]))')
    assert words == {"claude_router_request_total"}
    assert words - exported("# TYPE claude_router_requests_total counter\n")
