"""The bench's named-clients pieces (claude_router_dev.bench): the in-process microbenchmark of the
named-clients path, the paired per-round comparison and its line in the report."""


import pytest

from claude_router_dev import bench


def test_the_in_process_microbenchmark_measures_every_step():
    c = bench.clients_bench(samples=50, repeats=2)
    assert c["clients"] == 50
    assert c["named_us"] > 0 and c["anonymous_us"] > 0
    assert set(c["steps_us"]) == {"key: authorized ×2 + who", "admit+release", "record", "ledger.add"}
    assert all(v > 0 for v in c["steps_us"].values())
    assert "named clients' own work in-process:" in bench.render_clients(c)


def test_the_baseline_config_is_the_same_file_without_clients():
    with_clients = bench.clients_yaml("http://127.0.0.1:1/ok", named=True)
    baseline = bench.clients_yaml("http://127.0.0.1:1/ok", named=False)
    assert with_clients.startswith(baseline)
    assert "clients:" not in baseline and "price:" in baseline
    assert with_clients.count("{name: ") == 1 + 50  # the endpoint and 50 clients


def test_the_paired_difference_is_the_median_of_the_rounds_p50_differences():
    ms = 0.001
    rounds = [{"router+config": [1 * ms, 2 * ms, 3 * ms], "router+clients": [1 * ms, 2.1 * ms, 9 * ms]},
              {"router+config": [2 * ms], "router+clients": [2.3 * ms]},
              {"router+config": [5 * ms], "router+clients": [4.9 * ms]},
              {"router+config": [], "router+clients": [1 * ms]}]  # no pair: left out
    d = bench.paired_difference(rounds, "router+config", "router+clients")
    assert d["rounds"] == 3
    assert d["median_ms"] == pytest.approx(0.1)
    line = bench.render_paired({**d, "requests_per_round": 3})
    assert line.startswith("named clients added p50: 0.100 ms (median of 3 paired rounds")
    assert "target <= 0.1 ms" in line
    assert bench.render_paired(None) == ""
