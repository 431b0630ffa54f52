"""Development tools of the Claude API router: importable by the tests and by one another,
runnable with ``python -m`` (the launchers in ``scripts/`` do that).

    mock_relay      the mock Claude API relay (tests, benchmarks, ``./scripts/run --demo``)
    harness         free ports, mitmdump with the router, the mock, redis-server, SSE parsing
    bench           ``./scripts/bench``: the router against plain mitmdump, nginx and the wire
    bench_streams   its phase of thousands of long SSE streams held at once
    bench_workers   ``./scripts/bench --scaling``: N workers behind HAProxy against one process
    costsim         ``./scripts/costsim``: what the cost strategy spends, against an oracle
    soak            ``./scripts/soak``: many mixed requests while faults come and go
    addons/         mitmproxy scripts the benchmarks load with -s (hook_index, loopmon)
"""
