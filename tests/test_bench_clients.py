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


def test_the_paired_comparison_reports_cpu_per_request_and_its_a_a_control():
    ms = 0.001
    rounds = [{"router+config": [1 * ms], "router+clients": [1.2 * ms], "router+config2": [1.1 * ms]},
              {"router+config": [1 * ms], "router+clients": [1.1 * ms], "router+config2": [0.9 * ms]}]
    cpu = [{"router+config": 800e-6, "router+clients": 830e-6, "router+config2": 810e-6},
           {"router+config": 800e-6, "router+clients": 810e-6, "router+config2": 790e-6}]
    d = bench.paired_difference(rounds, "router+config", "router+clients", cpu)
    assert d["cpu_median_us"] == pytest.approx(20)
    control = bench.paired_difference(rounds, "router+config", bench.CONTROL, cpu)
    assert control["median_ms"] == pytest.approx(0.0)
    line = bench.render_paired({**d, "requests_per_round": 1, "control": control})
    assert "router CPU per request added: 20 µs" in line
    assert "A/A control, the same router+config in a second process: +0.000 ms" in line


def test_process_cpu_counts_a_busy_process_and_nothing_for_one_that_is_gone():
    import subprocess
    import sys
    import time
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 60
        while bench.process_cpu(spin) < 0.05:  # its CPU seconds grow while it spins
            assert time.monotonic() < deadline, "no CPU time counted for a spinning process"
            time.sleep(0.01)
    finally:
        spin.kill()
        spin.wait()
    assert bench.process_cpu(spin) == 0.0  # reaped: nothing to read
    assert bench.process_cpu(None) == 0.0
